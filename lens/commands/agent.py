"""``lens agent``: the DeepEyes-style zoom-in agent loop over a dataset, one run per strategy and item."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lens.commands.common import (
    add_pair_arguments,
    check_layers,
    check_resume,
    check_run_options,
    check_samples,
    check_scoring,
    check_topk,
    inspect_pair,
    parse_layers,
    read_items,
    where,
)
from lens.commands.runs import run_job
from lens.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from analyses.agent import AGENT_STRATEGIES, ANSWER_CHOICES, DEFAULT_AGENT_STRATEGIES
    from lens.commands.intervene import add_mask_arguments

    parser = subparsers.add_parser(
        "agent",
        help="the DeepEyes-style zoom-in agent loop per strategy, scored per item",
        description="Run the zoom-in agent loop (lens.agent: a <tool_call> to image_zoom_in_tool gets "
        "the crop of the image back, turn after turn) with each strategy, the intervention prepared "
        "afresh at every model call; score the last reply and summarise accuracy (bootstrap CIs), "
        "model calls, crops and failed tool calls per strategy.",
    )
    add_pair_arguments(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="dataset with one image per item: JSONL, VLMEvalKit TSV, Parquet, or a datasets.save_to_disk "
        "folder (default: the organism's held-out set)",
    )
    parser.add_argument(
        "--columns", default=None, metavar="MAP", help="field=column names where the file differs"
    )
    parser.add_argument(
        "--items", type=int, default=None, help="number of items (default: all, 20 organism items)"
    )
    parser.add_argument(
        "--strategies",
        default=",".join(DEFAULT_AGENT_STRATEGIES),
        help=f"comma-separated, of {','.join(AGENT_STRATEGIES)} (hard-agent: the released agent swap; "
        f"default {','.join(DEFAULT_AGENT_STRATEGIES)})",
    )
    parser.add_argument(
        "--max-turns", type=int, default=11, help="model calls per item at most (default 11, as released)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="decode budget per call (default: the checkpoint's generation_config, 4 on the organism; "
        "the released DeepEyes eval uses 8192)",
    )
    parser.add_argument(
        "--system",
        default=None,
        choices=["deepeyes", "none"],
        help="deepeyes: DeepEyes' tool system prompt and instruction (the released eval's layout); none: "
        "the bare question and crops (default: deepeyes; none on the organism)",
    )
    parser.add_argument(
        "--on-tool-error",
        default="message",
        choices=["message", "stop"],
        help="after a malformed tool call: message (an 'Error: ...' turn, the model goes on; DeepEyes' "
        "environment) or stop (end the run) (default message)",
    )
    parser.add_argument(
        "--clip-bbox",
        action="store_true",
        help="clip boxes to the image before checking them (DeepEyes' training)",
    )
    parser.add_argument(
        "--answer",
        default="auto",
        choices=list(ANSWER_CHOICES),
        help="what ends a run with an answer: answer_tag (<answer>...</answer>, released), extract (the "
        "verifiers' extractor), organism ('answer N'); auto: organism for organism items, else answer_tag",
    )
    parser.add_argument(
        "--verifier",
        default="auto",
        help="answer checker of the last reply: auto, math, choice, organism (default auto)",
    )
    parser.add_argument(
        "--script",
        default=None,
        metavar="FILE",
        help="JSON list of replies teacher-forced at the first calls of every item (the model still runs "
        'and its own text is kept), e.g. ["<tool_call>{\\"name\\": \\"image_zoom_in_tool\\", ...}</tool_call>"]',
    )
    add_mask_arguments(parser)
    parser.add_argument("--alpha", type=float, default=10.0, help="replay step size (default 10)")
    parser.add_argument("--steps", type=int, default=25, help="replay gradient steps (default 25)")
    parser.add_argument("--topk", type=int, default=50, help="replay top-k (default 50)")
    parser.add_argument(
        "--variant", default="released", choices=["released", "paper"], help="replay depth pairing"
    )
    parser.add_argument(
        "--layers",
        default=None,
        help="layers of injection and replay, e.g. 0-15 (default: the first 16/28 of the model; "
        "hard-agent: the released 0-6, cut to the model's depth)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="items run in lockstep, their calls at one turn decoded in one padded batch (default 1)",
    )
    parser.add_argument("--out", default="runs/agent", help="output folder (default: runs/agent)")
    parser.add_argument("--no-resume", action="store_true", help="discard records already in --out")
    parser.set_defaults(handler=run)


def read_script(path: str | None) -> tuple[str, ...]:
    """The teacher-forced replies of ``--script FILE``: a JSON list of strings.

    Raises:
        ConfigError: A missing or unreadable file, or one that is not a JSON list of strings.
    """
    if path is None:
        return ()
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--script {path}: no such file")
    try:
        replies = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--script {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
        raise ConfigError(f"--script {path}: must be a JSON list of reply strings")
    return tuple(replies)


def run_config(args: argparse.Namespace) -> Any:
    """The run's :class:`analyses.agent.AgentRunConfig` (every value checked; nothing loaded)."""
    from analyses.agent import AgentRunConfig

    system = args.system or ("none" if args.base == "organism" else "deepeyes")
    return AgentRunConfig(
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        layers=parse_layers(args.layers),
        tau=args.tau,
        mask_rule=args.mask,
        quantile=args.quantile,
        alpha=args.alpha,
        steps=args.steps,
        topk=args.topk,
        variant=args.variant,
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        system=system,
        on_tool_error=args.on_tool_error,
        clip_bbox=args.clip_bbox,
        answer=args.answer,
        verifier=args.verifier,
        script=read_script(args.script),
        batch_size=args.batch_size,
    )


