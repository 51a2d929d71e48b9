"""Execute every notebook in ``notebooks/`` top to bottom and check the figures it writes.

Each notebook runs in a fresh ``python3`` kernel with ``notebooks/`` as its working directory (as
Jupyter would). Figures and intermediate runs are redirected to a temporary folder through
``REPLAY_LENS_FIGURES`` / ``REPLAY_LENS_RUNS``, so the test leaves the committed ``figures/`` alone;
every figure listed in the notebook's ``metadata["replay_lens"]["figures"]`` must then exist as a
non-empty PDF and PNG.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 900  # generous: the 2 CI cores are shared, and a cell that hangs still fails


def test_every_notebook_is_listed():
    names = [p.stem for p in PATHS]
    assert names == ["01_kl_by_entropy", "02_perturbation", "03_interventions", "04_replay", "05_organism"]


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
