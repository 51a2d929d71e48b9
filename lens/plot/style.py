"""One figure style for every plot: paper-ready sizes, a colour-blind-safe palette, PDF + PNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lens.records import atomic_write  # noqa: E402

#: Okabe & Ito's palette, distinguishable under the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
#: Widths in inches of one and two columns of a two-column paper (CVPR/NeurIPS-like).
COLUMN_WIDTH = 3.35
PAGE_WIDTH = 6.9
#: Sequential colormap for layer index and heatmaps (perceptually uniform, colour-blind safe).
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"

RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "lines.linewidth": 1.2,
    "pdf.fonttype": 42,  # embed TrueType so text stays editable in the PDF
    "ps.fonttype": 42,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Apply the replay-lens style within a block."""
    with plt.rc_context(RC):
        yield


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Save ``fig`` as vector PDF and PNG next to each other (``path`` without or with a suffix)."""
    base = Path(path)
    if base.suffix.lower() in {".png", ".pdf"}:
        base = base.with_suffix("")
    written = []
    for suffix in (".pdf", ".png"):
        # Append rather than with_suffix: "fig.v2" must give "fig.v2.pdf", not "fig.pdf".
        target = base.with_name(base.name + suffix)
        # The style's savefig settings (300 dpi, tight bounding box) are passed explicitly: figures
        # are usually saved after the paper_style() block has ended, where the rc values are gone.
        atomic_write(
            target,
            lambda tmp, s=suffix: fig.savefig(
                tmp,
                format=s[1:],
                dpi=RC["savefig.dpi"],
                bbox_inches=RC["savefig.bbox"],
                # No creation date in the PDF: regenerating a figure gives the same bytes.
                metadata={"CreationDate": None} if s == ".pdf" else None,
            ),
        )
        written.append(target)
    return written
