"""The README's "Your own pair on a real benchmark" block runs as written.

The block's variables are set to the organism (``BASE=organism RLVR=rlvr DEVICE=cpu``) and to a
VLMEvalKit-format TSV (base64 PNG images) made from organism items; every ``lens`` line is then run
through the real CLI, exactly as the README spells it.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from lens import organism
from lens.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Your own pair on a real benchmark"


def readme_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, "the README lost its real-benchmark section"
    section = text.split(SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def organism_tsv(path: Path, n: int) -> Path:
    """A VLMEvalKit TSV (index, image as base64, question, answer, category) of organism items."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["index", "image", "question", "answer", "category"])
        for index, item in enumerate(organism.heldout(n)):
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")
            writer.writerow(
                [index, base64.b64encode(buffer.getvalue()).decode(), item.question, item.answer, item.qtype]
            )
    return path


@pytest.mark.slow
def test_readme_benchmark_block_runs_as_written(tmp_path, monkeypatch, capsys):
    lines = readme_block()
    assignments = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z]+=", line))
    commands = [line for line in lines if line.startswith("lens ")]
    assert set(assignments) == {"BASE", "RLVR", "DATA", "DEVICE", "OUT"}
    assert [c.split()[1] for c in commands] == ["eval", "replay"]
    env = {
        "BASE": "organism",
        "RLVR": "rlvr",
        "DATA": str(organism_tsv(tmp_path / "MathVista_MINI.tsv", 3)),
        "DEVICE": "cpu",
        "OUT": str(tmp_path / "runs"),
    }
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in commands:
        argv = shlex.split(os.path.expandvars(command))[1:]
        assert main(argv) == 0, command
    out = tmp_path / "runs"
    evaluation = pd.read_csv(out / "eval" / "per_item.csv")
    assert sorted(set(evaluation["model"])) == ["base", "rlvr"] and len(evaluation) == 6
    # Every row shows what the scorer read and which verifier decided (organism items: organism).
    assert set(evaluation["verifier"]) == {"organism"} and "extracted" in evaluation
    assert (out / "eval" / "table.md").exists() and (out / "eval" / "differences.csv").exists()
    ablation = pd.read_csv(out / "replay" / "ablation.csv")
    assert len(ablation) == 1 and {"greedy_pass@1", "delta_vs_rlvr"} <= set(ablation.columns)
    settings = (out / "replay" / "records.settings.json").read_text()
    assert '"prompt": "mm-eureka"' in settings and '"repetition_penalty": 1.0' in settings
