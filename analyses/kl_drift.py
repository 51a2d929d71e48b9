"""KL drift by base entropy: how far RLVR moved each (layer, token) readout, against how sure the base was.

Pipeline: per sample, the logit lens of both models gives base entropy, RLVR entropy and
KL(P_base ‖ P_rlvr) per (layer, position). Each sample's rows go to a Parquet shard of the tidy
table (compact types, see :data:`DRIFT_SCHEMA`), committed by its line in ``records.jsonl``
(:mod:`lens.tables`), so a run resumes after an interruption. Then the table is bucketed by
base-entropy quantile, per layer and pooled, visual and text tokens apart, and Spearman ρ is taken,
without ever building the whole table in memory (:func:`drift_statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from analyses.drift_stats import (  # noqa: F401  (public API of the drift analysis)
    TEXT,
    VISUAL,
    assign_buckets,
    bucket_table,
    correlation_table,
    drift_statistics,
    quantile_edges,
)
from lens.datasets import check_images, sample_images
from lens.datasets.sample import sample_videos
from lens.errors import ConfigError, DatasetError, InputError
from lens.fingerprint import pair_fingerprint, sample_digests
from lens.inputs import ROLES
from lens.logit_lens import LensConfig, pair_lens
from lens.records import RecordWriter, iter_records, unpack_array, write_tables
from lens.tables import PAYLOAD, ColumnarTable, SamplePart, ShardWriter, table_from_records

_TOKEN_GROUPS = (TEXT, VISUAL)

#: The tidy drift table: one row per (sample, layer, position).
DRIFT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.dictionary(pa.int32(), pa.string())),
        ("layer", pa.int16()),
        ("position", pa.int32()),
        ("role", pa.dictionary(pa.int8(), pa.string())),
        ("base_entropy", pa.float32()),
        ("rlvr_entropy", pa.float32()),
        ("kl_base_rlvr", pa.float32()),
        ("token_group", pa.dictionary(pa.int8(), pa.string())),
    ]
)


class SampleLike(Protocol):
    id: str
    question: str
    image: Any
    response: str | None


@dataclass(frozen=True)
class DriftConfig:
    """Settings of a drift run.

    Attributes:
        n_buckets: Number of base-entropy quantile buckets.
        layers: Decoder layers to read (default: all).
        token_chunk: Lens chunk size (bounds memory).
        teacher_force: Include the dataset's ``response`` (when present) after the prompt.
    """

    n_buckets: int = 5
    layers: tuple[int, ...] | None = None
    token_chunk: int = 256
    teacher_force: bool = True

    def __post_init__(self) -> None:
        if self.n_buckets < 1:
            raise ConfigError(f"n_buckets must be >= 1, got {self.n_buckets}")


# -- one sample's rows --------------------------------------------------------------------------------


def _dictionary(codes: np.ndarray, names: Sequence[str], index_type: pa.DataType) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(
        pa.array(codes, type=index_type), pa.array(list(names), pa.string())
    )


@dataclass(frozen=True)
class DriftRecord:
    """Lens statistics of one sample: float32 ``[layers, tokens]`` arrays and the role of every token."""

    sample_id: str
    layers: tuple[int, ...]
    roles: tuple[str, ...]
    base_entropy: np.ndarray
    rlvr_entropy: np.ndarray
    kl_base_rlvr: np.ndarray

    def fields(self) -> dict[str, Any]:
        """The small fields of the sample's log line (its rows go to a shard): the layers, the
        token count and the ``[start, stop)`` runs of visual positions, enough to take the rows
        apart without reading the role columns."""
        visual = np.concatenate(([False], np.asarray(self.roles) == VISUAL, [False]))
        edges = np.flatnonzero(visual[1:] != visual[:-1]).tolist()
        return {
            "layers": list(self.layers),
            "n_tokens": len(self.roles),
            "visual": [edges[i : i + 2] for i in range(0, len(edges), 2)],
        }

    def to_arrow(self) -> pa.Table:
        """Tidy rows, layer-major then position, in :data:`DRIFT_SCHEMA`."""
        n_layers, n_tokens = self.base_entropy.shape
        n = n_layers * n_tokens
        role_names = list(ROLES) + sorted(set(self.roles) - set(ROLES))
        role_index = {r: i for i, r in enumerate(role_names)}
        role_codes = np.array([role_index[r] for r in self.roles], dtype=np.int8)
        group_codes = (role_codes == role_index[VISUAL]).astype(np.int8)  # index into _TOKEN_GROUPS
        columns = [
            _dictionary(np.zeros(n, dtype=np.int32), [self.sample_id], pa.int32()),
            pa.array(np.repeat(np.asarray(self.layers, dtype=np.int16), n_tokens)),
            pa.array(np.tile(np.arange(n_tokens, dtype=np.int32), n_layers)),
            _dictionary(np.tile(role_codes, n_layers), role_names, pa.int8()),
            *(pa.array(np.asarray(a, dtype=np.float32).reshape(-1)) for a in self._values()),
            _dictionary(np.tile(group_codes, n_layers), _TOKEN_GROUPS, pa.int8()),
        ]
        return pa.Table.from_arrays(columns, schema=DRIFT_SCHEMA)

    def _values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.base_entropy, self.rlvr_entropy, self.kl_base_rlvr


def drift_record(pair: Any, sample: SampleLike, config: DriftConfig) -> DriftRecord:
    """Lens statistics of one sample."""
    inputs = pair.encode(
        sample.question,
        sample_images(sample),
        response=sample.response if config.teacher_force else None,
        videos=sample_videos(sample),
    )
    result = pair_lens(
        pair.base,
        pair.rlvr,
        pair.adapter,
        inputs,
        LensConfig(layers=config.layers, token_chunk=config.token_chunk),
    )
    return DriftRecord(
        str(sample.id),
        tuple(int(x) for x in result.layers),
        tuple(result.roles),
        result.base_entropy.numpy(),
        result.rlvr_entropy.numpy(),
        result.kl_base_rlvr.numpy(),
    )


def legacy_table(record: dict[str, Any]) -> pa.Table:
    """Rows of a record line written before the Parquet shards (arrays base64-packed in the line)."""
    return DriftRecord(
        str(record["sample_id"]),
        tuple(record["layers"]),
        tuple(record["roles"]),
        unpack_array(record["base_entropy"]),
        unpack_array(record["rlvr_entropy"]),
        unpack_array(record["kl_base_rlvr"]),
    ).to_arrow()


def open_drift_table(run_dir: str | Path) -> ColumnarTable:
    """The tidy table of every sample recorded in a ``lens drift`` output folder (in record order).

    Raises:
        DatasetError: The folder has no drift records.
    """
    log = Path(run_dir) / "records.jsonl"
    if not log.is_file():
        raise DatasetError(f"{run_dir} has no records.jsonl: not a `lens drift` output folder")
    records = list(iter_records(log))
    if not records or not all(PAYLOAD in r or "base_entropy" in r for r in records):
        raise DatasetError(f"{log} holds no drift records")
    return table_from_records(records, log.parent, DRIFT_SCHEMA, legacy_table)


# -- a run ----------------------------------------------------------------------------------------------


def tabulate_drift(
    tidy: ColumnarTable, n_buckets: int, out_dir: str | Path | None = None, csv: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Buckets and Spearman of the tidy table; with ``out_dir``, write them (and the CSV table) there.

    Everything :func:`run_drift` does after the records but the figure.
    """
    buckets, correlations = drift_statistics(tidy, n_buckets)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(out, {"drift_buckets": buckets, "drift_spearman": correlations})
        if csv:
            tidy.write_csv(out / "drift_table.csv")
    return buckets, correlations


