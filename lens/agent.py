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

The module is split by idea, every name importable from here: the tool format and
:class:`AgentConfig` in :mod:`lens.agent_config`, tool-call parsing and cropping in
:mod:`lens.agent_tool`, :class:`AgentTurn` and :class:`AgentRun` in :mod:`lens.agent_records`;
this module runs the loop.

Example:
    >>> from lens.interventions import HardInjection
    >>> run = run_agent(pair, HardInjection.released_agent(), question, image,
    ...                 system=DEEPEYES_SYSTEM_PROMPT, config=AgentConfig(max_new_tokens=8192))
    >>> run.stop, run.answer, [t.status for t in run.turns]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

# The loop's parts live in their own modules; every name stays importable from here.
from lens.agent_config import (  # noqa: F401  (public API of the agent loop)
    ANSWER_EXTRACTORS,
    DEEPEYES_SYSTEM_PROMPT,
    DEEPEYES_USER_PROMPT,
    STOP_REASONS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    TURN_STATUSES,
    ZOOM_TOOL,
    AgentConfig,
)
from lens.agent_records import AgentRun, AgentTurn
from lens.agent_tool import (  # noqa: F401
    Box,
    Tool,
    ToolCall,
    ToolCallError,
    crop_box,
    parse_tool_call,
    zoom_in,
)
from lens.decoding import DecodingConfig, decoding_for
from lens.errors import ConfigError
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
from lens.scoring.extraction import last_answer_tag


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
