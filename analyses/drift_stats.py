"""Buckets and Spearman ρ of the tidy drift table, streamed: one read, ~8-12 bytes per row.

Semantics (unchanged from the in-memory version): within each (scope, layer, token group), the
quantile edges of the base entropy split the rows into ``n_buckets`` buckets; ties at an edge go to
the upper bucket; pooled rows use edges over all layers. Per bucket: count, mean, median, standard
error and normal 95% CI of KL(P_base ‖ P_rlvr); Spearman ρ(base entropy, KL) pooled and per layer.

How: one pass over the samples packs each row's (entropy, KL) into one ``uint64`` word
(:func:`lens.colstats.pack_pairs`), laid out layer-major per token group, so every layer is one
contiguous slice whose rows are in table order. Per layer, the slice gives its buckets directly and
a sorted copy gives its edges and ranks. Pooled, the edges come from a partition of a float32 copy
of the entropies; the rows are then walked sample by sample in table order, so each bucket's KL
values are summed in the same order as the in-memory table (identical means, not merely close);
last, the words are sorted in place for the pooled ranks.

Memory at 1,000 7B items (36.4 M rows, 28 M of them visual): the words, 8 bytes per row; plus, for
the group being pooled, either a float32 copy of its entropies or its KL values sorted into buckets
(4 bytes per row of that group). No Python object per row; no full tidy table.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from lens.colstats import (
    PackedBuckets,
    RankSummary,
    float_quantile_edges,
    high_floats,
    low_floats,
    pack_pairs,
    rank_summary,
    split_by_bucket,
)
from lens.errors import ConfigError, DatasetError
from lens.tables import ColumnarTable, SamplePart

VISUAL, TEXT = "visual", "text"
#: The columns the statistics read.
STAT_COLUMNS = ("token_group", "layer", "base_entropy", "kl_base_rlvr")
#: Threads for the per-layer work (numpy sorts release the GIL).
THREADS = 2
#: Samples read ahead of the one being packed.
READ_AHEAD = 4


def quantile_edges(values: np.ndarray, n_buckets: int) -> np.ndarray:
    """``n_buckets + 1`` quantile edges of ``values`` (first = min, last = max)."""
    return np.quantile(values, np.linspace(0.0, 1.0, n_buckets + 1))


def assign_buckets(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket index 1..n of each value: bucket b holds ``edges[b-1] <= v < edges[b]`` (last one closed)."""
    return np.searchsorted(edges[1:-1], values, side="right") + 1


# -- how one sample's rows are laid out ----------------------------------------------------------------


@dataclass(frozen=True)
class _Structure:
    """A sample written by ``lens drift``: layer-major rows, every position at every layer."""

    layers: tuple[int, ...]
    n_tokens: int
    positions: dict[str, list[tuple[int, int]]]  # token group -> its [start, stop) runs of positions

    @classmethod
    def of(cls, part: SamplePart) -> _Structure | None:
        """From the fields of the sample's record line, when they describe it."""
        fields = part.fields
        if "layers" not in fields:
            return None
        if "visual" in fields and "n_tokens" in fields:  # [[start, stop], ...] of the visual tokens
            visual = np.zeros(int(fields["n_tokens"]), dtype=bool)
            for start, stop in fields["visual"]:
                visual[start:stop] = True
        elif "roles" in fields:  # a record line from before the shards
            visual = np.asarray(fields["roles"]) == VISUAL
        else:
            return None
        positions = {}
        for group, mask in ((TEXT, ~visual), (VISUAL, visual)):
            edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))).tolist()
            if edges:
                positions[group] = [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
        return cls(tuple(int(x) for x in fields["layers"]), int(visual.size), positions)

    def width(self, group: str) -> int:
        return sum(b - a for a, b in self.positions[group])

    def counts(self) -> dict[str, dict[int, int]]:
        return {g: dict.fromkeys(self.layers, self.width(g)) for g in self.positions}

    def columns(self, values: np.ndarray, group: str) -> np.ndarray:
        """The group's positions of a ``[layers, tokens]`` array, layer-major (the rows' order)."""
        runs = [values[:, a:b] for a, b in self.positions[group]]
        return (runs[0] if len(runs) == 1 else np.concatenate(runs, axis=1)).reshape(-1)


@dataclass(frozen=True)
class _Rows:
    """One sample's rows of one token group: their layer runs, and the sort that makes them runs."""

    segments: tuple[tuple[int, int], ...]  # (layer, rows), in the order of the rows (after ``order``)
    order: np.ndarray | None  # a stable sort by layer, when a layer's rows are not contiguous


def _runs_of(layers: np.ndarray) -> list[tuple[int, int]]:
    cuts = np.flatnonzero(layers[1:] != layers[:-1]) + 1
    starts = np.concatenate(([0], cuts)).tolist()
    stops = np.concatenate((cuts, [layers.size])).tolist()
    return [(int(layers[a]), b - a) for a, b in zip(starts, stops, strict=True)] if layers.size else []


def _layer_runs(layers: np.ndarray) -> _Rows:
    runs = _runs_of(layers)
    if len({layer for layer, _ in runs}) == len(runs):
        return _Rows(tuple(runs), None)
    order = np.argsort(layers, kind="stable")  # a layer comes back: sort the rows by layer, stably
    return _Rows(tuple(_runs_of(layers[order])), order)


def _token_groups(table: pa.Table) -> list[tuple[str, np.ndarray]]:
    """``(group, row mask)`` of every token group present in one part read from its columns."""
    column = table["token_group"].combine_chunks()
    if column.null_count:
        raise DatasetError("the drift table has rows without a token_group")
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    codes = column.indices.to_numpy(zero_copy_only=False)
    masks = [(str(name), codes == i) for i, name in enumerate(column.dictionary.to_pylist())]
    return [(name, mask) for name, mask in masks if mask.any()]


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(), dtype=np.float32)


