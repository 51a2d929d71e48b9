"""Gemma 3 (``Gemma3ForConditionalGeneration``): inputs equal the stock processor, the role map,
capture, the lens, drift, interventions and cross-family refusal, on tiny random models of the real
classes (16 soft tokens per 56-px image; sliding-window and full-attention layers alternate, the
window (16) shorter than the chats; lm_head tied to the embedding).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image
from intervention_fixtures import same_weights, weights
from reference_replay import reference_replay

import lens.loading
from lens import load_pair
from lens.datasets import load_jsonl
from lens.decoding import decoding_for
from lens.errors import CheckpointError, InputError, PairMismatchError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL, build_inputs
from lens.interventions import ActivationReplay, Baseline, HardInjection, hook_count
from lens.interventions.base import capture_block_residuals
from lens.logit_lens import lens_self_check
from lens.testing import save_checkpoint, tiny_image_processor, tiny_qwen25vl, tiny_tokenizer
from lens.testing.gemma3 import (
    TOKENS_PER_IMAGE,
    tiny_gemma3,
    tiny_gemma3_image_processor,
    tiny_gemma3_tokenizer,
)
from lens.tracing import capture_residuals


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    tok, ip = tiny_gemma3_tokenizer(), tiny_gemma3_image_processor()
    base = save_checkpoint(tiny_gemma3(tok, seed=0), tok, root / "base", ip)
    rlvr = save_checkpoint(tiny_gemma3(tok, seed=1), tok, root / "rlvr", ip)
    return base, rlvr


@pytest.fixture(scope="module")
def pair(dirs):
    return load_pair(*dirs)


@pytest.fixture(scope="module")
def square():
    return random_image(56, 56, seed=1)


@pytest.fixture(scope="module")
def wide():
    return random_image(40, 90, seed=2)  # resized to 56 x 56 like every image: 16 soft tokens


@pytest.fixture(scope="module")
def inputs(pair, wide):
    return pair.encode(PROMPT, [wide], response=RESPONSE)


def _stock_processor(pair):
    """The stock Gemma3Processor (it needs no torchvision: tokenizer and image processor only)."""
    from transformers import Gemma3Processor

    return Gemma3Processor(
        image_processor=pair.image_processor,
        tokenizer=pair.tokenizer,
        image_seq_length=pair.config.mm_tokens_per_image,
    )


def _no_images(messages):
    return [
        {**m, "content": [{k: v for k, v in item.items() if k != "image"} for item in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


# -- inputs and the role map ------------------------------------------------------------------------


def test_encode_equals_stock_processor(pair, inputs, square, wide):
    """input_ids, attention_mask, token_type_ids and pixel_values are Gemma3Processor's, for one image
    with a response, and for a conversation with a system prompt, two images in two user turns and
    an assistant turn between. The processor's num_crops is dropped by the processor itself. The
    template writes <bos>, so the text is tokenized without special tokens, as the processor's
    apply_chat_template does."""
    tok, processor = pair.tokenizer, _stock_processor(pair)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": square}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image", "image": wide}]},
    ]
    conversation = pair.encode(messages=messages)
    chat_one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    cases = [
        (inputs, chat_one, [wide], RESPONSE + tok.eos_token),
        (conversation, _no_images(messages), [square, wide], ""),
    ]
    for ours, chat, images, tail in cases:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + tail
        expected = processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt")
        keys = {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
        assert set(ours.model_inputs) == set(expected.keys()) == keys
        for key, value in expected.items():
            assert ours.model_inputs[key].dtype == value.dtype, key
            assert ours.model_inputs[key].shape == value.shape, key
            assert torch.equal(ours.model_inputs[key], value), key
        assert ours.model_inputs["input_ids"][0, 0] == tok.bos_token_id
        assert ours.model_inputs["input_ids"][0, 1] != tok.bos_token_id  # one <bos>, not two
    assert inputs.model_inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert conversation.model_inputs["pixel_values"].shape == (2, 3, 56, 56)
    assert conversation.roles.count(ROLE_VISUAL) == 2 * TOKENS_PER_IMAGE
    assert inputs.image_grids == ((1, 8, 8),) and inputs.merge_size == 2  # 8 x 8 patches pooled 2 x 2


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_role_map_marks_exactly_the_soft_tokens(pair, inputs):
    tok, config = pair.tokenizer, pair.config
    soft = config.image_token_id
    expected_ids: list[int] = []
    expected_roles: list[str] = []
    for role, piece in [
        (ROLE_TEMPLATE, "<bos><start_of_turn>user\n\n\n<start_of_image>"),
        (ROLE_VISUAL, TOKENS_PER_IMAGE),
        (ROLE_TEMPLATE, "<end_of_image>\n\n"),
        (ROLE_PROMPT, PROMPT),
        (ROLE_TEMPLATE, "<end_of_turn>\n<start_of_turn>model\n"),
        (ROLE_RESPONSE, RESPONSE + "<eos>"),
    ]:
        ids = [soft] * piece if role == ROLE_VISUAL else _ids(tok, piece)
        expected_ids += ids
        expected_roles += [role] * len(ids)
    assert inputs.input_ids[0].tolist() == expected_ids
    assert list(inputs.roles) == expected_roles
    visual = inputs.visual_positions
    assert visual.tolist() == (inputs.input_ids[0] == soft).nonzero().flatten().tolist()
    boi, eoi = tok.convert_tokens_to_ids("<start_of_image>"), tok.convert_tokens_to_ids("<end_of_image>")
    assert pair.adapter.vision_special_ids(config) == (soft, boi, eoi)
    assert inputs.input_ids[0, visual.min() - 1] == boi and inputs.input_ids[0, visual.max() + 1] == eoi
    # token_type_ids: 1 exactly at the soft tokens (the model's bidirectional image blocks).
    assert inputs.model_inputs["token_type_ids"][0].nonzero().flatten().tolist() == visual.tolist()


def test_inconsistent_inputs_refused(pair, wide):
    config = copy.deepcopy(pair.config)
    config.mm_tokens_per_image = 9  # 8 x 8 patches cannot be pooled to 3 x 3 evenly
    with pytest.raises(CheckpointError, match="mm_tokens_per_image is 9"):
        build_inputs(
            pair.tokenizer, pair.adapter, config, PROMPT, [wide], image_processor=pair.image_processor
        )
    pas = copy.deepcopy(pair.image_processor)
    pas.do_pan_and_scan = True
    with pytest.raises(InputError, match="pan-and-scan"):
        build_inputs(pair.tokenizer, pair.adapter, pair.config, PROMPT, [wide], image_processor=pas)
    tok = copy.deepcopy(pair.tokenizer)
    tok.boi_token = "<start_of_turn>"
    with pytest.raises(InputError, match="boi_token"):
        build_inputs(tok, pair.adapter, pair.config, PROMPT, [wide], image_processor=pair.image_processor)


# -- capture, lens ----------------------------------------------------------------------------------


def test_capture_equals_hidden_states_and_layer0_input(pair, inputs):
    """Gemma 3's hidden_states are its language model's: hs[0] is block 0's input, i.e. the token
    embeddings times sqrt(hidden) with the (unscaled) projected image features at the soft tokens;
    hs[i + 1] is the output of layer i; the last entry is final-normed."""
    visual = inputs.visual_positions
    hidden = pair.adapter.hidden_size(pair.config)
    for model in pair.models():
        with torch.no_grad():
            out = model(**inputs.model_inputs, output_hidden_states=True)
            features = model.model.get_image_features(inputs.model_inputs["pixel_values"]).pooler_output
            table = pair.adapter.embed(model).weight[inputs.input_ids[0]]
        hs = out.hidden_states
        n = pair.n_layers
        captured, logits = capture_residuals(model, pair.adapter, inputs.model_inputs, with_logits=True)
        assert len(captured) == n and len(hs) == n + 1
        for i in range(n - 1):
            assert torch.equal(captured[i], hs[i + 1][0]), i
        with torch.no_grad():
            assert torch.equal(pair.adapter.final_norm(model)(captured[-1]), hs[-1][0])
        assert torch.equal(logits, out.logits[0])
        assert features.shape == (1, TOKENS_PER_IMAGE, hidden)
        assert torch.equal(hs[0][0, visual], features[0])
        text = torch.ones(inputs.n_tokens, dtype=torch.bool)
        text[visual] = False
        torch.testing.assert_close(hs[0][0, text], table[text] * hidden**0.5, rtol=1e-6, atol=0)
        first = capture_block_residuals(model, pair.adapter, inputs.model_inputs, inputs_of=(0,))
        assert torch.equal(first[("in", 0)], hs[0][0])


def test_token_type_ids_change_the_forward(pair, inputs):
    """The bidirectional image blocks are real: without token_type_ids an early soft token's output
    differs (it no longer sees the later ones), so the adapter's extra input matters."""
    plain = {k: v for k, v in inputs.model_inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        with_types = pair.rlvr(**inputs.model_inputs).logits[0]
        without = pair.rlvr(**plain).logits[0]
    first = int(inputs.visual_positions[0])
    assert not torch.allclose(with_types[first], without[first])
    assert torch.equal(with_types[:first], without[:first])  # before the image nothing changes


def test_lens_self_check_fp32(pair, inputs):
    for model in pair.models():
        assert lens_self_check(model, pair.adapter, inputs) < 1e-5


# -- drift, interventions ---------------------------------------------------------------------------


def test_run_drift_two_samples(pair, square, wide, tmp_path):
    from analyses.kl_drift import DriftConfig, run_drift

    rows = []
    for i, image in enumerate((square, wide)):
        image.save(tmp_path / f"img{i}.png")
        rows.append(
            {"id": f"s{i}", "question": f"{PROMPT} Item {i}.", "image": f"img{i}.png", "response": RESPONSE}
        )
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_drift(pair, load_jsonl(tmp_path / "data.jsonl"), None, DriftConfig(n_buckets=3))
    table = result.table
    assert set(table["role"]) == {"visual", "prompt", "template", "response"}
    n_visual = table[(table.role == "visual") & (table.layer == 0)].groupby("sample_id").size().to_dict()
    assert n_visual == {"s0": TOKENS_PER_IMAGE, "s1": TOKENS_PER_IMAGE}
    kl = table["kl_base_rlvr"].to_numpy()
    assert np.isfinite(kl).all() and (kl >= 0).all() and kl.mean() > 0


def test_hard_injection_runs_and_leaves_no_trace(pair, inputs):
    saved = weights(pair.rlvr)
    inj = HardInjection(layers=(1, 2), tau=0.6).prepare(pair, inputs)
    assert inj.plan.positions and all(
        set(p.tolist()) <= set(inputs.visual_positions.tolist()) for p in inj.plan.positions.values()
    )
    generation = inj.generate(pair, inputs, max_new_tokens=3)
    assert generation is not None
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)


