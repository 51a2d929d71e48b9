"""Qwen3-VL, dense and MoE: inputs against the stock processor, DeepStack and the lens, interventions.

DeepStack (see :class:`lens.adapters.Qwen3VLAdapter`): the vision tower's intermediate features are
added at the visual positions after each of the first ``levels`` decoder layers. The lens reads each
layer's own output (transformers' ``hidden_states``), before that addition; the input of block 0,
where Replay's Δ is added, is the embeddings with the merged image features (no DeepStack yet).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image
from reference_replay import reference_replay

import lens.loading
from analyses.kl_drift import DriftConfig, run_drift
from lens import load_pair
from lens.adapters import QWEN3_VL, QWEN3_VL_MOE, adapter_for
from lens.datasets import load_jsonl
from lens.decoding import decoding_for
from lens.errors import PairMismatchError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL
from lens.interventions import ActivationReplay, HardInjection, hook_count
from lens.interventions.base import capture_block_residuals
from lens.loading import ModelPair
from lens.logit_lens import lens_self_check
from lens.testing import save_checkpoint
from lens.testing.qwen3_vl import tiny_qwen3vl, tiny_qwen3vl_image_processor, tiny_qwen3vl_tokenizer
from lens.tracing import capture_residuals

LEVELS = 2  # DeepStack levels of the tiny models (decoder layers 0 and 1 get an addition)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Checkpoint folders: a dense and an MoE pair, each base (seed 0) and RLVR twin (seed 1)."""
    root = tmp_path_factory.mktemp("qwen3_vl")
    tok, ip = tiny_qwen3vl_tokenizer(), tiny_qwen3vl_image_processor()
    out = {}
    for kind, moe in (("dense", False), ("moe", True)):
        out[kind] = tuple(
            save_checkpoint(tiny_qwen3vl(tok, seed=seed, moe=moe), tok, root / f"{kind}_{seed}", ip)
            for seed in (0, 1)
        )
    return out


@pytest.fixture(scope="module")
def pairs(dirs):
    return {kind: load_pair(*folders) for kind, folders in dirs.items()}


@pytest.fixture(scope="module")
def image():
    """128 x 96 px: a (1, 8, 6) grid of 16-px patches, 12 visual tokens after the 2 x 2 merge."""
    return random_image(128, 96)


@pytest.fixture(scope="module")
def samples(pairs, image):
    return {kind: pair.encode(PROMPT, [image], response=RESPONSE) for kind, pair in pairs.items()}


@pytest.fixture(params=["dense", "moe"])
def kind(request):
    return request.param


def deepstack_features(model, inputs) -> list[torch.Tensor]:
    """The DeepStack levels of the sample's image, one ``[n_visual, hidden]`` tensor per level."""
    with torch.no_grad():
        out = model.model.get_image_features(
            inputs.model_inputs["pixel_values"], inputs.model_inputs["image_grid_thw"], return_dict=True
        )
    return [torch.cat(level) for level in out.deepstack_features]


# -- the family: adapter, inputs -----------------------------------------------------------------


def test_adapters_and_real_classes(pairs):
    dense, moe = pairs["dense"], pairs["moe"]
    assert type(dense.rlvr).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(moe.rlvr).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert dense.adapter is QWEN3_VL and moe.adapter is QWEN3_VL_MOE
    assert adapter_for(dense.config) is QWEN3_VL and adapter_for(moe.config) is QWEN3_VL_MOE
    # Every MoE decoder layer is a sparse block; the vision tower feeds LEVELS DeepStack levels.
    assert all(type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in moe.adapter.layers(moe.rlvr))
    for pair in (dense, moe):
        assert len(pair.config.vision_config.deepstack_visual_indexes) == LEVELS
        assert pair.image_processor.patch_size == 16
        cfg = pair.config
        assert pair.adapter.vision_special_ids(cfg) == (
            cfg.image_token_id,
            cfg.video_token_id,
            cfg.vision_start_token_id,
            cfg.vision_end_token_id,
        )


def _stock_processor(pair):
    # The stock Qwen3VLProcessor needs a video processor, which needs torchvision (not installed
    # here): build the real class with none, as tests/test_inputs.py does for Qwen2.5-VL.
    from transformers import Qwen3VLProcessor

    class Processor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Processor(image_processor=pair.image_processor, tokenizer=pair.tokenizer, video_processor=None)


