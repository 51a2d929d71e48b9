"""Columnar drift tables: equal to the in-memory computation, crash-safe shards, export and plots."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import reference_drift as ref
from scipy import stats as sps

from analyses.kl_drift import (
    DRIFT_SCHEMA,
    DriftRecord,
    assign_buckets,
    bucket_table,
    correlation_table,
    drift_statistics,
    legacy_table,
    open_drift_table,
)
from lens import colstats
from lens.errors import DatasetError
from lens.records import RecordWriter, iter_records
from lens.tables import ColumnarTable, SamplePart, ShardWriter, shard_folder, table_from_records

# -- synthetic records -------------------------------------------------------------------------------


def synthetic_records(seed: int = 0, n_samples: int = 7, layers=(0, 2, 5)) -> list[DriftRecord]:
    """Records with what real tables have and what breaks naive code: ties (also across an edge),
    exact zeros and -0.0 in KL, samples of different lengths, one without visual tokens, a 4x4 grid."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_samples):
        n_visual = 0 if i == 3 else 16
        roles = ["template"] * 3 + ["visual"] * n_visual + ["prompt"] * int(rng.integers(2, 9))
        roles += ["template"] * 2 + ["response"] * int(rng.integers(1, 6))
        shape = (len(layers), len(roles))
        entropy = np.round(rng.gamma(2.0, 1.0, shape) * 4) / 4  # quarter steps: many ties
        entropy[:, :3] = 0.5  # the same value at every template position
        kl = rng.exponential(1.0 / (1.0 + entropy))
        kl[rng.random(shape) < 0.1] = 0.0
        kl[rng.random(shape) < 0.05] = -0.0
        rlvr = entropy + rng.normal(0, 0.2, shape)
        records.append(
            DriftRecord(
                f"s{i}",
                tuple(layers),
                tuple(roles),
                entropy.astype(np.float32),
                rlvr.astype(np.float32),
                kl.astype(np.float32),
            )
        )
    return records


def legacy_lines(records: list[DriftRecord]) -> list[dict]:
    """The records as the JSON lines written before the shards."""
    return [
        {
            "sample_id": r.sample_id,
            **ref.legacy_record(r.layers, r.roles, r.base_entropy, r.rlvr_entropy, r.kl_base_rlvr),
        }
        for r in records
    ]


def write_run(out, records, rows_per_shard: int = 1 << 21) -> ColumnarTable:
    """A run folder holding ``records`` (as ``run_drift`` writes them), and its table."""
    writer = RecordWriter(out / "records.jsonl")
    with ShardWriter(writer, DRIFT_SCHEMA, rows_per_shard=rows_per_shard) as shards:
        for record in records:
            shards.add(record.sample_id, record.to_arrow(), record.fields())
    return open_drift_table(out)


def assert_same_statistics(buckets, correlations, ref_buckets, ref_correlations):
    """Buckets bit for bit; Spearman ρ to 1e-12 and p to 1e-9 relative (see ``lens.colstats``)."""
    pd.testing.assert_frame_equal(buckets, ref_buckets, check_exact=True)
    keys = ["scope", "layer", "token_group", "n"]
    pd.testing.assert_frame_equal(correlations[keys], ref_correlations[keys], check_exact=True)
    np.testing.assert_allclose(
        correlations["spearman_rho"], ref_correlations["spearman_rho"], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(correlations["p_value"], ref_correlations["p_value"], rtol=1e-9, atol=1e-300)


@contextlib.contextmanager
def _no_check():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant groups (ρ is NaN in both)
        yield


# -- exact statistics on packed float32 columns ---------------------------------------------------------


def _scipy_spearman(x, y):
    with _no_check():
        return sps.spearmanr(x, y)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 18])
