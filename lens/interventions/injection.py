"""Hard cross-model injection: overwrite the RLVR residual stream with the base's at chosen positions.

This is the released agent/video "replay" primitive (a gradient-free swap during the RLVR prefill)
and the tool behind the paper's low- vs high-entropy intervention study (Table 1).

Depth convention (``depth``):
    * ``"released"`` (default): the *input* of block L (``hidden_states[L]``) is replaced with the
      base's input of block L, at positions selected by the base entropy at the *output* of block L
      (``hidden_states[L + 1]``). This is what the released code does (DE:35-70): the selection is
      one block deeper than the swap.
    * ``"same"``: the *output* of block L is replaced with the base's output of block L, selected by
      the entropy of that same state.

Entropies are computed in float32 with each model's own final norm and unembedding (the released
code computes them in bf16; see :mod:`lens.interventions.replay` for why we do not copy that).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs
from lens.interventions.base import (
    Intervention,
    PrefillEdit,
    capture_block_residuals,
    check_layers,
    require_visual,
)
from lens.logit_lens import lens_entropy, lens_of
from lens.masks import MASK_RULES, RELEASED_THRESHOLDS, EntropyMask, check_tau

RULES = MASK_RULES


@dataclass(frozen=True)
class InjectionConfig:
    """Which (layer, position)s get the base's residual stream.

    Attributes:
        layers: Decoder layers to edit (released agent/video code: 0..6).
        select: ``"low"`` or ``"high"`` base-entropy positions.
        rule: ``"tau_max"`` (≤ τ × per-layer max over candidates), ``"fixed"`` (per-layer
            thresholds in nats) or ``"quantile"``.
        tau: τ of the ``tau_max`` rule.
        thresholds: One threshold per entry of ``layers`` for the ``fixed`` rule.
        require_base_below_rlvr: Also require base entropy < RLVR entropy for "low" (the released
            fixed rule does); ``None`` means "as released": on for ``fixed``, off otherwise.
        quantile: Quantile of the ``quantile`` rule.
        scope: ``"visual"`` (visual tokens only, as the paper describes) or ``"all"`` positions
            (as the released agent/video code does). On a conversation, ``"all"`` is every position
            of every turn (system, earlier replies, tool responses) and ``"visual"`` the tokens of
            every image of every turn. The default stays ``"visual"``, the paper's description and
            what the image-math analyses compare; :meth:`HardInjection.released_agent` sets ``"all"``.
        depth: ``"released"`` or ``"same"`` (see the module docstring).
        token_chunk: Positions per lens projection (bounds memory at ``chunk × vocab``).
    """

    layers: tuple[int, ...] = tuple(range(7))
    select: str = "low"
    rule: str = "tau_max"
    tau: float = 0.4
    thresholds: tuple[float, ...] = RELEASED_THRESHOLDS
    require_base_below_rlvr: bool | None = None
    quantile: float = 0.5
    scope: str = "visual"
    depth: str = "released"
    token_chunk: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if self.select not in ("low", "high"):
            raise ConfigError(f"select must be 'low' or 'high', got {self.select!r}")
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.scope not in ("visual", "all"):
            raise ConfigError(f"scope must be 'visual' or 'all', got {self.scope!r}")
        if self.depth not in ("released", "same"):
            raise ConfigError(f"depth must be 'released' or 'same', got {self.depth!r}")
        if self.rule == "tau_max":
            check_tau(self.tau)
        if self.rule == "quantile" and not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"quantile must be in (0, 1), got {self.quantile}")
        if self.rule == "fixed" and len(self.thresholds) != len(self.layers):
            raise ConfigError(f"{len(self.thresholds)} thresholds for {len(self.layers)} layers")
        if self.token_chunk < 1:
            raise ConfigError(f"token_chunk must be >= 1, got {self.token_chunk}")

    @property
    def mask(self) -> EntropyMask:
        """The selection rule as an :class:`~lens.masks.EntropyMask`."""
        return EntropyMask(
            rule=self.rule,
            tau=self.tau if self.rule == "tau_max" else 0.4,
            quantile=self.quantile if self.rule == "quantile" else 0.5,
            thresholds=self.thresholds,
            require_base_below_rlvr=self.require_base_below_rlvr,
        )

    @property
    def base_below_rlvr(self) -> bool:
        """Whether "low" also requires base < RLVR entropy."""
        return self.mask.base_below_rlvr


@dataclass
class InjectionPlan:
    """One sample's edit: per layer, the positions and the base values written there.

    Attributes:
        positions: ``{layer: LongTensor[n]}`` sequence positions edited at that layer.
        values: ``{layer: [n, hidden]}`` the base's residual at those positions (model dtype).
        base_entropy: ``[layers, candidates]`` float32 base entropy at the candidate positions.
        candidates: The candidate positions (visual tokens or all).
        n_tokens: Prompt length (the prefill's sequence length).
    """

    positions: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    base_entropy: torch.Tensor
    candidates: torch.Tensor
    n_tokens: int
    n_selected: dict[int, int] = field(default_factory=dict)


class HardInjection(Intervention):
    """Replace the RLVR residual stream with the base's at selected positions, in the prefill only.

    Example:
        >>> inj = HardInjection(layers=range(7), select="low", rule="tau_max", tau=0.4)
        >>> inj.prepare(pair, inputs).generate(pair, inputs).texts
    """

    name = "hard"

    def __init__(self, layers: Sequence[int] = tuple(range(7)), **kwargs: Any) -> None:
        super().__init__("rlvr")
        self.config = InjectionConfig(layers=tuple(layers), **kwargs)
        self.plan: InjectionPlan | None = None

    @classmethod
    def released_agent(cls, **overrides: Any) -> HardInjection:
        """The swap of the released agent and video code (DeepEyes, Video-R1), settings as released.

        Layers 0..6, the fixed per-layer thresholds (:data:`~lens.masks.RELEASED_THRESHOLDS`) with
        base < RLVR entropy, low entropy, the input of block L swapped (``depth="released"``), and the
        mask over **all positions** (``scope="all"``: system prompt, text, every image and every
        earlier turn), as latentcraft/replay ``deepeyes/replay_eval/*.py`` builds it (see
        ``shared/research/replay_official.md`` §3.4). Any setting can be overridden, e.g.
        ``scope="visual"`` to restrict the swap to the visual tokens of every turn.
        """
        settings: dict[str, Any] = dict(
            layers=tuple(range(len(RELEASED_THRESHOLDS))),
            select="low",
            rule="fixed",
            thresholds=RELEASED_THRESHOLDS,
            scope="all",
            depth="released",
        )
        settings.update(overrides)
        return cls(**settings)

    def setting(self) -> str:
        c = self.config
        return f"hard-{c.select}[{c.mask.tag()},layers={_span(c.layers)},scope={c.scope},depth={c.depth}]"

    def prepare(self, pair: Any, inputs: PairInputs) -> HardInjection:
        """Select positions from the base entropy and keep the base values to inject.

        Raises:
            ConfigError: Layers beyond the model.
            InputError: ``scope="visual"`` on a sample with no visual tokens.
        """
        c = self.config
        layers = check_layers(c.layers, pair.n_layers)
        n_tokens = inputs.n_tokens
        if c.scope == "visual":
            candidates = require_visual(inputs, "a visual-scope injection")
        else:
            candidates = torch.arange(n_tokens)
        if candidates.numel() == 0:
            raise InputError("the sample has no positions to edit")
        source = "in" if c.depth == "released" else "out"
        base_states = capture_block_residuals(
            pair.base,
            pair.adapter,
            inputs.model_inputs,
            inputs_of=layers if source == "in" else (),
            outputs_of=layers,
        )
        base_entropy = self._entropy(pair.base, pair.adapter, base_states, layers, candidates)
        rlvr_entropy = None
        if c.base_below_rlvr:
            rlvr_states = capture_block_residuals(
                pair.rlvr, pair.adapter, inputs.model_inputs, outputs_of=layers
            )
            rlvr_entropy = self._entropy(pair.rlvr, pair.adapter, rlvr_states, layers, candidates)
        everything = torch.ones(candidates.numel(), dtype=torch.bool)
        chosen = c.mask.select(base_entropy, everything, c.select, rlvr_entropy)
        positions, values, n_selected = {}, {}, {}
        for row, layer in enumerate(layers):
            pos = candidates[chosen[row].cpu()]
            n_selected[layer] = int(pos.numel())
            if pos.numel():
                positions[layer] = pos.to(pair.device)
                values[layer] = base_states[(source, layer)][positions[layer]]
        if not positions:
            warnings.warn(
                f"{self.setting()}: no position selected at any layer; decoding is unchanged"
                + c.mask.empty_hint(),
                stacklevel=2,
            )
        self.plan = InjectionPlan(positions, values, base_entropy.cpu(), candidates, n_tokens, n_selected)
        return super().prepare(pair, inputs)  # type: ignore[return-value]

    def _entropy(
        self,
        model: nn.Module,
        adapter: Any,
        states: dict[tuple[str, int], torch.Tensor],
        layers: tuple[int, ...],
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        lens = lens_of(model, adapter)
        idx = candidates.to(states[("out", layers[0])].device)
        rows = [lens_entropy(lens, states[("out", L)][idx], self.config.token_chunk) for L in layers]
        return torch.stack(rows).cpu()

    def _edits(self, pair: Any) -> list[PrefillEdit]:
        plan = self.plan
        assert plan is not None
        site = "input" if self.config.depth == "released" else "output"
        return [
            PrefillEdit(layer, site, pos, plan.values[layer], "set") for layer, pos in plan.positions.items()
        ]

    def _detail(self) -> InjectionPlan | None:
        return self.plan


def _span(layers: tuple[int, ...]) -> str:
    if len(layers) > 1 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(i) for i in layers)
