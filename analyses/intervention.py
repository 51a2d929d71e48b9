"""Interventions over a dataset: greedy pass@1 and sampled pass@k per strategy, resumable.

Strategies (``STRATEGIES``):

* ``rlvr``: the RLVR model as is; ``base``: the base model as is;
* ``hard-low`` / ``hard-high``: :class:`~lens.interventions.HardInjection` of the base's residual
  stream at low / high base-entropy visual tokens (released depth convention);
* ``replay`` / ``replay-high``: :class:`~lens.interventions.ActivationReplay` (released algorithm)
  with the low-entropy mask or the inverted one;
* ``pti``: :class:`~lens.interventions.pti.PTI` (prefill-time KV-cache steering) with the directions
  file ``pti_directions`` (``lens pti directions``); not in the default set, since it needs that file.
* ``vreason``: :class:`~lens.interventions.vreason.VReason` (entropy-guided controller on the last
  layer's video value cache; ``vreason_lr``, ``vreason_every``, ``vreason_lite``); video items only,
  so not in the default set.

The mask rule (``mask_rule``) is shared by injection and replay: ``"tau_max"`` (the released
τ·max rule, the default) or ``"quantile"`` (rank-based: the lowest-entropy fraction q of the visual
tokens per layer; use it where the base entropies are near-uniform, e.g. on the organism).

Per item and strategy: one greedy decode and ``n`` sampled ones, scored with a verifier. Decoding
settings come from the pair (:func:`lens.decoding.decoding_for`: the budget is the checkpoint's, 4
on the organism, else 2048; sampling uses the checkpoint's temperature/top-p/top-k, else pure
temperature-1 sampling; every end token of the checkpoint; vision special ids suppressed; greedy is
exactly greedy) unless the config overrides them; the effective settings are stored beside the
records. Greedy decodes of ``batch_size`` items run as one left-padded batch, each row with its own
edit; the ``n`` samples of an item are one batched call with a seed that depends on the item only,
so strategies see the same random numbers (paired comparisons are less noisy) whatever the batch
size. One record per (setting, item) goes to ``records.jsonl`` through
:class:`lens.records.RecordWriter`, keyed ``"<setting>/<item id>"``, so an interrupted run resumes
where it stopped.

Prompts and scoring: each item is encoded with a prompt preset (:mod:`lens.prompts`: ``prompt``,
else the pair's own from its checkpoint side file, else ``plain``) and an optional system prompt,
and every response is scored by :mod:`lens.scoring` (``verifier="auto"``: the organism's verifier
for organism items, letter matching for multiple choice, math-verify otherwise). Each record keeps
the greedy response's extracted answer and verdict, so the scoring can be audited.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lens.decoding import DEFAULT_MAX_NEW_TOKENS, DecodingConfig, decoding_for
from lens.errors import ConfigError, DatasetError
from lens.fingerprint import models_fingerprint, pair_fingerprint, sample_digests
from lens.interventions import ActivationReplay, Baseline, HardInjection, Intervention, Prepared
from lens.masks import EntropyMask
from lens.metrics import bootstrap_ci, paired_bootstrap_ci, pass_at_k_array
from lens.records import RecordWriter, write_tables

#: Mask rules an intervention run accepts (``fixed`` needs per-layer thresholds; use the API).
MASK_CHOICES = ("tau_max", "quantile")
STRATEGIES = ("rlvr", "base", "hard-low", "hard-high", "replay", "replay-high", "pti", "vreason")
#: What runs when no strategy is named (``pti`` needs a directions file, ``vreason`` video items).
DEFAULT_STRATEGIES = ("rlvr", "base", "hard-low", "hard-high", "replay", "replay-high")
#: A verifier: a name from :data:`lens.scoring.VERIFIERS`, a :class:`lens.scoring.Verifier`, or a
#: callable ``fn(response, answer) -> bool``.
Verifier = str | Callable[..., Any]


#: Run settings that only V-Reason reads (they are part of its records' keys instead).
VREASON_KEYS = ("vreason_lr", "vreason_every", "vreason_lite")


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
        max_new_tokens: Decode budget (``None``: the pair's, 4 on the organism, else 2048).
        seed: Base sampling seed (item ``i`` uses ``seed + i``).
        n_boot: Bootstrap resamples for the CIs.
        temperature: Sampling temperature (``None``: the checkpoint's, else 1.0).
        top_p: Sampling top-p (``None``: the checkpoint's, else off).
        top_k: Sampling top-k (``None``: the checkpoint's, else off).
        stop_strings: Strings that end a decode (``None``: the checkpoint's, else none).
        batch_size: Items per greedy ``generate`` call (results do not depend on it).
        prompt: Prompt preset name (:data:`lens.prompts.PRESETS`; ``None``: the pair's own, else
            ``plain``).
        system: System prompt replacing the preset's (``""``: none; ``None``: the preset's).
        verifier: Answer checker name (:data:`lens.scoring.VERIFIERS`; ``"auto"`` picks per item).
        pti_directions: The PTI directions file (``.safetensors``, from ``lens pti directions``);
            required by the ``pti`` strategy.
        vreason_lr: V-Reason's learning rate (:class:`~lens.interventions.vreason.VReasonConfig`).
        vreason_every: V-Reason's update interval k, in generated tokens.
        vreason_lite: V-Reason (Lite): prune the lowest-value-norm half of the video tokens.
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
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
    max_new_tokens: int | None = None
    seed: int = 0
    n_boot: int = 2000
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_strings: tuple[str, ...] | None = None
    batch_size: int = 1
    prompt: str | None = None
    system: str | None = None
    verifier: str = "auto"
    pti_directions: str | None = None
    vreason_lr: float = 0.01
    vreason_every: int = 2
    vreason_lite: bool = False

    def __post_init__(self) -> None:
        from lens.prompts import get_preset
        from lens.scoring import resolve_verifier

        if self.prompt is not None:
            get_preset(self.prompt)  # an unknown name fails here, before any model loads
        resolve_verifier(self.verifier)
        if self.stop_strings is not None:
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ConfigError(f"unknown strategies {bad}; known: {', '.join(STRATEGIES)}")
        if self.n < 0:
            raise ConfigError(f"n must be >= 0, got {self.n}")
        wrong = [k for k in self.ks if not 1 <= k <= max(self.n, 0)]
        if self.n and wrong:
            raise ConfigError(f"k values {wrong} are outside [1, n={self.n}]")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ConfigError(f"batch size must be an integer >= 1, got {self.batch_size}")
        # The decoding values alone, checked before any model loads (the pair fills the rest).
        DecodingConfig(
            max_new_tokens=DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            stop_strings=self.stop_strings or (),
        )
        if self.mask_rule not in MASK_CHOICES:
            raise ConfigError(f"mask rule must be one of {', '.join(MASK_CHOICES)}; got {self.mask_rule!r}")
        _ = self.mask  # validates tau and quantile
        if "pti" in self.strategies and self.pti_directions is None:
            raise ConfigError(
                "the pti strategy needs its directions file (--pti-directions FILE); "
                "make one with `lens pti directions`"
            )
        if "vreason" in self.strategies:
            _ = self.vreason  # validates the V-Reason settings before any model loads

    @property
    def vreason(self) -> Any:
        """The V-Reason settings of this run."""
        from lens.interventions.vreason import VReasonConfig

        return VReasonConfig(lr=self.vreason_lr, every=self.vreason_every, lite=self.vreason_lite)

    @property
    def mask(self) -> EntropyMask:
        """The injection/replay selection rule."""
        return EntropyMask(rule=self.mask_rule, tau=self.tau, quantile=self.quantile)

    def decoding(self, pair: Any) -> DecodingConfig:
        """The effective decoding settings on ``pair`` (this config's values where set)."""
        return decoding_for(
            pair,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_strings=self.stop_strings,
        )


def make_intervention(strategy: str, config: InterventionRunConfig, n_layers: int) -> Intervention:
    """Build the intervention of one strategy (validates every hyper-parameter up front)."""
    layers = config.layers if config.layers is not None else default_layers(n_layers)
    if strategy == "rlvr":
        return Baseline("rlvr")
    if strategy == "base":
        return Baseline("base")
    select = "high" if strategy.endswith("-high") else "low"
    if strategy == "pti":
        from lens.interventions.pti import PTI
        from lens.interventions.pti_directions import PTIDirections

        if config.pti_directions is None:
            raise ConfigError("the pti strategy needs its directions file (--pti-directions FILE)")
        return PTI(PTIDirections.load(config.pti_directions))
    if strategy == "vreason":
        from lens.interventions.vreason import VReason

        return VReason(config.vreason)
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


@dataclass
class PreparedItem:
    """One item after :meth:`Intervention.prepare`: its state, the warnings raised and the time taken."""

    state: Prepared
    warnings: list[str] = field(default_factory=list)
    prepare_s: float = 0.0


def prepare_item(
    pair: Any, sample: Any, intervention: Intervention, preset: Any = None, system: str | None = None
) -> PreparedItem:
    """Encode one item with its prompt preset and prepare the intervention on it, recording its warnings."""
    from lens.prompts import encode_sample

    inputs = encode_sample(pair, sample, preset, system=system)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = intervention.prepare(pair, inputs).state
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return PreparedItem(state, messages, time.perf_counter() - start)


def run_item(
    pair: Any,
    sample: Any,
    intervention: Intervention,
    config: InterventionRunConfig,
    verify: Verifier,
    seed: int,
    decoding: DecodingConfig | None = None,
    prepared: PreparedItem | None = None,
    greedy: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """Prepare, decode greedily and ``n`` times sampled, and score one item.

    Args:
        pair: The model pair.
        sample: The item.
        intervention: The strategy.
        config: The run settings.
        verify: The answer checker (see :func:`lens.scoring.resolve_verifier`).
        seed: The item's sampling seed.
        decoding: The effective decoding settings (default: ``config.decoding(pair)``).
        prepared: The item already prepared (by :func:`prepare_item`), or ``None`` to prepare it here.
        greedy: The item's greedy text and its share of the decode time, when decoded in a batch.
    """
    from lens.scoring import resolve_verifier

    verifier = resolve_verifier(verify)
    decoding = decoding or config.decoding(pair)
    prepared = prepared or prepare_item(pair, sample, intervention, config.prompt, config.system)
    state = prepared.state
    start = time.perf_counter()
    if greedy is None:
        text = intervention.generate_batch(pair, [state], decoding)[0].texts[0]
        greedy = (text, time.perf_counter() - start)
        start = time.perf_counter()
    sampled: tuple[str, ...] = ()
    if config.n:
        draws = intervention.generate_batch(pair, [state], decoding, n=config.n, do_sample=True, seed=seed)
        sampled = draws[0].texts
    response, greedy_s = greedy
    verdict = verifier(response, sample)
    record: dict[str, Any] = {
        "item": str(sample.id),
        "qtype": getattr(sample, "qtype", None),
        "answer": None if sample.answer is None else str(sample.answer),
        "greedy": int(verdict.correct),
        "correct": int(sum(verifier(t, sample).correct for t in sampled)),
        "n": len(sampled),
        "response": response,
        # What the scorer read and decided, so the scoring can be audited item by item.
        "extracted": verdict.extracted,
        "extractor": verdict.extractor,
        "verifier": verdict.verifier,
        "prepare_s": prepared.prepare_s,
        "decode_s": greedy_s + time.perf_counter() - start,
        "warnings": prepared.warnings,
    }
    detail = state.detail
    if detail is not None and hasattr(detail, "losses"):  # a ReplayResult
        record.update(
            losses=list(detail.losses),
            final_loss=detail.final_loss,
            n_selected={str(k): v for k, v in detail.n_selected.items()},
            offset_norm=float(detail.offsets.norm()),
        )
    elif detail is not None and hasattr(detail, "n_selected"):  # an InjectionPlan
        record["n_selected"] = {str(k): v for k, v in detail.n_selected.items()}
    return record


def decode_greedy(
    pair: Any, intervention: Intervention, items: Sequence[PreparedItem], decoding: DecodingConfig
) -> list[tuple[str, float]]:
    """One batched greedy decode of prepared items: each item's text and its share of the time."""
    start = time.perf_counter()
    generations = intervention.generate_batch(pair, [item.state for item in items], decoding)
    share = (time.perf_counter() - start) / len(items)
    return [(g.texts[0], share) for g in generations]


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
    shard: Any = None,
    pairs: Mapping[str, Any] | None = None,
    progress_label: str = "intervene",
) -> pd.DataFrame | None:
    """Run ``(strategy, intervention)`` pairs over ``samples``; return the per-item table.

    Records are keyed ``"<setting>/<item id>"``; with ``out_dir`` finished ones are skipped. With
    ``shard`` (a :class:`lens.distributed.Shard`), only that shard's records are computed, into its
    shard folder, and ``None`` is returned: the merge tabulates.

    With ``pairs`` (several models: ``pair`` is then a :class:`lens.modelset.ModelSet`), each
    strategy label names the :class:`lens.ModelPair` it runs on (e.g. the set's base and each twin),
    and records are keyed ``"<label>/<setting>/<item id>"``. ``progress_label`` names the bar.
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    from tqdm.auto import tqdm

    from lens.prompts import get_preset
    from lens.scoring import check_scorable, math_verify_version

    # An item the verifier cannot score (no answer, a choice item without options) fails before any decode.
    verifier = check_scorable(samples, verify if verify is not None else config.verifier)
    preset = get_preset(config.prompt or getattr(pair, "prompt_preset", None) or "plain")

    def pair_of(strategy: str) -> Any:
        return pair if pairs is None else pairs[strategy]

    decodings = {strategy: config.decoding(pair_of(strategy)) for strategy, _ in interventions}
    decoding = decodings[interventions[0][0]]
    if config.n and decoding.near_greedy_sampling:
        warnings.warn(
            f"sampling with temperature={decoding.temperature:g}, top_p={decoding.top_p:g}, "
            f"top_k={decoding.top_k} (from the checkpoint's generation_config unless given) is nearly "
            "greedy, so pass@k will barely differ from greedy; set temperature/top_p/top_k to override",
            stacklevel=2,
        )
    # Settings that change what a record holds; strategies, ks, n_boot and batch_size do not (they
    # select, summarise or group the work). The effective decoding settings do.
    settings = {"pair": list(getattr(pair, "names", ())), **asdict(config), "decoding": decoding.to_dict()}
    if pairs is not None:
        settings["decoding"] = {strategy: d.to_dict() for strategy, d in decodings.items()}
    # The PTI directions enter each PTI record's key through their digest, not their path; the
    # V-Reason settings through its setting string (so older runs' settings still match).
    for key in ("strategies", "ks", "n_boot", "batch_size", "pti_directions", *VREASON_KEYS):
        settings.pop(key)
    # The effective prompt (a preset named in a checkpoint side file counts) and the scorer's version:
    # verdicts can change between math-verify releases.
    settings.update(prompt=preset.name, verifier=verifier.name, math_verify=math_verify_version())
    writer = None
    if out_dir is not None:
        digests = sample_digests(samples)
        inputs = {
            f"{_prefix(s, pairs)}{i.setting()}/{sid}": d
            for s, i in interventions
            for sid, d in digests.items()
        }
        models = pair_fingerprint(pair) if pairs is None else models_fingerprint(pair.models)
        writer = RecordWriter(Path(out_dir) / "records.jsonl", resume, settings, models, inputs, shard)
    memory: list[dict[str, Any]] = []
    wanted: set[str] = set()
    total = len(samples) * len(interventions)
    bar = tqdm(total=total, desc=progress_label, unit="run", disable=not progress)
    for strategy, intervention in interventions:
        setting = intervention.setting()
        pending = []
        for index, sample in enumerate(samples):
            key = f"{_prefix(strategy, pairs)}{setting}/{sample.id}"
            wanted.add(key)
            if writer is not None and not writer.todo(key):
                bar.update(1)
            else:
                pending.append((index, sample, key))
        for start in range(0, len(pending), config.batch_size):
            chunk = pending[start : start + config.batch_size]
            on = pair_of(strategy)
            prepared = [
                prepare_item(on, sample, intervention, preset, config.system) for _, sample, _ in chunk
            ]
            greedy = decode_greedy(on, intervention, prepared, decodings[strategy])
            for (index, sample, key), item, text in zip(chunk, prepared, greedy, strict=True):
                record = {"strategy": strategy, "setting": setting, "greedy_batch": len(chunk)}
                record.update(
                    run_item(
                        on,
                        sample,
                        intervention,
                        config,
                        verifier,
                        config.seed + index,
                        decodings[strategy],
                        item,
                        text,
                    )
                )
                if writer is not None:
                    writer.write(key, record)
                else:
                    memory.append({"sample_id": key, **record})
                bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
        if writer.partial:
            return None
    records = memory if writer is None else writer.read(wanted)
    return per_item_table(records)


def _prefix(strategy: str, pairs: Mapping[str, Any] | None) -> str:
    """Record keys of a several-model run start with the strategy's model label."""
    return "" if pairs is None else f"{strategy}/"


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
    shard: Any = None,
) -> InterventionResult | None:
    """Run every strategy of ``config`` over ``samples`` and summarise.

    Writes (with ``out_dir``): ``records.jsonl``, ``per_item.csv``, ``summary.csv`` and
    ``pass_at_k.{png,pdf}``. With ``shard``, computes that shard's records only and returns ``None``.
    """
    interventions = [(s, make_intervention(s, config, pair.n_layers)) for s in config.strategies]
    per_item = run_settings(pair, samples, interventions, config, out_dir, resume, progress, verify, shard)
    if per_item is None:
        return None
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
