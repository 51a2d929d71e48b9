"""KL drift by base-entropy bucket (the paper's key figure)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lens.plot.style import COLUMN_WIDTH, PAGE_WIDTH, PALETTE, SEQUENTIAL, paper_style

_GROUP_TITLES = {"visual": "visual tokens", "text": "text tokens"}


def plot_kl_by_entropy(buckets: pd.DataFrame, title: str | None = None, log_y: bool = False) -> Figure:
    """Mean KL(P_base ‖ P_rlvr) per base-entropy quantile bucket, visual and text tokens apart.

    Args:
        buckets: The bucket table of :func:`analyses.kl_drift.bucket_table`. With a
            ``comparison`` column (e.g. ``base→rlvr``, ``base→control``) one pooled curve is drawn
            per comparison; otherwise the pooled curve is drawn over thin per-layer curves.
        title: Optional figure title.
        log_y: Log-scale the KL axis.

    Returns:
        The figure (one panel per token group).
    """
    groups = [g for g in ("visual", "text") if g in set(buckets["token_group"])]
    with paper_style():
        width = PAGE_WIDTH if len(groups) > 1 else COLUMN_WIDTH
        fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(width, 2.3), squeeze=False, sharey=False)
        comparisons = list(dict.fromkeys(buckets["comparison"])) if "comparison" in buckets else [None]
        for ax, group in zip(axes[0], groups, strict=False):
            sub = buckets[buckets["token_group"] == group]
            if comparisons == [None]:
                per_layer = sub[sub["scope"] == "layer"]
                layers = sorted(per_layer["layer"].dropna().unique())
                cmap = plt.get_cmap(SEQUENTIAL)
                for i, layer in enumerate(layers):
                    rows = per_layer[per_layer["layer"] == layer].sort_values("bucket")
                    color = cmap(i / max(len(layers) - 1, 1))
                    ax.plot(rows["bucket"], rows["mean_kl"], color=color, lw=0.7, alpha=0.8)
                if layers:
                    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers), max(layers)))
                    fig.colorbar(sm, ax=ax, pad=0.02, fraction=0.05).set_label("layer")
            for j, comparison in enumerate(comparisons):
                pooled = sub[sub["scope"] == "pooled"]
                if comparison is not None:
                    pooled = pooled[pooled["comparison"] == comparison]
                pooled = pooled.sort_values("bucket")
                yerr = np.vstack(
                    [pooled["mean_kl"] - pooled["ci_low"], pooled["ci_high"] - pooled["mean_kl"]]
                ).clip(min=0)
                ax.errorbar(
                    pooled["bucket"],
                    pooled["mean_kl"],
                    yerr=yerr,
                    color="black" if comparison is None else PALETTE[j % len(PALETTE)],
                    lw=1.8,
                    marker="o",
                    ms=3,
                    capsize=2,
                    label="all layers" if comparison is None else str(comparison),
                )
            n_buckets = int(sub["bucket"].max()) if len(sub) else 0
            ax.set_xticks(range(1, n_buckets + 1))
            # Stages (base→sft, sft→rl) are bucketed by their own reference, which is not always the base.
            stages = "reference" in sub and sub["reference"].nunique() > 1
            reference = "reference" if stages else "base"
            ax.set_xlabel(f"{reference}-entropy quantile bucket (1 = lowest)")
            # With several comparisons (e.g. base→rlvr and base→control) the twin is not always RLVR.
            twin = r"\mathrm{rlvr}" if comparisons == [None] else r"\mathrm{twin}"
            ax.set_ylabel(rf"mean KL($P_\mathrm{{{reference}}}\,\|\,P_{twin}$) [nats]")
            ax.set_title(_GROUP_TITLES.get(group, group))
            if log_y:
                ax.set_yscale("log")
            ax.legend(loc="upper right")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
