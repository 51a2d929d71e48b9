"""A tiny InternVL 3 / 3.5 (transformers-native ``-hf`` format) for tests: real classes, random weights.

The tokenizer carries the family's special tokens in the order the InternVL checkpoints add them
(``<img>``, ``</img>``, ``<IMG_CONTEXT>`` consecutive, as :class:`lens.adapters.InternVLAdapter`
expects) and the names ``InternVLProcessor`` reads from it (``start_image_token``,
``end_image_token``, ``context_image_token``, ``video_token``). The chat template has the structure
of the ``-hf`` checkpoints' template: no default system prompt, one ``<IMG_CONTEXT>`` and a newline
per image. The image processor is ``GotOcr2ImageProcessor``'s PIL implementation with the published
settings (ImageNet mean/std, ``crop_to_patches`` off in its own config: the processor turns it on),
shrunk to 56-pixel tiles.
"""

from __future__ import annotations

from typing import Any

import torch

from lens.testing import _spread_weights, bpe_tokenizer

INTERNVL_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)

#: The attribute names InternVLProcessor reads from the tokenizer (``extra_special_tokens``).
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# The structure of the InternVL ``-hf`` chat template (transformers' conversion script): every
# message is ``<|im_start|>role\n ... <|im_end|>\n``; an image item renders as ``<IMG_CONTEXT>\n``.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Tile side and ViT patch of the tiny models: 8 x 8 patches, 4 x 4 = 16 tokens per tile after the
#: 0.5 pixel shuffle (the real 448 / 14 gives 32 x 32 patches and 256 tokens).
TILE = 56
PATCH = 7
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2


def tiny_internvl_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer with InternVL's special tokens and chat template, trained offline."""
    return bpe_tokenizer(
        INTERNVL_SPECIALS,
        vocab_size,
        INTERNVL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(INTERNVL_SPECIALS[1:]),
        extra_special_tokens=dict(INTERNVL_NAMED_TOKENS),
        model_input_names=["input_ids", "attention_mask"],  # the real (Qwen2) one returns no token_type_ids
    )


def tiny_internvl_image_processor(max_patches: int = 6) -> Any:
    """A ``GotOcr2ImageProcessor`` (PIL implementation, no torchvision needed) with 56-px tiles."""
    from transformers import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        min_patches=1,
        max_patches=max_patches,
    )


def tiny_internvl(
    tokenizer: Any,
    seed: int = 0,
    text_model: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialised ``InternVLForConditionalGeneration``.

    Args:
        tokenizer: The tokenizer from :func:`tiny_internvl_tokenizer` (its ids go into the config).
        seed: Weight seed; two seeds make a base/RLVR pair.
        text_model: ``"qwen2"`` (InternVL 3) or ``"qwen3"`` (InternVL 3.5) language model.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if text_model not in ("qwen2", "qwen3"):
        raise ValueError(f"text_model must be 'qwen2' or 'qwen3', not {text_model!r}")
    text = dict(
        model_type=text_model,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_depth,
        num_attention_heads=2,
        intermediate_size=2 * vision_hidden,
        image_size=TILE,
        patch_size=PATCH,
    )
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(dtype).eval()
    _spread_weights(model, seed)
    return model
