"""Frozen reference: the drift table, buckets and Spearman as computed before the columnar tables.

A plain copy of ``analyses/kl_drift.py`` (and the base64 record packing of ``lens/records.py``) at
commit 2772ee0, kept unchanged as the oracle of ``tests/test_tables.py`` and the "today" path of
``benchmarks/bench_tables.py``: records are JSON lines with base64 float32 arrays, the tidy table is
one pandas DataFrame with object columns, buckets and Spearman are computed on it with
``np.quantile`` and ``scipy.stats.spearmanr``. Do not edit, except to follow a deliberate change of
the semantics (then say so in the commit).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

VISUAL, TEXT = "visual", "text"


class DatasetError(ValueError):
    """Stand-in for ``lens.errors.DatasetError`` (the reference has no imports from the package)."""


ConfigError = DatasetError


def legacy_record(layers, roles, base_entropy, rlvr_entropy, kl_base_rlvr) -> dict[str, Any]:
    """A record's fields as ``drift_record`` packed them (everything in the JSON line)."""
    return {
        "layers": list(layers),
        "roles": list(roles),
        "base_entropy": pack_array(base_entropy),
        "rlvr_entropy": pack_array(rlvr_entropy),
        "kl_base_rlvr": pack_array(kl_base_rlvr),
    }


def pack_array(array: Any) -> dict[str, Any]:
    """Encode a float32/int array compactly for a JSON record (base64 of the raw bytes)."""
    import base64

    import numpy as np

    arr = np.ascontiguousarray(array)
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
    return {
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "b64": base64.b64encode(arr.tobytes()).decode(),
    }


def unpack_array(packed: dict[str, Any]) -> Any:
    """Inverse of :func:`pack_array`."""
    import base64

    import numpy as np

    raw = base64.b64decode(packed["b64"])
    return np.frombuffer(raw, dtype=packed["dtype"]).reshape(packed["shape"]).copy()


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
