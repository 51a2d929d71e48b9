"""Interventions over a dataset: greedy pass@1 and sampled pass@k per strategy, resumable.

Strategies (``STRATEGIES``):

* ``rlvr``: the RLVR model as is; ``base``: the base model as is;
* ``hard-low`` / ``hard-high``: :class:`~lens.interventions.HardInjection` of the base's residual
  stream at low / high base-entropy visual tokens (released depth convention);
* ``replay`` / ``replay-high``: :class:`~lens.interventions.ActivationReplay` (released algorithm)
  with the low-entropy mask or the inverted one.

The mask rule (``mask_rule``) is shared by injection and replay: ``"tau_max"`` (the released
τ·max rule, the default) or ``"quantile"`` (rank-based: the lowest-entropy fraction q of the visual
tokens per layer; use it where the base entropies are near-uniform, e.g. on the organism).

Per item and strategy: one greedy decode and ``n`` samples at temperature 1.0 (top-k/top-p off,
vision special ids suppressed), scored with a verifier. The sampling seed depends on the item only,
so strategies see the same random numbers (paired comparisons are less noisy). One record per
(setting, item) goes to ``records.jsonl`` through :class:`lens.records.RecordWriter`, keyed
``"<setting>/<item id>"``, so an interrupted run resumes where it stopped.

Scoring: the organism's items use :func:`lens.organism.verify` (``answer N``). Other datasets use
:func:`numeric_match`: an exact match after trimming and lower-casing, or else the *last* number
in the response equal to the numeric ``answer`` (within 1e-6).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lens.errors import ConfigError, DatasetError
from lens.fingerprint import pair_fingerprint, sample_digests
from lens.interventions import ActivationReplay, Baseline, HardInjection, Intervention
from lens.masks import EntropyMask
from lens.metrics import bootstrap_ci, paired_bootstrap_ci, pass_at_k_array
from lens.records import RecordWriter, write_tables

#: Mask rules an intervention run accepts (``fixed`` needs per-layer thresholds; use the API).
MASK_CHOICES = ("tau_max", "quantile")
STRATEGIES = ("rlvr", "base", "hard-low", "hard-high", "replay", "replay-high")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

Verifier = Callable[[str, Any], bool]


def numeric_match(text: str | None, answer: Any) -> bool:
    """Exact (trimmed, lower-cased) match, else the last number in ``text`` equals a numeric ``answer``."""
    if not text or answer is None:
        return False
    if text.strip().lower() == str(answer).strip().lower():
        return True
    numbers = _NUMBER.findall(text)
    try:
        return bool(numbers) and math.isclose(float(numbers[-1]), float(answer), abs_tol=1e-6)
    except ValueError:
        return False


def default_verifier(samples: Sequence[Any]) -> Verifier:
    """The organism's verifier for organism items, :func:`numeric_match` otherwise."""
    from lens import organism

    if samples and all(isinstance(s, organism.Sample) for s in samples):
        return organism.verify
    return numeric_match


def default_layers(n_layers: int) -> tuple[int, ...]:
    """The released depth fraction: layers 0..15 of 28, i.e. the first 16/28 of the model."""
    return tuple(range(max(1, round(n_layers * 16 / 28))))


