"""Turn a chat (system prompt, user turns with images, optional response) into identical model
inputs plus a token-role map.

A VLM processor does three things: render the chat template with one placeholder per image,
expand each placeholder to the image's number of visual tokens, and tokenize. We do the same three
steps here with the tokenizer and image processor directly, because the stock processor classes
cannot be built without torchvision; the tests check the tensors are identical to the processor's.
The middle step is the family's: each adapter names its image builder, a module of this package
(``qwen_vl`` for Qwen2-VL and Qwen2.5-VL) with an ``expand_images`` function. Doing it ourselves also lets us keep character offsets, which give the role
of every token (visual, prompt text, chat template, response).

Roles. Every token gets one of :data:`ROLES`:

- ``visual``: an image placeholder token (one per merged patch);
- ``prompt``: the text of a user turn, and the text of *earlier* assistant turns of a conversation
  (they are context the model reads, like the question; they are not what it is scored on);
- ``template``: chat scaffolding, the template's default system prompt, a system prompt given by
  the caller, and the fixed instruction text of a prompt preset (see :mod:`lens.prompts`);
- ``response``: the teacher-forced ``response`` after the generation prompt, and its end token.

A chat is given either as ``prompt`` (+ ``images``, ``system``) or as ``messages``: a list of
``{"role": "system" | "user" | "assistant", "content": str | [items]}`` where an item is
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL | path | bytes}``, or as
:class:`Turn` objects, which also say the role of each text piece. The last message must be a
user turn: the model answers it (after the template's generation prompt), and the answer to
score or teacher-force is ``response``. A message without images is passed to the chat template
as a plain string, as real text-only templates (Qwen2.5, Llama 3) require; where the template then
drops the text (it reads typed parts only, as LLaVA-OneVision's does), every content is sent as
typed parts instead.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lens.adapters import ArchitectureAdapter
from lens.errors import InputError
from lens.video import VideoClip, VideoOptions, VideoPart

ROLE_VISUAL = "visual"
ROLE_PROMPT = "prompt"
ROLE_TEMPLATE = "template"
ROLE_RESPONSE = "response"
ROLES = (ROLE_VISUAL, ROLE_PROMPT, ROLE_TEMPLATE, ROLE_RESPONSE)

#: Chat roles a message may have.
CHAT_ROLES = ("system", "user", "assistant")

# Markers rendered in place of each text piece, then replaced by the text: the offsets of the
# replacements give every piece's character span. U+2063 (invisible separator) never occurs in
# chat templates.
_MARK = "\u2063"

ImageLike = Image.Image | str | Path | bytes


@dataclass(frozen=True)
class TextPart:
    """A piece of message text and the role its tokens get (``prompt`` or ``template``)."""

    text: str
    role: str = ROLE_PROMPT

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InputError(f"message text must be a string, not {type(self.text).__name__}")
        if self.role not in (ROLE_PROMPT, ROLE_TEMPLATE):
            raise InputError(f"a text piece's role must be 'prompt' or 'template', not {self.role!r}")


@dataclass(frozen=True)
class ImagePart:
    """An image inside a message (a PIL image, a path, or encoded image bytes)."""

    image: ImageLike


@dataclass(frozen=True)
class Turn:
    """One chat message: a chat role and its text and image parts, in order."""

    role: str
    parts: tuple[TextPart | ImagePart | VideoPart, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        for part in self.parts:
            if not isinstance(part, (TextPart, ImagePart, VideoPart)):
                raise InputError(
                    f"a message part must be a TextPart, an ImagePart or a VideoPart, not {type(part).__name__}"
                )
        if self.role not in CHAT_ROLES:
            raise InputError(f"unknown chat role {self.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if self.role == "system" and any(isinstance(p, (ImagePart, VideoPart)) for p in self.parts):
            raise InputError("a system message cannot hold images or videos")

    @property
    def images(self) -> tuple[ImageLike, ...]:
        return tuple(p.image for p in self.parts if isinstance(p, ImagePart))

    @property
    def videos(self) -> tuple[VideoPart, ...]:
        return tuple(p for p in self.parts if isinstance(p, VideoPart))

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


Message = Turn | Mapping[str, Any]


@dataclass(frozen=True)
class PairInputs:
    """Inputs shared by both models of a pair, plus what every analysis needs to know about them.

    Attributes:
        model_inputs: Keyword arguments for ``model(**model_inputs)`` (batch of one).
        roles: Role of every position, one of :data:`ROLES`.
        tokens: The token string at every position (for plots and debugging).
        image_grids: ``(t, h, w)`` patch grid of each image, before the spatial merge.
        merge_size: Spatial merge factor (2 for Qwen-VL); merged grid is ``(h/merge, w/merge)``.
        response_start: Index of the first response token, or ``None`` without a response.
        video_grids: ``(t, h, w)`` patch grid of each video (``t`` temporal patches).
        frames: Per position, the temporal patch of a video token (patch ``t`` holds sampled frames
            ``2t`` and ``2t+1``), and -1 for every other position; empty when there is no video.
    """

    model_inputs: dict[str, torch.Tensor]
    roles: tuple[str, ...]
    tokens: tuple[str, ...]
    image_grids: tuple[tuple[int, int, int], ...] = ()
    merge_size: int = 1
    response_start: int | None = None
    video_grids: tuple[tuple[int, int, int], ...] = ()
    frames: tuple[int, ...] = ()
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.model_inputs["input_ids"]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def positions(self, role: str) -> torch.Tensor:
        """Indices of the positions that have ``role``."""
        return torch.tensor([i for i, r in enumerate(self.roles) if r == role], dtype=torch.long)

    @property
    def visual_positions(self) -> torch.Tensor:
        return self.positions(ROLE_VISUAL)

    @property
    def role_array(self) -> np.ndarray:
        return np.asarray(self.roles)

    def to(self, device: torch.device | str) -> PairInputs:
        moved = {k: v.to(device) for k, v in self.model_inputs.items()}
        return PairInputs(
            moved,
            self.roles,
            self.tokens,
            self.image_grids,
            self.merge_size,
            self.response_start,
            video_grids=self.video_grids,
            frames=self.frames,
        )


def open_image(image: Image.Image | str | Path | bytes) -> Image.Image:
    """Open an image as RGB, turning every failure into :class:`InputError`.

    Args:
        image: A PIL image, a file path, or an encoded image file's bytes (PNG, JPEG, ...).
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        source: Any = BytesIO(image)
        what = f"({len(image)} bytes)"
    else:
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        source, what = path, str(path)
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"unreadable or corrupt image {what}: {exc}") from exc


