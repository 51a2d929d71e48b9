"""A DeepEyes-style agent loop: the model zooms into its image with a tool, turn after turn.

The RLVR model of the paper's agent setting (DeepEyes-7B, Table 3) answers a question about an image
in several model calls. Each call sees the whole conversation so far; when the reply holds a
``<tool_call>`` to ``image_zoom_in_tool``, the box ``bbox_2d = [x1, y1, x2, y2]`` (pixels of the
original image, PIL's box convention) is cropped and sent back as a new image in a new user turn::

    system   (DeepEyes' tool prompt, optional)
    user     question + image
    assistant <think>…</think> <tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [..]}}</tool_call>
    user     <tool_response> crop  (turn prompt) </tool_response>
    assistant … <answer>…</answer>

:func:`run_agent` drives this loop for one item (an :class:`AgentEpisode`, advanced one call at a
time); :func:`run_agents` drives several items in lockstep, the calls of items at the same turn
decoded in one padded batch. Its choices follow the released code, with its sources:

* **The intervention is applied at every model call**, on the conversation so far, re-encoded from
  scratch (``pair.encode(messages=...)``): ``intervention.prepare`` then ``generate``, exactly as the
  released replay evaluation of DeepEyes recomputes the entropies, the mask and the base states
  before every ``generate`` (latentcraft/replay ``deepeyes/replay_eval/eval_hr4k.py``, ``inference``).
  For the released hard swap use :meth:`~lens.interventions.HardInjection.released_agent`: its mask
  covers every position of every turn (system, earlier replies, every image, tool responses).
* **Stops**: a reply's generation ends at ``</tool_call>`` (as there, see :func:`agent_decoding`); the loop ends at a complete
  ``<answer>…</answer>`` (the released loop's condition), or, with another ``AgentConfig.answer``
  extractor, at any reply without a tool call in which it finds an answer; a reply with neither a
  tool call nor an answer ends the run (``no_tool_call``: DeepEyes' environment ends the episode
  there; the released eval re-asks the same greedy prompt, which repeats the same reply); and at
  ``max_turns`` model calls (11 in the released eval: ``try_count > 10``).
* **The tool** crops the *original* image (DeepEyes' toolbox always crops the first image, never an
  earlier crop). Only the first tool call of a reply is executed (generation stops at its end).
* **A malformed call** (not JSON, another tool, ``bbox_2d`` missing, not four finite numbers, outside
  the image, zero area, aspect ratio above 100) is a *failed turn*, never a crash: as DeepEyes'
  environment does (``visual_toolbox_v5.py``), an ``Error: …`` user turn is appended and the model
  may try again (``on_tool_error="message"``), or the run stops (``"stop"``, what the released eval's
  ``try/except`` amounts to). Either way the turn records the error.

What differs, knowingly: the tool call is parsed with ``json.loads`` (DeepEyes' environment; the
released eval uses Python's ``eval``); a box reaching outside the image is refused by default
(``clip_bbox=True`` clips it first, as DeepEyes' training environment does; the released eval lets
PIL pad the crop with black); DeepEyes' widening of boxes under 28 px is left out (the image
processor resizes small crops up to its minimum pixel count anyway); crops are not pre-resized (the
pair's image processor resizes every image the same way, crops included).

Scripted turns: ``script=[...]`` teacher-forces the first replies (the model still runs, with the
intervention, and its own text is kept as ``AgentTurn.generated``), so a tool policy can be tested on
a model that cannot write tool calls, such as the built-in organism.

Example:
    >>> from lens.interventions import HardInjection
    >>> run = run_agent(pair, HardInjection.released_agent(), question, image,
    ...                 system=DEEPEYES_SYSTEM_PROMPT, config=AgentConfig(max_new_tokens=8192))
    >>> run.stop, run.answer, [t.status for t in run.turns]
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lens.decoding import DecodingConfig, decoding_for
from lens.errors import ConfigError, InputError
from lens.inputs import (
    ROLE_TEMPLATE,
    ImageLike,
    ImagePart,
    PairInputs,
    TextPart,
    Turn,
    open_image,
    prompt_turns,
)
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

Box = tuple[int, int, int, int]
Tool = Callable[[Image.Image, Box], Image.Image]


class ToolCallError(InputError):
    """A malformed tool call; :func:`run_agent` records it as a failed turn and never raises it."""


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
_TOOL_CALL = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL
)


# -- the tool ------------------------------------------------------------------------------------


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


# -- records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentTurn:
    """One model call of a run.

    Attributes:
        index: The call's index (0 = the first).
        generated: What the model decoded at this call (with the intervention).
        reply: The assistant text that entered the conversation: ``generated``, or the script's.
        scripted: Whether ``reply`` came from the script.
        status: One of :data:`TURN_STATUSES`.
        n_tokens: Prompt length of the call (the whole conversation so far).
        n_generated: Tokens the model generated at this call (its end token included).
        setting: The intervention's setting at this call.
        tool_call: The raw text of the tool call, if any.
        box: The crop box that was cut, if any.
        error: The failed call's message, if any.
        answer: The answer found in the reply, if any.
        crop: The cropped image, if any.
        inputs: The call's inputs (the conversation as the model saw it).
        detail: The intervention's diagnostics of this call (``Prepared.detail``).
    """

    index: int
    generated: str
    reply: str
    scripted: bool
    status: str
    n_tokens: int
    setting: str
    n_generated: int | None = None
    tool_call: str | None = None
    box: Box | None = None
    error: str | None = None
    answer: str | None = None
    crop: Image.Image | None = field(default=None, compare=False, repr=False)
    inputs: PairInputs | None = field(default=None, compare=False, repr=False)
    detail: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The turn as plain JSON values (no images, tensors or diagnostics)."""
        return {
            "index": self.index,
            "generated": self.generated,
            "reply": self.reply,
            "scripted": self.scripted,
            "status": self.status,
            "n_tokens": self.n_tokens,
            "n_generated": self.n_generated,
            "setting": self.setting,
            "tool_call": self.tool_call,
            "box": list(self.box) if self.box is not None else None,
            "error": self.error,
            "answer": self.answer,
        }


