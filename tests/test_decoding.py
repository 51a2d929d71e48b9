"""Decoding settings from the pair: exact greedy, every end token, stop strings, budgets, bad values."""

from __future__ import annotations

import json

import pytest
import torch
from intervention_fixtures import PROMPT, image

import lens
from lens.decoding import DEFAULT_MAX_NEW_TOKENS, DecodingConfig, decoding_for, sequence_ends
from lens.errors import ConfigError
from lens.interventions import Baseline
from lens.testing import save_checkpoint, tiny_qwen25vl

# What Qwen2.5-VL-style checkpoints ship: sampling on, a repetition penalty and two end tokens.
QWEN_STYLE = dict(do_sample=True, repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)


def _qwen_style(model, tok, **extra):
    from transformers import GenerationConfig

    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(
        **QWEN_STYLE, eos_token_id=eos, pad_token_id=eos[1], bos_token_id=eos[1], **extra
    )
    return model


@pytest.fixture(scope="module")
def qwen_style_pair(ckpt_root, tok, image_processor):
    """A tiny pair saved with a Qwen-style generation_config.json and loaded through lens.load_pair."""
    dirs = []
    for seed in (0, 1):
        model = _qwen_style(tiny_qwen25vl(tok, seed=seed), tok)
        dirs.append(save_checkpoint(model, tok, ckpt_root / f"qwen_style_{seed}", image_processor))
    saved = json.loads((dirs[1] / "generation_config.json").read_text())
    assert saved["repetition_penalty"] == 1.05 and len(saved["eos_token_id"]) == 2
    return lens.load_pair(*dirs)


