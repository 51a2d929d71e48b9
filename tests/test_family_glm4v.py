"""GLM-4.1V (``glm4v``) and GLM-4.5V (``glm4v_moe``): inputs equal the stock processor, capture,
the lens, drift, interventions and cross-family refusal, on tiny random models of the real classes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image
from intervention_fixtures import same_weights, weights
from reference_replay import reference_replay

import lens.loading
from lens import load_pair
from lens.decoding import decoding_for
from lens.errors import PairMismatchError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL
from lens.interventions import ActivationReplay, Baseline, HardInjection, hook_count
from lens.loading import ModelPair
from lens.logit_lens import lens_self_check
from lens.testing import save_checkpoint, tiny_image_processor, tiny_qwen25vl, tiny_tokenizer
from lens.testing.glm4v import (
    tiny_glm4v,
    tiny_glm4v_image_processor,
    tiny_glm4v_moe,
    tiny_glm4v_tokenizer,
)
from lens.tracing import capture_residuals

# Glm4vProcessor.create_mm_token_type_ids calls np.array on tokenizer output (a transformers quirk).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def glm_parts():
    return tiny_glm4v_tokenizer(), tiny_glm4v_image_processor()


@pytest.fixture(scope="module")
def glm_dirs(tmp_path_factory, glm_parts):
    tok, ip = glm_parts
    root = tmp_path_factory.mktemp("glm4v")
    base = save_checkpoint(tiny_glm4v(tok, seed=0), tok, root / "base", ip)
    rlvr = save_checkpoint(tiny_glm4v(tok, seed=1), tok, root / "rlvr", ip)
    return base, rlvr


@pytest.fixture(scope="module")
def pair(glm_dirs):
    return load_pair(*glm_dirs)


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory, glm_parts):
    tok, ip = glm_parts
    root = tmp_path_factory.mktemp("glm4v_moe")
    base = save_checkpoint(tiny_glm4v_moe(tok, seed=0), tok, root / "base", ip)
    rlvr = save_checkpoint(tiny_glm4v_moe(tok, seed=1), tok, root / "rlvr", ip)
    return load_pair(base, rlvr)


@pytest.fixture(scope="module")
def image():
    """112 x 84 px: a (1, 8, 6) patch grid, 12 visual tokens after the 2 x 2 merge."""
    return random_image(112, 84)


@pytest.fixture(scope="module")
def inputs(pair, image):
    return pair.encode(PROMPT, [image], response=RESPONSE)


@pytest.fixture(params=["glm4v", "glm4v_moe"])
def case(request, pair, inputs, moe_pair, image):
    if request.param == "glm4v":
        return pair, inputs
    return moe_pair, moe_pair.encode(PROMPT, [image], response=RESPONSE)


def _stock_processor(pair):
    from transformers import Glm4vProcessor

    class Processor(Glm4vProcessor):  # the stock class, buildable without torchvision (no video processor)
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Processor(image_processor=pair.image_processor, tokenizer=pair.tokenizer, video_processor=None)


# -- inputs -----------------------------------------------------------------------------------------


def _assert_same_inputs(ours, expected):
    assert set(ours) == set(expected.keys())
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_encode_equals_stock_processor(pair, inputs, image, system):
    """input_ids, attention_mask, pixel_values, image_grid_thw and mm_token_type_ids all equal
    Glm4vProcessor's for the same chat text and image."""
    tok, processor = pair.tokenizer, _stock_processor(pair)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[text + RESPONSE + tok.eos_token], images=[image], return_tensors="pt")
    ours = (
        inputs.model_inputs if system is None else pair.encode(PROMPT, [image], RESPONSE, system).model_inputs
    )
    _assert_same_inputs(ours, expected)


