"""LLaVA-OneVision: inputs equal the stock processor's, role map, capture, lens, drift, interventions.

The tiny pair is the real ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 language
model) at toy sizes: 28 px tiles of 7 px patches (16 features per tile), pinpoints up to 4 x 4 tiles.
"""

from __future__ import annotations

import io
import itertools
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from reference_replay import reference_replay

from lens import load_pair
from lens.datasets import Sample
from lens.decoding import decoding_for
from lens.errors import CheckpointError, PairMismatchError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL
from lens.inputs.llava_onevision import anyres_tokens, image_token_counts
from lens.interventions import ActivationReplay, Baseline, HardInjection, hook_count
from lens.interventions.base import capture_block_residuals
from lens.loading import ModelPair
from lens.logit_lens import lens_self_check
from lens.testing import save_checkpoint
from lens.testing.llava_onevision import (
    PATCH,
    PINPOINTS,
    TILE,
    tiny_llava_onevision,
    tiny_llava_ov_image_processor,
    tiny_llava_ov_tokenizer,
)
from lens.tracing import capture_residuals

PROMPT = "How many red shapes are in the image?"
RESPONSE = "The answer is 42."
SIDE = TILE // PATCH  # features per tile side


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


# Original (height, width): wider than its pinpoint (rows unpadded), taller (columns unpadded),
# large enough for the anyres_max_9 shrink (4 x 4 tiles = 256 features > 1.1² · 9 · 16), one tile.
SIZES = [(30, 45), (75, 40), (120, 100), (28, 28)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok, ip = tiny_llava_ov_tokenizer(), tiny_llava_ov_image_processor()
    root = tmp_path_factory.mktemp("llava_ov")
    base = save_checkpoint(tiny_llava_onevision(tok, seed=0), tok, root / "base", ip)
    rlvr = save_checkpoint(tiny_llava_onevision(tok, seed=1), tok, root / "rlvr", ip)
    return base, rlvr


@pytest.fixture(scope="module")
def pair(dirs):
    return load_pair(*dirs)


@pytest.fixture(scope="module")
def inputs(pair):
    return pair.encode(PROMPT, [_image(*SIZES[0])], response=RESPONSE)


@pytest.fixture(scope="module")
def stock(pair):
    """The stock ``LlavaOnevisionProcessor``. Built without torchvision: the only change is that it
    accepts no video processor (LLaVA-OneVision's needs torchvision); images go through the stock
    code path."""
    from transformers import LlavaOnevisionProcessor

    class Processor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Processor(
        image_processor=pair.image_processor,
        tokenizer=pair.tokenizer,
        video_processor=None,
        num_image_tokens=SIDE * SIDE,  # processor_config.json of the real checkpoints: 729
        vision_feature_select_strategy=pair.config.vision_feature_select_strategy,
        vision_aspect_ratio=pair.config.vision_aspect_ratio,
    )


# -- inputs equal the stock processor ------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[s] for s in SIZES] + [[(30, 45), (40, 30)]], ids=str)
def test_encode_equals_stock_processor(pair, stock, sizes):
    """Same input ids, pixel values, image sizes and batch_num_images as the stock processor given
    the chat text and the chat's images as one sample (as its ``apply_chat_template`` passes them)."""
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    ours = pair.encode(PROMPT, images, response=RESPONSE).model_inputs
    tok = pair.tokenizer
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]
    messages = [{"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = stock(text=[text + RESPONSE + tok.eos_token], images=[images], return_tensors="pt")
    keys = {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}
    assert set(ours) == set(expected.keys()) == keys
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key].cpu(), value), key
    # The model accepts them: its placeholder check would raise on a wrong count.
    with torch.no_grad():
        pair.rlvr(**ours)


def test_token_count_rule_equals_processor_on_many_sizes(stock):
    """Our count of one image's tokens equals the processor's, over a sweep of sizes, at the tiny
    model's settings and at the published 7B settings (384 px tiles, 27 x 27 features, 36 pinpoints)."""
    from transformers import LlavaOnevisionImageProcessorPil

    sizes = list(itertools.product(range(9, 260, 7), range(11, 260, 13)))
    for height, width in sizes:
        ours = anyres_tokens(height, width, TILE, SIDE, PINPOINTS, 9)
        assert ours == stock._get_number_of_features(height, width, TILE, TILE), (height, width)
    real_pinpoints = LlavaOnevisionImageProcessorPil.image_grid_pinpoints
    saved = stock.image_processor.image_grid_pinpoints
    stock.image_processor.image_grid_pinpoints = real_pinpoints
    stock.num_image_tokens, stock.vision_aspect_ratio = 729, "anyres_max_9"
    try:
        for height, width in [(1080, 1920), (480, 640), (1000, 300), (333, 4000), (384, 384), (17, 23)]:
            ours = anyres_tokens(height, width, 384, 27, real_pinpoints, 9)
            assert ours == stock._get_number_of_features(height, width, 384, 384), (height, width)
    finally:
        stock.image_processor.image_grid_pinpoints, stock.num_image_tokens = saved, SIDE * SIDE


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_counts_follow_feature_select_strategy_like_processor(pair, stock, strategy):
    """With ``"default"`` the processor counts one token fewer per image (tiled or not); so do we."""
    config = SimpleNamespace(**{**vars(pair.config), "vision_feature_select_strategy": strategy})
    stock.vision_feature_select_strategy = strategy
    try:
        for sizes in ([(30, 45)], [(120, 100)], [(30, 45), (40, 30)]):
            images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
            text = "<|im_start|>user " + "<image>" * len(images) + "<|im_end|>"
            expected = stock(text=[text], images=[images], return_tensors="pt")["input_ids"]
            ours = image_token_counts(sizes, TILE, pair.image_processor, config)
            assert sum(ours) == int((expected == pair.config.image_token_id).sum()), sizes
    finally:
        stock.vision_feature_select_strategy = pair.config.vision_feature_select_strategy