def test_rank_summary_equals_numpy_and_scipy(monkeypatch, chunk):
    """Edges bit for bit, ρ to 1e-12, whatever the tie runs and however they cross chunk borders."""
    monkeypatch.setattr(colstats, "CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    cases = [
        (np.zeros(5), np.arange(5)),
        (np.arange(4), np.arange(4)[::-1]),
        (np.repeat(np.arange(5), 9), None),
    ]
    for n in (1, 2, 3, 10, 57):
        for scale in (None, 2.0, 0.5):
            x = rng.normal(size=n)
            cases.append((x if scale is None else np.round(x * scale), np.round(x + rng.normal(size=n))))
    cases.append(
        (np.array([0.0, -0.0, 1.0, np.inf, -np.inf, 0.0]), np.array([-0.0, 0.0, 2.0, 2.0, 1.0, 3.0]))
    )
    cases += [(np.array([0.0, np.nan, 1.0]), np.arange(3.0)), (np.arange(3.0), np.array([0.0, -np.nan, 1.0]))]
    for x, y in cases:
        x = np.asarray(x, dtype=np.float32)
        y = rng.normal(size=x.size).astype(np.float32) if y is None else np.asarray(y, dtype=np.float32)
        for n_buckets in (1, 3, 5):
            summary = colstats.rank_summary(colstats.pack_pairs(x, y), n_buckets)
            with np.errstate(invalid="ignore"), _no_check():
                expected = np.quantile(x.astype(np.float64), np.linspace(0, 1, n_buckets + 1))
            np.testing.assert_array_equal(summary.edges, expected)
            np.testing.assert_array_equal(colstats.float_quantile_edges(x.copy(), n_buckets), expected)
            rho, p = _scipy_spearman(x, y)
            np.testing.assert_allclose(summary.spearman_rho, rho, rtol=0, atol=1e-12)
            np.testing.assert_allclose(summary.p_value, p, rtol=1e-9, atol=1e-300)


def test_packed_buckets_equal_searchsorted():
    rng = np.random.default_rng(3)
    for trial in range(100):
        n = int(rng.integers(1, 200))
        x = (np.round(rng.normal(size=n) * rng.choice([1, 4, 1000])) / 4).astype(np.float32)
        n_buckets = int(rng.integers(1, 8))
        edges = np.quantile(x.astype(np.float64), np.linspace(0, 1, n_buckets + 1))
        if trial % 3 == 0:  # edges that are not float32 values, and beyond float32's range
            edges = np.sort(np.concatenate([[-1e300], rng.normal(size=n_buckets - 1), [1e300]]))
        words = colstats.pack_pairs(x, rng.normal(size=n).astype(np.float32))
        expected = assign_buckets(x.astype(np.float64), edges)
        np.testing.assert_array_equal(colstats.PackedBuckets(edges)(words), expected)
        kl = rng.random(n).astype(np.float32)
        pieces = colstats.split_by_bucket(kl, expected.astype(np.int8), n_buckets)
        for b, piece in enumerate(pieces, start=1):
            np.testing.assert_array_equal(piece, kl[expected == b])
    x = np.array([1.0, np.nan, 2.0], dtype=np.float32)  # NaN edges: numpy's order (NaN last)
    edges = np.full(3, np.nan)
    np.testing.assert_array_equal(
        colstats.PackedBuckets(edges)(colstats.pack_pairs(x, x)), assign_buckets(x.astype(np.float64), edges)
    )


def test_float_keys_order_and_round_trip():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-45, 2.0, np.inf], dtype=np.float32)
    keys = colstats.float_keys(values)
    assert (np.diff(keys.astype(np.int64)) >= 0).all() and keys[3] == keys[4]  # -0.0 ties +0.0
    np.testing.assert_array_equal(colstats.key_floats(keys), values + np.float32(0))


# -- equality with the frozen in-memory computation -------------------------------------------------


@pytest.mark.parametrize(("seed", "n_buckets"), [(0, 5), (1, 3), (2, 1), (3, 10)])
def test_statistics_equal_the_reference(tmp_path, seed, n_buckets):
    records = synthetic_records(seed)
    reference_table = ref.drift_table(legacy_lines(records))
    ref_buckets = ref.bucket_table(reference_table, n_buckets)
    with _no_check():
        ref_correlations = ref.correlation_table(reference_table)

    # Through Parquet shards, several per run (a shard every ~2 samples).
    table = write_run(tmp_path, records, rows_per_shard=200)
    assert len(list(shard_folder(tmp_path / "records.jsonl").glob("part-*.parquet"))) >= 3
    assert_same_statistics(*drift_statistics(table, n_buckets), ref_buckets, ref_correlations)
    # In memory, from the old record lines, and from a DataFrame: the same numbers.
    in_memory = ColumnarTable(tuple(SamplePart(r.sample_id, table=r.to_arrow()) for r in records))
    assert_same_statistics(*drift_statistics(in_memory, n_buckets), ref_buckets, ref_correlations)
    legacy = table_from_records(legacy_lines(records), tmp_path, DRIFT_SCHEMA, legacy_table)
    assert_same_statistics(*drift_statistics(legacy, n_buckets), ref_buckets, ref_correlations)
    pd.testing.assert_frame_equal(bucket_table(reference_table, n_buckets), ref_buckets, check_exact=True)
    assert_same_statistics(ref_buckets, correlation_table(reference_table), ref_buckets, ref_correlations)


