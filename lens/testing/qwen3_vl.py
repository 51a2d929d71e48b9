"""Tiny Qwen3-VL models (dense and MoE) of the real transformers classes, for tests and demos.

Qwen3-VL keeps Qwen2.5-VL's tokens (``<|vision_start|><|image_pad|><|vision_end|>`` per image,
``<|im_start|>``/``<|im_end|>`` turns) and its image processor class, with 16-px patches and
mean/std 0.5 (the published ``preprocessor_config.json``). The language model adds DeepStack:
features from intermediate vision blocks are added to the hidden states at the visual positions
after the first ``len(deepstack_visual_indexes)`` decoder layers. The tiny models keep that: two
DeepStack levels on a four-layer language model, so layers with and without an addition are tested.
"""

from __future__ import annotations

from typing import Any

import torch

from lens.testing import QWEN_SPECIALS, _spread_weights, tiny_tokenizer

# The structure of the published Qwen3-VL Instruct template (Qwen/Qwen3-VL-8B-Instruct,
# chat_template.json), shortened to what replay-lens renders: unlike Qwen2.5-VL there is no
# default system prompt; a system turn appears only when given; each image is
# <|vision_start|><|image_pad|><|vision_end|> in place; the generation prompt is
# "<|im_start|>assistant\n".
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Patch side of the Qwen3-VL vision tower (Qwen2.5-VL: 14).
QWEN3_VL_PATCH = 16


def tiny_qwen3vl_tokenizer(vocab_size: int = 400) -> Any:
    """A tiny byte-level BPE tokenizer with the Qwen special tokens and the Qwen3-VL chat template."""
    return tiny_tokenizer(vocab_size, chat_template=QWEN3_VL_CHAT_TEMPLATE)


def tiny_qwen3vl_image_processor(max_side: int = 128) -> Any:
    """A Qwen2-VL image processor with Qwen3-VL's settings (PIL implementation, no torchvision).

    Patch 16, merge 2, temporal patch 2, mean and std 0.5, as the published checkpoints; the pixel
    budget is small (one merged 32-px unit at least, ``max_side²`` at most) to keep tests fast.
    """
    from transformers import Qwen2VLImageProcessorPil

    unit = QWEN3_VL_PATCH * 2
    return Qwen2VLImageProcessorPil(
        patch_size=QWEN3_VL_PATCH,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": unit * unit, "longest_edge": max_side * max_side},
    )


def tiny_qwen3vl(
    tokenizer: Any,
    seed: int = 0,
    moe: bool = False,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    deepstack_levels: int = 2,
    num_experts: int = 4,
    experts_per_token: int = 2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialised ``Qwen3VLForConditionalGeneration`` (``moe=True``:
    ``Qwen3VLMoeForConditionalGeneration``, every decoder layer a sparse MoE block).

    The vision tower has ``deepstack_levels`` blocks, each feeding one DeepStack level (the real
    towers take levels from blocks 8, 16 and 24 of 27), so the first ``deepstack_levels`` decoder
    layers get an addition. ``mrope_section`` is interleaved and sums to ``head_dim / 2``.
    """
    if not 0 < deepstack_levels < num_layers:
        raise ValueError(f"deepstack_levels must be in 1..{num_layers - 1}, got {deepstack_levels}")
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    spatial = half // 4
    mrope = [half - 2 * spatial, spatial, spatial]  # T, H, W frequencies (real 128-dim heads: 24, 20, 20)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": mrope,
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
        # The defaults are the real Qwen ids (151643/151645), outside a tiny vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if moe:
        text.update(
            num_experts=num_experts,
            num_experts_per_tok=experts_per_token,
            moe_intermediate_size=hidden_size // 2,
            decoder_sparse_step=1,
        )
    vision = dict(
        depth=deepstack_levels,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=QWEN3_VL_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden_size,
        num_position_embeddings=64,  # an 8 x 8 learned grid, resampled to each image's grid
        deepstack_visual_indexes=list(range(deepstack_levels)),
    )
    if moe:
        from transformers import Qwen3VLMoeConfig as config_class
        from transformers import Qwen3VLMoeForConditionalGeneration as model_class
    else:
        from transformers import Qwen3VLConfig as config_class
        from transformers import Qwen3VLForConditionalGeneration as model_class
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    _spread_weights(model, seed)
    if moe:
        # Routers start near zero (std 0.02): every token would weigh its experts almost equally.
        # Larger router weights make the routing, and so the two seeds' experts, matter.
        gen = torch.Generator().manual_seed(seed + 2000)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype))
    return model
