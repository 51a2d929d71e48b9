"""InternVL 3 / 3.5 (transformers-native ``-hf`` format): inputs, role map, lens, drift, interventions.

A tiny ``InternVLForConditionalGeneration`` pair (Qwen2 language model, as InternVL 3; one test
builds the Qwen3 one of InternVL 3.5) with 56-px tiles of 16 tokens each. Images: a square one
(1 tile, no thumbnail) and a 2:1 one (2 tiles + thumbnail = 3 tiles).
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

from lens import load_pair
from lens.datasets import load_jsonl
from lens.errors import InputError, PairMismatchError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL, build_inputs
from lens.interventions import ActivationReplay, HardInjection, hook_count
from lens.interventions.base import capture_block_residuals
from lens.loading import ModelPair, check_image_processors
from lens.logit_lens import lens_self_check
from lens.testing import save_checkpoint, tiny_image_processor, tiny_qwen25vl, tiny_tokenizer
from lens.testing.internvl import (
    TOKENS_PER_TILE,
    tiny_internvl,
    tiny_internvl_image_processor,
    tiny_internvl_tokenizer,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    tok, ip = tiny_internvl_tokenizer(), tiny_internvl_image_processor()
    base = save_checkpoint(tiny_internvl(tok, seed=0), tok, root / "base", ip)
    rlvr = save_checkpoint(tiny_internvl(tok, seed=1), tok, root / "rlvr", ip)
    return base, rlvr


@pytest.fixture(scope="module")
def pair(dirs):
    return load_pair(*dirs)


@pytest.fixture(scope="module")
def square():
    return random_image(56, 56, seed=1)  # 1 tile, no thumbnail: 16 visual tokens


@pytest.fixture(scope="module")
def wide():
    return random_image(56, 112, seed=2)  # a 2 x 1 tile grid + thumbnail: 48 visual tokens


@pytest.fixture(scope="module")
def inputs(pair, wide):
    return pair.encode(PROMPT, [wide], response=RESPONSE)


def _stock_processor(pair):
    """The stock InternVLProcessor. Built without torchvision: its video processor needs torchvision,
    so it is left out (the same 4-line patch as tests/test_inputs.py uses for Qwen2.5-VL)."""
    from transformers import InternVLProcessor

    class Processor(InternVLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Processor(
        image_processor=pair.image_processor,
        tokenizer=pair.tokenizer,
        video_processor=None,
        image_seq_length=pair.config.image_seq_length,
    )


# -- inputs and the role map ------------------------------------------------------------------------


def test_encode_equals_stock_processor(pair, inputs, square, wide):
    """input_ids, attention_mask and pixel_values (every tile of every image, in order) are the
    processor's, for one multi-tile image and for a chat with two images, a system prompt and text
    between them. The processor's num_patches is popped by the processor itself (not a model input)."""
    tok, processor = pair.tokenizer, _stock_processor(pair)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": square},
                {"type": "text", "text": "Compare these."},
                {"type": "image", "image": wide},
                {"type": "text", "text": PROMPT},
            ],
        },
    ]
    ours_two = pair.encode(messages=messages)
    skeleton = [
        {k: v for k, v in item.items() if k != "image"} if isinstance(item, dict) else item
        for item in messages[1]["content"]
    ]
    chat_two = [messages[0], {"role": "user", "content": skeleton}]
    chat_one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    cases = [
        (inputs, chat_one, [wide], RESPONSE + tok.eos_token),
        (ours_two, chat_two, [square, wide], ""),
    ]
    for ours, chat, images, tail in cases:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + tail
        expected = processor(text=[text], images=images, return_tensors="pt")
        assert (
            set(ours.model_inputs) == set(expected.keys()) == {"input_ids", "attention_mask", "pixel_values"}
        )
        for key, value in expected.items():
            assert ours.model_inputs[key].dtype == value.dtype, key
            assert ours.model_inputs[key].shape == value.shape, key
            assert torch.equal(ours.model_inputs[key], value), key
    assert inputs.model_inputs["pixel_values"].shape == (3, 3, 56, 56)  # 2 tiles + thumbnail
    assert ours_two.model_inputs["pixel_values"].shape == (4, 3, 56, 56)  # 1 tile, then 3


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_role_map_marks_every_tile_and_thumbnail_token(pair, inputs, square, wide):
    tok, config = pair.tokenizer, pair.config
    context = config.image_token_id
    expected_ids: list[int] = []
    expected_roles: list[str] = []
    for role, piece in [
        (ROLE_TEMPLATE, "<|im_start|>user\n<img>"),
        (ROLE_VISUAL, 3 * TOKENS_PER_TILE),
        (ROLE_TEMPLATE, "</img>\n"),
        (ROLE_PROMPT, PROMPT),
        (ROLE_TEMPLATE, "<|im_end|>\n<|im_start|>assistant\n"),
        (ROLE_RESPONSE, RESPONSE + "<|im_end|>"),
    ]:
        ids = [context] * piece if role == ROLE_VISUAL else _ids(tok, piece)
        expected_ids += ids
        expected_roles += [role] * len(ids)
    assert inputs.input_ids[0].tolist() == expected_ids
    assert list(inputs.roles) == expected_roles
    visual = inputs.visual_positions
    assert visual.tolist() == (inputs.input_ids[0] == context).nonzero().flatten().tolist()
    # <img> and </img> frame the run of tokens and are template; ids as the adapter names them.
    start, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    assert pair.adapter.vision_special_ids(config) == (start, end, context)
    assert inputs.input_ids[0, visual.min() - 1] == start and inputs.input_ids[0, visual.max() + 1] == end
    assert inputs.roles[visual.min() - 1] == inputs.roles[visual.max() + 1] == ROLE_TEMPLATE

    # Two images: each gets its own <img>...</img> with tiles x 16 visual tokens between.
    two = pair.encode(PROMPT, [square, wide])
    ids = two.input_ids[0]
    starts = (ids == start).nonzero().flatten().tolist()
    ends = (ids == end).nonzero().flatten().tolist()
    assert [e - s - 1 for s, e in zip(starts, ends, strict=True)] == [TOKENS_PER_TILE, 3 * TOKENS_PER_TILE]
    assert two.roles.count(ROLE_VISUAL) == 4 * TOKENS_PER_TILE
    assert all((ids[s + 1 : e] == context).all() for s, e in zip(starts, ends, strict=True))