def test_tidy_table_equals_the_reference_table(tmp_path):
    records = synthetic_records(4)
    table = write_run(tmp_path, records, rows_per_shard=150).to_pandas()
    expected = ref.drift_table(legacy_lines(records))
    assert list(table.columns) == list(expected.columns)
    assert table.dtypes.to_dict() == {
        "sample_id": "category",
        "layer": np.int16,
        "position": np.int32,
        "role": "category",
        "base_entropy": np.float32,
        "rlvr_entropy": np.float32,
        "kl_base_rlvr": np.float32,
        "token_group": "category",
    }
    for column in expected.columns:
        if isinstance(table[column].dtype, pd.CategoricalDtype):
            assert table[column].astype(str).tolist() == expected[column].astype(str).tolist(), column
        else:
            np.testing.assert_array_equal(table[column].to_numpy(expected[column].dtype), expected[column])


def test_dataframe_rows_in_any_order(tmp_path):
    """``bucket_table`` of a hand-made DataFrame (layers interleaved, no roles) equals the reference."""
    rng = np.random.default_rng(5)
    n = 400
    frame = pd.DataFrame(
        {
            "layer": rng.integers(0, 4, n),
            "token_group": rng.choice(["text", "visual"], n),
            "base_entropy": np.round(rng.uniform(0, 3, n), 1).astype(np.float32),
            "kl_base_rlvr": rng.exponential(1, n).astype(np.float32),
        }
    )
    pd.testing.assert_frame_equal(bucket_table(frame, 4), ref.bucket_table(frame, 4), check_exact=True)
    with _no_check():
        expected = ref.correlation_table(frame)
    assert_same_statistics(bucket_table(frame, 4), correlation_table(frame), bucket_table(frame, 4), expected)


def test_run_drift_equals_the_reference_on_real_lens_outputs(vl_pair, make_dataset, tmp_path):
    from analyses.kl_drift import DriftConfig, run_drift
    from lens.datasets import load_jsonl

    samples = load_jsonl(make_dataset(3))
    result = run_drift(vl_pair, samples, tmp_path / "out", DriftConfig(n_buckets=4))
    frame = result.table.astype({"sample_id": str, "role": str, "token_group": str})
    assert_same_statistics(
        result.buckets, result.correlations, ref.bucket_table(frame, 4), ref.correlation_table(frame)
    )
    on_disk = pd.read_csv(tmp_path / "out" / "drift_buckets.csv")
    np.testing.assert_array_equal(on_disk["mean_kl"], result.buckets["mean_kl"])


# -- crash safety of the shards ------------------------------------------------------------------------


class Crash(Exception):
    pass


def _crash_on_line(writer: RecordWriter, line: int, monkeypatch) -> None:
    """Make the ``line``-th ``writer.write`` raise (the process dies between two lines)."""
    real = writer.write
    calls = []

    def write(sample_id, record):
        calls.append(sample_id)
        if len(calls) == line:
            raise Crash
        real(sample_id, record)

    monkeypatch.setattr(writer, "write", write)


def test_uncommitted_tail_of_a_shard_is_cut_and_recomputed(tmp_path, monkeypatch):
    records = synthetic_records(6, n_samples=4)
    writer = RecordWriter(tmp_path / "records.jsonl")
    _crash_on_line(writer, 3, monkeypatch)
    with pytest.raises(Crash):
        with ShardWriter(writer, DRIFT_SCHEMA) as shards:
            for record in records:
                shards.add(record.sample_id, record.to_arrow(), record.fields())
    (shard,) = shard_folder(writer.path).glob("part-*.parquet")
    assert pq.ParquetFile(shard).num_row_groups == 4  # all rows on disk, two of them committed
    assert [r["sample_id"] for r in iter_records(writer.path)] == ["s0", "s1"]
    assert open_drift_table(tmp_path).sample_ids == ["s0", "s1"]  # readers see committed rows only

    monkeypatch.undo()
    writer = RecordWriter(tmp_path / "records.jsonl")  # resume
    with ShardWriter(writer, DRIFT_SCHEMA) as shards:
        assert pq.ParquetFile(shard).num_row_groups == 2  # the uncommitted tail is gone
        for record in records:
            if record.sample_id not in writer:
                shards.add(record.sample_id, record.to_arrow(), record.fields())
    table = open_drift_table(tmp_path)
    assert table.sample_ids == ["s0", "s1", "s2", "s3"]
    pd.testing.assert_frame_equal(table.to_pandas(), write_run(tmp_path / "clean", records).to_pandas())
    # Reading the shard folder directly gives the same rows: nothing uncommitted is left in it.
    raw = pq.read_table(shard_folder(writer.path)).to_pandas()
    assert len(raw) == sum(r.base_entropy.size for r in records)


