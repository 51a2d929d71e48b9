"""Several twins against one base, and base → SFT → RL stages, in one run (issue 10, items 4-6).

Every model runs forward once per sample; each comparison's numbers must equal those of its own
pair run exactly, and bad model lists are refused with one line before any weight loads.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import lens.loading
from lens import organism
from lens.cli import main
from lens.errors import ConfigError
from lens.logit_lens import LensConfig, multi_lens, pair_lens
from lens.modelset import comparisons_for, label, load_models, organism_sources
from lens.testing import save_checkpoint, tiny_qwen25vl

DRIFT = ["drift", "--items", "4", "--layers", "0,2", "--threads", "1"]
SET_COLUMNS = ["comparison", "reference", "twin"]


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    return code, out, err


def frame_without_set_columns(path: Path, comparison: str) -> str:
    frame = pd.read_csv(path)
    frame = frame[frame["comparison"] == comparison].drop(columns=SET_COLUMNS)
    return frame.to_csv(index=False)


def test_comparison_shapes():
    assert comparisons_for(["b", "a1", "a2"]) == (("b", "a1"), ("b", "a2"))
    assert comparisons_for(["base", "sft", "rl"], "stages") == (
        ("base", "sft"),
        ("sft", "rl"),
        ("base", "rl"),
    )
    assert comparisons_for(["base", "rl"], "stages") == (("base", "rl"),)
    assert label(("sft", "rl")) == "sft→rl"
    with pytest.raises(ConfigError, match="named twice"):
        comparisons_for(["base", "sft", "sft"], "stages")
    with pytest.raises(ConfigError, match="at least two"):
        comparisons_for(["base"])


@pytest.fixture(scope="module")
def organism_set():
    return load_models(organism_sources(["rlvr", "control"]), image_first=organism.IMAGE_FIRST)


def test_multi_lens_equals_each_pair_lens_exactly(organism_set):
    sample = organism.heldout(n=1)[0]
    inputs = organism_set.encode(sample.question, [sample.image], response=sample.response)
    models = organism_set.models
    config = LensConfig(token_chunk=7)  # several chunks per layer
    stages = (("base", "rlvr"), ("base", "control"), ("control", "rlvr"))
    together = multi_lens(models, organism_set.adapter, inputs, stages, config)
    for reference, other in stages:
        alone = pair_lens(models[reference], models[other], organism_set.adapter, inputs, config)
        mine = together[(reference, other)]
        for field in ("base_entropy", "rlvr_entropy", "kl_base_rlvr"):
            assert torch.equal(getattr(mine, field), getattr(alone, field)), (reference, other, field)
    # The stage's reference entropy is its own reference's, not the base's.
    assert torch.equal(together[("control", "rlvr")].base_entropy, together[("base", "control")].rlvr_entropy)


def test_each_model_runs_forward_once_per_sample(organism_set, monkeypatch):
    import lens.logit_lens as ll

    calls: list[int] = []
    real = ll.capture_residuals
    monkeypatch.setattr(
        ll, "capture_residuals", lambda model, *a, **k: calls.append(id(model)) or real(model, *a, **k)
    )
    sample = organism.heldout(n=1)[0]
    inputs = organism_set.encode(sample.question, [sample.image])
    comparisons = comparisons_for(list(organism_set.models), "stages")  # 3 comparisons, 3 models
    multi_lens(organism_set.models, organism_set.adapter, inputs, comparisons)
    assert sorted(calls) == sorted(id(m) for m in organism_set.models.values())


def test_two_twins_in_one_run_equal_two_pair_runs(tmp_path, capfd):
    for twin in ("rlvr", "control"):
        assert run_cli([*DRIFT, "--rlvr", twin, "--out", str(tmp_path / twin)], capfd)[0] == 0
    code, out, _ = run_cli(
        [*DRIFT, "--rlvr", "rlvr", "--rlvr", "control", "--out", str(tmp_path / "set")], capfd
    )
    assert code == 0 and "base→control" in out
    for twin in ("rlvr", "control"):
        for table in ("drift_buckets.csv", "drift_spearman.csv"):
            alone = pd.read_csv(tmp_path / twin / table).to_csv(index=False)
            assert frame_without_set_columns(tmp_path / "set" / table, f"base→{twin}") == alone, (twin, table)
    assert (tmp_path / "set" / "kl_by_entropy.png").stat().st_size > 0
    # Sharded like any run: two --shard jobs merge to the same tables.
    for index in (1, 0):
        argv = [
            *DRIFT,
            "--rlvr",
            "rlvr",
            "--rlvr",
            "control",
            "--out",
            str(tmp_path / "sh"),
            "--shard",
            f"{index}/2",
        ]
        assert run_cli(argv, capfd)[0] == 0
    for table in ("drift_buckets.csv", "drift_spearman.csv"):
        assert (tmp_path / "sh" / table).read_bytes() == (tmp_path / "set" / table).read_bytes()


def test_stages_compare_consecutive_pairs_and_first_with_last(tmp_path, capfd):
    base, sft, rl = (organism.model_dir(n) for n in ("base", "control", "rlvr"))
    code, out, _ = run_cli(
        [*DRIFT, "--models", f"base={base}", f"sft={sft}", f"rl={rl}", "--out", str(tmp_path / "s")], capfd
    )
    assert code == 0
    buckets = pd.read_csv(tmp_path / "s" / "drift_buckets.csv")
    assert list(dict.fromkeys(buckets["comparison"])) == ["base→sft", "sft→rl", "base→rl"]
    # sft→rl is bucketed by the SFT model's entropy: the same as a pair run with the SFT model as base.
    assert (
        run_cli([*DRIFT, "--base", str(sft), "--rlvr", str(rl), "--out", str(tmp_path / "p")], capfd)[0] == 0
    )
    alone = pd.read_csv(tmp_path / "p" / "drift_buckets.csv").to_csv(index=False)
    assert frame_without_set_columns(tmp_path / "s" / "drift_buckets.csv", "sft→rl") == alone


@pytest.fixture(scope="module")
def other_shape_dir(tmp_path_factory, tok, image_processor):
    """A Qwen2.5-VL twin whose hidden size differs from the organism's: not comparable."""
    folder = tmp_path_factory.mktemp("wide") / "wide_twin"
    return save_checkpoint(tiny_qwen25vl(tok, seed=3, hidden_size=96), tok, folder, image_processor)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--rlvr", "rlvr", "--rlvr", "rlvr"], "'rlvr' is given twice"),
        (["--rlvr", "rlvr", "--rlvr", "nephew"], "unknown organism twin 'nephew'"),
        (["--models", "base=/x", "base=/y"], "names stage 'base' twice"),
        (["--models", "base"], "use NAME=DIR"),
        (["--rlvr", "rlvr", "--models", "a=/x", "b=/y"], "leave out --base and --rlvr"),
    ],
)
def test_bad_model_lists_are_one_line_before_loading(extra, fragment, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(lens.loading, "load_pair", lambda *a, **k: pytest.fail("loaded weights"))
    code, _, err = run_cli([*DRIFT, *extra, "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_an_incomparable_twin_is_named_before_loading(vl_dirs, other_shape_dir, tmp_path, capfd, monkeypatch):
    import lens.modelset

    monkeypatch.setattr(lens.modelset, "load_models", lambda *a, **k: pytest.fail("loaded weights"))
    argv = [*DRIFT, "--base", str(vl_dirs[0]), "--rlvr", str(vl_dirs[1]), "--rlvr", str(other_shape_dir)]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o")], capfd)
    assert code == 2 and f"'{other_shape_dir.name}' against" in err and "hidden size differs" in err, err
    assert not (tmp_path / "o").exists()


def test_eval_of_two_twins_decodes_the_base_once_and_equals_pair_evals(tmp_path, capfd):
    import json

    argv = ["eval", "--items", "5", "--n", "2", "--k", "1,2", "--threads", "1"]
    code, out, _ = run_cli(
        [*argv, "--rlvr", "rlvr", "--rlvr", "control", "--out", str(tmp_path / "set")], capfd
    )
    assert code == 0 and "control  greedy_pass@1" in out
    keys = [
        json.loads(line)["sample_id"]
        for line in (tmp_path / "set" / "records.jsonl").read_text().splitlines()
    ]
    assert len(keys) == len(set(keys)) == 15  # base once, then each twin: 3 x 5 items
    together = pd.read_csv(tmp_path / "set" / "per_item.csv")
    for twin in ("rlvr", "control"):
        assert run_cli([*argv, "--rlvr", twin, "--out", str(tmp_path / twin)], capfd)[0] == 0
        alone = pd.read_csv(tmp_path / twin / "per_item.csv")
        alone["model"] = alone["model"].replace({"rlvr": twin})
        for model in ("base", twin):
            mine = together[together["model"] == model].reset_index(drop=True)
            theirs = alone[alone["model"] == model].reset_index(drop=True)
            pd.testing.assert_frame_equal(mine, theirs, check_like=True)


def test_replay_and_intervene_take_several_twins_one_folder_each(tmp_path, capfd):
    argv = ["--rlvr", "rlvr", "--rlvr", "control", "--items", "2", "--n", "0", "--threads", "1"]
    code, out, _ = run_cli(["replay", *argv, "--out", str(tmp_path / "r")], capfd)
    assert code == 0 and "base → control" in out
    ablation = pd.read_csv(tmp_path / "r" / "ablation.csv")
    assert list(dict.fromkeys(ablation["comparison"])) == ["base→rlvr", "base→control"]
    for twin in ("rlvr", "control"):
        mine = ablation[ablation["twin"] == twin].drop(columns=SET_COLUMNS).reset_index(drop=True)
        theirs = pd.read_csv(tmp_path / "r" / twin / "ablation.csv")
        pd.testing.assert_frame_equal(mine, theirs)
    code, _, err = run_cli(["intervene", *argv, "--shard", "0/2", "--out", str(tmp_path / "i")], capfd)
    assert code == 2 and "one --rlvr per sharded run" in err and not (tmp_path / "i").exists()


def test_each_comparisons_tidy_table_is_keyed_by_sample(organism_set, tmp_path):
    from analyses.set_drift import run_set_drift

    samples = organism.heldout(n=2)
    result = run_set_drift(organism_set, samples, tmp_path / "o")
    table = result.tidy["base→control"]
    assert table.sample_ids == [s.id for s in samples]
    assert len(table.select([samples[1].id]).to_pandas()) > 0
