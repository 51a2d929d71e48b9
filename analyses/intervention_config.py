"""Settings of an intervention run: the strategies, and the intervention each one builds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lens.decoding import DEFAULT_MAX_NEW_TOKENS, DecodingConfig, decoding_for
from lens.errors import ConfigError
from lens.interventions import ActivationReplay, Baseline, HardInjection, Intervention
from lens.masks import EntropyMask

#: Mask rules an intervention run accepts (``fixed`` needs per-layer thresholds; use the API).
MASK_CHOICES = ("tau_max", "quantile")
STRATEGIES = ("rlvr", "base", "hard-low", "hard-high", "replay", "replay-high", "pti", "vreason")
#: What runs when no strategy is named (``pti`` needs a directions file, ``vreason`` video items).
DEFAULT_STRATEGIES = ("rlvr", "base", "hard-low", "hard-high", "replay", "replay-high")
#: A verifier: a name from :data:`lens.scoring.VERIFIERS`, a :class:`lens.scoring.Verifier`, or a
#: callable ``fn(response, answer) -> bool``.
Verifier = str | Callable[..., Any]


#: Run settings that only V-Reason reads (they are part of its records' keys instead).
VREASON_KEYS = ("vreason_lr", "vreason_every", "vreason_lite")


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The released depth fraction: layers 0..15 of 28, i.e. the first 16/28 of the model."""
    return tuple(range(max(1, round(n_layers * 16 / 28))))


@dataclass(frozen=True)
class InterventionRunConfig:
    """Settings of an intervention run.

    Attributes:
        strategies: Which of :data:`STRATEGIES` to run.
        layers: Layers for injection and replay (``None``: :func:`default_layers`).
        tau: τ of the ``tau_max`` mask (injection and replay).
        mask_rule: ``"tau_max"`` (released) or ``"quantile"`` (rank-based), injection and replay.
        quantile: q of the ``quantile`` mask.
        alpha: Replay step size.
        steps: Replay steps.
        topk: Replay top-k.
        variant: Replay variant (``"released"`` or ``"paper"``).
        n: Samples per item for pass@k (0: greedy only).
        ks: pass@k budgets (each ≤ ``n``).
        max_new_tokens: Decode budget (``None``: the pair's, 4 on the organism, else 2048).
        seed: Base sampling seed (item ``i`` uses ``seed + i``).
        n_boot: Bootstrap resamples for the CIs.
        temperature: Sampling temperature (``None``: the checkpoint's, else 1.0).
        top_p: Sampling top-p (``None``: the checkpoint's, else off).
        top_k: Sampling top-k (``None``: the checkpoint's, else off).
        stop_strings: Strings that end a decode (``None``: the checkpoint's, else none).
        batch_size: Items per greedy ``generate`` call (results do not depend on it).
        prompt: Prompt preset name (:data:`lens.prompts.PRESETS`; ``None``: the pair's own, else
            ``plain``).
        system: System prompt replacing the preset's (``""``: none; ``None``: the preset's).
        verifier: Answer checker name (:data:`lens.scoring.VERIFIERS`; ``"auto"`` picks per item).
        pti_directions: The PTI directions file (``.safetensors``, from ``lens pti directions``);
            required by the ``pti`` strategy.
        vreason_lr: V-Reason's learning rate (:class:`~lens.interventions.vreason.VReasonConfig`).
        vreason_every: V-Reason's update interval k, in generated tokens.
        vreason_lite: V-Reason (Lite): prune the lowest-value-norm half of the video tokens.
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    layers: tuple[int, ...] | None = None
    tau: float = 0.4
    mask_rule: str = "tau_max"
    quantile: float = 0.3
    alpha: float = 10.0
    steps: int = 25
    topk: int = 50
    variant: str = "released"
    n: int = 8
    ks: tuple[int, ...] = (1, 2, 4, 8)
    max_new_tokens: int | None = None
    seed: int = 0
    n_boot: int = 2000
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_strings: tuple[str, ...] | None = None
    batch_size: int = 1
    prompt: str | None = None
    system: str | None = None
    verifier: str = "auto"
    pti_directions: str | None = None
    vreason_lr: float = 0.01
    vreason_every: int = 2
    vreason_lite: bool = False

    def __post_init__(self) -> None:
        from lens.prompts import get_preset
        from lens.scoring import resolve_verifier

        if self.prompt is not None:
            get_preset(self.prompt)  # an unknown name fails here, before any model loads
        resolve_verifier(self.verifier)
        if self.stop_strings is not None:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ConfigError(f"unknown strategies {bad}; known: {', '.join(STRATEGIES)}")
        if self.n < 0:
            raise ConfigError(f"n must be >= 0, got {self.n}")
        wrong = [k for k in self.ks if not 1 <= k <= max(self.n, 0)]
        if self.n and wrong:
            raise ConfigError(f"k values {wrong} are outside [1, n={self.n}]")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ConfigError(f"batch size must be an integer >= 1, got {self.batch_size}")
        # The decoding values alone, checked before any model loads (the pair fills the rest).
        DecodingConfig(
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            stop_strings=self.stop_strings or (),
        )
        if self.mask_rule not in MASK_CHOICES:
            raise ConfigError(f"mask rule must be one of {', '.join(MASK_CHOICES)}; got {self.mask_rule!r}")
        _ = self.mask  # validates tau and quantile
        if "pti" in self.strategies and self.pti_directions is None:
            raise ConfigError(
                "the pti strategy needs its directions file (--pti-directions FILE); "
                "make one with `lens pti directions`"
            )
        if "vreason" in self.strategies:
            _ = self.vreason  # validates the V-Reason settings before any model loads

    @property
    def vreason(self) -> Any:
        """The V-Reason settings of this run."""
        from lens.interventions.vreason import VReasonConfig

        return VReasonConfig(lr=self.vreason_lr, every=self.vreason_every, lite=self.vreason_lite)

    @property
    def mask(self) -> EntropyMask:
        """The injection/replay selection rule."""
        return EntropyMask(rule=self.mask_rule, tau=self.tau, quantile=self.quantile)

    def decoding(self, pair: Any) -> DecodingConfig:
        """The effective decoding settings on ``pair`` (this config's values where set)."""
        return decoding_for(
            pair,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_strings=self.stop_strings,
        )


def make_intervention(strategy: str, config: InterventionRunConfig, n_layers: int) -> Intervention:
    """Build the intervention of one strategy (validates every hyper-parameter up front)."""
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    if strategy == "rlvr":
        return Baseline("rlvr")
    if strategy == "base":
        return Baseline("base")
    select = "high" if strategy.endswith("-high") else "low"
    if strategy == "pti":
        from lens.interventions.pti import PTI
        from lens.interventions.pti_directions import PTIDirections

        if config.pti_directions is None:
            raise ConfigError("the pti strategy needs its directions file (--pti-directions FILE)")
        return PTI(PTIDirections.load(config.pti_directions))
    if strategy == "vreason":
        from lens.interventions.vreason import VReason

        return VReason(config.vreason)
    if strategy.startswith("hard"):
        return HardInjection(
            layers=layers, select=select, rule=config.mask_rule, tau=config.tau, quantile=config.quantile
        )
    return ActivationReplay(
        tau=config.tau,
        alpha=config.alpha,
        steps=config.steps,
        layers=layers,
        topk=config.topk,
        variant=config.variant,
        select=select,
        rule=config.mask_rule,
        quantile=config.quantile,
    )


def with_strategies(config: InterventionRunConfig, strategies: Sequence[str]) -> InterventionRunConfig:
    return replace(config, strategies=tuple(strategies))