@dataclass(frozen=True)
class AgentRun:
    """A finished run: its turns, why it stopped, its answer and its conversation.

    Attributes:
        turns: One :class:`AgentTurn` per model call, in order.
        stop: One of :data:`STOP_REASONS`.
        answer: The answer that ended the run (``stop == "answer"``), else ``None``.
        messages: The conversation, the last reply included.
    """

    turns: tuple[AgentTurn, ...]
    stop: str
    answer: str | None
    messages: tuple[Turn, ...] = field(compare=False, repr=False)

    @property
    def n_calls(self) -> int:
        return len(self.turns)

    @property
    def n_tool_calls(self) -> int:
        """Crops returned."""
        return sum(t.status == "tool" for t in self.turns)

    @property
    def n_failed(self) -> int:
        """Malformed tool calls."""
        return sum(t.status == "tool_error" for t in self.turns)

    @property
    def n_generated(self) -> int:
        """Tokens the model generated over all calls."""
        return sum(t.n_generated or 0 for t in self.turns)

    @property
    def final_reply(self) -> str:
        return self.turns[-1].reply

    def to_dict(self) -> dict[str, Any]:
        """The run as plain JSON values, for a per-item record."""
        return {
            "stop": self.stop,
            "answer": self.answer,
            "n_calls": self.n_calls,
            "n_tool_calls": self.n_tool_calls,
            "n_failed": self.n_failed,
            "n_generated": self.n_generated,
            "turns": [t.to_dict() for t in self.turns],
        }


# -- the loop ------------------------------------------------------------------------------------


