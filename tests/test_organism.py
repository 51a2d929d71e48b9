"""The built-in organism: task, tokenizer/template contract, trainers, shipped weights, eval CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from lens import organism
from lens.errors import ConfigError
from lens.organism.model import (
    Encoder,
    build_image_processor,
    build_model,
    build_tokenizer,
    patchify,
    suppress_ids,
)
from lens.organism.task import heldout, make_sample, validation, verify
from lens.organism.train import (
    TrainConfig,
    _swap_in,
    greedy_correct,
    grpo_step,
    sft_loss,
    sft_step,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# --- task -----------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    return a.question == b.question and a.answer == b.answer and a.image.tobytes() == b.image.tobytes()


def test_generator_is_deterministic():
    a = [make_sample(3, i) for i in range(20)]
    b = [make_sample(3, i) for i in range(20)]
    c = [make_sample(4, i) for i in range(20)]
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert sum(_same(x, y) for x, y in zip(a, c, strict=True)) == 0
    assert all(_same(x, y) for x, y in zip(heldout(30), heldout(60)[:30], strict=True))
    assert heldout(3)[0].id != validation(3)[0].id
    assert not _same(heldout(1)[0], validation(1)[0])


def test_samples_are_well_formed():
    items = heldout(300)
    assert {s.qtype for s in items} == {"red", "round", "total"}
    for s in items:
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert s.question == f"how many {s.qtype} shapes ?"
        assert 0 <= int(s.answer) <= 9
        if s.qtype == "total":
            assert int(s.answer) >= 1


@pytest.mark.parametrize(
    "text,answer,ok",
    [
        ("answer 12", "12", True),
        ("answer 12", 12, True),
        ("answer 1", "12", False),
        ("answer 12", "1", False),
        ("red 3 answer 3", "3", True),
        ("well , the answer   7 .", "7", True),
        ("answer 3 answer 4", "3", True),  # the first match counts
        ("answer 3 answer 4", "4", False),
        ("answer", "3", False),
        ("3", "3", False),
        ("", "3", False),
        (None, "3", False),
        ("answer 3", None, False),
    ],
)
def test_verify(text, answer, ok):
    assert verify(text, answer) is ok


def test_write_dataset(tmp_path):
    out = organism.write_dataset(tmp_path / "ds", split="heldout", n=5)
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in heldout(5)]
    assert set(rows[0]) == {"id", "question", "image", "answer", "qtype"}
    assert all((out / r["image"]).is_file() for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp folder left behind
    with pytest.raises(ConfigError):
        organism.write_dataset(out, n=5)  # not empty
    with pytest.raises(ConfigError):
        organism.write_dataset(tmp_path / "x", split="train", n=5)


# --- tokenizer, template and encoder ----------------------------------------------------------------


def test_chat_template_contract(tok):
    user = {"role": "user", "content": [{"type": "text", "text": "how many red shapes ?"}, {"type": "image"}]}
    text = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nhow many red shapes ?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    first = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    assert "user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in tok.apply_chat_template(
        [first], tokenize=False
    )
    conv = [
        {"role": "user", "content": "how many total shapes ?"},
        {"role": "assistant", "content": "answer 3"},
    ]
    assert tok.apply_chat_template(conv, tokenize=False).endswith(
        "<|im_start|>assistant\nanswer 3<|im_end|>\n"
    )
    assert (
        tok.decode(
            tok("answer 3 <|im_end|>", add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        == "answer 3"
    )
    assert (
        tok.convert_tokens_to_ids("<unk>")
        not in tok("how many square yellow green blue shapes ?")["input_ids"]
    )


def test_patchify_matches_image_processor():
    items = heldout(4)
    ref = build_image_processor()(images=[s.image for s in items], return_tensors="pt")
    mine = np.concatenate([patchify(s.image) for s in items])
    assert ref["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
    assert np.array_equal(mine, ref["pixel_values"].numpy())


def test_encoder_matches_lens_inputs(tok):
    """The fast batched encoder gives the same tensors as the generic builder (question before image)."""
    from lens.adapters import adapter_for
    from lens.inputs import build_inputs

    model = build_model(tok)
    enc = Encoder(tok)
    ip = build_image_processor()
    adapter = adapter_for(model.config)
    for s in heldout(3):
        for response in (None, f"answer {s.answer}"):
            mine = enc.encode([s.question], [s.image], None if response is None else [response])
            ref = build_inputs(tok, adapter, model.config, s.question, [s.image], response=response,
                               image_processor=ip, image_first=organism.IMAGE_FIRST).model_inputs  # fmt: skip
            for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
                assert torch.equal(mine[key], ref[key]), key
            if "mm_token_type_ids" in ref:
                assert torch.equal(
                    mine["mm_token_type_ids"].to(ref["mm_token_type_ids"].dtype), ref["mm_token_type_ids"]
                )


# --- training code paths ----------------------------------------------------------------------------


def test_sft_lowers_the_loss(tok):
    torch.manual_seed(0)
    model = build_model(tok, seed=0)
    enc = Encoder(tok)
    batch = heldout(16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = float(sft_loss(model, enc, batch))
    for _ in range(8):
        sft_step(model, opt, None, enc, batch)
    with torch.no_grad():
        after = float(sft_loss(model, enc, batch))
    assert after < 0.7 * before


def _p_correct(model, enc, batch) -> float:
    """Mean probability of the exact correct response ``answer N<|im_end|>``."""
    with torch.no_grad():
        return float(torch.exp(-sft_loss_per_item(model, enc, batch)).mean())


def sft_loss_per_item(model, enc, batch) -> torch.Tensor:
    b = enc.encode(
        [s.question for s in batch], [s.image for s in batch], [f"answer {s.answer}" for s in batch]
    )
    p = int(b.pop("prompt_len"))
    logits = model(**b).logits[:, p - 1 : -1]
    logits = logits.index_fill(-1, torch.tensor(suppress_ids(enc.tok)), float("-inf"))
    logp = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, p:].unsqueeze(-1)).squeeze(-1)
    return -logp.sum(-1)


def test_grpo_raises_the_probability_of_rewarded_answers(tok):
    """A few GRPO steps at a high learning rate on a fixed batch make the correct answer more likely."""
    torch.manual_seed(0)
    model = build_model(tok, seed=0)
    enc = Encoder(tok)
    batch = heldout(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):  # teach the format so sampled rewards have variance
        sft_step(model, opt, None, enc, heldout(64))
    before = _p_correct(model, enc, batch)
    params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    torch.manual_seed(1)
    stats = [grpo_step(model, opt, enc, batch, group=8) for _ in range(4)]
    after = _p_correct(model, enc, batch)
    assert all(np.isfinite(s["loss"]) and 0 <= s["reward"] <= 1 for s in stats)
    assert sum(s["updated"] for s in stats) >= 3
    assert any(not torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert after > before * 1.2, (before, after)


def test_swap_in_replaces_atomically(tmp_path):
    out, tmp = tmp_path / "w", tmp_path / "tmp"
    out.mkdir()
    (out / "old").write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    _swap_in(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_train_config_validation():
    with pytest.raises(ConfigError):
        TrainConfig(rl_group=1)


# --- shipped weights ---------------------------------------------------------------------------------


def test_shipped_weights_are_complete_and_small():
    total = 0
    for name in organism.MODEL_NAMES:
        d = organism.model_dir(name)
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "preprocessor_config.json"):  # fmt: skip
            assert (d / f).is_file(), (name, f)
        total += sum(p.stat().st_size for p in d.iterdir())
    assert total <= 20 * 2**20
    m = organism.manifest()
    assert m["rl_updates"] == m["control_updates"]
    assert (organism.weights_dir() / "training_log.csv").is_file()


def test_shipped_weights_reproduce_recorded_accuracy():
    m = organism.manifest()
    prev = torch.get_num_threads()
    torch.set_num_threads(m["train_config"]["threads"])
    try:
        for name in organism.MODEL_NAMES:
            model, tok, ip = organism.load_model(name)
            rec = m["heldout_greedy"][name]
            ok = greedy_correct(model, Encoder(tok), heldout(rec["n"]), batch_size=m["eval_batch"])
            assert sum(ok) == rec["correct"], name
    finally:
        torch.set_num_threads(prev)
    acc = {k: v["accuracy"] for k, v in m["heldout_greedy"].items()}
    assert acc["rlvr"] >= acc["base"] + 0.05


def test_unknown_model_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="base, rlvr, control"):
        organism.model_dir("sft")
    with pytest.raises(ConfigError, match="rlvr, control"):
        organism.load_pair(rlvr="nope")


def test_load_pair_through_lens():
    pair = organism.load_pair()
    assert pair is not None


# --- eval CLI ---------------------------------------------------------------------------------------


def _eval_args(*argv: str) -> argparse.Namespace:
    from lens.commands import eval as eval_cmd

    parser = argparse.ArgumentParser()
    eval_cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_eval_refuses_k_above_n():
    args = _eval_args("--k", "1,32", "--n", "16")
    with pytest.raises(ConfigError, match="n=16"):
        args.handler(args)


def test_eval_unknown_pair_lists_known():
    args = _eval_args("--pair", "nope")
    with pytest.raises(ConfigError, match="known pairs: organism"):
        args.handler(args)


def test_eval_end_to_end_small(tmp_path):
    """A tiny evaluation through the CLI handler writes the tables and the figure, and resumes."""
    args = _eval_args("--items", "6", "--n", "4", "--k", "1,4", "--out", str(tmp_path))
    assert args.handler(args) == 0
    for f in ("summary.csv", "differences.csv", "per_item.csv", "table.md", "pass_at_k.png", "pass_at_k.pdf"):
        assert (tmp_path / f).is_file(), f
    import pandas as pd

    s = pd.read_csv(tmp_path / "summary.csv")
    assert set(s["model"]) == {"base", "rlvr", "control"}
    assert set(s["metric"]) == {"greedy_pass@1", "pass@k"}
    assert s["estimate"].between(0, 1).all()
    assert args.handler(args) == 0  # resumes from the per-item records