@dataclass(frozen=True)
class InterventionRunConfig:
    """Settings of an intervention run.

    Attributes:
        strategies: Which of :data:`STRATEGIES` to run.
        layers: Layers for injection and replay (``None``: :func:`default_layers`).
        tau: τ of the ``tau_max`` mask (injection and replay).
        mask_rule: ``"tau_max"`` (released) or ``"quantile"`` (rank-based), injection and replay.
        quantile: q of the ``quantile`` mask.
        alpha: Replay step size.
        steps: Replay steps.
        topk: Replay top-k.
        variant: Replay variant (``"released"`` or ``"paper"``).
        n: Samples per item for pass@k (0: greedy only).
        ks: pass@k budgets (each ≤ ``n``).
        max_new_tokens: Decode budget.
        seed: Base sampling seed (item ``i`` uses ``seed + i``).
        n_boot: Bootstrap resamples for the CIs.
    """

    strategies: tuple[str, ...] = STRATEGIES
    layers: tuple[int, ...] | None = None
    tau: float = 0.4
    mask_rule: str = "tau_max"
    quantile: float = 0.3
    alpha: float = 10.0
    steps: int = 25
    topk: int = 50
    variant: str = "released"
    n: int = 8
    ks: tuple[int, ...] = (1, 2, 4, 8)
    max_new_tokens: int = 4
    seed: int = 0
    n_boot: int = 2000

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ConfigError(f"unknown strategies {bad}; known: {', '.join(STRATEGIES)}")
        if self.n < 0:
            raise ConfigError(f"n must be >= 0, got {self.n}")
        wrong = [k for k in self.ks if not 1 <= k <= max(self.n, 0)]
        if self.n and wrong:
            raise ConfigError(f"k values {wrong} are outside [1, n={self.n}]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mask_rule not in MASK_CHOICES:
            raise ConfigError(f"mask rule must be one of {', '.join(MASK_CHOICES)}; got {self.mask_rule!r}")
        _ = self.mask  # validates tau and quantile

    @property
    def mask(self) -> EntropyMask:
        """The injection/replay selection rule."""
        return EntropyMask(rule=self.mask_rule, tau=self.tau, quantile=self.quantile)


def make_intervention(strategy: str, config: InterventionRunConfig, n_layers: int) -> Intervention:
    """Build the intervention of one strategy (validates every hyper-parameter up front)."""
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    if strategy == "rlvr":
        return Baseline("rlvr")
    if strategy == "base":
        return Baseline("base")
    select = "high" if strategy.endswith("-high") else "low"
    if strategy.startswith("hard"):
        return HardInjection(
            layers=layers, select=select, rule=config.mask_rule, tau=config.tau, quantile=config.quantile
        )
    return ActivationReplay(
        tau=config.tau,
        alpha=config.alpha,
        steps=config.steps,
        layers=layers,
        topk=config.topk,
        variant=config.variant,
        select=select,
        rule=config.mask_rule,
        quantile=config.quantile,
    )


def _images(sample: Any) -> tuple[Any, ...]:
    from lens.datasets import sample_images  # every image of a multi-image sample, not only the first

    return sample_images(sample)


def run_item(
    pair: Any,
    sample: Any,
    intervention: Intervention,
    config: InterventionRunConfig,
    verify: Verifier,
    seed: int,
) -> dict[str, Any]:
    """Prepare, decode greedily and ``n`` times sampled, and score one item."""
    import warnings

    inputs = pair.encode(sample.question, _images(sample))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        intervention.prepare(pair, inputs)
    prepared = time.perf_counter()
    greedy = intervention.generate(pair, inputs, max_new_tokens=config.max_new_tokens).texts[0]
    sampled: tuple[str, ...] = ()
    if config.n:
        sampled = intervention.generate(
            pair,
            inputs,
            n=config.n,
            do_sample=True,
            temperature=1.0,
            max_new_tokens=config.max_new_tokens,
            seed=seed,
        ).texts
    record: dict[str, Any] = {
        "item": str(sample.id),
        "qtype": getattr(sample, "qtype", None),
        "answer": None if sample.answer is None else str(sample.answer),
        "greedy": int(verify(greedy, sample.answer)),
        "correct": int(sum(verify(t, sample.answer) for t in sampled)),
        "n": len(sampled),
        "response": greedy,
        "prepare_s": prepared - start,
        "decode_s": time.perf_counter() - prepared,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    }
    result = getattr(intervention, "result", None)
    if result is not None:
        record.update(
            losses=list(result.losses),
            final_loss=result.final_loss,
            n_selected={str(k): v for k, v in result.n_selected.items()},
            offset_norm=float(result.offsets.norm()),
        )
    plan = getattr(intervention, "plan", None)
    if plan is not None:
        record["n_selected"] = {str(k): v for k, v in plan.n_selected.items()}
    return record


@dataclass(frozen=True)
class InterventionResult:
    """Outputs of a run: one row per (setting, item), the summary, and where files went."""

    per_item: pd.DataFrame
    summary: pd.DataFrame
    out_dir: Path | None = None


def run_settings(
    pair: Any,
    samples: Sequence[Any],
    interventions: Sequence[tuple[str, Intervention]],
    config: InterventionRunConfig,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = False,
    verify: Verifier | None = None,
) -> pd.DataFrame:
    """Run ``(strategy, intervention)`` pairs over ``samples``; return the per-item table.

    Records are keyed ``"<setting>/<item id>"``; with ``out_dir`` finished ones are skipped.
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    from tqdm.auto import tqdm

    verify = verify or default_verifier(samples)
    # Settings that change what a record holds; strategies, ks and n_boot do not (they select or summarise).
    settings = {"pair": list(getattr(pair, "names", ())), **asdict(config)}
    for key in ("strategies", "ks", "n_boot"):
        settings.pop(key)
    writer = None
    if out_dir is not None:
        digests = sample_digests(samples)
        inputs = {f"{i.setting()}/{sid}": d for _, i in interventions for sid, d in digests.items()}
        writer = RecordWriter(
            Path(out_dir) / "records.jsonl", resume, settings, pair_fingerprint(pair), inputs
        )
    memory: list[dict[str, Any]] = []
    wanted: set[str] = set()
    total = len(samples) * len(interventions)
    bar = tqdm(total=total, desc="intervene", unit="run", disable=not progress)
    for strategy, intervention in interventions:
        setting = intervention.setting()
        for index, sample in enumerate(samples):
            key = f"{setting}/{sample.id}"
            wanted.add(key)
            bar.update(1)
            if writer is not None and key in writer:
                continue
            record = {"strategy": strategy, "setting": setting}
            record.update(run_item(pair, sample, intervention, config, verify, config.seed + index))
            if writer is not None:
                writer.write(key, record)
            else:
                memory.append({"sample_id": key, **record})
    bar.close()
    records = memory if writer is None else writer.read(wanted)
    return per_item_table(records)


def per_item_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Tidy per-(setting, item) rows from records."""
    if not records:
        raise DatasetError("no intervention records to tabulate")
    frame = pd.DataFrame(list(records))
    for column in ("losses", "final_loss", "n_selected", "offset_norm"):
        if column not in frame:
            frame[column] = None
    frame["first_loss"] = [lst[0] if isinstance(lst, list) and lst else np.nan for lst in frame["losses"]]
    return frame


def summarise(per_item: pd.DataFrame, ks: Sequence[int], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (strategy, setting, metric, k): mean with a 95% percentile bootstrap CI.

    Metrics: ``greedy_pass@1`` and ``pass@k`` (unbiased estimator on the ``n`` samples). When an
    ``rlvr`` row exists, ``delta_vs_rlvr`` and its paired bootstrap CI over the same items are added.
    """
    rows = []
    rlvr = per_item[per_item["strategy"] == "rlvr"].set_index("item")
    for (strategy, setting), group in per_item.groupby(["strategy", "setting"], sort=False):
        group = group.set_index("item")
        metrics = [("greedy_pass@1", 1, group["greedy"].to_numpy(float))]
        n = int(group["n"].min())
        if n:
            for k in ks:
                if k <= n:
                    metrics.append(("pass@k", k, pass_at_k_array(n, group["correct"].to_numpy(), k)))
        for metric, k, values in metrics:
            low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            row = {
                "strategy": strategy,
                "setting": setting,
                "metric": metric,
                "k": k,
                "n_items": len(values),
                "value": float(values.mean()),
                "ci_low": low,
                "ci_high": high,
            }
            common = group.index.intersection(rlvr.index)
            if strategy != "rlvr" and len(common):
                ref = _metric(rlvr.loc[common], metric, k)
                if ref is not None:
                    mine = _metric(group.loc[common], metric, k)
                    delta, d_low, d_high = paired_bootstrap_ci(ref, mine, n_boot=n_boot, seed=seed)
                    row.update(delta_vs_rlvr=delta, delta_ci_low=d_low, delta_ci_high=d_high)
            rows.append(row)
    return pd.DataFrame(rows)


def _metric(frame: pd.DataFrame, metric: str, k: int) -> np.ndarray | None:
    if metric == "greedy_pass@1":
        return frame["greedy"].to_numpy(float)
    n = int(frame["n"].min())
    return pass_at_k_array(n, frame["correct"].to_numpy(), k) if n >= k else None


def wide_table(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``value [low, high]`` strings, one row per strategy, one column per metric."""
    cells = summary.assign(
        column=np.where(
            summary["metric"] == "greedy_pass@1", "greedy pass@1", "pass@" + summary["k"].astype(str)
        ),
        cell=[
            f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for v, lo, hi in zip(summary["value"], summary["ci_low"], summary["ci_high"], strict=True)
        ],
    )
    order = list(dict.fromkeys(cells["column"]))
    wide = cells.pivot(index="strategy", columns="column", values="cell")[order]
    return wide.loc[list(dict.fromkeys(cells["strategy"]))]


def run_interventions(
    pair: Any,
    samples: Sequence[Any],
    out_dir: str | Path | None = None,
    config: InterventionRunConfig = InterventionRunConfig(),
    resume: bool = True,
    progress: bool = False,
    verify: Verifier | None = None,
    title: str | None = None,
) -> InterventionResult:
    """Run every strategy of ``config`` over ``samples`` and summarise.

    Writes (with ``out_dir``): ``records.jsonl``, ``per_item.csv``, ``summary.csv`` and
    ``pass_at_k.{png,pdf}``.
    """
    interventions = [(s, make_intervention(s, config, pair.n_layers)) for s in config.strategies]
    per_item = run_settings(pair, samples, interventions, config, out_dir, resume, progress, verify)
    summary = summarise(per_item, config.ks, config.n_boot, config.seed)
    if out_dir is not None:
        out = Path(out_dir)
        write_tables(out, {"per_item": per_item.drop(columns=["losses"]), "summary": summary})
        if config.n:
            _save_plot("plot_pass_at_k", summary, out / "pass_at_k", title)
    return InterventionResult(per_item, summary, None if out_dir is None else Path(out_dir))


def _save_plot(name: str, table: pd.DataFrame, path: Path, title: str | None) -> None:
    import matplotlib.pyplot as plt

    from lens.plot import interventions as plots
    from lens.plot.style import save_figure

    fig = getattr(plots, name)(table, title=title)
    save_figure(fig, path)
    plt.close(fig)


def with_strategies(config: InterventionRunConfig, strategies: Sequence[str]) -> InterventionRunConfig:
    return replace(config, strategies=tuple(strategies))