def test_shard_without_lines_is_ignored_then_removed(tmp_path, monkeypatch):
    records = synthetic_records(7, n_samples=2)
    writer = RecordWriter(tmp_path / "records.jsonl")
    _crash_on_line(writer, 1, monkeypatch)
    shards = ShardWriter(writer, DRIFT_SCHEMA)
    shards.add("s0", records[0].to_arrow(), records[0].fields())
    with pytest.raises(Crash):
        shards.flush()
    assert len(list(shard_folder(writer.path).glob("part-*.parquet"))) == 1
    assert list(iter_records(writer.path)) == []
    monkeypatch.undo()
    ShardWriter(RecordWriter(tmp_path / "records.jsonl"), DRIFT_SCHEMA)
    assert list(shard_folder(writer.path).glob("part-*")) == []


def test_an_exception_commits_what_is_buffered(tmp_path):
    records = synthetic_records(8, n_samples=3)
    writer = RecordWriter(tmp_path / "records.jsonl")
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(writer, DRIFT_SCHEMA) as shards:
            for record in records[:2]:
                shards.add(record.sample_id, record.to_arrow(), record.fields())
            raise KeyboardInterrupt
    assert [r["sample_id"] for r in iter_records(writer.path)] == ["s0", "s1"]
    assert all(r["table"]["file"].startswith("records/part-") for r in iter_records(writer.path))


def test_shard_size_and_age_limits(tmp_path):
    records = synthetic_records(9, n_samples=3)
    write_run(tmp_path / "a", records, rows_per_shard=1)
    assert len(list((tmp_path / "a" / "records").glob("part-*.parquet"))) == 3
    writer = RecordWriter(tmp_path / "b" / "records.jsonl")
    shards = ShardWriter(writer, DRIFT_SCHEMA, flush_seconds=0)
    shards.add("s0", records[0].to_arrow())
    assert "s0" in writer  # committed at once
    with pytest.raises(ValueError, match="already written"):
        shards.add("s0", records[0].to_arrow())
    with pytest.raises(ValueError, match="schema"):
        shards.add("s9", records[1].to_arrow().drop_columns(["role"]))


def test_missing_shard_and_no_resume(tmp_path):
    records = synthetic_records(10, n_samples=2)
    write_run(tmp_path, records)
    (shard,) = (tmp_path / "records").glob("part-*.parquet")
    shard.unlink()
    with pytest.raises(DatasetError, match="missing"):
        ShardWriter(RecordWriter(tmp_path / "records.jsonl"), DRIFT_SCHEMA)
    with pytest.raises(DatasetError, match="missing"):
        open_drift_table(tmp_path).to_pandas()
    # Starting afresh (--no-resume) does not mind the missing shard ...
    ShardWriter(RecordWriter(tmp_path / "records.jsonl", resume=False), DRIFT_SCHEMA)
    # ... and removes the old records and shards only once a new record replaces them.
    fresh = tmp_path / "fresh"
    write_run(fresh, records)
    old = sorted((fresh / "records").glob("*"))
    ShardWriter(RecordWriter(fresh / "records.jsonl", resume=False), DRIFT_SCHEMA).__exit__(None, None, None)
    assert sorted((fresh / "records").glob("*")) == old  # nothing new written: the old run stays whole
    with ShardWriter(RecordWriter(fresh / "records.jsonl", resume=False), DRIFT_SCHEMA) as shards:
        shards.add(records[0].sample_id, records[0].to_arrow(), records[0].fields())
    new = sorted((fresh / "records").glob("*"))
    assert len(new) == 1 and new[0] not in old


