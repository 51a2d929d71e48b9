"""KL drift of several models at once: a base against several RLVR twins, or base → SFT → RL stages.

Per sample, every model runs forward and reads its logit lens once (:func:`lens.logit_lens.multi_lens`),
and each comparison ``(reference, other)`` gets the tidy rows of :mod:`analyses.kl_drift`: the
reference's entropy in ``base_entropy``, the other's in ``rlvr_entropy`` and
KL(P_reference ‖ P_other) in ``kl_base_rlvr``. Records are keyed ``"<reference>→<other>/<sample>"``,
so a run resumes per comparison and shards like any other run. The bucket and Spearman tables are
those of a pair run, computed per comparison (each bucketed by the entropy of *its* reference) and
stacked with ``comparison``, ``reference`` and ``twin`` columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.drift_stats import drift_statistics
from analyses.kl_drift import DRIFT_SCHEMA, DriftConfig, DriftRecord, SampleLike, legacy_table
from lens.datasets import check_images, sample_images
from lens.datasets.sample import sample_videos
from lens.errors import DatasetError, InputError
from lens.fingerprint import models_fingerprint, sample_digests
from lens.logit_lens import LensConfig, multi_lens
from lens.modelset import ModelSet, label, stack_comparisons
from lens.records import RecordWriter, write_tables
from lens.tables import ColumnarTable, SamplePart, ShardWriter, table_from_records


@dataclass(frozen=True)
class SetDriftResult:
    """Outputs of a drift run over a model set.

    Attributes:
        buckets: Bucket table with ``comparison``, ``reference`` and ``twin`` first.
        correlations: Spearman table, the same way.
        tidy: Each comparison's tidy table, by its label (``"base→rl"``).
        out_dir: Where the outputs were written.
    """

    buckets: pd.DataFrame
    correlations: pd.DataFrame
    tidy: dict[str, ColumnarTable]
    out_dir: Path | None = None


def set_records(
    models: ModelSet, sample: SampleLike, config: DriftConfig
) -> dict[tuple[str, str], DriftRecord]:
    """Lens statistics of one sample for every comparison of the set."""
    inputs = models.encode(
        sample.question,
        sample_images(sample),
        response=sample.response if config.teacher_force else None,
        videos=sample_videos(sample),
    )
    results = multi_lens(
        models.models,
        models.adapter,
        inputs,
        models.comparisons,
        LensConfig(layers=config.layers, token_chunk=config.token_chunk),
    )
    return {
        pair: DriftRecord(
            str(sample.id),
            tuple(int(x) for x in result.layers),
            tuple(result.roles),
            result.base_entropy.numpy(),
            result.rlvr_entropy.numpy(),
            result.kl_base_rlvr.numpy(),
        )
        for pair, result in results.items()
    }


def run_set_drift(
    models: ModelSet,
    samples: Sequence[SampleLike],
    out_dir: str | Path | None = None,
    config: DriftConfig = DriftConfig(),
    resume: bool = True,
    progress: bool = False,
    title: str | None = None,
    shard: Any = None,
) -> SetDriftResult | None:
    """Run the drift analysis of every comparison of ``models`` over a dataset.

    Writes (with ``out_dir``): ``records.jsonl`` with the tidy rows in ``records/``,
    ``drift_buckets.csv`` and ``drift_spearman.csv`` (a ``comparison`` column), and
    ``kl_by_entropy.{png,pdf}`` (one curve per comparison).

    Returns:
        The stacked tables and each comparison's tidy table (``None`` for a shard of a sharded run).
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    from tqdm.auto import tqdm

    check_images(samples)
    if not models.adapter.multimodal:
        with_images = [s.id for s in samples if sample_images(s) or sample_videos(s)]
        if with_images:
            raise InputError(
                f"{models.adapter.name} takes no images or videos, but sample {with_images[0]!r} has one"
            )
    labels = {pair: label(pair) for pair in models.comparisons}
    parts: dict[tuple[str, str], list[SamplePart]] = {pair: [] for pair in models.comparisons}
    if out_dir is None:
        for sample in samples:
            for pair, record in set_records(models, sample, config).items():
                parts[pair].append(
                    SamplePart(record.sample_id, table=record.to_arrow(), fields=record.fields())
                )
    else:
        out = Path(out_dir)
        settings = {"models": list(models.names), "comparisons": [labels[p] for p in models.comparisons]}
        settings.update(asdict(config))
        settings.pop("n_buckets")
        digests = sample_digests(samples)
        inputs = {f"{labels[p]}/{sid}": d for p in models.comparisons for sid, d in digests.items()}
        writer = RecordWriter(
            out / "records.jsonl", resume, settings, models_fingerprint(models.models), inputs, shard
        )
        todo = [s for s in samples if any(writer.todo(f"{labels[p]}/{s.id}") for p in models.comparisons)]
        with writer, ShardWriter(writer, DRIFT_SCHEMA) as shards:
            for sample in tqdm(todo, desc="drift", unit="sample", disable=not progress):
                for pair, record in set_records(models, sample, config).items():
                    key = f"{labels[pair]}/{sample.id}"
                    if writer.todo(key):
                        shards.add(key, record.to_arrow(), record.fields())
            if writer.partial:
                return None
        for pair in models.comparisons:
            prefix = f"{labels[pair]}/"
            records = writer.read(prefix + str(s.id) for s in samples)
            # The tidy table is per sample: its parts carry the sample's id, not the record key.
            records = [{**r, "sample_id": str(r["sample_id"]).removeprefix(prefix)} for r in records]
            table = table_from_records(records, out, DRIFT_SCHEMA, legacy_table)
            parts[pair] = list(table.parts)
    tidy = {labels[p]: ColumnarTable(tuple(parts[p]), DRIFT_SCHEMA) for p in models.comparisons}
    stats = {pair: drift_statistics(tidy[labels[pair]], config.n_buckets) for pair in models.comparisons}
    buckets = stack_comparisons({pair: s[0] for pair, s in stats.items()})
    correlations = stack_comparisons({pair: s[1] for pair, s in stats.items()})
    if out_dir is not None:
        import matplotlib.pyplot as plt

        from lens.plot.drift import plot_kl_by_entropy
        from lens.plot.style import save_figure

        out = Path(out_dir)
        write_tables(out, {"drift_buckets": buckets, "drift_spearman": correlations})
        fig = plot_kl_by_entropy(buckets, title=title)
        save_figure(fig, out / "kl_by_entropy")
        plt.close(fig)
    return SetDriftResult(buckets, correlations, tidy, None if out_dir is None else Path(out_dir))
