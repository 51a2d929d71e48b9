"""Generic evaluation metrics: the unbiased pass@k estimator and bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lens.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct out of ``n`` samples (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as a stable product.

    Args:
        n: Samples drawn per item.
        c: Correct samples among them.
        k: Budget, ``1 <= k <= n``.

    Raises:
        ConfigError: If ``k`` is outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in [1, n={n}], got {k}")
    if not 0 <= c <= n:
        raise ConfigError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_array(n: int, correct: np.ndarray | list[int], k: int) -> np.ndarray:
    """Per-item unbiased pass@k for an array of correct counts (same ``n`` for all items)."""
    return np.array([pass_at_k(n, int(c), k) for c in np.asarray(correct).ravel()], dtype=float)


def bootstrap_ci(
    values: np.ndarray | list[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` over items (resampling items with replacement).

    Args:
        values: Per-item values, shape ``(n_items,)`` (or ``(n_items, ...)``; rows are resampled).
        stat: Statistic of a resample; must accept an array along axis 0. Defaults to the mean.
        n_boot: Number of resamples.
        alpha: ``1 - confidence``.
        seed: RNG seed, so the interval is reproducible.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for an empty input.
    """
    x = np.asarray(values, dtype=float)
    if x.shape[0] == 0:
        return (float("nan"), float("nan"))
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    if stat is np.mean:  # vectorised fast path
        boots = x[idx].mean(axis=1)
    else:
        boots = np.array([stat(x[i]) for i in idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def paired_bootstrap_ci(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap CI of ``mean(b) - mean(a)`` over the same items.

    Returns:
        ``(difference, low, high)``.

    Raises:
        ConfigError: If ``a`` and ``b`` have different lengths.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ConfigError(f"paired values need equal shapes, got {a.shape} and {b.shape}")
    d = b - a
    lo, hi = bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)
    return (float(d.mean()) if d.size else float("nan"), lo, hi)
