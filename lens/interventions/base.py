"""The intervention interface: prepare each sample, then decode one or several with ``generate``.

:meth:`Intervention.prepare` computes one sample's edit and keeps it as a :class:`Prepared` state
(``intervention.state``): the sample's inputs plus data-only :class:`PrefillEdit` s (which block,
which positions, which values, overwrite or add). Decoding is a property of the interface, not of
each method: :meth:`Intervention.generate_batch` left-pads several prepared samples into one batch
(:mod:`lens.batching`), places each row's own edits at that row's shifted positions and decodes all
rows in one ``generate`` call; :meth:`Intervention.generate` is the batch of one.

Every edit acts on the prefill only (forwards whose sequence length is the prompt's; the seq-len-1
decode steps pass through and see the edit only through the KV cache, as in the released code).
Hooks live in a context manager and are removed in ``finally``: weights are never written and no
hook outlives a call, even when something raises. The decoding settings come from
:mod:`lens.decoding` (greedy is exactly greedy).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.batching import Batch, collate
from lens.decoding import DecodingConfig, decoding_for, own_generation_config, sequence_ends
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


# -- per-sample edits ------------------------------------------------------------------------------

EDIT_SITES = ("input", "output")
EDIT_MODES = ("set", "add")


@dataclass(frozen=True, eq=False)
class PrefillEdit:
    """One edit of one block's residual stream during one sample's prefill.

    Attributes:
        layer: The decoder block.
        site: ``"input"`` (the block's input, ``hidden_states[layer]``) or ``"output"`` (its raw output).
        positions: ``LongTensor[n]`` positions in the sample's own (unpadded) sequence.
        values: ``[n, hidden]`` what is written (``"set"``) or added (``"add"``) there. An add is
            done in float32 and rounded once to the model dtype.
        mode: ``"set"`` or ``"add"``. At one site, sets apply before adds.
    """

    layer: int
    site: str
    positions: torch.Tensor
    values: torch.Tensor
    mode: str

    def __post_init__(self) -> None:
        if self.site not in EDIT_SITES:
            raise ConfigError(f"edit site must be one of {EDIT_SITES}, got {self.site!r}")
        if self.mode not in EDIT_MODES:
            raise ConfigError(f"edit mode must be one of {EDIT_MODES}, got {self.mode!r}")
        positions = self.positions.reshape(-1).long()
        object.__setattr__(self, "positions", positions)
        if positions.unique().numel() != positions.numel():
            raise ConfigError("an edit names a position twice")
        if self.values.dim() != 2 or self.values.shape[0] != positions.numel():
            raise ConfigError(
                f"an edit of {positions.numel()} positions needs values of shape [n, hidden], "
                f"got {tuple(self.values.shape)}"
            )


@dataclass(frozen=True, eq=False)
class Prepared:
    """One prepared sample: everything its decode needs.

    Attributes:
        inputs: The sample's inputs.
        edits: The edits of its prefill (none: the model as is).
        setting: The :meth:`Intervention.setting` that prepared it.
        detail: Method-specific diagnostics (a :class:`~lens.interventions.replay.ReplayResult`, an
            :class:`~lens.interventions.injection.InjectionPlan`, or ``None``).
    """

    inputs: PairInputs
    edits: tuple[PrefillEdit, ...] = ()
    setting: str = ""
    detail: Any = None


def install_edits(
    layers: Sequence[nn.Module],
    states: Sequence[Prepared],
    batch: Batch | None = None,
    copies: int | None = None,
) -> list[RemovableHandle]:
    """Hooks that apply each sample's edits to its own rows, at its own shifted positions.

    Args:
        layers: The generating model's decoder blocks.
        states: The prepared samples, in row order.
        batch: Their left-padded batch; ``None`` for one sample as is (no padding).
        copies: Rows per sample (``num_return_sequences``; rows of sample ``i`` are
            ``i * copies .. (i + 1) * copies - 1``); ``None`` with one sample: every row.

    Returns:
        The hook handles (remove them, e.g. with :func:`installed`).

    Raises:
        InputError: An edit outside its sample's sequence.
    """
    if batch is None and len(states) != 1:
        raise ConfigError("several samples need their batch")
    n_tokens = batch.n_tokens if batch is not None else states[0].inputs.n_tokens
    n_rows = None if copies is None else len(states) * copies
    # (layer, site) -> [(rows, columns, values, mode)], sets before adds.
    sites: dict[tuple[int, str], list[tuple[slice, torch.Tensor, torch.Tensor, str]]] = {}
    for index, state in enumerate(states):
        length = state.inputs.n_tokens
        rows = slice(None) if copies is None else slice(index * copies, (index + 1) * copies)
        for edit in state.edits:
            if edit.positions.numel() == 0:
                continue
            if int(edit.positions.min()) < 0 or int(edit.positions.max()) >= length:
                raise InputError(
                    f"an edit reaches position {int(edit.positions.max())} of a {length}-token sample"
                )
            columns = edit.positions if batch is None else batch.shift(index, edit.positions)
            sites.setdefault((edit.layer, edit.site), []).append((rows, columns, edit.values, edit.mode))
    handles = []
    for (layer, site), entries in sites.items():
        entries.sort(key=lambda entry: EDIT_MODES.index(entry[3]))
        register = edit_input if site == "input" else edit_output
        handles.append(register(layers[layer], _apply_edits(entries, n_tokens, n_rows)))
    return handles


def _apply_edits(
    entries: list[tuple[slice, torch.Tensor, torch.Tensor, str]], n_tokens: int, n_rows: int | None
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def fn(hidden: torch.Tensor) -> torch.Tensor | None:
        if hidden.shape[1] == 1:
            return None  # a decode step: untouched (it sees the edit through the KV cache)
        if hidden.shape[1] != n_tokens or (n_rows is not None and hidden.shape[0] != n_rows):
            raise InputError(
                f"prefill of shape {tuple(hidden.shape[:2])}, but the edits were prepared for "
                f"{n_rows or 'any number of'} rows of {n_tokens} tokens"
            )
        hidden = hidden.clone()
        for rows, columns, values, mode in entries:
            columns = columns.to(hidden.device)
            values = values.to(hidden.device)
            if mode == "set":
                hidden[rows, columns] = values.to(hidden.dtype)
            else:
                hidden[rows, columns] = (hidden[rows, columns].float() + values.float()).to(hidden.dtype)
        return hidden

    return fn


# -- the interface ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """Decoded continuations of one prompt.

    Attributes:
        texts: One decoded continuation per returned sequence (special tokens skipped).
        token_ids: The generated token ids of each sequence (prompt excluded, the end token included).
        first_logits: ``[sequences, vocab]`` float32 logits of the first decode step, before any
            logits processor (only when asked for; not compared by ``==``).
    """

    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    first_logits: torch.Tensor | None = field(default=None, compare=False, repr=False)


class Intervention:
    """Base class: no edit. Subclasses override :meth:`prepare` and :meth:`_edits`.

    Attributes:
        name: Short strategy name used in tables.
        generator: Which model of the pair decodes (``"rlvr"``, or ``"base"`` for the base baseline).

    Example:
        >>> states = [replay.prepare(pair, x).state for x in inputs]   # one optimisation each
        >>> [g.texts[0] for g in replay.generate_batch(pair, states)]  # one batched greedy decode
    """

    name: ClassVar[str] = "rlvr"

    def __init__(self, generator: str = "rlvr") -> None:
        if generator not in ("rlvr", "base"):
            raise ConfigError(f"generator must be 'rlvr' or 'base', got {generator!r}")
        self.generator = generator
        self._state: Prepared | None = None

    # Subclasses: compute whatever the edit needs for this sample, then call ``super().prepare``.
    def prepare(self, pair: Any, inputs: PairInputs) -> Intervention:
        """Compute this sample's edit and keep it as :attr:`state` (returns ``self``)."""
        self._state = Prepared(inputs, tuple(self._edits(pair)), self.setting(), self._detail())
        return self

    @property
    def state(self) -> Prepared:
        """The last prepared sample (pass several to :meth:`generate_batch`)."""
        if self._state is None:
            raise ConfigError(f"{type(self).__name__}.prepare(pair, inputs) must be called before decoding")
        return self._state

    def _edits(self, pair: Any) -> Sequence[PrefillEdit]:
        """The prefill edits of the sample just prepared (none here)."""
        return ()

    def _detail(self) -> Any:
        """Diagnostics of the sample just prepared, kept in :attr:`Prepared.detail`."""
        return None

    def _install(
        self,
        model: nn.Module,
        adapter: Any,
        states: Sequence[Prepared],
        batch: Batch | None,
        copies: int | None,
    ) -> list[RemovableHandle]:
        """Register the hooks that decode ``states``; override for edits that are not position edits."""
        return install_edits(adapter.layers(model), states, batch, copies)

    def setting(self) -> str:
        """A stable string naming the strategy and its parameters (used as a record key)."""
        return self.name if self.generator == "rlvr" else "base"

    def model(self, pair: Any) -> nn.Module:
        return pair.rlvr if self.generator == "rlvr" else pair.base

    @contextmanager
    def applied(self, pair: Any) -> Iterator[nn.Module]:
        """The last prepared sample's hooks on the generating model for the block, then removed.

        The edits apply to every row of a forward on that sample's own (unpadded) inputs.
        """
        with self._hooks(pair, [self.state], None, None) as model:
            yield model

    @contextmanager
    def _hooks(
        self, pair: Any, states: Sequence[Prepared], batch: Batch | None, copies: int | None
    ) -> Iterator[nn.Module]:
        model = self.model(pair)
        handles: list[RemovableHandle] = []
        with installed(handles):
            handles.extend(self._install(model, pair.adapter, states, batch, copies))
            yield model

    def generate(
        self,
        pair: Any,
        inputs: PairInputs,
        decoding: DecodingConfig | None = None,
        *,
        n: int = 1,
        do_sample: bool = False,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Decode the last prepared sample: :meth:`generate_batch` with a batch of one.

        Args:
            pair: The model pair.
            inputs: The sample passed to :meth:`prepare` (checked).
            decoding: Decoding settings (default: :func:`~lens.decoding.decoding_for` the pair).
            n: Number of sequences (``n > 1`` needs ``do_sample``).
            do_sample: Sample instead of decoding greedily.
            seed: Seed for sampling; the global RNG state is restored afterwards.
            max_new_tokens: Override of ``decoding.max_new_tokens``.
            temperature: Override of ``decoding.temperature``.
        """
        state = self.state
        if inputs is not state.inputs:
            raise ConfigError("generate() got inputs that were not passed to prepare()")
        decoding = (decoding or decoding_for(pair)).replace(
            max_new_tokens=max_new_tokens, temperature=temperature
        )
        return self.generate_batch(pair, [state], decoding, n=n, do_sample=do_sample, seed=seed)[0]

    def generate_batch(
        self,
        pair: Any,
        states: Sequence[Prepared],
        decoding: DecodingConfig | None = None,
        *,
        n: int = 1,
        do_sample: bool = False,
        seed: int | None = None,
        first_logits: bool = False,
    ) -> list[Generation]:
        """Decode several prepared samples in one left-padded ``generate`` call.

        Each row gets its own edits at its own positions; transformers gives each row its own
        (mRoPE) positions from the attention mask. Greedy rows are identical to decoding each
        sample alone (up to float rounding of the padded matmuls, ~1e-6 in float32).

        Args:
            pair: The model pair.
            states: Samples prepared by this intervention (``prepare(...).state``), in order.
            decoding: Decoding settings (default: :func:`~lens.decoding.decoding_for` the pair).
            n: Sequences per sample (``n > 1`` needs ``do_sample``).
            do_sample: Sample instead of decoding greedily.
            seed: Seed for sampling; the global RNG state is restored afterwards.
            first_logits: Also return each row's raw logits of the first decode step (read from
                the unembedding during the prefill, so it costs no extra forward).

        Returns:
            One :class:`Generation` per sample, in order.

        Raises:
            ConfigError: No samples, samples prepared by another setting, or bad decoding settings.
        """
        if not states:
            raise ConfigError("generate_batch() needs at least one prepared sample")
        if not all(isinstance(s, Prepared) for s in states):
            raise ConfigError(
                "generate_batch() takes prepared samples: intervention.prepare(pair, inputs).state"
            )
        wrong = {s.setting for s in states if s.setting != self.setting()}
        if wrong:
            raise ConfigError(f"{self.setting()} cannot decode samples prepared by {sorted(map(str, wrong))}")
        decoding = decoding or decoding_for(pair)
        config = decoding.generation_config(do_sample=do_sample, n=n)
        tokenizer = pair.tokenizer
        batch = collate([s.inputs for s in states], decoding.pad_token_id)
        devices = [pair.device] if pair.device.type == "cuda" else []
        logits: list[torch.Tensor] = []

        def keep_first(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not logits:  # the prefill's call; later calls are decode steps
                logits.append(output[:, -1].detach().float())

        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*generation flags.*")
            if seed is not None:
                torch.manual_seed(seed)
            with self._hooks(pair, states, batch, n) as model, own_generation_config(model, config):
                unembed = pair.adapter.unembed(model)
                with installed([unembed.register_forward_hook(keep_first)] if first_logits else []):
                    with torch.no_grad():
                        out = model.generate(
                            **batch.model_inputs,
                            generation_config=config,
                            **decoding.generate_kwargs(tokenizer),
                        )
        ends = sequence_ends(out, batch.n_tokens, decoding, tokenizer)
        new = out[:, batch.n_tokens :].tolist()
        rows = [tuple(seq[:end]) for seq, end in zip(new, ends, strict=True)]
        texts = tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=True)
        return [
            Generation(
                tuple(texts[i * n : (i + 1) * n]),
                tuple(rows[i * n : (i + 1) * n]),
                logits[0][i * n : (i + 1) * n] if logits else None,
            )
            for i in range(len(states))
        ]


class Baseline(Intervention):
    """A model of the pair as is: ``Baseline()`` is the RLVR model, ``Baseline("base")`` the base."""

    name = "rlvr"