class _Plan:
    """Where every sample's rows go in the layer-major word arrays of each token group."""

    def __init__(self, table: ColumnarTable) -> None:
        self.table = table
        self.structures: list[_Structure | None] = [_Structure.of(p) for p in table.parts]
        self.rows: dict[tuple[int, str], _Rows] = {}  # (part, group) -> layout of the group's rows
        self.counts: dict[str, dict[int, int]] = {}
        for index, part in enumerate(table.parts):
            structure = self.structures[index]
            if structure is not None:
                for g in structure.positions:
                    self.rows[index, g] = _Rows(
                        tuple((layer, structure.width(g)) for layer in structure.layers), None
                    )
                self._count(structure.counts())
                continue
            columns = part.read(["token_group", "layer"])
            layer = columns["layer"].to_numpy()
            for g, mask in _token_groups(columns):
                rows = _layer_runs(layer[mask])
                self.rows[index, g] = rows
                counts: dict[int, int] = {}
                for value, n in rows.segments:
                    counts[value] = counts.get(value, 0) + n
                self._count({g: counts})
        self.groups = sorted(self.counts, key=lambda g: (sum(self.counts[g].values()), g))  # small first
        self.layers = {g: sorted(self.counts[g]) for g in self.groups}
        self.slices: dict[str, dict[int, slice]] = {}
        for g in self.groups:
            start, self.slices[g] = 0, {}
            for layer in self.layers[g]:
                self.slices[g][layer] = slice(start, start + self.counts[g][layer])
                start += self.counts[g][layer]
        # Destination offset of every (part, group, segment), in part order.
        cursor = {g: {layer: s.start for layer, s in self.slices[g].items()} for g in self.groups}
        self.offsets: dict[tuple[int, str], list[int]] = {}
        for index in range(len(table.parts)):
            for g in self.groups:
                rows = self.rows.get((index, g))
                if rows is None:
                    continue
                offsets = []
                for layer, n in rows.segments:
                    offsets.append(cursor[g][layer])
                    cursor[g][layer] += n
                self.offsets[index, g] = offsets

    def _count(self, counts: dict[str, dict[int, int]]) -> None:
        for g, per_layer in counts.items():
            mine = self.counts.setdefault(g, {})
            for layer, n in per_layer.items():
                mine[layer] = mine.get(layer, 0) + n

    def size(self, group: str) -> int:
        return sum(self.counts[group].values())

    def pack(self) -> dict[str, np.ndarray]:
        """Read every sample once; return each group's words, layer-major, table order within a layer."""
        words = {g: np.empty(self.size(g), dtype=np.uint64) for g in self.groups}
        columns = ["base_entropy", "kl_base_rlvr"]
        for index, (part, table) in enumerate(self._read(columns)):
            structure = self.structures[index]
            if structure is not None:
                shape = (len(structure.layers), structure.n_tokens)
                if table.num_rows != shape[0] * shape[1]:
                    raise DatasetError(
                        f"sample {part.sample_id!r}: {table.num_rows} rows, but its record says "
                        f"{shape[0]} layers x {shape[1]} tokens"
                    )
                entropy = _floats(table, "base_entropy").reshape(shape)
                kl = _floats(table, "kl_base_rlvr").reshape(shape)
                per_group = [
                    (g, structure.columns(entropy, g), structure.columns(kl, g)) for g in structure.positions
                ]
            else:
                entropy, kl = _floats(table, "base_entropy"), _floats(table, "kl_base_rlvr")
                per_group = [(g, entropy[mask], kl[mask]) for g, mask in _token_groups(table)]
            for g, x, y in per_group:
                rows = self.rows[index, g]
                packed = pack_pairs(x, y)
                if rows.order is not None:
                    packed = packed[rows.order]
                start = 0
                for (_, n), offset in zip(rows.segments, self.offsets[index, g], strict=True):
                    words[g][offset : offset + n] = packed[start : start + n]
                    start += n
        return words

    def _read(self, columns: list[str]) -> Iterator[tuple[SamplePart, pa.Table]]:
        """Every part's rows, in order, read by one thread a few parts ahead (Arrow decodes without the GIL)."""
        files: dict = {}

        def load(index: int) -> tuple[SamplePart, pa.Table]:
            part = self.table.parts[index]
            wanted = columns if self.structures[index] is not None else list(STAT_COLUMNS)
            return part, part.read(wanted, files)

        n = len(self.table.parts)
        with ThreadPoolExecutor(1) as reader:
            pending = deque(reader.submit(load, i) for i in range(min(READ_AHEAD, n)))
            for index in range(len(pending), n + len(pending)):
                done = pending.popleft().result()
                if index < n:
                    pending.append(reader.submit(load, index))
                yield done

    def table_order(self, group: str, words: np.ndarray):
        """Each sample's words of ``group`` in table order (the order of its rows), sample by sample."""
        for index in range(len(self.table.parts)):
            rows = self.rows.get((index, group))
            if rows is None:
                continue
            pieces = [
                words[o : o + n] for (_, n), o in zip(rows.segments, self.offsets[index, group], strict=True)
            ]
            gathered = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            if rows.order is not None:
                unsorted = np.empty_like(gathered)
                unsorted[rows.order] = gathered
                gathered = unsorted
            yield gathered


