"""PTI: prefill-time steering of the KV cache (Zhang et al., arXiv 2604.25642, CVPR 2026).

PTI steers the key/value cache once, right after the prefill, then decodes normally. At every
steered layer and key/value head it rotates

* the cache of every **image token** towards the image direction (object-only minus
  background-only images), and
* the cache of the **last text token** towards the text direction (object words vs none),

with a norm-preserving, adaptive step (released ``steer_kv_cache_add``), for a cache vector ``x``,
a direction ``s`` and a strength ``λ``::

    λ_sim = 1 + max(0, cos(x, -s))
    x'    = normalize(normalize(x) + λ · λ_sim · normalize(s)) · ‖x‖

so ``‖x'‖ = ‖x‖`` and vectors that point away from ``s`` get a larger step. Directions come from
:mod:`lens.interventions.pti_directions` and are refused for any other pair.

How it is applied (``mode``):

* ``"released"`` (default) does what the released code does: the prompt *minus its last token* is
  prefilled unsteered, the cache is steered (text: the last cached token, i.e. the prompt's
  second-to-last), and the last prompt token is then fed against the steered cache, which gives the
  first generated token. Here this happens inside the one ``generate`` call: a forward pre-hook on
  the model catches the prefill (the call that starts from an empty cache), runs the prefix through
  ``model.base_model`` into generate's own ``DynamicCache``, steers ``cache.layers[l].keys/.values``
  in place (transformers 5's cache API: ``key_cache``/``value_cache`` are gone) and lets the call go
  on with the last token only. Decode steps start from a non-empty cache and pass through untouched.
  It costs one more single-token forward than a plain prefill (the released code pays it too).
* ``"inline"``: one prefill forward; each layer's keys and values are steered as they are written
  to the cache (``cache.update`` of generate's cache wrapped for the prefill call only), so the
  prompt tokens after the image also attend to the steered image cache, and the text position is
  the prompt's last token. No extra forward; a variant, not the released algorithm.

Keys are steered as cached, i.e. after the rotary embedding, exactly where the directions were read.
Batched and sampled decoding (several rows per sample) work: each row is steered at its own
(left-padding shifted) positions. Weights are never written; the hook is removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.batching import Batch
from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs
from lens.interventions.base import PIXEL_KEYS, Intervention, Prepared, check_layers, require_visual
from lens.interventions.pti_directions import PTIDirections

MODES = ("released", "inline")
#: Forward arguments laid out along the prompt (their last dimension is the sequence).
SEQUENCE_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cache_position",
    "mm_token_type_ids",
    "token_type_ids",
)
#: Arguments that carry the images: the prefix needs them, the last (text) token must not get them.
VISION_KEYS = (*PIXEL_KEYS, "mm_encoder_outputs", "image_embeds")
#: Arguments of the top model that its decoder body (``base_model``) does not take.
HEAD_ONLY_KEYS = ("logits_to_keep", "labels", "return_dict")


@dataclass(frozen=True)
class PTIConfig:
    """How strongly, where and how PTI steers.

    Attributes:
        image_keys: λ for the image tokens' keys. PTI's README and ``test.sh`` default: 0.1.
        image_values: λ for the image tokens' values. Default 0.6 (the same source).
        text_keys: λ for the last text token's keys. Default 0.1 ("best practice": the same λ
            for image and text).
        text_values: λ for the last text token's values. Default 0.6.
        layers: Layers to steer; ``None`` (default) steers every layer, as PTI steers every layer
            of its direction dict.
        text_position: The steered text position, counted from the end of the cache at steering
            time. Default -1, PTI's ``how="last"``: in ``released`` mode the cache holds the prompt
            minus its last token, so this is the prompt's second-to-last token; in ``inline`` mode
            the prompt's last token.
        mode: ``"released"`` (default: faithful to the released code) or ``"inline"`` (one
            prefill forward; see the module docstring).
    """

    image_keys: float = 0.1
    image_values: float = 0.6
    text_keys: float = 0.1
    text_values: float = 0.6
    layers: tuple[int, ...] | None = None
    text_position: int = -1
    mode: str = "released"

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        for name in ("image_keys", "image_values", "text_keys", "text_values"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ConfigError(f"PTI strength {name} must be a number >= 0, got {value!r}")
        if self.mode not in MODES:
            raise ConfigError(f"PTI mode must be one of {MODES}, got {self.mode!r}")
        if self.text_position >= 0:
            raise ConfigError(f"PTI text_position counts from the end (< 0), got {self.text_position}")

    def strength(self, site: str, part: str) -> float:
        return float(getattr(self, f"{site}_{part}"))


def steer(x: torch.Tensor, direction: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """PTI's norm-preserving step of cache vectors ``x [..., dim]`` towards ``direction`` (broadcast).

    ``strength`` is λ: a number, or a tensor that broadcasts against ``x[..., :1]`` (one λ per
    vector). Computed in float32 (whatever the cache dtype) and rounded once to ``x.dtype``. A zero
    direction leaves ``x`` as is; a zero ``x`` stays zero.
    """
    x32, s = x.float(), direction.float().to(x.device)
    norm = x32.norm(dim=-1, keepdim=True)
    cos = F.cosine_similarity(x32, -s.expand_as(x32), dim=-1, eps=1e-12)
    step = strength * (1.0 + cos.clamp_min(0.0)).unsqueeze(-1) * F.normalize(s, dim=-1)
    return (F.normalize(F.normalize(x32, dim=-1) + step, dim=-1) * norm).to(x.dtype)


@dataclass(frozen=True)
class PTIPlan:
    """One sample's steering: where, and with what (for records and tests).

    Attributes:
        image_positions: The image tokens' positions in the sample's own sequence.
        text_position: The steered text position in the sample's own sequence.
        n_tokens: The prompt length.
        layers: The steered layers.
    """

    image_positions: torch.Tensor
    text_position: int
    n_tokens: int
    layers: tuple[int, ...]

    @property
    def n_selected(self) -> dict[int, int]:
        """Steered positions per layer (image tokens + the text token)."""
        return {layer: int(self.image_positions.numel()) + 1 for layer in self.layers}


class PTI(Intervention):
    """Steer the generating model's KV cache once at the prefill, with directions of this pair.

    Example:
        >>> directions = PTIDirections.load("pti.safetensors")   # `lens pti directions`
        >>> pti = PTI(directions)                                 # PTI's default strengths
        >>> pti.prepare(pair, inputs).generate(pair, inputs).texts
    """

    name = "pti"

    def __init__(self, directions: PTIDirections, config: PTIConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(directions, PTIDirections):
            raise ConfigError(f"PTI needs PTIDirections, got {type(directions).__name__}")
        super().__init__(directions.config.model)
        if config is not None and kwargs:
            raise ConfigError("give PTI either a PTIConfig or keyword settings, not both")
        self.config = config or PTIConfig(**kwargs)
        self.directions = directions
        layers = self.config.layers
        self._layers = check_layers(
            layers if layers is not None else range(directions.shape[0]), directions.shape[0]
        )
        self._checked: set[int] = set()
        self._setting: str | None = None

    def setting(self) -> str:
        if self._setting is None:  # built once: it hashes the directions
            self._setting = self._describe()
        return self._setting

    def _describe(self) -> str:
        c = self.config
        layers = "all" if c.layers is None else ",".join(map(str, self._layers))
        return (
            f"pti[{c.mode},img=k{c.image_keys:g}/v{c.image_values:g},txt=k{c.text_keys:g}/v{c.text_values:g},"
            f"pos={c.text_position},layers={layers},dirs={self.directions.digest()}]"
        )

    def prepare(self, pair: Any, inputs: PairInputs) -> PTI:
        """Check the pair and the sample, and keep where the cache will be steered.

        Raises:
            PairMismatchError: Directions computed on another pair.
            InputError: Directions that do not fit the model, or a sample without image tokens.
        """
        self._check_pair(pair)
        positions = require_visual(inputs, "PTI")
        cached = inputs.n_tokens - (1 if self.config.mode == "released" else 0)
        text = cached + self.config.text_position
        if not 0 <= text < cached:
            raise InputError(
                f"PTI text position {self.config.text_position} is outside a {cached}-token cache"
            )
        if text in set(positions.tolist()):
            raise InputError(
                f"PTI's text position {text} is an image token; the prompt has no text after the image"
            )
        self._plan = PTIPlan(positions.cpu(), text, inputs.n_tokens, self._layers)
        return super().prepare(pair, inputs)  # type: ignore[return-value]

    def _detail(self) -> PTIPlan:
        return self._plan

    def _check_pair(self, pair: Any) -> None:
        if id(pair) in self._checked:
            return
        self.directions.check_pair(pair)
        model = self.model(pair)
        text = pair.adapter.text_config(model.config)
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        self.directions.check_model(pair.adapter.n_layers(model), kv_heads, head_dim)
        self._checked.add(id(pair))

    # -- applying it -------------------------------------------------------------------------------
    def _install(
        self,
        model: nn.Module,
        adapter: Any,
        states: Sequence[Prepared],
        batch: Batch | None,
        copies: int | None,
    ) -> list[RemovableHandle]:
        if batch is None and len(states) != 1:
            raise ConfigError("several samples need their batch")
        n_tokens = batch.n_tokens if batch is not None else states[0].inputs.n_tokens
        columns = []  # per sample: (image columns, text column) in the padded sequence
        for index, state in enumerate(states):
            plan: PTIPlan = state.detail
            if batch is None:
                columns.append((plan.image_positions, plan.text_position))
            else:
                shifted = batch.shift(index, torch.tensor([plan.text_position]))
                columns.append((batch.shift(index, plan.image_positions), int(shifted[0])))
        steer_rows = _RowSteering(self.directions, self.config, self._layers, columns, copies)
        if self.config.mode == "released":
            hook = _released_hook(n_tokens, steer_rows)
        else:
            hook = _inline_hook(n_tokens, steer_rows)
        return [model.register_forward_pre_hook(hook, with_kwargs=True)]


class _RowSteering:
    """Steers one layer's ``[rows, kv_heads, seq, head_dim]`` keys/values at each row's positions.

    Each sample's image columns and text column are steered in one gather, one :func:`steer` and
    one in-place write (the tensors are generate's own cache states), with per-column directions
    and strengths built once per (layer, part, device).
    """

    def __init__(
        self,
        directions: PTIDirections,
        config: PTIConfig,
        layers: tuple[int, ...],
        columns: list[tuple[torch.Tensor, int]],
        copies: int | None,
    ) -> None:
        self.directions, self.config, self.layers = directions, config, set(layers)
        self.n_layers = directions.shape[0]
        self.copies = copies
        # Per sample: its columns, image ones first then the text one.
        self.columns = [torch.cat([image.long(), torch.tensor([text])]) for image, text in columns]
        self._cache: dict[tuple[int, str, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, n_rows: int) -> list[tuple[slice, torch.Tensor]]:
        if self.copies is None:
            if len(self.columns) != 1:
                raise ConfigError("several samples need their row count")
            return [(slice(None), self.columns[0])]
        if n_rows != len(self.columns) * self.copies:
            raise InputError(f"PTI prepared {len(self.columns)}×{self.copies} rows, the prefill has {n_rows}")
        return [(slice(i * self.copies, (i + 1) * self.copies), c) for i, c in enumerate(self.columns)]

    def _per_column(
        self, layer: int, part: str, n_image: int, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        key = (layer, part, n_image, device)
        if key not in self._cache:
            image = self.directions.direction("image", part)[layer].float()  # [kv_heads, head_dim]
            text = self.directions.direction("text", part)[layer].float()
            per_column = torch.cat([image[:, None].expand(-1, n_image, -1), text[:, None]], dim=1)
            strengths = torch.tensor(
                [self.config.strength("image", part)] * n_image + [self.config.strength("text", part)]
            )[:, None]
            self._cache[key] = (per_column[None].to(device), strengths.to(device))
        return self._cache[key]

    def __call__(self, layer: int, part: str, states: torch.Tensor) -> torch.Tensor:
        """``states`` with this layer's ``part`` (``keys``/``values``) steered, in place."""
        if layer not in self.layers:
            return states
        for rows, columns in self.rows(states.shape[0]):
            cols = columns.to(states.device)
            direction, strength = self._per_column(layer, part, cols.numel() - 1, states.device)
            block = states[rows].index_select(2, cols)  # [r, kv_heads, columns, head_dim]
            states[rows, :, cols] = steer(block, direction, strength)
        return states


def _cut(kwargs: dict[str, Any], part: slice, drop: Sequence[str], cut_mask: bool) -> dict[str, Any]:
    """``kwargs`` along ``part`` of the prompt; the attention mask is kept whole unless ``cut_mask``
    (a call after the prefix attends to the cache and itself)."""
    out = {}
    for key, value in kwargs.items():
        if key in drop:
            continue
        if key in SEQUENCE_KEYS and torch.is_tensor(value) and (cut_mask or key != "attention_mask"):
            value = value[..., part]
        out[key] = value
    return out


def _prefill_cache(kwargs: dict[str, Any], n_tokens: int) -> Any:
    """generate's cache when this call is the prefill (empty cache, the whole prompt), else ``None``."""
    cache = kwargs.get("past_key_values")
    ids = kwargs.get("input_ids")
    if cache is not None and cache.get_seq_length() > 0:
        return None  # a decode step: untouched (it reads the steered cache)
    if cache is None or ids is None or not kwargs.get("use_cache", True):
        raise ConfigError("PTI steers the KV cache: decode with generate() (a cache and input_ids)")
    if ids.shape[1] != n_tokens:
        raise InputError(f"prefill of {ids.shape[1]} tokens, but PTI was prepared for {n_tokens}")
    return cache


def _released_hook(n_tokens: int, steering: _RowSteering) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        cache = _prefill_cache(kwargs, n_tokens)
        if cache is None:
            return None
        if args:
            raise ConfigError("PTI expects generate's keyword-argument forward calls")
        # The prompt minus its last token, unsteered, into generate's own cache (no unembedding).
        module.base_model(**_cut(kwargs, slice(None, -1), HEAD_ONLY_KEYS, cut_mask=True))
        for index, layer in enumerate(cache.layers):
            layer.keys = steering(index, "keys", layer.keys)
            layer.values = steering(index, "values", layer.values)
        # The call goes on with the last prompt token against the steered cache.
        return args, _cut(kwargs, slice(-1, None), VISION_KEYS, cut_mask=False)

    return hook


def _inline_hook(n_tokens: int, steering: _RowSteering) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        cache = _prefill_cache(kwargs, n_tokens)
        if cache is None:
            return None
        update = cache.update  # the class's method, bound
        written: set[int] = set()

        def steered_update(
            keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *a: Any, **k: Any
        ) -> Any:
            if keys.shape[-2] == n_tokens and layer_idx not in written:
                keys, values = steering(layer_idx, "keys", keys), steering(layer_idx, "values", values)
                written.add(layer_idx)
                if len(written) == steering.n_layers:
                    del cache.update  # the prefill has written every layer: decode steps see the class's
            return update(keys, values, layer_idx, *a, **k)

        cache.update = steered_update  # this generate call's cache object only, never the model
        return None

    return hook
