"""Streaming logit lens vs the naive way, side by side, on a Qwen2.5-VL-shaped pair with the real vocabulary.

Usage:
    python benchmarks/bench_drift.py                        # CPU: hidden 512, 4 layers, ~1,000 tokens
    python benchmarks/bench_drift.py --device cuda --dtype bfloat16 --real-shapes   # 7B shapes on a GPU
    python benchmarks/bench_drift.py --json runs/bench.json
    python benchmarks/bench_drift.py --twins 3              # three twins in one run vs three pair runs

Two randomly initialised models (vocabulary 152,064) read the same ~1,000-token input: a short text
prompt plus one image sized to give most of the tokens as visual tokens. For each method we run a
fresh subprocess (so peak memory is that method's alone), measure wall time and peak memory above a
baseline taken after the models are built, and repeat; methods alternate so they see the same load.

* streaming: ``lens.logit_lens.pair_lens`` (nnsight capture, then layer by layer, token chunk by chunk);
* naive: ``output_hidden_states`` of both models, then norm + unembedding + full-vocabulary
  log-softmax of every layer, all kept in memory, then entropy and KL.

A third measurement compares the lens's unembedding FLOP rate (``LogitLens.logits`` over the
lens's own token chunks, 2·T·d·V per layer per model) with one plain ``x @ W.T`` of the same total shape.
Peak memory: CPU from a sampler thread reading ``/proc/self/statm`` (RSS); CUDA from
``torch.cuda.max_memory_allocated``.

``--twins N`` measures something else: a base and N twins read in one run
(``lens.logit_lens.multi_lens``: every model forward and lens once per sample) against N separate
pair runs (``pair_lens`` of the base with each twin), alternating in one process, on the same input.
Only the base's forward and lens are shared, so the floor is (N+1)/(2N) of the separate time
(0.67 for three twins); the target is 0.72. The outputs must be identical.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VOCAB = 152_064
REAL = dict(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1000, help="target sequence length (default 1000)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2 x hidden)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--real-shapes", action="store_true", help="Qwen2.5-VL-7B text shapes (h 3584, 28 layers)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--token-chunk", type=int, default=None, help="lens token chunk (default: LensConfig's)")
    p.add_argument("--twins", type=int, default=0, help="compare one run of N twins with N pair runs")
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.real_shapes:
        args.hidden, args.layers = REAL["hidden"], REAL["layers"]
        args.intermediate, args.heads, args.kv_heads = REAL["intermediate"], REAL["heads"], REAL["kv_heads"]
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


# -- child side: build the pair, run one method -----------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at ``start()``: CUDA allocator stats, or a sampled CPU RSS."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._stop = threading.Event()
        self.peak = 0

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)  # big temporaries live far longer; sampling faster steals the core

    def stop(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak - self.base


def build(args: argparse.Namespace, n_models: int = 2):
    """The pair (seeds 0 and 1) and one ~``args.tokens``-token input: prompt + one image; with
    ``n_models > 2`` also the further twins (seeds 2, 3, ...), returned as a third item."""
    import numpy as np
    import torch
    from PIL import Image

    from lens.loading import ModelPair
    from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer

    dtype = getattr(torch, args.dtype)
    tok = tiny_tokenizer()
    prompt = "How many red shapes are in the image? Think step by step, then answer with a number."
    n_text = 60  # about: system turn + prompt + generation prompt
    n_visual = max(args.tokens - n_text, 4)
    rows = max(int(math.sqrt(n_visual)), 1)
    cols = max(n_visual // rows, 1)
    unit = 28  # 14-px patches, 2 x 2 merge
    processor = tiny_image_processor(max_side=int(math.ceil(math.sqrt(rows * cols) * unit)) + unit)
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, size=(rows * unit, cols * unit, 3), dtype=np.uint8)
    )
    shapes = dict(
        hidden_size=args.hidden,
        num_layers=args.layers,
        vocab_size=args.vocab,
        intermediate_size=args.intermediate or 2 * args.hidden,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        attn_implementation="sdpa",
    )
    models = []
    for seed in range(n_models):
        model = tiny_qwen25vl(tok, seed=seed, **shapes)
        models.append(model.to(device=args.device, dtype=dtype))
    pair = ModelPair.from_models(models[0], models[1], tok, processor)
    inputs = pair.encode(prompt, [image])
    if n_models > 2:
        return pair, inputs, models[2:]
    return pair, inputs


def working_memory(
    n_models: int, layers: int, tokens: int, hidden: int, vocab: int, chunk: int, dtype_bytes: int
) -> int:
    """Bytes one sample needs in ``multi_lens`` beyond the weights: every model's captured residuals
    (model dtype), then per token chunk every model's float32 log-probabilities plus about three
    chunk-sized float32 temporaries (logits, probabilities, a product)."""
    residuals = n_models * layers * tokens * hidden * dtype_bytes
    chunk_rows = min(chunk, tokens)
    return residuals + (n_models + 3) * chunk_rows * vocab * 4


def twins_bench(args: argparse.Namespace) -> int:
    """One run of a base and N twins (multi_lens) against N pair runs (pair_lens), side by side."""
    import torch

    from lens.logit_lens import LensConfig, multi_lens, pair_lens

    torch.set_num_threads(args.threads)
    pair, inputs, extra = build(args, n_models=args.twins + 1)
    twins = {f"twin{i + 1}": m for i, m in enumerate([pair.rlvr, *extra])}
    models = {"base": pair.base, **twins}
    comparisons = [("base", name) for name in twins]
    config = LensConfig() if args.token_chunk is None else LensConfig(token_chunk=args.token_chunk)

    def together():
        return multi_lens(models, pair.adapter, inputs, comparisons, config)

    def separate():
        return {c: pair_lens(pair.base, models[c[1]], pair.adapter, inputs, config) for c in comparisons}

    short = pair.encode("Warm up.", [])
    multi_lens(models, pair.adapter, short, comparisons, config)  # nnsight's one-off source parsing
    times: dict[str, list[float]] = {"together": [], "separate": []}
    outputs = {}
    for i in range(args.repeats):
        for name in ("together", "separate") if i % 2 == 0 else ("separate", "together"):
            _sync(args.device)
            t0 = time.perf_counter()
            outputs[name] = (together if name == "together" else separate)()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
            print(f"  run {i + 1}/{args.repeats} {name:9s} {times[name][-1]:7.2f} s", file=sys.stderr)
    # Working memory of one sample (the models and their float32 unembedding copies, built by the
    # warm-up, are the baseline), against the estimate the README's 7B figure comes from.
    import gc

    outputs.clear()
    gc.collect()
    mem = PeakMemory(args.device)
    mem.start()
    outputs["together"] = together()
    measured = mem.stop()
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    estimate = working_memory(args.twins + 1, args.layers, inputs.n_tokens, args.hidden, args.vocab,
                              config.token_chunk, dtype_bytes)  # fmt: skip
    outputs["separate"] = separate()
    diff = max(
        float((getattr(outputs["together"][c], f) - getattr(outputs["separate"][c], f)).abs().max())
        for c in comparisons
        for f in ("base_entropy", "rlvr_entropy", "kl_base_rlvr")
    )
    t_together, t_separate = statistics.median(times["together"]), statistics.median(times["separate"])
    ratio = t_together / t_separate
    floor = (args.twins + 1) / (2 * args.twins)
    summary = {
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "tokens": inputs.n_tokens,
            "twins": args.twins,
            "repeats": args.repeats,
        },
        "together_s": t_together,
        "separate_s": t_separate,
        "ratio": ratio,
        "floor": floor,
        "max_abs_diff": diff,
        "working_memory_mib": {"measured": measured / 2**20, "estimate": estimate / 2**20},
        "targets_met": {"ratio<=0.72": ratio <= 0.72, "identical": diff == 0.0},
    }
    c = summary["config"]
    print(
        f"\nbench_drift --twins {args.twins}: {c['device']} {c['dtype']}, {c['threads']} thread(s); hidden "
        f"{c['hidden']}, {c['layers']} layers, vocab {c['vocab']}; {c['tokens']} tokens; median of {c['repeats']}"
    )
    print(f"  {args.twins} pair runs       {t_separate:8.2f} s")
    print(f"  one run of {args.twins} twins  {t_together:8.2f} s")
    print(
        f"  ratio {ratio:.3f} (floor {floor:.3f}, target <= 0.72: {'ok' if ratio <= 0.72 else 'MISSED'}); "
        f"outputs identical: {diff == 0.0} (max |diff| {diff:.1e})"
    )
    print(
        f"  one sample's working memory: measured {measured / 2**20:.0f} MiB, estimated {estimate / 2**20:.0f} MiB "
        "(models and float32 unembedding copies excluded)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0 if diff == 0.0 else 1


def naive_lens(pair, inputs):
    """All hidden states, then a full-vocabulary log-softmax per layer, all kept, then entropy and KL."""
    import torch

    adapter = pair.adapter
    with torch.no_grad():
        hidden = {}
        for name, model in (("base", pair.base), ("rlvr", pair.rlvr)):
            hidden[name] = model(**inputs.model_inputs, output_hidden_states=True).hidden_states
        logps = {}
        for name, model in (("base", pair.base), ("rlvr", pair.rlvr)):
            norm, head = adapter.final_norm(model), adapter.unembed(model)
            weight = head.weight.float()
            hs = hidden[name]
            per_layer = []
            for i in range(1, len(hs)):
                # hidden_states[-1] is already final-normed; every other entry needs the norm.
                x = hs[i][0].float() if i == len(hs) - 1 else norm(hs[i][0].float()).float()
                per_layer.append(torch.log_softmax(x @ weight.T, dim=-1))
            logps[name] = per_layer
        out = {"base_entropy": [], "rlvr_entropy": [], "kl_base_rlvr": []}
        for lb, lr in zip(logps["base"], logps["rlvr"], strict=True):
            pb = lb.exp()
            out["base_entropy"].append(-(pb * lb).sum(-1))
            out["kl_base_rlvr"].append((pb * (lb - lr)).sum(-1).clamp_min(0.0))
            out["rlvr_entropy"].append(-(lr.exp() * lr).sum(-1))
        return {k: torch.stack(v).cpu() for k, v in out.items()}


def streaming_lens(pair, inputs, token_chunk):
    from lens.logit_lens import LensConfig, pair_lens

    config = LensConfig() if token_chunk is None else LensConfig(token_chunk=token_chunk)
    r = pair_lens(pair.base, pair.rlvr, pair.adapter, inputs, config)
    return {"base_entropy": r.base_entropy, "rlvr_entropy": r.rlvr_entropy, "kl_base_rlvr": r.kl_base_rlvr}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def unembed_rates(pair, inputs, args) -> dict[str, float]:
    """Seconds for LogitLens.logits over the lens's chunks of every layer of both models vs a plain
    ``x @ W.T`` of the same total shape (same dtype: float32)."""
    import torch

    from lens.logit_lens import LensConfig, LogitLens
    from lens.tracing import capture_residuals

    chunk = args.token_chunk or LensConfig().token_chunk
    lens_s, plain_s = [], []
    with torch.no_grad():
        work = []
        for model in pair.models():
            # A rate: two layers per model give the same shapes as all of them, in less time.
            hidden, _ = capture_residuals(
                model, pair.adapter, inputs.model_inputs, layers=range(min(2, pair.n_layers))
            )
            lens = LogitLens(model, pair.adapter)
            work.append((lens, hidden))
        n_tokens, d = work[0][1][0].shape
        x = torch.randn(n_tokens, d, device=args.device)
        weights = [lens.weight for lens, _ in work]
        for _ in range(args.repeats):
            _sync(args.device)
            t0 = time.perf_counter()
            for lens, hidden in work:
                for h in hidden:
                    for start in range(0, n_tokens, chunk):
                        out = lens.logits(h[start : start + chunk])
                        del out
            _sync(args.device)
            lens_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for w, (_, hidden) in zip(weights, work, strict=True):
                for _ in hidden:
                    out = x @ w.T
                    del out
            _sync(args.device)
            plain_s.append(time.perf_counter() - t0)
    flops = 2.0 * n_tokens * d * weights[0].shape[0] * len(work[0][1]) * 2
    lens_t, plain_t = statistics.median(lens_s), statistics.median(plain_s)
    return {
        "flops": flops,
        "lens_s": lens_t,
        "plain_s": plain_t,
        "lens_gflops": flops / lens_t / 1e9,
        "plain_gflops": flops / plain_t / 1e9,
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    pair, inputs = build(args)
    # Warm up kernels on a short input so first-call costs are not billed to either method.
    short = pair.encode("Warm up.", [])
    if args.child == "naive":
        naive_lens(pair, short)
    else:  # also pays nnsight's one-off cost of parsing the model's source on the first trace
        streaming_lens(pair, short, args.token_chunk)
    result: dict = {"n_tokens": inputs.n_tokens, "n_visual": inputs.roles.count("visual")}
    if args.child == "flops":
        result.update(unembed_rates(pair, inputs, args))
    else:
        import gc

        gc.collect()
        mem = PeakMemory(args.device)
        mem.start()
        _sync(args.device)
        t0 = time.perf_counter()
        if args.child == "naive":
            stats = naive_lens(pair, inputs)
        else:
            stats = streaming_lens(pair, inputs, args.token_chunk)
        _sync(args.device)
        result["seconds"] = time.perf_counter() - t0
        result["peak_bytes"] = mem.stop()
        torch.save(stats, args.child_out + ".pt")
    Path(args.child_out).write_text(json.dumps(result))


# -- parent side ---------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, method: str, workdir: Path, index: int) -> dict:
    out = workdir / f"{method}{index}.json"
    argv = [a for a in sys.argv[1:] if a]
    cmd = [sys.executable, __file__, *argv, "--child", method, "--child-out", str(out)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["stats_path"] = str(out) + ".pt"
    return result


def compare(paths_a: str, paths_b: str) -> float:
    import torch

    a, b = torch.load(paths_a), torch.load(paths_b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.twins:
        return twins_bench(args)
    runs: dict[str, list[dict]] = {"naive": [], "streaming": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            for method in ("naive", "streaming") if i % 2 == 0 else ("streaming", "naive"):
                runs[method].append(run_child(args, method, work, i))
                r = runs[method][-1]
                print(
                    f"  run {i + 1}/{args.repeats} {method:9s} {r['seconds']:7.2f} s  "
                    f"peak {r['peak_bytes'] / 2**20:8.0f} MiB",
                    file=sys.stderr,
                )
        max_diff = compare(runs["naive"][0]["stats_path"], runs["streaming"][0]["stats_path"])
        flops = run_child(args, "flops", work, 0)

    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[method])

    tol = 1e-3 if args.dtype == "float32" else 5e-2
    summary = {
        "config": {
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate or 2 * args.hidden,
            "vocab": args.vocab,
            "tokens": runs["naive"][0]["n_tokens"],
            "visual_tokens": runs["naive"][0]["n_visual"],
            "token_chunk": args.token_chunk,
            "repeats": args.repeats,
        },
        "naive": {"seconds": med("naive", "seconds"), "peak_mib": med("naive", "peak_bytes") / 2**20},
        "streaming": {
            "seconds": med("streaming", "seconds"),
            "peak_mib": med("streaming", "peak_bytes") / 2**20,
        },
        "max_abs_diff": max_diff,
        "results_equal": max_diff <= tol,
        "unembed": {k: flops[k] for k in ("lens_gflops", "plain_gflops", "lens_s", "plain_s")},
    }
    ratios = {
        "time": summary["streaming"]["seconds"] / summary["naive"]["seconds"],
        "peak_memory": summary["streaming"]["peak_mib"] / summary["naive"]["peak_mib"],
        "unembed_rate": flops["lens_gflops"] / flops["plain_gflops"],
    }
    summary["ratios"] = ratios
    summary["targets_met"] = {
        "peak_memory<=0.25": ratios["peak_memory"] <= 0.25,
        "time<=1.0": ratios["time"] <= 1.0,
        "unembed_rate>=0.70": ratios["unembed_rate"] >= 0.70,
    }
    c = summary["config"]
    print(
        f"\nbench_drift: {c['device']} {c['dtype']}, {c['threads']} thread(s); hidden {c['hidden']}, "
        f"{c['layers']} layers, vocab {c['vocab']}; {c['tokens']} tokens ({c['visual_tokens']} visual); "
        f"median of {c['repeats']}"
    )
    print(f"{'':22s}{'naive':>12s}{'streaming':>12s}{'ratio':>9s}  target")
    print(
        f"{'wall time (s)':22s}{summary['naive']['seconds']:12.2f}{summary['streaming']['seconds']:12.2f}"
        f"{ratios['time']:9.2f}  <= 1.00 {'ok' if ratios['time'] <= 1 else 'MISSED'}"
    )
    print(
        f"{'peak memory (MiB)':22s}{summary['naive']['peak_mib']:12.0f}{summary['streaming']['peak_mib']:12.0f}"
        f"{ratios['peak_memory']:9.2f}  <= 0.25 {'ok' if ratios['peak_memory'] <= 0.25 else 'MISSED'}"
    )
    print(
        f"{'unembed GFLOP/s':22s}{flops['plain_gflops']:12.1f}{flops['lens_gflops']:12.1f}"
        f"{ratios['unembed_rate']:9.2f}  >= 0.70 {'ok' if ratios['unembed_rate'] >= 0.7 else 'MISSED'}"
        "   (plain x @ W.T | LogitLens.logits)"
    )
    print(f"results equal: {summary['results_equal']} (max |diff| {max_diff:.2e} over entropies and KL)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0 if summary["results_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