def _load_image(image: ImageLike) -> Image.Image:
    """Open an image given as a PIL image, a path or encoded bytes; anything else is an InputError."""
    if not isinstance(image, (Image.Image, str, Path, bytes, bytearray, memoryview)):
        raise InputError(f"an image must be a PIL image, a path or bytes, not {type(image).__name__}")
    return open_image(image)


# -- the chat: messages, prompt form ----------------------------------------------------------------


def user_turn(
    text: str | Sequence[TextPart],
    images: Sequence[ImageLike] = (),
    image_first: bool = True,
    videos: Sequence[VideoPart] = (),
) -> Turn:
    """A user message: its text (one string, or text pieces with roles), its videos and images."""
    parts = (TextPart(text),) if isinstance(text, str) else tuple(text)
    pictures = tuple(_video_part(v) for v in videos) + tuple(ImagePart(im) for im in images)
    return Turn("user", pictures + parts if image_first else parts + pictures)


def system_turn(text: str) -> Turn:
    """A system message; its tokens have the ``template`` role."""
    return Turn("system", (TextPart(text, ROLE_TEMPLATE),))


def to_turns(messages: Sequence[Message]) -> tuple[Turn, ...]:
    """Validate a chat given as dict messages and/or :class:`Turn` objects.

    Text of system messages gets the ``template`` role, text of user and assistant messages the
    ``prompt`` role (a :class:`Turn` keeps the roles it was built with).

    Raises:
        InputError: An unknown role or content item, an empty message, or a chat that does not end
            with a user message.
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} messages")
    if not messages:
        raise InputError("messages is empty")
    turns = []
    for i, message in enumerate(messages):
        turn = message if isinstance(message, Turn) else _dict_to_turn(message, f"messages[{i}]")
        if not turn.text.strip() and not turn.images:
            raise InputError(f"messages[{i}] ({turn.role}) is empty")
        turns.append(turn)
    if turns[-1].role != "user":
        raise InputError(
            "the last message must be a user message (the model answers it); "
            "pass the assistant's answer as response="
        )
    return tuple(turns)


def _dict_to_turn(message: Any, where: str) -> Turn:
    if not isinstance(message, Mapping):
        raise InputError(f"{where} must be a dict with 'role' and 'content', not {type(message).__name__}")
    unknown = set(message) - {"role", "content"}
    if unknown or "role" not in message or "content" not in message:
        raise InputError(f"{where} must have exactly the keys 'role' and 'content' (got {sorted(message)})")
    role = message["role"]
    if role not in CHAT_ROLES:
        raise InputError(f"{where}: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
    text_role = ROLE_TEMPLATE if role == "system" else ROLE_PROMPT
    content = message["content"]
    if isinstance(content, str):
        return Turn(role, (TextPart(content, text_role),))
    if not isinstance(content, Sequence):
        raise InputError(f"{where}: content must be a string or a list of items")
    parts: list[TextPart | ImagePart] = []
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, Mapping) else None
        if kind == "text" and isinstance(item.get("text"), str):
            parts.append(TextPart(item["text"], text_role))
        elif kind == "image" and item.get("image") is not None:
            parts.append(ImagePart(item["image"]))
        elif kind == "video" and item.get("video") is not None:
            options = {k: item[k] for k in ("nframes", "fps", "max_pixels", "min_pixels") if k in item}
            parts.append(VideoPart(item["video"], VideoOptions(**options) if options else None))
        else:
            raise InputError(
                f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} or "
                f"{{'type': 'image', 'image': PIL image | path | bytes}}, got {item!r:.80}"
            )
    try:
        return Turn(role, tuple(parts))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc


def prompt_turns(
    prompt: str,
    images: Sequence[ImageLike] = (),
    system: str | None = None,
    image_first: bool = True,
    videos: Sequence[VideoPart] = (),
) -> tuple[Turn, ...]:
    """The chat of the prompt form: an optional system message, then one user message."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    if system is not None and not isinstance(system, str):
        raise InputError(f"the system prompt must be a string, not {type(system).__name__}")
    head = (system_turn(system),) if system else ()
    return head + (user_turn(prompt, images, image_first, videos),)


