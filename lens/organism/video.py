"""The video organism's task: count the shapes that move over 4 tiny frames.

An item is a clip of :data:`N_FRAMES` RGB frames of 48x48 pixels. 1-7 shapes sit in distinct cells of
a 3x3 grid of 16-px cells (one cell = one merged vision token per temporal patch). Each shape is
*moving* or *still*: a still shape is drawn at the same place in every frame; a moving one jumps
inside its cell between every two consecutive frames (by at least :data:`MIN_STEP` px along x or y),
so the motion is visible inside every temporal patch (frames 0-1 and 2-3) as well as across them.
Colour and kind (round, square) vary but are not asked. The question asks for the number of
``moving``, ``still`` or ``total`` shapes; the answer is an integer and the reward is the image
organism's :func:`~lens.organism.task.verify`.

Every item is a pure function of ``(seed, index)``, like the image task. Items carry their frames as a
:class:`lens.video.VideoClip` (2 frames per second, so one temporal patch spans one second), which
every ``lens`` entry point takes as a video; :func:`write_dataset` also writes them as lossless FFV1
files for the JSONL reader.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from lens.errors import ConfigError
from lens.organism.task import BACKGROUND, CELL, COLOURS, KINDS, verify
from lens.video import VideoClip

FRAME_SIZE = 48
GRID = FRAME_SIZE // CELL
N_FRAMES = 4
FPS = 2
MIN_STEP = 3
"""A moving shape's centre moves by at least this many pixels (x or y) between consecutive frames."""
MAX_SHAPES = 7
VIDEO_QTYPES = ("moving", "still", "total")
VIDEO_WORDS = ("moving", "still", "move", "moves", "frame", "frames", "video")
"""Words the video organism's tokenizer adds after the image organism's vocabulary."""

HELDOUT_SEED = 23456
VALIDATION_SEED = 888
TRAIN_SEED_OFFSET = 200_000
SPLITS = {"heldout": HELDOUT_SEED, "validation": VALIDATION_SEED}

__all__ = [
    "FRAME_SIZE",
    "N_FRAMES",
    "VIDEO_QTYPES",
    "MovingShape",
    "VideoEncoder",
    "VideoSample",
    "generate",
    "heldout",
    "make_sample",
    "validation",
    "verify",
    "write_dataset",
]


@dataclass(frozen=True)
class MovingShape:
    """One shape of a clip: grid cell, colour, kind, radius and its centre in every frame."""

    row: int
    col: int
    colour: str
    kind: str
    radius: int
    centres: tuple[tuple[int, int], ...]

    @property
    def moving(self) -> bool:
        """Whether the centre changes between any two frames."""
        return len(set(self.centres)) > 1


@dataclass(frozen=True)
class VideoSample:
    """One video task item.

    Attributes:
        id: Stable identifier, ``"<split>-<index>"``.
        question: E.g. ``"how many moving shapes ?"``.
        video: The sampled clip (``[4, 48, 48, 3]`` uint8 frames at 2 fps); ``lens`` takes it as a video.
        answer: The ground-truth integer as a string.
        qtype: One of :data:`VIDEO_QTYPES`.
        shapes: The drawn shapes (ground truth for tests and analyses).
    """

    id: str
    question: str
    video: VideoClip
    answer: str
    qtype: str
    shapes: tuple[MovingShape, ...] = ()
    response: str | None = None

    @property
    def image(self) -> None:
        """No still image (video items only)."""
        return None


def question_for(qtype: str) -> str:
    """The question text for a question type."""
    return f"how many {qtype} shapes ?"


def count(shapes: Sequence[MovingShape], qtype: str) -> int:
    """Ground-truth answer for ``qtype``."""
    if qtype == "total":
        return len(shapes)
    if qtype == "moving":
        return sum(s.moving for s in shapes)
    if qtype == "still":
        return sum(not s.moving for s in shapes)
    raise ConfigError(f"unknown video question type {qtype!r}; known: {', '.join(VIDEO_QTYPES)}")


def _centres(rng: np.random.Generator, radius: int, moving: bool) -> tuple[tuple[int, int], ...]:
    """Per-frame centres inside a cell (offsets from the cell's corner); the whole shape stays inside."""
    lo, hi = radius + 1, CELL - radius  # integers() excludes hi: >= 1 px margin on both sides
    first = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
    if not moving:
        return (first,) * N_FRAMES
    out = [first]
    while len(out) < N_FRAMES:
        nxt = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
        if max(abs(nxt[0] - out[-1][0]), abs(nxt[1] - out[-1][1])) >= MIN_STEP:
            out.append(nxt)
    return tuple(out)


def render(shapes: Sequence[MovingShape]) -> np.ndarray:
    """The clip's frames, ``[N_FRAMES, 48, 48, 3]`` uint8."""
    frames = []
    for f in range(N_FRAMES):
        img = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for s in shapes:
            cx, cy = s.col * CELL + s.centres[f][0], s.row * CELL + s.centres[f][1]
            r = s.radius
            box = (cx - r, cy - r, cx + r - 1, cy + r - 1)
            if s.kind == "round":
                draw.ellipse(box, fill=COLOURS[s.colour])
            else:
                draw.rectangle(box, fill=COLOURS[s.colour])
        frames.append(np.asarray(img))
    return np.stack(frames)


def make_sample(seed: int, index: int, split: str = "item", qtype: str | None = None) -> VideoSample:
    """Item ``index`` of the stream with ``seed`` (a pure function of both).

    Args:
        seed: Stream seed.
        index: Item index in the stream.
        split: Name used in the item id.
        qtype: Force a question type; by default it is drawn uniformly.
    """
    rng = np.random.default_rng([seed, index, 7])  # 7: never the image task's stream for equal seeds
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colours = list(COLOURS)
    shapes = []
    for c in cells:
        colour = colours[int(rng.integers(len(colours)))]
        kind = KINDS[int(rng.integers(len(KINDS)))]
        radius = int(rng.integers(3, 5))
        moving = bool(rng.integers(2))
        shapes.append(MovingShape(int(c) // GRID, int(c) % GRID, colour, kind, radius,
                                  _centres(rng, radius, moving)))  # fmt: skip
    drawn = VIDEO_QTYPES[int(rng.integers(len(VIDEO_QTYPES)))]
    qtype = qtype or drawn
    clip = VideoClip(render(shapes), tuple(range(N_FRAMES)), N_FRAMES, float(FPS))
    return VideoSample(
        id=f"{split}-{index:05d}",
        question=question_for(qtype),
        video=clip,
        answer=str(count(shapes, qtype)),
        qtype=qtype,
        shapes=tuple(shapes),
    )


def generate(seed: int, n: int, split: str = "item", start: int = 0) -> list[VideoSample]:
    """Items ``start .. start+n-1`` of the stream with ``seed``."""
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    return [make_sample(seed, i, split) for i in range(start, start + n)]


def heldout(n: int = 500) -> list[VideoSample]:
    """The held-out split (seed 23456); ``heldout(k)`` is a prefix of ``heldout(m)`` for k < m."""
    return generate(HELDOUT_SEED, n, "heldout")


def validation(n: int = 256) -> list[VideoSample]:
    """The validation split (seed 888), for early stopping and RL monitoring only."""
    return generate(VALIDATION_SEED, n, "validation")


