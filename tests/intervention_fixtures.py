"""A tiny base/RLVR Qwen2.5-VL pair and one image sample, shared by the intervention tests."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lens.loading import ModelPair
from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer

PROMPT = "How many red shapes are in the image?"


def tiny_pair(num_layers: int = 4) -> ModelPair:
    torch.set_num_threads(1)
    tok, ip = tiny_tokenizer(), tiny_image_processor()
    base = tiny_qwen25vl(tok, seed=0, num_layers=num_layers)
    rlvr = tiny_qwen25vl(tok, seed=1, num_layers=num_layers)
    return ModelPair.from_models(base, rlvr, tok, ip)


def image(seed: int = 0, side: int = 112) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
