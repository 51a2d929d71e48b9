"""pass@k estimator and bootstrap CIs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lens.errors import ConfigError
from lens.metrics import bootstrap_ci, paired_bootstrap_ci, pass_at_k, pass_at_k_array


def brute_force(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration_and_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_special_cases():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert pass_at_k(16, 1, 16) == 1.0
    # Large n stays finite and in range (a naive binomial ratio would overflow floats).
    assert 0 < pass_at_k(2000, 3, 100) < 1
    assert list(pass_at_k_array(4, [0, 1, 4], 2)) == pytest.approx([0, 0.5, 1])


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ConfigError):
        pass_at_k(n, c, k)


def test_bootstrap_ci_sanity():
    rng = np.random.default_rng(0)
    x = rng.random(400) < 0.3
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi
    # Roughly the normal-approximation width 2 * 1.96 * sqrt(p (1-p) / n).
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 400), rel=0.25)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    small_lo, small_hi = bootstrap_ci(x[:40])
    assert small_hi - small_lo > hi - lo
    lo_m, hi_m = bootstrap_ci(x, stat=np.median)
    assert 0 <= lo_m <= hi_m <= 1
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.4).astype(float)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)
    b = np.maximum(a, rng.random(300) < 0.3)  # b solves a superset of a's items
    d, lo, hi = paired_bootstrap_ci(a, b)
    assert d == pytest.approx(b.mean() - a.mean())
    assert 0 < lo <= d <= hi
    with pytest.raises(ConfigError):
        paired_bootstrap_ci(a, b[:-1])
