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

from lens.colstats import RankSummary, pack_pairs, rank_summary
from lens.data import check_images
from lens.errors import ConfigError, DatasetError, InputError
from lens.inputs import ROLES
from lens.logit_lens import LensConfig, pair_lens
from lens.records import RecordWriter, iter_records, unpack_array, write_tables
from lens.tables import PAYLOAD, ColumnarTable, SamplePart, ShardWriter, table_from_records

VISUAL, TEXT = "visual", "text"
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
#: The columns the bucket and Spearman statistics read.
STAT_COLUMNS = ("token_group", "layer", "base_entropy", "kl_base_rlvr")


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


def sample_images(sample: SampleLike) -> tuple[Any, ...]:
    image = getattr(sample, "image", None)
    return () if image is None else (image,)


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
        """The small fields of the sample's log line (its rows go to a shard)."""
        return {
            "layers": list(self.layers),
            "n_tokens": len(self.roles),
            "n_visual": sum(r == VISUAL for r in self.roles),
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
        sample.question, sample_images(sample), response=sample.response if config.teacher_force else None
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


# -- buckets and Spearman, streamed -------------------------------------------------------------------


def quantile_edges(values: np.ndarray, n_buckets: int) -> np.ndarray:
    """``n_buckets + 1`` quantile edges of ``values`` (first = min, last = max)."""
    return np.quantile(values, np.linspace(0.0, 1.0, n_buckets + 1))


def assign_buckets(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket index 1..n of each value: bucket b holds ``edges[b-1] <= v < edges[b]`` (last one closed)."""
    return np.searchsorted(edges[1:-1], values, side="right") + 1


def _token_groups(table: pa.Table) -> list[tuple[str, np.ndarray]]:
    """``(group, row mask)`` of every token group present in one part."""
    column = table["token_group"].combine_chunks()
    if column.null_count:
        raise DatasetError("the drift table has rows without a token_group")
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    codes = column.indices.to_numpy(zero_copy_only=False)
    masks = [(str(name), codes == i) for i, name in enumerate(column.dictionary.to_pylist())]
    return [(name, mask) for name, mask in masks if mask.any()]


def _columns(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer = table["layer"].to_numpy()
    entropy = np.asarray(table["base_entropy"].to_numpy(), dtype=np.float32)
    kl = np.asarray(table["kl_base_rlvr"].to_numpy(), dtype=np.float32)
    return layer, entropy, kl


def _layer_segments(layers: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """An order that sorts ``layers`` stably (None if sorted) and its ``(layer, start, stop)`` runs."""
    order = None
    if layers.size > 1 and (layers[1:] < layers[:-1]).any():
        order = np.argsort(layers, kind="stable")
        layers = layers[order]
    cuts = np.flatnonzero(layers[1:] != layers[:-1]) + 1
    starts = np.concatenate(([0], cuts)).tolist()
    stops = np.concatenate((cuts, [layers.size])).tolist()
    return order, [(int(layers[a]), a, b) for a, b in zip(starts, stops, strict=True)]


def _layer_dtype(layers: Sequence[int]) -> type:
    fits = all(-(2**15) <= x < 2**15 for x in layers)
    return np.int16 if fits else np.int64


def _bucket_rows(kl: np.ndarray, bucket: np.ndarray, edges: np.ndarray, keys: dict[str, Any]) -> list[dict]:
    """The statistics of each bucket, from the KL values (float32, in table order) and their buckets."""
    rows = []
    for b in range(1, len(edges)):
        sel = kl[bucket == b].astype(np.float64)  # the same float64 values, in the same order, as a table
        n = int(sel.size)
        mean = float(sel.mean()) if n else float("nan")
        sem = float(sel.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        rows.append(
            {
                **keys,
                "bucket": b,
                "entropy_lo": float(edges[b - 1]),
                "entropy_hi": float(edges[b]),
                "n": n,
                "mean_kl": mean,
                "median_kl": float(np.median(sel)) if n else float("nan"),
                "sem_kl": sem,
                "ci_low": mean - 1.96 * sem if n > 1 else mean,
                "ci_high": mean + 1.96 * sem if n > 1 else mean,
            }
        )
    return rows


def drift_statistics(table: ColumnarTable, n_buckets: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bucket table and Spearman table of a tidy drift table, streamed part by part.

    Same results as bucketing one in-memory table: quantile edges of the base entropy within each
    (scope, layer, token group), ``n_buckets`` buckets, ties at an edge in the upper bucket, pooled
    rows with edges over all layers; per bucket the count, mean, median, standard error and normal
    95% CI of KL; Spearman ρ(base entropy, KL) pooled and per layer. Values are float32 (the lens's
    precision); statistics are float64.

    Memory: three passes over the parts. (1) Count rows per (token group, layer). (2) Pack each row's
    (entropy, KL) into 8 bytes, grouped by layer, and sort them for exact edges and ranks
    (:mod:`lens.colstats`). (3) Keep KL (float32) with its buckets in table order, so each bucket's
    mean is summed in the same order as before. About 8 bytes per row, no Python object per row.

    Returns:
        ``(buckets, correlations)``; see :func:`bucket_table` and :func:`correlation_table`.
    """
    if n_buckets < 1:
        raise ConfigError(f"n_buckets must be >= 1, got {n_buckets}")
    if not len(table):
        raise DatasetError("no drift records to tabulate")

    # Pass 1: rows per (group, layer), so every array below is allocated once, at its final size.
    counts: dict[str, dict[int, int]] = {}
    for _, part in table.iter_tables(["token_group", "layer"]):
        layer = part["layer"].to_numpy()
        for group, mask in _token_groups(part):
            values, n = np.unique(layer[mask], return_counts=True)
            for value, count in zip(values.tolist(), n.tolist(), strict=True):
                counts.setdefault(group, {})[value] = counts.get(group, {}).get(value, 0) + count
    groups = sorted(counts)
    layers = {g: sorted(counts[g]) for g in groups}

    # Pass 2: packed (entropy, KL) words, layer-major within each group; then edges and Spearman.
    packed: dict[str, np.ndarray] = {}
    slices: dict[str, dict[int, slice]] = {}
    cursor: dict[str, dict[int, int]] = {}
    for g in groups:
        start, slices[g], cursor[g] = 0, {}, {}
        for layer in layers[g]:
            slices[g][layer] = slice(start, start + counts[g][layer])
            cursor[g][layer] = start
            start += counts[g][layer]
        packed[g] = np.empty(start, dtype=np.uint64)
    for _, part in table.iter_tables(STAT_COLUMNS):
        layer, entropy, kl = _columns(part)
        for g, mask in _token_groups(part):
            words = pack_pairs(entropy[mask], kl[mask])
            order, segments = _layer_segments(layer[mask])
            if order is not None:
                words = words[order]
            for value, a, b in segments:
                packed[g][cursor[g][value] : cursor[g][value] + b - a] = words[a:b]
                cursor[g][value] += b - a
    summaries: dict[tuple[str, int], RankSummary] = {}
    for g in groups:
        for layer, where in slices[g].items():
            summaries[g, layer] = rank_summary(packed[g][where].copy(), n_buckets)
        summaries[g, -1] = rank_summary(packed.pop(g), n_buckets)  # sorted in place, then dropped

    # Pass 3: KL and buckets in table order (pooled edges and per-layer edges).
    small = np.int8 if n_buckets < 127 else np.int32
    kls = {g: np.empty(sum(counts[g].values()), dtype=np.float32) for g in groups}
    pooled_bucket = {g: np.empty(kls[g].size, dtype=small) for g in groups}
    layer_bucket = {g: np.empty(kls[g].size, dtype=small) for g in groups}
    layer_of = {g: np.empty(kls[g].size, dtype=_layer_dtype(layers[g])) for g in groups}
    filled = dict.fromkeys(groups, 0)
    for _, part in table.iter_tables(STAT_COLUMNS):
        layer, entropy, kl = _columns(part)
        for g, mask in _token_groups(part):
            at = slice(filled[g], filled[g] + int(mask.sum()))
            filled[g] = at.stop
            values = entropy[mask].astype(np.float64)
            kls[g][at] = kl[mask]
            layer_of[g][at] = layer[mask]
            pooled_bucket[g][at] = assign_buckets(values, summaries[g, -1].edges)
            buckets = layer_bucket[g][at]
            for value in np.unique(layer_of[g][at]).tolist():
                rows = layer_of[g][at] == value
                buckets[rows] = assign_buckets(values[rows], summaries[g, value].edges)

    bucket_rows: list[dict[str, Any]] = []
    correlation_rows: list[dict[str, Any]] = []
    for g in groups:
        for scope, layer in [("pooled", -1)] + [("layer", layer) for layer in layers[g]]:
            if scope == "pooled":
                kl, bucket = kls[g], pooled_bucket[g]
            else:
                rows = layer_of[g] == layer
                kl, bucket = kls[g][rows], layer_bucket[g][rows]
            summary = summaries[g, layer]
            keys = {"scope": scope, "layer": int(layer), "token_group": g}
            bucket_rows += _bucket_rows(kl, bucket, summary.edges, keys)
            correlation_rows.append(
                {**keys, "n": summary.n, "spearman_rho": summary.spearman_rho, "p_value": summary.p_value}
            )
    return pd.DataFrame(bucket_rows), pd.DataFrame(correlation_rows)


def _as_columnar(table: pd.DataFrame | ColumnarTable) -> ColumnarTable:
    if isinstance(table, ColumnarTable):
        return table
    missing = [c for c in STAT_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"the drift table lacks the columns {missing}")
    arrow = pa.table(
        {
            "token_group": pa.array(table["token_group"].astype(str).to_numpy(), pa.string()),
            "layer": pa.array(table["layer"].to_numpy(dtype=np.int64)),
            "base_entropy": pa.array(table["base_entropy"].to_numpy(dtype=np.float32)),
            "kl_base_rlvr": pa.array(table["kl_base_rlvr"].to_numpy(dtype=np.float32)),
        }
    )
    return ColumnarTable.from_arrow(arrow)


def bucket_table(table: pd.DataFrame | ColumnarTable, n_buckets: int = 5) -> pd.DataFrame:
    """Mean KL per base-entropy quantile bucket, pooled over layers and per layer, per token group.

    Edges are quantiles of the base entropy within each (scope, layer, token group), so each
    bucket holds about the same number of readouts. Ties at an edge go to the upper bucket.
    Values are taken as float32, the precision of the lens (see :func:`drift_statistics`).

    Returns:
        One row per (scope, layer, token_group, bucket) with edges, count, mean/median KL and a
        normal-approximation 95% CI of the mean. ``layer`` is ``-1`` for pooled rows.
    """
    if n_buckets < 1:
        raise ConfigError(f"n_buckets must be >= 1, got {n_buckets}")
    return drift_statistics(_as_columnar(table), n_buckets)[0]


def correlation_table(table: pd.DataFrame | ColumnarTable) -> pd.DataFrame:
    """Spearman ρ between base entropy and KL, pooled and per layer, per token group."""
    return drift_statistics(_as_columnar(table), 1)[1]


# -- a run ----------------------------------------------------------------------------------------------


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
) -> DriftResult:
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

    Returns:
        The bucket table, the Spearman table and the tidy table.
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    from tqdm.auto import tqdm

    # Validate every input before creating any output, so bad input leaves no partial file.
    check_images(samples)
    if not pair.adapter.multimodal:
        with_images = [s.id for s in samples if sample_images(s)]
        if with_images:
            raise InputError(f"{pair.adapter.name} takes no images, but sample {with_images[0]!r} has one")

    if out_dir is None:
        parts = tuple(SamplePart(str(s.id), table=drift_record(pair, s, config).to_arrow()) for s in samples)
        tidy = ColumnarTable(parts, DRIFT_SCHEMA)
    else:
        out = Path(out_dir)
        settings = {"pair": list(getattr(pair, "names", ())), **asdict(config)}
        settings.pop("n_buckets")  # bucketing happens after the records
        writer = RecordWriter(out / "records.jsonl", resume=resume, settings=settings)
        todo = [s for s in samples if s.id not in writer]
        with ShardWriter(writer, DRIFT_SCHEMA) as shards:
            for sample in tqdm(
                todo,
                desc="drift",
                unit="sample",
                disable=not progress,
                initial=len(samples) - len(todo),
                total=len(samples),
            ):
                record = drift_record(pair, sample, config)
                shards.add(sample.id, record.to_arrow(), record.fields())
        tidy = table_from_records(writer.read(s.id for s in samples), out, DRIFT_SCHEMA, legacy_table)
    buckets, correlations = drift_statistics(tidy, config.n_buckets)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(out, {"drift_buckets": buckets, "drift_spearman": correlations})
        if csv:
            tidy.write_csv(out / "drift_table.csv")
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
