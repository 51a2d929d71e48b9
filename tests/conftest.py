"""Shared fixtures: tiny real models built from a config, saved to a temporary folder, loaded
through ``lens.load_pair``. Everything is offline and single-threaded (the test machine is shared).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

from lens import load_pair  # noqa: E402
from lens.testing import (  # noqa: E402
    save_checkpoint,
    tiny_causal_lm,
    tiny_image_processor,
    tiny_qwen25vl,
    tiny_tokenizer,
)

PROMPT = "How many red shapes are in the image?"
RESPONSE = "Let me think step by step. The answer is 42."


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def image_processor():
    return tiny_image_processor()


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def vl_dirs(ckpt_root, tok, image_processor) -> tuple[Path, Path]:
    """A tiny Qwen2.5-VL base (seed 0) and RLVR twin (seed 1)."""
    base = save_checkpoint(tiny_qwen25vl(tok, seed=0), tok, ckpt_root / "vl_base", image_processor)
    rlvr = save_checkpoint(tiny_qwen25vl(tok, seed=1), tok, ckpt_root / "vl_rlvr", image_processor)
    return base, rlvr


@pytest.fixture(scope="session")
def lm_dirs(ckpt_root, tok) -> tuple[Path, Path]:
    """A tiny text-only Qwen2 causal LM pair."""
    base = save_checkpoint(tiny_causal_lm(tok, seed=0), tok, ckpt_root / "lm_base")
    rlvr = save_checkpoint(tiny_causal_lm(tok, seed=1), tok, ckpt_root / "lm_rlvr")
    return base, rlvr


@pytest.fixture(scope="session")
def vl_pair(vl_dirs):
    return load_pair(*vl_dirs)


@pytest.fixture(scope="session")
def lm_pair(lm_dirs):
    return load_pair(*lm_dirs)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def image() -> Image.Image:
    """112 x 84 px: a (1, 8, 6) patch grid, 12 visual tokens after the 2 x 2 merge."""
    return random_image(112, 84)


@pytest.fixture(scope="session")
def vl_inputs(vl_pair, image):
    return vl_pair.encode(PROMPT, [image], response=RESPONSE)


@pytest.fixture(scope="session")
def lm_inputs(lm_pair):
    return lm_pair.encode(PROMPT, response=RESPONSE)


def write_dataset(folder: Path, rows: Iterable[dict | str], name: str = "data.jsonl") -> Path:
    """Write a JSONL dataset (dict rows are dumped, str rows written verbatim) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """``make_dataset(n)``: ``n`` multimodal samples with distinct images, in ``tmp_path/data``."""

    def make(n: int = 4, text_only: bool = False) -> Path:
        folder = tmp_path / "data"
        folder.mkdir(exist_ok=True)
        rows = []
        for i in range(n):
            row = {"id": f"s{i}", "question": f"{PROMPT} Item {i}.", "response": RESPONSE}
            if not text_only:
                random_image(56 + 28 * (i % 2), 84, seed=i).save(folder / f"img{i}.png")
                row["image"] = f"img{i}.png"
            rows.append(row)
        return write_dataset(folder, rows)

    return make
