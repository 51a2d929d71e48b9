"""DeepEyes' zoom-in tool format and the settings of an agent run (:class:`AgentConfig`).

The prompts are quoted from Visual-Agent/DeepEyes; :mod:`lens.agent` documents the loop they drive.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lens.errors import ConfigError
from lens.scoring.extraction import extract, last_answer_tag

#: The zoom-in tool's name in DeepEyes' tool schema.
ZOOM_TOOL = "image_zoom_in_tool"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

#: DeepEyes' system prompt (``SYSTEM_PROMPT_V2`` of Visual-Agent/DeepEyes
#: ``verl/workers/agent/envs/mm_process_engine/prompt.py``; the released replay eval uses it as is).
DEEPEYES_SYSTEM_PROMPT = """You are a helpful assistant.

# Tools
You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the specified bounding box (optional)."}},"required":["bbox"]}}}
</tools>

# How to call a tool
Return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>

**Example**:  
<tool_call>  
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  
</tool_call>"""  # quoted byte for byte, trailing spaces included

#: The instruction after the question and inside every tool response (``USER_PROMPT_V2``, same file;
#: the released eval appends it to the question and to each tool response).
DEEPEYES_USER_PROMPT = (
    "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
    "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
)

#: What a turn did: ``tool`` (a crop was returned), ``tool_error`` (a malformed call, recorded),
#: ``answer`` (the run ends with an answer), ``no_tool_call`` (neither; the run ends),
#: ``turn_limit`` (the last allowed call asked for a tool; not executed).
TURN_STATUSES = ("tool", "tool_error", "answer", "no_tool_call", "turn_limit")
#: Why a run ended.
STOP_REASONS = ("answer", "no_tool_call", "turn_limit", "tool_error")
#: Built-in answer extractors of :class:`AgentConfig`.
ANSWER_EXTRACTORS = ("answer_tag", "extract", "organism")


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one agent run.

    Attributes:
        max_turns: Model calls at most (11, the released eval's ``try_count > 10``).
        max_new_tokens: Decode budget per call (``None``: the decoding settings' own; the released
            eval uses 8192).
        tool_name: The tool's name in the call's ``"name"``.
        tool_prompt: Text after the crop inside each tool response (DeepEyes' instruction).
        on_tool_error: ``"message"`` (append ``Error: …`` as a user turn and go on, as DeepEyes'
            environment does) or ``"stop"`` (end the run, as the released eval's ``try/except``).
        clip_bbox: Clip a box that reaches outside the image before checking it (DeepEyes' training
            environment). Off by default: a box outside the image is a grounding error, and clipping
            would hide it from the record.
        max_aspect_ratio: Longest over shortest crop side at most this (DeepEyes checks 100; the
            image processor refuses above 200).
        answer: How a reply's final answer is found: ``"answer_tag"`` (a complete
            ``<answer>…</answer>``, the released loop's stop), ``"extract"`` (the verifiers'
            extractor, :func:`lens.scoring.extract`: tag, box, answer sentence, last number),
            ``"organism"`` (the built-in organism's ``answer N``), or a callable
            ``fn(reply) -> str | None``. A complete answer tag always ends the run, even in a reply
            that also calls a tool (the released loop checks it first).
    """

    max_turns: int = 11
    max_new_tokens: int | None = None
    tool_name: str = ZOOM_TOOL
    tool_prompt: str = DEEPEYES_USER_PROMPT
    on_tool_error: str = "message"
    clip_bbox: bool = False
    max_aspect_ratio: float = 100.0
    answer: str | Callable[[str], str | None] = "answer_tag"

    def __post_init__(self) -> None:
        if isinstance(self.max_turns, bool) or int(self.max_turns) != self.max_turns or self.max_turns < 1:
            raise ConfigError(f"max_turns must be an integer >= 1, got {self.max_turns}")
        if self.max_new_tokens is not None and (
            int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1
        ):
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not isinstance(self.tool_name, str) or not self.tool_name:
            raise ConfigError("tool_name must be a non-empty string")
        if not isinstance(self.tool_prompt, str):
            raise ConfigError("tool_prompt must be a string")
        if self.on_tool_error not in ("message", "stop"):
            raise ConfigError(f"on_tool_error must be 'message' or 'stop', got {self.on_tool_error!r}")
        if not self.max_aspect_ratio >= 1:
            raise ConfigError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if not callable(self.answer) and self.answer not in ANSWER_EXTRACTORS:
            raise ConfigError(f"answer must be one of {ANSWER_EXTRACTORS} or a callable, got {self.answer!r}")

    def find_answer(self, reply: str) -> str | None:
        """The reply's final answer by :attr:`answer`, or ``None``."""
        if callable(self.answer):
            return self.answer(reply)
        if self.answer == "answer_tag":
            return last_answer_tag(reply)
        if self.answer == "extract":
            return extract(reply).text
        found = _ORGANISM_ANSWER.search(reply)
        return found.group(1) if found else None


_ORGANISM_ANSWER = re.compile(r"answer\s+(\d+)")
