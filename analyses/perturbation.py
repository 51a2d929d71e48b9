"""Perturbation study: does low-entropy KL drift go with worse answers?

The paper adds noise to the inputs and reports that a smaller drift of the low-entropy activations
(KL to the base) goes with a lower perplexity of correct answers and a higher perplexity of
incorrect ones. It does not publish the protocol (papers.md §1.5), so the choices made here are:

- **Noise.** Gaussian, on the RLVR model only (the base stays clean: drift is measured to the clean
  base). Two kinds, run separately: ``pixel`` adds ``σ · std(pixel_values) · ε`` to the processed
  (already normalised) pixel values; ``embedding`` adds ``σ · RMS · ε`` to the input of decoder
  layer 0 at the visual positions, RMS being the root mean square of those clean visual
  embeddings (one scalar per sample). σ = 0 is always included as the clean reference.
- **Common random numbers.** One ``ε`` per (seed, sample, noise kind), reused for every σ and for
  both answers, so within a sample only the magnitude changes along the sweep and the correct and
  incorrect answers see the very same perturbed image. Seeds are derived from the sample id, so a
  resumed run or a subset gives the same numbers.
- **Drift.** Mean KL(P_base ‖ P_rlvr) of the logit lens (full vocabulary, float32, as in
  :mod:`lens.logit_lens`) pooled over the Activation Replay mask: visual tokens whose clean base
  entropy is ≤ τ · the layer's max over visual tokens (τ = 0.4; or, with ``mask_rule="quantile"``,
  ≤ the layer's q-quantile over visual tokens, for models whose early-layer entropies are
  near-uniform and τ·max selects nothing), over layers ``0 .. L/2 - 1`` by
  default (the released config replays the first 16 of 28 layers). The mask comes from the clean
  base, so it is the same set of positions at every σ. ``kl_visual_all`` (all visual tokens of those
  layers) is kept as a contrast.
- **Perplexity.** Teacher forced under the perturbed RLVR model: ``exp(mean NLL)`` over the response
  tokens including the final EOS (the model must also stop). The visual positions precede the
  response, so the drift does not depend on which answer is appended.
- **Answers.** Correct: the dataset answer rendered by ``formatter`` (``"answer N"`` for the
  organism). Incorrect, one per sample, in this order of preference: a supplied response for that
  sample; else (``incorrect="sampled"``) the most frequent wrong response among ``n_incorrect_draws``
  samples of the clean RLVR model (T = 1, vision special tokens suppressed), used verbatim; else the
  deterministic fallback ``formatter(answer + 1)``. The source is recorded per sample.
- **Statistics.** Spearman ρ between drift and PPL, for correct and incorrect answers separately
  and per noise kind, in two scopes: ``pooled`` (all sample × σ points) and ``within_sample`` (ρ
  across σ inside each sample, averaged over samples; removes between-sample differences such as
  easy vs hard images). 95% CIs come from a cluster bootstrap over samples, because the points of
  one sample are not independent. The pooled p-value treats points as independent and is optimistic.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import nn

from lens.datasets import sample_images
from lens.errors import ConfigError, DatasetError, InputError
from lens.fingerprint import pair_fingerprint, sample_digests
from lens.inputs import PairInputs
from lens.interventions.base import edit_input
from lens.logit_lens import LogitLens, distribution_stats, lens_entropy, lens_of
from lens.masks import EntropyMask
from lens.records import RecordWriter, write_tables
from lens.tracing import capture_residuals

NOISE_KINDS = ("pixel", "embedding")
ANSWER_KINDS = ("correct", "incorrect")
INCORRECT_SOURCES = ("sampled", "offset")
SCOPES = ("pooled", "within_sample")


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


def parse_sigmas(text: str | Sequence[Any]) -> tuple[float, ...]:
    """Noise magnitudes from ``"0,0.1,0.2"`` or a sequence, validated.

    Raises:
        ConfigError: An empty list, a non-numeric, negative, NaN or infinite entry.
    """
    items = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    items = [p for p in items if not (isinstance(p, str) and p == "")]
    if not items:
        raise ConfigError("no noise levels given; use e.g. --sigmas 0,0.1,0.2")
    sigmas = []
    for item in items:
        if isinstance(item, bool):
            raise ConfigError(f"noise level {item!r} is not a number")
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"noise level {item!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"noise level {item!r} is not finite")
        if value < 0:
            raise ConfigError(f"noise level {item!r} is negative; noise magnitudes must be >= 0")
        sigmas.append(value)
    return tuple(sigmas)


@dataclass(frozen=True)
class PerturbConfig:
    """Settings of a perturbation run.

    Attributes:
        sigmas: Noise magnitudes (multiples of the pixel std or of the visual-embedding RMS);
            sorted, deduplicated, and 0 is added when missing (the clean reference).
        kinds: Noise kinds, a subset of :data:`NOISE_KINDS`.
        tau: Activation Replay mask coefficient: visual tokens with base entropy ≤ τ·max per layer.
        mask_rule: ``"tau_max"`` (the released τ·max rule) or ``"quantile"`` (rank-based).
        quantile: q of the ``quantile`` rule: visual tokens with base entropy ≤ the layer's q-quantile.
        layers: Layers of the drift (default: the first half of the model's layers).
        seed: Seed of the noise and of the incorrect-answer sampling.
        incorrect: ``"sampled"`` (the model's own wrong samples, falling back to the offset) or
            ``"offset"`` (always ``formatter(answer + 1)``). Supplied responses always win.
        n_incorrect_draws: Samples drawn from the clean RLVR model to find a wrong response.
        max_new_tokens: Length limit of those samples.
        n_boot: Bootstrap resamples for the correlation CIs.
        token_chunk: Lens chunk size (bounds memory at ``token_chunk x vocab``).
    """

    sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    kinds: tuple[str, ...] = NOISE_KINDS
    tau: float = 0.4
    mask_rule: str = "tau_max"
    quantile: float = 0.3
    layers: tuple[int, ...] | None = None
    seed: int = 0
    incorrect: str = "sampled"
    n_incorrect_draws: int = 8
    max_new_tokens: int = 8
    n_boot: int = 2000
    token_chunk: int = 256

    def __post_init__(self) -> None:
        sigmas = sorted(set(parse_sigmas(list(self.sigmas)) + (0.0,)))
        object.__setattr__(self, "sigmas", tuple(sigmas))
        kinds = tuple(dict.fromkeys(self.kinds))
        bad = [k for k in kinds if k not in NOISE_KINDS]
        if bad or not kinds:
            raise ConfigError(f"noise kinds must be among {', '.join(NOISE_KINDS)}; got {list(self.kinds)}")
        object.__setattr__(self, "kinds", kinds)
        if self.mask_rule not in ("tau_max", "quantile"):
            raise ConfigError(f"mask rule must be 'tau_max' or 'quantile', got {self.mask_rule!r}")
        _ = self.mask  # validates tau and quantile
        if self.incorrect not in INCORRECT_SOURCES:
            raise ConfigError(f"incorrect must be one of {INCORRECT_SOURCES}, got {self.incorrect!r}")
        for name in ("n_incorrect_draws", "max_new_tokens", "n_boot", "token_chunk"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def mask(self) -> EntropyMask:
        """The low-entropy drift mask rule."""
        return EntropyMask(rule=self.mask_rule, tau=self.tau, quantile=self.quantile)

    def drift_layers(self, n_layers: int) -> tuple[int, ...]:
        """The configured layers, or the first half of ``n_layers``; validated."""
        layers = self.layers if self.layers is not None else tuple(range(max(n_layers // 2, 1)))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers:
            raise ConfigError(f"layers {bad or '()'} invalid for a model with {n_layers} layers")
        return tuple(sorted(set(int(i) for i in layers)))


# -- noise -----------------------------------------------------------------------------------------


def noise_generator(seed: int, sample_id: str, kind: str) -> torch.Generator:
    """A generator seeded by (seed, sample, kind): the same ε whatever the run order or subset."""
    digest = zlib.crc32(f"{seed}\x1f{sample_id}\x1f{kind}".encode())
    return torch.Generator().manual_seed(digest)


def pixel_noised(model_inputs: dict[str, torch.Tensor], sigma: float, eps: torch.Tensor) -> dict[str, Any]:
    """A copy of ``model_inputs`` with ``pixel_values + σ · std(pixel_values) · ε``."""
    if "pixel_values" not in model_inputs:
        raise InputError("pixel noise needs an image; the inputs have no pixel_values")
    if sigma == 0:
        return model_inputs
    pixels = model_inputs["pixel_values"]
    scale = sigma * pixels.float().std()
    noisy = (pixels.float() + scale * eps.to(pixels.device)).to(pixels.dtype)
    return {**model_inputs, "pixel_values": noisy}


@contextmanager
def embedding_noise(
    model: nn.Module,
    adapter: Any,
    visual_positions: torch.Tensor,
    sigma: float,
    eps: torch.Tensor,
) -> Iterator[dict[str, float]]:
    """Add ``σ · RMS · ε`` to the input of decoder layer 0 at ``visual_positions``, within the block.

    The hook is a plain forward pre-hook on layer 0 and is removed on exit, also on error. It acts
    on the prefill only: a decode step (one position) is left alone.

    Args:
        model: The model to perturb.
        adapter: Its family adapter.
        visual_positions: Positions of the visual tokens.
        sigma: Magnitude, in units of the clean visual embeddings' RMS.
        eps: Standard normal noise, ``[n_visual, hidden]``.

    Yields:
        A dict that receives ``rms`` (the clean visual RMS) once the forward has run.
    """
    info: dict[str, float] = {}
    layer0 = adapter.layers(model)[0]
    positions = visual_positions.long()

    def add_noise(hidden: torch.Tensor) -> torch.Tensor | None:
        if sigma == 0 or hidden.shape[1] <= int(positions.max()):
            return None  # clean run, or a decode step
        pos = positions.to(hidden.device)
        visual = hidden[0, pos].float()
        rms = visual.pow(2).mean().sqrt()
        info["rms"] = float(rms)
        noisy = hidden.clone()
        noisy[0, pos] = (visual + sigma * rms * eps.to(hidden.device)).to(hidden.dtype)
        return noisy

    handle = edit_input(layer0, add_noise)
    try:
        yield info
    finally:
        handle.remove()


@contextmanager
def perturbed(
    pair: Any, inputs: PairInputs, kind: str, sigma: float, eps: torch.Tensor
) -> Iterator[dict[str, torch.Tensor]]:
    """The RLVR model inputs under noise ``kind`` of magnitude ``sigma`` (hooks removed on exit)."""
    if kind == "pixel":
        yield pixel_noised(inputs.model_inputs, sigma, eps)
    elif kind == "embedding":
        with embedding_noise(pair.rlvr, pair.adapter, inputs.visual_positions, sigma, eps):
            yield inputs.model_inputs
    else:
        raise ConfigError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")


def draw_eps(pair: Any, inputs: PairInputs, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Standard normal ε of the right shape for ``kind`` (pixel tensor or visual embeddings)."""
    if kind == "pixel":
        if "pixel_values" not in inputs.model_inputs:
            raise InputError("pixel noise needs an image; the inputs have no pixel_values")
        shape = tuple(inputs.model_inputs["pixel_values"].shape)
    else:
        shape = (len(inputs.visual_positions), pair.adapter.hidden_size(pair.config))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


# -- measurements ----------------------------------------------------------------------------------


def response_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_start: int) -> torch.Tensor:
    """Per-token NLL (nats) of the response tokens, EOS included, from teacher-forced logits.

    Args:
        logits: ``[tokens, vocab]`` logits of one sequence.
        input_ids: ``[tokens]`` (or ``[1, tokens]``) ids of the same sequence.
        response_start: Index of the first response token.
    """
    ids = input_ids.reshape(-1)
    if not 0 < response_start < ids.numel():
        raise InputError(f"response_start {response_start} outside the sequence of {ids.numel()} tokens")
    # The logits at position t predict token t + 1.
    logp = torch.log_softmax(logits[response_start - 1 : -1].float(), dim=-1)
    targets = ids[response_start:].to(logp.device)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)``."""
    return float(torch.exp(nll.mean()))


@dataclass
class BaseReference:
    """What the clean base contributes to every comparison of one sample.

    Attributes:
        layers: Drift layers.
        hidden: Clean base residuals at the visual positions, ``[layers, n_visual, hidden]``.
        base_entropy: Clean base lens entropy at the visual positions, ``[layers, n_visual]``.
        mask: Activation Replay low-entropy mask, ``[layers, n_visual]``.
    """

    layers: tuple[int, ...]
    hidden: torch.Tensor
    base_entropy: torch.Tensor
    mask: torch.Tensor
    lens: LogitLens = field(repr=False)


def base_reference(
    pair: Any, inputs: PairInputs, layers: Sequence[int], mask: EntropyMask | float, chunk: int
) -> BaseReference:
    """Run the clean base once: residuals and entropies at the visual positions, and the mask.

    Args:
        pair: The model pair.
        inputs: One encoded sample with an image.
        layers: Drift layers.
        mask: The selection rule, or a τ for the released τ·max rule.
        chunk: Lens chunk size.
    """
    rule = mask if isinstance(mask, EntropyMask) else EntropyMask(tau=mask)
    visual = inputs.visual_positions
    if visual.numel() == 0:
        raise InputError("the sample has no visual tokens; the perturbation study needs an image")
    hidden, _ = capture_residuals(pair.base, pair.adapter, inputs.model_inputs, layers)
    stacked = torch.stack([h[visual] for h in hidden])
    lens = lens_of(pair.base, pair.adapter)
    entropy = torch.stack([lens_entropy(lens, layer_hidden, chunk) for layer_hidden in stacked]).cpu()
    candidates = torch.ones(stacked.shape[1], dtype=torch.bool)
    selected = rule.select(entropy, candidates)
    return BaseReference(tuple(layers), stacked, entropy, selected, lens)


def visual_kl(
    reference: BaseReference, rlvr_hidden: Sequence[torch.Tensor], rlvr_lens: LogitLens, chunk: int
) -> torch.Tensor:
    """KL(P_base ‖ P_rlvr) at every (drift layer, visual token), ``[layers, n_visual]``."""
    kl = torch.empty(reference.base_entropy.shape)
    with torch.no_grad():
        for li, hr in enumerate(rlvr_hidden):
            hb = reference.hidden[li]
            for start in range(0, hb.shape[0], chunk):
                stats = distribution_stats(
                    reference.lens.logits(hb[start : start + chunk]),
                    rlvr_lens.logits(hr[start : start + chunk]),
                )
                kl[li, start : start + chunk] = stats["kl_base_rlvr"].cpu()
    return kl


def measure(
    pair: Any,
    reference: BaseReference,
    answers: Mapping[str, PairInputs],
    kind: str,
    sigma: float,
    eps: torch.Tensor,
    chunk: int = 256,
) -> dict[str, Any]:
    """Drift and answer perplexities of one sample under one noise setting.

    Args:
        pair: The model pair.
        reference: The clean base of this sample.
        answers: Teacher-forcing inputs per answer kind (same prompt and image).
        kind: Noise kind.
        sigma: Noise magnitude.
        eps: The sample's standard normal noise for ``kind``.
        chunk: Lens chunk size.

    Returns:
        ``kl_low_entropy``, ``kl_visual_all``, and ``ppl_<answer>``, ``nll_<answer>``,
        ``n_tokens_<answer>`` per answer kind.
    """
    rlvr_lens = lens_of(pair.rlvr, pair.adapter)
    out: dict[str, Any] = {"noise_kind": kind, "sigma": float(sigma)}
    for i, (answer_kind, inputs) in enumerate(answers.items()):
        if inputs.response_start is None:
            raise InputError("teacher forcing needs a response")
        with perturbed(pair, inputs, kind, sigma, eps) as model_inputs:
            if i == 0:
                # The visual positions precede the response, so one answer's forward gives the drift.
                hidden, logits = capture_residuals(
                    pair.rlvr, pair.adapter, model_inputs, reference.layers, with_logits=True
                )
                visual = inputs.visual_positions
                kl = visual_kl(reference, [h[visual] for h in hidden], rlvr_lens, chunk)
                masked = kl[reference.mask]
                out["kl_low_entropy"] = float(masked.mean()) if masked.numel() else float("nan")
                out["kl_visual_all"] = float(kl.mean())
            else:
                with torch.no_grad():
                    logits = pair.rlvr(**model_inputs).logits[0]
        nll = response_nll(logits, inputs.input_ids, inputs.response_start)
        out[f"nll_{answer_kind}"] = float(nll.mean())
        out[f"ppl_{answer_kind}"] = perplexity(nll)
        out[f"n_tokens_{answer_kind}"] = int(nll.numel())
    return out


# -- answers ---------------------------------------------------------------------------------------


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


def check_samples(samples: Sequence[Any]) -> None:
    """Refuse datasets the PPL study cannot use.

    Raises:
        DatasetError: No samples, samples without an answer, or samples without an image.
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    no_answer = [str(s.id) for s in samples if getattr(s, "answer", None) in (None, "")]
    if no_answer:
        shown = ", ".join(no_answer[:5]) + (" ..." if len(no_answer) > 5 else "")
        raise DatasetError(
            f"the perplexity study needs an 'answer' for every sample; {len(no_answer)} of "
            f"{len(samples)} have none ({shown})"
        )
    no_image = [str(s.id) for s in samples if not sample_images(s)]
    if no_image:
        raise DatasetError(
            f"the perturbation study needs an image for every sample; {len(no_image)} have none "
            f"({', '.join(no_image[:5])})"
        )


