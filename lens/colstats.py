"""Exact quantile edges and Spearman ρ of large float32 columns, in 8 bytes per row.

Two float32 columns ``x`` and ``y`` of one group are packed into one ``uint64`` per row
(:func:`pack_pairs`): the order-preserving 32-bit key of ``x`` above the key of ``y``. One in-place
sort orders the rows by ``x``; that gives every order statistic of ``x`` (hence numpy's quantile
edges) and the average rank of every ``x`` (ties share the mean of their positions). The ``x`` half of
each word is then replaced by the ``y`` key and the ``y`` half by the doubled rank of ``x``, and a
second sort gives the ranks of ``y`` next to the ranks of ``x``. Spearman's ρ is the Pearson
correlation of the two rank columns, summed here in exact integers.

No Python object per row and no float64 copy of a column is made; the packed words are the only
per-row memory (plus fixed-size chunks). Results:

* quantile edges equal ``np.quantile(x.astype(float64), linspace(0, 1, n + 1))`` bit for bit: the
  order statistics are exact and the interpolation is numpy's own (see :func:`quantile_edges`);
* ρ is exact up to its final rounding. ``scipy.stats.spearmanr`` sums float64 ranks with BLAS, so the
  two differ by rounding only (~1e-16 relative on small groups, at most ~1e-12 on tens of millions
  of rows); the p-value uses scipy's formula (t-distribution with n - 2 degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import special

_SIGN = np.uint32(0x80000000)
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
#: Keys of -inf and +inf: every NaN key lies outside this range (negative NaNs below, positive above).
_KEY_NEG_INF = np.uint32(0x007FFFFF)
_KEY_POS_INF = np.uint32(0xFF800000)
#: Rows per chunk of the rank walks (bounds the temporaries to a few MB).
CHUNK = 1 << 18
#: Doubled ranks must fit in the 32-bit half of a packed word.
MAX_ROWS = (1 << 31) - 1


def float_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving ``uint32`` keys of float32 values (``a < b`` iff ``key(a) < key(b)``).

    ``-0.0`` gets the key of ``+0.0`` (they compare equal, so they must tie). NaNs get keys below
    ``-inf`` (negative sign bit) or above ``+inf``.
    """
    bits = np.add(values, np.float32(0), dtype=np.float32).view(np.uint32)  # -0.0 + 0.0 = +0.0
    # Negative values: flip every bit (larger magnitude sorts lower); others: set the sign bit.
    flip = (bits.view(np.int32) >> 31).view(np.uint32)
    flip |= _SIGN
    bits ^= flip
    return bits


