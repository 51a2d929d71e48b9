"""Plot functions on edge-case tables found while building the notebooks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lens.plot.drift import plot_kl_by_entropy
from lens.plot.perturbation import plot_perturbation
from lens.plot.style import save_figure


def test_perturbation_plot_with_no_finite_drift(tmp_path):
    # An empty low-entropy mask gives NaN drift for every point; the plot must still be written.
    rows = [
        {"sample_id": f"s{i}", "noise_kind": kind, "sigma": sigma, "answer_kind": answer,
         "ppl": 2.0 + i, "kl_low_entropy": np.nan}
        for i in range(3) for kind in ("pixel", "embedding") for sigma in (0.0, 0.4)
        for answer in ("correct", "incorrect")
    ]  # fmt: skip
    fig = plot_perturbation(pd.DataFrame(rows))
    for path in save_figure(fig, tmp_path / "perturbation"):
        assert path.stat().st_size > 0


def test_kl_by_entropy_labels_the_twin_generically_with_comparisons():
    rows = [
        {"token_group": "visual", "scope": "pooled", "bucket": b, "mean_kl": 0.1 * b,
         "ci_low": 0.05 * b, "ci_high": 0.15 * b, "n": 10, "layer": np.nan, "comparison": c}
        for b in (1, 2) for c in ("base → rlvr", "base → control")
    ]  # fmt: skip
    fig = plot_kl_by_entropy(pd.DataFrame(rows))
    assert "twin" in fig.axes[0].get_ylabel()
    fig = plot_kl_by_entropy(pd.DataFrame(rows).drop(columns="comparison"))
    assert "rlvr" in fig.axes[0].get_ylabel()


def test_save_figure_applies_the_style_resolution_outside_the_style_block(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(2.0, 1.0))
    fig.add_subplot().set_xlabel("a label that must not be cropped")
    _, png = save_figure(fig, tmp_path / "fig")
    width, _ = Image.open(png).size
    assert width >= 2.0 * 300 * 0.8  # ~300 dpi, not matplotlib's default 100
