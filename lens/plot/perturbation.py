"""The perturbation scatter: low-entropy KL drift against answer perplexity, correct and incorrect apart."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from lens.plot.style import COLUMN_WIDTH, PAGE_WIDTH, PALETTE, paper_style

#: Colour and marker per answer kind (Okabe-Ito blue / vermillion: distinct in every CVD type).
ANSWER_STYLE = {
    "correct": {"color": PALETTE[0], "marker": "o", "label": "correct answer"},
    "incorrect": {"color": PALETTE[3], "marker": "^", "label": "incorrect answer"},
}
_KIND_TITLES = {"pixel": "noise on pixel values", "embedding": "noise on visual embeddings"}
_DRIFT_LABELS = {
    "kl_low_entropy": r"low-entropy drift: mean KL($P_\mathrm{base}\,\|\,P_\mathrm{rlvr}$) [nats]",
    "kl_visual_all": r"visual drift: mean KL($P_\mathrm{base}\,\|\,P_\mathrm{rlvr}$) [nats]",
}


def _rho_label(correlations: pd.DataFrame | None, kind: str, answer_kind: str, scope: str) -> str:
    if correlations is None or not len(correlations):
        return ""
    rows = correlations[
        (correlations["noise_kind"] == kind)
        & (correlations["answer_kind"] == answer_kind)
        & (correlations["scope"] == scope)
    ]
    if not len(rows):
        return ""
    row = rows.iloc[0]
    if not np.isfinite(row["spearman_rho"]):
        return ""
    return rf" ($\rho$={row['spearman_rho']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}])"


def plot_perturbation(
    table: pd.DataFrame,
    correlations: pd.DataFrame | None = None,
    drift: str = "kl_low_entropy",
    scope: str = "pooled",
    title: str | None = None,
    log_x: bool | None = None,
) -> Figure:
    """Drift (x) against teacher-forced perplexity (y, log), one panel per noise kind.

    Every (sample, σ) point is drawn faintly; the mean drift and geometric-mean PPL at each σ are
    drawn on top and joined in σ order, so the sweep reads from the clean point outwards.

    Args:
        table: The tidy table of :func:`analyses.perturbation.perturb_table` (columns
            ``sample_id``, ``noise_kind``, ``sigma``, ``answer_kind``, ``ppl`` and ``drift``).
        correlations: Optional :func:`analyses.perturbation.correlation_table`; its ρ and CI per
            answer kind go into the legend.
        drift: Drift column on the x axis.
        scope: Which correlation to quote in the legend (``pooled`` or ``within_sample``).
        title: Optional figure title.
        log_x: Log-scale the drift axis (default: when the positive drift spans > 2 decades).

    Returns:
        The figure.
    """
    kinds = [k for k in ("pixel", "embedding") if k in set(table["noise_kind"])]
    kinds += sorted(set(table["noise_kind"]) - set(kinds))
    with paper_style():
        width = PAGE_WIDTH if len(kinds) > 1 else COLUMN_WIDTH
        fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(width, 2.6), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=False):
            sub = table[table["noise_kind"] == kind]
            x_all = sub[drift].to_numpy(float)
            positive = x_all[np.isfinite(x_all) & (x_all > 0)]
            use_log = (
                log_x
                if log_x is not None
                else bool(positive.size and positive.max() / max(positive.min(), 1e-12) > 100)
            )
            handles = []
            for answer_kind, style in ANSWER_STYLE.items():
                rows = sub[sub["answer_kind"] == answer_kind]
                if not len(rows):
                    continue
                ax.scatter(
                    rows[drift],
                    rows["ppl"],
                    s=8,
                    alpha=0.35,
                    color=style["color"],
                    marker=style["marker"],
                    linewidths=0,
                    rasterized=len(rows) > 2000,
                )
                means = (
                    rows.assign(log_ppl=np.log(rows["ppl"]))
                    .groupby("sigma", sort=True)
                    .agg(drift=(drift, "mean"), log_ppl=("log_ppl", "mean"))
                )
                ax.plot(
                    means["drift"],
                    np.exp(means["log_ppl"]),
                    color=style["color"],
                    marker=style["marker"],
                    ms=4,
                    mec="white",
                    mew=0.5,
                    lw=1.2,
                    zorder=3,
                )
                label = style["label"] + _rho_label(correlations, kind, answer_kind, scope)
                handles.append(
                    Line2D([], [], color=style["color"], marker=style["marker"], ms=4, lw=1.2, label=label)
                )
                if answer_kind == "correct":
                    # Mark σ on the mean curve once per panel (the incorrect curve shares the x values).
                    for sigma, row in means.iterrows():
                        ax.annotate(
                            f"{sigma:g}",
                            (row["drift"], np.exp(row["log_ppl"])),
                            xytext=(2, -7),
                            textcoords="offset points",
                            fontsize=5.5,
                            color="0.35",
                        )
            finite = np.isfinite(x_all) & np.isfinite(sub["ppl"].to_numpy(float))
            if not finite.any():
                # E.g. an empty low-entropy mask gives NaN drift everywhere: say so instead of
                # failing on a log axis with no data.
                ax.text(0.5, 0.5, f"no finite {drift} values\n(empty mask?)", ha="center", va="center",
                        transform=ax.transAxes, fontsize=7, color="0.35")  # fmt: skip
                ax.set_title(_KIND_TITLES.get(kind, kind))
                continue
            ax.set_yscale("log")
            # Plain numbers on the PPL axis ("4" rather than "4x10^0"); minor labels only when the
            # axis spans less than a decade, otherwise they crowd.
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ppl = sub["ppl"].to_numpy(float)
            ppl = ppl[np.isfinite(ppl) & (ppl > 0)]
            narrow = ppl.size and ppl.max() / ppl.min() < 10
            ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())
            if use_log:
                ax.set_xscale("log")
            ax.set_xlabel(_DRIFT_LABELS.get(drift, drift))
            ax.set_ylabel("teacher-forced perplexity")
            ax.set_title(_KIND_TITLES.get(kind, kind) + " (point labels: σ)")
            ax.legend(handles=handles, loc="best", fontsize=6, handlelength=1.5)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig
