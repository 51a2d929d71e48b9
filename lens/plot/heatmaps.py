"""Layer × token heatmaps of base entropy and KL, and the visual tokens laid out on the image grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lens.errors import ConfigError, DatasetError
from lens.plot.style import PAGE_WIDTH, PALETTE, SEQUENTIAL, paper_style

METRIC_LABELS = {
    "base_entropy": "base entropy [nats]",
    "rlvr_entropy": "RLVR entropy [nats]",
    "kl_base_rlvr": r"KL($P_\mathrm{base}\,\|\,P_\mathrm{rlvr}$) [nats]",
}
#: Role colours of the band above the heatmap (same order as ``lens.inputs.ROLES``).
ROLE_COLOURS = {
    "visual": PALETTE[1],
    "prompt": PALETTE[0],
    "template": "#BBBBBB",
    "response": PALETTE[2],
}
_REQUIRED = ("sample_id", "layer", "position", "role")


def _one_sample(
    table: pd.DataFrame, sample_id: str | None, metrics: Sequence[str]
) -> tuple[str, pd.DataFrame]:
    missing = [c for c in (*_REQUIRED, *metrics) if c not in table.columns]
    if missing:
        raise DatasetError(f"the drift table lacks the columns {missing}")
    if not len(table):
        raise DatasetError("the drift table is empty")
    ids = table["sample_id"].astype(str)
    if sample_id is None:
        sample_id = str(ids.iloc[0])
    sub = table[ids == str(sample_id)]
    if not len(sub):
        raise DatasetError(f"sample {sample_id!r} is not in the drift table")
    return str(sample_id), sub


def layer_position_matrix(frame: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[layers, positions]`` values of ``metric`` for one sample, with the layer and position axes."""
    wide = frame.pivot_table(index="layer", columns="position", values=metric, aggfunc="mean")
    return wide.to_numpy(float), wide.index.to_numpy(), wide.columns.to_numpy()


