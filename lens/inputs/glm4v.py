"""Images of GLM-4.1V and GLM-4.5V: one ``<|image|>`` per merged patch, inside the template's
``<|begin_of_image|>`` ... ``<|end_of_image|>``.

``Glm4vImageProcessor`` resizes each image to a multiple of ``patch_size * merge_size`` within its
pixel budget, cuts it into ``1 x h x w`` patches (``image_grid_thw``; a still image is one temporal
patch) and the vision tower merges ``merge_size x merge_size`` patches into one language-model
token. ``Glm4vProcessor`` therefore replaces the chat template's single ``<|image|>`` per image by
``t*h*w / merge²`` copies and leaves the begin/end-of-image delimiters as they are; so do we.
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
    """Process ``images`` and expand their ``<|image|>`` placeholders in the rendered chat ``skeleton``.

    Raises:
        InputError: The template placed another number of image placeholders than there are images.
    """
    processed = image_processor(images=list(images), return_tensors="pt")
    pixel_inputs = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
    grids = tuple(tuple(int(x) for x in g) for g in processed["image_grid_thw"])
    merge = int(image_processor.merge_size)
    placeholder = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    slots = skeleton.split(placeholder)
    if len(slots) - 1 != len(grids):
        raise InputError(f"the chat template placed {len(slots) - 1} image slots for {len(grids)} images")
    counts = [t * h * w // (merge * merge) for t, h, w in grids]
    expanded = slots[0] + "".join(placeholder * n + rest for n, rest in zip(counts, slots[1:], strict=True))
    return VisualExpansion(expanded, pixel_inputs, grids, merge, sum(counts))
