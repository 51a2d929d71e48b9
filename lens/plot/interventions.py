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
