"""Turn (images, prompt, optional response) into identical model inputs plus a token-role map.

The Qwen-VL processor does three things: render the chat template with one ``<|image_pad|>`` per
image, expand each placeholder to the image's number of merged patches, and tokenize. We do the
same three steps here with the tokenizer and image processor directly, because the stock
processor class cannot be built without torchvision; the tests check the tensors are identical
to the processor's. Doing it ourselves also lets us keep character offsets, which give the role
of every token (visual, prompt text, chat template, response).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lens.adapters import ArchitectureAdapter
from lens.errors import InputError

ROLE_VISUAL = "visual"
ROLE_PROMPT = "prompt"
ROLE_TEMPLATE = "template"
ROLE_RESPONSE = "response"
ROLES = (ROLE_VISUAL, ROLE_PROMPT, ROLE_TEMPLATE, ROLE_RESPONSE)

_SENTINEL = "\u2063REPLAYLENS_PROMPT\u2063"


@dataclass(frozen=True)
class PairInputs:
    """Inputs shared by both models of a pair, plus what every analysis needs to know about them.

    Attributes:
        model_inputs: Keyword arguments for ``model(**model_inputs)`` (batch of one).
        roles: Role of every position, one of :data:`ROLES`.
        tokens: The token string at every position (for plots and debugging).
        image_grids: ``(t, h, w)`` patch grid of each image, before the spatial merge.
        merge_size: Spatial merge factor (2 for Qwen-VL); merged grid is ``(h/merge, w/merge)``.
        response_start: Index of the first response token, or ``None`` without a response.
    """

    model_inputs: dict[str, torch.Tensor]
    roles: tuple[str, ...]
    tokens: tuple[str, ...]
    image_grids: tuple[tuple[int, int, int], ...] = ()
    merge_size: int = 1
    response_start: int | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.model_inputs["input_ids"]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def positions(self, role: str) -> torch.Tensor:
        """Indices of the positions that have ``role``."""
        return torch.tensor([i for i, r in enumerate(self.roles) if r == role], dtype=torch.long)

    @property
    def visual_positions(self) -> torch.Tensor:
        return self.positions(ROLE_VISUAL)

    @property
    def role_array(self) -> np.ndarray:
        return np.asarray(self.roles)

    def to(self, device: torch.device | str) -> PairInputs:
        moved = {k: v.to(device) for k, v in self.model_inputs.items()}
        return PairInputs(
            moved, self.roles, self.tokens, self.image_grids, self.merge_size, self.response_start
        )


def open_image(image: Image.Image | str | Path | bytes) -> Image.Image:
    """Open an image as RGB, turning every failure into :class:`InputError`.

    Args:
        image: A PIL image, a file path, or an encoded image file's bytes (PNG, JPEG, ...).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        source: Any = BytesIO(image)
        what = f"({len(image)} bytes)"
    else:
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        source, what = path, str(path)
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"unreadable or corrupt image {what}: {exc}") from exc


def _render(tokenizer: Any, n_images: int, image_first: bool, text: str) -> str:
    content: list[dict[str, str]] = [{"type": "text", "text": text}]
    images = [{"type": "image"} for _ in range(n_images)]
    content = images + content if image_first else content + images
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_inputs(
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    config: Any,
    prompt: str,
    images: Sequence[Image.Image | str | Path] = (),
    response: str | None = None,
    image_processor: Any | None = None,
    image_first: bool = True,
    use_chat_template: bool = True,
    device: torch.device | str | None = None,
) -> PairInputs:
    """Build one sample's inputs and its token-role map.

    Args:
        tokenizer: A fast tokenizer (offsets are needed for the role map).
        adapter: The pair's architecture adapter.
        config: The model config (visual token ids live there).
        prompt: The user's text.
        images: Zero or more images (PIL images or paths).
        response: Optional response, appended after the generation prompt and ended with the
            tokenizer's EOS token, for teacher forcing.
        image_processor: The image processor; required when ``images`` is non-empty.
        image_first: Put images before the text in the user turn (Qwen's usual order).
        use_chat_template: Render with the tokenizer's chat template when it has one.
        device: Where to put the tensors.

    Returns:
        The inputs, with one role per position.

    Raises:
        InputError: For unreadable images, images given to a text-only model, or an empty prompt.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    pil_images = [open_image(im) for im in images]
    if pil_images and not adapter.multimodal:
        raise InputError(f"{adapter.name} takes no images, but {len(pil_images)} were given")
    if pil_images and image_processor is None:
        raise InputError("images were given but the pair has no image processor")

    if use_chat_template and getattr(tokenizer, "chat_template", None):
        skeleton = _render(tokenizer, len(pil_images), image_first, _SENTINEL)
    else:
        if pil_images:
            raise InputError("images need a chat template that places them; the tokenizer has none")
        skeleton = _SENTINEL
    if skeleton.count(_SENTINEL) != 1:
        raise InputError("the chat template does not render the prompt text exactly once")

    pixel_inputs: dict[str, torch.Tensor] = {}
    grids: list[tuple[int, int, int]] = []
    merge = 1
    if pil_images:
        processed = image_processor(images=pil_images, return_tensors="pt")
        pixel_inputs = {
            "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"],
        }
        grids = [tuple(int(x) for x in g) for g in processed["image_grid_thw"]]
        merge = int(getattr(image_processor, "merge_size", 1))
        pad = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
        pieces = skeleton.split(pad)
        if len(pieces) - 1 != len(grids):
            raise InputError(
                f"the chat template placed {len(pieces) - 1} image slots for {len(grids)} images"
            )
        expanded = pieces[0]
        for (t, h, w), rest in zip(grids, pieces[1:], strict=True):
            expanded += pad * (t * h * w // (merge * merge)) + rest
        skeleton = expanded

    prompt_start = skeleton.index(_SENTINEL)
    text = skeleton.replace(_SENTINEL, prompt)
    prompt_span = (prompt_start, prompt_start + len(prompt))
    response_span = None
    if response is not None:
        eos = tokenizer.eos_token or ""
        response_span = (len(text), len(text) + len(response))
        text = text + response + eos

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    input_ids = enc["input_ids"]
    offsets = enc["offset_mapping"][0].tolist()
    visual_ids = set(adapter.visual_token_ids(config))
    roles: list[str] = []
    response_start = None
    for i, (tid, (s, e)) in enumerate(zip(input_ids[0].tolist(), offsets, strict=True)):
        if tid in visual_ids:
            roles.append(ROLE_VISUAL)
        elif response_span is not None and s >= response_span[0] and e > s:
            if response_start is None:
                response_start = i
            # The EOS after the response belongs to the response: it is what the model must emit.
            roles.append(ROLE_RESPONSE)
        elif s >= prompt_span[0] and e <= prompt_span[1] and e > s:
            roles.append(ROLE_PROMPT)
        else:
            roles.append(ROLE_TEMPLATE)

    n_visual = roles.count(ROLE_VISUAL)
    expected = sum(t * h * w // (merge * merge) for t, h, w in grids)
    if n_visual != expected:
        raise InputError(f"tokenized {n_visual} visual tokens but the images need {expected}")

    model_inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        **pixel_inputs,
        **adapter.extra_model_inputs(input_ids, config),
    }
    if device is not None:
        model_inputs = {k: v.to(device) for k, v in model_inputs.items()}
    tokens = tuple(tokenizer.convert_ids_to_tokens(input_ids[0].tolist()))
    return PairInputs(model_inputs, tuple(roles), tokens, tuple(grids), merge, response_start)
