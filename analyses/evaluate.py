"""Greedy pass@1 and sampled pass@k of several models on a verifiable task, with bootstrap CIs.

For every model and item: one greedy generation (``do_sample=False``) and ``n`` samples at temperature
1.0 with no top-k / top-p truncation, vision special tokens suppressed. pass@k is the unbiased estimator
of Chen et al. (2021) on the ``n`` samples; CIs are percentile bootstraps over items, and differences
between a twin and the base use a paired bootstrap over the same items.

Outputs are tidy ``pandas`` tables:

* ``per_item``: one row per model x item (``greedy`` 0/1, ``correct`` out of ``n``).
* ``summary``: one row per model x qtype x metric x k (``qtype == "all"`` pools the question types).
* ``differences``: one row per twin x qtype x metric x k, ``twin - base`` with a paired CI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from lens.errors import ConfigError
from lens.metrics import bootstrap_ci, paired_bootstrap_ci, pass_at_k_array

GREEDY = "greedy_pass@1"
PASS = "pass@k"


class BatchEncoder(Protocol):
    """What the evaluation needs to turn samples into equal-length model inputs.

    :class:`lens.organism.model.Encoder` implements it.
    """

    tok: Any

    def encode(self, questions: Sequence[str], images: Sequence[Any]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    Attributes:
        ks: Budgets for pass@k; each must be <= ``n``.
        n: Samples per item at temperature 1.0.
        max_new_tokens: Generation length.
        n_boot: Bootstrap resamples.
        seed: Seed of the bootstrap, and of sampling: each (item, model) draws from its own generator
            seeded by :func:`item_seed`, so results do not depend on batching or on resumption.
    """

    ks: tuple[int, ...] = (1, 4, 8, 16)
    n: int = 16
    max_new_tokens: int = 4
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"--n must be >= 1, got {self.n}")
        if not self.ks:
            raise ConfigError("--k needs at least one value")
        bad = [k for k in self.ks if k < 1 or k > self.n]
        if bad:
            raise ConfigError(f"--k values {bad} are outside [1, n={self.n}]; raise --n or lower --k")


