"""Decoding settings of a pair: budget, sampling parameters, stop strings and end tokens.

:func:`decoding_for` resolves them from the pair's checkpoints, each value in this order:

* ``max_new_tokens``: given, else the checkpoint's ``generation_config.max_new_tokens`` (the built-in
  organism's says 4), else :data:`DEFAULT_MAX_NEW_TOKENS` (2048, what the released replay code uses).
* ``temperature``, ``top_p``, ``top_k`` (sampling only): given, else the checkpoint's
  ``generation_config``, else pure sampling (1.0, 1.0, off).
* stop strings: given, else the checkpoint's.
* end tokens: every eos id of both checkpoints' ``generation_config`` and the tokenizer's eos token
  (Qwen checkpoints list two, ``<|im_end|>`` and ``<|endoftext|>``); a row stops at any of them.

Greedy is exactly greedy: the argmax of the logits with only the vision special ids masked out (so a
text decode never emits an image placeholder). Nothing else the checkpoint's ``generation_config``
sets reaches ``generate``: Qwen checkpoints set ``repetition_penalty: 1.05``, which ``generate``
applies unless told otherwise. :meth:`DecodingConfig.generation_config` therefore builds a complete
config (repetition penalty 1.0, as the released replay code sets), and :func:`own_generation_config`
hands ``generate`` that config as the model's own for the call, because transformers fills every
field left unset from the model's ``generation_config``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from lens.errors import ConfigError

#: Decode budget when neither the caller nor the checkpoint sets one.
DEFAULT_MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class DecodingConfig:
    """The effective decoding settings (build them with :func:`decoding_for`).

    Attributes:
        max_new_tokens: Decode budget per sequence.
        eos_token_ids: Every token id that ends a sequence.
        pad_token_id: Id written after a row has ended and used for left padding.
        temperature: Sampling temperature (greedy ignores it).
        top_p: Nucleus sampling mass, 1.0 = off (greedy ignores it).
        top_k: Top-k sampling, 0 = off (greedy ignores it).
        stop_strings: Strings that end a sequence (the string is kept in the output).
        suppress_tokens: Ids never emitted (the vision special ids of a multimodal pair).
        min_new_tokens: End tokens are masked until this many tokens exist (benchmarks use it to
            force a fixed length on random weights; 0 = off).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        object.__setattr__(self, "suppress_tokens", tuple(int(i) for i in self.suppress_tokens))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        bad = [s for s in self.stop_strings if not isinstance(s, str) or not s]
        if bad:
            raise ConfigError(f"stop strings must be non-empty strings, got {bad}")
        suppressed = set(self.suppress_tokens) & set(self.eos_token_ids)
        if suppressed:
            raise ConfigError(f"end tokens {sorted(suppressed)} are also suppressed; no sequence could end")

    def replace(self, **changes: Any) -> DecodingConfig:
        """A copy with some settings changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def near_greedy_sampling(self) -> bool:
        """Whether sampling with these settings is (almost) deterministic, e.g. Qwen's ``top_k: 1``."""
        return self.top_k == 1 or self.top_p <= 0.01 or self.temperature <= 0.05

    def to_dict(self) -> dict[str, Any]:
        """The effective settings as plain JSON values, for storing beside results.

        ``greedy`` describes the greedy decode; the sampling fields apply to sampled decodes only.
        """
        out = asdict(self)
        for key in ("eos_token_ids", "suppress_tokens", "stop_strings"):
            out[key] = list(out[key])
        out.update(greedy="argmax", repetition_penalty=1.0)
        return out

    def generation_config(self, do_sample: bool = False, n: int = 1) -> Any:
        """A complete ``transformers.GenerationConfig``: these settings and nothing else.

        Args:
            do_sample: Sample with ``temperature``/``top_p``/``top_k``; otherwise greedy.
            n: Sequences per prompt (``num_return_sequences``).
        """
        from transformers import GenerationConfig

        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if n > 1 and not do_sample:
            raise ConfigError("n > 1 identical greedy sequences make no sense; pass do_sample=True")
        sampling: dict[str, Any] = (
            dict(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
            if do_sample
            else {}
        )
        return GenerationConfig(
            max_new_tokens=int(self.max_new_tokens),
            min_new_tokens=int(self.min_new_tokens) or None,
            do_sample=bool(do_sample),
            num_beams=1,
            num_return_sequences=int(n),
            # Neutral values of every processor a checkpoint's generation_config can switch on.
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            encoder_no_repeat_ngram_size=0,
            min_length=None,  # 0 by transformers' default; setting it beside min_new_tokens only warns
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            guidance_scale=1.0,
            renormalize_logits=False,
            remove_invalid_values=False,
            eos_token_id=list(self.eos_token_ids) or None,
            pad_token_id=int(self.pad_token_id),
            suppress_tokens=list(self.suppress_tokens) or None,
            stop_strings=list(self.stop_strings) or None,
            **sampling,
        )

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Extra ``generate`` arguments these settings need (stop strings need the tokenizer)."""
        return {"tokenizer": tokenizer} if self.stop_strings else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _checkpoint_config(model: nn.Module | None) -> Any:
    return getattr(model, "generation_config", None)


def _setting(config: Any, name: str) -> Any:
    return None if config is None else getattr(config, name, None)


def decoding_for(
    pair: Any,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    min_new_tokens: int = 0,
    suppress_vision_tokens: bool = True,
) -> DecodingConfig:
    """The pair's decoding settings, overridden where given (see the module docstring).

    Args:
        pair: The model pair (its RLVR checkpoint's ``generation_config`` is read, and both
            checkpoints' eos ids).
        max_new_tokens: Decode budget (default: the checkpoint's, else 2048).
        temperature: Sampling temperature (default: the checkpoint's, else 1.0).
        top_p: Sampling top-p (default: the checkpoint's, else 1.0 = off).
        top_k: Sampling top-k (default: the checkpoint's, else 0 = off).
        stop_strings: Strings that end a sequence (default: the checkpoint's, else none).
        min_new_tokens: Mask the end tokens until this many tokens exist (0 = off).
        suppress_vision_tokens: Never emit the pair's vision special ids (default on).

    Raises:
        ConfigError: A value out of range, or a tokenizer with neither a pad nor an eos token.
    """
    rlvr = _checkpoint_config(getattr(pair, "rlvr", None))
    base = _checkpoint_config(getattr(pair, "base", None))
    tokenizer = pair.tokenizer
    eos: list[int] = []
    for value in (
        _setting(rlvr, "eos_token_id"),
        _setting(base, "eos_token_id"),
        getattr(tokenizer, "eos_token_id", None),
    ):
        eos += [i for i in _ids(value) if i not in eos]
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = _setting(rlvr, "pad_token_id")
    if pad is None:
        if not eos:
            raise ConfigError(
                "the tokenizer has neither a pad token nor an eos token; cannot decode in batches"
            )
        pad = eos[0]
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    if stop_strings is None:
        stop_strings = _setting(rlvr, "stop_strings") or ()
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)

    def pick(given: Any, name: str, default: Any) -> Any:
        if given is not None:
            return given
        value = _setting(rlvr, name)
        return default if value is None else value

    suppress = tuple(pair.adapter.vision_special_ids(pair.config)) if suppress_vision_tokens else ()
    return DecodingConfig(
        max_new_tokens=int(pick(max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        eos_token_ids=tuple(eos),
        pad_token_id=int(pad),
        temperature=float(pick(temperature, "temperature", 1.0)),
        top_p=float(pick(top_p, "top_p", 1.0)),
        top_k=int(pick(top_k, "top_k", 0)),
        stop_strings=tuple(stop_strings),
        suppress_tokens=suppress,
        min_new_tokens=int(min_new_tokens),
    )


@contextmanager
def own_generation_config(model: nn.Module, config: Any) -> Iterator[Any]:
    """Make ``config`` the model's ``generation_config`` for the block; restore the checkpoint's after.

    transformers fills every field a passed config leaves unset from ``model.generation_config``, so
    without this a checkpoint's ``repetition_penalty`` (or any other processor it sets) would reach
    the decode.
    """
    saved = model.generation_config
    model.generation_config = copy.deepcopy(config)
    try:
        yield config
    finally:
        model.generation_config = saved


def sequence_ends(
    sequences: torch.Tensor, n_prompt: int, decoding: DecodingConfig, tokenizer: Any = None
) -> list[int]:
    """How many generated tokens of each row ``generate`` really produced (the end token included).

    In a batch, a row that ended early is filled with ``pad_token_id`` until every row has ended; a
    row decoded alone has no such tail. Cutting each row here makes the two identical.

    Args:
        sequences: ``generate``'s output, ``[rows, n_prompt + new]`` (prompt included).
        n_prompt: The (padded) prompt length.
        decoding: The settings the rows were decoded with.
        tokenizer: Needed when there are stop strings.
    """
    new = sequences[:, n_prompt:]
    n_rows, n_new = new.shape
    ends = [n_new] * n_rows
    if decoding.eos_token_ids:
        eos = torch.tensor(decoding.eos_token_ids, device=new.device)
        hit = torch.isin(new, eos)
        for row in hit.any(dim=1).nonzero().flatten().tolist():
            ends[row] = int(hit[row].nonzero()[0]) + 1
    if decoding.stop_strings and n_new:
        from transformers import StopStringCriteria

        # The same criterion generate used, replayed step by step on the same sequences.
        criterion = StopStringCriteria(tokenizer, list(decoding.stop_strings))
        for step in range(n_new):
            rows = [r for r in range(n_rows) if ends[r] > step]
            if not rows:
                break
            done = criterion(sequences[rows, : n_prompt + step + 1], None)
            for row, stop in zip(rows, done.tolist(), strict=True):
                if stop:
                    ends[row] = step + 1
    return ends