@dataclass(frozen=True)
class DriftResult:
    """Outputs of a drift run.

    Attributes:
        buckets: See :func:`bucket_table`.
        correlations: See :func:`correlation_table`.
        tidy: The tidy table, kept in its Parquet shards (or in memory without ``out_dir``).
        out_dir: Where the outputs were written.
    """

    buckets: pd.DataFrame
    correlations: pd.DataFrame
    tidy: ColumnarTable
    out_dir: Path | None = None

    @property
    def table(self) -> pd.DataFrame:
        """The whole tidy table as a DataFrame: one row per (sample, layer, position).

        Loaded on each access; at paper scale (36 M rows for 1,000 7B items) prefer
        ``tidy.select([sample_id]).to_pandas()`` or ``lens export``.
        """
        return self.tidy.to_pandas()


def run_drift(
    pair: Any,
    samples: Sequence[SampleLike],
    out_dir: str | Path | None = None,
    config: DriftConfig = DriftConfig(),
    resume: bool = True,
    progress: bool = False,
    title: str | None = None,
    csv: bool = False,
    shard: Any = None,
) -> DriftResult | None:
    """Run the drift analysis over a dataset.

    Args:
        pair: A :class:`lens.ModelPair`.
        samples: Dataset items (``id``, ``question``, ``image``, optional ``response``).
        out_dir: Where to write ``records.jsonl`` with the tidy table's Parquet shards in
            ``records/``, ``drift_buckets.csv``, ``drift_spearman.csv`` and
            ``kl_by_entropy.{png,pdf}``. ``None`` keeps everything in memory.
        config: Buckets, layers, chunking.
        resume: Keep records already in ``out_dir`` and skip their samples.
        progress: Show a progress bar.
        title: Figure title.
        csv: Also write the tidy table as ``drift_table.csv`` (large: ~55 bytes per row).
        shard: This process's :class:`lens.distributed.Shard` of a data-parallel run: compute only
            its samples, into its shard folder, and return ``None`` (the merge draws the tables).

    Returns:
        The bucket table, the Spearman table and the tidy table (``None`` for a shard).
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    from tqdm.auto import tqdm

    # Validate every input before creating any output, so bad input leaves no partial file.
    check_images(samples)
    if not pair.adapter.multimodal:
        with_images = [s.id for s in samples if sample_images(s) or sample_videos(s)]
        if with_images:
            raise InputError(
                f"{pair.adapter.name} takes no images or videos, but sample {with_images[0]!r} has one"
            )

    if out_dir is None:
        records = (drift_record(pair, s, config) for s in samples)
        parts = tuple(SamplePart(r.sample_id, table=r.to_arrow(), fields=r.fields()) for r in records)
        tidy = ColumnarTable(parts, DRIFT_SCHEMA)
    else:
        out = Path(out_dir)
        settings = {"pair": list(getattr(pair, "names", ())), **asdict(config)}
        settings.pop("n_buckets")  # bucketing happens after the records
        writer = RecordWriter(
            out / "records.jsonl", resume, settings, pair_fingerprint(pair), sample_digests(samples), shard
        )
        todo = [s for s in samples if writer.todo(s.id)]
        done = 0 if writer.partial else len(samples) - len(todo)
        with writer, ShardWriter(writer, DRIFT_SCHEMA) as shards:
            for sample in tqdm(
                todo, desc="drift", unit="sample", disable=not progress, initial=done, total=done + len(todo)
            ):
                record = drift_record(pair, sample, config)
                shards.add(sample.id, record.to_arrow(), record.fields())
            if writer.partial:
                return None
        tidy = table_from_records(writer.read(s.id for s in samples), out, DRIFT_SCHEMA, legacy_table)
    buckets, correlations = tabulate_drift(tidy, config.n_buckets, out_dir, csv=csv)
    if out_dir is not None:
        out = Path(out_dir)
        from lens.plot.drift import plot_kl_by_entropy
        from lens.plot.style import save_figure

        fig = plot_kl_by_entropy(buckets, title=title)
        save_figure(fig, out / "kl_by_entropy")
        import matplotlib.pyplot as plt

        plt.close(fig)
    return DriftResult(buckets, correlations, tidy, None if out_dir is None else Path(out_dir))


def summary_table(result: DriftResult) -> pd.DataFrame:
    """Pooled mean KL per bucket, one column per token group, for printing."""
    pooled = result.buckets[result.buckets["scope"] == "pooled"]
    wide = pooled.pivot(index="bucket", columns="token_group", values="mean_kl")
    wide.columns = [f"mean KL ({c})" for c in wide.columns]
    counts = pooled.pivot(index="bucket", columns="token_group", values="n")
    for c in counts.columns:
        wide[f"n ({c})"] = counts[c]
    return wide