def key_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_keys` (``-0.0`` comes back as ``+0.0``)."""
    keys = np.asarray(keys)
    bits = np.array(keys, dtype=np.uint32, ndmin=1)  # a copy, turned into the floats' bits in place
    flip = bits >> 31  # 1 for keys of non-negative values, 0 for negative ones
    np.subtract(flip, 1, out=flip)  # ... 0 or all ones (wrapping)
    flip |= _SIGN
    bits ^= flip
    return bits.view(np.float32).reshape(keys.shape)


def high_floats(packed: np.ndarray) -> np.ndarray:
    """The ``x`` (float32) of words made by :func:`pack_pairs`."""
    return key_floats((packed >> _SHIFT).astype(np.uint32))


def low_floats(packed: np.ndarray) -> np.ndarray:
    """The ``y`` (float32) of words made by :func:`pack_pairs`."""
    return key_floats((packed & _LOW).astype(np.uint32))


def pack_pairs(x: np.ndarray, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One ``uint64`` per row: the key of ``x`` in the high half, the key of ``y`` in the low half."""
    packed = np.left_shift(float_keys(x).astype(np.uint64), _SHIFT)
    packed |= float_keys(y).astype(np.uint64)
    if out is None:
        return packed
    out[...] = packed
    return out


def _has_nan_keys(keys: np.ndarray) -> bool:
    return bool(keys.size) and bool((keys.min() < _KEY_NEG_INF) | (keys.max() > _KEY_POS_INF))


def quantile_edges(order_statistic, n: int, n_buckets: int) -> np.ndarray:
    """``np.quantile(values, np.linspace(0, 1, n_buckets + 1))`` of float64 values, from order statistics.

    Args:
        order_statistic: ``order_statistic(k)`` is the k-th smallest value (0-based) as a float.
        n: Number of values (>= 1).
        n_buckets: Number of buckets.

    The positions follow numpy's default (``'linear'``, Hyndman & Fan type 7): virtual index
    ``(n - 1) q``. The interpolation between the two neighbouring order statistics is done by
    ``np.quantile`` itself on those two values, so its rounding is numpy's.
    """
    quantiles = np.linspace(0.0, 1.0, n_buckets + 1)
    edges = np.empty(n_buckets + 1)
    with np.errstate(invalid="ignore"):  # inf - inf in the interpolation gives NaN, as in numpy
        for i, virtual in enumerate((n - 1) * quantiles):
            if virtual >= n - 1:  # the maximum (numpy interpolates it with itself: NaN for inf)
                pair, gamma = np.full(2, order_statistic(n - 1), dtype=np.float64), np.ones(1)
            else:
                below = int(math.floor(virtual))
                pair = np.array([order_statistic(below), order_statistic(below + 1)], dtype=np.float64)
                gamma = np.asarray([virtual - below])
            edges[i] = np.quantile(pair, gamma)[0]  # two values: virtual index = gamma, numpy's own lerp
    return edges


class PackedBuckets:
    """Bucket numbers of words made by :func:`pack_pairs`, from quantile edges of their ``x``.

    ``buckets(words)`` equals ``np.searchsorted(edges[1:-1], x.astype(float64), side="right") + 1``
    (bucket b holds ``edges[b-1] <= x < edges[b]``, ties go up), computed on the words themselves:
    ``x >= e`` holds exactly when ``key(x) >= key(c)``, with ``c`` the smallest float32 not below
    the float64 edge ``e``, so each inner edge is one integer comparison and nothing is unpacked.
    """

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        inner = self.edges[1:-1]
        self.dtype = np.int8 if len(self.edges) <= 127 else np.int32
        self.thresholds: np.ndarray | None = None
        if not np.isnan(inner).any():  # NaN edges (x had a NaN): numpy's NaN ordering, below
            with np.errstate(over="ignore"):
                nearest = inner.astype(np.float32)
            low = nearest.astype(np.float64) < inner
            nearest[low] = np.nextafter(nearest[low], np.float32(np.inf))
            self.thresholds = float_keys(nearest).astype(np.uint64) << _SHIFT

    def __call__(self, words: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            x = high_floats(words).astype(np.float64)
            return (np.searchsorted(self.edges[1:-1], x, side="right") + 1).astype(self.dtype)
        buckets = np.ones(words.size, dtype=self.dtype)
        for threshold in self.thresholds:
            buckets += words >= threshold
        return buckets


def split_by_bucket(values: np.ndarray, buckets: np.ndarray, n_buckets: int) -> list[np.ndarray]:
    """``[values[buckets == b] for b in 1..n_buckets]``, each in the original order (one stable sort)."""
    order = np.argsort(buckets, kind="stable")  # radix sort for 8-bit bucket numbers
    counts = np.bincount(buckets, minlength=n_buckets + 1)[1 : n_buckets + 1]
    return np.split(values[order], np.cumsum(counts)[:-1])


def float_quantile_edges(values: np.ndarray, n_buckets: int) -> np.ndarray:
    """``np.quantile(values.astype(float64), linspace(0, 1, n_buckets + 1))`` of a float32 array.

    Bit for bit the same, without the float64 copy: the order statistics come from
    ``np.partition``, which reorders ``values`` in place (pass a copy to keep the order).
    """
    n = values.size
    if n == 0 or np.isnan(values).any():  # numpy: NaN edges (and a warning for an empty array)
        return np.full(n_buckets + 1, np.nan)
    positions = set()
    for virtual in (n - 1) * np.linspace(0.0, 1.0, n_buckets + 1):
        below = min(int(math.floor(virtual)), n - 1)
        positions.update((below, min(below + 1, n - 1)))
    values.partition(sorted(positions))
    return quantile_edges(lambda k: float(values[k]), n, n_buckets)


def _runs(packed: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """Walk words sorted by their high half, one chunk at a time, ranking the high halves.

    Yields ``(start, chunk, ranks, ties)``: the doubled 1-based average rank of every word of the
    chunk (``2 (p + 1)`` at position ``p``; a run of equal high halves from ``first`` to ``last``
    shares ``first + last + 2``), and ``sum(t**3 - t)`` over the lengths ``t`` of the tie runs that
    start in the chunk. Only ties cost extra work. The caller may rewrite a chunk once it has it: the
    walk looks back only through carried state and forward only into chunks not yet yielded.
    """
    n = packed.size
    carry_first, carry_key = -1, None
    for start in range(0, n, CHUNK):
        chunk = packed[start : start + CHUNK]
        size = chunk.size
        end = start + size
        high = chunk >> _SHIFT
        ranks = np.arange(2 * start + 2, 2 * end + 2, 2, dtype=np.int64)
        # Tie runs: maximal stretches of equal neighbours, as [first, last] local positions.
        tied = np.flatnonzero(high[1:] == high[:-1])
        breaks = np.flatnonzero(np.diff(tied) != 1) + 1
        firsts = tied[np.concatenate(([0], breaks))] if tied.size else tied
        lasts = tied[np.concatenate((breaks - 1, [tied.size - 1]))] + 1 if tied.size else tied
        continued = carry_key is not None and high[0] == carry_key  # a run from the last chunk goes on
        extends = end < n and (packed[end] >> _SHIFT) == high[-1]  # ... and one goes on into the next
        if continued and not (firsts.size and firsts[0] == 0):
            firsts, lasts = np.concatenate(([0], firsts)), np.concatenate(([0], lasts))
        if extends and not (lasts.size and lasts[-1] == size - 1):
            firsts, lasts = np.concatenate((firsts, [size - 1])), np.concatenate((lasts, [size - 1]))
        ties = 0
        if firsts.size:
            first, last = firsts + start, lasts + start  # global positions
            if continued:
                first[0] = carry_first
            if extends:
                bound = (high[-1] << _SHIFT) | _LOW
                last[-1] = end + int(np.searchsorted(packed[end:], bound, side="right")) - 1
            lengths = lasts - firsts + 1
            offsets = np.repeat(firsts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            ranks[offsets] = np.repeat(first + last + 2, lengths)
            spans = (last - first + 1)[1:] if continued else last - first + 1
            big = spans > (1 << 20)  # t**3 of these would overflow int64: Python ints
            small = spans[~big]
            ties = int((small**3 - small).sum()) + sum(t**3 - t for t in spans[big].tolist())
        carry_first = int(first[-1]) if firsts.size and lasts[-1] == size - 1 else end - 1
        carry_key = high[-1]
        yield start, chunk, ranks, ties


def _exact_dot(u: np.ndarray, v: np.ndarray, bound: int) -> int:
    """``sum(u * v)`` of int64 arrays with ``|u|, |v| <= bound``, exactly (as a Python int)."""
    products = u * v  # each |u v| <= bound**2 < 2**62 since bound < 2**31
    block = max(1, (1 << 62) // max(bound * bound, 1))
    if block >= products.size:
        return int(products.sum())
    whole = products.size // block * block
    partial = products[:whole].reshape(-1, block).sum(axis=1)  # each block sum < 2**62
    return sum(partial.tolist()) + int(products[whole:].sum())


@dataclass(frozen=True)
class RankSummary:
    """Quantile edges of ``x`` and Spearman's ρ(x, y) of one group.

    Attributes:
        n: Rows.
        edges: ``n_buckets + 1`` quantile edges of ``x`` (all NaN when ``x`` has a NaN, as numpy).
        spearman_rho: Spearman ρ (NaN for fewer than 2 rows, a constant column or a NaN, as scipy).
        p_value: Two-sided p-value of ρ (scipy's t approximation).
    """

    n: int
    edges: np.ndarray
    spearman_rho: float
    p_value: float


def rank_summary(packed: np.ndarray, n_buckets: int) -> RankSummary:
    """Quantile edges of ``x`` and Spearman ρ(x, y) from words made by :func:`pack_pairs`.

    ``packed`` is sorted and rewritten in place (it holds ranks afterwards); pass a copy to keep it.
    """
    n = int(packed.size)
    if n > MAX_ROWS:
        raise ValueError(f"a group of {n} rows is above the {MAX_ROWS} this method supports")
    nan = float("nan")
    if n == 0:
        return RankSummary(0, np.full(n_buckets + 1, nan), nan, nan)
    packed.sort()
    x_keys = (packed[[0, -1]] >> _SHIFT).astype(np.uint32)
    if _has_nan_keys(x_keys):
        return RankSummary(n, np.full(n_buckets + 1, nan), nan, nan)
    edges = quantile_edges(lambda k: float(high_floats(packed[k : k + 1])[0]), n, n_buckets)
    if n < 2:
        return RankSummary(n, edges, nan, nan)

    # Doubled average ranks d = 2r average n + 1; with t-fold ties,
    # sum((d - (n + 1))**2) = (n**3 - n - sum(t**3 - t)) / 3, exactly.
    centre = n + 1
    ties_x = 0
    for start, chunk, ranks, ties in _runs(packed):
        ties_x += ties
        # Sort next by y, carrying the doubled rank of x in the low half.
        packed[start : start + chunk.size] = ((chunk & _LOW) << _SHIFT) | ranks.astype(np.uint64)
    packed.sort()
    if _has_nan_keys((packed[[0, -1]] >> _SHIFT).astype(np.uint32)):
        return RankSummary(n, edges, nan, nan)
    ties_y = sum_xy = 0
    for _, chunk, ranks, ties in _runs(packed):
        ties_y += ties
        sum_xy += _exact_dot((chunk & _LOW).astype(np.int64) - centre, ranks - centre, n - 1)
    sum_xx = (n**3 - n - ties_x) // 3
    sum_yy = (n**3 - n - ties_y) // 3
    if sum_xx == 0 or sum_yy == 0:  # a constant column: ρ undefined, as in scipy
        return RankSummary(n, edges, nan, nan)
    rho = min(1.0, max(-1.0, sum_xy / math.sqrt(sum_xx * sum_yy)))
    return RankSummary(n, edges, rho, spearman_p_value(rho, n))


def spearman_p_value(rho: float, n: int) -> float:
    """Two-sided p-value of Spearman's ρ over ``n`` rows, as ``scipy.stats.spearmanr`` computes it."""
    dof = n - 2
    rs = np.float64(rho)  # numpy scalars: a division by zero gives inf or nan, as in scipy
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rs * np.sqrt(np.clip(dof / ((rs + 1.0) * (1.0 - rs)), 0, None))
        return float(2 * special.stdtr(dof, -np.abs(t)))
