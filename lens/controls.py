"""Planted-drift twins: a base model plus a known edit, to check what each method can see.

``plant(pair, where=..., size=..., layer=L, fraction=q, seed=s)`` returns a :class:`PlantedPair`
whose RLVR side is the pair's *base* with one known edit, everything else identical (``on="rlvr"``
plants the same edit in the pair's own twin instead, over its real drift):

* the same weights: the RLVR side is a structural view of the base (its own module objects, so
  hooks on one never fire on the other, holding the very same parameter and buffer tensors);
* the edit: a fixed random direction ``u`` (seeded, RMS 1) times ``size`` added at the *input* of
  decoder block ``L`` on a chosen set of tokens, during every full forward (a prefill, a lens
  capture, a replay step); one-token decode steps see it through the KV cache, as for every
  intervention;
* where: ``"low"``/``"high"``: the fraction ``q`` of the visual tokens with the lowest/highest base
  logit-lens entropy at the *output* of block ``L`` (rank-based, the rule of
  :func:`lens.masks.quantile_mask`; the released depth pairing that the injection and replay masks
  use, so a quantile mask at layer ``L`` with the same ``q`` selects exactly the planted tokens);
  ``"random"``: as many visual tokens drawn at random (seeded by ``seed`` and the sample's tokens);
  ``"text"``: a random fraction ``q`` of the non-visual tokens;
* ``size`` is the RMS of the offset relative to the RMS of the base's residual at the input of
  block ``L`` over the sample's eligible tokens (``relative=True``, default), or in absolute units.

The selection depends on each sample, so it is computed at every full forward of the RLVR side, from
one base forward on the same inputs (stopped after block ``L``), as interventions compute theirs in
``prepare``. A forward without pixel values whose tokens include image tokens (Activation Replay's
fast objective feeds block 0 a captured input) reuses the selection of the last forward with pixels
on the same token ids.

The edits are torch hooks on the view, installed on ``with twin:`` and removed on exit, also after
an exception; weights are never written. Outside the block ``twin.rlvr`` raises, so a planted pair
cannot silently act as the plain base::

    with plant(pair, where="low", size=2.0, layer=0, fraction=0.2, seed=0) as twin:
        run_drift(twin, items)                       # drift of a known edit
        HardInjection(layers=(0,), rule="quantile", quantile=0.2).prepare(twin, inputs)

For a twin saved as a checkpoint (loadable by path from the CLI), :mod:`lens.planted_checkpoint`
writes the weight edits that reproduce the ``"random"`` and ``"text"`` plants at block 0 with q = 1.
"""

from __future__ import annotations

import math
import types
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs
from lens.interventions.base import PIXEL_KEYS, _StopForward, edit_input, edit_output, installed
from lens.loading import ModelPair
from lens.logit_lens import lens_entropy, lens_of
from lens.masks import quantile_mask

#: Where a plant can go.
PLANT_SITES = ("low", "high", "random", "text")

#: Keyword arguments that carry the image content of a forward: the pixels, or (transformers 5.x
#: ``generate``) the vision encoder's outputs computed before the prefill.
_IMAGE_KWARGS = (*PIXEL_KEYS, "mm_encoder_outputs")

#: Keyword arguments of a forward that carry generation state, not inputs (dropped for the base pass).
_STATE_KWARGS = (
    "past_key_values",
    "use_cache",
    "logits_to_keep",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "labels",
)


