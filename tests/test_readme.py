"""The README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if b.startswith("import lens\nfrom lens import organism"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert set(namespace["inputs"].roles) == {"template", "prompt", "visual", "response"}
    assert namespace["result"].kl_base_rlvr.shape[0] == namespace["pair"].n_layers
    assert (tmp_path / "runs" / "drift_api" / "kl_by_entropy.png").stat().st_size > 0
