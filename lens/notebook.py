"""Shared set-up of the figure notebooks in ``notebooks/``.

Each notebook starts with::

    from lens.notebook import setup

    session = setup("01_kl_by_entropy")
    RUN, save = session.run, session.save

which finds the repository root (the first folder at or above the working directory holding
``pyproject.toml``), points figures at ``<root>/figures`` (or ``$REPLAY_LENS_FIGURES``) and
intermediate runs at ``<root>/runs/notebooks/<name>`` (or ``$REPLAY_LENS_RUNS/<name>``), which it
empties first so that re-running gives the same numbers. ``tests/test_notebooks.py`` sets both
variables so that executing a notebook in CI leaves the committed ``figures/`` alone.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lens.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURES_ENV = "REPLAY_LENS_FIGURES"
RUNS_ENV = "REPLAY_LENS_RUNS"
# A notebook name becomes a folder that setup() deletes: keep it a single plain path component.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def find_root(start: Path) -> Path:
    """The repository root: the first folder at or above ``start`` holding ``pyproject.toml``.

    Raises:
        ConfigError: no folder at or above ``start`` holds ``pyproject.toml``.
    """
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise ConfigError(f"no pyproject.toml at or above {start}: run the notebook inside the repository")


@dataclass(frozen=True)
class NotebookSession:
    """Where one notebook writes its figures and runs, and when it started.

    Attributes:
        name: the notebook's name, e.g. ``"01_kl_by_entropy"``.
        root: the repository root.
        figures: the folder figures are written to.
        run: this notebook's own folder for intermediate runs (emptied by :func:`setup`).
        started: ``time.perf_counter()`` at set-up.
    """

    name: str
    root: Path
    figures: Path
    run: Path
    started: float

    def save(self, fig: Figure, stem: str, width: int = 720) -> None:
        """Write ``figures/<stem>.pdf`` and ``.png``, close ``fig`` and show the PNG inline."""
        import matplotlib.pyplot as plt
        from IPython.display import Image, display

        from lens.plot.style import save_figure

        pdf, png = save_figure(fig, self.figures / stem)
        plt.close(fig)
        print(f"wrote {pdf.relative_to(self.figures.parent)} and {png.name}")
        display(Image(filename=str(png), width=width))

    def finish(self) -> None:
        """Print how long the notebook ran."""
        print(f"notebook ran in {time.perf_counter() - self.started:.0f} s")


def setup(name: str, *, start: Path | None = None, threads: int = 2) -> NotebookSession:
    """Prepare a figure notebook: quiet output, CPU threads, the figure folder and a fresh run folder.

    Args:
        name: the notebook's name; its run folder is ``<runs>/<name>``.
        start: where to look for the repository root (default: the working directory, which Jupyter
            and nbclient set to the notebook's folder).
        threads: torch CPU threads; the organism is tiny, so more threads only add overhead on a
            shared CPU.

    Raises:
        ConfigError: ``name`` is not a plain file name, or no repository root is found.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"notebook name must be a plain file name such as '01_kl_by_entropy', got {name!r}")
    root = find_root(start if start is not None else Path.cwd())

    import pandas as pd
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the outputs
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    pd.set_option("display.width", 160)

    figures = Path(os.environ.get(FIGURES_ENV, root / "figures"))
    run = Path(os.environ.get(RUNS_ENV, root / "runs" / "notebooks")) / name
    figures.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run, ignore_errors=True)  # a fresh run each time, so re-execution is deterministic
    return NotebookSession(name=name, root=root, figures=figures, run=run, started=time.perf_counter())
