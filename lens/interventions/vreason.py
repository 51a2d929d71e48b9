"""V-Reason: entropy-guided test-time optimisation of the last layer's video value cache.

V-Reason (Sridhar, Bhardwaj et al., "Video Reasoning without Training", arXiv 2510.17045, CVPR
Findings 2026) has no public code; this is built from the public description (see
``shared/research/papers.md`` §2): a small trainable controller ``ΔV`` is added to the value cache of
the **last** decoder layer at the **video-token** positions. During decoding it is updated every
``k`` generated tokens on the output entropy ``H(p_t)``: the entropy is *raised* (exploration) until
the exponential moving average (EMA) of the entropy has passed its peak, and *lowered*
(exploitation) after. V-Reason (Lite) also prunes the 50% of video tokens whose last-layer value
has the smallest norm. Everything the public text leaves open is a named field of
:class:`VReasonConfig`.

How it runs here (inside ``generate``, no own decoding loop): a forward pre-hook on the generating
model sees every call ``generate`` makes.

* At the prefill (the call that starts from an empty cache) it creates ``ΔV`` (zeros, float32, one
  per decoded row) and wraps ``update`` of generate's own cache object (transformers 5's cache API)
  so that, at every later forward, the last layer reads its values with ``ΔV`` added at the video
  positions. The stored cache stays the model's own values; the offset is added on read, so it is
  differentiable and always the controller's current value.
* At a decode step where ``k`` tokens have been generated since the last update, it runs that step's
  forward once more under ``torch.enable_grad()`` (weights frozen: only ``ΔV`` gets a gradient),
  takes ``steps`` optimiser steps on ``-α · H(p_t)`` (``α = +1`` raises the entropy, ``-1`` lowers
  it), removes the token that forward appended to the cache, and lets the real step go on with the
  updated controller. Greedy, sampling, end tokens and stop strings are ``generate``'s own.
* A forward hook reads each step's raw logits (float32) and feeds the entropy to the
  :class:`EntropySchedule`, which decides ``α``.
* Lite: after the prefill the lowest-norm video tokens are masked out of the attention mask of every
  decode forward (the same outputs as removing them from every layer's cache; the cache tensors are
  not shrunk here, so this saves no memory).

Samples are decoded one at a time (:meth:`VReason.generate_batch` loops); ``n`` sampled rows of one
sample each get their own controller and schedule. Weights are never written and every hook is
removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.batching import Batch
from lens.decoding import DecodingConfig
from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs
from lens.interventions.base import Generation, Intervention, Prepared, frozen_weights

OPTIMIZERS = ("adam", "sgd")
SWITCH_RULES = ("peak", "micro")
PARAMETERISATIONS = ("per_token", "shared")


@dataclass(frozen=True)
class VReasonConfig:
    """Every choice of V-Reason, with the paper's value where public and a stated reason otherwise.

    Attributes:
        lr: Learning rate. Not public. Default 0.01: with Adam the first steps move each coordinate
            by about ``lr`` whatever the gradient's scale, and last-layer value coordinates are of
            order 0.1-1, so one update is a nudge of a few percent (the paper stresses bounded
            per-step entropy change), while a few hundred updates can still move the values by
            their own size. Not tuned.
        every: Update interval ``k`` in generated tokens. Default 2: the paper's step-size
            ablation (Fig. 4) finds ``k = 2`` the most accurate (and the costliest).
        steps: Optimiser steps per update. The paper says "a few"; default 1, the cheapest, since
            with ``k = 2`` the controller is already updated at every other token.
        optimizer: ``"adam"`` (default; the only source naming one, an LLM-written digest, says
            Adam, and Adam's per-coordinate scaling makes ``lr`` mean the same on any model) or
            ``"sgd"``.
        ema_beta: EMA coefficient β, ``ema_t = β·ema_{t-1} + (1-β)·H_t``. Not public. Default 0.9:
            an average over about 10 tokens, which smooths token-level noise (the paper's reason
            for the EMA) yet lets the peak show within a few tens of tokens of a short answer.
        patience: The EMA's peak counts as passed once the EMA has stayed below its running maximum
            for this many consecutive tokens (an online stand-in for the paper's *global* peak,
            which is only known in hindsight). Default 3: a single noisy dip does not end
            exploration. Once passed, the schedule never returns to exploring (the paper's
            macro-exploitation phase).
        switch: The sign rule before the peak. ``"peak"`` (default): always raise the entropy
            before the peak, always lower it after (the macro phases as described). ``"micro"``:
            before the peak raise it when the current entropy is below its EMA and lower it
            otherwise (an inferred reading of the paper's micro exploration/exploitation cycles);
            after the peak always lower it.
        parameterisation: ``"per_token"`` (default): one offset per video token, key/value head and
            channel, the most direct reading of "a controller ΔV added to the value cache";
            ``"shared"``: one offset per head and channel, broadcast over the video tokens.
        lite: V-Reason (Lite): prune the video tokens with the lowest last-layer value norm.
        prune_fraction: Fraction of the video tokens Lite prunes (the paper: 50%).
    """

    lr: float = 0.01
    every: int = 2
    steps: int = 1
    optimizer: str = "adam"
    ema_beta: float = 0.9
    patience: int = 3
    switch: str = "peak"
    parameterisation: str = "per_token"
    lite: bool = False
    prune_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ConfigError(f"V-Reason learning rate must be a number > 0, got {self.lr!r}")
        for name in ("every", "steps", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"V-Reason {name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.ema_beta < 1:
            raise ConfigError(f"V-Reason EMA coefficient must be in [0, 1), got {self.ema_beta}")
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(f"V-Reason Lite prune fraction must be in (0, 1), got {self.prune_fraction}")
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("switch", SWITCH_RULES),
            ("parameterisation", PARAMETERISATIONS),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"V-Reason {name} must be one of {choices}, got {getattr(self, name)!r}")

    def describe(self) -> str:
        lite = f",lite={self.prune_fraction:g}" if self.lite else ""
        return (
            f"vreason[lr={self.lr:g},k={self.every},steps={self.steps},{self.optimizer},"
            f"beta={self.ema_beta:g},{self.switch}/p{self.patience},{self.parameterisation}{lite}]"
        )


# -- the schedule ------------------------------------------------------------------------------------


class EntropySchedule:
    """EMA of each row's output entropy, its online peak, and the sign ``α`` of the objective.

    Feed it every generated step's entropy with :meth:`observe`; :meth:`sign` is ``+1`` (raise the
    entropy: explore) or ``-1`` (lower it: exploit) per row.
    """

    def __init__(self, config: VReasonConfig, rows: int = 1) -> None:
        self.config = config
        self.ema = torch.zeros(rows, dtype=torch.float64)
        self.best = torch.full((rows,), -float("inf"), dtype=torch.float64)
        self.below = torch.zeros(rows, dtype=torch.long)
        self.passed = torch.zeros(rows, dtype=torch.bool)
        self.last = torch.zeros(rows, dtype=torch.float64)
        self.seen = 0

    def observe(self, entropy: torch.Tensor) -> None:
        """One step's entropies ``[rows]`` (nats)."""
        h = entropy.detach().reshape(-1).double().cpu()
        beta = self.config.ema_beta
        self.ema = h.clone() if self.seen == 0 else beta * self.ema + (1 - beta) * h
        self.seen += 1
        self.last = h
        rising = self.ema >= self.best
        self.best = torch.maximum(self.best, self.ema)
        self.below = torch.where(rising, torch.zeros_like(self.below), self.below + 1)
        self.passed |= self.below >= self.config.patience

    def sign(self) -> torch.Tensor:
        """``α`` per row: ``+1.0`` raise the entropy, ``-1.0`` lower it."""
        if self.config.switch == "peak":
            before = torch.ones_like(self.ema)
        else:  # micro: explore while below the trend, exploit while above it
            before = torch.where(self.last < self.ema, 1.0, -1.0).double()
        return torch.where(self.passed, -torch.ones_like(before), before)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dimension, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# -- the controller on generate's cache ------------------------------------------------------------


def attach_controller(cache: Any, layer: int, columns: torch.Tensor, offset: torch.Tensor) -> None:
    """Make ``cache`` return its values of ``layer`` with ``offset`` added at ``columns``.

    Only this cache object's ``update`` is wrapped (never the model). What the cache stores stays
    the model's own values; the offset is added, in float32 and rounded once, to what ``update``
    returns, so every forward reads the controller's current value and gradients reach it.

    Args:
        cache: generate's cache (transformers 5 ``Cache``).
        layer: The decoder layer whose values are offset (V-Reason: the last).
        columns: ``LongTensor[n]`` sequence positions (the video tokens).
        offset: ``[rows, kv_heads, n or 1, head_dim]`` float32.
    """
    update = cache.update

    def offset_update(keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *a: Any, **k: Any) -> Any:
        all_keys, all_values = update(keys, values, layer_idx, *a, **k)
        if layer_idx != layer:
            return all_keys, all_values
        cols = columns.to(all_values.device)
        if all_values.shape[0] != offset.shape[0]:
            raise InputError(
                f"V-Reason prepared {offset.shape[0]} rows, the forward has {all_values.shape[0]}"
            )
        moved = all_values.index_select(2, cols).float() + offset.to(all_values.device)
        out = all_values.clone()
        out[:, :, cols] = moved.to(all_values.dtype)
        return all_keys, out

    cache.update = offset_update


def lowest_norm(values: torch.Tensor, columns: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the ``floor(fraction · n)`` of ``columns`` whose value vectors (all heads) have the smallest norm.

    Args:
        values: ``[rows, kv_heads, seq, head_dim]`` one layer's cached values.
        columns: ``LongTensor[n]`` candidate positions.
        fraction: The share to pick.

    Returns:
        ``LongTensor[rows, floor(fraction · n)]`` positions, ascending norm (ties: earlier first).
    """
    cols = columns.to(values.device)
    norms = values.index_select(2, cols).float().pow(2).sum(dim=(1, 3))  # [rows, n]
    order = torch.argsort(norms, dim=-1, stable=True)
    return cols[order[:, : int(fraction * cols.numel())]]


@dataclass
class VReasonTrace:
    """What one decode did (row-wise; kept as :attr:`VReason.trace` after each ``generate``).

    Attributes:
        entropies: Each generated step's raw-logit entropy per row (nats).
        ema: The EMA after each step, per row.
        updates: The number of generated tokens at each controller update.
        signs: ``α`` per row at each update.
        losses: The objective ``-α·H`` (summed over rows) at each optimiser step.
        pruned: Lite: the pruned positions per row (in the sample's own sequence); else empty.
        offset_norm: ``‖ΔV‖`` at the end.
    """

    entropies: list[list[float]] = field(default_factory=list)
    ema: list[list[float]] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)
    signs: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    pruned: list[list[int]] = field(default_factory=list)
    offset_norm: float = 0.0


@dataclass(frozen=True)
class VReasonPlan:
    """One sample's video positions (what the controller and Lite act on)."""

    video_positions: torch.Tensor
    n_tokens: int


def video_positions(inputs: PairInputs) -> torch.Tensor:
    """The positions of the video tokens, or :class:`InputError` when the sample has none."""
    positions = torch.tensor([i for i, f in enumerate(inputs.frames) if f >= 0], dtype=torch.long)
    if positions.numel() == 0:
        raise InputError("V-Reason acts on video tokens, but this sample has none (give it a video)")
    return positions


class _Run:
    """The state of one ``generate`` call: controller, optimiser, schedule, and the hooks' logic."""

    def __init__(self, config: VReasonConfig, layer: int, columns: torch.Tensor, n_tokens: int) -> None:
        self.config, self.layer, self.columns, self.n_tokens = config, layer, columns, n_tokens
        self.trace = VReasonTrace()
        self.inside = False
        self.generated = 0
        self.cache: Any = None
        self.offset: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: EntropySchedule | None = None
        self.pruned: torch.Tensor | None = None  # [rows, m] in batch columns

    def start(self, kwargs: dict[str, Any], cache: Any) -> None:
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] != self.n_tokens:
            got = None if ids is None else ids.shape[1]
            raise InputError(f"prefill of {got} tokens, but V-Reason was prepared for {self.n_tokens}")
        rows = ids.shape[0]
        self.cache = cache
        self.schedule = EntropySchedule(self.config, rows)

    def create_offset(self) -> None:
        """After the prefill: the controller, shaped like the last layer's cached values."""
        values = self.cache.layers[self.layer].values
        rows, heads, _, dim = values.shape
        width = self.columns.numel() if self.config.parameterisation == "per_token" else 1
        self.offset = torch.zeros(rows, heads, width, dim, dtype=torch.float32, device=values.device)
        self.offset.requires_grad_(True)
        if self.config.optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.offset], lr=self.config.lr)
        else:
            self.optimizer = torch.optim.SGD([self.offset], lr=self.config.lr)
        if self.config.lite:
            self.pruned = lowest_norm(values, self.columns, self.config.prune_fraction)
        attach_controller(self.cache, self.layer, self.columns, self.offset)

    def observe(self, logits: torch.Tensor) -> None:
        h = entropy(logits[:, -1])
        assert self.schedule is not None
        self.schedule.observe(h)
        self.trace.entropies.append(h.tolist())
        self.trace.ema.append(self.schedule.ema.tolist())

    def masked(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.pruned is None:
            return kwargs
        mask = kwargs.get("attention_mask")
        if mask is None:  # no padding: generate passes none; positions come from position_ids
            ids = kwargs["input_ids"]
            length = self.cache.get_seq_length() + ids.shape[1]
            mask = torch.ones(ids.shape[0], length, dtype=torch.long, device=ids.device)
        elif mask.dim() != 2:
            raise ConfigError("V-Reason Lite needs generate's 2-D attention mask")
        else:
            mask = mask.clone()  # generate's own mask stays whole
        mask.scatter_(1, self.pruned.to(mask.device), 0)
        return {**kwargs, "attention_mask": mask}

    def optimise(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        assert self.schedule is not None and self.optimizer is not None and self.offset is not None
        alpha = self.schedule.sign().float().to(self.offset.device)
        self.trace.updates.append(self.generated)
        self.trace.signs.append(alpha.tolist())
        for _ in range(self.config.steps):
            length = self.cache.get_seq_length()
            self.inside = True
            try:
                with torch.enable_grad():
                    out = module(*args, **kwargs)
                    loss = -(alpha * entropy(out.logits[:, -1])).sum()
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                self.optimizer.step()
            finally:
                self.inside = False
                _crop(self.cache, length)
            self.trace.losses.append(float(loss))


def _crop(cache: Any, length: int) -> None:
    """Drop what a forward appended beyond ``length`` tokens (the optimisation step's token)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class VReason(Intervention):
    """V-Reason on the generating model: an entropy-driven controller on the last layer's video values.

    Example:
        >>> vr = VReason(VReasonConfig(every=2, lr=0.01))
        >>> vr.prepare(pair, video_inputs).generate(pair, video_inputs).texts
        >>> vr.trace.updates        # the generated-token counts at which ΔV was updated
    """

    name = "vreason"

    def __init__(self, config: VReasonConfig | None = None, generator: str = "rlvr", **kwargs: Any) -> None:
        super().__init__(generator)
        if config is not None and kwargs:
            raise ConfigError("give VReason either a VReasonConfig or keyword settings, not both")
        self.config = config or VReasonConfig(**kwargs)
        self.trace: VReasonTrace | None = None

    def setting(self) -> str:
        described = self.config.describe()
        return described if self.generator == "rlvr" else f"base-{described}"

    def prepare(self, pair: Any, inputs: PairInputs) -> VReason:
        """Keep the sample's video positions.

        Raises:
            InputError: A sample without video tokens.
        """
        self._plan = VReasonPlan(video_positions(inputs), inputs.n_tokens)
        return super().prepare(pair, inputs)  # type: ignore[return-value]

    def _detail(self) -> VReasonPlan:
        return self._plan

    @contextmanager
    def _hooks(
        self, pair: Any, states: Sequence[Prepared], batch: Batch | None, copies: int | None
    ) -> Iterator[nn.Module]:
        model = self.model(pair)
        with frozen_weights(model), super()._hooks(pair, states, batch, copies) as hooked:
            yield hooked

    def _install(
        self,
        model: nn.Module,
        adapter: Any,
        states: Sequence[Prepared],
        batch: Batch | None,
        copies: int | None,
    ) -> list[RemovableHandle]:
        if len(states) != 1:
            raise ConfigError("V-Reason decodes one sample at a time (generate_batch loops)")
        plan: VReasonPlan = states[0].detail
        columns = plan.video_positions if batch is None else batch.shift(0, plan.video_positions)
        n_tokens = plan.n_tokens if batch is None else batch.n_tokens
        run = _Run(self.config, adapter.n_layers(model) - 1, columns, n_tokens)
        self.trace = run.trace

        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            if run.inside:
                return None
            cache = kwargs.get("past_key_values")
            if cache is None or not kwargs.get("use_cache", True):
                raise ConfigError("V-Reason acts on the KV cache: decode with generate() (with a cache)")
            if cache.get_seq_length() == 0:
                run.start(kwargs, cache)
                return None
            if cache is not run.cache:
                raise ConfigError("V-Reason saw a forward on another cache during its decode")
            kwargs = run.masked(kwargs)
            if run.generated % self.config.every == 0:
                run.optimise(module, args, kwargs)
            return args, kwargs

        def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if run.inside:
                return
            if run.offset is None:  # the prefill has filled the cache
                run.create_offset()
                if run.pruned is not None:
                    shift = 0 if batch is None else int(batch.pads[0])
                    run.trace.pruned = (run.pruned.cpu() - shift).tolist()
            run.observe(output.logits)
            run.generated += 1
            run.trace.offset_norm = float(run.offset.detach().norm()) if run.offset is not None else 0.0

        return [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]

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
        """Decode each sample on its own (the controller is per sample), in order.

        ``self.trace`` afterwards describes the last sample's decode.
        """
        if not states:
            raise ConfigError("generate_batch() needs at least one prepared sample")
        out: list[Generation] = []
        for state in states:
            out.extend(
                super().generate_batch(
                    pair, [state], decoding, n=n, do_sample=do_sample, seed=seed, first_logits=first_logits
                )
            )
        return out


__all__ = [
    "EntropySchedule",
    "VReason",
    "VReasonConfig",
    "VReasonPlan",
    "VReasonTrace",
    "attach_controller",
    "entropy",
    "lowest_norm",
    "video_positions",
]
