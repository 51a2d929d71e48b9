"""The video organism: its task generator, encoder, training steps, files and a tiny evaluation."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from lens.errors import ConfigError
from lens.organism import video as V
from lens.organism.model import build_model, save_folder
from lens.organism.task import BACKGROUND, CELL
from lens.organism.train import grpo_step, rollout, sft_loss, sft_step


@pytest.fixture(scope="module")
def tok():
    return V.build_video_tokenizer()


@pytest.fixture(scope="module")
def enc(tok):
    return V.VideoEncoder(tok)


# --- task generator ----------------------------------------------------------------------------------


def test_generator_is_deterministic():
    a, b = V.heldout(12), V.heldout(12)
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.question, x.answer, x.qtype, x.shapes) == (
            y.id,
            y.question,
            y.answer,
            y.qtype,
            y.shapes,
        )
        assert np.array_equal(x.video.frames, y.video.frames)
    assert [s.id for s in V.heldout(5)] == [s.id for s in a[:5]]  # a prefix
    other = V.validation(12)
    assert any(not np.array_equal(x.video.frames, y.video.frames) for x, y in zip(a, other, strict=True))


def _cells(frames: np.ndarray) -> list[tuple[bool, bool]]:
    """Read the labels back off the pixels: per 16-px cell, (holds a shape, pixels change over frames)."""
    out = []
    for r in range(V.GRID):
        for c in range(V.GRID):
            cell = frames[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].astype(int)
            occupied = bool((cell != np.asarray(BACKGROUND)).any())
            changes = any(not np.array_equal(cell[0], cell[f]) for f in range(1, len(cell)))
            out.append((occupied, changes))
    return out


def test_labels_are_correct_by_construction():
    """Counting moving / still / all shapes from the pixels alone gives every item's answer."""
    samples = V.heldout(60)
    for s in samples:
        assert s.video.frames.shape == (V.N_FRAMES, V.FRAME_SIZE, V.FRAME_SIZE, 3)
        assert s.video.frames.dtype == np.uint8
        cells = _cells(s.video.frames)
        read = {
            "total": sum(o for o, _ in cells),
            "moving": sum(o and m for o, m in cells),
            "still": sum(o and not m for o, m in cells),
        }
        assert s.answer == str(read[s.qtype]), (s.id, s.qtype, read)
        assert s.question == f"how many {s.qtype} shapes ?"
        assert all(not m for o, m in cells if not o)  # empty cells never change
    assert {s.qtype for s in samples} == set(V.VIDEO_QTYPES)
    moving = [sh.moving for s in samples for sh in s.shapes]
    assert 0.3 < np.mean(moving) < 0.7  # both kinds are common


def test_moving_shapes_step_at_least_min_step():
    for s in V.heldout(30):
        for sh in s.shapes:
            if sh.moving:
                steps = [
                    max(abs(a[0] - b[0]), abs(a[1] - b[1]))
                    for a, b in zip(sh.centres[:-1], sh.centres[1:], strict=True)
                ]
                assert min(steps) >= V.MIN_STEP


def test_unknown_question_type():
    with pytest.raises(ConfigError, match="moving, still, total"):
        V.count([], "red")


# --- encoding --------------------------------------------------------------------------------------------


def test_tokenizer_extends_the_image_vocabulary(tok):
    from lens.organism.model import build_tokenizer

    image_tok = build_tokenizer()
    assert len(tok) == len(image_tok) + len(V.VIDEO_WORDS)
    assert all(
        tok.convert_tokens_to_ids(w) == image_tok.convert_tokens_to_ids(w)
        for w in ("answer", "7", "<|video_pad|>")
    )
    assert "<unk>" not in tok.convert_ids_to_tokens(tok("how many moving shapes ?")["input_ids"])


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory, tok):
    """A pair of randomly initialised video-organism models saved as folders, loaded through lens."""
    import lens

    root = tmp_path_factory.mktemp("vorg")
    for name, seed in (("base", 0), ("rlvr", 1)):
        save_folder(build_model(tok, seed=seed), tok, root / name)
    return lens.load_pair(str(root / "base"), str(root / "rlvr"), image_first=False), root


def test_encoder_matches_pair_encode_in_memory_and_from_files(random_pair, enc, tmp_path):
    """The fast encoder equals ``pair.encode`` on the in-memory clip and on the FFV1 file the dataset writes."""
    from lens.datasets import load_jsonl
    from lens.datasets.sample import sample_videos

    pair, _ = random_pair
    folder = V.write_dataset(tmp_path / "data", n=3)
    loaded = load_jsonl(folder / "data.jsonl")
    for s, row in zip(V.heldout(3), loaded, strict=True):
        assert (row.id, row.question, row.answer, row.qtype) == (s.id, s.question, s.answer, s.qtype)
        mine = enc.encode([s.question], [s.video])
        for video in (s.video, *sample_videos(row)):
            ref = pair.encode(s.question, videos=[video]).model_inputs
            assert set(mine) == set(ref)
            for key in mine:
                assert torch.equal(mine[key].to(ref[key].dtype), ref[key]), key
    n_tokens = int((mine["input_ids"] == enc.video_token_id).sum())
    assert n_tokens == enc.n_video_tokens == 18  # 2 temporal patches x 3 x 3 merged tokens


def test_in_memory_clips_have_record_digests():
    """Resumable runs digest an item's in-memory clip by its frames (no file to read)."""
    from dataclasses import replace

    from lens.fingerprint import sample_digest

    a, b = V.heldout(2)
    assert sample_digest(a) == sample_digest(V.heldout(1)[0])
    moved = replace(a, video=replace(a.video, frames=b.video.frames))
    assert sample_digest(moved) != sample_digest(a)


def test_write_dataset_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        V.write_dataset(tmp_path, n=1)
    assert (tmp_path / "x").read_text() == "keep"


# --- training code paths ----------------------------------------------------------------------------


