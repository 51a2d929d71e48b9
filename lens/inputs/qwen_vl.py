"""Images and videos of the Qwen-VL families (Qwen2-VL, Qwen2.5-VL): one ``<|image_pad|>`` (or
``<|video_pad|>``) per merged patch.

The image processor cuts each image into ``t x h x w`` patches (``image_grid_thw``) and merges
``merge_size x merge_size`` of them into one language-model token, so the chat template's single
placeholder per image becomes ``t*h*w / merge²`` copies, exactly as ``Qwen2_5_VLProcessor`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from lens.errors import InputError
from lens.inputs.visual import VisualExpansion
from lens.video import VideoClip, VideoOptions


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


# -- videos ------------------------------------------------------------------------------------------


def _size_bounds(image_processor: Any) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of a Qwen-VL image processor (``size`` in transformers 5)."""
    size = getattr(image_processor, "size", None)
    lo = getattr(size, "shortest_edge", None) or getattr(image_processor, "min_pixels", None)
    hi = getattr(size, "longest_edge", None) or getattr(image_processor, "max_pixels", None)
    if isinstance(size, dict):
        lo, hi = size.get("shortest_edge", lo), size.get("longest_edge", hi)
    if not lo or not hi:
        raise InputError("the image processor names no pixel bounds (size.shortest_edge/longest_edge)")
    return int(lo), int(hi)


def process_video(
    clip: VideoClip, image_processor: Any, options: VideoOptions
) -> tuple[torch.Tensor, tuple[int, int, int], float]:
    """One clip's ``pixel_values_videos`` rows, ``(t, h, w)`` patch grid and seconds per temporal patch.

    The same steps as transformers' ``Qwen2VLVideoProcessor`` (which needs torchvision), in plain
    torch: resize every frame with ``smart_resize`` within ``[min_pixels, max_pixels]`` (bicubic with
    antialiasing on the uint8 frames, as torchvision does on the CPU), rescale and normalise in
    float32 with the fused mean/std, then cut into ``temporal x patch x patch`` patches ordered by
    merge window. The patch, merge and temporal sizes and the normalisation come from the pair's
    image processor (the video processor of a Qwen-VL checkpoint shares them).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch = int(image_processor.patch_size)
    merge = int(image_processor.merge_size)
    temporal = int(image_processor.temporal_patch_size)
    lo, hi = _size_bounds(image_processor)
    lo = options.min_pixels or lo
    hi = options.max_pixels or hi
    if lo > hi:
        raise InputError(f"video min_pixels {lo} is above max_pixels {hi}")
    video = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(0, 3, 1, 2).contiguous()  # T,C,H,W
    height, width = video.shape[-2:]
    try:
        new_h, new_w = smart_resize(height, width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    except ValueError as exc:
        raise InputError(f"video frames of {width}x{height}: {exc}") from exc
    if getattr(image_processor, "do_resize", True) and (new_h, new_w) != (height, width):
        video = torch.nn.functional.interpolate(
            video, size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=True
        )
    do_rescale = bool(getattr(image_processor, "do_rescale", True))
    do_normalize = bool(getattr(image_processor, "do_normalize", True))
    scale = float(image_processor.rescale_factor)
    if do_normalize:
        mean = torch.tensor(image_processor.image_mean)
        std = torch.tensor(image_processor.image_std)
        if do_rescale:  # fused, as the stock processor does: (x - mean/scale) / (std/scale)
            mean, std = mean * (1.0 / scale), std * (1.0 / scale)
        video = video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    elif do_rescale:
        video = video * scale
    else:
        video = video.to(torch.float32)

    if pad := -video.shape[0] % temporal:  # an odd frame count repeats the last frame
        video = torch.cat((video, video[-1:].expand(pad, -1, -1, -1)), dim=0)
    frames, channels = video.shape[0], video.shape[1]
    grid_t, grid_h, grid_w = frames // temporal, new_h // patch, new_w // patch
    patches = video.view(
        grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
    ).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    return flat, (grid_t, grid_h, grid_w), temporal / clip.sampled_fps


def expand_videos(
    skeleton: str,
    clips: Sequence[VideoClip],
    options: Sequence[VideoOptions],
    image_processor: Any,
    tokenizer: Any,
    config: Any,
) -> VisualExpansion:
    """Process ``clips`` and expand their ``<|video_pad|>`` placeholders in the rendered ``skeleton``.

    Each video becomes ``t*h*w / merge²`` pad tokens, in temporal-patch-major order, so token ``k`` of
    a video belongs to temporal patch ``k // (h*w/merge²)`` (sampled frames ``2t`` and ``2t+1``).
    The model inputs are ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts``
    (seconds per temporal patch, which sets the mRoPE time positions).

    Raises:
        InputError: The template placed another number of video slots than there are videos.
    """
    merge = int(image_processor.merge_size)
    pad = tokenizer.convert_ids_to_tokens(int(config.video_token_id))
    slots = skeleton.split(pad)
    if len(slots) - 1 != len(clips):
        raise InputError(f"the chat template placed {len(slots) - 1} video slots for {len(clips)} videos")
    rows, grids, seconds, token_frames = [], [], [], []
    expanded = slots[0]
    for clip, opts, rest in zip(clips, options, slots[1:], strict=True):
        flat, grid, per_grid = process_video(clip, image_processor, opts)
        rows.append(flat)
        grids.append(grid)
        seconds.append(per_grid)
        per_frame = grid[1] * grid[2] // (merge * merge)
        token_frames += [t for t in range(grid[0]) for _ in range(per_frame)]
        expanded += pad * (grid[0] * per_frame) + rest
    pixel_inputs = {
        "pixel_values_videos": torch.cat(rows),
        "video_grid_thw": torch.tensor(grids, dtype=torch.int64),
        "second_per_grid_ts": torch.tensor(seconds),
    }
    return VisualExpansion(
        expanded, pixel_inputs, tuple(grids), merge, len(token_frames), token_frames=tuple(token_frames)
    )