# -- role map ----------------------------------------------------------------------------------------


def _expected(tok, image_id, pieces):
    ids: list[int] = []
    roles: list[str] = []
    for role, text in pieces:
        piece = [image_id] * text if role == ROLE_VISUAL else tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        roles += [role] * len(piece)
    return ids, roles


def test_role_map_marks_every_expanded_image_token(pair, inputs):
    tok, image_id = pair.tokenizer, pair.config.image_token_id
    n_visual = anyres_tokens(*SIZES[0], TILE, SIDE, PINPOINTS, 9)
    ids, roles = _expected(
        tok,
        image_id,
        [
            (ROLE_TEMPLATE, "<|im_start|>user "),
            (ROLE_VISUAL, n_visual),  # base tile + unpadded grid + one newline per grid row
            (ROLE_TEMPLATE, "\n"),
            (ROLE_PROMPT, PROMPT),
            (ROLE_TEMPLATE, "<|im_end|><|im_start|>assistant\n"),
            (ROLE_RESPONSE, RESPONSE + "<|im_end|>"),
        ],
    )
    assert inputs.input_ids[0].tolist() == ids
    assert list(inputs.roles) == roles
    assert inputs.image_grids == ()  # not one uniform grid
    visual = inputs.visual_positions
    assert visual.tolist() == (inputs.input_ids[0] == image_id).nonzero().flatten().tolist()


def test_role_map_two_images_system_prompt_and_text_only(pair):
    """Several images: each is one padded tile (16 features + a newline), not tiled. The real
    template renders plain-string content as nothing, so system and text-only turns go as typed parts."""
    tok, image_id = pair.tokenizer, pair.config.image_token_id
    two = pair.encode(PROMPT, [_image(30, 45), _image(40, 30, seed=1)], system="Be brief.")
    ids, roles = _expected(
        tok,
        image_id,
        [
            (ROLE_TEMPLATE, "<|im_start|>system \nBe brief.<|im_end|><|im_start|>user "),
            (ROLE_VISUAL, 2 * (SIDE * SIDE + 1)),
            (ROLE_TEMPLATE, "\n"),
            (ROLE_PROMPT, PROMPT),
            (ROLE_TEMPLATE, "<|im_end|><|im_start|>assistant\n"),
        ],
    )
    assert two.input_ids[0].tolist() == ids and list(two.roles) == roles
    assert two.model_inputs["batch_num_images"].tolist() == [2]
    text_only = pair.encode(PROMPT)
    assert ROLE_VISUAL not in text_only.roles and "pixel_values" not in text_only.model_inputs
    assert tok.decode(text_only.input_ids[0, text_only.positions(ROLE_PROMPT)]) == PROMPT


def test_processor_and_config_pinpoints_must_agree(pair):
    other = tiny_llava_ov_image_processor(pinpoints=[[TILE, TILE], [TILE, 2 * TILE]])
    mismatched = ModelPair(pair.base, pair.rlvr, pair.adapter, pair.tokenizer, other)
    with pytest.raises(CheckpointError, match="image_grid_pinpoints"):
        mismatched.encode(PROMPT, [_image(30, 45)])


# -- capture, layer 0 input, lens ------------------------------------------------------------------


def test_capture_equals_hidden_states_and_layer0_input_is_merged_embeddings(pair, inputs):
    """hidden_states are the Qwen2 language model's: [0] = inputs_embeds with the image features
    scattered in, [i + 1] = output of block i, the last one final-normed."""
    visual = inputs.visual_positions
    for model in pair.models():
        with torch.no_grad():
            out = model(**inputs.model_inputs, output_hidden_states=True)
        hs, n = out.hidden_states, pair.n_layers
        captured, logits = capture_residuals(model, pair.adapter, inputs.model_inputs, with_logits=True)
        assert len(captured) == n and len(hs) == n + 1
        for i in range(n - 1):
            assert torch.equal(captured[i], hs[i + 1][0]), i
        with torch.no_grad():
            assert torch.equal(pair.adapter.final_norm(model)(captured[-1]), hs[-1][0])
        assert torch.equal(logits, out.logits[0])
        # Layer 0 input (where Replay's Δ is added) = hidden_states[0]; at the visual positions it is
        # the packed image features (newline vectors included), elsewhere the token embeddings.
        block0 = capture_block_residuals(model, pair.adapter, inputs.model_inputs, inputs_of=(0,))[("in", 0)]
        assert torch.equal(block0, hs[0][0])
        assert torch.equal(block0[visual], out.image_hidden_states)
        text = inputs.positions(ROLE_PROMPT)
        embed = pair.adapter.embed(model)(inputs.input_ids[0, text])
        assert torch.equal(block0[text], embed)
        newline = model.model.image_newline.detach()
        assert (block0[visual] == newline).all(-1).sum() > 0


