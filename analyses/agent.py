"""Agent runs over a dataset: each strategy drives the DeepEyes-style zoom-in loop on every item.

:func:`run_agent_items` is to :func:`lens.agent.run_agent` what :mod:`analyses.intervention` is to
one intervention call: every strategy (``AGENT_STRATEGIES``) runs the agent loop
(:class:`lens.agent.AgentEpisode`) on every item, the intervention prepared afresh at every model
call; the final reply is scored with the project's verifiers (:mod:`lens.scoring`); one record per
(setting, item) goes to ``records.jsonl`` through :class:`lens.records.RecordWriter` (keyed
``"<setting>/<item id>"``: resumable, a changed setting refused, nothing counted twice), holding
every turn (status, tool call, box, error, generated text, tokens).

Strategies are those of ``lens intervene`` (same names, same hyper-parameters) plus
``hard-agent``, the released agent swap (:meth:`lens.interventions.HardInjection.released_agent`:
the fixed per-layer thresholds of layers 0..6 with base < RLVR entropy, every position of every
turn), cut to the model's depth on a shallower model (the organism: layers 0..3).

Prompts (``system``): ``"deepeyes"`` is the released evaluation's layout (DeepEyes' tool system
prompt, its instruction after the question and inside every tool response); ``"none"`` is the bare
question and bare crops (``<tool_response>`` crop ``</tool_response>``).

The run's answer is what ended it (``stop == "answer"``); the verdict scores the last reply with the
item's verifier, as ``lens intervene`` scores a response (DeepEyes' evaluation judges the answer tag
when there is one, else the whole output), so a run cut by the turn limit can still be right if its
last reply holds the answer. Tables: ``per_item.csv`` (one row per strategy and item),
``turns.csv`` (one row per model call) and ``summary.csv`` (one row per strategy: accuracy with a
95% bootstrap CI, the paired difference to ``rlvr``, mean model calls, crops, failed tool calls and
generated tokens per item).

Batching: ``batch_size`` items run in lockstep (:func:`lens.agent.run_agents`): their calls at the
same turn share one left-padded ``generate``. Records are written as each batch finishes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lens.agent import (
    ANSWER_EXTRACTORS,
    DEEPEYES_SYSTEM_PROMPT,
    DEEPEYES_USER_PROMPT,
    AgentConfig,
    AgentEpisode,
    agent_decoding,
    run_agents,
)
from lens.decoding import decoding_for
from lens.errors import ConfigError, DatasetError, InputError
from lens.interventions import HardInjection, Intervention
from lens.masks import RELEASED_THRESHOLDS
from lens.metrics import bootstrap_ci, paired_bootstrap_ci
from lens.records import RecordWriter, write_tables

#: Strategies of an agent run: ``lens intervene``'s image strategies and the released agent swap.
AGENT_STRATEGIES = ("rlvr", "base", "hard-low", "hard-high", "hard-agent", "replay", "replay-high")
DEFAULT_AGENT_STRATEGIES = ("rlvr", "base", "hard-low", "hard-agent")
#: Prompt layouts (``--system``).
SYSTEM_CHOICES = ("deepeyes", "none")
#: Answer extractors (``--answer``); ``auto``: the organism's for organism items, else the answer tag.
ANSWER_CHOICES = ("auto", *ANSWER_EXTRACTORS)


@dataclass(frozen=True)
class AgentRunConfig:
    """Settings of an agent run over a dataset.

    Attributes:
        strategies: Which of :data:`AGENT_STRATEGIES` to run.
        layers: Layers of injection and replay (``None``: ``lens intervene``'s default; for
            ``hard-agent`` the released 0..6, cut to the model's depth).
        tau, mask_rule, quantile: The entropy mask of ``hard-low``/``hard-high``/``replay*``.
        alpha, steps, topk, variant: Activation Replay's settings.
        max_turns: Model calls per item at most.
        max_new_tokens: Decode budget per call (``None``: the pair's).
        system: ``"deepeyes"`` or ``"none"`` (see the module docstring).
        on_tool_error: ``"message"`` or ``"stop"`` (:class:`lens.agent.AgentConfig`).
        clip_bbox: Clip boxes to the image before checking them.
        answer: Which extractor ends a run, of :data:`ANSWER_CHOICES`.
        verifier: The answer checker (:data:`lens.scoring.VERIFIERS`).
        script: Teacher-forced replies of the first calls, the same for every item.
        batch_size: Items run in lockstep, their calls at one turn decoded in one batch.
        n_boot: Bootstrap resamples for the CIs.
        seed: Bootstrap seed.
    """

    strategies: tuple[str, ...] = DEFAULT_AGENT_STRATEGIES
    layers: tuple[int, ...] | None = None
    tau: float = 0.4
    mask_rule: str = "tau_max"
    quantile: float = 0.3
    alpha: float = 10.0
    steps: int = 25
    topk: int = 50
    variant: str = "released"
    max_turns: int = 11
    max_new_tokens: int | None = None
    system: str = "deepeyes"
    on_tool_error: str = "message"
    clip_bbox: bool = False
    answer: str = "auto"
    verifier: str = "auto"
    script: tuple[str, ...] = field(default=())
    batch_size: int = 1
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        from lens.scoring import resolve_verifier

        object.__setattr__(self, "strategies", tuple(self.strategies))
        bad = [s for s in self.strategies if s not in AGENT_STRATEGIES]
        if bad or not self.strategies:
            raise ConfigError(f"unknown agent strategies {bad}; known: {', '.join(AGENT_STRATEGIES)}")
        if len(set(self.strategies)) < len(self.strategies):
            raise ConfigError(f"a strategy is named twice in {','.join(self.strategies)}")
        if self.system not in SYSTEM_CHOICES:
            raise ConfigError(f"system must be one of {', '.join(SYSTEM_CHOICES)}, got {self.system!r}")
        if self.answer not in ANSWER_CHOICES:
            raise ConfigError(f"answer must be one of {', '.join(ANSWER_CHOICES)}, got {self.answer!r}")
        if isinstance(self.script, str) or not all(isinstance(s, str) for s in self.script):
            raise ConfigError("the script must be a list of reply strings")
        object.__setattr__(self, "script", tuple(self.script))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch size must be an integer >= 1, got {self.batch_size}")
        resolve_verifier(self.verifier)
        self.agent_config(None)  # max_turns, max_new_tokens, on_tool_error
        _ = self.intervention_config  # the mask and replay settings

    @property
    def intervention_config(self) -> Any:
        """The injection/replay hyper-parameters as ``lens intervene`` holds them (validated there)."""
        from analyses.intervention import InterventionRunConfig

        return InterventionRunConfig(
            strategies=("rlvr",),
            layers=self.layers,
            tau=self.tau,
            mask_rule=self.mask_rule,
            quantile=self.quantile,
            alpha=self.alpha,
            steps=self.steps,
            topk=self.topk,
            variant=self.variant,
            n=0,
            ks=(),
            max_new_tokens=self.max_new_tokens,
            verifier=self.verifier,
        )

    def agent_config(self, sample: Any) -> AgentConfig:
        """The loop's settings for one item (``answer="auto"`` picks the organism's extractor for
        organism items)."""
        from lens.scoring.verifiers import is_organism_item

        answer = self.answer
        if answer == "auto":
            answer = "organism" if sample is not None and is_organism_item(sample) else "answer_tag"
        return AgentConfig(
            max_turns=self.max_turns,
            max_new_tokens=self.max_new_tokens,
            tool_prompt=DEEPEYES_USER_PROMPT if self.system == "deepeyes" else "",
            on_tool_error=self.on_tool_error,
            clip_bbox=self.clip_bbox,
            answer=answer,
        )

    @property
    def system_prompt(self) -> str | None:
        return DEEPEYES_SYSTEM_PROMPT if self.system == "deepeyes" else None

    def question(self, sample: Any) -> str:
        """The first user turn's text: the item laid out as VLMEvalKit does, then DeepEyes' instruction."""
        from lens.prompts import get_preset

        text = get_preset("plain").query(sample)
        return text + DEEPEYES_USER_PROMPT if self.system == "deepeyes" else text


def make_agent_intervention(strategy: str, config: AgentRunConfig, n_layers: int) -> Intervention:
    """Build one strategy's intervention (validates its hyper-parameters against the model's depth).

    Raises:
        ConfigError: Unknown strategy, layers beyond the model, or ``hard-agent`` layers without a
            released threshold (beyond 6).
    """
    from analyses.intervention import make_intervention

    if strategy not in AGENT_STRATEGIES:
        raise ConfigError(f"unknown agent strategy {strategy!r}; known: {', '.join(AGENT_STRATEGIES)}")
    if strategy != "hard-agent":
        return make_intervention(strategy, config.intervention_config, n_layers)
    layers = (
        config.layers if config.layers is not None else tuple(range(min(len(RELEASED_THRESHOLDS), n_layers)))
    )
    beyond = sorted(i for i in layers if not 0 <= i < len(RELEASED_THRESHOLDS))
    if beyond:
        raise ConfigError(
            f"hard-agent uses the released thresholds of layers 0..{len(RELEASED_THRESHOLDS) - 1}; "
            f"layers {beyond} have none"
        )
    return HardInjection.released_agent(
        layers=layers, thresholds=tuple(RELEASED_THRESHOLDS[i] for i in layers)
    )


def item_image(sample: Any, label: str | None = None) -> Any:
    """The one image an agent item is about (crops are cut from it); ``label`` names the item in
    messages (default ``sample 'id'``).

    Raises:
        InputError: An item with no image, several images, or a video.
    """
    from lens.datasets import sample_images

    label = label or f"sample {str(getattr(sample, 'id', '?'))!r}"
    if getattr(sample, "video", None) is not None:
        raise InputError(f"{label} has a video; the agent loop zooms into one image")
    images = sample_images(sample)
    if len(images) != 1:
        what = "no image" if not images else f"{len(images)} images"
        raise InputError(f"{label} has {what}; the agent loop zooms into exactly one image")
    return images[0]


@dataclass(frozen=True)
class AgentResult:
    """Outputs of an agent run: per (strategy, item), per call, per strategy."""

    per_item: pd.DataFrame
    turns: pd.DataFrame
    summary: pd.DataFrame
    out_dir: Path | None = None


def agent_record(strategy: str, sample: Any, run: Any, verdict: Any, seconds: float, batch: int) -> dict:
    """One (strategy, item) record: the run's turns, stop, answer, verdict and counts."""
    return {
        "strategy": strategy,
        "setting": run.turns[0].setting,
        "item": str(sample.id),
        "qtype": getattr(sample, "qtype", None),
        "answer": None if sample.answer is None else str(sample.answer),
        "stop": run.stop,
        "agent_answer": run.answer,
        "response": run.final_reply,
        "extracted": verdict.extracted,
        "extractor": verdict.extractor,
        "verifier": verdict.verifier,
        "correct": int(verdict.correct),
        "n_calls": run.n_calls,
        "n_tool_calls": run.n_tool_calls,
        "n_failed": run.n_failed,
        "n_generated": run.n_generated,
        "seconds": seconds,
        "batch": batch,
        "turns": [turn.to_dict() for turn in run.turns],
    }