def _manual_greedy(model, inputs, steps, suppress, eos, penalty=1.0):
    """Argmax of full (cache-free) forwards, one token at a time; optionally with a repetition penalty."""
    ids = inputs.model_inputs["input_ids"]
    extra = {k: v for k, v in inputs.model_inputs.items() if k in ("pixel_values", "image_grid_thw")}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            mm = torch.zeros_like(ids)
            mm[:, : inputs.n_tokens] = inputs.model_inputs["mm_token_type_ids"]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra)
            scores = logits.logits[0, -1].double()
            if penalty != 1.0:
                seen = ids[0].unique()
                picked = scores[seen]
                scores[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
            scores[list(suppress)] = -torch.inf
            token = int(scores.argmax())
            out.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tuple(out)


def test_settings_come_from_the_checkpoint(qwen_style_pair, vl_pair):
    tok = qwen_style_pair.tokenizer
    decoding = decoding_for(qwen_style_pair)
    ends = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    assert decoding.eos_token_ids == ends  # both end tokens, not only the tokenizer's
    assert (decoding.temperature, decoding.top_p, decoding.top_k) == (0.7, 0.8, 20)
    assert decoding.max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 2048
    assert set(decoding.suppress_tokens) == set(
        qwen_style_pair.adapter.vision_special_ids(qwen_style_pair.config)
    )
    given = decoding_for(
        qwen_style_pair, max_new_tokens=7, temperature=1.0, top_p=1.0, top_k=0, stop_strings="x"
    )
    assert (given.max_new_tokens, given.temperature, given.top_p, given.top_k) == (7, 1.0, 1.0, 0)
    assert given.stop_strings == ("x",)
    plain = decoding_for(vl_pair)  # no sampling settings in the checkpoint: pure sampling
    assert (plain.temperature, plain.top_p, plain.top_k, plain.max_new_tokens) == (1.0, 1.0, 0, 2048)
    record = decoding.to_dict()
    assert record["repetition_penalty"] == 1.0 and record["eos_token_ids"] == list(ends)
    json.dumps(record)  # storable as is


def test_organism_budget_is_its_own():
    pair = lens.load_pair("organism")
    decoding = decoding_for(pair)
    assert decoding.max_new_tokens == 4
    assert decoding_for(pair, max_new_tokens=9).max_new_tokens == 9
    assert decoding.eos_token_ids == (pair.tokenizer.eos_token_id,)


def test_greedy_is_exactly_greedy_despite_the_checkpoint_penalty(qwen_style_pair):
    pair = qwen_style_pair
    model = pair.rlvr
    inputs = pair.encode(PROMPT, [image(1, 56)])
    decoding = decoding_for(pair, max_new_tokens=12)
    ours = Baseline().prepare(pair, inputs).generate(pair, inputs, decoding).token_ids[0]
    args = (model, inputs, 12, decoding.suppress_tokens, decoding.eos_token_ids)
    assert ours == _manual_greedy(*args)
    # The test has power: with the checkpoint's 1.05 the argmax path differs, and that is what a
    # plain generate() (which applies the checkpoint's generation_config) produces.
    penalised = _manual_greedy(*args, penalty=1.05)
    assert penalised != ours
    with torch.no_grad():
        plain = model.generate(
            **inputs.model_inputs,
            max_new_tokens=12,
            do_sample=False,
            suppress_tokens=list(decoding.suppress_tokens),
        )
    assert tuple(plain[0, inputs.n_tokens :].tolist()) == penalised
    assert model.generation_config.repetition_penalty == 1.05  # the checkpoint's config is restored


def test_other_checkpoint_processors_do_not_reach_greedy(tok, image_processor):
    models = [_qwen_style(tiny_qwen25vl(tok, seed=s), tok, no_repeat_ngram_size=1) for s in (0, 1)]
    pair = lens.ModelPair.from_models(models[0], models[1], tok, image_processor)
    inputs = pair.encode(PROMPT, [image(1, 56)])
    decoding = decoding_for(pair, max_new_tokens=16)
    ours = Baseline().prepare(pair, inputs).generate(pair, inputs, decoding).token_ids[0]
    assert ours == _manual_greedy(pair.rlvr, inputs, 16, decoding.suppress_tokens, decoding.eos_token_ids)
    # It emits a token already in the sequence, which the checkpoint's no_repeat_ngram_size=1 forbids.
    sequence = inputs.input_ids[0].tolist() + list(ours)
    assert any(token in sequence[: inputs.n_tokens + i] for i, token in enumerate(ours))


def test_every_end_token_of_the_checkpoint_stops_a_row(tok, image_processor, vl_pair):
    inputs = vl_pair.encode(PROMPT, [image(1, 56)])
    first = Baseline().prepare(vl_pair, inputs).generate(vl_pair, inputs, max_new_tokens=5).token_ids[0]
    assert len(first) == 5
    # A checkpoint whose second end token is the token this prompt starts with.
    models = [tiny_qwen25vl(tok, seed=s) for s in (0, 1)]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for model in models:
        model.generation_config.eos_token_id = [im_end, first[0]]
    pair = lens.ModelPair.from_models(models[0], models[1], tok, image_processor)
    decoding = decoding_for(pair, max_new_tokens=5)
    assert decoding.eos_token_ids == (im_end, first[0])
    inputs = pair.encode(PROMPT, [image(1, 56)])
    assert Baseline().prepare(pair, inputs).generate(pair, inputs, decoding).token_ids == ((first[0],),)
    only_tokenizer = decoding.replace(eos_token_ids=(im_end,))
    assert Baseline().prepare(pair, inputs).generate(pair, inputs, only_tokenizer).token_ids[0] == first


def test_stop_strings_end_rows_alone_and_in_a_batch(vl_pair):
    pair = vl_pair
    xs = [pair.encode(PROMPT, [image(1, 56)]), pair.encode("Short?", [image(2, 112)])]
    baseline = Baseline()
    states = [baseline.prepare(pair, x).state for x in xs]
    free = baseline.generate_batch(pair, states, decoding_for(pair, max_new_tokens=8))
    text = free[0].texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and stop in text
    decoding = decoding_for(pair, max_new_tokens=8, stop_strings=[stop])
    batched = baseline.generate_batch(pair, states, decoding)
    alone = [baseline.generate_batch(pair, [s], decoding)[0] for s in states]
    assert batched == alone
    cut = batched[0].texts[0]
    assert stop in cut and len(cut) < len(text) and text.startswith(cut)


def test_sequence_ends_cuts_the_padding_after_an_end_token():
    decoding = DecodingConfig(max_new_tokens=4, eos_token_ids=(2, 9), pad_token_id=0)
    prompt = torch.tensor([[7, 7], [7, 7], [7, 7]])
    new = torch.tensor([[5, 2, 0, 0], [5, 6, 9, 0], [5, 6, 7, 8]])
    assert sequence_ends(torch.cat([prompt, new], 1), 2, decoding) == [2, 3, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 3, "min_new_tokens": 4},
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop_strings": ("",)},
        {"eos_token_ids": (3,), "suppress_tokens": (3,)},
    ],
)
def test_bad_decoding_settings(kwargs):
    with pytest.raises(ConfigError):
        DecodingConfig(**kwargs)


def test_greedy_refuses_several_sequences():
    with pytest.raises(ConfigError, match="do_sample"):
        DecodingConfig().generation_config(do_sample=False, n=2)
