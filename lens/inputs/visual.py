"""What a family's image builder returns (one builder per family, named by its adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class VisualExpansion:
    """The chat text with every image placeholder expanded, and the image tensors for the model.

    Attributes:
        skeleton: The rendered chat with each image's placeholder repeated once per visual token
            (and whatever per-image scaffolding the family's processor adds).
        pixel_inputs: Model inputs from the image processor (pixel values, grids or tile metadata).
        grids: Per-image ``(t, h, w)`` patch grids, where the family has them (else ``()``).
        merge: Patches merged into one token (1 where the family does not merge).
        n_visual: The number of visual tokens the images need (checked against the tokenized text).
        token_frames: For a video expansion, the temporal index of each of its visual tokens, in
            order (empty for images).
    """

    skeleton: str
    pixel_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: tuple[tuple[int, int, int], ...] = ()
    merge: int = 1
    n_visual: int = 0
    token_frames: tuple[int, ...] = ()