def _video_part(video: VideoPart | VideoClip | str | Path) -> VideoPart:
    return video if isinstance(video, VideoPart) else VideoPart(video)


# -- rendering with character spans --------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """A text part as sent to the template: the marker that stands for it, the text the marker is
    replaced by, and the role of that text's tokens."""

    marker: str
    core: str
    role: str
    where: str


def _skeleton_messages(
    turns: Sequence[Turn], mode: str = "whole", typed: bool = False
) -> tuple[list[dict[str, Any]], list[_Piece]]:
    """Messages for ``apply_chat_template``, with markers in place of the text pieces.

    Modes: ``"real"`` sends the text itself; ``"whole"`` replaces each piece by a marker;
    ``"core"`` keeps a piece's outer whitespace around the marker (``lead + marker + trail``), so a
    template that trims message content (Llama 3) trims exactly what it would trim from the text.
    ``typed`` sends every content as a list of typed parts, even without images (for templates that
    read typed parts only, such as LLaVA-OneVision's).
    """
    messages: list[dict[str, Any]] = []
    pieces: list[_Piece] = []
    for i, turn in enumerate(turns):
        items: list[dict[str, str]] = []
        for part in turn.parts:
            if isinstance(part, ImagePart):
                items.append({"type": "image"})
                continue
            if isinstance(part, VideoPart):
                items.append({"type": "video"})
                continue
            text = part.text
            core = text.strip()
            if core and mode != "real":
                marker = f"{_MARK}{len(pieces)}{_MARK}"
                where = f"the {turn.role} text of message {i}"
                if mode == "whole":
                    pieces.append(_Piece(marker, text, part.role, where))
                    text = marker
                else:
                    pieces.append(_Piece(marker, core, part.role, where))
                    text = text[: len(text) - len(text.lstrip())] + marker + text[len(text.rstrip()) :]
            if text:
                items.append({"type": "text", "text": text})
        if typed or any(item["type"] in ("image", "video") for item in items):
            content: str | list[dict[str, str]] = items
        else:
            content = "".join(item["text"] for item in items)
        messages.append({"role": turn.role, "content": content})
    return messages, pieces


def _fill(skeleton: str, pieces: Sequence[_Piece]) -> tuple[str, list[tuple[int, int, str]]]:
    """Replace every marker by its text; return the text and each piece's (start, end, role)."""
    found = []
    for piece in pieces:
        count = skeleton.count(piece.marker)
        if count != 1:
            raise InputError(f"the chat template does not render {piece.where} exactly once (found {count})")
        found.append((skeleton.index(piece.marker), piece))
    found.sort(key=lambda x: x[0])
    out: list[str] = []
    spans: list[tuple[int, int, str]] = []
    cursor = length = 0
    for at, piece in found:
        out.append(skeleton[cursor:at])
        length += at - cursor
        spans.append((length, length + len(piece.core), piece.role))
        out.append(piece.core)
        length += len(piece.core)
        cursor = at + len(piece.marker)
    out.append(skeleton[cursor:])
    return "".join(out), spans