def split_samples(split: str, n: int) -> list[VideoSample]:
    """Samples of a named split (``heldout`` or ``validation``)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return generate(SPLITS[split], n, split)


# -- model inputs --------------------------------------------------------------------------------------


class VideoEncoder:
    """Fast batched encoder for video-organism prompts (equal lengths, no padding).

    The prompt is the chat template's question then one video; the single ``<|video_pad|>`` is expanded
    to ``t*h*w/4`` copies and the frames go through :func:`lens.inputs.qwen_vl.process_video`, the same
    function ``pair.encode`` uses (``tests/test_video_organism.py`` checks the two agree).
    """

    def __init__(self, tok, image_processor=None):
        from lens.organism.model import build_image_processor

        self.tok = tok
        self.ip = image_processor or build_image_processor()
        self.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
        self.image_token_id = self.video_token_id  # what the organism's GRPO step masks as visual
        self.eos_id = tok.eos_token_id
        merge = int(self.ip.merge_size)
        patch = int(self.ip.patch_size)
        temporal = int(self.ip.temporal_patch_size)
        side = FRAME_SIZE // patch
        self.grid = (N_FRAMES // temporal, side, side)
        self.n_video_tokens = self.grid[0] * side * side // (merge * merge)
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the rendered, pad-expanded prompt."""
        if question not in self._cache:
            msgs = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "video"}]}]
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            if text.count("<|video_pad|>") != 1:
                raise ConfigError("the tokenizer's chat template does not place a video")
            text = text.replace("<|video_pad|>", "<|video_pad|>" * self.n_video_tokens)
            self._cache[question] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[question]

    def response_ids(self, response: str) -> list[int]:
        """Token ids of ``response + eos``."""
        return self.tok(response + self.tok.eos_token, add_special_tokens=False)["input_ids"]

    def encode(
        self, questions: Sequence[str], videos: Sequence[VideoClip], responses: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (2 at video
        tokens), ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` and, with
        responses, ``prompt_len``."""
        from lens.inputs.qwen_vl import process_video
        from lens.video import VideoOptions

        rows = [self.prompt_ids(q) for q in questions]
        prompt_len = len(rows[0])
        if responses is not None:
            rows = [r + self.response_ids(a) for r, a in zip(rows, responses, strict=True)]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("VideoEncoder needs equal-length rows; use lens.inputs for ragged batches")
        ids = torch.tensor(rows, dtype=torch.long)
        pix, grids, seconds = [], [], []
        for clip in videos:
            flat, grid, per_grid = process_video(clip, self.ip, VideoOptions())
            pix.append(flat)
            grids.append(grid)
            seconds.append(per_grid)
        out = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == self.video_token_id).int() * 2,
            "pixel_values_videos": torch.cat(pix),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
            "second_per_grid_ts": torch.tensor(seconds),
        }
        if responses is not None:
            out["prompt_len"] = torch.tensor(prompt_len)
        return out


# -- files -----------------------------------------------------------------------------------------------


def write_video_file(path: str | os.PathLike, frames: np.ndarray, fps: int = FPS) -> None:
    """Write frames as a lossless FFV1 video (decoding gives back exactly ``frames``)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for array in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24"))
            )
        container.mux(stream.encode())


def write_dataset(out_dir: str | os.PathLike, split: str = "heldout", n: int = 500) -> Path:
    """Write a split as a JSONL dataset folder: ``data.jsonl`` plus ``videos/<id>.mkv`` (FFV1, lossless).

    Each line holds ``id``, ``question``, ``video`` (relative path), ``nframes`` (4), ``answer`` and
    ``qtype``. Built in a temporary sibling and renamed into place.
    """
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty")
    samples = split_samples(split, n)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "videos").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for s in samples:
                rel = f"videos/{s.id}.mkv"
                write_video_file(tmp / rel, s.video.frames)
                rec: dict[str, Any] = {"id": s.id, "question": s.question, "video": rel, "nframes": N_FRAMES,
                                       "answer": s.answer, "qtype": s.qtype}  # fmt: skip
                f.write(json.dumps(rec) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- training task and shipped weights ---------------------------------------------------------------------


def build_video_tokenizer():
    """The image organism's tokenizer plus :data:`VIDEO_WORDS`, with a chat template that places videos."""
    from lens.organism.model import VIDEO_CHAT_TEMPLATE, build_tokenizer

    return build_tokenizer(extra_words=VIDEO_WORDS, chat_template=VIDEO_CHAT_TEMPLATE)


TRAIN_DEFAULTS = (("sft_lr", 1e-3), ("sft_max_steps", 300), ("rl_steps", 200))
"""Where the video task trains differently from the image organism: SFT at 1e-3, not 2e-3, and 200 GRPO steps.

At 2e-3 (the image organism's rate) SFT sat on the answer prior for its whole 400-step cap (teacher-forced
validation accuracy ~0.25, one loss spike); at 1e-3 it leaves the prior after ~100 steps and passes the
0.45 early-stopping bar at ~120 (5e-4 also leaves it, ~20 steps later). The 300-step cap bounds the
training time should a seed not get there. A video GRPO step costs more than an image one (1.0-1.4 s on
one thread against the image organism's 0.83 s), so 200 steps (and 200 control updates) keep the whole run
within the 10-minute budget (482 s for seed 2 on a lightly loaded 2-core machine).
"""


def video_task():
    """The video task as the organism trainer takes it (:class:`lens.organism.train.OrganismTask`)."""
    from lens.organism.train import OrganismTask

    return OrganismTask("video", build_video_tokenizer, VideoEncoder, generate, validation, heldout,
                        HELDOUT_SEED, TRAIN_SEED_OFFSET, TRAIN_DEFAULTS)  # fmt: skip


def weights_dir() -> Path:
    """Folder of the shipped video organism (``base/``, ``rlvr/``, ``control/``, ``manifest.json``)."""
    return Path(__file__).resolve().parent / "weights_video"


def model_dir(name: str) -> Path:
    """Folder of one shipped video-organism model.

    Raises:
        ConfigError: For a name other than ``base``, ``rlvr`` or ``control``.
        CheckpointError: If its weights are not shipped.
    """
    from lens.errors import CheckpointError
    from lens.organism import MODEL_NAMES

    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown video organism model {name!r}; known: {', '.join(MODEL_NAMES)}")
    path = weights_dir() / name
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"video organism weights missing at {path}; run `lens organism train --task video --out {weights_dir()}`"
        )
    return path


def manifest() -> dict[str, Any]:
    """The shipped video organism's ``manifest.json``."""
    from lens.errors import CheckpointError

    path = weights_dir() / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"video organism manifest missing at {path}")
    return json.loads(path.read_text())


def load_pair(rlvr: str = "rlvr", **kw: Any):
    """Load the video organism's ``base`` and a twin (``rlvr``, ``control`` or a checkpoint folder):
    ``lens.load_pair("organism-video", rlvr)``. The question comes before the video
    (``image_first=False``), as in training.
    """
    from lens import organism

    return organism.load_pair(rlvr, variant="organism-video", **kw)


def load_model(name: str):
    """One shipped video-organism model with plain transformers: ``(model, tokenizer, image_processor)``."""
    from lens.organism.model import load_folder

    return load_folder(model_dir(name))
