"""The notebooks in ``notebooks/``: jupytext pairs in sync, committed without outputs, executable.

Every notebook is a jupytext pair: ``0N_name.py`` (percent format, the source people edit) and
``0N_name.ipynb`` (committed without outputs). The sync test reads both with jupytext and fails,
naming the notebook, when their cells or figure lists differ.

Each notebook runs in a fresh ``python3`` kernel with ``notebooks/`` as its working directory (as
Jupyter would). Figures and intermediate runs are redirected to a temporary folder through
``REPLAY_LENS_FIGURES`` / ``REPLAY_LENS_RUNS``, so the test leaves the committed ``figures/`` alone;
every figure listed in the notebook's ``metadata["replay_lens"]["figures"]`` must then exist as a
non-empty PDF and PNG.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from lens.errors import ConfigError
from lens.notebook import find_root, setup

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
SCRIPTS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
PAIRING = "ipynb,py:percent"
CELL_TIMEOUT_S = 900  # generous: the 2 CI cores are shared, and a cell that hangs still fails


def test_every_notebook_is_listed():
    names = [p.stem for p in PATHS]
    assert names == [
        "01_kl_by_entropy",
        "02_perturbation",
        "03_interventions",
        "04_replay",
        "05_organism",
        "06_controls",
        "07_video",
    ]
    assert [p.stem for p in SCRIPTS] == names, "every notebook needs both its .py and its .ipynb"


def _inputs(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def out_of_sync(ipynb: Path) -> str | None:
    """Why ``ipynb`` and its paired percent script differ, or None when they hold the same notebook."""
    script = ipynb.with_suffix(".py")
    if not script.is_file():
        return f"{ipynb.name} has no paired {script.name}"
    text = jupytext.read(script)
    notebook = jupytext.read(ipynb)
    for name, nb in ((script.name, text), (ipynb.name, notebook)):
        if nb.metadata.get("jupytext", {}).get("formats") != PAIRING:
            return f"{name} is not paired as {PAIRING!r}"
    if text.metadata.get("jupytext", {}).get("text_representation", {}).get("format_name") != "percent":
        return f"{script.name} is not in the percent format"
    if text.metadata.get("replay_lens") != notebook.metadata.get("replay_lens"):
        return "the figure lists (metadata replay_lens) differ"
    a, b = _inputs(text), _inputs(notebook)
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return f"cell {first} differs ({len(a)} cells in the .py, {len(b)} in the .ipynb)"
    return None


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_pair_in_sync(path: Path):
    reason = out_of_sync(path)
    assert reason is None, (
        f"notebook {path.stem} is out of sync: {reason}; run "
        f"`jupytext --sync notebooks/{path.stem}.py` (the more recently modified file of the pair wins)"
    )


def test_sync_check_sees_an_edit(tmp_path: Path):
    source = PATHS[0]
    for suffix in (".ipynb", ".py"):
        (tmp_path / source.with_suffix(suffix).name).write_bytes(source.with_suffix(suffix).read_bytes())
    copy, script = tmp_path / source.name, tmp_path / f"{source.stem}.py"
    n = len(nbformat.read(copy, as_version=4).cells)
    assert out_of_sync(copy) is None

    original = script.read_text(encoding="utf-8")
    script.write_text(original.replace("session.finish()", "session.finish()  # edited"), encoding="utf-8")
    assert out_of_sync(copy) == f"cell {n - 1} differs ({n} cells in the .py, {n} in the .ipynb)"
    script.write_text(original + "\n# %%\nprint('an extra cell')\n", encoding="utf-8")
    assert out_of_sync(copy) == f"cell {n} differs ({n + 1} cells in the .py, {n} in the .ipynb)"
    script.unlink()
    assert out_of_sync(copy) == f"{copy.name} has no paired {script.name}"


def test_setup_finds_the_root_and_empties_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    inner = tmp_path / "notebooks" / "sub"
    inner.mkdir(parents=True)
    assert find_root(inner) == tmp_path
    monkeypatch.delenv("REPLAY_LENS_FIGURES", raising=False)
    monkeypatch.setenv("REPLAY_LENS_RUNS", str(tmp_path / "runs"))
    stale = tmp_path / "runs" / "07_x" / "old.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}", encoding="utf-8")

    import pandas as pd
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    try:
        session = setup("07_x", start=inner, threads=torch.get_num_threads())
    finally:  # setup() sets process-wide display options: give the other tests theirs back
        pd.reset_option("display.width")
        if bars:
            hf_logging.enable_progress_bar()
    assert (session.root, session.figures, session.run) == (tmp_path, tmp_path / "figures", tmp_path / "runs" / "07_x")
    assert session.figures.is_dir() and not session.run.exists()

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    session.save(fig, "07_line")
    assert all((tmp_path / "figures" / f"07_line{s}").stat().st_size > 0 for s in (".pdf", ".png"))


@pytest.mark.parametrize("name", ["", "..", "../figures", "a/b", ".hidden"])
def test_setup_rejects_a_name_that_is_not_a_plain_file_name(name: str, tmp_path: Path):
    with pytest.raises(ConfigError, match="plain file name"):
        setup(name, start=tmp_path)


def test_find_root_without_pyproject_is_one_clear_error():
    with pytest.raises(ConfigError, match="no pyproject.toml"):
        find_root(Path("/"))


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"
    assert nb.metadata["replay_lens"]["figures"], f"{path.name} lists no figures"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("REPLAY_LENS_FIGURES", str(figures))
    monkeypatch.setenv("REPLAY_LENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports this checkout's lens/analyses, not whichever copy is installed (a worktree).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
    print(f"{path.name} executed in {time.perf_counter() - start:.1f} s")
    for stem in nb.metadata["replay_lens"]["figures"]:
        for suffix in (".pdf", ".png"):
            target = figures / f"{stem}{suffix}"
            assert target.is_file(), f"{path.name} did not write {target.name}"
            assert target.stat().st_size > 0, f"{path.name} wrote an empty {target.name}"