def test_two_images_in_two_turns_equal_stock_processor(pair):
    """Two images of different sizes in a conversation: placeholders expanded per image, in order."""
    small, wide = random_image(56, 84, seed=1), random_image(84, 140, seed=2)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": small}, {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image", "image": wide}]},
    ]
    ours = pair.encode(messages=messages)
    stock_messages = [
        {**m, "content": [{k: v for k, v in item.items() if k != "image"} for item in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    text = pair.tokenizer.apply_chat_template(stock_messages, tokenize=False, add_generation_prompt=True)
    expected = _stock_processor(pair)(text=[text], images=[small, wide], return_tensors="pt")
    _assert_same_inputs(ours.model_inputs, expected)
    merge = pair.image_processor.merge_size
    counts = [t * h * w // merge**2 for t, h, w in ours.image_grids]
    assert len(counts) == 2 and counts[0] != counts[1]
    assert ours.roles.count(ROLE_VISUAL) == sum(counts)


def test_role_map_marks_exactly_the_image_tokens(pair, inputs):
    tok = pair.tokenizer
    assert inputs.image_grids == ((1, 8, 6),) and inputs.merge_size == 2
    n_visual = 8 * 6 // 4
    pieces = [
        (ROLE_TEMPLATE, "[gMASK]<sop><|user|>\n<|begin_of_image|>"),
        (ROLE_VISUAL, n_visual),
        (ROLE_TEMPLATE, "<|end_of_image|>"),
        (ROLE_PROMPT, PROMPT),
        (ROLE_TEMPLATE, "<|assistant|>\n"),
        (ROLE_RESPONSE, RESPONSE + "<|endoftext|>"),
    ]
    ids: list[int] = []
    roles: list[str] = []
    for role, text in pieces:
        piece = (
            [pair.config.image_token_id] * text
            if role == ROLE_VISUAL
            else tok(text, add_special_tokens=False)["input_ids"]
        )
        ids += piece
        roles += [role] * len(piece)
    assert inputs.input_ids[0].tolist() == ids
    assert list(inputs.roles) == roles
    # The begin/end-of-image delimiters are template, and mm_token_type_ids marks exactly the visual tokens.
    visual = inputs.visual_positions
    assert inputs.tokens[int(visual.min()) - 1] == "<|begin_of_image|>"
    assert inputs.tokens[int(visual.max()) + 1] == "<|end_of_image|>"
    assert inputs.model_inputs["mm_token_type_ids"][0].nonzero().flatten().tolist() == visual.tolist()


def test_mm_token_type_ids_mark_video_frames_as_the_processor_does(pair):
    """Video frames reuse <|image|>; inside <|begin_of_video|>...<|end_of_video|> they are type 2."""
    tok, config = pair.tokenizer, pair.config
    frame = "<|begin_of_image|>" + "<|image|>" * 3 + "<|end_of_image|>0"
    text = "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|image|><|end_of_image|>"
    text += "<|begin_of_video|>" + frame * 2 + "<|end_of_video|>Q<|image|>"
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ours = pair.adapter.extra_model_inputs(ids, config)["mm_token_type_ids"]
    stock = _stock_processor(pair).create_mm_token_type_ids(ids.tolist())
    assert ours.tolist() == stock
    assert sorted(set(stock[0])) == [0, 1, 2] and stock[0].count(2) == 6


# -- capture and the lens ---------------------------------------------------------------------------


def test_capture_equals_hidden_states(case):
    """GLM's hidden_states: entry 0 is the embeddings with the image features merged in (the input of
    layer 0), entry i + 1 the output of layer i, and the last entry is final-normed."""
    pair, inputs = case
    for model in pair.models():
        with torch.no_grad():
            out = model(**inputs.model_inputs, output_hidden_states=True)
        hs = out.hidden_states
        captured, logits = capture_residuals(model, pair.adapter, inputs.model_inputs, with_logits=True)
        n = pair.n_layers
        assert len(captured) == n and len(hs) == n + 1
        for i in range(n - 1):
            assert torch.equal(captured[i], hs[i + 1][0]), i
        assert not torch.allclose(captured[-1], hs[-1][0])
        with torch.no_grad():
            assert torch.equal(pair.adapter.final_norm(model)(captured[-1]), hs[-1][0])
        assert torch.equal(logits, out.logits[0])
    # The two models differ, and the image changes the visual positions' embeddings.
    embeds = pair.adapter.embed(pair.rlvr)(inputs.input_ids)[0]
    with torch.no_grad():
        hs0 = pair.rlvr(**inputs.model_inputs, output_hidden_states=True).hidden_states[0][0]
    visual = inputs.visual_positions
    text = torch.ones(inputs.n_tokens, dtype=torch.bool)
    text[visual] = False
    assert torch.equal(hs0[text], embeds[text]) and not torch.allclose(hs0[visual], embeds[visual])


def test_mrope_positions_are_used(pair, inputs):
    """Without mm_token_type_ids the model refuses the image grid: the adapter's extra input is needed."""
    bare = {k: v for k, v in inputs.model_inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        pair.rlvr(**bare)


def test_lens_self_check_fp32(case):
    pair, inputs = case
    for model in pair.models():
        assert lens_self_check(model, pair.adapter, inputs) < 1e-5


def test_run_drift_gives_finite_kl(pair, make_dataset):
    from analyses.kl_drift import DriftConfig, run_drift
    from lens.datasets import load_jsonl

    samples = load_jsonl(make_dataset(2))
    result = run_drift(pair, samples, None, DriftConfig(n_buckets=2))
    table = result.table
    assert len(table) == sum(
        pair.n_layers * pair.encode(s.question, s.images, s.response).n_tokens for s in samples
    )
    assert set(table["role"]) == {"visual", "prompt", "template", "response"}
    kl = table["kl_base_rlvr"].to_numpy()
    assert np.isfinite(kl).all() and (kl >= -1e-6).all() and kl.mean() > 0.01
    assert np.isfinite(table["base_entropy"].to_numpy()).all()
    assert table["base_entropy"].max() <= math.log(pair.adapter.vocab_size(pair.config)) + 1e-4


# -- interventions ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_inputs(pair, image):
    return pair.encode(PROMPT, [image])


def test_hard_injection_generates_and_leaves_no_trace(pair, prompt_inputs):
    saved = weights(pair.rlvr)
    inj = HardInjection(layers=(0, 1, 2), tau=0.6).prepare(pair, prompt_inputs)
    assert sum(inj.plan.n_selected.values()) > 0
    short = decoding_for(pair, max_new_tokens=4)
    baseline = Baseline().prepare(pair, prompt_inputs)
    (plain,) = baseline.generate_batch(pair, [baseline.state], short, first_logits=True)
    (edited,) = inj.generate_batch(pair, [inj.state], short, first_logits=True)
    assert len(edited.token_ids) == 1 and len(edited.token_ids[0]) >= 1
    assert not torch.allclose(edited.first_logits, plain.first_logits)  # the prefill was edited
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)


def test_batched_decode_equals_single_decodes(pair, prompt_inputs):
    """Left-padded rows of different lengths keep their own M-RoPE positions (GLM's rope index
    follows the attention mask): each row decodes as it does alone."""
    other = pair.encode("Describe the image in one sentence.", [random_image(56, 140, seed=3)])
    assert other.n_tokens != prompt_inputs.n_tokens
    short = decoding_for(pair, max_new_tokens=5, min_new_tokens=5)
    states = [Baseline().prepare(pair, x).state for x in (prompt_inputs, other)]
    batched = Baseline().generate_batch(pair, states, short)
    singles = [Baseline().generate_batch(pair, [state], short)[0] for state in states]
    assert batched == singles


# The rank rule: random tiny models have near-uniform base entropies, where the tau*max rule selects nothing.
@pytest.mark.parametrize("kwargs", [{}, {"variant": "paper", "layers": (1, 3), "select": "high"}])
def test_fast_replay_equals_reference(pair, prompt_inputs, kwargs):
    settings = {"rule": "quantile", "quantile": 0.4, "alpha": 10.0, "steps": 4, "layers": (0, 1, 2), **kwargs}
    saved = weights(pair.rlvr)
    replay = ActivationReplay(**settings).prepare(pair, prompt_inputs)
    fast = replay.result
    ref_offsets, ref_losses = reference_replay(pair, prompt_inputs, **settings)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(fast.offsets, ref_offsets, rtol=1e-4, atol=1e-5)
    assert fast.losses[0] > 0 and fast.offsets.abs().sum() > 0
    assert len(replay.generate(pair, prompt_inputs, max_new_tokens=4).token_ids[0]) >= 1
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)


def test_moe_replay_runs(moe_pair, image):
    inputs = moe_pair.encode(PROMPT, [image])
    settings = {"rule": "quantile", "quantile": 0.4, "steps": 2, "layers": (0, 1, 2)}
    fast = ActivationReplay(**settings).prepare(moe_pair, inputs).result
    ref_offsets, ref_losses = reference_replay(moe_pair, inputs, **settings)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    # The offsets reach a few hundred here; float32 rounding in the expert kernels' backward leaves
    # differences of a few 1e-7 of that scale (5.9e-5 measured), which a per-element rtol misreads
    # on the smallest entries.
    scale = float(ref_offsets.abs().max())
    torch.testing.assert_close(fast.offsets, ref_offsets, rtol=1e-4, atol=2e-6 * scale)
    assert fast.losses[0] > 0 and scale > 0


# -- pairs across families ----------------------------------------------------------------------------


def test_glm_and_qwen_are_not_a_pair(glm_dirs, tmp_path, glm_parts, monkeypatch):
    qtok = tiny_tokenizer()
    qwen_dir = save_checkpoint(tiny_qwen25vl(qtok, seed=0), qtok, tmp_path / "qwen", tiny_image_processor())

    def no_weights(adapter):
        raise AssertionError("weights must not be loaded for a mismatched pair")

    monkeypatch.setattr(lens.loading, "_auto_class", no_weights)
    for base, rlvr in ((glm_dirs[0], qwen_dir), (qwen_dir, glm_dirs[1])):
        with pytest.raises(PairMismatchError, match="architecture differs"):
            load_pair(base, rlvr)
    tok, ip = glm_parts
    with pytest.raises(PairMismatchError, match="architecture differs"):
        ModelPair.from_models(tiny_glm4v(tok, num_layers=2), tiny_qwen25vl(qtok, num_layers=2), tok, ip)
    # GLM-4.1V and GLM-4.5V share an adapter but are different architectures.
    with pytest.raises(PairMismatchError, match="architecture differs"):
        ModelPair.from_models(tiny_glm4v(tok, num_layers=3), tiny_glm4v_moe(tok, num_layers=3), tok, ip)