def perturb_record(
    pair: Any,
    sample: Any,
    config: PerturbConfig,
    formatter: Callable[[str], str] = organism_response,
    extract: Callable[[str], str | None] = organism_extract,
    supplied_incorrect: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """All measurements of one sample (every noise kind and σ), as a record."""
    images = sample_images(sample)
    correct = formatter(str(sample.answer))
    prompt_inputs = pair.encode(sample.question, images)
    incorrect, source = choose_incorrect(
        pair, sample, prompt_inputs, config, formatter, extract, supplied_incorrect
    )
    answers = {
        "correct": pair.encode(sample.question, images, response=correct),
        "incorrect": pair.encode(sample.question, images, response=incorrect),
    }
    layers = config.drift_layers(pair.n_layers)
    reference = base_reference(pair, answers["correct"], layers, config.mask, config.token_chunk)
    rows = []
    clean: dict[str, Any] | None = None
    for kind in config.kinds:
        eps = draw_eps(pair, answers["correct"], kind, noise_generator(config.seed, str(sample.id), kind))
        for sigma in config.sigmas:
            if sigma == 0 and clean is not None:
                # σ = 0 is the same clean forward for every noise kind.
                rows.append({**clean, "noise_kind": kind})
                continue
            row = measure(pair, reference, answers, kind, sigma, eps, config.token_chunk)
            if sigma == 0:
                clean = row
            rows.append(row)
    return {
        "question": sample.question,
        "answer": str(sample.answer),
        "qtype": getattr(sample, "qtype", None),
        "correct_response": correct,
        "incorrect_response": incorrect,
        "incorrect_source": source,
        "layers": list(layers),
        "n_visual": int(reference.mask.shape[1]),
        "n_masked": int(reference.mask.sum()),
        "rows": rows,
    }


# -- tables and statistics -------------------------------------------------------------------------

TABLE_COLUMNS = (
    "sample_id",
    "qtype",
    "noise_kind",
    "sigma",
    "answer_kind",
    "kl_low_entropy",
    "kl_visual_all",
    "ppl",
    "nll",
    "n_response_tokens",
    "response",
    "incorrect_source",
    "n_masked",
)


def perturb_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The tidy table: one row per sample × noise kind × σ × answer kind."""
    rows = []
    for record in records:
        for row in record["rows"]:
            for answer_kind in ANSWER_KINDS:
                rows.append(
                    {
                        "sample_id": str(record["sample_id"]),
                        "qtype": record.get("qtype"),
                        "noise_kind": row["noise_kind"],
                        "sigma": row["sigma"],
                        "answer_kind": answer_kind,
                        "kl_low_entropy": row["kl_low_entropy"],
                        "kl_visual_all": row["kl_visual_all"],
                        "ppl": row[f"ppl_{answer_kind}"],
                        "nll": row[f"nll_{answer_kind}"],
                        "n_response_tokens": row[f"n_tokens_{answer_kind}"],
                        "response": record[f"{answer_kind}_response"],
                        "incorrect_source": record["incorrect_source"],
                        "n_masked": record["n_masked"],
                    }
                )
    if not rows:
        raise DatasetError("no perturbation records to tabulate")
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y)[0])


def within_sample_rhos(frame: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Spearman ρ(x, y) inside each sample (NaN where x or y is constant)."""
    return frame.groupby("sample_id", sort=True).apply(
        lambda g: _spearman(g[x].to_numpy(float), g[y].to_numpy(float)), include_groups=False
    )


def cluster_bootstrap(
    frame: pd.DataFrame, x: str, y: str, n_boot: int, seed: int, alpha: float = 0.05
) -> dict[str, float]:
    """Pooled and within-sample Spearman ρ with percentile CIs from resampling whole samples.

    Returns:
        ``pooled_rho``, ``pooled_p``, ``pooled_ci_low``, ``pooled_ci_high``, ``within_rho`` (mean of
        the finite per-sample ρ), ``within_ci_low``, ``within_ci_high``, ``n_samples``, ``n_points``,
        ``n_within`` (samples with a finite ρ).
    """
    ids = np.asarray(sorted(frame["sample_id"].unique()))
    groups = {sid: g for sid, g in frame.groupby("sample_id", sort=True)}
    xs = [groups[s][x].to_numpy(float) for s in ids]
    ys = [groups[s][y].to_numpy(float) for s in ids]
    pooled_x, pooled_y = np.concatenate(xs), np.concatenate(ys)
    pooled = _spearman(pooled_x, pooled_y)
    p_value = float(sps.spearmanr(pooled_x, pooled_y)[1]) if np.isfinite(pooled) else float("nan")
    within = np.array([_spearman(a, b) for a, b in zip(xs, ys, strict=True)])
    finite = np.isfinite(within)
    rng = np.random.default_rng(seed)
    boot_pooled, boot_within = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(ids), len(ids))
        boot_pooled[b] = _spearman(
            np.concatenate([xs[i] for i in pick]), np.concatenate([ys[i] for i in pick])
        )
        chosen = within[pick]
        chosen = chosen[np.isfinite(chosen)]
        boot_within[b] = chosen.mean() if chosen.size else np.nan
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def ci(values: np.ndarray) -> tuple[float, float]:
        values = values[np.isfinite(values)]
        if values.size < 2:
            return float("nan"), float("nan")
        lo, hi = np.percentile(values, q)
        return float(lo), float(hi)

    pooled_ci, within_ci = ci(boot_pooled), ci(boot_within)
    return {
        "pooled_rho": pooled,
        "pooled_p": p_value,
        "pooled_ci_low": pooled_ci[0],
        "pooled_ci_high": pooled_ci[1],
        "within_rho": float(within[finite].mean()) if finite.any() else float("nan"),
        "within_ci_low": within_ci[0],
        "within_ci_high": within_ci[1],
        "n_samples": int(len(ids)),
        "n_points": int(len(pooled_x)),
        "n_within": int(finite.sum()),
    }


