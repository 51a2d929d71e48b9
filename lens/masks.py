"""Position selection by base logit-lens entropy, shared by injection, replay and perturbation.

All rules take a ``[layers, tokens]`` base-entropy tensor and a boolean ``[tokens]`` candidate mask
(visual tokens, or all tokens) and return a boolean ``[layers, tokens]`` selection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lens.errors import ConfigError

#: Per-layer thresholds (nats) of the released agent/video intervention code, layers 0..6.
RELEASED_THRESHOLDS = (4.812, 4.781, 3.734, 3.297, 3.328, 3.812, 4.312)


def check_tau(tau: float) -> float:
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


def _check_select(select: str) -> None:
    if select not in ("low", "high"):
        raise ConfigError(f"select must be 'low' or 'high', got {select!r}")