def test_encode_equals_stock_processor(pairs, samples, image):
    """Ids, attention mask, pixels, grids and mm_token_type_ids equal Qwen3VLProcessor's."""
    pair = pairs["dense"]
    processor = _stock_processor(pair)
    tok = pair.tokenizer
    other = random_image(64, 160, seed=3)  # a second image with another grid: (1, 4, 10)
    cases = [
        (  # the prompt form, with a response
            samples["dense"],
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
            [image],
            RESPONSE + tok.eos_token,
        ),
        (  # a system prompt, two images, one after the text
            pair.encode(
                messages=[
                    {"role": "system", "content": "Answer briefly."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": image},
                            {"type": "text", "text": PROMPT},
                            {"type": "image", "image": other},
                        ],
                    },
                ]
            ),
            [
                {"role": "system", "content": "Answer briefly."},
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": PROMPT}, {"type": "image"}],
                },
            ],
            [image, other],
            "",
        ),
    ]
    for ours, messages, images, tail in cases:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        expected = processor(text=[text + tail], images=images, return_tensors="pt")
        assert set(ours.model_inputs) == set(expected.keys())
        for key, value in expected.items():
            got = ours.model_inputs[key]
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert torch.equal(got, value), key
    assert cases[1][0].image_grids == ((1, 8, 6), (1, 4, 10))


def test_role_map_marks_exactly_the_visual_tokens(pairs, samples):
    pair, inputs = pairs["dense"], samples["dense"]
    tok = pair.tokenizer
    pad = pair.config.image_token_id
    assert inputs.image_grids == ((1, 8, 6),) and inputs.merge_size == 2
    n_visual = 8 * 6 // 4
    ids: list[int] = []
    roles: list[str] = []
    # No default system turn: Qwen3-VL's template writes one only when given.
    for role, piece in (
        (ROLE_TEMPLATE, "<|im_start|>user\n<|vision_start|>"),
        (ROLE_VISUAL, n_visual),
        (ROLE_TEMPLATE, "<|vision_end|>"),
        (ROLE_PROMPT, PROMPT),
        (ROLE_TEMPLATE, "<|im_end|>\n<|im_start|>assistant\n"),
        (ROLE_RESPONSE, RESPONSE + "<|im_end|>"),
    ):
        part = [pad] * piece if role == ROLE_VISUAL else tok(piece, add_special_tokens=False)["input_ids"]
        ids += part
        roles += [role] * len(part)
    assert inputs.input_ids[0].tolist() == ids
    assert list(inputs.roles) == roles
    visual = inputs.visual_positions
    assert (inputs.input_ids[0, visual] == pad).all()
    # The separators are template tokens; mm_token_type_ids marks exactly the visual positions.
    for special in ("<|vision_start|>", "<|vision_end|>"):
        at = inputs.tokens.index(special)
        assert inputs.roles[at] == ROLE_TEMPLATE
    assert inputs.model_inputs["mm_token_type_ids"][0].nonzero().flatten().tolist() == visual.tolist()


# -- DeepStack and the lens ----------------------------------------------------------------------


def test_capture_equals_hidden_states(pairs, samples, kind):
    """hidden_states[0] is the input of block 0; hidden_states[l + 1] the raw output of layer l
    (before DeepStack's addition), except the last entry, which is final-normed."""
    pair, inputs = pairs[kind], samples[kind]
    n = pair.n_layers
    for model in pair.models():
        with torch.no_grad():
            out = model(**inputs.model_inputs, output_hidden_states=True)
        hs = out.hidden_states
        captured, logits = capture_residuals(model, pair.adapter, inputs.model_inputs, with_logits=True)
        assert len(captured) == n and len(hs) == n + 1
        for layer in range(n - 1):
            assert torch.equal(captured[layer], hs[layer + 1][0]), layer
        with torch.no_grad():
            assert torch.equal(pair.adapter.final_norm(model)(captured[-1]), hs[-1][0])
        assert torch.equal(logits, out.logits[0])
        block0 = capture_block_residuals(model, pair.adapter, inputs.model_inputs, inputs_of=(0,))
        assert torch.equal(block0[("in", 0)], hs[0][0])


def test_deepstack_is_added_between_the_captured_output_and_the_next_input(pairs, samples, kind):
    """Input of block l + 1 = output of block l + DeepStack level l at the visual positions (l < LEVELS),
    exactly; the text positions, and every position after the last level, pass unchanged."""
    pair, inputs = pairs[kind], samples[kind]
    n = pair.n_layers
    model = pair.rlvr
    states = capture_block_residuals(
        model, pair.adapter, inputs.model_inputs, inputs_of=range(1, n), outputs_of=range(n - 1)
    )
    levels = deepstack_features(model, inputs)
    assert len(levels) == LEVELS
    vis = inputs.visual_positions
    text = inputs.positions(ROLE_PROMPT)
    for layer in range(n - 1):
        out, nxt = states[("out", layer)], states[("in", layer + 1)]
        assert torch.equal(nxt[text], out[text])
        if layer < LEVELS:
            assert torch.equal(nxt[vis], out[vis] + levels[layer])
            assert levels[layer].abs().min() > 0  # a real addition at every visual token
        else:
            assert torch.equal(nxt, out)