# -- statistics -----------------------------------------------------------------------------------------


def _bucket_row(bucket: int, kl: np.ndarray, edges: np.ndarray, keys: dict[str, Any]) -> dict[str, Any]:
    """One row of the bucket table from the bucket's KL values (float32, in table order)."""
    sel = kl.astype(np.float64)  # the same float64 values, in the same order, as a pandas column
    n = int(sel.size)
    mean = float(sel.mean()) if n else float("nan")
    sem = float(sel.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    median = float(np.median(sel, overwrite_input=True)) if n else float("nan")  # last: it reorders sel
    return {
        **keys,
        "bucket": bucket,
        "entropy_lo": float(edges[bucket - 1]),
        "entropy_hi": float(edges[bucket]),
        "n": n,
        "mean_kl": mean,
        "median_kl": median,
        "sem_kl": sem,
        "ci_low": mean - 1.96 * sem if n > 1 else mean,
        "ci_high": mean + 1.96 * sem if n > 1 else mean,
    }


def _layer_statistics(
    words: np.ndarray, n_buckets: int, keys: dict[str, Any]
) -> tuple[list[dict], RankSummary]:
    """Bucket rows and ranks of one layer's words (in table order); the words are left as they are."""
    summary = rank_summary(words.copy(), n_buckets)
    per_bucket = split_by_bucket(low_floats(words), PackedBuckets(summary.edges)(words), n_buckets)
    rows = [_bucket_row(b, kl, summary.edges, keys) for b, kl in enumerate(per_bucket, start=1)]
    return rows, summary


def _pooled_buckets(
    plan: _Plan, group: str, words: np.ndarray, n_buckets: int
) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """Edges over all layers (from a float32 copy), and each bucket's KL values in table order."""
    step = 1 << 20
    entropy = np.empty(words.size, dtype=np.float32)
    for start in range(0, words.size, step):
        entropy[start : start + step] = high_floats(words[start : start + step])
    edges = float_quantile_edges(entropy, n_buckets)
    del entropy
    buckets_of = PackedBuckets(edges)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
    for sample_words in plan.table_order(group, words):
        pieces = split_by_bucket(low_floats(sample_words), buckets_of(sample_words), n_buckets)
        for b, piece in enumerate(pieces):
            chunks[b].append(piece)
    return edges, chunks


def _pooled_rows(edges: np.ndarray, chunks: list[list[np.ndarray]], keys: dict[str, Any]) -> list[dict]:
    rows = []
    for b in range(len(chunks)):
        kl = np.concatenate(chunks[b]) if chunks[b] else np.empty(0, np.float32)
        chunks[b] = []  # drop the pieces once joined
        rows.append(_bucket_row(b + 1, kl, edges, keys))
    return rows


def drift_statistics(table: ColumnarTable, n_buckets: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bucket table and Spearman table of a tidy drift table, reading each sample once.

    Results equal those of the in-memory computation on the same rows: buckets, counts, means,
    medians and CIs exactly; Spearman ρ up to its last bits (see :mod:`lens.colstats`). Values are
    float32 (the lens's precision); statistics are float64.

    Returns:
        ``(buckets, correlations)``: one row per (scope, layer, token_group, bucket), and one per
        (scope, layer, token_group) with ``n``, ``spearman_rho`` and ``p_value``. ``layer`` is -1
        for pooled rows; token groups in alphabetical order, pooled first, then layers ascending.
    """
    if n_buckets < 1:
        raise ConfigError(f"n_buckets must be >= 1, got {n_buckets}")
    if not len(table):
        raise DatasetError("no drift records to tabulate")
    plan = _Plan(table)
    words = plan.pack()
    results: dict[str, tuple[list[dict], list[dict]]] = {}
    with ThreadPoolExecutor(THREADS) as pool:
        for g in plan.groups:  # smallest first: the largest group's copies come when the others are freed
            keys = [{"scope": "layer", "layer": layer, "token_group": g} for layer in plan.layers[g]]
            per_layer = [
                pool.submit(_layer_statistics, words[g][plan.slices[g][k["layer"]]], n_buckets, k)
                for k in keys
            ]
            pooled_keys = {"scope": "pooled", "layer": -1, "token_group": g}
            edges, chunks = _pooled_buckets(plan, g, words[g], n_buckets)  # meanwhile, on this thread
            layer_results = [f.result() for f in per_layer]
            ranks = pool.submit(rank_summary, words.pop(g), n_buckets)  # sorts the words in place ...
            pooled_rows = _pooled_rows(edges, chunks, pooled_keys)  # ... while the buckets are summed
            pooled = ranks.result()
            if not np.array_equal(pooled.edges, edges, equal_nan=True):
                raise AssertionError(f"pooled edges of {g}: by partition {edges}, by sorting {pooled.edges}")
            summaries = [(pooled_keys, pooled)] + [
                (k, r[1]) for k, r in zip(keys, layer_results, strict=True)
            ]
            correlations = [
                {**k, "n": s.n, "spearman_rho": s.spearman_rho, "p_value": s.p_value} for k, s in summaries
            ]
            results[g] = (pooled_rows + [row for rows, _ in layer_results for row in rows], correlations)
    bucket_rows = [row for g in sorted(results) for row in results[g][0]]
    correlation_rows = [row for g in sorted(results) for row in results[g][1]]
    return pd.DataFrame(bucket_rows), pd.DataFrame(correlation_rows)


def as_columnar(table: pd.DataFrame | ColumnarTable) -> ColumnarTable:
    """A DataFrame with ``token_group``, ``layer``, ``base_entropy`` and ``kl_base_rlvr`` as one part."""
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
    return drift_statistics(as_columnar(table), n_buckets)[0]


def correlation_table(table: pd.DataFrame | ColumnarTable) -> pd.DataFrame:
    """Spearman ρ between base entropy and KL, pooled and per layer, per token group."""
    return drift_statistics(as_columnar(table), 1)[1]