def test_activation_replay_matches_reference(pair, inputs):
    """Fast replay (block 0 fed its captured input, no pixels, token_type_ids kept) equals the plain
    full-forward reference; Δ is added at block 0's input at the soft tokens only."""
    saved = weights(pair.rlvr)
    settings = {"tau": 0.4, "alpha": 10.0, "steps": 4, "layers": (0, 1, 2)}
    replay = ActivationReplay(**settings).prepare(pair, inputs)
    result = replay.result
    ref_offsets, ref_losses = reference_replay(pair, inputs, **settings)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(result.offsets, ref_offsets, rtol=1e-4, atol=1e-5)
    assert result.offsets.shape == (TOKENS_PER_IMAGE, pair.adapter.hidden_size(pair.config))
    assert result.losses[0] > 0 and result.final_loss < result.losses[0]
    seen = []
    layer = pair.adapter.layers(pair.rlvr)[0]
    with replay.applied(pair) as model:
        handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs.model_inputs)
        finally:
            handle.remove()
    plain = capture_block_residuals(pair.rlvr, pair.adapter, inputs.model_inputs, inputs_of=(0,))[("in", 0)]
    visual = inputs.visual_positions
    torch.testing.assert_close(seen[0][0, visual], plain[visual] + replay.offsets)
    text = torch.ones(inputs.n_tokens, dtype=torch.bool)
    text[visual] = False
    assert torch.equal(seen[0][0, text], plain[text])
    replay.generate(pair, inputs, max_new_tokens=3)
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)


