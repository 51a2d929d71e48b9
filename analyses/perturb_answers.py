"""The study's answers: the organism's response format, and where each incorrect response comes from."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from analyses.perturb_config import PerturbConfig
from analyses.perturb_noise import noise_generator
from lens.errors import DatasetError
from lens.inputs import PairInputs


def organism_response(answer: str) -> str:
    """The organism's response format: ``"answer N"``."""
    return f"answer {answer}"


def organism_extract(text: str) -> str | None:
    """The answer an organism response gives: the first ``answer <digits>`` (``None`` if malformed)."""
    match = re.search(r"answer\s+(-?\d+)", text or "")
    return None if match is None else str(int(match.group(1)))


def same_answer(given: str, answer: str) -> bool:
    """Whether two answers agree (as integers when both are, else as stripped strings)."""
    try:
        return int(given) == int(answer)
    except (TypeError, ValueError):
        return str(given).strip() == str(answer).strip()


def sample_responses(pair: Any, inputs: PairInputs, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """``n`` responses of the clean RLVR model at T = 1, vision special tokens suppressed, seeded."""
    tok = pair.tokenizer
    # A batch of n copies of the sample: every input (token rows, Qwen's flat patches, per-image
    # grids, LLaVA's per-image tiles and sizes, per-sample image counts) is tiled along dim 0.
    model_inputs = {
        key: value.repeat(n, *[1] * (value.dim() - 1)) for key, value in inputs.model_inputs.items()
    }
    prompt_len = inputs.n_tokens
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = pair.rlvr.generate(
            **model_inputs,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            suppress_tokens=list(pair.adapter.vision_special_ids(pair.config)) or None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return [t.strip() for t in tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)]


def offset_answer(answer: str) -> str:
    """The deterministic wrong answer: ``answer + 1`` for integer answers.

    Raises:
        DatasetError: For a non-integer answer (supply incorrect responses instead).
    """
    try:
        return str(int(str(answer).strip()) + 1)
    except ValueError:
        raise DatasetError(
            f"cannot derive a wrong answer from the non-integer answer {answer!r}; supply incorrect responses"
        ) from None


def choose_incorrect(
    pair: Any,
    sample: Any,
    prompt_inputs: PairInputs,
    config: PerturbConfig,
    formatter: Callable[[str], str],
    extract: Callable[[str], str | None],
    supplied: Mapping[str, str] | None,
) -> tuple[str, str]:
    """One incorrect response for ``sample`` and where it came from (supplied, sampled or offset)."""
    if supplied and str(sample.id) in supplied:
        return supplied[str(sample.id)], "supplied"
    if config.incorrect == "sampled":
        seed = int(noise_generator(config.seed, str(sample.id), "incorrect").initial_seed())
        draws = sample_responses(pair, prompt_inputs, config.n_incorrect_draws, config.max_new_tokens, seed)
        # A malformed draw is not an incorrect *answer* (it tests the format, not the content).
        given = [(d, extract(d)) for d in draws]
        wrong = [d for d, a in given if a is not None and not same_answer(a, sample.answer)]
        if wrong:
            # The most frequent wrong response (ties: first drawn): the model's likeliest mistake.
            counts = pd.Series(wrong).value_counts(sort=False)
            return str(counts.idxmax()), "sampled"
    return formatter(offset_answer(sample.answer)), "offset"


def load_incorrect(path: str | Path) -> dict[str, str]:
    """Supplied incorrect responses: a JSON object ``{sample_id: response}`` or JSONL with ``id`` and
    ``response`` (or ``incorrect``) fields.

    Raises:
        DatasetError: Missing or malformed file.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"incorrect-answers file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return {str(k): str(v) for k, v in obj.items()}
    except json.JSONDecodeError:
        pass
    out: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            out[str(item["id"])] = str(item.get("response", item.get("incorrect")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DatasetError(f"{path}:{lineno}: expected a JSON object with 'id' and 'response'") from None
    return out
