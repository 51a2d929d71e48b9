"""The intervention interface: prepare on one sample, then decode with transformers' ``generate``.

Every intervention edits the residual stream of the generating model with plain torch hooks that
act on the prefill only (forwards whose sequence length is the prompt's; the seq-len-1 decode steps
pass through and see the edit only through the KV cache, as in the released code). Hooks live in a
context manager and are removed in ``finally``: weights are never written and no hook outlives a
call, even when something raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs

#: Keys of ``model_inputs`` that carry pixels (the vision tower's input).
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


class _StopForward(Exception):
    """Raised by a hook to end a forward once everything needed has been read."""


# -- hook plumbing ---------------------------------------------------------------------------------


def hook_count(model: nn.Module, include_transformers: bool = False) -> int:
    """Number of forward and forward-pre hooks on ``model`` and all its submodules.

    transformers 5.x installs its own output-capturing hooks on the first forward and keeps them;
    those are not counted unless ``include_transformers``, so after any intervention this is 0.
    """
    count = 0
    for module in model.modules():
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            owner = getattr(hook, "__module__", "") or ""
            count += include_transformers or not owner.startswith("transformers")
    return count


@contextmanager
def installed(handles: list[RemovableHandle]) -> Iterator[None]:
    """Remove ``handles`` on exit, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