def _render(tokenizer: Any, turns: Sequence[Turn]) -> tuple[str, list[_Piece]]:
    """Render the chat with markers, and check the template only inserts the text it is given.

    The whole text of each piece is tried first; if the template changed it (Llama 3 trims message
    content), the pieces' outer whitespace is left to the template and only the stripped text is
    marked. Either way the filled-in skeleton must equal the template's rendering of the real text.
    """

    def apply(messages: list[dict[str, Any]]) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, TypeErrors on content
            raise InputError(
                f"the chat template cannot render these messages: {exc}".splitlines()[0]
            ) from exc

    def attempt(typed: bool) -> tuple[str, list[_Piece]] | None:
        expected = apply(_skeleton_messages(turns, "real", typed)[0])
        for mode in ("whole", "core"):
            marked, pieces = _skeleton_messages(turns, mode, typed)
            skeleton = apply(marked)
            if _fill(skeleton, pieces)[0] == expected:
                return skeleton, pieces
        return None

    try:
        found = attempt(typed=False)
    except InputError as first:
        # A template that reads typed content parts only (LLaVA-OneVision's) renders a plain string
        # as nothing: send every content as typed parts; if that fails too, the first error stands.
        try:
            found = attempt(typed=True)
        except InputError:
            raise first from first.__cause__
        if found is None:
            raise first from first.__cause__
    if found is not None:
        return found
    raise InputError(
        "the chat template rewrites the message text (it does more than insert it), "
        "so token roles cannot be mapped"
    )