def run_settings(config: AgentRunConfig) -> dict[str, Any]:
    """The settings of ``config`` a record depends on (strategies, batch_size, n_boot and seed only
    select or summarise); :func:`run_agent_items` adds the pair's names, decoding and scorer."""
    settings = asdict(config)
    for key in ("strategies", "batch_size", "n_boot", "seed"):
        settings.pop(key)
    return settings


def check_resumable(records: str | Path, config: AgentRunConfig) -> None:
    """Refuse early, before loading, a resume whose stored settings differ from ``config``'s.

    The record writer checks every setting again against the loaded pair; this only saves loading
    the weights of a run that will be refused anyway.

    Raises:
        ConfigError: Stored records made with other settings, naming them.
    """
    import json

    from lens.records import changed_settings, read_settings, settings_path

    if not Path(records).exists():
        return
    try:
        stored, _ = read_settings(settings_path(records))
    except (ValueError, OSError):
        return  # the writer reports it
    if not isinstance(stored, dict):
        return
    mine = json.loads(json.dumps(run_settings(config), default=str))  # as stored: tuples become lists
    changed = changed_settings({k: stored.get(k) for k in mine}, mine)
    if changed:
        raise ConfigError(
            f"{records} holds records made with other settings ({', '.join(changed)}); "
            "rerun with --no-resume or use another output folder"
        )