def test_self_check_fp32(pairs, samples, kind):
    pair, inputs = pairs[kind], samples[kind]
    for model in pair.models():
        assert lens_self_check(model, pair.adapter, inputs) < 1e-5


def test_cached_vision_inputs_reproduce_the_forward(pairs, samples, kind):
    """The cached forward (Replay's steps) is the full forward, DeepStack included, for images and
    for videos; dropping DeepStack would change it."""
    pair, inputs = pairs[kind], samples[kind]
    model = pair.rlvr
    with torch.no_grad():
        full = model(**inputs.model_inputs).logits
        cached_inputs = pair.adapter.cached_vision_inputs(model, inputs.model_inputs)
        assert "pixel_values" not in cached_inputs
        assert torch.equal(model(**cached_inputs).logits, full)
        image_out = cached_inputs["mm_encoder_outputs"]["image"]
        image_out.deepstack_features = [
            tuple(torch.zeros_like(t) for t in lv) for lv in image_out.deepstack_features
        ]
        without = model(**cached_inputs).logits
    after_image = int(inputs.visual_positions.max()) + 1
    assert (without[0, after_image:] - full[0, after_image:]).abs().max() > 1e-3

    # The same pixels as a one-frame-pair video: video placeholders, mm_token_type_ids 2.
    cfg = pair.config
    ids = inputs.input_ids.clone()
    ids[ids == cfg.image_token_id] = cfg.video_token_id
    video = {
        "input_ids": ids,
        "attention_mask": inputs.model_inputs["attention_mask"],
        "pixel_values_videos": inputs.model_inputs["pixel_values"],
        "video_grid_thw": inputs.model_inputs["image_grid_thw"],
        **pair.adapter.extra_model_inputs(ids, cfg),
    }
    assert int(video["mm_token_type_ids"].max()) == 2
    with torch.no_grad():
        cached = pair.adapter.cached_vision_inputs(model, video)
        assert set(cached["mm_encoder_outputs"]) == {"video"}
        assert torch.equal(model(**cached).logits, model(**video).logits)


# -- analyses and interventions ------------------------------------------------------------------


def test_drift_runs_with_finite_kl(pairs, make_dataset):
    samples = load_jsonl(make_dataset(2))
    result = run_drift(pairs["moe"], samples, None, DriftConfig(n_buckets=2))
    table = result.table
    assert set(table["sample_id"]) == {"s0", "s1"}
    assert "visual" in set(table["role"])
    kl = torch.tensor(table["kl_base_rlvr"].to_numpy())
    assert torch.isfinite(kl).all() and (kl >= 0).all() and kl.mean() > 0


REPLAY_CASES = [
    ("dense", {}),  # the released algorithm
    ("dense", {"variant": "paper"}),
    ("dense", {"rule": "quantile", "quantile": 0.3, "layers": (1, 3)}),
    ("moe", {}),
]


@pytest.mark.parametrize(("family", "kwargs"), REPLAY_CASES)
def test_fast_replay_equals_reference(pairs, samples, family, kwargs):
    pair, inputs = pairs[family], samples[family]
    settings = {"tau": 0.4, "alpha": 10.0, "steps": 4, "layers": (0, 1, 2), **kwargs}
    fast = ActivationReplay(**settings).prepare(pair, inputs).result
    ref_offsets, ref_losses = reference_replay(pair, inputs, **settings)
    assert len(fast.losses) == len(ref_losses) == 4 and fast.loss_changed
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(fast.offsets, ref_offsets, rtol=1e-4, atol=1e-5)