def agent_decoding(pair: Any, config: AgentConfig, decoding: DecodingConfig | None = None) -> DecodingConfig:
    """The decoding settings of every call: ``decoding`` (default: the pair's) with the per-call
    budget, ending a reply at ``</tool_call>``.

    Where the tokenizer has ``</tool_call>`` as one token (Qwen2.5's added token), that token becomes
    an end token, as the released eval stops on its id; otherwise it is a stop string, unless the
    tokenizer cannot write it at all (then the model cannot either, and no stop is needed).
    """
    decoding = (decoding or decoding_for(pair)).replace(max_new_tokens=config.max_new_tokens)
    tokenizer = pair.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(TOOL_CALL_CLOSE)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
        if tokenizer.convert_ids_to_tokens(token_id) == TOOL_CALL_CLOSE:
            return decoding.replace(eos_token_ids=tuple(dict.fromkeys((*decoding.eos_token_ids, token_id))))
    ids = tokenizer(TOOL_CALL_CLOSE, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != TOOL_CALL_CLOSE:
        return decoding
    return decoding.replace(stop_strings=tuple(dict.fromkeys((*decoding.stop_strings, TOOL_CALL_CLOSE))))


def tool_response_turn(crop: Image.Image, config: AgentConfig) -> Turn:
    """The user turn that returns a crop, laid out as the released eval does (its text is ``template``)."""
    return Turn(
        "user",
        (
            TextPart(TOOL_RESPONSE_OPEN, ROLE_TEMPLATE),
            ImagePart(crop),
            TextPart(config.tool_prompt, ROLE_TEMPLATE),
            TextPart(TOOL_RESPONSE_CLOSE, ROLE_TEMPLATE),
        ),
    )


def error_turn(message: str) -> Turn:
    """The user turn that reports a failed call, as DeepEyes' environment does (``Error: …``)."""
    return Turn("user", (TextPart(f"Error: {message}", ROLE_TEMPLATE),))


def assistant_turn(reply: str) -> Turn:
    return Turn("assistant", (TextPart(reply),))


class AgentEpisode:
    """One item's agent run, advanced one model call at a time.

    :func:`run_agent` drives one episode; :func:`run_agents` drives several in lockstep, so that the
    calls of several items at the same turn share one batched ``generate``. The episode owns the
    conversation and the tool; whoever drives it encodes (:meth:`encode`), prepares the intervention
    and decodes, then hands the decoded text to :meth:`advance`.

    Args:
        pair: The model pair (its chat layout: where the image goes).
        question: The first user turn's text.
        image: The image the question is about; crops are cut from it.
        system: A system prompt, or ``None``.
        config: The loop's settings.
        script: Teacher-forced replies for the first calls.
        tool: ``tool(image, box) -> crop``.

    Raises:
        InputError: An unreadable image or an empty question.
        ConfigError: A script that is not a sequence of strings.
    """

    def __init__(
        self,
        pair: Any,
        question: str,
        image: ImageLike,
        *,
        system: str | None = None,
        config: AgentConfig | None = None,
        script: Sequence[str] = (),
        tool: Tool = zoom_in,
    ) -> None:
        self.config = config or AgentConfig()
        if isinstance(script, str) or not all(isinstance(s, str) for s in script):
            raise ConfigError("script must be a sequence of reply strings")
        self.script = tuple(script)
        self.tool = tool
        self.original = open_image(image)
        self.conversation: list[Turn] = list(
            prompt_turns(question, [self.original], system, pair.image_first)
        )
        self.turns: list[AgentTurn] = []
        self.stop: str | None = None

    @property
    def done(self) -> bool:
        """Whether the run has ended (:attr:`stop` says why)."""
        return self.stop is not None

    def encode(self, pair: Any) -> PairInputs:
        """The next call's inputs: the whole conversation so far, encoded from scratch."""
        if self.done:
            raise ConfigError(f"the run has ended ({self.stop}); there is no next call")
        return pair.encode(messages=self.conversation)

    def advance(
        self,
        generated: str,
        inputs: PairInputs,
        setting: str,
        detail: Any = None,
        n_generated: int | None = None,
    ) -> AgentTurn:
        """Take the call's decoded text: record the turn, run the tool or end the run.

        Args:
            generated: What the model decoded at this call.
            inputs: The call's inputs (from :meth:`encode`).
            setting: The intervention's setting at this call.
            detail: The intervention's diagnostics of this call.
            n_generated: Tokens the model generated at this call.

        Returns:
            The recorded turn.
        """
        if self.done:
            raise ConfigError(f"the run has ended ({self.stop}); it takes no more calls")
        config, index = self.config, len(self.turns)
        scripted = index < len(self.script)
        reply = self.script[index] if scripted else generated
        last_call = index == config.max_turns - 1
        record = dict(
            index=index,
            generated=generated,
            reply=reply,
            scripted=scripted,
            n_tokens=inputs.n_tokens,
            n_generated=n_generated,
            setting=setting,
            inputs=inputs,
            detail=detail,
        )
        if reply.strip():  # an empty reply ends the run below; the chat cannot hold an empty turn
            self.conversation.append(assistant_turn(reply))
        tagged = last_answer_tag(reply)
        try:
            call = None if tagged is not None else parse_tool_call(reply)
            if call is not None and call.name != config.tool_name:
                raise ToolCallError(f"unknown tool {call.name!r}; the tool is {config.tool_name!r}")
        except ToolCallError as exc:
            turn = AgentTurn(status="tool_error", error=str(exc), **record)
            if config.on_tool_error == "stop" or last_call:
                self.stop = "tool_error" if config.on_tool_error == "stop" else "turn_limit"
            else:
                self.conversation.append(error_turn(str(exc)))
            return self._add(turn)
        if call is None:
            answer = tagged if tagged is not None else config.find_answer(reply)
            self.stop = "answer" if answer is not None else "no_tool_call"
            return self._add(AgentTurn(status=self.stop, answer=answer, **record))
        if last_call:
            self.stop = "turn_limit"
            return self._add(AgentTurn(status="turn_limit", tool_call=call.raw, **record))
        try:
            box = crop_box(call.arguments, self.original.size, config)
        except ToolCallError as exc:
            if config.on_tool_error == "stop":
                self.stop = "tool_error"
            else:
                self.conversation.append(error_turn(str(exc)))
            return self._add(AgentTurn(status="tool_error", tool_call=call.raw, error=str(exc), **record))
        crop = self.tool(self.original, box)
        self.conversation.append(tool_response_turn(crop, config))
        return self._add(AgentTurn(status="tool", tool_call=call.raw, box=box, crop=crop, **record))

    def _add(self, turn: AgentTurn) -> AgentTurn:
        self.turns.append(turn)
        if self.stop is None and len(self.turns) >= self.config.max_turns:
            self.stop = "turn_limit"  # not reached: the last call always ends the run above
        return turn

    def result(self) -> AgentRun:
        """The finished run."""
        if not self.done:
            raise ConfigError("the run has not ended yet")
        answer = self.turns[-1].answer if self.stop == "answer" else None
        return AgentRun(tuple(self.turns), self.stop, answer, tuple(self.conversation))


def run_agent(
    pair: Any,
    intervention: Any,
    question: str,
    image: ImageLike,
    *,
    system: str | None = None,
    config: AgentConfig | None = None,
    script: Sequence[str] = (),
    decoding: DecodingConfig | None = None,
    tool: Tool = zoom_in,
) -> AgentRun:
    """Run the zoom-in agent loop on one item, the intervention applied at every model call.

    Args:
        pair: The model pair (the intervention's generator decodes).
        intervention: An :class:`~lens.interventions.Intervention` (``Baseline()`` for none);
            prepared afresh on the whole conversation before every call.
        question: The first user turn's text (add :data:`DEEPEYES_USER_PROMPT` for DeepEyes' format).
        image: The image the question is about; crops are cut from it.
        system: A system prompt (:data:`DEEPEYES_SYSTEM_PROMPT` for DeepEyes' tool schema).
        config: The loop's settings.
        script: Replies that replace the model's at the first calls (teacher forcing); the model
            still runs at those calls, and its own text is kept as ``generated``.
        decoding: Decoding settings (default: the pair's; greedy).
        tool: ``tool(image, box) -> crop``; :func:`zoom_in` by default. Anything it raises other
            than :class:`ToolCallError` propagates (no hook is installed while it runs).

    Returns:
        The run: one turn per call, the stop reason, the answer and the conversation.

    Raises:
        InputError: An unreadable image or an empty question (before any model call).
        ConfigError: Bad settings, or a script that is not a sequence of strings.
    """
    episode = AgentEpisode(pair, question, image, system=system, config=config, script=script, tool=tool)
    return run_agents(pair, intervention, [episode], decoding)[0]


def run_agents(
    pair: Any,
    intervention: Any,
    episodes: Sequence[AgentEpisode],
    decoding: DecodingConfig | None = None,
    batch_size: int = 1,
) -> list[AgentRun]:
    """Run several episodes to their ends, the calls of up to ``batch_size`` of them at the same turn
    decoded in one left-padded ``generate`` (:meth:`~lens.interventions.Intervention.generate_batch`).

    Each call is encoded and prepared on its own episode's conversation, exactly as :func:`run_agent`
    does; only the decode is shared. Greedy rows of a padded batch equal the unbatched decode up to
    float rounding of the padded matmuls (see ``generate_batch``).

    Args:
        pair: The model pair.
        intervention: The intervention, prepared afresh for every call of every episode.
        episodes: The episodes (all with the same ``max_new_tokens``: one decoding for the batch).
        decoding: Decoding settings (default: the pair's; greedy).
        batch_size: Episodes per ``generate`` call.

    Returns:
        One :class:`AgentRun` per episode, in order.

    Raises:
        ConfigError: ``batch_size`` below 1, or episodes with different decode budgets.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size}")
    if not episodes:
        return []
    budgets = {e.config.max_new_tokens for e in episodes}
    if len(budgets) > 1:
        raise ConfigError(
            f"episodes batched together need one max_new_tokens, got {sorted(map(str, budgets))}"
        )
    decoding = agent_decoding(pair, episodes[0].config, decoding)
    while True:
        active = [e for e in episodes if not e.done]
        if not active:
            break
        for start in range(0, len(active), batch_size):
            chunk = active[start : start + batch_size]
            calls = []
            for episode in chunk:
                inputs = episode.encode(pair)
                intervention.prepare(pair, inputs)
                calls.append((inputs, intervention.state))
            generations = intervention.generate_batch(pair, [state for _, state in calls], decoding)
            for episode, (inputs, state), generation in zip(chunk, calls, generations, strict=True):
                episode.advance(
                    generation.texts[0],
                    inputs,
                    state.setting,
                    state.detail,
                    len(generation.token_ids[0]),
                )
    return [e.result() for e in episodes]
