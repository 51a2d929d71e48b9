"""Rendering a chat with its template while keeping every text piece's character span.

Each text piece is rendered as a marker, then the marker is replaced by the text; the offsets of
the replacements are the spans that give every token its role (:func:`lens.inputs.build_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lens.errors import InputError
from lens.inputs.messages import ImagePart, Turn
from lens.video import VideoPart

# Markers rendered in place of each text piece, then replaced by the text: the offsets of the
# replacements give every piece's character span. U+2063 (invisible separator) never occurs in
# chat templates.
_MARK = "\u2063"


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
