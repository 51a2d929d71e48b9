"""What an agent run leaves: one :class:`AgentTurn` per model call, and the finished :class:`AgentRun`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lens.agent_tool import Box
from lens.inputs import PairInputs, Turn


@dataclass(frozen=True)
class AgentTurn:
    """One model call of a run.

    Attributes:
        index: The call's index (0 = the first).
        generated: What the model decoded at this call (with the intervention).
        reply: The assistant text that entered the conversation: ``generated``, or the script's.
        scripted: Whether ``reply`` came from the script.
        status: One of :data:`lens.agent_config.TURN_STATUSES`.
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
        stop: One of :data:`lens.agent_config.STOP_REASONS`.
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
