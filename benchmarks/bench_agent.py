"""Benchmark: agent runs in lockstep batches vs one item at a time, on the built-in organism.

``--items`` organism items each run the zoom-in loop (``lens.agent``) with a scripted zoom (so every
run has two model calls: the zoom, then the model's own answer), with ``--strategy`` applied at
every call. Both ways run side by side in one process, interleaved ``--repeats`` times after a
warm-up; the medians give runs/s and the ratio. Whether both ways gave identical runs (they should,
up to float rounding of padded rows) is printed with the numbers.

Only the decode is shared by a batch: each call is still encoded and prepared on its own item
(the intervention's prepare, e.g. the swap's base forward, runs per item), so the gain is bounded
by the decode's share of a call.

    python benchmarks/bench_agent.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analyses.agent import AgentRunConfig, make_agent_intervention  # noqa: E402
from lens import organism  # noqa: E402
from lens.agent import AgentConfig, AgentEpisode, run_agents  # noqa: E402

ZOOM = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 32, 32]}}</tool_call>'


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="items in lockstep (default 8)")
    p.add_argument("--strategy", default="hard-agent", help="an agent strategy (default hard-agent)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = organism.load_pair()
    intervention = make_agent_intervention(args.strategy, AgentRunConfig(), pair.n_layers)
    items = organism.heldout(args.items)
    config = AgentConfig(max_turns=4, answer="organism", tool_prompt="")

    def run(batch: int) -> tuple[float, list]:
        episodes = [AgentEpisode(pair, s.question, s.image, config=config, script=[ZOOM]) for s in items]
        start = time.perf_counter()
        runs = run_agents(pair, intervention, episodes, batch_size=batch)
        return time.perf_counter() - start, [r.to_dict() for r in runs]

    run(1), run(args.batch)  # warm-up
    times: dict[int, list[float]] = {1: [], args.batch: []}
    outputs = {}
    for _ in range(args.repeats):
        for batch in (1, args.batch):
            seconds, outputs[batch] = run(batch)
            times[batch].append(seconds)
    one, many = statistics.median(times[1]), statistics.median(times[args.batch])
    calls = sum(r["n_calls"] for r in outputs[1])
    print(
        f"{args.items} organism items, {calls} model calls, {args.strategy}, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats}:"
    )
    print(f"  one at a time: {one:.2f} s ({args.items / one:.1f} runs/s)")
    print(f"  batch {args.batch}:       {many:.2f} s ({args.items / many:.1f} runs/s)")
    print(f"  speed-up: {one / many:.2f}x; identical runs: {outputs[1] == outputs[args.batch]}")


if __name__ == "__main__":
    main()
