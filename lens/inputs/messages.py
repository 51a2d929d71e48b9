"""The chat as :class:`Turn` objects: token roles, message parts, images, and the prompt and dict forms.

:func:`lens.inputs.build_inputs` renders and tokenises these turns; the roles its map assigns are
:data:`ROLES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lens.errors import InputError
from lens.video import VideoClip, VideoOptions, VideoPart

ROLE_VISUAL = "visual"
ROLE_PROMPT = "prompt"
ROLE_TEMPLATE = "template"
ROLE_RESPONSE = "response"
ROLES = (ROLE_VISUAL, ROLE_PROMPT, ROLE_TEMPLATE, ROLE_RESPONSE)

#: Chat roles a message may have.
CHAT_ROLES = ("system", "user", "assistant")

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