def run_agent_items(
    pair: Any,
    samples: Sequence[Any],
    out_dir: str | Path | None = None,
    config: AgentRunConfig = AgentRunConfig(),
    resume: bool = True,
    progress: bool = False,
    shard: Any = None,
) -> AgentResult | None:
    """Run every strategy's agent loop over ``samples``, score, record and summarise.

    Writes (with ``out_dir``): ``records.jsonl`` (+ settings), ``per_item.csv``, ``turns.csv``,
    ``summary.csv``. With ``shard`` (a :class:`lens.distributed.Shard`), computes that shard's
    records only and returns ``None`` (the merge tabulates).

    Raises:
        DatasetError: No samples.
        InputError: An item without exactly one image, or one the verifier cannot score.
    """
    if not samples:
        raise DatasetError("the dataset has no samples")
    from tqdm.auto import tqdm

    from lens.fingerprint import pair_fingerprint, sample_digests
    from lens.scoring import check_scorable, math_verify_version

    images = [item_image(s) for s in samples]
    questions = [config.question(s) for s in samples]  # an empty question fails before any call
    verifier = check_scorable(samples, config.verifier)
    interventions = [(s, make_agent_intervention(s, config, pair.n_layers)) for s in config.strategies]
    decoding = decoding_for(pair, max_new_tokens=config.max_new_tokens)
    effective = agent_decoding(pair, config.agent_config(None), decoding)
    settings = {
        "pair": list(getattr(pair, "names", ())),
        **run_settings(config),
        "decoding": effective.to_dict(),
    }
    settings.update(verifier=verifier.name, math_verify=math_verify_version())
    writer = None
    if out_dir is not None:
        digests = sample_digests(samples)
        inputs = {f"{i.setting()}/{sid}": d for _, i in interventions for sid, d in digests.items()}
        writer = RecordWriter(
            Path(out_dir) / "records.jsonl", resume, settings, pair_fingerprint(pair), inputs, shard
        )
    memory: list[dict[str, Any]] = []
    wanted: list[str] = []
    bar = tqdm(total=len(samples) * len(interventions), desc="agent", unit="run", disable=not progress)
    try:
        for strategy, intervention in interventions:
            pending = []
            for index, sample in enumerate(samples):
                key = f"{intervention.setting()}/{sample.id}"
                wanted.append(key)
                if writer is not None and not writer.todo(key):
                    bar.update(1)
                else:
                    pending.append((index, key))
            for start in range(0, len(pending), config.batch_size):
                chunk = pending[start : start + config.batch_size]
                episodes = [
                    AgentEpisode(
                        pair,
                        questions[i],
                        images[i],
                        system=config.system_prompt,
                        config=config.agent_config(samples[i]),
                        script=config.script,
                    )
                    for i, _ in chunk
                ]
                began = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    runs = run_agents(pair, intervention, episodes, decoding, config.batch_size)
                share = (time.perf_counter() - began) / len(chunk)
                # Kept in the records (per batch), as `lens intervene` keeps its prepare warnings.
                raised = list(
                    dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning))
                )
                for (i, key), run in zip(chunk, runs, strict=True):
                    verdict = verifier(run.final_reply, samples[i])
                    record = agent_record(strategy, samples[i], run, verdict, share, len(chunk))
                    record["warnings"] = raised
                    if writer is not None:
                        writer.write(key, record)
                    else:
                        memory.append({"sample_id": key, **record})
                    bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if writer is not None and writer.partial:
        return None
    records = memory if writer is None else writer.read(wanted)
    per_item, turns = tables(records)
    summary = summarise(per_item, config.n_boot, config.seed)
    if out_dir is not None:
        write_tables(out_dir, {"per_item": per_item, "turns": turns, "summary": summary})
    return AgentResult(per_item, turns, summary, None if out_dir is None else Path(out_dir))


