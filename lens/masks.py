"""Position selection by base logit-lens entropy, shared by injection, replay and perturbation.

All rules take a ``[layers, tokens]`` base-entropy tensor and a boolean ``[tokens]`` candidate mask
(visual tokens, or all tokens) and return a boolean ``[layers, tokens]`` selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lens.errors import ConfigError

#: Per-layer thresholds (nats) of the released agent/video intervention code, layers 0..6.
RELEASED_THRESHOLDS = (4.812, 4.781, 3.734, 3.297, 3.328, 3.812, 4.312)


#: The rules :class:`EntropyMask` dispatches to.
MASK_RULES = ("tau_max", "fixed", "quantile")


def check_tau(tau: float) -> float:
    """Return ``tau`` as a float.

    Raises:
        ConfigError: ``tau`` outside (0, 1].
    """
    if not 0.0 < float(tau) <= 1.0:
        raise ConfigError(f"tau must be in (0, 1], got {tau}")
    return float(tau)


def tau_max_mask(
    base_entropy: torch.Tensor, candidates: torch.Tensor, tau: float, select: str = "low"
) -> torch.Tensor:
    """Activation Replay's rule: per layer, candidates with entropy ≤ τ × the layer's max over candidates.

    ``select="high"`` inverts the selection within the candidates (entropy > τ × max).
    """
    tau = check_tau(tau)
    if not candidates.any():
        return torch.zeros_like(base_entropy, dtype=torch.bool)
    masked = base_entropy.masked_fill(~candidates, float("-inf"))
    threshold = tau * masked.max(dim=-1, keepdim=True).values
    low = base_entropy <= threshold
    chosen = low if select == "low" else ~low
    _check_select(select)
    return chosen & candidates


def fixed_threshold_mask(
    base_entropy: torch.Tensor,
    candidates: torch.Tensor,
    thresholds: Sequence[float],
    select: str = "low",
    rlvr_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The released agent/video rule: per-layer fixed thresholds, optionally also base < RLVR entropy.

    Args:
        base_entropy: ``[layers, tokens]``.
        candidates: ``[tokens]`` boolean.
        thresholds: One threshold per layer row of ``base_entropy``.
        select: ``"low"`` (entropy < threshold) or ``"high"`` (entropy ≥ threshold).
        rlvr_entropy: When given, "low" also requires base < RLVR entropy (the released rule);
            "high" is always the complement of "low" within the candidates.
    """
    _check_select(select)
    if len(thresholds) != base_entropy.shape[0]:
        raise ConfigError(f"{len(thresholds)} thresholds for {base_entropy.shape[0]} layers")
    thr = torch.as_tensor(list(thresholds), dtype=base_entropy.dtype).unsqueeze(-1)
    low = base_entropy < thr
    if rlvr_entropy is not None:
        low = low & (base_entropy < rlvr_entropy)
    chosen = low if select == "low" else ~low
    return chosen & candidates


def quantile_mask(
    base_entropy: torch.Tensor, candidates: torch.Tensor, quantile: float, select: str = "low"
) -> torch.Tensor:
    """Per layer, the candidates at or below the ``quantile`` of the candidates' entropy ("low"),
    or above it ("high")."""
    _check_select(select)
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"quantile must be in (0, 1), got {quantile}")
    if not candidates.any():
        return torch.zeros_like(base_entropy, dtype=torch.bool)
    values = base_entropy[:, candidates]
    cut = torch.quantile(values.double(), quantile, dim=-1, keepdim=True).to(base_entropy.dtype)
    low = base_entropy <= cut
    chosen = low if select == "low" else ~low
    return chosen & candidates


def check_quantile(quantile: float) -> float:
    """Return ``quantile`` as a float.

    Raises:
        ConfigError: ``quantile`` outside (0, 1).
    """
    if not 0.0 < float(quantile) < 1.0:
        raise ConfigError(f"quantile must be in (0, 1), got {quantile}")
    return float(quantile)


