"""Activation Replay's settings (:class:`ReplayConfig`) and one sample's outcome (:class:`ReplayResult`).

:mod:`lens.interventions.replay` describes the algorithm these settings drive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens.errors import ConfigError
from lens.masks import EntropyMask


@dataclass(frozen=True)
class ReplayConfig:
    """Activation Replay hyper-parameters (defaults: the released MM-Eureka-7B config).

    Attributes:
        tau: Mask threshold as a fraction of the per-layer max base entropy over visual tokens
            (``rule="tau_max"``).
        alpha: Step size of the plain gradient update.
        steps: Number of gradient steps.
        layers: Decoder layers whose lens enters the loss (released: 0..15).
        topk: Base top-k ids the KL is restricted to.
        variant: ``"released"`` (RLVR input of block L vs base output of block L) or ``"paper"``
            (both sides at the output of block L).
        select: ``"low"`` (the method) or ``"high"`` (inverted mask within visual tokens).
        normalize: Divide the summed layer losses by the number of visual tokens (released: yes).
        token_chunk: Positions per full-vocabulary projection on the base side.
        rule: Mask rule, ``"tau_max"`` (released) or ``"quantile"`` (see
            :mod:`lens.interventions.replay`).
        quantile: q of the ``quantile`` rule, in (0, 1).
        residual: Precision of the residual stream at the visual positions through the replay
            layers in a bf16/fp16 model: ``"float32"`` (the float32 carry, see
            :mod:`lens.interventions.replay`) or ``"model"`` (Δ cast to the model dtype at the input
            of block 0; updates below half an ulp vanish). Float32 models give the same numbers
            either way.
    """

    tau: float = 0.4
    alpha: float = 10.0
    steps: int = 25
    layers: tuple[int, ...] = tuple(range(16))
    topk: int = 50
    variant: str = "released"
    select: str = "low"
    normalize: bool = True
    token_chunk: int = 256
    rule: str = "tau_max"
    quantile: float = 0.3
    residual: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if self.rule not in ("tau_max", "quantile"):
            raise ConfigError(f"replay mask rule must be 'tau_max' or 'quantile', got {self.rule!r}")
        _ = self.mask  # validates tau and quantile
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps}")
        if not self.layers:
            raise ConfigError("no replay layers given")
        if self.topk < 1:
            raise ConfigError(f"topk must be >= 1, got {self.topk}")
        if self.variant not in ("released", "paper"):
            raise ConfigError(f"variant must be 'released' or 'paper', got {self.variant!r}")
        if self.select not in ("low", "high"):
            raise ConfigError(f"select must be 'low' or 'high', got {self.select!r}")
        if self.token_chunk < 1:
            raise ConfigError(f"token_chunk must be >= 1, got {self.token_chunk}")
        if self.residual not in ("float32", "model"):
            raise ConfigError(f"residual must be 'float32' or 'model', got {self.residual!r}")

    @property
    def mask(self) -> EntropyMask:
        """The visual-token selection rule."""
        return EntropyMask(rule=self.rule, tau=self.tau, quantile=self.quantile)


@dataclass(frozen=True)
class ReplayResult:
    """What one sample's optimisation produced.

    Attributes:
        offsets: ``[n_visual, hidden]`` float32 learned Δ (raster order of the visual tokens).
        losses: The loss at Δ_t before update t, for t = 0..steps-1 (``losses[0]`` = unmodified RLVR).
        final_loss: The loss at the final Δ (the released code never computes it).
        n_selected: Selected visual tokens per layer.
        n_visual: Number of visual tokens.
        skipped_steps: Steps skipped because the loss was exactly zero.
        loss_changed: Whether any loss after the first (``final_loss`` included) differs from
            ``losses[0]``; False means the updates never reached the forward (a warning says so).
    """

    offsets: torch.Tensor
    losses: tuple[float, ...]
    final_loss: float
    n_selected: dict[int, int]
    n_visual: int
    skipped_steps: int
    loss_changed: bool
