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
