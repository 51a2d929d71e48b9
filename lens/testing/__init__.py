"""Tiny models of the real architectures, built from a config, for tests, benchmarks and demos.

Nothing here downloads anything: the tokenizer is trained on a few sentences with ``tokenizers``,
the image processor is built from defaults, and weights are random (seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The structure of the real Qwen2-VL / Qwen2.5-VL chat template (system turn, one placeholder per
# image or video, generation prompt), shortened to what replay-lens renders.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "How many red shapes are in the image? Answer with a number.",
    "The answer is 42. Let me think step by step about the picture.",
    "A blue square, a green circle and a yellow triangle are drawn on a dark background.",
    "Probe: how many red shapes are there? 12 + 30 = 42.",
    "Describe the image in one sentence, then give the final answer in a box.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def bpe_tokenizer(
    specials: Sequence[str],
    vocab_size: int = 400,
    chat_template: str | None = None,
    bos: str | None = None,
    **special_tokens: Any,
) -> Any:
    """A byte-level BPE tokenizer trained offline on a few sentences, with a family's special tokens.

    Args:
        specials: The special tokens, in id order (they get the first ids).
        vocab_size: Vocabulary size.
        chat_template: The family's chat template.
        bos: A token put first whenever special tokens are added (Gemma's ``<bos>``).
        **special_tokens: Passed to ``PreTrainedTokenizerFast`` (``eos_token``, ``pad_token``,
            ``additional_special_tokens``, ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_tokenizer(vocab_size: int = 400, chat_template: str | None = QWEN_VL_CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer with the Qwen special tokens, trained offline."""
    return bpe_tokenizer(
        QWEN_SPECIALS,
        vocab_size,
        chat_template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
    )


def tiny_image_processor(patch_size: int = 14, max_side: int = 112) -> Any:
    """A Qwen2-VL image processor (PIL implementation, no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    unit = patch_size * 2
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": unit * unit, "longest_edge": max_side * max_side},
    )


def tiny_qwen25vl(
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
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration``.

    ``mrope_section`` is derived from the head dimension (it must sum to ``head_dim / 2``).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope},
        tie_word_embeddings=False,
        # The defaults are the real Qwen ids (151643/151645), outside a tiny vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        out_hidden_size=hidden_size,
        window_size=patch_size * 8,
        fullatt_block_indexes=[vision_depth - 1],
    )
    config = Qwen2_5_VLConfig(
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
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    _spread_weights(model, seed)
    return model


def tiny_causal_lm(
    tokenizer: Any, seed: int = 0, hidden_size: int = 64, num_layers: int = 3, family: str = "qwen2"
) -> Any:
    """A randomly initialised Qwen2- or Llama-style causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    config = cfg_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _spread_weights(model, seed)
    return model


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Scale up random weights so logit-lens distributions are far from uniform.

    With the default init (std 0.02) every readout of a tiny model is nearly uniform, which makes
    entropy and KL checks trivially pass. Larger weights give peaked, varied distributions.
    """
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and ("lm_head" in name or "embed_tokens" in name):
                param.copy_(
                    torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.5
                )


def save_checkpoint(
    model: Any, tokenizer: Any, folder: str | Path, image_processor: Any | None = None
) -> Path:
    """Save a model as a complete Hugging Face checkpoint folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    return folder