def plant_size(size: Any) -> float:
    """``size`` as a float, checked: a number, finite and ``>= 0``.

    Raises:
        ConfigError: Anything else.
    """
    try:
        value = float(size)
    except (TypeError, ValueError):
        raise ConfigError(f"plant size must be a number, got {size!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"plant size must be finite and >= 0, got {size}")
    return value


@dataclass(frozen=True)
class PlantConfig:
    """One planted edit.

    Attributes:
        where: ``"low"``, ``"high"``, ``"random"`` (visual tokens) or ``"text"`` (see the module docstring).
        size: RMS of the offset, relative to the base residual's RMS at the eligible tokens of the
            block's input (``relative``) or absolute; ``>= 0`` and finite (0 is a null plant).
        layer: The decoder block whose input gets the offset.
        fraction: Fraction q of the eligible tokens, in (0, 1].
        seed: Seed of the direction (and of the random token draws).
        relative: Whether ``size`` is relative to the residual's RMS.
        token_chunk: Positions per lens projection when ranking by entropy.
        on: The model the edit is planted in: ``"base"`` (the twin is the base plus the edit, no
            other drift) or ``"rlvr"`` (the pair's own twin plus the edit: a known effect on top of
            real drift, whose background sets the detection floor). The selection and the relative
            size always come from the base.
    """

    where: str = "low"
    size: float = 1.0
    layer: int = 0
    fraction: float = 0.2
    seed: int = 0
    relative: bool = True
    token_chunk: int = 256
    on: str = "base"

    def __post_init__(self) -> None:
        if self.on not in ("base", "rlvr"):
            raise ConfigError(f"a plant goes on 'base' or 'rlvr', got {self.on!r}")
        if self.where not in PLANT_SITES:
            raise ConfigError(f"plant location must be one of {', '.join(PLANT_SITES)}; got {self.where!r}")
        object.__setattr__(self, "size", plant_size(self.size))
        if isinstance(self.layer, bool) or int(self.layer) != self.layer or self.layer < 0:
            raise ConfigError(f"plant layer must be an integer >= 0, got {self.layer}")
        object.__setattr__(self, "layer", int(self.layer))
        if not 0.0 < float(self.fraction) <= 1.0:
            raise ConfigError(f"plant fraction must be in (0, 1], got {self.fraction}")
        object.__setattr__(self, "fraction", float(self.fraction))
        if self.token_chunk < 1:
            raise ConfigError(f"token_chunk must be >= 1, got {self.token_chunk}")

    @property
    def visual(self) -> bool:
        """Whether the plant acts on visual tokens."""
        return self.where != "text"

    def tag(self) -> str:
        """A stable name, used as the twin's display name (and so in run settings)."""
        unit = "" if self.relative else ",absolute"
        on = "" if self.on == "base" else ",on=rlvr"
        return (
            f"planted[{self.where},size={self.size:g}{unit},layer={self.layer},q={self.fraction:g},"
            f"seed={self.seed}{on}]"
        )


def plant_direction(hidden_size: int, seed: int) -> torch.Tensor:
    """The plant's fixed direction: float32 ``[hidden]`` with RMS 1, from ``seed`` alone."""
    generator = torch.Generator().manual_seed(int(seed))
    u = torch.randn(hidden_size, generator=generator, dtype=torch.float64)
    return (u / u.pow(2).mean().sqrt()).float()


@dataclass(frozen=True)
class RowPlant:
    """The plant of one sample (one batch row).

    Attributes:
        positions: ``LongTensor[k]`` planted positions in the sample's own (unpadded) sequence.
        offset: ``[hidden]`` float32 offset added at each of them (``scale * direction``).
        candidates: The eligible positions (visual or text tokens) of the sample.
        entropy: Float32 base entropy at the candidates (output of block ``layer``), or ``None``
            when the rule needs none.
    """

    positions: torch.Tensor
    offset: torch.Tensor
    candidates: torch.Tensor
    entropy: torch.Tensor | None = None

    @property
    def candidate_index(self) -> torch.Tensor:
        """Indices of the planted positions *into the candidates* (e.g. into Replay's Δ rows)."""
        return torch.searchsorted(self.candidates, self.positions)


def module_view(model: nn.Module) -> nn.Module:
    """A second module tree over the same parameter and buffer tensors.

    Every module is a new object (hooks registered on the view never fire on ``model`` and back),
    whose parameters and buffers are ``model``'s own objects: nothing is copied and a change to
    one is a change to both. transformers' own output-capturing hooks are carried over; nnsight's
    per-instance ``forward`` wrappers are not (the view gets its own when traced).

    Raises:
        ConfigError: A module whose ``forward`` is wrapped by something else (e.g. accelerate's
            ``device_map`` dispatch), which would keep calling the original modules.
    """
    made: dict[int, nn.Module] = {}

    def view(module: nn.Module) -> nn.Module:
        if id(module) in made:  # a module used twice stays one module
            return made[id(module)]
        if "_hf_hook" in module.__dict__:
            raise ConfigError(
                "plant() cannot view a model dispatched by accelerate (device_map); load the pair on "
                "one device (device=...) to plant an edit"
            )
        new = module.__class__.__new__(module.__class__)
        state = dict(module.__dict__)
        if "__nnsight__" in state:  # nnsight's wrapper of this instance's forward, bound to it
            state.pop("__nnsight__")
            state.pop("forward", None)
        for key, value in state.items():
            if isinstance(value, types.MethodType) and value.__self__ is module:
                state[key] = types.MethodType(value.__func__, new)
        state["_parameters"] = type(module._parameters)(module._parameters)
        state["_buffers"] = type(module._buffers)(module._buffers)
        state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
        _copy_library_hooks(module, state)
        new.__dict__.update(state)
        made[id(module)] = new
        new.__dict__["_modules"] = type(module._modules)(
            (name, None if child is None else view(child)) for name, child in module._modules.items()
        )
        return new

    return view(model)


def _copy_library_hooks(module: nn.Module, state: dict[str, Any]) -> None:
    """Fresh hook dicts holding only transformers' own (context-variable driven) forward hooks."""
    kept = {
        key
        for hooks in (module._forward_hooks, module._forward_pre_hooks)
        for key, hook in hooks.items()
        if (getattr(hook, "__module__", "") or "").startswith("transformers")
    }
    for name, value in module.__dict__.items():
        if name.startswith("_") and name.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")):
            if isinstance(value, dict):
                state[name] = OrderedDict((k, v) for k, v in value.items() if k in kept)
            elif isinstance(value, set):
                state[name] = {k for k in value if k in kept}


class PlantedPair(ModelPair):
    """A pair whose RLVR side is its base plus a planted edit; use it inside ``with``.

    Attributes:
        plant: The :class:`PlantConfig`.
        direction: The fixed float32 ``[hidden]`` direction (RMS 1).
        last: The :class:`RowPlant` of each row of the last full forward of the RLVR side.

    Example:
        >>> with plant(pair, where="low", size=2.0) as twin:
        ...     result = lens.pair_lens(twin.base, twin.rlvr, twin.adapter, inputs)
    """

    def __init__(self, pair: ModelPair, config: PlantConfig) -> None:
        if not isinstance(pair, ModelPair) or isinstance(pair, PlantedPair):
            raise ConfigError("plant() takes a lens.ModelPair (load one with lens.load_pair)")
        n_layers = pair.adapter.n_layers(pair.base)
        if config.layer >= n_layers:
            raise ConfigError(f"plant layer {config.layer} is outside the model's {n_layers} layers")
        if config.visual and not pair.adapter.multimodal:
            raise ConfigError(f"a {config.where!r} plant acts on visual tokens; {pair.adapter.name} has none")
        values = {f.name: getattr(pair, f.name) for f in fields(pair)}
        source = pair.base if config.on == "base" else pair.rlvr
        values.update(rlvr=module_view(source), names=(pair.names[0], config.tag()))
        object.__setattr__(self, "_active", False)
        super().__init__(**values)
        self.plant = config
        self.direction = plant_direction(pair.adapter.hidden_size(pair.base.config), config.seed)
        self.last: tuple[RowPlant, ...] = ()
        self._handles: list[RemovableHandle] = []
        self._current: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]] | None = None
        self._by_tokens: dict[bytes, RowPlant] = {}

    # -- the guard: the RLVR side exists only inside ``with`` ---------------------------------------

    def __getattribute__(self, name: str) -> Any:
        if name == "rlvr" and not object.__getattribute__(self, "_active"):
            raise ConfigError(
                "a planted pair's RLVR side works only inside its block: `with plant(pair, ...) as twin:`"
            )
        return object.__getattribute__(self, name)

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"PlantedPair({self.plant.tag()}, active={object.__getattribute__(self, '_active')})"

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.base)

    def encode(self, *args: Any, **kwargs: Any) -> PairInputs:
        """As :meth:`ModelPair.encode` (usable outside the block too)."""
        with self._rlvr_readable():
            return super().encode(*args, **kwargs)

    @contextmanager
    def _rlvr_readable(self) -> Iterator[None]:
        was = object.__getattribute__(self, "_active")
        object.__setattr__(self, "_active", True)
        try:
            yield
        finally:
            object.__setattr__(self, "_active", was)

    # -- hooks -------------------------------------------------------------------------------------

    def __enter__(self) -> PlantedPair:
        if self._handles:
            raise ConfigError("this planted pair is already active (its `with` blocks cannot nest)")
        view = object.__getattribute__(self, "rlvr")
        block = self.adapter.layers(view)[self.plant.layer]
        handles: list[RemovableHandle] = []
        try:
            handles.append(view.register_forward_pre_hook(self._on_forward, with_kwargs=True))
            handles.append(view.register_forward_hook(self._after_forward, always_call=True))
            # First among the block's pre-hooks: an intervention's edit of the same input (a hard
            # injection overwriting it with the base's) sees the planted stream, as it would a twin's.
            handles.append(block.register_forward_pre_hook(self._add, with_kwargs=True, prepend=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        self._handles = handles
        object.__setattr__(self, "_active", True)
        return self

    def __exit__(self, *exc: object) -> None:
        with installed(self._handles):
            object.__setattr__(self, "_active", False)
            self._current = None
            self._by_tokens = {}

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            raise InputError("a planted twin needs input_ids (it got inputs_embeds only)")
        if ids.shape[1] == 1:
            self._current = None  # a decode step: it sees the plant through the KV cache
            return
        attention = kwargs.get("attention_mask")
        if attention is None or attention.dim() != 2:
            attention = torch.ones_like(ids)
        rows = self._rows(ids, attention.bool(), kwargs)
        self.last = tuple(rows)
        starts = [
            int(torch.nonzero(attention[i]).min()) if attention[i].any() else 0 for i in range(len(rows))
        ]
        row_index = torch.cat([torch.full_like(r.positions, i) for i, r in enumerate(rows)])
        columns = torch.cat([r.positions + start for r, start in zip(rows, starts, strict=True)])
        values = torch.cat([r.offset.expand(r.positions.numel(), -1) for r in rows])
        self._current = (row_index, columns, values, tuple(ids.shape))

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._current = None

    def _add(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        current = self._current
        if current is None or hidden.shape[1] == 1:
            return None
        rows, columns, values, shape = current
        if tuple(hidden.shape[:2]) != shape:
            raise InputError(
                f"block input of shape {tuple(hidden.shape[:2])}, but the plant was set for {shape}"
            )
        device = hidden.device
        rows, columns = rows.to(device), columns.to(device)
        new = hidden.clone()
        new[rows, columns] = (hidden[rows, columns].float() + values.to(device)).to(hidden.dtype)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    # -- selection ---------------------------------------------------------------------------------

    def plan(self, inputs: PairInputs) -> RowPlant:
        """The plant of one encoded sample (what a forward on it adds, and where).

        Raises:
            InputError: No eligible token (e.g. a text-only sample and a visual plant).
        """
        ids = inputs.model_inputs["input_ids"]
        attention = inputs.model_inputs.get("attention_mask", torch.ones_like(ids))
        return self._rows(ids, attention.bool(), dict(inputs.model_inputs))[0]

    def _rows(self, ids: torch.Tensor, attention: torch.Tensor, kwargs: Mapping[str, Any]) -> list[RowPlant]:
        config = self.plant
        visual_ids = torch.tensor(self.adapter.visual_token_ids(self.config), device=ids.device)
        special = torch.tensor(self.adapter.vision_special_ids(self.config), device=ids.device)
        is_visual = torch.isin(ids, visual_ids) & attention
        keys = [ids[i][attention[i]].cpu().numpy().tobytes() for i in range(ids.shape[0])]
        has_pixels = any(kwargs.get(k) is not None for k in _IMAGE_KWARGS)
        if bool(is_visual.any()) and not has_pixels:
            # Pixels absent but image tokens present: block 0's input is supplied by a hook (Replay's
            # fast objective); the selection is the one made on these tokens with their pixels.
            missing = [i for i, key in enumerate(keys) if key not in self._by_tokens]
            if missing:
                raise InputError(
                    "a planted twin got image tokens without pixel values and no earlier forward of "
                    "these tokens with pixels to take the planted positions from"
                )
            return [self._by_tokens[key] for key in keys]
        if config.visual:
            eligible = is_visual
        else:
            eligible = attention & ~torch.isin(ids, torch.cat([visual_ids, special]))
        for i in range(ids.shape[0]):
            if not eligible[i].any():
                what = (
                    "visual tokens, but the input has none (a text-only item?)"
                    if config.visual
                    else ("text tokens, but the input has none")
                )
                raise InputError(f"a {config.where!r} plant acts on {what}")
        block_in, block_out = self._base_states(kwargs, need_out=config.where in ("low", "high"))
        rows = []
        for i, key in enumerate(keys):
            offset_of = attention[i].nonzero().min()
            where = eligible[i].nonzero().squeeze(-1)
            candidates = (where - offset_of).cpu()
            entropy = None
            if block_out is not None:
                entropy = lens_entropy(
                    lens_of(self.base, self.adapter), block_out[i, where], config.token_chunk
                ).cpu()
            chosen = self._choose(candidates, entropy, key)
            scale = config.size
            if config.relative:
                scale *= float(block_in[i, where].float().pow(2).mean().sqrt())
            row = RowPlant(candidates[chosen], (scale * self.direction).to(ids.device), candidates, entropy)
            self._by_tokens[key] = row
            rows.append(row)
        return rows

    def _choose(self, candidates: torch.Tensor, entropy: torch.Tensor | None, key: bytes) -> torch.Tensor:
        """Boolean selection over the candidates."""
        config, n = self.plant, candidates.numel()
        if config.fraction >= 1.0:
            return torch.ones(n, dtype=torch.bool)
        everything = torch.ones(n, dtype=torch.bool)
        if entropy is not None:
            # The rank rule of the quantile masks; "high" ranks the negated entropy.
            ranked = entropy if config.where == "low" else -entropy
            return quantile_mask(ranked.unsqueeze(0), everything, config.fraction)[0]
        # As many as the rank rule takes from n distinct values, drawn at random per sample.
        k = int(
            quantile_mask(
                torch.arange(n, dtype=torch.float32).unsqueeze(0), everything, config.fraction
            ).sum()
        )
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(key))
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[torch.randperm(n, generator=generator)[:k]] = True
        return chosen

    def _base_states(
        self, kwargs: Mapping[str, Any], need_out: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's input (and output) of the planted block, for every row, from one stopped forward."""
        layer = self.plant.layer
        block = self.adapter.layers(self.base)[layer]
        inputs = {k: v for k, v in kwargs.items() if k not in _STATE_KWARGS}
        got: dict[str, torch.Tensor] = {}

        def keep(name: str, last: bool):
            def read(hidden: torch.Tensor) -> None:
                got[name] = hidden.detach()
                if last:
                    raise _StopForward

            return read

        handles = [edit_input(block, keep("in", not need_out))]
        if need_out:
            handles.append(edit_output(block, keep("out", True)))
        with installed(handles), torch.no_grad():
            try:
                self.base(**inputs, use_cache=False)
            except _StopForward:
                pass
        return got["in"], got.get("out")


def plant(
    pair: ModelPair,
    where: str = "low",
    size: float = 1.0,
    layer: int = 0,
    fraction: float = 0.2,
    seed: int = 0,
    relative: bool = True,
    on: str = "base",
) -> PlantedPair:
    """A twin of ``pair.base`` with a planted edit (see the module docstring); use it in ``with``.

    Raises:
        ConfigError: A bad location, size (negative or not finite), fraction or layer.
    """
    return PlantedPair(pair, PlantConfig(where, size, layer, fraction, seed, relative, on=on))