def correlation_table(
    table: pd.DataFrame, n_boot: int = 2000, seed: int = 0, drift: str = "kl_low_entropy"
) -> pd.DataFrame:
    """Spearman ρ(drift, PPL) per noise kind and answer kind, pooled and within-sample, with CIs.

    Args:
        table: The tidy table of :func:`perturb_table`.
        n_boot: Bootstrap resamples (of whole samples).
        seed: Bootstrap seed.
        drift: The drift column.

    Returns:
        One row per (noise_kind, answer_kind, scope) with ``spearman_rho``, ``ci_low``,
        ``ci_high``, ``p_value`` (pooled only), ``n_samples``, ``n_points``.
    """
    rows = []
    for (kind, answer_kind), frame in table.groupby(["noise_kind", "answer_kind"], sort=True):
        stats = cluster_bootstrap(frame, drift, "ppl", n_boot, seed)
        base = {
            "noise_kind": kind,
            "answer_kind": answer_kind,
            "drift": drift,
            "n_samples": stats["n_samples"],
        }
        rows.append(
            {
                **base,
                "scope": "pooled",
                "spearman_rho": stats["pooled_rho"],
                "ci_low": stats["pooled_ci_low"],
                "ci_high": stats["pooled_ci_high"],
                "p_value": stats["pooled_p"],
                "n_points": stats["n_points"],
            }
        )
        rows.append(
            {
                **base,
                "scope": "within_sample",
                "spearman_rho": stats["within_rho"],
                "ci_low": stats["within_ci_low"],
                "ci_high": stats["within_ci_high"],
                "p_value": float("nan"),
                "n_points": stats["n_within"],
            }
        )
    return pd.DataFrame(rows)


