"""`lens reproduce` end to end on the organism, at a tiny scale."""

from __future__ import annotations

import json

import pytest

from analyses.reproduce import ReproduceConfig, run_reproduce
from lens.errors import ConfigError


def test_reproduce_writes_a_complete_report(tmp_path):
    config = ReproduceConfig(eval_n=4, n=2).scaled(0.01)  # 2 items per stage
    report = run_reproduce(tmp_path, config, progress=False, log=lambda _: None)
    text = report.read_text()
    for heading in ("## 1. KL drift", "## 2. Greedy pass@1", "## 3. Interventions", "## 4. Activation Replay",
                    "## 5. Perturbation", "## Settings, seeds and versions"):  # fmt: skip
        assert heading in text
    # Every figure the report links exists.
    for line in text.splitlines():
        if line.startswith("!["):
            assert (tmp_path / line.split("](")[1].rstrip(")")).stat().st_size > 0
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["config"]["mask_rule"] == "quantile"
    assert set(settings["timings_s"]) == {"drift", "eval", "interventions", "replay_grid", "perturbation"}
    assert settings["versions"]["torch"] != "not installed"
    # A second run resumes: every stage's records are reused, none is written twice.
    before = (tmp_path / "interventions" / "records.jsonl").read_text()
    run_reproduce(tmp_path, config, progress=False, log=lambda _: None)
    assert (tmp_path / "interventions" / "records.jsonl").read_text() == before


@pytest.mark.parametrize("kwargs", [{"drift_items": 0}, {"n": 0}, {"mask_rule": "median"}, {"quantile": 1.5}])
def test_reproduce_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        ReproduceConfig(**kwargs)


def test_reproduce_cli_bad_input_is_one_line(capsys):
    from lens.cli import main

    assert main(["reproduce", "--pair", "llava", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "known pairs: organism" in err[0]
    assert main(["reproduce", "--scale", "0", "--out", "unused"]) == 2
