"""The intervention and replay-grid runners: tables, plots and exactly-once resume."""

from __future__ import annotations

import json

import pytest
from intervention_fixtures import image, tiny_pair

import analyses.intervention as runner
from analyses.intervention import InterventionRunConfig, run_interventions
from analyses.replay import ReplayGrid, run_replay_grid
from lens.datasets import Sample
from lens.errors import ConfigError


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(num_layers=3)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    out = []
    for i in range(3):
        path = folder / f"{i}.png"
        image(seed=i, side=56).save(path)
        out.append(Sample(id=f"s{i}", question="how many red shapes ?", images=(path,), answer=str(i)))
    return out


CONFIG = InterventionRunConfig(layers=(0, 1), steps=3, topk=5, n=2, ks=(1, 2), max_new_tokens=3, n_boot=200)


def test_runner_resumes_exactly_once(pair, samples, tmp_path, monkeypatch):
    original = runner.run_item
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_item", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_interventions(pair, samples, tmp_path, CONFIG)
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 4
    calls["n"] = 0
    monkeypatch.setattr(
        runner, "run_item", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), original(*a, **k))[1]
    )
    result = run_interventions(pair, samples, tmp_path, CONFIG)
    n_total = len(samples) * len(CONFIG.strategies)
    assert calls["n"] == n_total - 4
    keys = [json.loads(line)["sample_id"] for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == n_total
    assert len(result.per_item) == n_total
    summary = result.summary
    assert set(summary["strategy"]) == set(CONFIG.strategies)
    assert {"greedy_pass@1", "pass@k"} == set(summary["metric"])
    assert summary[summary["strategy"] != "rlvr"]["delta_vs_rlvr"].notna().all()
    for name in ("per_item.csv", "summary.csv", "pass_at_k.png", "pass_at_k.pdf"):
        assert (tmp_path / name).is_file()
    replay_rows = result.per_item[result.per_item["strategy"] == "replay"]
    assert all(len(losses) == 3 for losses in replay_rows["losses"])
    # A third run does no work at all.
    calls["n"] = 0
    run_interventions(pair, samples, tmp_path, CONFIG)
    assert calls["n"] == 0


def test_replay_grid(pair, samples, tmp_path):
    grid = ReplayGrid(taus=(0.2, 0.4), alphas=(10.0, 40.0))
    result = run_replay_grid(pair, samples[:2], tmp_path, grid, CONFIG)
    assert len(result.ablation) == 4
    assert set(result.ablation["tau"]) == {0.2, 0.4} and set(result.ablation["alpha"]) == {10.0, 40.0}
    assert result.losses["step"].max() == 3
    for name in ("ablation.csv", "replay_losses.csv", "ablation_heatmap.png", "replay_loss.png"):
        assert (tmp_path / name).is_file()


def test_quantile_rule_reaches_every_strategy_and_the_grid(pair, samples, tmp_path):
    from dataclasses import replace

    from lens.plot.interventions import plot_ablation_heatmap

    config = replace(CONFIG, mask_rule="quantile", quantile=0.3)
    hard = runner.make_intervention("hard-low", config, pair.n_layers)
    replay = runner.make_intervention("replay-high", config, pair.n_layers)
    assert (hard.config.rule, hard.config.quantile) == ("quantile", 0.3)
    assert (replay.config.rule, replay.config.quantile, replay.config.select) == ("quantile", 0.3, "high")
    grid = ReplayGrid(taus=(0.4,), alphas=(10.0,), quantiles=(0.2, 0.5))
    result = run_replay_grid(pair, samples[:1], tmp_path, grid, config)
    assert set(result.ablation["quantile"]) == {0.2, 0.5} and "tau" not in result.ablation
    assert set(result.ablation["rule"]) == {"quantile"}
    assert (result.per_item.loc[result.per_item["strategy"] == "replay", "first_loss"] > 0).all()
    fig = plot_ablation_heatmap(result.ablation)
    assert fig.axes[0].get_ylabel() == "q (mask quantile)"
    assert (
        plot_ablation_heatmap(result.ablation.rename(columns={"quantile": "tau"}))
        .axes[0]
        .get_ylabel()
        .startswith("τ")
    )


def test_bad_config():
    with pytest.raises(ConfigError):
        InterventionRunConfig(strategies=("nope",))
    with pytest.raises(ConfigError):
        InterventionRunConfig(n=2, ks=(4,))
    with pytest.raises(ConfigError):
        ReplayGrid(taus=(0.0,))
    with pytest.raises(ConfigError):
        ReplayGrid(alphas=(-1.0,))
    with pytest.raises(ConfigError, match="quantile"):
        ReplayGrid(quantiles=(1.0,))
    with pytest.raises(ConfigError, match="mask rule"):
        InterventionRunConfig(mask_rule="fixed")
    with pytest.raises(ConfigError, match="quantile"):
        InterventionRunConfig(mask_rule="quantile", quantile=0.0)


def test_cli_handlers_parse_and_reject_bad_input(tmp_path):
    import argparse

    from lens.commands import intervene, replay

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    intervene.register(sub)
    replay.register(sub)
    args = parser.parse_args(["replay", "--grid", "--taus", "0.2,x", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="taus"):
        args.handler(args)
    args = parser.parse_args(["intervene", "--strategies", "rlvr,bogus", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="bogus"):
        args.handler(args)
    args = parser.parse_args(["intervene", "--alpha", "0", "--out", str(tmp_path)])
    assert args.alpha == 0.0 and args.steps == 25 and args.items is None and args.n == 8
