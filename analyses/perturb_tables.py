"""The study's tidy table, Spearman correlations with cluster-bootstrap CIs, and the per-σ summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from analyses.perturb_config import ANSWER_KINDS
from lens.errors import DatasetError

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
