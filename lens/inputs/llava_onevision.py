"""Images of LLaVA-OneVision: one ``<image>`` placeholder becomes every feature the image gives.

The image processor turns an image into tiles of ``t x t`` pixels (``t`` = the vision tower's
``image_size``; 384 in the published checkpoints), each giving ``f x f`` features (``f = t / patch``;
27 x 27 = 729). What one image contributes depends on how many images the chat holds
(``batch_num_images``), exactly as ``LlavaOnevisionProcessor`` counts it:

- **one image** ("anyres"): a base tile (the whole image resized, ``f²`` features), then a grid of
  tiles covering the image at the best of ``image_grid_pinpoints``; the model lays the grid's
  features out as one ``(rows·f) x (cols·f)`` map, cuts away the rows or columns that are padding
  (the image was letterboxed into the pinpoint), bilinearly shrinks the map when it holds more than
  ``1.1²`` times the ``anyres_max_N`` budget of ``N·f²`` features, and appends one learned newline
  vector after each map row. Tokens = ``f²`` + rows·cols + rows (of the final map);
- **several images**: each is padded to a square and becomes one tile: ``f²`` features plus one
  newline vector.

With ``vision_feature_select_strategy="default"`` the processor counts one token fewer per image.

Every one of these positions holds an ``<image>`` token in ``input_ids`` and is a visual token for
replay-lens (base features, grid features and newline vectors alike: none of them is text). The
tokens are not one uniform grid, so ``grids`` is left empty.

The settings the count needs are read from the model config (the model checks its features against
the placeholders, so the config is what must agree): features per tile from ``vision_config``,
``vision_feature_select_strategy`` and ``vision_aspect_ratio``; the pinpoints are the image
processor's (it tiles the image), and must equal the config's (the model re-derives the grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image

from lens.errors import CheckpointError, InputError
from lens.inputs.visual import VisualExpansion


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` an image is tiled at: the one that keeps the most of its
    pixels once scaled to fit inside (never counting more than the original has), the least
    padding among equals, the first listed among exact ties."""
    best, best_kept, best_waste = None, -1, math.inf
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = target_h * target_w - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(target_h), int(target_w)), kept, waste
    if best is None:
        raise CheckpointError("the image processor has no image_grid_pinpoints")
    return best


def anyres_tokens(
    height: int, width: int, tile: int, side: int, pinpoints: Sequence[Sequence[int]], max_tiles: int
) -> int:
    """Tokens of one image processed alone: base tile + unpadded (and possibly shrunk) grid + newlines.

    Args:
        height: The original image height in pixels.
        width: The original image width in pixels.
        tile: Tile side in pixels (the processed ``pixel_values`` height and width).
        side: Features per tile side (``image_size // patch_size`` of the vision tower).
        pinpoints: The image processor's ``image_grid_pinpoints``.
        max_tiles: ``N`` of ``anyres_max_N``.
    """
    grid_h, grid_w = best_resolution(height, width, pinpoints)
    rows, cols = side * (grid_h // tile), side * (grid_w // tile)
    # The image was scaled to fit the pinpoint and centred; drop the feature rows (or columns)
    # that only saw the padding, rounding the scaled size as the processor does.
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    ratio = math.sqrt(rows * cols / (max_tiles * side * side))
    if ratio > 1.1:  # the map is shrunk to about max_tiles tiles' worth of features
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols + rows


def _max_tiles(vision_aspect_ratio: str) -> int:
    digits = str(vision_aspect_ratio).removeprefix("anyres_max_")
    if not digits.isdigit():
        raise CheckpointError(
            f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_N'"
        )
    return int(digits)


def image_token_counts(
    sizes: Sequence[tuple[int, int]], tile: int, image_processor: Any, config: Any
) -> list[int]:
    """The number of ``<image>`` tokens of each image of one chat, in order.

    Args:
        sizes: Original ``(height, width)`` of each image.
        tile: Tile side in pixels of the processed images.
        image_processor: The image processor (its ``image_grid_pinpoints``).
        config: The model config.
    """
    vision = config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    drop = 1 if config.vision_feature_select_strategy == "default" else 0
    if len(sizes) != 1:
        return [side * side + 1 - drop] * len(sizes)
    pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
    if pinpoints != [list(p) for p in config.image_grid_pinpoints]:
        raise CheckpointError(
            "the image processor's image_grid_pinpoints differ from the model config's; "
            "the model would lay the tiles out on another grid"
        )
    (height, width), max_tiles = sizes[0], _max_tiles(config.vision_aspect_ratio)
    return [anyres_tokens(height, width, tile, side, pinpoints, max_tiles) - drop]


def expand_images(
    skeleton: str, images: Sequence[Image.Image], image_processor: Any, tokenizer: Any, config: Any
) -> VisualExpansion:
    """Process the chat's ``images`` and expand their placeholders in the rendered chat ``skeleton``.

    The images of one chat are one sample's images (``batch_num_images = [len(images)]``), as
    ``LlavaOnevisionProcessor.apply_chat_template`` passes them: one image is tiled (anyres),
    several are not.

    Raises:
        InputError: The template placed another number of placeholders than there are images.
        CheckpointError: Image processor and model config disagree on the tiling.
    """
    processed = image_processor(images=[list(images)], return_tensors="pt")
    pixel_inputs = {key: processed[key] for key in ("pixel_values", "image_sizes", "batch_num_images")}
    pixel_values = processed["pixel_values"]
    tile = int(pixel_values.shape[-1])
    if int(pixel_values.shape[-2]) != tile or tile != int(config.vision_config.image_size):
        raise CheckpointError(
            f"the image processor makes {tuple(pixel_values.shape[-2:])} px tiles but the vision tower "
            f"takes {config.vision_config.image_size} px"
        )
    sizes = [(int(h), int(w)) for h, w in processed["image_sizes"].tolist()]
    counts = image_token_counts(sizes, tile, image_processor, config)
    placeholder = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    slots = skeleton.split(placeholder)
    if len(slots) - 1 != len(images):
        raise InputError(f"the chat template placed {len(slots) - 1} image slots for {len(images)} images")
    expanded = slots[0]
    for count, rest in zip(counts, slots[1:], strict=True):
        expanded += placeholder * count + rest
    return VisualExpansion(expanded, pixel_inputs, (), 1, sum(counts))
