"""Settings of the perturbation study: noise levels and kinds, drift mask, incorrect-answer policy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lens.errors import ConfigError
from lens.masks import EntropyMask

NOISE_KINDS = ("pixel", "embedding")
ANSWER_KINDS = ("correct", "incorrect")
INCORRECT_SOURCES = ("sampled", "offset")
SCOPES = ("pooled", "within_sample")


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
