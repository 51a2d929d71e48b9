"""Images of InternVL 3 / 3.5 in the transformers-native format (``InternVLProcessor``).

The chat template renders one ``<IMG_CONTEXT>`` per image. The image processor
(``GotOcr2ImageProcessor``) cuts each image into dynamic tiles: the grid of at most ``max_patches``
tiles whose aspect ratio is closest to the image's, plus a thumbnail of the whole image when there
is more than one tile. Each tile becomes ``image_seq_length`` tokens (256 for 448-px tiles: 32 x 32
ViT patches, pixel-shuffled by 0.5), so the placeholder becomes
``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``, exactly as
``InternVLProcessor`` does. ``pixel_values`` holds every tile of every image in order
(``[total tiles, 3, tile, tile]``); the model needs nothing else (its positions are 1-D).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from lens.errors import InputError
from lens.inputs.visual import VisualExpansion


def _delimiters(tokenizer: Any, config: Any) -> tuple[str, str]:
    """The ``<img>`` and ``</img>`` strings, checked against the ids the adapter names.

    Raises:
        InputError: The tokenizer's delimiters are not the two ids before ``<IMG_CONTEXT>``.
    """
    start = getattr(tokenizer, "start_image_token", None) or "<img>"
    end = getattr(tokenizer, "end_image_token", None) or "</img>"
    context_id = int(config.image_token_id)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in (start, end))
    if ids != (context_id - 2, context_id - 1):
        raise InputError(
            f"the tokenizer's {start}/{end} ids are {ids}, but InternVL checkpoints put them just before "
            f"<IMG_CONTEXT> ({context_id - 2}, {context_id - 1}); this tokenizer does not match the model"
        )
    return start, end


def _tokens_per_tile(config: Any, tile_shape: Sequence[int]) -> int:
    """``image_seq_length``, checked against what the vision tower makes of a tile of this size.

    Raises:
        InputError: The config's ``image_seq_length`` disagrees with the tile size, the ViT patch
            and the pixel-shuffle ratio (the model would refuse the inputs).
    """
    per_tile = int(config.image_seq_length)
    patch = config.vision_config.patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
    height, width = int(tile_shape[-2]), int(tile_shape[-1])
    made = round((height // patch_h) * (width // patch_w) * float(config.downsample_ratio) ** 2)
    if made != per_tile:
        raise InputError(
            f"image_seq_length is {per_tile} but a {height}x{width} tile gives {made} visual tokens "
            f"(patch {patch_h}x{patch_w}, downsample_ratio {config.downsample_ratio}); "
            "the image processor's tile size does not match the model"
        )
    return per_tile


def expand_images(
    skeleton: str, images: Sequence[Image.Image], image_processor: Any, tokenizer: Any, config: Any
) -> VisualExpansion:
    """Tile ``images`` and expand their ``<IMG_CONTEXT>`` placeholders in the rendered chat ``skeleton``.

    ``crop_to_patches=True`` is passed as ``InternVLProcessor`` does (the published
    ``preprocessor_config.json`` leaves it off; the processor's own default turns it on).

    Raises:
        InputError: The template placed another number of placeholders than there are images, or
            the tokenizer, image processor and config disagree (see the helpers above).
    """
    context = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    slots = skeleton.split(context)
    if len(slots) - 1 != len(images):
        raise InputError(f"the chat template placed {len(slots) - 1} image slots for {len(images)} images")
    start, end = _delimiters(tokenizer, config)
    processed = image_processor(images=list(images), crop_to_patches=True, return_tensors="pt")
    pixel_values = processed["pixel_values"]
    tiles = [int(n) for n in processed["num_patches"]]
    per_tile = _tokens_per_tile(config, pixel_values.shape)
    expanded = slots[0]
    for count, rest in zip(tiles, slots[1:], strict=True):
        expanded += start + context * (per_tile * count) + end + rest
    return VisualExpansion(expanded, {"pixel_values": pixel_values}, (), 1, per_tile * sum(tiles))