def check_before_loading(args: argparse.Namespace) -> tuple[Any, list]:
    """Every check that needs no weights; returns the config and the items."""
    from analyses.agent import check_resumable, item_image, make_agent_intervention

    check_run_options(args)
    config = run_config(args)
    samples = read_items(args, organism_default=20)
    spec = inspect_pair(args)
    check_layers(config.layers, spec.n_layers)
    if any(s.startswith("replay") for s in config.strategies):
        check_topk(config.topk, spec.vocab_size)
    for strategy in config.strategies:
        make_agent_intervention(strategy, config, spec.n_layers)
    check_samples(samples, spec, args.data, needs_image="the agent loop")
    for sample in samples:
        item_image(sample, where(sample, args.data))
        config.question(sample)  # an empty question, malformed options (the message names the item)
    check_scoring(samples, config.verifier)
    check_resume(Path(args.out) / "records.jsonl", spec, args)
    if not args.no_resume:
        check_resumable(Path(args.out) / "records.jsonl", config)
    return config, samples


def run(args: argparse.Namespace) -> int:
    from analyses.agent import run_agent_items, wide_summary

    config, samples = check_before_loading(args)
    titles = []

    def work(pair, resume, shard):
        titles.append(f"{pair.names[0]} → {pair.names[1]}")
        return run_agent_items(pair, samples, args.out, config, resume=resume, progress=True, shard=shard)

    result = run_job(args, work, resume=not args.no_resume)
    if result is None:
        return 0
    print(
        f"\n{len(samples)} items, {titles[0]}, agent loop ({config.system} prompt, at most "
        f"{config.max_turns} calls); accuracy [95% bootstrap CI]:"
    )
    print(wide_summary(result.summary).to_string())
    warned = result.per_item[result.per_item["warnings"].map(bool)]
    if len(warned):
        print(
            f"\n{len(warned)} runs raised warnings (kept in records.jsonl), e.g. "
            f"{warned['strategy'].iloc[0]}: {warned['warnings'].iloc[0][0]}"
        )
    print(f"\nwrote {Path(args.out)}/summary.csv, per_item.csv, turns.csv, records.jsonl")
    return 0
