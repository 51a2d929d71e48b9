"""Images of the Qwen-VL families (Qwen2-VL, Qwen2.5-VL): one ``<|image_pad|>`` per merged patch.

The image processor cuts each image into ``t x h x w`` patches (``image_grid_thw``) and merges
``merge_size x merge_size`` of them into one language-model token, so the chat template's single
placeholder per image becomes ``t*h*w / merge²`` copies, exactly as ``Qwen2_5_VLProcessor`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from lens.errors import InputError
from lens.inputs.visual import VisualExpansion


def expand_images(
    skeleton: str, images: Sequence[Image.Image], image_processor: Any, tokenizer: Any, config: Any
) -> VisualExpansion:
    """Process ``images`` and expand their placeholders in the rendered chat ``skeleton``.

    Raises:
        InputError: The template placed another number of placeholders than there are images.
    """
    processed = image_processor(images=list(images), return_tensors="pt")
    pixel_inputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
    grids = [tuple(int(x) for x in g) for g in processed["image_grid_thw"]]
    merge = int(getattr(image_processor, "merge_size", 1))
    pad = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    slots = skeleton.split(pad)
    if len(slots) - 1 != len(grids):
        raise InputError(f"the chat template placed {len(slots) - 1} image slots for {len(grids)} images")
    expanded = slots[0]
    counts = [t * h * w // (merge * merge) for t, h, w in grids]
    for count, rest in zip(counts, slots[1:], strict=True):
        expanded += pad * count + rest
    return VisualExpansion(expanded, pixel_inputs, tuple(grids), merge, sum(counts))
