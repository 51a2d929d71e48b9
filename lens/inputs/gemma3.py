"""Images of Gemma 3 (``Gemma3Processor``): one fixed-size block of soft tokens per image.

The chat template renders ``<start_of_image>`` per image. The image processor resizes every image to
one square (896 px in the published checkpoints; no aspect-ratio tiling), the SigLIP tower makes
``(image_size / patch)²`` patch features (64 x 64), and the projector average-pools them to
``mm_tokens_per_image`` tokens (16 x 16 = 256, in raster order). ``Gemma3Processor`` replaces each
``<start_of_image>`` with ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x ``mm_tokens_per_image``
+ ``<end_of_image>\\n\\n``, which is what this builder does; the newlines and both delimiters are
template. ``token_type_ids`` come from the ids (:class:`lens.adapters.Gemma3Adapter`).

Pan-and-scan (``do_pan_and_scan``, off by default in ``Gemma3Processor`` and in the published
``preprocessor_config.json``) adds crops of elongated images with extra text around them; it is not
supported: an image processor configured with it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from lens.errors import CheckpointError, InputError
from lens.inputs.visual import VisualExpansion


def _token(tokenizer: Any, config: Any, key: str, name: str) -> str:
    """The token string of the config's ``key`` id, checked against the tokenizer's ``name`` attribute
    (what ``Gemma3Processor`` reads) when the tokenizer has one.

    Raises:
        InputError: The tokenizer names another token than the model config's id.
    """
    token = tokenizer.convert_ids_to_tokens(int(getattr(config, key)))
    named = getattr(tokenizer, name, None)
    if named is not None and named != token:
        raise InputError(
            f"the tokenizer's {name} is {named!r} but the model's {key} {getattr(config, key)} is {token!r}; "
            "this tokenizer does not match the model"
        )
    return token


def pooled_grid(config: Any) -> tuple[int, int]:
    """``(patches per side, pooling kernel)`` of the projector, checked against ``mm_tokens_per_image``.

    Raises:
        CheckpointError: The pooled grid does not give ``mm_tokens_per_image`` tokens (the model would
            refuse the inputs).
    """
    vision = config.vision_config
    patches = int(vision.image_size) // int(vision.patch_size)
    per_image = int(config.mm_tokens_per_image)
    side = math.isqrt(per_image)
    kernel = patches // side if side else 0
    if side * side != per_image or kernel < 1 or (patches // kernel) ** 2 != per_image:
        raise CheckpointError(
            f"mm_tokens_per_image is {per_image} but a {vision.image_size} px image with {vision.patch_size} px "
            f"patches ({patches} x {patches}) cannot be pooled to that many tokens"
        )
    return patches, kernel


def expand_images(
    skeleton: str, images: Sequence[Image.Image], image_processor: Any, tokenizer: Any, config: Any
) -> VisualExpansion:
    """Process ``images`` and expand their ``<start_of_image>`` placeholders in the rendered chat ``skeleton``.

    Raises:
        InputError: The template placed another number of placeholders than there are images, the
            tokenizer does not match the model, or the image processor has pan-and-scan on.
        CheckpointError: Image processor and vision tower disagree on the image size.
    """
    boi = _token(tokenizer, config, "boi_token_id", "boi_token")
    eoi = _token(tokenizer, config, "eoi_token_id", "eoi_token")
    soft = _token(tokenizer, config, "image_token_id", "image_token")
    slots = skeleton.split(boi)
    if len(slots) - 1 != len(images):
        raise InputError(f"the chat template placed {len(slots) - 1} image slots for {len(images)} images")
    if getattr(image_processor, "do_pan_and_scan", None):
        raise InputError(
            "the image processor has do_pan_and_scan on; Gemma 3 pan-and-scan crops are not supported "
            "(set it to false in preprocessor_config.json, the published default)"
        )
    patches, kernel = pooled_grid(config)
    processed = image_processor(images=list(images), do_pan_and_scan=False, return_tensors="pt")
    pixel_values = processed["pixel_values"]
    size = int(config.vision_config.image_size)
    if tuple(pixel_values.shape[-2:]) != (size, size):
        raise CheckpointError(
            f"the image processor makes {tuple(pixel_values.shape[-2:])} px images but the vision tower "
            f"takes {size} px"
        )
    per_image = int(config.mm_tokens_per_image)
    block = f"\n\n{boi}{soft * per_image}{eoi}\n\n"
    expanded = slots[0] + "".join(block + rest for rest in slots[1:])
    grids = ((1, patches, patches),) * len(images)
    return VisualExpansion(expanded, {"pixel_values": pixel_values}, grids, kernel, per_image * len(images))