def infer_grid(n_visual: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The merged image grid ``(rows, cols)`` of ``n_visual`` tokens.

    Args:
        n_visual: Number of visual tokens of the sample.
        grid: The merged grid, ``(h / merge, w / merge)`` from ``PairInputs.image_grids`` and
            ``merge_size``. Without it a square grid is assumed when ``n_visual`` is a square.

    Raises:
        ConfigError: When the grid does not match, or cannot be inferred.
    """
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols != n_visual:
            raise ConfigError(f"grid {rows}x{cols} holds {rows * cols} tokens but the sample has {n_visual}")
        return rows, cols
    side = int(round(np.sqrt(n_visual)))
    if side * side != n_visual or n_visual == 0:
        raise ConfigError(
            f"{n_visual} visual tokens do not form a square grid; pass the merged grid (rows x cols)"
        )
    return side, side


def merged_grid(inputs: Any, image: int = 0) -> tuple[int, int]:
    """The merged ``(rows, cols)`` grid of one image of a :class:`lens.inputs.PairInputs`."""
    t, h, w = inputs.image_grids[image]
    return h // inputs.merge_size, w // inputs.merge_size


def plot_layer_token_heatmaps(
    table: pd.DataFrame,
    sample_id: str | None = None,
    metrics: Sequence[str] = ("base_entropy", "kl_base_rlvr"),
    title: str | None = None,
    frames: Sequence[int] | None = None,
) -> Figure:
    """Full layer × position heatmaps of one sample, with a band showing each position's role.

    Args:
        table: Tidy drift table (``analyses.kl_drift.drift_table``): ``sample_id``, ``layer``,
            ``position``, ``role`` and the metric columns.
        sample_id: The sample to draw (default: the first).
        metrics: One heatmap row per metric.
        title: Optional title (default: the sample id).
        frames: For a video item, the temporal patch of every position (``PairInputs.frames``; -1
            for non-video tokens): a dashed line marks where one frame's tokens end and the next's
            begin, so the drift can be read per frame.

    Returns:
        The figure.
    """
    sample_id, sub = _one_sample(table, sample_id, metrics)
    roles = sub.drop_duplicates("position").sort_values("position")["role"].astype(str).to_numpy()
    role_names = [r for r in ROLE_COLOURS if r in set(roles)] + sorted(set(roles) - set(ROLE_COLOURS))
    colours = [ROLE_COLOURS.get(r, PALETTE[4]) for r in role_names]
    codes = np.array([role_names.index(r) for r in roles])[None, :]
    with paper_style():
        n_layers = sub["layer"].nunique()
        height = 0.5 + len(metrics) * min(max(1.2, 0.06 * n_layers + 0.6), 2.4)
        fig, axes = plt.subplots(
            len(metrics) + 1,
            2,
            figsize=(PAGE_WIDTH, height),
            gridspec_kw={"height_ratios": [0.12] + [1] * len(metrics), "width_ratios": [1, 0.02]},
            squeeze=False,
        )
        band, band_cax = axes[0]
        band.imshow(
            codes,
            aspect="auto",
            cmap=ListedColormap(colours),
            vmin=-0.5,
            vmax=len(colours) - 0.5,
            interpolation="nearest",
        )
        band.set_yticks([])
        band.set_xticks([])
        band.set_ylabel("role", rotation=0, ha="right", va="center")
        for spine in band.spines.values():
            spine.set_visible(False)
        band_cax.axis("off")
        band.legend(
            handles=[Patch(color=c, label=r) for r, c in zip(role_names, colours, strict=True)],
            loc="lower center",
            bbox_to_anchor=(0.5, 1.05),
            ncol=len(role_names),
            fontsize=6,
            handlelength=1.0,
            columnspacing=1.0,
        )
        for (ax, cax), metric in zip(axes[1:], metrics, strict=True):
            values, layers, positions = layer_position_matrix(sub, metric)
            image = ax.imshow(
                values,
                aspect="auto",
                origin="lower",
                cmap=SEQUENTIAL,
                interpolation="nearest",
                extent=(positions[0] - 0.5, positions[-1] + 0.5, -0.5, len(layers) - 0.5),
            )
            step = max(1, len(layers) // 6)
            ax.set_yticks(range(0, len(layers), step))
            ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)])
            ax.set_ylabel("layer")
            ax.set_title(METRIC_LABELS.get(metric, metric), loc="left")
            fig.colorbar(image, cax=cax).set_label("nats")
            if metric is not metrics[-1]:
                ax.set_xticklabels([])
            for boundary in frame_boundaries(frames):
                ax.axvline(boundary - 0.5, color="#e41a1c", lw=0.8, ls="--")  # visible on all of viridis
        axes[-1][0].set_xlabel("token position")
        fig.suptitle(title or f"sample {sample_id}", y=1.0)
        fig.tight_layout(h_pad=0.4)
    return fig


def frame_boundaries(frames: Sequence[int] | None) -> list[int]:
    """Positions where a video's next temporal patch starts (the first token of each frame but the
    first), from per-position frame indices (-1 for non-video tokens)."""
    if frames is None:
        return []
    found, previous = [], -1
    for position, frame in enumerate(frames):
        if frame >= 0 and previous >= 0 and frame != previous:
            found.append(position)
        if frame >= 0:
            previous = frame
    return found


def plot_visual_grid(
    table: pd.DataFrame,
    grid: tuple[int, int] | None = None,
    sample_id: str | None = None,
    layers: Sequence[int] | None = None,
    metrics: Sequence[str] = ("base_entropy", "kl_base_rlvr"),
    image: Any | None = None,
    title: str | None = None,
) -> Figure:
    """The visual tokens' values on the merged image grid, one panel per (metric, layer).

    Each metric row shares one colour scale across its layers, so layers are comparable.

    Args:
        table: Tidy drift table with ``sample_id``, ``layer``, ``position``, ``role`` and metrics.
        grid: Merged grid ``(rows, cols)``; see :func:`infer_grid`.
        sample_id: The sample (default: the first).
        layers: Layers to show (default: up to five, evenly spread).
        metrics: One row per metric.
        image: Optional PIL image (or array) drawn in the first column for reference.
        title: Optional title (default: the sample id).

    Returns:
        The figure.
    """
    sample_id, sub = _one_sample(table, sample_id, metrics)
    visual = sub[sub["role"] == "visual"]
    if not len(visual):
        raise DatasetError(f"sample {sample_id!r} has no visual tokens to lay out")
    available = sorted(int(x) for x in visual["layer"].unique())
    if layers is None:
        idx = np.unique(np.linspace(0, len(available) - 1, min(5, len(available))).round().astype(int))
        layers = [available[i] for i in idx]
    missing = [ly for ly in layers if ly not in available]
    if missing:
        raise ConfigError(f"layers {missing} are not in the drift table (it has {available})")
    n_visual = visual["position"].nunique()
    rows, cols = infer_grid(n_visual, grid)
    offset = 1 if image is not None else 0
    with paper_style():
        n_cols = len(layers) + offset
        panel = min(1.25, (PAGE_WIDTH - 0.6) / n_cols)
        fig, axes = plt.subplots(
            len(metrics),
            n_cols,
            figsize=(PAGE_WIDTH, 0.35 + len(metrics) * panel * rows / cols + 0.3),
            squeeze=False,
            layout="constrained",
        )
        for r, metric in enumerate(metrics):
            grids = []
            for layer in layers:
                values = visual[visual["layer"] == layer].sort_values("position")[metric].to_numpy(float)
                grids.append(values.reshape(rows, cols))
            vmin, vmax = min(g.min() for g in grids), max(g.max() for g in grids)
            if image is not None:
                ax = axes[r][0]
                if r == 0:
                    ax.imshow(np.asarray(image))
                    ax.set_title("image")
                ax.axis("off")
            for c, (layer, values) in enumerate(zip(layers, grids, strict=True)):
                ax = axes[r][c + offset]
                im = ax.imshow(values, cmap=SEQUENTIAL, vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"layer {layer}")
            bar = fig.colorbar(im, ax=list(axes[r][offset:]), fraction=0.03, pad=0.02)
            bar.set_label(METRIC_LABELS.get(metric, metric).replace(" [nats]", "\n[nats]"))
        fig.suptitle(title or f"sample {sample_id}: visual tokens on the {rows}×{cols} merged grid")
    return fig
