"""KL drift by base entropy: how far RLVR moved each (layer, token) readout, against how sure the base was.

Pipeline: per sample, the logit lens of both models gives base entropy, RLVR entropy and
KL(P_base ‖ P_rlvr) per (layer, position); records are written per sample (resumable); then the
tidy table is bucketed by base-entropy quantile, per layer and pooled, visual and text tokens apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy import stats as sps

from lens.datasets import check_images, sample_images
from lens.errors import ConfigError, DatasetError, InputError
from lens.fingerprint import pair_fingerprint, sample_digests
from lens.logit_lens import LensConfig, pair_lens
from lens.records import RecordWriter, pack_array, unpack_array, write_tables

VISUAL, TEXT = "visual", "text"


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


def drift_record(pair: Any, sample: SampleLike, config: DriftConfig) -> dict[str, Any]:
    """Lens statistics of one sample, packed for a record file."""
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
    return {
        "layers": list(result.layers),
        "roles": list(result.roles),
        "base_entropy": pack_array(result.base_entropy.numpy()),
        "rlvr_entropy": pack_array(result.rlvr_entropy.numpy()),
        "kl_base_rlvr": pack_array(result.kl_base_rlvr.numpy()),
    }


def record_frame(record: dict[str, Any]) -> pd.DataFrame:
    """Tidy rows of one record: one row per (layer, position)."""
    base_entropy = unpack_array(record["base_entropy"])
    n_layers, n_tokens = base_entropy.shape
    roles = np.asarray(record["roles"])
    return pd.DataFrame(
        {
            "sample_id": record["sample_id"],
            "layer": np.repeat(np.asarray(record["layers"]), n_tokens),
            "position": np.tile(np.arange(n_tokens), n_layers),
            "role": np.tile(roles, n_layers),
            "base_entropy": base_entropy.reshape(-1),
            "rlvr_entropy": unpack_array(record["rlvr_entropy"]).reshape(-1),
            "kl_base_rlvr": unpack_array(record["kl_base_rlvr"]).reshape(-1),
        }
    )


def drift_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The tidy table, one row per (sample, layer, position), from records."""
    frames = [record_frame(r) for r in records]
    if not frames:
        raise DatasetError("no drift records to tabulate")
    table = pd.concat(frames, ignore_index=True)
    table["token_group"] = np.where(table["role"] == VISUAL, VISUAL, TEXT)
    return table


def quantile_edges(values: np.ndarray, n_buckets: int) -> np.ndarray:
    """``n_buckets + 1`` quantile edges of ``values`` (first = min, last = max)."""
    return np.quantile(values, np.linspace(0.0, 1.0, n_buckets + 1))


