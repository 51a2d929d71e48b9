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

The run's settings and strategies live in :mod:`analyses.intervention_config`, its tables in
:mod:`analyses.intervention_tables`; every name is importable from here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.intervention_config import (  # noqa: F401  (public API of the intervention runner)
    DEFAULT_STRATEGIES,
    MASK_CHOICES,
    STRATEGIES,
    VREASON_KEYS,
    InterventionRunConfig,
    Verifier,
    default_layers,
    make_intervention,
    with_strategies,
)
from analyses.intervention_tables import (  # noqa: F401
    _save_plot,
    per_item_table,
    summarise,
    wide_table,
)
from lens.decoding import DecodingConfig
from lens.errors import DatasetError
from lens.fingerprint import models_fingerprint, pair_fingerprint, sample_digests
from lens.interventions import Intervention, Prepared
from lens.records import RecordWriter, write_tables


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