def edit_input(layer: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Pre-hook on a decoder layer: ``fn(hidden_states)`` may return a replacement for its input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def edit_output(layer: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
    """Forward hook on a decoder layer: ``fn(output)`` may return a replacement for its output."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        # Decoder layers return a plain tensor in transformers 5.x; older releases a tuple.
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return layer.register_forward_hook(hook)


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Make sure autograd records nothing for the weights; restore the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def capture_block_residuals(
    model: nn.Module,
    adapter: Any,
    model_inputs: dict[str, torch.Tensor],
    inputs_of: Sequence[int] = (),
    outputs_of: Sequence[int] = (),
) -> dict[tuple[str, int], torch.Tensor]:
    """One no-grad forward; the input and/or output of chosen blocks, stopping after the last needed.

    Args:
        model: The model.
        adapter: Its family adapter.
        model_inputs: Inputs of a batch of one.
        inputs_of: Blocks whose input (``hidden_states[L]`` in transformers' indexing) to keep.
        outputs_of: Blocks whose raw output (``hidden_states[L + 1]``, never final-normed) to keep.

    Returns:
        ``{("in", L): [tokens, hidden], ("out", L): [tokens, hidden]}`` in the model dtype.
    """
    layers = adapter.layers(model)
    out: dict[tuple[str, int], torch.Tensor] = {}
    need = {("in", int(i)) for i in inputs_of} | {("out", int(i)) for i in outputs_of}
    if not need:
        return out
    # The forward ends at the last point read: a block's input comes before its output.
    last = max(need, key=lambda key: (key[1], key[0] == "out"))
    handles: list[RemovableHandle] = []

    def reader(key: tuple[str, int]) -> Callable[[torch.Tensor], None]:
        def read(hidden: torch.Tensor) -> None:
            out[key] = hidden[0].detach()
            if key == last:
                raise _StopForward

        return read

    for key in sorted(need):
        register = edit_input if key[0] == "in" else edit_output
        handles.append(register(layers[key[1]], reader(key)))
    with installed(handles), torch.no_grad():
        try:
            model(**model_inputs, use_cache=False)
        except _StopForward:
            pass
    return out


def check_layers(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Validate layer indices against the model depth."""
    out = tuple(sorted({int(i) for i in layers}))
    if not out:
        raise ConfigError("no layers given")
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} are outside the model's {n_layers} layers (0..{n_layers - 1})")
    return out


def require_visual(inputs: PairInputs, what: str) -> torch.Tensor:
    """The visual positions of a sample, or :class:`InputError` when it has none."""
    positions = inputs.visual_positions
    if positions.numel() == 0:
        raise InputError(f"{what} acts on visual tokens, but this sample has none (text-only input)")
    return positions


# -- the interface ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """Decoded continuations of one prompt.

    Attributes:
        texts: One decoded continuation per returned sequence (special tokens skipped).
        token_ids: The generated token ids of each sequence (prompt excluded).
    """

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]


class Intervention:
    """Base class: no edit. Subclasses override :meth:`prepare` and :meth:`_install`.

    Attributes:
        name: Short strategy name used in tables.
        generator: Which model of the pair decodes (``"rlvr"``, or ``"base"`` for the base baseline).
    """

    name: ClassVar[str] = "rlvr"

    def __init__(self, generator: str = "rlvr") -> None:
        if generator not in ("rlvr", "base"):
            raise ConfigError(f"generator must be 'rlvr' or 'base', got {generator!r}")
        self.generator = generator
        self._inputs: PairInputs | None = None

    # Subclasses: compute whatever the edit needs for this sample; keep ``super().prepare``.
    def prepare(self, pair: Any, inputs: PairInputs) -> Intervention:
        """Compute this sample's edit (no-op here). Must precede :meth:`generate` for ``inputs``."""
        self._inputs = inputs
        return self

    def _install(self, pair: Any, model: nn.Module) -> list[RemovableHandle]:
        """Register this intervention's hooks on ``model``; return their handles."""
        return []

    def setting(self) -> str:
        """A stable string naming the strategy and its parameters (used as a record key)."""
        return self.name if self.generator == "rlvr" else "base"

    def model(self, pair: Any) -> nn.Module:
        return pair.rlvr if self.generator == "rlvr" else pair.base

    @contextmanager
    def applied(self, pair: Any) -> Iterator[nn.Module]:
        """Hooks installed on the generating model for the duration of the block, then removed."""
        if self._inputs is None:
            raise ConfigError(f"{type(self).__name__}.prepare(pair, inputs) must be called before decoding")
        model = self.model(pair)
        handles: list[RemovableHandle] = []
        with installed(handles):
            handles.extend(self._install(pair, model))
            yield model

    def generate(
        self,
        pair: Any,
        inputs: PairInputs,
        n: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        max_new_tokens: int = 32,
        seed: int | None = None,
    ) -> Generation:
        """Decode with transformers' ``generate`` (KV cache), vision special ids suppressed.

        Args:
            pair: The model pair.
            inputs: The sample prepared with :meth:`prepare`.
            n: Number of sequences (``n > 1`` needs ``do_sample``).
            do_sample: Sample (pure temperature sampling: top-k and top-p off) instead of greedy.
            temperature: Sampling temperature.
            max_new_tokens: Decode budget.
            seed: Seed for sampling; the global RNG state is restored afterwards.
        """
        if inputs is not self._inputs:
            raise ConfigError("generate() got inputs that were not passed to prepare()")
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        if n > 1 and not do_sample:
            raise ConfigError("n > 1 identical greedy sequences make no sense; pass do_sample=True")
        if do_sample and not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        tokenizer = pair.tokenizer
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "num_return_sequences": int(n),
            "suppress_tokens": list(pair.adapter.vision_special_ids(pair.config)) or None,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if do_sample:
            gen_kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        n_prompt = inputs.n_tokens
        devices = [pair.device] if pair.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation flags.*")
            if seed is not None:
                torch.manual_seed(seed)
            with self.applied(pair) as model, torch.no_grad():
                out = model.generate(**inputs.model_inputs, **gen_kwargs)
        new = out[:, n_prompt:].tolist()
        texts = tuple(tokenizer.batch_decode(new, skip_special_tokens=True))
        return Generation(texts, tuple(tuple(seq) for seq in new))


class Baseline(Intervention):
    """A model of the pair as is: ``Baseline()`` is the RLVR model, ``Baseline("base")`` the base."""

    name = "rlvr"