def assign_buckets(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket index 1..n of each value: bucket b holds ``edges[b-1] <= v < edges[b]`` (last one closed)."""
    return np.searchsorted(edges[1:-1], values, side="right") + 1


def _summarise(frame: pd.DataFrame, n_buckets: int, keys: dict[str, Any]) -> list[dict[str, Any]]:
    entropy = frame["base_entropy"].to_numpy(dtype=np.float64)
    kl = frame["kl_base_rlvr"].to_numpy(dtype=np.float64)
    edges = quantile_edges(entropy, n_buckets)
    bucket = assign_buckets(entropy, edges)
    rows = []
    for b in range(1, n_buckets + 1):
        sel = kl[bucket == b]
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


def bucket_table(table: pd.DataFrame, n_buckets: int = 5) -> pd.DataFrame:
    """Mean KL per base-entropy quantile bucket, pooled over layers and per layer, per token group.

    Edges are quantiles of the base entropy within each (scope, layer, token group), so each
    bucket holds about the same number of readouts. Ties at an edge go to the upper bucket.

    Returns:
        One row per (scope, layer, token_group, bucket) with edges, count, mean/median KL and a
        normal-approximation 95% CI of the mean. ``layer`` is ``-1`` for pooled rows.
    """
    if n_buckets < 1:
        raise ConfigError(f"n_buckets must be >= 1, got {n_buckets}")
    rows: list[dict[str, Any]] = []
    for group, sub in table.groupby("token_group", sort=True):
        rows += _summarise(sub, n_buckets, {"scope": "pooled", "layer": -1, "token_group": group})
        for layer, layer_rows in sub.groupby("layer", sort=True):
            rows += _summarise(
                layer_rows, n_buckets, {"scope": "layer", "layer": int(layer), "token_group": group}
            )
    return pd.DataFrame(rows)


def correlation_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ between base entropy and KL, pooled and per layer, per token group."""
    rows = []
    for group, sub in table.groupby("token_group", sort=True):
        scopes = [("pooled", -1, sub)] + [("layer", int(k), v) for k, v in sub.groupby("layer", sort=True)]
        for scope, layer, frame in scopes:
            rho, p = sps.spearmanr(frame["base_entropy"], frame["kl_base_rlvr"])
            rows.append(
                {
                    "scope": scope,
                    "layer": layer,
                    "token_group": group,
                    "n": len(frame),
                    "spearman_rho": rho,
                    "p_value": p,
                }
            )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class DriftResult:
    """Outputs of a drift run."""

    table: pd.DataFrame
    buckets: pd.DataFrame
    correlations: pd.DataFrame
    out_dir: Path | None = None


def run_drift(
    pair: Any,
    samples: Sequence[SampleLike],
    out_dir: str | Path | None = None,
    config: DriftConfig = DriftConfig(),
    resume: bool = True,
    progress: bool = False,
    title: str | None = None,
) -> DriftResult:
    """Run the drift analysis over a dataset.

    Args:
        pair: A :class:`lens.ModelPair`.
        samples: Dataset items (``id``, ``question``, ``image``, optional ``response``).
        out_dir: Where to write ``records.jsonl``, ``drift_table.csv``, ``drift_buckets.csv``,
            ``drift_spearman.csv`` and ``kl_by_entropy.{png,pdf}``. ``None`` keeps everything in memory.
        config: Buckets, layers, chunking.
        resume: Keep records already in ``out_dir`` and skip their samples.
        progress: Show a progress bar.
        title: Figure title.

    Returns:
        The tidy table, the bucket table and the Spearman table.
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
        records = [{"sample_id": s.id, **drift_record(pair, s, config)} for s in samples]
    else:
        out = Path(out_dir)
        settings = {"pair": list(getattr(pair, "names", ())), **asdict(config)}
        settings.pop("n_buckets")  # bucketing happens after the records
        writer = RecordWriter(
            out / "records.jsonl", resume, settings, pair_fingerprint(pair), sample_digests(samples)
        )
        todo = [s for s in samples if s.id not in writer]
        for sample in tqdm(
            todo,
            desc="drift",
            unit="sample",
            disable=not progress,
            initial=len(samples) - len(todo),
            total=len(samples),
        ):
            writer.write(sample.id, drift_record(pair, sample, config))
        records = writer.read(s.id for s in samples)
    table = drift_table(records)
    buckets = bucket_table(table, config.n_buckets)
    correlations = correlation_table(table)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(out, {"drift_table": table, "drift_buckets": buckets, "drift_spearman": correlations})
        from lens.plot.drift import plot_kl_by_entropy
        from lens.plot.style import save_figure

        fig = plot_kl_by_entropy(buckets, title=title)
        save_figure(fig, out / "kl_by_entropy")
        import matplotlib.pyplot as plt

        plt.close(fig)
    return DriftResult(table, buckets, correlations, None if out_dir is None else Path(out_dir))


def summary_table(result: DriftResult) -> pd.DataFrame:
    """Pooled mean KL per bucket, one column per token group, for printing."""
    pooled = result.buckets[result.buckets["scope"] == "pooled"]
    wide = pooled.pivot(index="bucket", columns="token_group", values="mean_kl")
    wide.columns = [f"mean KL ({c})" for c in wide.columns]
    counts = pooled.pivot(index="bucket", columns="token_group", values="n")
    for c in counts.columns:
        wide[f"n ({c})"] = counts[c]
    return wide
