"""Planted-twin controls: detection power against plant size, injection recovery, replay Δ-vs-plant cosines.

Each function takes a tidy table of :mod:`analyses.controls` and returns a figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lens.plot.style import COLUMN_WIDTH, PAGE_WIDTH, PALETTE, paper_style

#: One colour per plant location, the same in every figure.
SITE_COLORS = {"low": PALETTE[0], "high": PALETTE[3], "random": PALETTE[7], "text": PALETTE[2]}
STRATEGY_ORDER = ("base", "planted", "hard-low", "hard-high")
STRATEGY_COLORS = {"base": "#999999", "planted": PALETTE[7], "hard-low": PALETTE[0], "hard-high": PALETTE[3]}


def plot_detection_power(power: pd.DataFrame, title: str | None = None) -> Figure:
    """P(visual bucket 1 has the largest mean KL) against plant size, per location, with Wilson 95% CIs.

    Args:
        power: The table of :func:`analyses.controls.detection_power`: ``where``, ``scope``
            (``"layer"``/``"pooled"``), ``size``, ``criterion`` (``"bucket 1"``/``"planted bucket"``),
            ``power``, ``ci_low``, ``ci_high``, ``replicates``, ``items``. ``bucket 1`` rows are drawn as
            solid lines, and for ``high`` plants the ``planted bucket`` (top bucket) rows dashed.
        title: Optional figure title.

    Returns:
        The figure: one panel per scope.
    """
    scopes = [s for s in ("layer", "pooled") if s in set(power["scope"])]
    sizes = sorted(power["size"].unique())
    position = {size: i for i, size in enumerate(sizes)}  # evenly spaced sizes: 0 and a log-like range
    lines = [
        (where, criterion)
        for where in dict.fromkeys(power["where"])
        for criterion in ("bucket 1", "planted bucket")
        # For low/random plants the planted bucket is bucket 1: one line.
        if criterion == "bucket 1" or target_of(power, where) != 1
    ]
    with paper_style():
        fig, axes = plt.subplots(1, len(scopes), figsize=(PAGE_WIDTH, 2.6), sharey=True, squeeze=False)
        for ax, scope in zip(axes[0], scopes, strict=True):
            rows = power[power["scope"] == scope]
            for k, (where, criterion) in enumerate(lines):
                line = rows[(rows["where"] == where) & (rows["criterion"] == criterion)].sort_values("size")
                if line.empty:
                    continue
                color = SITE_COLORS.get(str(where), PALETTE[4])
                dodge = (k - (len(lines) - 1) / 2) * 0.07
                x = line["size"].map(position).to_numpy(float) + dodge
                err = np.vstack([line["power"] - line["ci_low"], line["ci_high"] - line["power"]])
                bucket = "bucket 1" if criterion == "bucket 1" else f"bucket {target_of(power, where)}"
                ax.errorbar(
                    x, line["power"], yerr=err, fmt="-o" if criterion == "bucket 1" else "--s", ms=3,
                    color=color, capsize=1.5, elinewidth=0.7, label=f"{where} plant: {bucket} largest",
                )  # fmt: skip
            ax.set_xticks(range(len(sizes)), [f"{s:g}" for s in sizes])
            ax.set_ylim(-0.04, 1.04)
            ax.set_xlabel("plant size (RMS relative to the residual)")
            layer = int(rows["layer"].iloc[0]) if "layer" in rows.columns else 0
            ax.set_title(
                f"visual buckets at the planted layer ({layer})"
                if scope == "layer"
                else "visual buckets pooled over layers"
            )
        first = power.iloc[0]
        axes[0][0].set_ylabel(
            f"P(detect), {int(first['replicates'])} replicates × {int(first['items'])} items"
        )
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), bbox_to_anchor=(0.5, -0.02))
        if title:
            fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def target_of(power: pd.DataFrame, where: str) -> int:
    """The planted bucket of a location, as recorded in a power table."""
    rows = power[(power["where"] == where) & (power["criterion"] == "planted bucket")]
    return int(rows["target"].iloc[0]) if not rows.empty else 1


def plot_injection_recovery(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Greedy accuracy of base, planted twin, hard-low and hard-high injection, per plant location.

    Args:
        summary: The table of :func:`analyses.controls.recovery_summary`: ``where``, ``strategy``,
            ``accuracy``, ``ci_low``, ``ci_high``, ``same_as_base``, ``n``, ``size``.
        title: Optional figure title.

    Returns:
        The figure: one panel per plant location; bars with 95% CIs, and above each bar the share of
        answers identical to the base's.
    """
    wheres = list(dict.fromkeys(summary["where"]))
    with paper_style():
        fig, axes = plt.subplots(
            1, len(wheres), figsize=(max(COLUMN_WIDTH, 2.3 * len(wheres)), 2.4), sharey=True, squeeze=False
        )
        for ax, where in zip(axes[0], wheres, strict=True):
            rows = summary[summary["where"] == where].set_index("strategy")
            order = [s for s in STRATEGY_ORDER if s in rows.index] + [
                s for s in rows.index if s not in STRATEGY_ORDER
            ]
            x = np.arange(len(order))
            acc = rows.loc[order, "accuracy"].to_numpy(float)
            err = np.vstack([acc - rows.loc[order, "ci_low"], rows.loc[order, "ci_high"] - acc])
            colors = [STRATEGY_COLORS.get(s, PALETTE[4]) for s in order]
            ax.bar(x, acc, color=colors, width=0.65, yerr=err, capsize=2, error_kw={"lw": 0.8})
            for xi, s in zip(x, order, strict=True):
                ax.text(
                    xi, float(rows.loc[s, "ci_high"]) + 0.02, f"{rows.loc[s, 'same_as_base']:.0%}",
                    ha="center", va="bottom", fontsize=6,
                )  # fmt: skip
            ax.set_xticks(x, order)
            size, n = float(rows["size"].iloc[0]), int(rows["n"].iloc[0])
            ax.set_title(f"{where}-entropy plant (size {size:g}, {n} items)")
        axes[0][0].set_ylabel("greedy accuracy (95% CI)")
        axes[0][0].set_ylim(0, min(1.0, float(summary["ci_high"].max()) + 0.15))
        fig.text(
            0.5,
            -0.02,
            "numbers above bars: share of answers identical to the base's",
            ha="center",
            fontsize=6,
        )
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def plot_replay_cosines(
    cosines: pd.DataFrame, summary: pd.DataFrame | None = None, title: str | None = None
) -> Figure:
    """cosine(Δ, planted offset) per visual token, planted vs other tokens, per replay variant and α.

    Args:
        cosines: The per-token table of :func:`analyses.controls.replay_cosines`: ``variant``,
            ``alpha``, ``item``, ``planted``, ``cosine``.
        summary: Optional :func:`analyses.controls.cosine_summary` table; its CIs (bootstrap over items)
            are drawn as black error bars on the means.
        title: Optional figure title.

    Returns:
        The figure: jittered token cosines, the mean as a bar, -1 = Δ exactly undoes the plant.
    """
    groups = list(cosines.groupby(["variant", "alpha"], sort=False).groups)
    rng = np.random.default_rng(0)
    with paper_style():
        fig, ax = plt.subplots(figsize=(max(COLUMN_WIDTH, 1.3 * len(groups) + 0.8), 2.4))
        for gi, (variant, alpha) in enumerate(groups):
            for planted in (True, False):
                rows = cosines[
                    (cosines["variant"] == variant)
                    & (cosines["alpha"] == alpha)
                    & (cosines["planted"] == planted)
                ]
                if rows.empty:
                    continue
                x = gi + (-0.18 if planted else 0.18)
                color = SITE_COLORS["low"] if planted else "#999999"
                jitter = rng.uniform(-0.09, 0.09, len(rows))
                label = ("planted tokens" if planted else "other visual tokens") if gi == 0 else None
                ax.scatter(x + jitter, rows["cosine"], s=3, color=color, alpha=0.5, lw=0, label=label)
                mean = float(rows["cosine"].mean())
                ax.plot([x - 0.13, x + 0.13], [mean, mean], color="black", lw=1.2)
                if summary is not None:
                    tokens = "planted" if planted else "other"
                    match = summary[
                        (summary["variant"] == variant)
                        & (summary["alpha"] == alpha)
                        & (summary["tokens"] == tokens)
                    ]
                    if not match.empty:
                        lo, hi = float(match["ci_low"].iloc[0]), float(match["ci_high"].iloc[0])
                        ax.errorbar(
                            x, mean, yerr=[[mean - lo], [hi - mean]], color="black", capsize=2, lw=0.8
                        )
        ax.axhline(0, color="#999999", lw=0.6)
        ax.set_xticks(range(len(groups)), [f"{v}\nα = {a:g}" for v, a in groups])
        ax.set_ylabel("cosine(Δ, planted offset)")
        low = min(-0.2, float(cosines["cosine"].min()) - 0.05)
        high = max(0.2, float(cosines["cosine"].max()) + 0.05)
        ax.set_ylim(low, high)
        ax.legend(loc="upper right", markerscale=3)
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig
