"""Opt-in caption stage of the image organism: each visual token learns to name its cell.

The shipped organism's visual tokens are never supervised (SFT and GRPO put loss on the answer only), so
their logit-lens readouts stay near-uniform and Activation Replay's τ·max mask selects nothing. This
stage, run before SFT when ``TrainConfig.caption_steps > 0``, trains the model's output at each visual
token whose 16-px cell holds a shape towards a two-word caption of that cell: half its colour word, half
its kind word (``red``/``round``...). Empty cells get no loss. With tied embeddings
(``TinyConfig.tie_word_embeddings``) the cheapest way to emit a word is to carry that word's embedding,
so the readout becomes peaked from the first layers on: the way real MLLMs' visual tokens read out as
object words. Labels are read off the pixels (every shape is one exact colour on a fixed background),
so no task metadata is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lens.organism.task import BACKGROUND, CELL, COLOURS, GRID

_RGB_TO_COLOUR = {tuple(rgb): name for name, rgb in COLOURS.items()}


def cell_words(image: Image.Image) -> list[tuple[str, str] | None]:
    """``(colour, kind)`` of the shape in each cell, raster order, or ``None`` for an empty cell.

    A square fills its bounding box exactly; a disc (drawn without anti-aliasing) never does.

    Raises:
        ValueError: The image is not a 64x64 organism image (wrong size, or a pixel of unknown colour).
    """
    x = np.asarray(image.convert("RGB")).astype(np.int16)
    if x.shape[:2] != (GRID * CELL, GRID * CELL):
        raise ValueError(
            f"cell_words expects a {GRID * CELL}x{GRID * CELL} organism image, got {x.shape[:2]}"
        )
    words: list[tuple[str, str] | None] = []
    for row in range(GRID):
        for col in range(GRID):
            cell = x[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
            fg = (cell != np.asarray(BACKGROUND)).any(-1)
            if not fg.any():
                words.append(None)
                continue
            colours = {tuple(int(v) for v in px) for px in cell[fg]}
            if len(colours) != 1 or next(iter(colours)) not in _RGB_TO_COLOUR:
                raise ValueError(f"cell ({row}, {col}) is not one organism shape colour: {sorted(colours)}")
            ys, xs = np.nonzero(fg)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            words.append((_RGB_TO_COLOUR[next(iter(colours))], "square" if fg.sum() == box else "round"))
    return words


def caption_targets(tok, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target distributions over the vocabulary for every visual token of a batch.

    Returns:
        ``(target, keep)``: ``target`` ``[len(images) * 16, vocab]`` (0.5 on the colour word, 0.5 on the
        kind word) and ``keep`` ``[len(images) * 16]`` bool, True where the cell holds a shape.
    """
    n_cells = GRID * GRID
    target = torch.zeros(len(images) * n_cells, len(tok))
    keep = torch.zeros(len(images) * n_cells, dtype=torch.bool)
    for i, image in enumerate(images):
        for j, words in enumerate(cell_words(image)):
            if words is not None:
                row = i * n_cells + j
                for word in words:
                    target[row, tok.convert_tokens_to_ids(word)] = 0.5
                keep[row] = True
    return target, keep


def caption_loss(model, enc, samples: Sequence) -> torch.Tensor:
    """Cross-entropy of the model's output at occupied cells' visual tokens against their captions.

    Args:
        model: The organism model.
        enc: Its :class:`lens.organism.model.Encoder` (prompts are question then image).
        samples: Image task items.
    """
    images = [s.image for s in samples]
    batch = enc.encode([s.question for s in samples], images)
    visual = batch["input_ids"] == enc.image_token_id  # raster order within each item, items in order
    logits = model(**batch).logits[visual]
    target, keep = caption_targets(enc.tok, images)
    if not keep.any():
        return logits.sum() * 0.0  # a batch of empty images (never drawn: items have >= 1 shape)
    logp = torch.log_softmax(logits[keep].float(), dim=-1)
    return -(target[keep] * logp).sum(-1).mean()
