"""Benchmark: V-Reason's decode overhead per generated token, as a ratio to plain decoding side by side.

A tiny random Qwen2.5-VL pair (:func:`lens.testing.tiny_qwen25vl`) decodes one video prompt (a
synthetic lossless clip written with PyAV, 4 sampled frames) for exactly ``--tokens`` new tokens
(end tokens masked, so every run has the same length) with:

* ``plain``: the RLVR model as is;
* ``vreason-k2``: V-Reason with its defaults (update every 2 tokens, 1 Adam step);
* ``vreason-k1``: an update before every token;
* ``lite-k2``: V-Reason (Lite), k = 2.

The runs are interleaved ``--repeats`` times after a warm-up (the cores are shared and noisy) and
the ratio of the median times is reported. Then each decodes once with its natural end (no forced
length) and the tokens generated are reported beside plain's (on random weights this says little
about the method: there is no answer to converge to).

    python benchmarks/bench_vreason.py --threads 1
    python benchmarks/bench_vreason.py --preset qwen7b --layers 2 --tokens 16 --repeats 3
    python benchmarks/bench_vreason.py --preset organism-video --threads 1

``--preset organism-video`` decodes the shipped video organism's RLVR twin on its first held-out
clip (18 video tokens). ``--preset qwen7b`` gives the decoder Qwen2.5-VL-7B's width (hidden 3584, 28 heads, 4 key/value
heads, MLP 18944, vocabulary 152064) at a reduced depth (``--layers``), in float32 on CPU. V-Reason
back-propagates from the output entropy to the last layer's values only, so its absolute cost does
not grow with depth while plain decoding's does: at full depth (28 layers) the ratio is lower than
at reduced depth. One random model serves as both sides of the pair (V-Reason decodes with one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lens.decoding import decoding_for  # noqa: E402
from lens.interventions import Baseline  # noqa: E402
from lens.interventions.vreason import VReason, VReasonConfig  # noqa: E402
from lens.loading import ModelPair  # noqa: E402
from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer  # noqa: E402
from lens.video import VideoOptions, VideoPart  # noqa: E402


def write_clip(path: Path, n_frames: int = 8, height: int = 56, width: int = 84) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (n_frames, height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--preset", choices=["tiny", "qwen7b", "organism-video"], default="tiny", help="which pair decodes"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok, ip = tiny_tokenizer(), tiny_image_processor()
    clip_inputs = None
    if args.preset == "organism-video":
        import lens
        from lens.organism import video

        pair = lens.load_pair("organism-video")
        clip = video.heldout(1)[0]
        clip_inputs = pair.encode(clip.question, videos=[clip.video])
    elif args.preset == "qwen7b":
        shape = dict(hidden_size=3584, num_heads=28, num_kv_heads=4, intermediate_size=18944, vocab_size=152064)
        model = tiny_qwen25vl(tok, seed=1, num_layers=args.layers, **shape)
        pair = ModelPair.from_models(model, model, tok, ip)
    else:
        pair = ModelPair.from_models(
            tiny_qwen25vl(tok, seed=0, hidden_size=args.hidden, num_layers=args.layers),
            tiny_qwen25vl(tok, seed=1, hidden_size=args.hidden, num_layers=args.layers),
            tok,
            ip,
        )
    if clip_inputs is not None:
        inputs = clip_inputs
    else:
        with tempfile.TemporaryDirectory() as folder:
            clip = Path(folder) / "clip.mkv"
            write_clip(clip)
            inputs = pair.encode("How many shapes move?", videos=[VideoPart(clip, VideoOptions(nframes=4))])
    runs = {
        "plain": Baseline(),
        "vreason-k2": VReason(VReasonConfig(every=2)),
        "vreason-k1": VReason(VReasonConfig(every=1)),
        "lite-k2": VReason(VReasonConfig(every=2, lite=True)),
    }
    states = {name: r.prepare(pair, inputs).state for name, r in runs.items()}
    fixed = decoding_for(pair, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run.generate_batch(pair, [states[name]], fixed)
            if repeat:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    natural = decoding_for(pair, max_new_tokens=4 * args.tokens)
    lengths = {
        name: len(run.generate_batch(pair, [states[name]], natural)[0].token_ids[0])
        for name, run in runs.items()
    }
    report = {
        "preset": args.preset,
        "layers": pair.n_layers,
        "hidden": pair.adapter.hidden_size(pair.config),
        "video_tokens": int(sum(f >= 0 for f in inputs.frames)),
        "prompt_tokens": inputs.n_tokens,
        "tokens": args.tokens,
        "ms_per_token": {n: round(1000 * m / args.tokens, 3) for n, m in median.items()},
        "ratio_vs_plain": {n: round(m / median["plain"], 3) for n, m in median.items()},
        "natural_tokens": lengths,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