def build_inputs(
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    config: Any,
    prompt: str | None = None,
    images: Sequence[ImageLike] = (),
    response: str | None = None,
    image_processor: Any | None = None,
    image_first: bool = True,
    use_chat_template: bool = True,
    device: torch.device | str | None = None,
    *,
    system: str | None = None,
    messages: Sequence[Message] | None = None,
    videos: Sequence[VideoPart | VideoClip | str | Path] = (),
    video_options: VideoOptions | None = None,
) -> PairInputs:
    """Build one sample's inputs and its token-role map.

    Args:
        tokenizer: A fast tokenizer (offsets are needed for the role map).
        adapter: The pair's architecture adapter.
        config: The model config (visual token ids live there).
        prompt: The user's text (the prompt form; leave ``None`` with ``messages``).
        images: Zero or more images (PIL images, paths or encoded bytes) of the user turn.
        response: Optional response, appended after the generation prompt and ended with the
            tokenizer's EOS token, for teacher forcing.
        image_processor: The image processor; required when there are images.
        image_first: Put images before the text in the user turn (Qwen's usual order).
        use_chat_template: Render with the tokenizer's chat template when it has one.
        device: Where to put the tensors.
        system: A system prompt (its tokens are ``template``); ``None`` or ``""`` for none, which
            leaves the template's default system prompt, if it has one.
        messages: The chat as messages instead of ``prompt``/``images``/``system`` (see the module
            docstring); the last one must be a user message.
        videos: Videos of the user turn (files, :class:`~lens.video.VideoPart` with per-video
            options, or decoded :class:`~lens.video.VideoClip`), placed before the images.
        video_options: The run's video defaults (frames, pixel bounds) for options a video leaves unset.

    Returns:
        The inputs, with one role per position.

    Raises:
        InputError: For unreadable images, images given to a text-only model, an empty prompt or
            message, malformed messages, or a chat template that cannot place the text.
    """
    if messages is not None:
        if prompt is not None or len(images) or system or len(videos):
            raise InputError("give either prompt (with images, videos, system) or messages, not both")
        turns = to_turns(messages)
    else:
        turns = prompt_turns(prompt, images, system, image_first, videos)  # type: ignore[arg-type]
    video_parts = [v for turn in turns for v in turn.videos]
    if video_parts:
        _check_video_family(adapter, image_processor)
    all_images = [im for turn in turns for im in turn.images]
    pil_images = [_load_image(im) for im in all_images]
    if pil_images and not adapter.multimodal:
        raise InputError(f"{adapter.name} takes no images, but {len(pil_images)} were given")
    if pil_images and image_processor is None:
        raise InputError("images were given but the pair has no image processor")

    if use_chat_template and getattr(tokenizer, "chat_template", None):
        skeleton, pieces = _render(tokenizer, turns)
    else:
        if pil_images or video_parts:
            raise InputError(
                "images and videos need a chat template that places them; the tokenizer has none"
            )
        if len(turns) != 1:
            raise InputError(
                "a system prompt or a conversation needs a chat template; the tokenizer has none"
            )
        _, pieces = _skeleton_messages(turns, "whole")
        skeleton = "".join(p.marker for p in pieces)

    pixel_inputs: dict[str, torch.Tensor] = {}
    grids: tuple[tuple[int, int, int], ...] = ()
    merge, expected = 1, 0
    if pil_images:
        expansion = adapter.image_builder().expand_images(
            skeleton, pil_images, image_processor, tokenizer, config
        )
        skeleton, pixel_inputs = expansion.skeleton, expansion.pixel_inputs
        grids, merge, expected = expansion.grids, expansion.merge, expansion.n_visual
    video_grids: tuple[tuple[int, int, int], ...] = ()
    token_frames: tuple[int, ...] = ()
    if video_parts:
        clips = [v.clip(video_options) for v in video_parts]
        sizing = [v.pixel_options(video_options) for v in video_parts]
        video_expansion = adapter.image_builder().expand_videos(
            skeleton, clips, sizing, image_processor, tokenizer, config
        )
        skeleton = video_expansion.skeleton
        pixel_inputs = {**pixel_inputs, **video_expansion.pixel_inputs}
        video_grids, token_frames = video_expansion.grids, video_expansion.token_frames
        merge, expected = video_expansion.merge, expected + video_expansion.n_visual

    text, spans = _fill(skeleton, pieces)
    response_span = None
    if response is not None:
        eos = tokenizer.eos_token or ""
        response_span = (len(text), len(text) + len(response))
        text = text + response + eos

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    input_ids = enc["input_ids"]
    offsets = enc["offset_mapping"][0].tolist()
    visual_ids = set(adapter.visual_token_ids(config))
    starts = [s for s, _, _ in spans]
    roles: list[str] = []
    response_start = None
    for i, (tid, (s, e)) in enumerate(zip(input_ids[0].tolist(), offsets, strict=True)):
        if tid in visual_ids:
            roles.append(ROLE_VISUAL)
            continue
        if response_span is not None and s >= response_span[0] and e > s:
            if response_start is None:
                response_start = i
            # The EOS after the response belongs to the response: it is what the model must emit.
            roles.append(ROLE_RESPONSE)
            continue
        # A token takes a text piece's role only when it lies wholly inside the piece; tokens that
        # straddle a piece and the scaffolding around it count as template.
        k = bisect.bisect_right(starts, s) - 1
        inside = k >= 0 and e > s and e <= spans[k][1]
        roles.append(spans[k][2] if inside else ROLE_TEMPLATE)

    n_visual = roles.count(ROLE_VISUAL)
    if n_visual != expected:
        raise InputError(f"tokenized {n_visual} visual tokens but the images need {expected}")

    model_inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        **pixel_inputs,
        **adapter.extra_model_inputs(input_ids, config),
    }
    if device is not None:
        model_inputs = {k: v.to(device) for k, v in model_inputs.items()}
    tokens = tuple(tokenizer.convert_ids_to_tokens(input_ids[0].tolist()))
    frames = _position_frames(input_ids[0], config, token_frames) if video_parts else ()
    return PairInputs(
        model_inputs,
        tuple(roles),
        tokens,
        grids,
        merge,
        response_start,
        video_grids=video_grids,
        frames=frames,
    )


def _check_video_family(adapter: ArchitectureAdapter, image_processor: Any) -> None:
    """Refuse videos for a family without a video builder (text-only pairs included)."""
    if not adapter.multimodal:
        raise InputError(f"{adapter.name} takes no videos (a text-only pair)")
    if not hasattr(adapter.image_builder(), "expand_videos"):
        raise InputError(f"videos are not supported for {adapter.name} yet")
    if image_processor is None:
        raise InputError("a video was given but the pair has no image processor")


def _position_frames(input_ids: torch.Tensor, config: Any, token_frames: Sequence[int]) -> tuple[int, ...]:
    """Each position's temporal patch: the video tokens in order take ``token_frames``; others -1."""
    frames = [-1] * int(input_ids.shape[0])
    video_positions = (input_ids == int(config.video_token_id)).nonzero().flatten().tolist()
    if len(video_positions) != len(token_frames):
        raise InputError(
            f"tokenized {len(video_positions)} video tokens but the videos need {len(token_frames)}"
        )
    for position, frame in zip(video_positions, token_frames, strict=True):
        frames[position] = frame
    return tuple(frames)
