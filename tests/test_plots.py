"""Every plot function writes a non-empty PDF and PNG; ``lens plot`` draws from CSVs and refuses bad input."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lens.errors import ConfigError, DatasetError
from lens.plot.heatmaps import infer_grid, plot_layer_token_heatmaps, plot_visual_grid
from lens.plot.perturbation import plot_perturbation
from lens.plot.style import save_figure
from lens.plot.training import plot_replay_loss


def drift_table() -> pd.DataFrame:
    """Two samples, 4 layers, 30 positions: 16 visual (a 4x4 grid), then prompt and response."""
    rng = np.random.default_rng(0)
    roles = ["template"] * 3 + ["visual"] * 16 + ["prompt"] * 6 + ["template"] * 2 + ["response"] * 3
    rows = []
    for sid in ("a", "b"):
        for layer in range(4):
            for pos, role in enumerate(roles):
                entropy = rng.uniform(0.5, 4)
                rows.append(
                    {
                        "sample_id": sid,
                        "layer": layer,
                        "position": pos,
                        "role": role,
                        "base_entropy": entropy,
                        "rlvr_entropy": entropy + rng.normal(0, 0.3),
                        "kl_base_rlvr": rng.exponential(1 / entropy),
                    }
                )
    return pd.DataFrame(rows)


def perturb_table() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for sid in range(5):
        for kind in ("pixel", "embedding"):
            for sigma in (0.0, 0.1, 0.4):
                drift = 0.05 + sigma + rng.uniform(0, 0.05)
                for answer, sign in (("correct", 1), ("incorrect", -1)):
                    rows.append(
                        {
                            "sample_id": f"s{sid}",
                            "noise_kind": kind,
                            "sigma": sigma,
                            "answer_kind": answer,
                            "kl_low_entropy": drift,
                            "ppl": float(np.exp(1 + sign * drift + rng.normal(0, 0.1))),
                        }
                    )
    return pd.DataFrame(rows)


def loss_table() -> pd.DataFrame:
    rows = []
    for setting, rate in (("τ=0.4, α=10", 0.2), ("τ=0.2, α=40", 0.4)):
        for sid in range(4):
            for step in range(25):
                rows.append(
                    {
                        "sample_id": sid,
                        "step": step,
                        "loss": (1 + sid) * np.exp(-rate * step),
                        "setting": setting,
                    }
                )
    return pd.DataFrame(rows)


def _check_written(fig, path) -> None:
    written = save_figure(fig, path)
    plt.close(fig)
    assert sorted(p.suffix for p in written) == [".pdf", ".png"]
    for p in written:
        assert p.stat().st_size > 1000
    assert written[0].read_bytes()[:4] == b"%PDF"


def test_each_plot_function_writes_pdf_and_png(tmp_path):
    from analyses.perturbation import correlation_table

    table = drift_table()
    _check_written(plot_layer_token_heatmaps(table, sample_id="b"), tmp_path / "heat")
    image = Image.new("RGB", (64, 64), (20, 20, 24))
    _check_written(plot_visual_grid(table, (4, 4), layers=[0, 3], image=image), tmp_path / "grid")
    perturb = perturb_table()
    _check_written(plot_perturbation(perturb, correlation_table(perturb, n_boot=50)), tmp_path / "pert")
    _check_written(plot_replay_loss(loss_table()), tmp_path / "loss")
    _check_written(plot_replay_loss(loss_table().drop(columns="setting"), relative=True), tmp_path / "rel")


def test_grid_inference_and_errors():
    assert infer_grid(16) == (4, 4)
    assert infer_grid(6, (2, 3)) == (2, 3)
    with pytest.raises(ConfigError, match="square"):
        infer_grid(6)
    with pytest.raises(ConfigError, match="holds"):
        infer_grid(16, (2, 3))
    with pytest.raises(DatasetError, match="not in the drift table"):
        plot_layer_token_heatmaps(drift_table(), sample_id="zzz")
    with pytest.raises(ConfigError, match="not in the drift table"):
        plot_visual_grid(drift_table(), layers=[7])
    with pytest.raises(DatasetError, match="lacks the columns"):
        plot_replay_loss(pd.DataFrame({"step": [0], "loss": [1.0]}))


@pytest.fixture
def cli():
    from lens import cli as cli_module

    return cli_module


def test_lens_plot_happy_path(cli, tmp_path, capsys):
    from analyses.kl_drift import bucket_table

    table = drift_table()
    table.to_csv(tmp_path / "drift_table.csv", index=False)
    table["token_group"] = np.where(table["role"] == "visual", "visual", "text")
    bucket_table(table).to_csv(tmp_path / "drift_buckets.csv", index=False)
    perturb_table().to_csv(tmp_path / "perturb_table.csv", index=False)
    loss_table().to_csv(tmp_path / "replay_loss.csv", index=False)
    # The interventions' CSVs: per-step mean replay losses, pass@k summary and the τ × α ablation.
    means = pd.DataFrame(
        {
            "setting": ["r[a]"] * 3 + ["r[b]"] * 3,
            "tau": [0.4] * 3 + [0.2] * 3,
            "alpha": [10.0] * 3 + [40.0] * 3,
            "step": [0, 1, 2] * 2,
            "mean_loss": [1.0, 0.5, 0.2, 1.0, 0.3, 0.05],
        }
    )
    means.to_csv(tmp_path / "replay_losses.csv", index=False)
    pd.DataFrame(
        {
            "strategy": ["rlvr"] * 3,
            "metric": ["pass@k"] * 3,
            "k": [1, 2, 4],
            "value": [0.4, 0.5, 0.6],
            "ci_low": [0.3, 0.4, 0.5],
            "ci_high": [0.5, 0.6, 0.7],
        }
    ).to_csv(tmp_path / "summary.csv", index=False)
    pd.DataFrame(
        {
            "tau": [0.2, 0.2, 0.4, 0.4],
            "alpha": [10, 40, 10, 40],
            "greedy_pass@1": [0.5, 0.6, 0.55, 0.5],
            "delta_vs_rlvr": [0.01, 0.02, -0.01, 0.0],
            "delta_ci_low": [-0.01] * 4,
            "delta_ci_high": [0.03] * 4,
        }
    ).to_csv(tmp_path / "ablation.csv", index=False)
    for kind, results, extra in (
        ("kl-by-entropy", "drift_buckets.csv", []),
        ("heatmap", "drift_table.csv", ["--sample", "a"]),
        ("heatmap-grid", "drift_table.csv", ["--grid", "4x4", "--layers", "0,2"]),
        ("perturbation", "perturb_table.csv", []),
        ("replay-loss", "replay_loss.csv", ["--title", "replay"]),
        ("replay-loss", "replay_losses.csv", []),
        ("passk", "summary.csv", []),
        ("ablation", "ablation.csv", []),
    ):
        out = tmp_path / f"{kind}-{results}.pdf"  # a dotted stem must survive
        assert cli.main(["plot", kind, str(tmp_path / results), "--out", str(out), *extra]) == 0, kind
        assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_lens_plot_bad_input_is_one_line(cli, tmp_path, capsys):
    perturb_table().to_csv(tmp_path / "perturb_table.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    cases = [
        (["plot", "scatter", str(tmp_path / "perturb_table.csv")], "unknown plot kind"),
        (["plot", "heatmap", str(tmp_path / "missing.csv")], "not found"),
        (["plot", "heatmap", str(tmp_path / "empty.csv")], "cannot read"),
        (["plot", "heatmap", str(tmp_path / "perturb_table.csv")], "lacks the columns"),
        (["plot", "kl-by-entropy", str(tmp_path / "perturb_table.csv")], "does not look like"),
    ]
    for argv, message in cases:
        assert cli.main([*argv, "--out", str(tmp_path / "x.png")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_greedy_by_strategy_draws_each_strategy_and_refuses_a_sampled_only_table(tmp_path):
    from lens.plot.interventions import plot_greedy_by_strategy

    summary = pd.DataFrame(
        {
            "strategy": ["rlvr", "hard-low", "pti", "rlvr"],
            "metric": ["greedy_pass@1", "greedy_pass@1", "greedy_pass@1", "pass@k"],
            "value": [0.45, 0.42, 0.17, 0.5],
            "ci_low": [0.3, 0.28, 0.07, 0.4],
            "ci_high": [0.6, 0.57, 0.3, 0.6],
            "delta_vs_rlvr": [np.nan, -0.025, -0.275, np.nan],
            "delta_ci_low": [np.nan, -0.075, -0.425, np.nan],
            "delta_ci_high": [np.nan, 0.0, -0.1, np.nan],
        }
    )
    fig = plot_greedy_by_strategy(summary, title="t")
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()] == ["rlvr", "hard-low", "pti"]
    assert [round(p.get_width(), 3) for p in left.patches] == [0.45, 0.42, 0.17]
    assert sorted(round(float(x), 3) for x in right.lines[0].get_xdata()) == [-0.275, -0.025]  # none for rlvr
    assert save_figure(fig, tmp_path / "g")
    plt.close(fig)
    with pytest.raises(DatasetError, match="no greedy_pass@1"):
        plot_greedy_by_strategy(summary[summary.metric == "pass@k"])
