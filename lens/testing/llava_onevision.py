"""A tiny LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): tokenizer, image processor, model.

The real checkpoints (``llava-hf/llava-onevision-qwen2-7b-ov-hf``) pair a SigLIP vision tower
(384 px tiles of 14 px patches: 27 x 27 = 729 features per tile) with a Qwen2 language model, cut
each image into a base tile plus an "anyres" grid of tiles picked from ``image_grid_pinpoints``, and
expand one ``<image>`` placeholder per image into base features + unpadded grid features + one
newline feature per grid row. The tiny one keeps every part of that at toy sizes: 28 px tiles of
7 px patches (4 x 4 = 16 features per tile) and pinpoints up to 4 x 4 tiles, so that both the
unpadding and the ``anyres_max_9`` downsampling (more than 9 tiles' worth of features) occur.

Nothing here downloads anything; weights are random (seeded), the tokenizer is trained offline.
"""

from __future__ import annotations

from typing import Any

import torch

from lens.testing import _spread_weights, bpe_tokenizer

LLAVA_OV_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# The structure of the published LLaVA-OneVision chat template (llava-hf/llava-onevision-qwen2-*-ov-hf,
# as in transformers' tests/models/llava_onevision/test_processing_llava_onevision.py): each turn opens
# with "<|im_start|>ROLE ", renders all its images, then all its videos, then each text part after a
# newline, and closes with "<|im_end|>" (no newline); it reads typed content parts only, so a plain
# string content renders as nothing.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Tile side in pixels and vision patch side of the tiny model (16 features per tile).
TILE = 28
PATCH = 7
#: (height, width) resolutions the anyres grid may take, in tiles of ``TILE`` px, up to 4 x 4 tiles.
PINPOINTS = [[TILE * h, TILE * w] for h in range(1, 5) for w in range(1, 5)]


def tiny_llava_ov_tokenizer(vocab_size: int = 400, chat_template: str | None = LLAVA_OV_CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer with LLaVA-OneVision's special tokens, trained offline."""
    return bpe_tokenizer(
        LLAVA_OV_SPECIALS,
        vocab_size,
        chat_template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(LLAVA_OV_SPECIALS[1:]),
    )


def tiny_llava_ov_image_processor(pinpoints: list[list[int]] | None = None) -> Any:
    """A LLaVA-OneVision image processor (PIL implementation, no torchvision needed) for 28 px tiles."""
    from transformers import LlavaOnevisionImageProcessorPil

    return LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints or PINPOINTS
    )


def tiny_llava_onevision(
    tokenizer: Any,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialised ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 LM)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text = dict(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # The defaults are the real Qwen ids (151643/151645), outside a tiny vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_depth,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        # The published checkpoints' settings (SigLIP has no CLS token: "full" keeps every feature).
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    _spread_weights(model, seed)
    return model
