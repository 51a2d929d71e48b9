"""Replay loss curves: the Activation Replay objective over optimisation steps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lens.errors import DatasetError
from lens.plot.style import COLUMN_WIDTH, PALETTE, paper_style


def plot_replay_loss(
    table: pd.DataFrame,
    relative: bool = False,
    log_y: bool | None = None,
    max_traces: int = 30,
    title: str | None = None,
) -> Figure:
    """Replay loss against step: mean over samples with a 95% band, one colour per setting.

    Args:
        table: Tidy table with ``sample_id``, ``step``, ``loss`` and optionally ``setting``
            (e.g. ``"τ=0.4, α=10"``). The per-step means of ``analyses.replay.loss_curves``
            (``replay_losses.csv``: ``setting``, ``step``, ``mean_loss``, ``tau``, ``alpha``) are
            accepted too; they are drawn as one curve per setting, without a band.
        relative: Divide each sample's curve by its step-0 (first-step) loss, so samples with very
            different starting losses share one scale.
        log_y: Log-scale the loss axis (default: when all losses are positive and span > 1 decade).
        max_traces: Draw thin per-sample curves when a setting has at most this many samples.
        title: Optional title.

    Returns:
        The figure.
    """
    frame = table.copy()
    if "loss" not in frame.columns and "mean_loss" in frame.columns:
        frame = frame.rename(columns={"mean_loss": "loss"}).assign(sample_id="mean")
    if {"quantile", "alpha"} <= set(frame.columns) and frame["quantile"].notna().all():
        frame["setting"] = [
            f"q={q:g}, α={a:g}" for q, a in zip(frame["quantile"], frame["alpha"], strict=True)
        ]
    elif {"tau", "alpha"} <= set(frame.columns):
        frame["setting"] = [f"τ={t:g}, α={a:g}" for t, a in zip(frame["tau"], frame["alpha"], strict=True)]
    missing = [c for c in ("sample_id", "step", "loss") if c not in frame.columns]
    if missing:
        raise DatasetError(f"the replay-loss table lacks the columns {missing}")
    if not len(frame):
        raise DatasetError("the replay-loss table is empty")
    if "setting" not in frame.columns:
        frame["setting"] = "replay"
    frame["setting"] = frame["setting"].astype(str)
    if relative:
        first = frame.sort_values("step").groupby(["setting", "sample_id"])["loss"].transform("first")
        frame["loss"] = frame["loss"] / first.replace(0, np.nan)
    loss = frame["loss"].to_numpy(float)
    finite = loss[np.isfinite(loss)]
    if log_y is None:
        log_y = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 10)
    with paper_style():
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.3))
        for i, (setting, sub) in enumerate(frame.groupby("setting", sort=False)):
            colour = PALETTE[i % len(PALETTE)]
            n_samples = sub["sample_id"].nunique()
            if n_samples <= max_traces:
                for _, trace in sub.groupby("sample_id"):
                    trace = trace.sort_values("step")
                    ax.plot(trace["step"], trace["loss"], color=colour, lw=0.4, alpha=0.3)
            stats = sub.groupby("step")["loss"].agg(["mean", "std", "count"]).sort_index()
            half = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"])
            label = setting if set(sub["sample_id"]) == {"mean"} else f"{setting} (n={n_samples})"
            ax.plot(stats.index, stats["mean"], color=colour, lw=1.6, label=label)
            lower = stats["mean"] - half
            if log_y:
                lower = lower.clip(lower=stats["mean"] * 1e-3)
            ax.fill_between(stats.index, lower, stats["mean"] + half, color=colour, alpha=0.2, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("replay step")
        ax.set_ylabel("replay loss / step-0 loss" if relative else "replay loss (masked KL) [nats]")
        if log_y:
            ax.set_yscale("log")
        # Outside the axes: the curves of a grid fill the whole panel.
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig
