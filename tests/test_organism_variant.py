"""The opt-in readable organism: tied embeddings and the caption stage (lens.organism.caption)."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from lens.errors import ConfigError
from lens.organism.caption import caption_loss, caption_targets, cell_words
from lens.organism.model import Encoder, TinyConfig, build_model, build_tokenizer, load_folder, save_folder
from lens.organism.task import COLOURS, generate, make_sample
from lens.organism.train import TrainConfig, train_models


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_cell_words_recover_every_answer():
    """The pixel-read captions count exactly what the task's ground truth counts, for all three questions."""
    for index in range(60):
        for qtype in ("red", "round", "total"):
            s = make_sample(5, index, qtype=qtype)
            words = [w for w in cell_words(s.image) if w is not None]
            got = {"red": sum(c == "red" for c, _ in words), "round": sum(k == "round" for _, k in words),
                   "total": len(words)}[qtype]  # fmt: skip
            assert got == int(s.answer), (index, qtype, words)


def test_cell_words_refuse_other_images():
    with pytest.raises(ValueError, match="64x64"):
        cell_words(Image.new("RGB", (48, 48)))
    odd = Image.new("RGB", (64, 64), (20, 20, 24))
    odd.putpixel((3, 3), (1, 2, 3))
    with pytest.raises(ValueError, match="not one organism shape colour"):
        cell_words(odd)


def test_caption_targets_put_half_on_colour_and_kind(tok):
    items = generate(9, 4)
    target, keep = caption_targets(tok, [s.image for s in items])
    assert target.shape == (4 * 16, len(tok))
    words = [w for s in items for w in cell_words(s.image)]
    assert keep.tolist() == [w is not None for w in words]
    assert torch.allclose(target[keep].sum(-1), torch.ones(int(keep.sum())))
    assert target[~keep].abs().sum() == 0
    row = int(keep.nonzero()[0])
    colour, kind = words[row]
    assert target[row, tok.convert_tokens_to_ids(colour)] == 0.5
    assert target[row, tok.convert_tokens_to_ids(kind)] == 0.5
    assert set(COLOURS) >= {w[0] for w in words if w}


def test_tied_option_ties_and_default_stays_untied(tok, tmp_path):
    untied = build_model(tok, seed=0)
    assert untied.lm_head.weight.data_ptr() != untied.model.language_model.embed_tokens.weight.data_ptr()
    tied = build_model(tok, TinyConfig(tie_word_embeddings=True), seed=0)
    assert tied.lm_head.weight.data_ptr() == tied.model.language_model.embed_tokens.weight.data_ptr()
    save_folder(tied, tok, tmp_path / "m")
    loaded, _, _ = load_folder(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, tied.lm_head.weight)


def test_caption_loss_trains_only_occupied_cells(tok):
    """The loss falls on a fixed batch, and empty cells' outputs carry no gradient."""
    torch.manual_seed(0)
    model = build_model(tok, TinyConfig(tie_word_embeddings=True), seed=0)
    enc = Encoder(tok)
    batch = generate(3, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(caption_loss(model, enc, batch))
    for _ in range(6):
        loss = caption_loss(model, enc, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(caption_loss(model, enc, batch))
    assert after < 0.8 * before, (before, after)


def test_caption_config_validation():
    with pytest.raises(ConfigError, match="caption_steps"):
        TrainConfig(caption_steps=-1)
    with pytest.raises(ConfigError, match="caption_warmup"):
        TrainConfig(caption_warmup=0)
    from lens.organism.video import video_task

    with pytest.raises(ConfigError, match="image organism"):
        train_models(TrainConfig(caption_steps=1), progress=False, task=video_task())


def test_train_models_runs_the_caption_stage_first():
    cfg = TrainConfig(caption_steps=2, sft_max_steps=2, sft_min_steps=1, sft_check_every=100, rl_steps=1,
                      rl_prompts=2, rl_group=2, sft_batch=4, control_batch=4, val_n=4)  # fmt: skip
    models, _, log, info = train_models(cfg, progress=False, arch=TinyConfig(tie_word_embeddings=True))
    assert [r["phase"] for r in log[:3]] == ["caption", "caption", "sft"]
    assert info["caption_steps"] == 2
    for m in models.values():
        assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()


def _train_args(*argv: str) -> argparse.Namespace:
    from lens.commands import organism as organism_cmd

    parser = argparse.ArgumentParser()
    organism_cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["organism", "train", *argv])


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--caption-steps", "-1"), "--caption-steps must be >= 0"),
        (("--caption-steps", "5", "--task", "video"), "needs the image organism"),
    ],
)
def test_train_cli_refuses_bad_caption_options(tmp_path, argv, message):
    args = _train_args("--out", str(tmp_path / "w"), *argv)
    with pytest.raises(ConfigError, match=message):
        args.handler(args)
    assert not (tmp_path / "w").exists()


def test_caption_stage_is_deterministic_for_a_seed():
    cfg = TrainConfig(caption_steps=3, sft_max_steps=1, sft_min_steps=1, sft_check_every=100, rl_steps=0,
                      sft_batch=4, val_n=4)  # fmt: skip
    arch = TinyConfig(tie_word_embeddings=True)
    first, _, _, _ = train_models(cfg, progress=False, arch=arch)
    second, _, _, _ = train_models(cfg, progress=False, arch=arch)
    for a, b in zip(first["base"].parameters(), second["base"].parameters(), strict=True):
        assert torch.equal(a, b)


# --- the shipped readable organism ("organism-tied") ---------------------------------------------------


def test_shipped_tied_trio_is_complete_small_and_tied():
    from lens import organism

    for name in organism.MODEL_NAMES:
        folder = organism.model_dir(name, "organism-tied")
        assert (folder / "model.safetensors").stat().st_size <= 10 * 2**20
        model, _, _ = organism.load_model(name, "organism-tied")
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    m = organism.manifest("organism-tied")
    assert m["architecture"]["tie_word_embeddings"] is True
    assert m["train_config"]["caption_steps"] > 0
    acc = {k: v["accuracy"] for k, v in m["heldout_greedy"].items()}
    assert acc["rlvr"] >= acc["base"] + 0.05
    with pytest.raises(ConfigError, match="organism-tied"):
        organism.weights_dir("organism-nope")


def _selected(pair, items):
    """Released τ·max mask (τ = 0.4) at the organism's replay layers 0-1: ``[(selected, shape cells)]``."""
    from lens.interventions.replay import ReplayConfig, base_targets
    from lens.prompts import encode_sample

    out = []
    for s in items:
        targets = base_targets(pair, encode_sample(pair, s), ReplayConfig(layers=(0, 1)))
        shapes = {j for j, w in enumerate(cell_words(s.image)) if w is not None}
        out.append(([set(idx.tolist()) for idx in targets.selected.values()], shapes))
    return out


def test_released_mask_selects_the_shape_tokens_of_the_tied_organism():
    """τ·max selects nothing on the default organism but exactly the shape cells on the readable one."""
    import lens
    from lens.organism.task import heldout

    items = heldout(6)
    assert all(not chosen for chosen, _ in _selected(lens.load_pair("organism"), items))
    for chosen, shapes in _selected(lens.load_pair("organism-tied"), items):
        assert len(chosen) == 2  # both layers select
        assert all(layer == shapes for layer in chosen)


def test_eval_runs_on_the_tied_organism(tmp_path):
    from lens.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--base", "organism-tied", "--items", "4", "--n", "2", "--k", "1,2",
                              "--out", str(tmp_path)])  # fmt: skip
    assert args.handler(args) == 0
    import json

    from lens import organism
    from lens.organism.task import heldout
    from lens.organism.train import rollout

    records = [json.loads(line) for line in next(tmp_path.glob("records-*.jsonl")).read_text().splitlines()]
    for name in organism.MODEL_NAMES:  # the eval decoded the tied trio, not the default one
        model, tok, _ = organism.load_model(name, "organism-tied")
        expected = [r[0] for r in rollout(model, Encoder(tok), heldout(4))]
        assert [r["response"] for r in records if r["model"] == name] == expected, name
