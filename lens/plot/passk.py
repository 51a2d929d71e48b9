"""pass@k curves: one line per model or strategy, 95% CI bands, optionally one panel per question type."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from lens.plot.style import COLUMN_WIDTH, PAGE_WIDTH, PALETTE, paper_style


def plot_pass_at_k(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """pass@k against k (log2 axis) with bootstrap 95% CI bands.

    Args:
        summary: A long summary table with ``metric``, ``k``, ``ci_low``, ``ci_high``, a value column
            (``estimate`` or ``value``) and a line column (``model`` or ``strategy``). Rows with
            ``metric == "pass@k"`` are drawn. With a ``qtype`` column holding several question types,
            one panel per type is drawn (``all`` first).
        title: Optional figure title.

    Returns:
        The figure.
    """
    rows = summary[summary["metric"] == "pass@k"]
    value = "estimate" if "estimate" in rows.columns else "value"
    hue = "model" if "model" in rows.columns else "strategy"
    panels = list(dict.fromkeys(rows["qtype"])) if "qtype" in rows.columns else [None]
    ks = sorted(rows["k"].unique())
    with paper_style():
        width = PAGE_WIDTH if len(panels) > 1 else COLUMN_WIDTH
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 2.4), sharey=True, squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            sub = rows if panel is None else rows[rows["qtype"] == panel]
            for i, (name, group) in enumerate(sub.groupby(hue, sort=False)):
                group = group.sort_values("k")
                color = PALETTE[i % len(PALETTE)]
                ax.plot(group["k"], group[value], marker="o", ms=3, color=color, label=name)
                ax.fill_between(group["k"], group["ci_low"], group["ci_high"], color=color, alpha=0.15, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("k (samples at T = 1)" if len(panels) > 1 else "k (samples at temperature 1.0)")
            if panel is not None:
                ax.set_title(str(panel))
        axes[0][0].set_ylabel("pass@k")
        axes[0][-1].legend(loc="lower right")
        if title:
            fig.suptitle(title) if len(panels) > 1 else axes[0][0].set_title(title)
        fig.tight_layout()
    return fig