def test_lens_self_check_float32(pair, inputs):
    for model in pair.models():
        assert lens_self_check(model, pair.adapter, inputs) < 1e-4


def test_run_drift_two_samples_finite_kl(pair):
    from analyses.kl_drift import DriftConfig, run_drift

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    samples = [
        Sample(id=f"s{i}", question=PROMPT, images=(png(_image(*size, seed=i)),), response=RESPONSE)
        for i, size in enumerate([(30, 45), (75, 40)])
    ]
    result = run_drift(pair, samples, None, DriftConfig(n_buckets=2))
    table = result.table
    assert set(table["sample_id"]) == {"s0", "s1"}
    assert set(table["role"]) == {"visual", "prompt", "template", "response"}
    assert np.isfinite(table["kl_base_rlvr"]).all() and (table["kl_base_rlvr"] >= 0).all()
    assert table.loc[table["role"] == "visual", "kl_base_rlvr"].max() > 0


# -- interventions ---------------------------------------------------------------------------------


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, saved):
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_hard_injection_and_replay_generate_without_residue(pair, inputs):
    saved = _weights(pair.rlvr), _weights(pair.base)
    plain = Baseline().prepare(pair, inputs).generate(pair, inputs, max_new_tokens=3)
    injection = HardInjection(layers=(0, 1), tau=0.6).prepare(pair, inputs)
    assert sum(injection.plan.n_selected.values()) > 0
    injected = injection.generate(pair, inputs, max_new_tokens=3)
    replay = ActivationReplay(layers=(0, 1, 2), steps=4, rule="quantile", quantile=0.3).prepare(pair, inputs)
    replayed = replay.generate(pair, inputs, max_new_tokens=3)
    assert replay.result.final_loss < replay.result.losses[0]
    assert replay.result.n_visual == inputs.visual_positions.numel()
    for generation in (plain, injected, replayed):
        assert len(generation.token_ids[0]) >= 1
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert _same(pair.rlvr, saved[0]) and _same(pair.base, saved[1])


@pytest.mark.parametrize("kwargs", [{}, {"rule": "quantile", "quantile": 0.3, "variant": "paper"}])
def test_fast_replay_equals_reference(pair, inputs, kwargs):
    settings = {"tau": 0.4, "alpha": 10.0, "steps": 4, "layers": (0, 1, 2), **kwargs}
    fast = ActivationReplay(**settings).prepare(pair, inputs).result
    ref_offsets, ref_losses = reference_replay(pair, inputs, **settings)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(fast.offsets, ref_offsets, rtol=1e-4, atol=1e-5)


def test_batched_decoding_pads_tiles_and_equals_one_by_one(pair):
    """Samples with different tile counts share one left-padded batch (pixel_values zero-padded on
    the tile axis, as the processor pads a batch); greedy rows equal each sample alone."""
    samples = [pair.encode(PROMPT, [_image(*size, seed=i)]) for i, size in enumerate([(30, 45), (120, 100)])]
    tiles = [s.model_inputs["pixel_values"].shape[1] for s in samples]
    assert tiles == [5, 17]  # base tile + 2 x 2 grid, base tile + 4 x 4 grid
    baseline, decoding = Baseline(), decoding_for(pair, max_new_tokens=4)
    states = [baseline.prepare(pair, s).state for s in samples]
    batched = baseline.generate_batch(pair, states, decoding)
    alone = [baseline.generate_batch(pair, [state], decoding)[0] for state in states]
    assert all(len(g.token_ids[0]) >= 1 for g in alone)
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]


def test_perturbation_samples_copies_of_a_two_image_sample(pair):
    from analyses.perturbation import sample_responses

    two = pair.encode(PROMPT, [_image(30, 45), _image(40, 30, seed=1)])
    responses = sample_responses(pair, two, n=3, max_new_tokens=2, seed=0)
    assert len(responses) == 3


# -- refused pairs -----------------------------------------------------------------------------------


def test_cross_family_pair_refused_before_weights_load(dirs, vl_dirs, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the pair was refused")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    with pytest.raises(PairMismatchError, match="architecture differs"):
        load_pair(dirs[0], vl_dirs[1])
    with pytest.raises(PairMismatchError, match="architecture differs"):
        load_pair(vl_dirs[0], dirs[1])


def test_different_pinpoints_refused(dirs, tmp_path, monkeypatch):
    import transformers

    other = shutil.copytree(dirs[1], tmp_path / "rlvr_other")
    tiny_llava_ov_image_processor(pinpoints=PINPOINTS[:4]).save_pretrained(other)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", None)
    with pytest.raises(PairMismatchError, match="image_grid_pinpoints"):
        load_pair(dirs[0], other)