def test_decoding_ends_turns_and_never_emits_image_tokens(pair):
    decoding = decoding_for(pair, max_new_tokens=4)
    tok = pair.tokenizer
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")} <= set(decoding.eos_token_ids)
    assert set(pair.adapter.vision_special_ids(pair.config)) <= set(decoding.suppress_tokens)


def test_batched_decode_equals_single_decodes(pair, inputs, square):
    """Left-padded rows of different lengths (token_type_ids padded with 0) keep their own masks,
    sliding windows and bidirectional image blocks: each row decodes as it does alone."""
    prompt = pair.encode(PROMPT, [square])
    other = pair.encode("Describe the image in one sentence, then give the final answer.", [square])
    assert other.n_tokens != prompt.n_tokens
    short = decoding_for(pair, max_new_tokens=5, min_new_tokens=5)
    states = [Baseline().prepare(pair, x).state for x in (prompt, other)]
    batched = Baseline().generate_batch(pair, states, short)
    singles = [Baseline().generate_batch(pair, [state], short)[0] for state in states]
    assert batched == singles


# -- pairs that cannot be compared ------------------------------------------------------------------


def test_cross_family_pair_refused_before_weights_load(dirs, tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    qwen = save_checkpoint(tiny_qwen25vl(tok, num_layers=2), tok, tmp_path / "qwen", tiny_image_processor())

    def no_weights(adapter):
        raise AssertionError("weights were about to load")

    monkeypatch.setattr(lens.loading, "_auto_class", no_weights)
    with pytest.raises(PairMismatchError, match="architecture differs.*'gemma3'.*'qwen2_5_vl'"):
        load_pair(dirs[0], qwen)
    with pytest.raises(PairMismatchError, match="architecture differs"):
        load_pair(qwen, dirs[1])


def test_different_pan_and_scan_refused():
    """Pan-and-scan changes the visual tokens of elongated images; a probe image does not show it."""
    from lens.loading import check_image_processors

    with pytest.raises(PairMismatchError, match="do_pan_and_scan"):
        check_image_processors(
            tiny_gemma3_image_processor(), tiny_gemma3_image_processor(do_pan_and_scan=True)
        )
    check_image_processors(tiny_gemma3_image_processor(), tiny_gemma3_image_processor())