def tables(records: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy per-(strategy, item) table and the per-call table of agent records."""
    if not records:
        raise DatasetError("no agent records to tabulate")
    per_item = pd.DataFrame([{k: v for k, v in r.items() if k != "turns"} for r in records])
    rows = []
    for record in records:
        for turn in record["turns"]:
            box = turn.get("box")
            rows.append(
                {
                    "strategy": record["strategy"],
                    "setting": record["setting"],
                    "item": record["item"],
                    "turn": turn["index"],
                    "status": turn["status"],
                    "scripted": turn["scripted"],
                    "n_tokens": turn["n_tokens"],
                    "n_generated": turn.get("n_generated"),
                    "box": None if box is None else ",".join(str(v) for v in box),
                    "error": turn.get("error"),
                    "answer": turn.get("answer"),
                    "generated": turn["generated"],
                }
            )
    return per_item, pd.DataFrame(rows)


def summarise(per_item: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per strategy: accuracy with its 95% percentile bootstrap CI (and, when an ``rlvr`` row
    exists, the paired difference to it over the same items with its CI), the share of runs that
    ended with an answer, and per item the mean model calls, crops, failed tool calls and generated
    tokens (``failed_total``: failed tool calls over all items)."""
    rows = []
    reference = per_item[per_item["strategy"] == "rlvr"].set_index("item")
    for (strategy, setting), group in per_item.groupby(["strategy", "setting"], sort=False):
        group = group.set_index("item")
        correct = group["correct"].to_numpy(float)
        low, high = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
        row: dict[str, Any] = {
            "strategy": strategy,
            "setting": setting,
            "n_items": len(group),
            "accuracy": float(correct.mean()),
            "ci_low": low,
            "ci_high": high,
            "answered": float((group["stop"] == "answer").mean()),
            "mean_calls": float(group["n_calls"].mean()),
            "mean_tool_calls": float(group["n_tool_calls"].mean()),
            "mean_failed": float(group["n_failed"].mean()),
            "failed_total": int(group["n_failed"].sum()),
            "mean_generated": float(group["n_generated"].mean()),
        }
        common = group.index.intersection(reference.index)
        if strategy != "rlvr" and len(common):
            delta, d_low, d_high = paired_bootstrap_ci(
                reference.loc[common, "correct"].to_numpy(float),
                group.loc[common, "correct"].to_numpy(float),
                n_boot=n_boot,
                seed=seed,
            )
            row.update(delta_vs_rlvr=delta, delta_ci_low=d_low, delta_ci_high=d_high)
        rows.append(row)
    return pd.DataFrame(rows)


def wide_summary(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The summary for a terminal: ``value [low, high]`` cells, one row per strategy."""
    table = pd.DataFrame(index=summary["strategy"].to_list())
    table["accuracy [95% CI]"] = [
        f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        for v, lo, hi in zip(summary["accuracy"], summary["ci_low"], summary["ci_high"], strict=True)
    ]
    if "delta_vs_rlvr" in summary:
        table["vs rlvr"] = [
            "" if np.isnan(d) else f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
            for d, lo, hi in zip(
                summary["delta_vs_rlvr"], summary["delta_ci_low"], summary["delta_ci_high"], strict=True
            )
        ]
    table["answered"] = summary["answered"].round(digits).to_list()
    table["calls/item"] = summary["mean_calls"].round(2).to_list()
    table["crops/item"] = summary["mean_tool_calls"].round(2).to_list()
    table["failed calls"] = summary["failed_total"].to_list()
    table["tokens/item"] = summary["mean_generated"].round(1).to_list()
    return table
