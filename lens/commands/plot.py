"""``lens plot KIND RESULTS --out FILE``: redraw a figure from a saved result file."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, DatasetError

#: What the heatmaps read: the tidy drift table, from its run folder or an exported file.
TIDY = "the output folder of `lens drift`, or its drift_table.parquet/.csv (`lens export`)"
#: Kinds that draw one sample of the tidy drift table.
TIDY_KINDS = ("heatmap", "heatmap-grid")
#: kind -> (module, function, what RESULTS is). Functions take the loaded table (plus options).
KINDS: dict[str, tuple[str, str, str]] = {
    "kl-by-entropy": ("lens.plot.drift", "plot_kl_by_entropy", "drift_buckets.csv of `lens drift`"),
    "heatmap": ("lens.plot.heatmaps", "plot_layer_token_heatmaps", TIDY),
    "heatmap-grid": ("lens.plot.heatmaps", "plot_visual_grid", TIDY),
    "perturbation": ("lens.plot.perturbation", "plot_perturbation", "perturb_table.csv of `lens perturb`"),
    "replay-loss": ("lens.plot.training", "plot_replay_loss", "a CSV with sample_id, step, loss[, setting]"),
    "ablation": ("lens.plot.interventions", "plot_ablation_heatmap", "the interventions' ablation CSV"),
    "passk": ("lens.plot.interventions", "plot_pass_at_k", "the pass@k CSV"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw a paper figure from a saved result file",
        description="Redraw a figure (vector PDF + PNG) from a result file written by an analysis.",
        epilog="kinds: " + "; ".join(f"{k}: {v[2]}" for k, v in KINDS.items()),
    )
    parser.add_argument("kind", metavar="KIND", help=f"one of: {', '.join(KINDS)}")
    parser.add_argument(
        "results", metavar="RESULTS", help="the result file (.csv or .parquet), or run folder"
    )
    parser.add_argument("--out", required=True, help="output file; .pdf and .png are both written")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--sample", default=None, help="heatmap kinds: sample id (default: the first)")
    parser.add_argument("--grid", default=None, help="heatmap-grid: merged grid ROWSxCOLS (default: square)")
    parser.add_argument("--layers", default=None, help="heatmap-grid: layers to show, e.g. 0,4,8")
    parser.set_defaults(handler=run)


def resolve(kind: str) -> Callable[..., Any]:
    """The plot function of ``kind``.

    Raises:
        ConfigError: An unknown kind, or one whose module is not installed.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown plot kind {kind!r}; known: {', '.join(KINDS)}")
    module_name, function, _ = KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise ConfigError(f"plot kind {kind!r} needs {module_name}, which is not installed") from None
    if not hasattr(module, function):
        raise ConfigError(f"plot kind {kind!r}: {module_name} has no {function}")
    return getattr(module, function)


def read_results(path: str | Path, sample_id: str | None = None, tidy: bool = False) -> Any:
    """Read a result table (CSV or Parquet), turning every failure into :class:`DatasetError`.

    Args:
        path: A ``.csv`` or ``.parquet`` file; for the tidy drift table (``tidy``) also the output
            folder of ``lens drift``, read through its record log.
        sample_id: With ``tidy``, read only this sample's rows (default: the first sample's), so a
            heatmap of a 36-million-row run loads one sample.
        tidy: ``path`` holds the tidy drift table.
    """
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        if not tidy:
            raise DatasetError(f"{path} is a folder; pass the result file")
        from analyses.kl_drift import open_drift_table

        table = open_drift_table(path)
        sample_id = table.sample_ids[0] if sample_id is None else str(sample_id)
        selected = table.select([sample_id])
        if not len(selected):
            raise DatasetError(f"sample {sample_id!r} is not in the drift table")
        return selected.to_pandas()
    if not path.is_file():
        raise DatasetError(f"results file not found: {path}")
    if path.suffix.lower() == ".parquet":
        table = _read_parquet(path, sample_id if tidy else None, first_sample=tidy)
    else:
        try:
            table = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read {path} as CSV: {str(exc).splitlines()[0]}") from exc
    if not len(table):
        raise DatasetError(f"results file has no rows: {path}")
    return table


def _read_parquet(path: Path, sample_id: str | None, first_sample: bool) -> Any:
    """A Parquet table; with ``first_sample``, only one sample's rows (``sample_id``, else the first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if first_sample:
            handle = pq.ParquetFile(path)
            if "sample_id" in handle.schema_arrow.names and handle.metadata.num_rows:
                if sample_id is None:  # rows are grouped by sample: the first row names the first
                    sample_id = str(handle.read_row_group(0, columns=["sample_id"])["sample_id"][0].as_py())
                table = pq.read_table(path, filters=[("sample_id", "==", str(sample_id))])
                if not table.num_rows:
                    raise DatasetError(f"sample {sample_id!r} is not in {path}")
                return table.to_pandas()
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"cannot read {path} as Parquet: {str(exc).splitlines()[0]}") from exc


def _parse_grid(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        rows, cols = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"cannot parse --grid {text!r}; use ROWSxCOLS, e.g. 4x4") from None
    return rows, cols


def run(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from lens.commands.common import parse_layers
    from lens.plot.style import save_figure

    plot = resolve(args.kind)
    tidy = args.kind in TIDY_KINDS
    table = read_results(args.results, args.sample if tidy else None, tidy=tidy)
    kwargs: dict[str, Any] = {"title": args.title}
    if tidy:
        table["sample_id"] = table["sample_id"].astype(str)
        kwargs["sample_id"] = args.sample
    if args.kind == "heatmap-grid":
        kwargs["grid"] = _parse_grid(args.grid)
        kwargs["layers"] = parse_layers(args.layers)
    if args.kind == "perturbation":
        spearman = Path(args.results).with_name("perturb_spearman.csv")
        if spearman.is_file():
            kwargs["correlations"] = read_results(spearman)
    try:
        fig = plot(table, **kwargs)
    except (KeyError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise DatasetError(
            f"{args.results} does not look like {KINDS[args.kind][2]} ({type(exc).__name__}: {exc})"
        ) from exc
    written = save_figure(fig, args.out)
    plt.close(fig)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
