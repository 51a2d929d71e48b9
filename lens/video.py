"""Video files: read with PyAV, frames sampled as Qwen's video pipeline samples them.

Sampling follows ``qwen_vl_utils.fetch_video`` (what Video-R1 and the released replay code use):

- ``nframes``: rounded to a multiple of 2 (the temporal patch), taken uniformly over the whole
  video at ``linspace(0, total - 1, nframes).round()``;
- ``fps`` (default 2.0 when neither is given): ``total / video_fps * fps`` frames, clamped to
  ``[4, min(768, total)]`` and floored to a multiple of 2, taken the same way;
- the sampled clip's frame rate is ``nframes / total * video_fps`` (this sets the mRoPE time
  positions through ``second_per_grid_ts = temporal_patch_size / sampled_fps``).

PyAV (FFmpeg's libraries, wheels with FFmpeg bundled) decodes every container and codec FFmpeg
does, on every platform, and is what transformers itself uses by default; decord is unmaintained
(no wheels for recent Pythons or macOS arm64) and torchvision's video reader is deprecated and needs
torchvision, which replay-lens does not require.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lens.errors import InputError

#: Frames are sampled in multiples of this (Qwen's temporal patch size).
FRAME_FACTOR = 2
#: ``qwen_vl_utils`` defaults for fps-based sampling.
DEFAULT_FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768


@dataclass(frozen=True)
class VideoOptions:
    """How a video is sampled and sized; ``None`` leaves a choice to the run default or the pair.

    Attributes:
        nframes: Frames to sample uniformly (at least 2; rounded to a multiple of 2). Exclusive with
            ``fps``.
        fps: Frames per second of video to sample (default 2.0 when neither is given).
        max_pixels: Upper bound on the pixels of each frame after resizing (Video-R1: 200,704);
            default: the pair's image processor's ``max_pixels``.
        min_pixels: Lower bound on the pixels of each frame; default: the image processor's.
    """

    nframes: int | None = None
    fps: float | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise InputError(problem)

    def problem(self) -> str | None:
        """Why these options are invalid, or ``None``."""
        if self.nframes is not None and self.fps is not None:
            return "give a video's 'nframes' or its 'fps', not both"
        if self.nframes is not None and (
            isinstance(self.nframes, bool) or not isinstance(self.nframes, int) or self.nframes < FRAME_FACTOR
        ):
            return f"'nframes' must be an integer >= {FRAME_FACTOR}, got {self.nframes!r}"
        if self.fps is not None and (
            isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0
        ):
            return f"'fps' must be a positive number, got {self.fps!r}"
        for name in ("max_pixels", "min_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                return f"{name!r} must be a positive integer, got {value!r}"
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            return f"'min_pixels' ({self.min_pixels}) is above 'max_pixels' ({self.max_pixels})"
        return None

    def over(self, defaults: VideoOptions | None) -> VideoOptions:
        """These options, with ``defaults`` filling the ones left ``None`` (an item's own sampling
        choice, ``nframes`` or ``fps``, wins whole over the run's)."""
        if defaults is None:
            return self
        sampling_set = self.nframes is not None or self.fps is not None
        return VideoOptions(
            nframes=self.nframes if sampling_set else defaults.nframes,
            fps=self.fps if sampling_set else defaults.fps,
            max_pixels=self.max_pixels if self.max_pixels is not None else defaults.max_pixels,
            min_pixels=self.min_pixels if self.min_pixels is not None else defaults.min_pixels,
        )


@dataclass(frozen=True)
class VideoInfo:
    """What a container says about its first video stream (no frame decoded)."""

    total_frames: int
    fps: float
    height: int
    width: int


@dataclass(frozen=True)
class VideoClip:
    """Decoded, sampled frames of one video, before any resizing.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB frames, in time order.
        indices: Index of each sampled frame in the decoded video.
        total_frames: Frames in the video.
        video_fps: The video's average frame rate.
        options: The options the clip was sampled with (``max_pixels``/``min_pixels`` apply later).
    """

    frames: np.ndarray
    indices: tuple[int, ...]
    total_frames: int
    video_fps: float
    options: VideoOptions = VideoOptions()

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled clip (``qwen_vl_utils``' ``sample_fps``)."""
        return len(self.indices) / max(self.total_frames, 1e-6) * self.video_fps


def _open(path: Path):  # noqa: ANN202 - av types are optional at import time
    import av

    if not path.is_file():
        raise InputError(f"video not found: {path}")
    try:
        container = av.open(str(path))
    except av.EOFError as exc:  # a header and nothing after it
        raise InputError(f"empty video {path}: no frames (or the file is cut short)") from exc
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise InputError(f"unreadable video {path}: {exc}".splitlines()[0]) from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"unreadable video {path}: no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and size of a video, from its packets (nothing is decoded).

    Raises:
        InputError: A missing or unreadable file, no video stream, or an empty video (no frames).
    """
    import av

    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        # The header's frame count is missing or wrong for some containers: count the packets.
        total = 0
        try:
            for packet in container.demux(stream):
                total += bool(packet.size)
        except av.EOFError:  # a container cut short, or one with a header and no frames
            pass
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        height, width = int(stream.codec_context.height), int(stream.codec_context.width)
    except av.FFmpegError as exc:
        raise InputError(f"unreadable video {path}: {exc}".splitlines()[0]) from exc
    finally:
        container.close()
    if total < 1:
        raise InputError(f"empty video {path}: no frames")
    if not fps > 0:
        raise InputError(f"video {path} has no frame rate")
    return VideoInfo(total, fps, height, width)


def sample_indices(total_frames: int, video_fps: float, options: VideoOptions) -> tuple[int, ...]:
    """Which frames to take, as ``qwen_vl_utils`` takes them (see the module docstring).

    Raises:
        InputError: Fewer than 2 frames would be sampled, or more than the video has.
    """
    if options.nframes is not None:
        nframes = round(options.nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = options.fps if options.fps is not None else DEFAULT_FPS
        min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        max_frames = math.floor(min(FPS_MAX_FRAMES, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        wanted = total_frames / video_fps * fps
        nframes = (
            math.floor(min(max(wanted, min_frames), max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        )
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise InputError(
            f"cannot sample {nframes} frames from a video of {total_frames} "
            f"(the count must be in [{FRAME_FACTOR}, {total_frames}])"
        )
    return tuple(int(i) for i in np.rint(np.linspace(0, total_frames - 1, nframes)))


def read_video(path: str | Path, options: VideoOptions | None = None) -> VideoClip:
    """Decode a video and sample its frames.

    Args:
        path: The video file (any container and codec FFmpeg reads).
        options: Sampling options (``nframes`` or ``fps``); default: 2 frames per second.

    Raises:
        InputError: A missing, unreadable or empty video, a frame that fails to decode, or a frame
            count the video cannot give.
    """
    import av

    path = Path(path)
    options = options or VideoOptions()
    info = probe_video(path)
    indices = sample_indices(info.total_frames, info.fps, options)
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    container = _open(path)
    try:
        stream = container.streams.video[0]
        for k, frame in enumerate(container.decode(stream)):
            if k in wanted:
                frames[k] = frame.to_ndarray(format="rgb24")
            if k >= indices[-1]:
                break
    except av.FFmpegError as exc:
        raise InputError(f"video {path}: a frame cannot be decoded ({exc})".splitlines()[0]) from exc
    finally:
        container.close()
    missing = [i for i in indices if i not in frames]
    if missing:
        raise InputError(f"video {path}: frame {missing[0]} of {info.total_frames} cannot be decoded")
    stacked = np.stack([frames[i] for i in indices])
    return VideoClip(stacked, indices, info.total_frames, info.fps, options)


@dataclass(frozen=True)
class VideoPart:
    """A video inside a chat message: a file (or an already sampled clip) and its options.

    ``options`` left at ``None`` take the run's defaults (``ModelPair.video_options``), then
    ``qwen_vl_utils``' (2 frames per second) and the image processor's pixel bounds.
    """

    video: str | Path | VideoClip
    options: VideoOptions | None = None

    def clip(self, defaults: VideoOptions | None = None) -> VideoClip:
        """The sampled frames (decoding the file unless a clip was given).

        Raises:
            InputError: See :func:`read_video`; also a clip given together with sampling options.
        """
        if isinstance(self.video, VideoClip):
            if self.options is not None and (self.options.nframes or self.options.fps):
                raise InputError("a decoded VideoClip is already sampled; give nframes/fps when reading it")
            return self.video
        if not isinstance(self.video, (str, Path)):
            raise InputError(f"a video must be a path or a VideoClip, not {type(self.video).__name__}")
        options = (self.options or VideoOptions()).over(defaults)
        return read_video(self.video, options)

    def pixel_options(self, defaults: VideoOptions | None = None) -> VideoOptions:
        """The options that size the frames: this part's, then ``defaults``, then the clip's."""
        own = self.options or VideoOptions()
        if isinstance(self.video, VideoClip):
            own = own.over(self.video.options)
        return own.over(defaults)
