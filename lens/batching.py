"""Several samples' :class:`~lens.inputs.PairInputs` as one left-padded batch.

Left padding keeps every row's last prompt token at the same index, so one ``generate`` call
decodes all rows. Per-token tensors (``input_ids``, ``attention_mask``, ``mm_token_type_ids``) are
padded on the left; per-image tensors (``pixel_values``, ``image_grid_thw``, video ones) are
concatenated in row order, which is how the Qwen-VL models expect a batch. The attention mask marks
the padding, and transformers' Qwen2.5-VL ``get_rope_index`` computes each row's 3-D mRoPE positions
from its unpadded tokens only (and the decode positions from the mask), so a row's positions are the
ones it has alone.

Position ``p`` of sample ``i`` sits at ``batch.pads[i] + p`` in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lens.errors import InputError
from lens.inputs import PairInputs

#: Per-token inputs and the value that pads them (``None``: the pad token id).
TOKEN_KEYS: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}
#: Per-image (or per-video, or per-sample) inputs, concatenated along the first dimension in row
#: order; where their other dimensions differ (LLaVA-OneVision's tiles per image), each is
#: zero-padded at the end to the largest, as the image processor pads a batch.
VISUAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "image_sizes",
    "batch_num_images",
)


@dataclass(frozen=True)
class Batch:
    """A left-padded batch of samples.

    Attributes:
        model_inputs: Keyword arguments for ``model(**model_inputs)`` / ``generate``.
        pads: Padding positions in front of each row.
        lengths: Each sample's own token count.
    """

    model_inputs: dict[str, torch.Tensor]
    pads: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        """The padded length."""
        return int(self.model_inputs["input_ids"].shape[1])

    def shift(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        """Positions of sample ``row`` as positions in the batch."""
        return positions + self.pads[row]


def collate(samples: Sequence[PairInputs], pad_token_id: int) -> Batch:
    """Left-pad and stack ``samples`` (each a batch of one) into one batch.

    Args:
        samples: The samples, in row order.
        pad_token_id: Id placed in the padding (masked out by the attention mask).

    Raises:
        InputError: No samples, a sample that is not a batch of one, an input this module does
            not know how to batch, or a per-token input present in some samples only.
    """
    if not samples:
        raise InputError("no samples to batch")
    keys = [set(s.model_inputs) for s in samples]
    unknown = set().union(*keys) - set(TOKEN_KEYS) - set(VISUAL_KEYS)
    if unknown:
        raise InputError(f"cannot batch the model inputs {sorted(unknown)}")
    for s in samples:
        if s.input_ids.dim() != 2 or s.input_ids.shape[0] != 1:
            raise InputError(
                f"each sample must be a batch of one, got input_ids of shape {tuple(s.input_ids.shape)}"
            )
    lengths = tuple(s.n_tokens for s in samples)
    width = max(lengths)
    pads = tuple(width - n for n in lengths)
    out: dict[str, torch.Tensor] = {}
    for key, fill in TOKEN_KEYS.items():
        present = [key in k for k in keys]
        if not any(present):
            continue
        if not all(present):
            raise InputError(f"{key} is present in some samples only; they cannot share a batch")
        rows = []
        for sample, pad in zip(samples, pads, strict=True):
            value = sample.model_inputs[key]
            head = value.new_full((1, pad), pad_token_id if fill is None else fill)
            rows.append(torch.cat([head, value], dim=1))
        out[key] = torch.cat(rows)
    for key in VISUAL_KEYS:
        parts = [s.model_inputs[key] for s in samples if key in s.model_inputs]
        if parts:
            out[key] = torch.cat(_pad_trailing(parts))
    return Batch(out, pads, lengths)


def _pad_trailing(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad every dimension but the first to the largest among ``parts`` (a no-op when equal)."""
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) <= 1:
        return parts
    if len({p.dim() for p in parts}) != 1:
        raise InputError(f"per-image inputs of different ranks cannot share a batch: {sorted(shapes)}")
    widest = [max(sizes) for sizes in zip(*shapes, strict=True)]
    padded = []
    for part in parts:
        pad: list[int] = []
        for size, target in zip(reversed(part.shape[1:]), reversed(widest), strict=True):
            pad += [0, target - size]
        padded.append(torch.nn.functional.pad(part, pad))
    return padded