def test_inconsistent_checkpoints_raise_input_error(pair, wide):
    config = copy.deepcopy(pair.config)
    config.image_seq_length = 9
    with pytest.raises(InputError, match="image_seq_length is 9 but a 56x56 tile gives 16"):
        build_inputs(
            pair.tokenizer, pair.adapter, config, PROMPT, [wide], image_processor=pair.image_processor
        )
    # A tokenizer whose image-start token is not the id just before </img> and <IMG_CONTEXT>.
    tok = copy.deepcopy(pair.tokenizer)
    tok.start_image_token = "<|im_start|>"
    with pytest.raises(InputError, match="put them just before <IMG_CONTEXT>"):
        build_inputs(tok, pair.adapter, pair.config, PROMPT, [wide], image_processor=pair.image_processor)


# -- capture, lens ----------------------------------------------------------------------------------


def test_capture_equals_hidden_states_and_layer0_input_is_the_merged_embeddings(pair, inputs):
    """InternVL's hidden_states are those of its language model (Qwen2/Qwen3): hs[0] is the layer-0
    input, i.e. the token embeddings with the projected tile features scattered into the
    <IMG_CONTEXT> positions; hs[i + 1] is the output of layer i; the last entry is final-normed."""
    from lens.tracing import capture_residuals

    visual = inputs.visual_positions
    for model in pair.models():
        with torch.no_grad():
            out = model(**inputs.model_inputs, output_hidden_states=True)
            features = model.model.get_image_features(inputs.model_inputs["pixel_values"]).pooler_output
            embeds = pair.adapter.embed(model)(inputs.input_ids)[0]
        hs = out.hidden_states
        n = pair.n_layers
        captured, logits = capture_residuals(model, pair.adapter, inputs.model_inputs, with_logits=True)
        assert len(captured) == n and len(hs) == n + 1
        for i in range(n - 1):
            assert torch.equal(captured[i], hs[i + 1][0]), i
        with torch.no_grad():
            assert torch.equal(pair.adapter.final_norm(model)(captured[-1]), hs[-1][0])
        assert torch.equal(logits, out.logits[0])
        # Layer-0 input: one projected feature row per tile token (tiles, then thumbnail, in order).
        assert features.shape == (3, TOKENS_PER_TILE, pair.adapter.hidden_size(pair.config))
        assert torch.equal(hs[0][0, visual], features.reshape(-1, features.shape[-1]))
        text = torch.ones(inputs.n_tokens, dtype=torch.bool)
        text[visual] = False
        assert torch.equal(hs[0][0, text], embeds[text])
        first = capture_block_residuals(model, pair.adapter, inputs.model_inputs, inputs_of=(0,))
        assert torch.equal(first[("in", 0)], hs[0][0])