def item_seed(seed: int, model: str, item: str, setting: str = "sampled") -> int:
    """The sampling seed of one (item, model, setting): independent of batching, order and resumption."""
    digest = hashlib.sha256(f"{seed}/{model}/{item}/{setting}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def record_key(model: str, item: str) -> str:
    """Record key of one (model, item) in the evaluation's record file."""
    return f"{model}:{item}"


def score_item(
    model: Any,
    encoder: Any,
    sample: Any,
    verifier: Callable[[str, Any], bool],
    cfg: EvalConfig,
    name: str,
) -> dict[str, Any]:
    """Greedy and ``n`` sampled generations of one item, scored.

    The item is generated alone (no other item in its batch) and its sampler is seeded from
    :func:`item_seed`, so the record is the same whichever items ran before it, in any batch, and an
    interrupted evaluation resumed later equals an uninterrupted one byte for byte.
    """
    from lens.organism.train import rollout  # the batched generate loop (suppresses vision tokens)

    greedy = rollout(model, encoder, [sample], n=1, do_sample=False, max_new_tokens=cfg.max_new_tokens)[0]
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(item_seed(cfg.seed, name, str(sample.id)))
        sampled = rollout(model, encoder, [sample], n=cfg.n, do_sample=True, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.n)[0]  # fmt: skip
    return {
        "model": name,
        "id": sample.id,
        "qtype": sample.qtype,
        "greedy": int(verifier(greedy[0], sample.answer)),
        "correct": int(sum(verifier(t, sample.answer) for t in sampled)),
        "n": cfg.n,
        "response": greedy[0],
    }


def score_model(
    model: Any,
    encoder: Any,
    samples: Sequence[Any],
    verifier: Callable[[str, Any], bool],
    cfg: EvalConfig = EvalConfig(),
    name: str = "model",
    writer: Any | None = None,
    progress: Any | None = None,
) -> pd.DataFrame:
    """Greedy and sampled correctness of one model on every sample.

    Args:
        model: A generative model taking the encoder's batch as keyword arguments.
        encoder: A :class:`BatchEncoder`.
        samples: Items with ``id``, ``question``, ``image``, ``answer`` and ``qtype``.
        verifier: ``verifier(response_text, answer) -> bool``.
        cfg: Settings.
        name: Model name (record keys and the ``model`` column).
        writer: Optional :class:`lens.records.RecordWriter`; items already in it are skipped and their
            stored results reused, so an interrupted evaluation resumes.
        progress: Optional tqdm bar, advanced by one per item.

    Returns:
        One row per item: ``model, id, qtype, greedy, correct, n, response``.
    """
    done: dict[str, dict[str, Any]] = {}
    if writer is not None:
        keys = {record_key(name, str(s.id)): str(s.id) for s in samples}
        done = {keys[r["sample_id"]]: r for r in writer.read(k for k in keys if k in writer)}
    skipped = len(done)
    if progress is not None and skipped:
        progress.update(skipped)
    for s in samples:
        if str(s.id) in done:
            continue
        rec = score_item(model, encoder, s, verifier, cfg, name)
        if writer is not None:
            writer.write(record_key(name, str(s.id)), rec)
        done[str(s.id)] = rec
        if progress is not None:
            progress.update(1)
    rows = [done[str(s.id)] for s in samples]
    return pd.DataFrame(rows, columns=["model", "id", "qtype", "greedy", "correct", "n", "response"])


def _metric_values(df: pd.DataFrame, metric: str, k: int) -> np.ndarray:
    if metric == GREEDY:
        return df["greedy"].to_numpy(dtype=float)
    n = int(df["n"].iloc[0])
    return pass_at_k_array(n, df["correct"].to_numpy(), k)


def _groups(per_item: pd.DataFrame) -> list[str]:
    # Items without a question type count in "all" only.
    return ["all", *sorted(str(q) for q in per_item["qtype"].dropna().unique())]


def _select(df: pd.DataFrame, qtype: str) -> pd.DataFrame:
    return df if qtype == "all" else df[df["qtype"] == qtype]


def summarise(per_item: pd.DataFrame, ks: Sequence[int], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Long table: ``model, qtype, metric, k, estimate, ci_low, ci_high, n_items``."""
    rows = []
    for model, dm in per_item.groupby("model", sort=False):
        for qtype in _groups(per_item):
            d = _select(dm, qtype).sort_values("id")
            for metric, k in [(GREEDY, 1)] + [(PASS, k) for k in ks]:
                v = _metric_values(d, metric, k)
                lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
                rows.append(dict(model=model, qtype=qtype, metric=metric, k=k, estimate=float(v.mean()),
                                 ci_low=lo, ci_high=hi, n_items=len(v)))  # fmt: skip
    return pd.DataFrame(rows)


def paired_differences(
    per_item: pd.DataFrame,
    ks: Sequence[int],
    base: str = "base",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """``twin - base`` for every other model, with paired-bootstrap CIs over the same items.

    Returns:
        ``twin, qtype, metric, k, diff, ci_low, ci_high, n_items``.
    """
    if base not in set(per_item["model"]):
        raise ConfigError(f"no model named {base!r} to compare against")
    rows = []
    db = per_item[per_item["model"] == base]
    for twin in [m for m in per_item["model"].unique() if m != base]:
        dt = per_item[per_item["model"] == twin]
        for qtype in _groups(per_item):
            a = _select(db, qtype).sort_values("id")
            b = _select(dt, qtype).sort_values("id")
            if list(a["id"]) != list(b["id"]):
                raise ConfigError(f"{base} and {twin} were scored on different items")
            for metric, k in [(GREEDY, 1)] + [(PASS, k) for k in ks]:
                d, lo, hi = paired_bootstrap_ci(_metric_values(a, metric, k), _metric_values(b, metric, k),
                                                n_boot=n_boot, seed=seed)  # fmt: skip
                rows.append(dict(twin=twin, qtype=qtype, metric=metric, k=k, diff=d, ci_low=lo, ci_high=hi,
                                 n_items=len(a)))  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class EvalResult:
    """Tables of one evaluation run."""

    per_item: pd.DataFrame
    summary: pd.DataFrame
    differences: pd.DataFrame


def evaluate(
    models: Mapping[str, Any],
    encoder: Any,
    samples: Sequence[Any],
    verifier: Callable[[str, Any], bool],
    cfg: EvalConfig = EvalConfig(),
    base: str = "base",
    writer: Any | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score every model on every sample, then summarise with CIs.

    Args:
        models: Name to model; all must share ``encoder``'s tokenizer.
        encoder: A :class:`BatchEncoder` for the samples.
        samples: The items.
        verifier: The task's verifier.
        cfg: Settings.
        base: Name of the reference model for paired differences (skipped if absent).
        writer: Optional resumable per-item record writer.
        progress: Show a tqdm bar.
    """
    if not samples:
        raise ConfigError("no samples to evaluate")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(models) * len(samples), desc="eval", disable=not progress, unit="item")
    frames = [
        score_model(m, encoder, samples, verifier, cfg, name, writer, bar) for name, m in models.items()
    ]
    bar.close()
    per_item = pd.concat(frames, ignore_index=True)
    summary = summarise(per_item, cfg.ks, cfg.n_boot, cfg.seed)
    diffs = (
        paired_differences(per_item, cfg.ks, base, cfg.n_boot, cfg.seed)
        if base in models and len(models) > 1
        else pd.DataFrame()
    )
    return EvalResult(per_item, summary, diffs)


def summarise_runs(
    runs: pd.DataFrame, ks: Sequence[int], base: str = "base", n_boot: int = 2000, seed: int = 0
) -> EvalResult:
    """An evaluation from the per-item table of :func:`analyses.intervention.run_settings`.

    Each strategy (``base``, ``rlvr``: the models of the pair as they are) is one model; ``twin -
    base`` differences are paired over the same items.

    Args:
        runs: One row per (strategy, item): ``strategy, item, qtype, greedy, correct, n, response``.
        ks: pass@k budgets (each <= the samples per item; empty for greedy only).
        base: The reference model for paired differences.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.
    """
    columns = {"strategy": "model", "item": "id"}
    keep = ["model", "id", "qtype", "greedy", "correct", "n", "response", "extracted", "verifier"]
    per_item = runs.rename(columns=columns)[[c for c in keep if c in runs.rename(columns=columns)]]
    summary = summarise(per_item, ks, n_boot, seed)
    models = set(per_item["model"])
    diffs = (
        paired_differences(per_item, ks, base, n_boot, seed) if base in models and len(models) > 1 else None
    )
    return EvalResult(per_item, summary, pd.DataFrame() if diffs is None else diffs)


def wide_table(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """One row per model x qtype, one column per metric: ``estimate [low, high]``."""
    s = summary.copy()
    s["col"] = np.where(s["metric"] == GREEDY, "greedy p@1", "p@" + s["k"].astype(str))
    s["cell"] = s.apply(
        lambda r: f"{r.estimate:.{digits}f} [{r.ci_low:.{digits}f}, {r.ci_high:.{digits}f}]", axis=1
    )
    order = list(dict.fromkeys(s["col"]))
    out = s.pivot_table(index=["model", "qtype"], columns="col", values="cell", aggfunc="first", sort=False)
    return out[order]


from lens.plot.passk import plot_pass_at_k  # noqa: E402  (re-exported for callers of this module)


def write_outputs(result: EvalResult, out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Write ``per_item.csv``, ``summary.csv``, ``differences.csv``, ``table.md`` and ``pass_at_k.{png,pdf}``
    (the figure only when there are sampled pass@k values: greedy-only runs have no curve to draw)."""
    import matplotlib.pyplot as plt

    from lens.plot.style import save_figure
    from lens.records import atomic_write, write_tables

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = {"per_item": result.per_item, "summary": result.summary, "differences": result.differences}
    written += write_tables(out, tables)
    md = wide_table(result.summary).to_markdown()
    written.append(atomic_write(out / "table.md", lambda p: Path(p).write_text(md + "\n")))
    if (result.summary["metric"] == PASS).any():
        fig = plot_pass_at_k(result.summary, title)
        written += save_figure(fig, out / "pass_at_k")
        plt.close(fig)
    return written
