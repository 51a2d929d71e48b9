"""Tables of an intervention run: per-item rows, pass@k summaries with bootstrap CIs, the wide table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lens.errors import DatasetError
from lens.metrics import bootstrap_ci, paired_bootstrap_ci, pass_at_k_array


def per_item_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Tidy per-(setting, item) rows from records."""
    if not records:
        raise DatasetError("no intervention records to tabulate")
    frame = pd.DataFrame(list(records))
    for column in ("losses", "final_loss", "n_selected", "offset_norm"):
        if column not in frame:
            frame[column] = None
    frame["first_loss"] = [lst[0] if isinstance(lst, list) and lst else np.nan for lst in frame["losses"]]
    return frame


def summarise(per_item: pd.DataFrame, ks: Sequence[int], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (strategy, setting, metric, k): mean with a 95% percentile bootstrap CI.

    Metrics: ``greedy_pass@1`` and ``pass@k`` (unbiased estimator on the ``n`` samples). When an
    ``rlvr`` row exists, ``delta_vs_rlvr`` and its paired bootstrap CI over the same items are added.
    """
    rows = []
    rlvr = per_item[per_item["strategy"] == "rlvr"].set_index("item")
    for (strategy, setting), group in per_item.groupby(["strategy", "setting"], sort=False):
        group = group.set_index("item")
        metrics = [("greedy_pass@1", 1, group["greedy"].to_numpy(float))]
        n = int(group["n"].min())
        if n:
            for k in ks:
                if k <= n:
                    metrics.append(("pass@k", k, pass_at_k_array(n, group["correct"].to_numpy(), k)))
        for metric, k, values in metrics:
            low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            row = {
                "strategy": strategy,
                "setting": setting,
                "metric": metric,
                "k": k,
                "n_items": len(values),
                "value": float(values.mean()),
                "ci_low": low,
                "ci_high": high,
            }
            common = group.index.intersection(rlvr.index)
            if strategy != "rlvr" and len(common):
                ref = _metric(rlvr.loc[common], metric, k)
                if ref is not None:
                    mine = _metric(group.loc[common], metric, k)
                    delta, d_low, d_high = paired_bootstrap_ci(ref, mine, n_boot=n_boot, seed=seed)
                    row.update(delta_vs_rlvr=delta, delta_ci_low=d_low, delta_ci_high=d_high)
            rows.append(row)
    return pd.DataFrame(rows)


def _metric(frame: pd.DataFrame, metric: str, k: int) -> np.ndarray | None:
    if metric == "greedy_pass@1":
        return frame["greedy"].to_numpy(float)
    n = int(frame["n"].min())
    return pass_at_k_array(n, frame["correct"].to_numpy(), k) if n >= k else None


def wide_table(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``value [low, high]`` strings, one row per strategy, one column per metric."""
    cells = summary.assign(
        column=np.where(
            summary["metric"] == "greedy_pass@1", "greedy pass@1", "pass@" + summary["k"].astype(str)
        ),
        cell=[
            f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for v, lo, hi in zip(summary["value"], summary["ci_low"], summary["ci_high"], strict=True)
        ],
    )
    order = list(dict.fromkeys(cells["column"]))
    wide = cells.pivot(index="strategy", columns="column", values="cell")[order]
    return wide.loc[list(dict.fromkeys(cells["strategy"]))]


def _save_plot(name: str, table: pd.DataFrame, path: Path, title: str | None) -> None:
    import matplotlib.pyplot as plt

    from lens.plot import interventions as plots
    from lens.plot.style import save_figure

    fig = getattr(plots, name)(table, title=title)
    save_figure(fig, path)
    plt.close(fig)
