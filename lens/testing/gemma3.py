"""A tiny Gemma 3 (``Gemma3ForConditionalGeneration``) for tests: real classes, random weights.

The tokenizer carries Gemma's special tokens at Gemma's low ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
``<unk>`` 3), the turn and image tokens, and the names ``Gemma3Processor`` reads from it
(``boi_token``, ``eoi_token``, ``image_token``); like the real one it adds ``<bos>`` when asked for
special tokens. The chat template has the structure of the published ``-it`` template: ``<bos>`` first,
the system prompt folded into the first user turn, ``model`` as the assistant role, text trimmed,
``<start_of_image>`` per image. The image processor is ``Gemma3ImageProcessor``'s PIL implementation
with the published settings (mean/std 0.5, bilinear, pan-and-scan off), shrunk to 56 px.
"""

from __future__ import annotations

from typing import Any

import torch

from lens.testing import _spread_weights, bpe_tokenizer

GEMMA3_SPECIALS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

#: The attribute names Gemma3Processor reads from the tokenizer (``extra_special_tokens``).
GEMMA3_NAMED_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}

# The structure of the published Gemma 3 -it chat template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

#: Image side and ViT patch of the tiny models: 8 x 8 patches pooled 2 x 2 to 4 x 4 = 16 soft tokens
#: per image (the real 896 / 14 gives 64 x 64 patches, pooled 4 x 4 to 256 tokens).
IMAGE_SIZE = 56
PATCH = 7
TOKENS_PER_IMAGE = 16


def tiny_gemma3_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer with Gemma 3's special tokens and chat template, trained offline."""
    # Like Gemma's tokenizer: <bos> first when special tokens are added (the chat template writes it too).
    return bpe_tokenizer(
        GEMMA3_SPECIALS,
        vocab_size,
        GEMMA3_CHAT_TEMPLATE,
        bos="<bos>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(GEMMA3_SPECIALS[4:]),
        extra_special_tokens=dict(GEMMA3_NAMED_TOKENS),
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_gemma3_image_processor(do_pan_and_scan: bool | None = None) -> Any:
    """A ``Gemma3ImageProcessor`` (PIL implementation, no torchvision needed) for 56-px images.

    ``do_pan_and_scan`` is left unset (``None``) as in the published ``preprocessor_config.json``.
    """
    from transformers import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=do_pan_and_scan,
    )


def tiny_gemma3(
    tokenizer: Any,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    sliding_window: int = 16,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialised ``Gemma3ForConditionalGeneration``, lm_head tied to the embedding.

    Layers alternate sliding-window (``sliding_window`` tokens, shorter than a test chat) and full
    attention, so both masks (each with the bidirectional image blocks) are exercised.

    Args:
        tokenizer: The tokenizer from :func:`tiny_gemma3_tokenizer` (its ids go into the config).
        seed: Weight seed; two seeds make a base/RLVR pair.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    head_dim = hidden_size // num_heads
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=1024,
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
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_NAMED_TOKENS.items()}
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        tie_word_embeddings=True,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(dtype).eval()
    _spread_weights(model, seed)
    # Gemma initialises the projection to zero (image features would all be 0) and every RMSNorm
    # weight to 0 (scale 1): give both seeded random values so images and norms matter.
    gen = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen).to(param.dtype))
            elif "norm" in name and param.ndim == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen).to(param.dtype))
    # As the published -it checkpoints: a turn ends at <end_of_turn> as well as at <eos>.
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    ]
    return model
