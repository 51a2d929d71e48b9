"""The zoom-in tool: a reply's ``<tool_call>`` parsed, its ``bbox_2d`` checked, the crop cut."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from lens.agent_config import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, AgentConfig
from lens.errors import InputError

Box = tuple[int, int, int, int]
Tool = Callable[[Image.Image, Box], Image.Image]


class ToolCallError(InputError):
    """A malformed tool call; :func:`lens.agent.run_agent` records it as a failed turn and never raises it."""


_TOOL_CALL = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL
)


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call: its name, its arguments and the raw text between the tags."""

    name: str
    arguments: Mapping[str, Any]
    raw: str


def parse_tool_call(reply: str) -> ToolCall | None:
    """The first ``<tool_call>…</tool_call>`` of a reply, or ``None`` when there is none.

    An unclosed call (the budget ran out) is parsed up to the end of the reply.

    Raises:
        ToolCallError: The call is not a JSON object with a string ``name`` and an object
            ``arguments``.
    """
    found = _TOOL_CALL.search(reply)
    if found is None:
        return None
    raw = found.group(1).strip()
    try:
        call = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ToolCallError(
            f"the tool call is not valid JSON ({exc.msg} at char {exc.pos}): {raw!r:.120}"
        ) from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolCallError(f'the tool call must be {{"name": ..., "arguments": {{...}}}}, got {raw!r:.120}')
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ToolCallError(f"the tool call's arguments must be an object, got {arguments!r:.80}")
    return ToolCall(call["name"], arguments, raw)


def crop_box(arguments: Mapping[str, Any], size: tuple[int, int], config: AgentConfig) -> Box:
    """The pixel box ``(left, top, right, bottom)`` that ``bbox_2d`` asks for, checked.

    Fractional coordinates widen to whole pixels (left/top down, right/bottom up).

    Args:
        arguments: The call's arguments.
        size: The original image's ``(width, height)``.
        config: The run's settings (``clip_bbox``, ``max_aspect_ratio``).

    Raises:
        ToolCallError: ``bbox_2d`` missing, not four finite numbers, outside the image (unless
            clipped), of zero area, or too elongated.
    """
    bbox = arguments.get("bbox_2d")
    if bbox is None:
        raise ToolCallError(f"the call has no bbox_2d (arguments: {sorted(arguments)})")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ToolCallError(f"bbox_2d must be [x1, y1, x2, y2], got {bbox!r:.80}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise ToolCallError(f"bbox_2d must hold four finite numbers, got {bbox!r:.80}")
    width, height = size
    left, top = math.floor(bbox[0]), math.floor(bbox[1])
    right, bottom = math.ceil(bbox[2]), math.ceil(bbox[3])
    if config.clip_bbox:
        left, top = max(0, left), max(0, top)
        right, bottom = min(width, right), min(height, bottom)
    elif left < 0 or top < 0 or right > width or bottom > height:
        raise ToolCallError(f"bbox_2d {list(bbox)} reaches outside the {width}x{height} image")
    if right <= left or bottom <= top:
        raise ToolCallError(f"bbox_2d {list(bbox)} has zero area (x2 <= x1 or y2 <= y1, inside the image)")
    long_side, short_side = max(right - left, bottom - top), min(right - left, bottom - top)
    if long_side / short_side > config.max_aspect_ratio:
        raise ToolCallError(
            f"bbox_2d {list(bbox)} is {long_side}x{short_side} px, an aspect ratio above "
            f"{config.max_aspect_ratio:g}"
        )
    return (left, top, right, bottom)


def zoom_in(image: Image.Image, box: Box) -> Image.Image:
    """DeepEyes' zoom-in: the crop of ``image`` at ``box`` (PIL's box convention)."""
    return image.crop(box)
