"""The study's input noise: pixel or layer-0 visual-embedding Gaussian noise on the RLVR model.

One ``ε`` per (seed, sample, noise kind), so every σ and both answers see the same draw.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from analyses.perturb_config import NOISE_KINDS
from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs
from lens.interventions.base import edit_input


def noise_generator(seed: int, sample_id: str, kind: str) -> torch.Generator:
    """A generator seeded by (seed, sample, kind): the same ε whatever the run order or subset."""
    digest = zlib.crc32(f"{seed}\x1f{sample_id}\x1f{kind}".encode())
    return torch.Generator().manual_seed(digest)


def pixel_noised(model_inputs: dict[str, torch.Tensor], sigma: float, eps: torch.Tensor) -> dict[str, Any]:
    """A copy of ``model_inputs`` with ``pixel_values + σ · std(pixel_values) · ε``."""
    if "pixel_values" not in model_inputs:
        raise InputError("pixel noise needs an image; the inputs have no pixel_values")
    if sigma == 0:
        return model_inputs
    pixels = model_inputs["pixel_values"]
    scale = sigma * pixels.float().std()
    noisy = (pixels.float() + scale * eps.to(pixels.device)).to(pixels.dtype)
    return {**model_inputs, "pixel_values": noisy}


@contextmanager
def embedding_noise(
    model: nn.Module,
    adapter: Any,
    visual_positions: torch.Tensor,
    sigma: float,
    eps: torch.Tensor,
) -> Iterator[dict[str, float]]:
    """Add ``σ · RMS · ε`` to the input of decoder layer 0 at ``visual_positions``, within the block.

    The hook is a plain forward pre-hook on layer 0 and is removed on exit, also on error. It acts
    on the prefill only: a decode step (one position) is left alone.

    Args:
        model: The model to perturb.
        adapter: Its family adapter.
        visual_positions: Positions of the visual tokens.
        sigma: Magnitude, in units of the clean visual embeddings' RMS.
        eps: Standard normal noise, ``[n_visual, hidden]``.

    Yields:
        A dict that receives ``rms`` (the clean visual RMS) once the forward has run.
    """
    info: dict[str, float] = {}
    layer0 = adapter.layers(model)[0]
    positions = visual_positions.long()

    def add_noise(hidden: torch.Tensor) -> torch.Tensor | None:
        if sigma == 0 or hidden.shape[1] <= int(positions.max()):
            return None  # clean run, or a decode step
        pos = positions.to(hidden.device)
        visual = hidden[0, pos].float()
        rms = visual.pow(2).mean().sqrt()
        info["rms"] = float(rms)
        noisy = hidden.clone()
        noisy[0, pos] = (visual + sigma * rms * eps.to(hidden.device)).to(hidden.dtype)
        return noisy

    handle = edit_input(layer0, add_noise)
    try:
        yield info
    finally:
        handle.remove()


@contextmanager
def perturbed(
    pair: Any, inputs: PairInputs, kind: str, sigma: float, eps: torch.Tensor
) -> Iterator[dict[str, torch.Tensor]]:
    """The RLVR model inputs under noise ``kind`` of magnitude ``sigma`` (hooks removed on exit)."""
    if kind == "pixel":
        yield pixel_noised(inputs.model_inputs, sigma, eps)
    elif kind == "embedding":
        with embedding_noise(pair.rlvr, pair.adapter, inputs.visual_positions, sigma, eps):
            yield inputs.model_inputs
    else:
        raise ConfigError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")


def draw_eps(pair: Any, inputs: PairInputs, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Standard normal ε of the right shape for ``kind`` (pixel tensor or visual embeddings)."""
    if kind == "pixel":
        if "pixel_values" not in inputs.model_inputs:
            raise InputError("pixel noise needs an image; the inputs have no pixel_values")
        shape = tuple(inputs.model_inputs["pixel_values"].shape)
    else:
        shape = (len(inputs.visual_positions), pair.adapter.hidden_size(pair.config))
    return torch.randn(shape, generator=generator, dtype=torch.float32)