def test_old_record_lines_resume_with_new_shards(tmp_path):
    """A folder written before the shards (base64 arrays in the lines) resumes and reads as one table."""
    records = synthetic_records(11, n_samples=4)
    writer = RecordWriter(tmp_path / "records.jsonl")
    for line in legacy_lines(records[:2]):
        writer.write(line.pop("sample_id"), line)
    with ShardWriter(RecordWriter(tmp_path / "records.jsonl"), DRIFT_SCHEMA) as shards:
        for record in records[2:]:
            shards.add(record.sample_id, record.to_arrow(), record.fields())
    table = open_drift_table(tmp_path)
    assert table.sample_ids == ["s0", "s1", "s2", "s3"]
    pd.testing.assert_frame_equal(table.to_pandas(), write_run(tmp_path / "new", records).to_pandas())


# -- lens export and lens plot on Parquet ----------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    table = write_run(out, synthetic_records(12, n_samples=3))
    buckets, correlations = drift_statistics(table, 5)
    buckets.to_csv(out / "drift_buckets.csv", index=False)
    buckets.to_parquet(out / "drift_buckets.parquet")
    return out


def test_lens_export_parquet_and_csv(run_dir, tmp_path, capsys):
    from lens.cli import main

    expected = open_drift_table(run_dir).to_pandas()
    assert main(["export", str(run_dir)]) == 0
    assert "3 samples" in capsys.readouterr().out
    exported = pq.ParquetFile(run_dir / "drift_table.parquet")
    assert exported.num_row_groups == 3  # a row group per sample: one sample can be read alone
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "drift_table.parquet"), expected)
    assert main(["export", str(run_dir), "--format", "csv", "--out", str(tmp_path / "t.csv")]) == 0
    csv = pd.read_csv(tmp_path / "t.csv")
    assert list(csv.columns) == list(expected.columns)
    assert csv["sample_id"].tolist() == expected["sample_id"].astype(str).tolist()
    for column in ("base_entropy", "rlvr_entropy", "kl_base_rlvr"):  # float32 text round-trips exactly
        np.testing.assert_array_equal(csv[column].to_numpy(np.float32), expected[column])


def test_lens_export_bad_input_is_one_line(run_dir, tmp_path, capsys):
    from lens.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "records.jsonl").write_text('{"sample_id": "a", "greedy": "x"}\n')
    cases = [
        ([str(tmp_path / "nope")], "run folder not found"),
        ([str(tmp_path / "empty")], "no records.jsonl"),
        ([str(tmp_path / "other")], "holds no drift records"),
        ([str(run_dir), "--format", "xlsx"], "--format must be one of"),
        ([str(run_dir), "--out", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (run_dir / "drift_table.parquet").exists()


def test_lens_plot_reads_parquet_and_run_folders(run_dir, tmp_path, capsys):
    from lens.cli import main

    assert main(["export", str(run_dir)]) == 0
    parquet = run_dir / "drift_table.parquet"
    for kind, results, extra in (
        ("heatmap", run_dir, ["--sample", "s1"]),  # one sample read through the record log
        ("heatmap", parquet, []),  # the first sample of an exported file
        ("heatmap-grid", parquet, ["--sample", "s2", "--grid", "4x4", "--layers", "0,5"]),
        ("kl-by-entropy", run_dir / "drift_buckets.parquet", []),
    ):
        out = tmp_path / f"{kind}-{results.name}-{len(extra)}.pdf"
        assert main(["plot", kind, str(results), "--out", str(out), *extra]) == 0, (kind, results)
        assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    cases = [
        (["heatmap", str(parquet), "--sample", "zzz"], "'zzz' is not in"),
        (["heatmap", str(run_dir), "--sample", "zzz"], "'zzz' is not in"),
        (["heatmap", str(tmp_path / "bad.parquet")], "cannot read"),
        (["kl-by-entropy", str(run_dir)], "is a folder"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(["plot", *argv, "--out", str(tmp_path / "x.png")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_lens_drift_csv_flag_on_the_organism(tmp_path, capsys):
    from lens.cli import main

    out = tmp_path / "drift"
    assert main(["drift", "--items", "2", "--out", str(out), "--buckets", "3", "--threads", "1"]) == 0
    assert not (out / "drift_table.csv").exists()  # Parquet shards only, by default
    assert len(list((out / "records").glob("part-*.parquet"))) == 1
    assert (
        main(["drift", "--items", "2", "--out", str(out), "--buckets", "3", "--threads", "1", "--csv"]) == 0
    )
    assert "drift_table.csv" in capsys.readouterr().out
    csv = pd.read_csv(out / "drift_table.csv")
    pd.testing.assert_frame_equal(
        csv,
        open_drift_table(out).to_pandas().astype({"sample_id": str, "role": str, "token_group": str}),
        check_dtype=False,
    )