@dataclass(frozen=True)
class EntropyMask:
    """One position-selection rule with its parameters, shared by injection, replay and perturbation.

    Attributes:
        rule: ``"tau_max"`` (Activation Replay's released rule: entropy ≤ τ × the layer's max over
            the candidates), ``"quantile"`` (entropy ≤ the layer's q-quantile over the candidates;
            rank-based, so it selects about a fraction q whatever the entropy spread) or
            ``"fixed"`` (per-layer thresholds in nats, the released agent/video rule).
        tau: τ of the ``tau_max`` rule, in (0, 1].
        quantile: q of the ``quantile`` rule, in (0, 1).
        thresholds: Per-layer thresholds of the ``fixed`` rule (one per row of the entropy).
        require_base_below_rlvr: "Low" also requires base < RLVR entropy ("high" stays the
            complement of "low" within the candidates); ``None``: as released, i.e. on for
            ``fixed`` only.

    Example:
        >>> mask = EntropyMask("quantile", quantile=0.3)
        >>> chosen = mask.select(base_entropy, visual_candidates)  # [layers, tokens] bool
    """

    rule: str = "tau_max"
    tau: float = 0.4
    quantile: float = 0.3
    thresholds: tuple[float, ...] | None = None
    require_base_below_rlvr: bool | None = None

    def __post_init__(self) -> None:
        if self.rule not in MASK_RULES:
            raise ConfigError(f"mask rule must be one of {', '.join(MASK_RULES)}; got {self.rule!r}")
        object.__setattr__(self, "tau", check_tau(self.tau))
        object.__setattr__(self, "quantile", check_quantile(self.quantile))
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if self.rule == "fixed" and not self.thresholds:
            raise ConfigError("the 'fixed' mask rule needs per-layer thresholds")

    @property
    def base_below_rlvr(self) -> bool:
        """Whether "low" also requires base < RLVR entropy."""
        if self.require_base_below_rlvr is None:
            return self.rule == "fixed"
        return bool(self.require_base_below_rlvr)

    def select(
        self,
        base_entropy: torch.Tensor,
        candidates: torch.Tensor,
        select: str = "low",
        rlvr_entropy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Select positions per layer.

        Args:
            base_entropy: ``[layers, tokens]`` base logit-lens entropy.
            candidates: ``[tokens]`` boolean; nothing outside it is ever selected.
            select: ``"low"`` (the rule's low-entropy set) or ``"high"`` (its complement within
                the candidates).
            rlvr_entropy: ``[layers, tokens]`` RLVR entropy; required when :attr:`base_below_rlvr`.

        Returns:
            A boolean ``[layers, tokens]`` mask.

        Raises:
            ConfigError: A bad ``select``, a missing ``rlvr_entropy`` or a thresholds/layers mismatch.
        """
        _check_select(select)
        if self.base_below_rlvr and rlvr_entropy is None:
            raise ConfigError("this mask requires base < RLVR entropy; pass rlvr_entropy")
        if self.rule == "fixed":
            assert self.thresholds is not None
            extra = rlvr_entropy if self.base_below_rlvr else None
            return fixed_threshold_mask(base_entropy, candidates, self.thresholds, select, extra)
        if self.rule == "tau_max":
            low = tau_max_mask(base_entropy, candidates, self.tau, "low")
        else:
            low = quantile_mask(base_entropy, candidates, self.quantile, "low")
        if self.base_below_rlvr:
            low = low & (base_entropy < rlvr_entropy)
        return low if select == "low" else ~low & candidates

    def describe(self) -> str:
        """A short human-readable label for titles and tables, e.g. ``"τ·max, τ=0.4"``."""
        if self.rule == "tau_max":
            text = f"τ·max, τ={self.tau:g}"
        elif self.rule == "quantile":
            text = f"quantile q={self.quantile:g}"
        else:
            text = "fixed thresholds"
        if self.base_below_rlvr and self.rule != "fixed":
            text += ", base<RLVR"
        return text

    def empty_hint(self) -> str:
        """What an "empty mask" warning should add: the τ·max rule's fix is the rank-based rule."""
        if self.rule != "tau_max":
            return ""
        return (
            f" (the {self.describe()} rule selects nothing when the base entropies are near-uniform, "
            "as on small models: use the rank-based rule, --mask quantile / rule='quantile')"
        )

    def tag(self) -> str:
        """The compact parameter tag used in setting strings: ``tau=0.4`` / ``q=0.3`` / ``fixed``."""
        return {"tau_max": f"tau={self.tau:g}", "quantile": f"q={self.quantile:g}", "fixed": "fixed"}[
            self.rule
        ]


def _check_select(select: str) -> None:
    if select not in ("low", "high"):
        raise ConfigError(f"select must be 'low' or 'high', got {select!r}")
