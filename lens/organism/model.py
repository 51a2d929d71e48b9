"""Tiny Qwen2.5-VL for the organism: config, offline tokenizer, image processor and a fast encoder.

The model is the real ``Qwen2_5_VLForConditionalGeneration`` at about 1.07 M parameters. The tokenizer is
a word-level vocabulary (task words, letters, numbers 0-199) with Qwen's special tokens and a Jinja chat
template that renders an image item as ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad, which
the caller expands to the number of merged image tokens), exactly like the real Qwen2.5-VL template.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lens.errors import CheckpointError

SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)
WORDS = (
    "user assistant system how many red green blue yellow round square total shapes shape ? answer "
    "is are the a an of in there image picture count number colour color and or not none no yes , . :"
).split()
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
NUMBERS = tuple(str(i) for i in range(200))
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Tokens that sampling must never emit: a sampled ``<|image_pad|>`` breaks the next forward pass."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% elif item['type'] == 'text' %}",
    "{% elif item['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}",
)
"""The template of the video organism: a video item renders like Qwen2.5-VL's, one ``<|video_pad|>``."""

PATCH = 8
TEMPORAL_PATCH = 2
MERGE = 2
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the organism (see the feasibility study for why these sizes)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 1e4
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # must sum to head_dim / 2 = 16
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    window_size: int = 32  # 2x2 merged tokens per window in block 0
    fullatt_block_indexes: tuple[int, ...] = (1,)
    attn_implementation: str = "sdpa"
    # Off for the shipped organism. On, the unembedding is the input embedding (as in Qwen2.5-VL-3B), so a
    # visual token placed near a word's embedding also reads out as that word under the logit lens.
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)


def build_tokenizer(extra_words: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE):
    """Build the offline word-level tokenizer with Qwen's special tokens and the chat template.

    Args:
        extra_words: Words appended after the numbers (the video organism's); none for the image organism,
            whose ids are therefore unchanged.
        chat_template: The Jinja chat template (:data:`VIDEO_CHAT_TEMPLATE` for the video organism).

    Returns:
        A ``PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in SPECIALS + tuple(WORDS) + LETTERS + NUMBERS + tuple(extra_words):
        vocab.setdefault(t, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in SPECIALS if t not in ("<|im_end|>", "<|endoftext|>", "<unk>")],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def build_image_processor():
    """A ``Qwen2VLImageProcessorPil`` (no torchvision) with patch 8, merge 2, temporal patch 2.

    A 64x64 image gives ``image_grid_thw = [1, 8, 8]`` and 16 merged image tokens. Larger images are
    downscaled to at most 64x64 pixels in area.
    """
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def build_model(tok, cfg: TinyConfig = TinyConfig(), seed: int = 0):
    """Build a randomly initialised tiny ``Qwen2_5_VLForConditionalGeneration`` (fp32, eval mode).

    Args:
        tok: The tokenizer from :func:`build_tokenizer` (sets vocab size and special token ids).
        cfg: Architecture.
        seed: Initialisation seed.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "mrope_section": list(cfg.mrope_section),
        },
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_heads=cfg.vision_heads,
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=MERGE,
        out_hidden_size=cfg.hidden_size,
        window_size=cfg.window_size,
        fullatt_block_indexes=list(cfg.fullatt_block_indexes),
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    config._attn_implementation = cfg.attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|im_start|>"]
    # "answer N" and the end token fit in 4; lens.decoding reads this as the organism's decode budget.
    model.generation_config.max_new_tokens = 4
    return model.eval()


def suppress_ids(tok) -> list[int]:
    """Token ids of :data:`VISION_TOKENS`."""
    return [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]


def patchify(image: Image.Image) -> np.ndarray:
    """Pixel values of a 64x64 image, bit-identical to ``Qwen2VLImageProcessorPil`` (float32).

    Returns:
        Array of shape ``(64, 3 * 2 * 8 * 8)``: 64 patches in Qwen's merge-block order, the single frame
        repeated over the temporal patch.
    """
    x = np.asarray(image.convert("RGB"))
    if x.shape[:2] != (64, 64):
        raise ValueError("patchify expects a 64x64 image; use the image processor for other sizes")
    # Same ops as the processor: rescale in float64 then cast, normalise in float32.
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    x = x.transpose(2, 0, 1)[None].repeat(TEMPORAL_PATCH, axis=0)  # (T, C, H, W)
    gh = gw = 64 // PATCH
    x = x.reshape(1, TEMPORAL_PATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gh * gw, 3 * TEMPORAL_PATCH * PATCH * PATCH))


def render_prompt(tok, question: str) -> str:
    """The organism prompt through the tokenizer's chat template (question, then one image pad)."""
    msgs = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


class Encoder:
    """Fast batched encoder for organism prompts (all prompts have the same length, so no padding).

    It renders the chat template once per question, expands the single ``<|image_pad|>`` to 16 copies and
    patchifies in numpy. ``tests/test_organism.py`` checks it against ``lens.inputs.build_inputs``.
    """

    def __init__(self, tok):
        self.tok = tok
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.eos_id = tok.eos_token_id
        self.n_image_tokens = (64 // PATCH) ** 2 // MERGE**2
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the rendered, pad-expanded prompt."""
        if question not in self._cache:
            text = render_prompt(self.tok, question)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * self.n_image_tokens)
            self._cache[question] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[question]

    def response_ids(self, response: str) -> list[int]:
        """Token ids of ``response + eos``."""
        return self.tok(response + self.tok.eos_token, add_special_tokens=False)["input_ids"]

    def encode(
        self, questions: Sequence[str], images: Sequence[Image.Image], responses: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Build model inputs for a batch.

        Args:
            questions: Question texts.
            images: 64x64 images, one per question.
            responses: Optional responses appended (with eos) after the generation prompt; they must all
                tokenize to the same length.

        Returns:
            ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``
            and, when responses are given, ``prompt_len`` (an int tensor) for the loss mask.
        """
        rows = [self.prompt_ids(q) for q in questions]
        prompt_len = len(rows[0])
        if responses is not None:
            rows = [r + self.response_ids(a) for r, a in zip(rows, responses, strict=True)]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("Encoder needs equal-length rows; use lens.inputs for ragged batches")
        ids = torch.tensor(rows, dtype=torch.long)
        pix = torch.from_numpy(np.concatenate([patchify(im) for im in images]))
        grid = torch.tensor([[1, 64 // PATCH, 64 // PATCH]] * len(images), dtype=torch.long)
        out = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == self.image_token_id).int(),
            "pixel_values": pix,
            "image_grid_thw": grid,
        }
        if responses is not None:
            out["prompt_len"] = torch.tensor(prompt_len)
        return out


def save_folder(model, tok, out_dir: str | os.PathLike) -> Path:
    """Save a complete HF folder: config, generation config, safetensors, tokenizer, image processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    build_image_processor().save_pretrained(out)
    return out


def load_folder(path: str | os.PathLike):
    """Load an organism folder directly with transformers.

    Returns:
        ``(model, tokenizer, image_processor)``, model in eval mode on CPU, fp32.
    """
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model folder (no config.json)")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation=TinyConfig.attn_implementation, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    ip = Qwen2VLImageProcessorPil.from_pretrained(path)
    return model, tok, ip


def config_dict(cfg: TinyConfig) -> dict:
    """The architecture as a JSON-able dict (for the manifest)."""
    d = asdict(cfg)
    d.pop("extra")
    return d
