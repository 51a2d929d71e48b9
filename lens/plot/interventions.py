"""Figures of the intervention and Activation Replay analyses; each takes a tidy table, returns a Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lens.plot.passk import plot_pass_at_k  # noqa: F401  (one implementation, re-exported)
from lens.plot.style import COLUMN_WIDTH, DIVERGING, paper_style


def plot_ablation_heatmap(ablation: pd.DataFrame, title: str | None = None) -> Figure:
    """Greedy pass@1 change vs RLVR over the τ × α grid (the paper's Table 5), annotated with the CI.

    The first axis is the mask quantile q instead of τ when the table has a ``quantile`` column
    with values (the rank-based mask rule).
    """
    value = "delta_vs_rlvr" if ablation["delta_vs_rlvr"].notna().any() else "greedy_pass@1"
    by_quantile = "quantile" in ablation and ablation["quantile"].notna().any()
    axis = "quantile" if by_quantile else "tau"
    ablation = ablation[ablation[axis].notna()]
    taus = sorted(ablation[axis].unique())
    alphas = sorted(ablation["alpha"].unique())
    grid = np.full((len(taus), len(alphas)), np.nan)
    notes = [["" for _ in alphas] for _ in taus]
    for _, row in ablation.iterrows():
        i, j = taus.index(row[axis]), alphas.index(row["alpha"])
        grid[i, j] = row[value]
        if value == "delta_vs_rlvr":
            # Two decimals for the CI: three overflow a cell at column width with the paper's 3 α values.
            notes[i][j] = f"{row[value]:+.3f}\n[{row['delta_ci_low']:+.2f}, {row['delta_ci_high']:+.2f}]"
        else:
            notes[i][j] = f"{row[value]:.3f}"
    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH, 0.6 + 0.55 * len(taus)))
        ax = fig.add_subplot()
        bound = (
            float(np.nanmax(np.abs(grid))) if value == "delta_vs_rlvr" and np.isfinite(grid).any() else None
        )
        image = ax.imshow(
            grid,
            cmap=DIVERGING if bound is not None else "viridis",
            vmin=-bound if bound else None,
            vmax=bound if bound else None,
            aspect="auto",
        )
        for i in range(len(taus)):
            for j in range(len(alphas)):
                dark = bound is not None and np.isfinite(grid[i, j]) and abs(grid[i, j]) > 0.6 * bound
                ax.text(
                    j,
                    i,
                    notes[i][j],
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(taus)), [f"{t:g}" for t in taus])
        ax.set_xlabel("α (step size)")
        ax.set_ylabel("q (mask quantile)" if by_quantile else "τ (mask threshold, × max)")
        label = "Δ greedy pass@1 vs RLVR" if value == "delta_vs_rlvr" else "greedy pass@1"
        fig.colorbar(image, ax=ax, label=label)
        if title:
            ax.set_title(title)
    return fig


# One implementation of the replay-loss figure, shared with `lens plot replay-loss`.
from lens.plot.training import plot_replay_loss  # noqa: E402,F401


def plot_greedy_by_strategy(summary: pd.DataFrame, title: str | None = None, reference: str = "rlvr") -> Figure:
    """Strategies side by side: greedy pass@1 with its CI, and the paired change vs ``reference``.

    Args:
        summary: The intervention summary (``analyses.intervention.summarise``): rows with ``metric ==
            "greedy_pass@1"`` and ``strategy``, ``value``, ``ci_low``, ``ci_high``, ``delta_vs_rlvr``,
            ``delta_ci_low``, ``delta_ci_high``.
        title: Optional title.
        reference: The strategy the changes are paired against (drawn without a change bar).

    Returns:
        A two-panel figure, strategies in the table's order.

    Raises:
        DatasetError: The table has no greedy rows.
    """
    import matplotlib.pyplot as plt

    from lens.errors import DatasetError
    from lens.plot.style import PALETTE

    greedy = summary[summary["metric"] == "greedy_pass@1"].reset_index(drop=True)
    if greedy.empty:
        raise DatasetError("the summary has no greedy_pass@1 rows (run with greedy decoding)")
    y = np.arange(len(greedy))
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(greedy))]
    with paper_style():
        fig, (left, right) = plt.subplots(1, 2, figsize=(COLUMN_WIDTH * 2, 0.35 * len(greedy) + 1.0), sharey=True)
        err = np.vstack([greedy["value"] - greedy["ci_low"], greedy["ci_high"] - greedy["value"]])
        left.barh(y, greedy["value"], xerr=err, color=colours, capsize=2)
        left.set_yticks(y, greedy["strategy"])
        left.invert_yaxis()
        left.set_xlim(0, 1)
        left.set_xlabel("greedy pass@1 (95% CI)")
        delta = greedy["delta_vs_rlvr"].astype(float)
        shown = (greedy["strategy"] != reference) & delta.notna()
        derr = np.vstack([delta - greedy["delta_ci_low"], greedy["delta_ci_high"] - delta])
        right.errorbar(delta[shown], y[shown], xerr=derr[:, shown], fmt="o", color="black", capsize=2)
        right.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        right.set_xlabel(f"paired change vs {reference} (95% CI)")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
