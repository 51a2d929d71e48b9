"""Inputs and the token-role map, against hand-built expectations and the stock Qwen2.5-VL processor."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, RESPONSE

from lens.errors import InputError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _expected(tok, pieces: list[tuple[str, str | int]]) -> tuple[list[int], list[str]]:
    """Token ids and roles of a sequence of (role, text) pieces tokenized one by one.

    A ``(ROLE_VISUAL, n)`` piece stands for ``n`` image placeholders.
    """
    ids: list[int] = []
    roles: list[str] = []
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for role, text in pieces:
        piece = [pad] * text if role == ROLE_VISUAL else _ids(tok, text)
        ids += piece
        roles += [role] * len(piece)
    return ids, roles


def test_role_map_multimodal_exact(vl_pair, vl_inputs):
    tok = vl_pair.tokenizer
    grid = vl_inputs.image_grids
    assert grid == ((1, 8, 6),)  # 112 x 84 px with 14-px patches
    n_visual = 8 * 6 // 4
    ids, roles = _expected(
        tok,
        [
            (ROLE_TEMPLATE, SYSTEM + "<|im_start|>user\n<|vision_start|>"),
            (ROLE_VISUAL, n_visual),
            (ROLE_TEMPLATE, "<|vision_end|>"),
            (ROLE_PROMPT, PROMPT),
            (ROLE_TEMPLATE, "<|im_end|>\n<|im_start|>assistant\n"),
            (ROLE_RESPONSE, RESPONSE + "<|im_end|>"),
        ],
    )
    assert vl_inputs.input_ids[0].tolist() == ids
    assert list(vl_inputs.roles) == roles
    assert vl_inputs.roles.count(ROLE_VISUAL) == n_visual
    assert vl_inputs.tokens[-1] == "<|im_end|>" and vl_inputs.roles[-1] == ROLE_RESPONSE
    assert vl_inputs.response_start == roles.index(ROLE_RESPONSE)
    visual = vl_inputs.visual_positions
    assert (vl_inputs.input_ids[0, visual] == vl_pair.config.image_token_id).all()
    # mm_token_type_ids marks exactly the visual positions.
    assert vl_inputs.model_inputs["mm_token_type_ids"][0].nonzero().flatten().tolist() == visual.tolist()


def test_role_map_image_after_text(vl_pair, image):
    tok = vl_pair.tokenizer
    inputs = vl_pair.encode(PROMPT, [image], image_first=False)
    ids, roles = _expected(
        tok,
        [
            (ROLE_TEMPLATE, SYSTEM + "<|im_start|>user\n"),
            (ROLE_PROMPT, PROMPT),
            (ROLE_TEMPLATE, "<|vision_start|>"),
            (ROLE_VISUAL, 12),
            (ROLE_TEMPLATE, "<|vision_end|><|im_end|>\n<|im_start|>assistant\n"),
        ],
    )
    assert inputs.input_ids[0].tolist() == ids
    assert list(inputs.roles) == roles
    assert inputs.response_start is None
    assert inputs.positions(ROLE_PROMPT).max() < inputs.visual_positions.min()


def test_role_map_text_only(lm_pair, lm_inputs):
    # The pair's own (reloaded) tokenizer: transformers rebuilds it as a Qwen2 tokenizer, which
    # splits digits, so it differs from the in-memory one it was saved from.
    tok = lm_pair.tokenizer
    ids, roles = _expected(
        tok,
        [
            (ROLE_TEMPLATE, SYSTEM + "<|im_start|>user\n"),
            (ROLE_PROMPT, PROMPT),
            (ROLE_TEMPLATE, "<|im_end|>\n<|im_start|>assistant\n"),
            (ROLE_RESPONSE, RESPONSE + "<|im_end|>"),
        ],
    )
    assert lm_inputs.input_ids[0].tolist() == ids
    assert list(lm_inputs.roles) == roles
    assert set(lm_inputs.model_inputs) == {"input_ids", "attention_mask"}
    assert tok.decode(lm_inputs.input_ids[0, lm_inputs.positions(ROLE_PROMPT)]) == PROMPT


def test_build_inputs_equals_stock_processor(vl_pair, vl_inputs, image):
    """Our inputs equal Qwen2_5_VLProcessor's for the same chat text and image."""
    from transformers import Qwen2_5_VLProcessor

    class Processor(Qwen2_5_VLProcessor):  # the stock class, buildable without torchvision
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = vl_pair.tokenizer
    processor = Processor(image_processor=vl_pair.image_processor, tokenizer=tok, video_processor=None)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[text + RESPONSE + tok.eos_token], images=[image], return_tensors="pt")
    ours = vl_inputs.model_inputs
    assert set(ours) == set(expected.keys())
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def test_bad_inputs_raise_input_error(vl_pair, lm_pair, image, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really a png" * 8)
    with pytest.raises(InputError, match="corrupt"):
        vl_pair.encode(PROMPT, [corrupt])
    with pytest.raises(InputError, match="not found"):
        vl_pair.encode(PROMPT, [tmp_path / "missing.png"])
    with pytest.raises(InputError, match="empty"):
        vl_pair.encode("   ", [image])
    with pytest.raises(InputError, match="takes no images"):
        lm_pair.encode(PROMPT, [image])