def test_sft_and_grpo_steps_run_on_video_batches(tok, enc):
    torch.manual_seed(0)
    model = build_model(tok, seed=0)
    batch = V.heldout(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(sft_loss(model, enc, batch))
    for _ in range(6):
        sft_step(model, opt, None, enc, batch)
    with torch.no_grad():
        after = float(sft_loss(model, enc, batch))
    assert after < 0.7 * before
    params = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    stats = grpo_step(model, opt, enc, batch, group=4)
    assert 0 <= stats["reward"] <= 1 and np.isfinite(stats["loss"])
    if stats["updated"]:
        assert any(not torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    texts = rollout(model, enc, batch[:2], n=3, do_sample=True)
    assert len(texts) == 2 and all(len(t) == 3 for t in texts)


def test_video_task_carries_its_training_defaults():
    """The video task trains SFT at its own rate; seed and threads still come from the caller."""
    from lens.organism.train import IMAGE_TASK, TrainConfig

    cfg = V.video_task().train_config(seed=5, threads=2)
    assert (cfg.seed, cfg.threads) == (5, 2)
    assert cfg.sft_lr == dict(V.TRAIN_DEFAULTS)["sft_lr"] != TrainConfig().sft_lr
    assert cfg.sft_max_steps == dict(V.TRAIN_DEFAULTS)["sft_max_steps"]
    assert IMAGE_TASK.train_config(seed=5) == TrainConfig(seed=5)
    assert V.video_task().train_config(sft_lr=3e-3).sft_lr == 3e-3  # an explicit value wins
    with pytest.raises(ConfigError, match="unknown training settings"):
        V.video_task().train_config(sft_rate=1e-3)


@pytest.mark.slow
def test_video_training_is_bit_identical_for_a_seed(tok):
    """Two short runs of all three phases with one seed give bit-identical weights (and logs)."""
    from lens.organism.train import train_models

    cfg = V.video_task().train_config(
        seed=0, sft_batch=4, sft_max_steps=2, rl_steps=2, rl_prompts=2, rl_group=2, val_n=4, control_batch=4
    )

    def run():
        models, _, log, info = train_models(cfg, progress=False, task=V.video_task())
        return {name: m.state_dict() for name, m in models.items()}, [r["loss"] for r in log], info

    (a, loss_a, info), (b, loss_b, _) = run(), run()
    assert loss_a == loss_b and info["sft_steps"] == 2
    for name in ("base", "rlvr", "control"):
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    untrained = build_model(tok, seed=0).state_dict()
    assert not all(torch.equal(a["base"][k], untrained[k]) for k in untrained)  # SFT moved the weights


def test_tiny_end_to_end_eval(tok, enc):
    """analyses.evaluate scores two video models on a few held-out items, with CIs and paired differences."""
    from analyses.evaluate import EvalConfig, evaluate

    models = {"base": build_model(tok, seed=0), "rlvr": build_model(tok, seed=1)}
    res = evaluate(models, enc, V.heldout(4), V.verify, EvalConfig(ks=(1, 2), n=2, n_boot=50))
    assert len(res.per_item) == 8
    assert set(res.summary["model"]) == {"base", "rlvr"}
    assert res.summary["estimate"].between(0, 1).all()
    assert set(res.differences["twin"]) == {"rlvr"}


def test_cli_dataset_task_video(tmp_path, capsys):
    from lens.commands import organism as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(
        ["organism", "dataset", "--task", "video", "--n", "2", "--out", str(tmp_path / "d")]
    )
    assert args.handler(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "data.jsonl").read_text().splitlines()]
    assert [r["video"] for r in rows] == ["videos/heldout-00000.mkv", "videos/heldout-00001.mkv"]
    from lens.video import VideoOptions, read_video

    clip = read_video(tmp_path / "d" / rows[0]["video"], VideoOptions(nframes=V.N_FRAMES))
    assert np.array_equal(clip.frames, V.heldout(1)[0].video.frames)  # lossless


# --- shipped weights ---------------------------------------------------------------------------------


shipped = pytest.mark.skipif(
    not (V.weights_dir() / "manifest.json").is_file(), reason="video organism weights not shipped"
)


@shipped
def test_shipped_video_weights_small_and_manifest_matches():
    m = V.manifest()
    assert m["task"] == "video"
    for name in ("base", "rlvr", "control"):
        assert (V.model_dir(name) / "model.safetensors").stat().st_size < 10e6
    model, tok, _ = V.load_model("base")
    enc = V.VideoEncoder(tok)
    from lens.organism.train import greedy_correct

    n = m["heldout_greedy"]["base"]["n"]
    ok = greedy_correct(model, enc, V.heldout(n), batch_size=m["eval_batch"])
    assert sum(ok) == m["heldout_greedy"]["base"]["correct"]


@shipped
def test_shipped_video_pair_encodes_an_item():
    pair = V.load_pair()
    s = V.heldout(1)[0]
    inputs = pair.encode(s.question, videos=[s.video])
    frames = [f for f in inputs.frames if f >= 0]
    assert len(frames) == 18 and sorted(set(frames)) == [0, 1]  # 2 temporal patches x 3 x 3 tokens
    ids = inputs.model_inputs["input_ids"][0].tolist()
    first_video = inputs.frames.index(0)
    assert ids.index(pair.tokenizer.convert_tokens_to_ids("how")) < first_video  # question first, as trained
    # What every dataset-driven run (intervene, replay, drift) feeds the pair: the same tensors as training.
    from lens.prompts import encode_sample

    ran = encode_sample(pair, s).model_inputs
    trained = V.VideoEncoder(pair.tokenizer).encode([s.question], [s.video])
    assert set(ran) == set(trained)
    assert all(torch.equal(trained[k].to(ran[k].dtype), ran[k]) for k in ran)


def test_organism_video_is_a_pair_name_for_the_cli(tmp_path, capsys):
    """`--base organism-video` loads the video trio and defaults to its held-out clips, in every command."""
    import lens
    from lens import organism
    from lens.cli import main

    pair = lens.load_pair("organism-video")
    assert pair.names == ("base", "rlvr") and not pair.image_first
    assert [s.id for s in organism.heldout_of("organism-video", 3)] == [s.id for s in V.heldout(3)]
    with pytest.raises(ConfigError, match="unknown organism"):
        organism.heldout_of("organism-audio", 1)

    assert main(["drift", "--base", "organism-video", "--items", "2", "--layers", "0", "--out", str(tmp_path / "d")]) == 0
    assert "visual tokens" in capsys.readouterr().out
    # Methods acting on visual tokens take video items (a video is visual input, not a missing image).
    out = tmp_path / "i"
    args = ["intervene", "--base", "organism-video", "--strategies", "rlvr,hard-low", "--items", "2", "--n", "0"]
    assert main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["item"] for r in rows} == {"heldout-00000", "heldout-00001"}
    assert {r["verifier"] for r in rows} == {"organism"}  # `auto` knows the video organism's items


def test_several_twin_drift_reads_the_video_tokens(tmp_path):
    """run_set_drift (the base once, every twin against it) feeds the clip, like run_drift does."""
    from analyses.kl_drift import DriftConfig, run_drift
    from analyses.set_drift import run_set_drift
    from lens import organism
    from lens.modelset import load_models, organism_sources

    clips = V.heldout(2)
    twins = load_models(organism_sources(("rlvr", "control"), "organism-video"), image_first=False)
    result = run_set_drift(twins, clips, None, DriftConfig(layers=(0, 3)))
    rows = result.tidy["base→rlvr"].to_pandas()
    assert (rows.role == "visual").sum() == 2 * 18 * 2  # 2 clips x 18 video tokens x 2 layers
    single = run_drift(organism.load_pair(variant="organism-video"), clips, config=DriftConfig(layers=(0, 3)))
    both = result.buckets.query("comparison == 'base→rlvr'")
    assert np.allclose(
        both.sort_values(["scope", "layer", "token_group", "bucket"]).mean_kl.to_numpy(),
        single.buckets.sort_values(["scope", "layer", "token_group", "bucket"]).mean_kl.to_numpy(),
        atol=1e-6,
    )
