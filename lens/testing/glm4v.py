"""Tiny GLM-4.1V (and GLM-4.5V) models of the real classes, for tests and demos.

The tokenizer carries GLM's special tokens in the real order (so the ids keep the real relative
layout), the chat template has the structure of GLM-4.1V-9B-Thinking's (``[gMASK]<sop>``, role
tags without end-of-turn tokens, ``<|begin_of_image|><|image|><|end_of_image|>`` per image, the
generation prompt ``<|assistant|>\\n``), and the image processor is the real ``Glm4vImageProcessorPil``
with a small pixel budget. Weights are random (seeded).
"""

from __future__ import annotations

from typing import Any

import torch

from lens.testing import _spread_weights, bpe_tokenizer

#: GLM-4.1V's special tokens, in the order of their real ids (151329 ``<|endoftext|>`` ... 151344
#: ``<|video|>``), then the thinking tags.
GLM4V_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
)

# The published GLM-4.1V-9B-Thinking template (zai-org/GLM-4.1V-9B-Thinking, chat_template), with
# the same whitespace control; the assistant ``metadata`` branch is kept for fidelity.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>\n"
    "{%- for msg in messages %}\n"
    "    {%- if msg.role == 'system' %}\n"
    "<|system|>\n"
    "{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n"
    "<|user|>{{ '\\n' }}\n"
    "\n"
    "        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n"
    "{{ item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n"
    "<|assistant|>{{ msg.metadata }}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "<|assistant|>\n"
    "{{ msg.content }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% endif %}"
)


def tiny_glm4v_tokenizer(vocab_size: int = 400, chat_template: str | None = GLM4V_CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer with GLM-4.1V's special tokens, trained offline.

    EOS and padding are ``<|endoftext|>``, as in the released tokenizer.
    """
    return bpe_tokenizer(
        GLM4V_SPECIALS,
        vocab_size,
        chat_template,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(GLM4V_SPECIALS[1:]),
    )


def tiny_glm4v_image_processor(patch_size: int = 14, max_side: int = 112) -> Any:
    """The real GLM-4V image processor (PIL implementation, no torchvision needed), small budget.

    ``size`` holds the pixel budget (``shortest_edge`` = min pixels, ``longest_edge`` = max pixels,
    counted over ``temporal_patch_size`` frames, as ``Glm4vImageProcessor`` counts them).
    """
    from transformers import Glm4vImageProcessorPil

    unit = patch_size * 2
    return Glm4vImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": unit * unit, "longest_edge": 2 * max_side * max_side},
    )


def _glm_ids(tokenizer: Any) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in GLM4V_SPECIALS}
    return dict(
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )


def _text_and_vision(
    tokenizer: Any,
    hidden_size: int,
    num_layers: int,
    vocab_size: int | None,
    intermediate_size: int | None,
    num_heads: int,
    num_kv_heads: int,
    vision_hidden: int,
    vision_depth: int,
    patch_size: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    head_dim = hidden_size // num_heads
    # GLM-4.1V rotates half of each head (partial_rotary_factor 0.5); mrope_section splits the
    # rotated half's frequencies between the t, h and w positions and must sum to head_dim / 4.
    quarter = head_dim // 4
    t = max(1, quarter // 4)
    h = (quarter - t) // 2
    text = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
            "mrope_section": [t, h, quarter - t - h],
        },
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        image_size=8 * patch_size,  # the learned position table (interpolated per image)
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
    )
    return text, vision


def tiny_glm4v(
    tokenizer: Any,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    patch_size: int = 14,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialised ``Glm4vForConditionalGeneration`` (GLM-4.1V)."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    text, vision = _text_and_vision(
        tokenizer, hidden_size, num_layers, vocab_size, intermediate_size,
        num_heads, num_kv_heads, vision_hidden, vision_depth, patch_size,
    )  # fmt: skip
    config = Glm4vConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **_glm_ids(tokenizer)
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).to(dtype).eval()
    _spread_weights(model, seed)
    return model


def tiny_glm4v_moe(
    tokenizer: Any,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    n_routed_experts: int = 4,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    patch_size: int = 14,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialised ``Glm4vMoeForConditionalGeneration`` (GLM-4.5V): layer 0 dense, the
    others mixture-of-experts (``first_k_dense_replace=1``, as released)."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    text, vision = _text_and_vision(
        tokenizer, hidden_size, num_layers, None, None,
        num_heads, num_kv_heads, vision_hidden, vision_depth, patch_size,
    )  # fmt: skip
    text.update(
        moe_intermediate_size=hidden_size,
        n_routed_experts=n_routed_experts,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
    )
    config = Glm4vMoeConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **_glm_ids(tokenizer)
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(config).to(dtype).eval()
    _spread_weights(model, seed)
    return model
