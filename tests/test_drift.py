"""Drift analysis: bucket edges and counts, outputs, and resuming after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import analyses.kl_drift as kd
from analyses.kl_drift import DriftConfig, assign_buckets, bucket_table, quantile_edges, run_drift
from lens.datasets import load_jsonl
from lens.errors import InputError

# -- buckets on hand-made tables --------------------------------------------------------------------


def test_quantile_edges_and_buckets_known_answers():
    values = np.arange(10, dtype=float)
    edges = quantile_edges(values, 5)
    np.testing.assert_allclose(edges, [0.0, 1.8, 3.6, 5.4, 7.2, 9.0])
    assert assign_buckets(values, edges).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # A value equal to an inner edge goes to the upper bucket; the maximum stays in the last.
    assert assign_buckets(np.array([1.8, 3.6, 9.0, -1.0, 20.0]), edges).tolist() == [2, 3, 5, 1, 5]


def test_buckets_with_ties():
    values = np.array([0.0, 1.0, 1.0, 1.0, 2.0])
    edges = quantile_edges(values, 2)
    np.testing.assert_allclose(edges, [0.0, 1.0, 2.0])
    assert assign_buckets(values, edges).tolist() == [1, 2, 2, 2, 2]
    # All-tied values: every edge equal, everything in the last bucket.
    tied = np.full(4, 3.0)
    assert assign_buckets(tied, quantile_edges(tied, 3)).tolist() == [3, 3, 3, 3]


def test_bucket_table_known_answers():
    # Layer 0, text: entropies 0..3 with KL 10*entropy; layer 1, text: entropies 4..7 with KL 1;
    # visual: one layer, entropies [5, 5, 5, 9] (ties) with KL [2, 2, 2, 4].
    rows = []
    for e in range(4):
        rows.append(("s0", 0, "text", float(e), 10.0 * e))
        rows.append(("s0", 1, "text", float(e + 4), 1.0))
    for e, kl in ((5, 2), (5, 2), (5, 2), (9, 4)):
        rows.append(("s0", 0, "visual", float(e), float(kl)))
    table = pd.DataFrame(rows, columns=["sample_id", "layer", "token_group", "base_entropy", "kl_base_rlvr"])
    buckets = bucket_table(table, n_buckets=2)
    assert len(buckets) == 2 * (1 + 2) + 2 * (1 + 1)

    def get(scope, layer, group):
        sel = buckets[(buckets.scope == scope) & (buckets.layer == layer) & (buckets.token_group == group)]
        return sel.sort_values("bucket")

    pooled_text = get("pooled", -1, "text")  # entropies 0..7, median edge 3.5
    assert pooled_text["n"].tolist() == [4, 4]
    np.testing.assert_allclose(pooled_text["entropy_lo"], [0.0, 3.5])
    np.testing.assert_allclose(pooled_text["entropy_hi"], [3.5, 7.0])
    np.testing.assert_allclose(pooled_text["mean_kl"], [15.0, 1.0])
    layer0 = get("layer", 0, "text")  # entropies 0..3, edge 1.5: KL {0, 10} and {20, 30}
    assert layer0["n"].tolist() == [2, 2]
    np.testing.assert_allclose(layer0["mean_kl"], [5.0, 25.0])
    np.testing.assert_allclose(layer0["median_kl"], [5.0, 25.0])
    np.testing.assert_allclose(layer0["sem_kl"], [5.0, 5.0])
    np.testing.assert_allclose(layer0["ci_low"], [5.0 - 1.96 * 5.0, 25.0 - 1.96 * 5.0])
    visual = get("pooled", -1, "visual")  # entropies [5, 5, 5, 9]: edges [5, 5, 9]; ties go up
    np.testing.assert_allclose(visual["entropy_lo"], [5.0, 5.0])
    assert visual["n"].tolist() == [0, 4]
    assert np.isnan(visual["mean_kl"].iloc[0])
    np.testing.assert_allclose(visual["mean_kl"].iloc[1], 2.5)
    assert set(get("layer", 1, "visual")["n"]) == set()  # no visual rows at layer 1


# -- a full run ----------------------------------------------------------------------------------


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def reference(vl_pair, make_dataset):
    """An uninterrupted in-memory run over 4 samples."""
    samples = load_jsonl(make_dataset(4))
    return samples, run_drift(vl_pair, samples, None, DriftConfig(n_buckets=3))


def test_run_drift_outputs(vl_pair, reference, tmp_path):
    samples, ref = reference
    result = run_drift(vl_pair, samples, tmp_path / "out", DriftConfig(n_buckets=3), csv=True)
    assert len(list((tmp_path / "out" / "records").glob("part-*.parquet"))) == 1  # one shard for 4 samples
    for name in (
        "records.jsonl",
        "drift_table.csv",
        "drift_buckets.csv",
        "drift_spearman.csv",
        "kl_by_entropy.png",
        "kl_by_entropy.pdf",
    ):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    table = result.table
    assert set(table["role"]) == {"visual", "prompt", "template", "response"}
    assert set(table["token_group"]) == {"visual", "text"}
    assert len(table) == sum(
        vl_pair.n_layers * vl_pair.encode(s.question, s.images, s.response).n_tokens for s in samples
    )
    pd.testing.assert_frame_equal(table, ref.table)
    pd.testing.assert_frame_equal(result.buckets, ref.buckets)
    # The pooled bucket counts add up to the number of readouts of each token group.
    pooled = result.buckets[result.buckets.scope == "pooled"]
    assert pooled.groupby("token_group")["n"].sum().to_dict() == table["token_group"].value_counts().to_dict()
    csv = pd.read_csv(tmp_path / "out" / "drift_buckets.csv")
    assert len(csv) == len(result.buckets)
    # The CSV export holds the same rows as the Parquet shards.
    exported = pd.read_csv(tmp_path / "out" / "drift_table.csv")
    assert len(exported) == len(table) and list(exported.columns) == list(table.columns)
    np.testing.assert_array_equal(exported["kl_base_rlvr"].to_numpy(np.float32), table["kl_base_rlvr"])


def _counting(monkeypatch, fail_at=None, before=None):
    """Wrap drift_record: count calls, optionally run ``before(sample)`` or raise at call ``fail_at``."""
    real = kd.drift_record
    calls: list[str] = []

    def wrapped(pair, sample, config):
        calls.append(sample.id)
        if before is not None:
            before(len(calls), sample)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(pair, sample, config)

    monkeypatch.setattr(kd, "drift_record", wrapped)
    return calls


def _check_resumed(out, samples, ref, result):
    ids = [r["sample_id"] for r in _records(out / "records.jsonl")]
    assert sorted(ids) == sorted(s.id for s in samples) and len(ids) == len(set(ids))
    sort = ["sample_id", "layer", "position"]
    pd.testing.assert_frame_equal(
        result.table.sort_values(sort).reset_index(drop=True),
        ref.table.sort_values(sort).reset_index(drop=True),
    )
    pd.testing.assert_frame_equal(result.buckets, ref.buckets)


def test_resume_after_keyboard_interrupt(vl_pair, reference, tmp_path, monkeypatch):
    samples, ref = reference
    out = tmp_path / "out"
    calls = _counting(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3))
    assert [r["sample_id"] for r in _records(out / "records.jsonl")] == ["s0", "s1"]
    assert not (out / "drift_table.csv").exists()
    calls.clear()
    monkeypatch.undo()
    calls = _counting(monkeypatch)
    result = run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3))
    assert calls == ["s2", "s3"]  # only the missing samples are computed
    _check_resumed(out, samples, ref, result)


def test_resume_after_image_breaks_mid_run(vl_pair, reference, tmp_path, monkeypatch):
    samples, ref = reference
    out = tmp_path / "out"
    victim = samples[2].image
    good = victim.read_bytes()

    def corrupt(n, sample):  # the image passes validation, then breaks before its sample runs
        if n == 2:
            victim.write_bytes(b"garbage" * 20)

    _counting(monkeypatch, before=corrupt)
    with pytest.raises(InputError, match="corrupt"):
        run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3))
    assert [r["sample_id"] for r in _records(out / "records.jsonl")] == ["s0", "s1"]
    monkeypatch.undo()
    victim.write_bytes(good)
    calls = _counting(monkeypatch)
    result = run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3))
    assert calls == ["s2", "s3"]
    _check_resumed(out, samples, ref, result)


def test_resume_cuts_torn_last_line(vl_pair, reference, tmp_path, monkeypatch):
    samples, ref = reference
    out = tmp_path / "out"
    run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3))
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 4
    # The process died while writing the last record: half a line, no newline.
    (out / "records.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    calls = _counting(monkeypatch)
    result = run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3))
    assert calls == [lines[3][len('{"sample_id":"') :].split('"')[0]]  # recomputed exactly once
    assert (out / "records.jsonl").read_text().splitlines(keepends=True)[:3] == lines[:3]
    _check_resumed(out, samples, ref, result)


def test_no_resume_starts_afresh(vl_pair, reference, tmp_path, monkeypatch):
    samples, ref = reference
    out = tmp_path / "out"
    run_drift(vl_pair, samples[:2], out, DriftConfig(n_buckets=3))
    calls = _counting(monkeypatch)
    run_drift(vl_pair, samples, out, DriftConfig(n_buckets=3), resume=False)
    assert calls == [s.id for s in samples]
    assert len(_records(out / "records.jsonl")) == 4


def test_text_only_pair_drift(lm_pair, make_dataset):
    samples = load_jsonl(make_dataset(3, text_only=True))
    result = run_drift(lm_pair, samples, None, DriftConfig(n_buckets=2))
    assert set(result.table["token_group"]) == {"text"}
    assert (result.table["kl_base_rlvr"] >= 0).all()


def test_resume_with_other_settings_is_refused(vl_pair, make_dataset, tmp_path):
    """Records made with other settings are never silently mixed with new ones."""
    from analyses.kl_drift import DriftConfig, run_drift
    from lens.datasets import load_jsonl
    from lens.errors import ConfigError

    samples = load_jsonl(make_dataset(2))
    out = tmp_path / "out"
    run_drift(vl_pair, samples, out, DriftConfig(layers=(0, 1)))
    # Bucketing is applied after the records: a different bucket count resumes fine.
    run_drift(vl_pair, samples, out, DriftConfig(layers=(0, 1), n_buckets=3))
    with pytest.raises(ConfigError, match="other settings.*layers"):
        run_drift(vl_pair, samples, out, DriftConfig(layers=(0, 2)))
    result = run_drift(vl_pair, samples, out, DriftConfig(layers=(0, 2)), resume=False)
    assert sorted(result.table["layer"].unique()) == [0, 2]