def sigma_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (noise kind, σ, answer kind): mean drift, and mean / median / geometric-mean PPL."""
    grouped = table.groupby(["noise_kind", "sigma", "answer_kind"], sort=True)
    summary = grouped.agg(
        n=("sample_id", "nunique"),
        kl_low_entropy=("kl_low_entropy", "mean"),
        kl_visual_all=("kl_visual_all", "mean"),
        ppl_mean=("ppl", "mean"),
        ppl_median=("ppl", "median"),
        nll_mean=("nll", "mean"),
    ).reset_index()
    summary["ppl_geomean"] = np.exp(summary["nll_mean"])
    return summary


@dataclass(frozen=True)
class PerturbResult:
    """Outputs of a perturbation run."""

    table: pd.DataFrame
    correlations: pd.DataFrame
    summary: pd.DataFrame
    out_dir: Path | None = None


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


def run_perturbation(
    pair: Any,
    samples: Sequence[Any],
    out_dir: str | Path | None = None,
    config: PerturbConfig = PerturbConfig(),
    formatter: Callable[[str], str] = organism_response,
    extract: Callable[[str], str | None] = organism_extract,
    incorrect: Mapping[str, str] | None = None,
    resume: bool = True,
    progress: bool = False,
    title: str | None = None,
    shard: Any = None,
) -> PerturbResult | None:
    """Run the perturbation study over a dataset.

    Args:
        pair: A :class:`lens.ModelPair` with a multimodal adapter.
        samples: Items with ``id``, ``question``, one or more images and ``answer`` (``qtype`` optional).
        out_dir: Where to write ``records.jsonl``, ``perturb_table.csv``,
            ``perturb_spearman.csv``, ``perturb_summary.csv`` and ``perturbation.{pdf,png}``;
            ``None`` keeps everything in memory.
        config: Noise levels and kinds, mask, seed, incorrect-answer policy, bootstrap size.
        formatter: Renders an answer as a response (``"answer N"`` for the organism).
        extract: The answer a sampled response gives (``None`` for a malformed one); a draw is
            wrong when its answer differs from the dataset's.
        incorrect: Supplied incorrect responses by sample id (they take precedence).
        resume: Keep records already in ``out_dir`` and skip their samples.
        progress: Show a progress bar.
        title: Figure title.
        shard: This process's :class:`lens.distributed.Shard` of a data-parallel run: compute only
            its samples, into its shard folder, and return ``None`` (the merge draws the tables).

    Returns:
        The tidy table, the correlation table and the per-σ summary (``None`` for a shard).

    Raises:
        DatasetError: No samples, or samples without an answer or an image.
    """
    check_samples(samples)
    from tqdm.auto import tqdm

    def records_for(todo: Sequence[Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
        for sample in tqdm(todo, desc="perturb", unit="sample", disable=not progress):
            yield sample, perturb_record(pair, sample, config, formatter, extract, incorrect)

    if out_dir is None:
        records = [{"sample_id": str(s.id), **rec} for s, rec in records_for(samples)]
    else:
        out = Path(out_dir)
        settings = {"pair": list(getattr(pair, "names", ())), **asdict(config)}
        settings.pop("n_boot")  # statistics are computed after the records
        writer = RecordWriter(
            out / "records.jsonl", resume, settings, pair_fingerprint(pair), sample_digests(samples), shard
        )
        with writer:
            for sample, record in records_for([s for s in samples if writer.todo(str(s.id))]):
                writer.write(str(sample.id), record)
        if writer.partial:
            return None
        records = writer.read(str(s.id) for s in samples)
    table = perturb_table(records)
    correlations = correlation_table(table, config.n_boot, config.seed)
    summary = sigma_summary(table)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(
            out, {"perturb_table": table, "perturb_spearman": correlations, "perturb_summary": summary}
        )
        import matplotlib.pyplot as plt

        from lens.plot.perturbation import plot_perturbation
        from lens.plot.style import save_figure

        fig = plot_perturbation(table, correlations, title=title)
        save_figure(fig, out / "perturbation")
        plt.close(fig)
    return PerturbResult(table, correlations, summary, None if out_dir is None else Path(out_dir))