def test_lens_self_check_fp32(pair, inputs):
    for model in pair.models():
        assert lens_self_check(model, pair.adapter, inputs) < 1e-5


def test_qwen3_language_model(square):
    """InternVL 3.5 keeps the same module tree with a Qwen3 language model."""
    tok, ip = tiny_internvl_tokenizer(), tiny_internvl_image_processor()
    base, rlvr = (tiny_internvl(tok, seed=s, text_model="qwen3", num_layers=2) for s in (0, 1))
    assert base.config.text_config.model_type == "qwen3"
    assert type(base.model.language_model).__name__ == "Qwen3Model"
    pair = ModelPair.from_models(base, rlvr, tok, ip)
    inputs = pair.encode(PROMPT, [square], response=RESPONSE)
    assert inputs.roles.count(ROLE_VISUAL) == TOKENS_PER_TILE
    assert lens_self_check(pair.rlvr, pair.adapter, inputs) < 1e-5
    assert pair.n_layers == 2


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
    assert n_visual == {"s0": TOKENS_PER_TILE, "s1": 3 * TOKENS_PER_TILE}
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


def test_activation_replay_matches_reference_across_tiles(pair, inputs):
    saved = weights(pair.rlvr)
    settings = {"tau": 0.4, "alpha": 10.0, "steps": 4, "layers": (0, 1, 2)}
    replay = ActivationReplay(**settings).prepare(pair, inputs)
    result = replay.result
    ref_offsets, ref_losses = reference_replay(pair, inputs, **settings)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(result.offsets, ref_offsets, rtol=1e-4, atol=1e-5)
    # One Δ row per visual token of every tile and the thumbnail, added at the layer-0 input.
    assert result.offsets.shape == (3 * TOKENS_PER_TILE, pair.adapter.hidden_size(pair.config))
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


# -- pairs that cannot be compared ------------------------------------------------------------------


def test_cross_family_pair_refused_before_weights_load(dirs, tmp_path, monkeypatch):
    import lens.loading

    tok = tiny_tokenizer()
    qwen = save_checkpoint(tiny_qwen25vl(tok, num_layers=2), tok, tmp_path / "qwen", tiny_image_processor())

    def no_weights(adapter):
        raise AssertionError("weights were about to load")

    monkeypatch.setattr(lens.loading, "_auto_class", no_weights)
    with pytest.raises(PairMismatchError, match="architecture differs.*'internvl'.*'qwen2_5_vl'"):
        load_pair(dirs[0], qwen)
    with pytest.raises(PairMismatchError, match="architecture differs"):
        load_pair(qwen, dirs[1])


def test_different_tile_budget_refused():
    with pytest.raises(PairMismatchError, match="max_patches"):
        check_image_processors(tiny_internvl_image_processor(6), tiny_internvl_image_processor(12))