def test_replay_adds_delta_at_block0_and_deepstack_still_follows(pairs, samples):
    pair, inputs = pairs["dense"], samples["dense"]
    replay = ActivationReplay(layers=(0, 1, 2), steps=2, alpha=200.0).prepare(pair, inputs)
    assert replay.offsets.abs().max() > 0
    blocks = pair.adapter.layers(pair.rlvr)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, *rest):  # (args, kwargs) for a pre-hook, (args, output) after
            seen[name] = (rest[0] if name.startswith("out") else args[0])[0].clone()

        return hook

    with replay.applied(pair) as model:
        # Registered after the replay hooks: block 0's pre-hook sees the input with Δ added.
        handles = [
            blocks[0].register_forward_pre_hook(keep("in0"), with_kwargs=True),
            blocks[0].register_forward_hook(keep("out0")),
            blocks[1].register_forward_pre_hook(keep("in1"), with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                model(**inputs.model_inputs)
        finally:
            for handle in handles:
                handle.remove()
    vis = inputs.visual_positions
    embeds = capture_block_residuals(pair.rlvr, pair.adapter, inputs.model_inputs, inputs_of=(0,))[("in", 0)]
    torch.testing.assert_close(seen["in0"][vis], embeds[vis] + replay.offsets)
    assert torch.equal(seen["in1"][vis], seen["out0"][vis] + deepstack_features(pair.rlvr, inputs)[0])
    assert hook_count(pair.rlvr) == 0


def test_bf16_replay_carries_deepstack_and_equals_reference(pairs, image):
    """In bf16 the float32 carry keeps DeepStack's additions in the carried residual: at Δ = 0 it
    reproduces the plain bf16 forward (the first loss equals the no-carry one), and fast = reference."""
    dense = pairs["dense"]
    pair = ModelPair.from_models(
        copy.deepcopy(dense.base).to(torch.bfloat16),
        copy.deepcopy(dense.rlvr).to(torch.bfloat16),
        dense.tokenizer,
        dense.image_processor,
    )
    inputs = pair.encode(PROMPT, [image])
    settings = {"alpha": 1e-3, "steps": 3, "layers": (0, 1, 2), "rule": "quantile", "quantile": 0.5}
    fast = ActivationReplay(**settings).prepare(pair, inputs).result
    plain = ActivationReplay(**{**settings, "steps": 1}, residual="model").prepare(pair, inputs).result
    assert fast.loss_changed
    assert fast.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)
    ref_offsets, ref_losses = reference_replay(pair, inputs, **settings)
    torch.testing.assert_close(
        torch.tensor(fast.losses, dtype=torch.float64),
        torch.tensor(ref_losses, dtype=torch.float64),
        rtol=2e-3,
        atol=0.0,
    )
    assert float((fast.offsets - ref_offsets).norm() / ref_offsets.norm()) < 1e-2


def test_batched_decoding_equals_single(pairs, image):
    """Left-padded rows (their own mRoPE positions, their own Δ) decode as each sample alone."""
    pair = pairs["dense"]
    samples = [
        pair.encode(PROMPT, [image]),
        pair.encode("Count the shapes, then answer.", [random_image(64, 160, 2)]),
    ]
    decoding = dataclasses.replace(decoding_for(pair), max_new_tokens=4)
    replay = ActivationReplay(layers=(0, 1, 2), steps=2, alpha=300.0)
    states = []
    for sample in samples:
        replay.prepare(pair, sample)
        states.append(replay.state)
    alone = [replay.generate_batch(pair, [state], decoding)[0].token_ids for state in states]
    assert [row.token_ids for row in replay.generate_batch(pair, states, decoding)] == alone


def test_interventions_generate_and_leave_no_trace(pairs, image, kind):
    pair = pairs[kind]
    prompt_only = pair.encode(PROMPT, [image])  # decode after the generation prompt
    saved = {name: value.clone() for name, value in pair.rlvr.state_dict().items()}
    for method in (
        HardInjection(layers=(0, 1, 2), rule="quantile", quantile=0.5),
        ActivationReplay(layers=(0, 1, 2), steps=2),
    ):
        out = method.prepare(pair, prompt_only).generate(pair, prompt_only, max_new_tokens=3)
        assert len(out.token_ids[0]) == 3
        assert not set(out.token_ids[0]) & set(pair.adapter.vision_special_ids(pair.config))
        assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert all(torch.equal(value, saved[name]) for name, value in pair.rlvr.state_dict().items())


# -- pairs that cannot be compared ---------------------------------------------------------------


def test_cross_family_pairs_are_refused_before_weights_load(dirs, vl_dirs, monkeypatch):
    def no_weights(adapter):
        raise AssertionError("weights were about to load")

    monkeypatch.setattr(lens.loading, "_auto_class", no_weights)
    with pytest.raises(PairMismatchError, match="architecture differs.*'qwen2_5_vl'.*'qwen3_vl'"):
        load_pair(vl_dirs[0], dirs["dense"][1])
    with pytest.raises(PairMismatchError, match="architecture differs.*'qwen3_vl'.*'qwen3_vl_moe'"):
        load_pair(dirs["dense"][0], dirs["moe"][1])
