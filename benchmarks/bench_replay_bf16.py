"""Benchmark (issue 8): does Activation Replay's loss move in bf16?

A random Qwen2.5-VL-shaped pair at the real 7B residual width (3584) and attention shape (28 heads,
4 KV heads), the real vocabulary (152,064 rows), reduced depth and MLP width, a one-block vision
tower of the real width (1280: the merger's width sets the scale of the visual embeddings, rms ~1.4
here against ~0.03 with a 32-wide tower), and one 1288x728 image: 1,196 visual tokens, as in the
finding. The released settings otherwise
(τ = 0.4, α = 10, 25 steps, top-50). Three runs on the same weights (rounded to bf16 once):

* ``bf16, residual=model``: the rule before the fix (Δ cast to bf16 and added to the embeddings);
* ``bf16, residual=float32``: the float32 residual carry (the default);
* ``float32``: the same weights in float32, the control.

For each: the loss at every step, whether it changed, and the wall time. Also, at the visual
positions of the input of block 0: how large Δ is against half a bf16 ulp of the embedding, and
which fraction of the embedding's elements Δ actually changes in bf16 (what block 0, and so the
decoding, can see of it).

    python benchmarks/bench_replay_bf16.py                     # CPU defaults (1-2 hours on 2 cores)
    python benchmarks/bench_replay_bf16.py --layers 1 --replay-layers 1 --steps 5   # ~15 min: no block in the loop
    python benchmarks/bench_replay_bf16.py --device cuda --layers 28 --replay-layers 16 \\
        --intermediate 18944 --vision-hidden 1280 --vision-depth 32          # 7B shapes on a GPU

CPU note: on CPUs without AVX512-BF16, torch's bf16 matrix product is 30-100x slower for some
operand layouts (the backward's ``grad @ W`` among them: ~0.1 GFLOP/s on the 2-core test machine).
On CPU the harness therefore passes every bf16 ``mm``/``addmm`` its operands in the fast layout
(``--stock-mm`` turns this off). Same bf16 products with float32 accumulation, a different kernel:
values may differ from the stock kernel's in the last bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lens.interventions import ActivationReplay  # noqa: E402
from lens.interventions.base import capture_block_residuals  # noqa: E402
from lens.loading import ModelPair  # noqa: E402
from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer  # noqa: E402

REAL_VOCAB = 152_064
BF16 = torch.bfloat16


class FastCpuBf16Matmul(TorchDispatchMode):
    """Give bf16 ``mm``/``addmm`` on CPU a column-major left and a row-major right operand."""

    _OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._OPS and not kwargs and args[-1].dtype == BF16 and args[-1].device.type == "cpu":
            *bias, a, b = args
            return func(*bias, a.t().contiguous().t(), b.contiguous())
        return func(*args, **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=3584, help="residual width (default: 7B's 3584)")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512, help="MLP width (7B: 18944; default 512)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (7B: 28; default 2)")
    p.add_argument("--replay-layers", type=int, default=2, help="replay layers 0..N-1 (default 2)")
    p.add_argument("--vocab", type=int, default=REAL_VOCAB)
    p.add_argument("--vision-hidden", type=int, default=1280, help="vision tower width (7B: 1280)")
    p.add_argument("--vision-depth", type=int, default=1, help="vision tower depth (7B: 32; default 1)")
    p.add_argument("--width", type=int, default=1288, help="image width in px (multiple of 28)")
    p.add_argument("--height", type=int, default=728, help="image height in px (1288x728: 1,196 tokens)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--alpha", type=float, default=10.0)
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stock-mm", action="store_true", help="CPU: use torch's bf16 matmul as is")
    p.add_argument("--skip-float32", action="store_true", help="skip the float32 control")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[ModelPair, object]:
    """The pair in float32 with bf16-representable weights (so .to(bf16) loses nothing), and the inputs."""
    import numpy as np
    from PIL import Image

    torch.set_num_threads(args.threads)
    tok = tiny_tokenizer()
    ip = tiny_image_processor(max_side=max(args.width, args.height, 112))
    kw = dict(
        hidden_size=args.hidden,
        num_layers=args.layers,
        vocab_size=args.vocab,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        vision_hidden=args.vision_hidden,
        vision_depth=args.vision_depth,
        attn_implementation="sdpa",
    )
    models = []
    for seed in (0, 1):
        model = tiny_qwen25vl(tok, seed=seed, **kw).to(BF16).float().to(args.device)
        models.append(model)
    pair = ModelPair.from_models(*models, tok, ip)
    pixels = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    inputs = pair.encode(
        "How many red shapes are in the image? Answer with a number.", [Image.fromarray(pixels)]
    )
    return pair, inputs


def embeddings_at_visual(pair: ModelPair, inputs) -> torch.Tensor:
    states = capture_block_residuals(pair.rlvr, pair.adapter, inputs.model_inputs, inputs_of=(0,))
    return states[("in", 0)][inputs.visual_positions.to(pair.device)]


def half_ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bf16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.float().abs().clamp_min(torch.finfo(torch.float32).tiny)))
    return torch.exp2(exponent - 8)


def run(pair: ModelPair, inputs, settings: dict, residual: str, device: str) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        replay = ActivationReplay(residual=residual, **settings).prepare(pair, inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    result = replay.result
    return {
        "losses": list(result.losses),
        "final_loss": result.final_loss,
        "loss_changed": result.loss_changed,
        "n_selected": {str(k): v for k, v in result.n_selected.items()},
        "seconds": wall,
        "warnings": [str(w.message) for w in caught],
        "offsets": result.offsets,
    }


def offsets_against_bf16(offsets: torch.Tensor, embeds: torch.Tensor) -> dict:
    """How Δ compares with the bf16 embeddings it is added to."""
    ratio = offsets.abs() / half_ulp_bf16(embeds)
    return {
        "max_abs_offset": float(offsets.abs().max()),
        "offset_over_half_ulp_median": float(ratio.median()),
        "offset_over_half_ulp_max": float(ratio.max()),
        # The old rule: e + bf16(Δ) in bf16. The carry: bf16(float(e) + Δ), what block 0 reads.
        "changed_fraction_old_rule": float((embeds + offsets.to(BF16) != embeds).float().mean()),
        "changed_fraction_carry": float(((embeds.float() + offsets).to(BF16) != embeds).float().mean()),
    }


def show(name: str, out: dict) -> None:
    losses = [*out["losses"], out["final_loss"]]
    print(f"{name}: {out['seconds']:.0f} s, loss changed: {out['loss_changed']}")
    print("  loss per step (then final): " + " ".join(f"{v:.9g}" for v in losses))
    for message in out["warnings"]:
        print(f"  warning: {message}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    pair, inputs = build(args)
    n_vis = int(inputs.visual_positions.numel())
    settings = dict(
        tau=args.tau, alpha=args.alpha, steps=args.steps, layers=tuple(range(args.replay_layers)), topk=50
    )
    print(
        f"pair: hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, MLP {args.intermediate}, "
        f"{args.layers} layers, vocab {args.vocab}, vision {args.vision_hidden}x{args.vision_depth}; "
        f"{inputs.n_tokens} tokens ({n_vis} visual); replay layers 0..{args.replay_layers - 1}, "
        f"alpha {args.alpha:g}, {args.steps} steps; {args.threads} thread(s) on {args.device}"
    )
    results: dict = {"config": vars(args), "n_tokens": inputs.n_tokens, "n_visual": n_vis}
    if not args.skip_float32:
        results["float32"] = run(pair, inputs, settings, "float32", args.device)
        show("float32 (control)", results["float32"])
    pair.base.to(BF16), pair.rlvr.to(BF16)
    embeds = embeddings_at_visual(pair, inputs)
    half_ulp = half_ulp_bf16(embeds)
    results["embeddings"] = {
        "rms": float(embeds.float().pow(2).mean().sqrt()),
        "half_ulp_median": float(half_ulp.median()),
    }
    print(
        f"visual embeddings (bf16): rms {results['embeddings']['rms']:.4g}, "
        f"median half-ulp {results['embeddings']['half_ulp_median']:.3g}"
    )
    fast_mm = args.device == "cpu" and not args.stock_mm
    with FastCpuBf16Matmul() if fast_mm else contextlib.nullcontext():
        for residual in ("model", "float32"):
            name = f"bf16, residual={residual}"
            results[name] = out = run(pair, inputs, settings, residual, args.device)
            show(name + (" (before the fix)" if residual == "model" else " (the fix)"), out)
            out["offsets_vs_bf16"] = stats = offsets_against_bf16(out["offsets"], embeds)
            print(
                f"  final Δ: max |Δ| {stats['max_abs_offset']:.3g}; |Δ| / half-ulp median "
                f"{stats['offset_over_half_ulp_median']:.3g}, max {stats['offset_over_half_ulp_max']:.3g}; "
                f"embedding elements changed in bf16: old rule {100 * stats['changed_fraction_old_rule']:.3g}%, "
                f"carry {100 * stats['changed_fraction_carry']:.3g}%"
            )
    for out in results.values():
        if isinstance(out, dict):
            out.pop("offsets", None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
