"""Activation Replay (Xing et al., CVPR 2026): test-time offsets on the visual tokens.

Zero-initialised offsets Δ (one vector per visual token) are added to the RLVR model's input of
block 0 at the visual positions and optimised with plain gradient steps so that the RLVR logit-lens
distributions match the base's at low-entropy visual tokens. The model then decodes with Δ added in
the prefill only.

The default (``variant="released"``) is exactly the released algorithm
(``vlmevalkit/vlmeval/vlm/replay_qwen2_vl.py``), bugs that define it included:

* mask, per layer L: visual tokens with base entropy ≤ τ · max over visual tokens, the entropy taken
  at the *output* of block L (``hidden_states[L + 1]``) (``rule="tau_max"``, the default);
* loss, per layer: KL(P_base ‖ P_rlvr) over the base's top-k ids, both renormalised by a softmax over
  those k logits, averaged over the selected tokens (``batchmean``). The base side is the output of
  block L but the RLVR side is the *input* of block L (the off-by-one "B1"); at L = 0 it is the
  embeddings plus Δ;
* total = Σ_L loss_L, divided by the number of visual tokens (``normalize``), a double normalisation;
* Δ ← Δ − α ∇Δ, ``steps`` times; the first loss is the unmodified RLVR's; a step whose loss is
  exactly zero is skipped; no loss after the last update (we report it separately as ``final_loss``).

``variant="paper"`` pairs equal depths (RLVR output of block L against base output of block L).
``select="high"`` inverts the mask within the visual tokens (the paper's high-entropy control).
``rule="quantile"`` replaces the τ·max threshold with a rank-based one: per layer, the visual tokens
with base entropy ≤ that layer's q-quantile over the image's visual tokens (``"high"``: the rest).
On small models whose early-layer lens entropies are near-uniform (the organism: 5.0-5.6 nats
against ln V = 5.6) the τ·max rule selects nothing; the quantile rule always selects about a
fraction q. Everything else (loss, depths, update) is unchanged.

Precision: the lens (final norm + unembedding), the KL and Δ are float32 whatever the model dtype.
The released code does all of this in bf16 (a manual bf16 RMSNorm for the loss, "B2", and a bf16
SGD update, "B7"): those are quantisation artefacts, not part of the method, so we do not replicate
them. In a bf16 (or fp16) model, adding the float32 Δ to the bf16 embeddings is not enough either:
``bf16(e + Δ) == e`` wherever |Δ| is below half an ulp of the embedding, and with α = 10, a 7B-wide
pair and ~1,200 visual tokens every update is, so the loss stays flat (issue 8). Hence the
*float32 residual carry* (``residual="float32"``, the default; :class:`VisualResidual`): at the
visual positions the residual stream r is kept in float32 from the input of block 0 through the
last replay layer. Δ enters it exactly, ``r_0 = float(e) + Δ``; every block still runs in the model
dtype on the rounded stream, and only its contribution is added back,
``r_{l+1} = r_l + (float(block(bf16(r_l))) − float(bf16(r_l)))``; the lens reads r. The gradient is
the model's own (the casts are identities in the backward pass), and the decoding prefill installs
the same hooks, so the model decodes from exactly the forward that was optimised. In float32 (and
float64) models the carry is off and nothing changes. ``residual="model"`` restores the old rule
(Δ cast to the model dtype at the input of block 0), to measure the difference. Alternatives
considered: running the replay layers in float32 (exact, but a float32 copy of up to 16 blocks,
~17 GB at 7B, and it optimises a different model than the one that decodes), ``torch.autocast``
over float32 inputs (the residual adds become float32, but what else is upcast depends on the
device's autocast op lists and on each family's layer code), and adding Δ after block 0 (moves the
method's injection point and is rounded away again at block 1's output).

Speed (same numbers, less work): the base side runs once and keeps only the top-k ids and
log-probabilities at the selected positions; the RLVR side runs the vision tower once (``inputs_embeds``,
or the family's cached vision inputs, see ``ArchitectureAdapter.cached_vision_inputs``),
stops its forward at the last replay layer, projects only the k unembedding rows it needs, and builds
no graph for the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.batching import Batch
from lens.errors import ConfigError, InputError
from lens.inputs import PairInputs
from lens.interventions.base import (
    PIXEL_KEYS,
    Intervention,
    PrefillEdit,
    Prepared,
    _StopForward,
    capture_block_residuals,
    check_layers,
    edit_input,
    edit_output,
    frozen_weights,
    installed,
    require_visual,
)
from lens.logit_lens import entropy_from_logits, lens_of
from lens.masks import EntropyMask


@dataclass(frozen=True)
class ReplayConfig:
    """Activation Replay hyper-parameters (defaults: the released MM-Eureka-7B config).

    Attributes:
        tau: Mask threshold as a fraction of the per-layer max base entropy over visual tokens
            (``rule="tau_max"``).
        alpha: Step size of the plain gradient update.
        steps: Number of gradient steps.
        layers: Decoder layers whose lens enters the loss (released: 0..15).
        topk: Base top-k ids the KL is restricted to.
        variant: ``"released"`` (RLVR input of block L vs base output of block L) or ``"paper"``
            (both sides at the output of block L).
        select: ``"low"`` (the method) or ``"high"`` (inverted mask within visual tokens).
        normalize: Divide the summed layer losses by the number of visual tokens (released: yes).
        token_chunk: Positions per full-vocabulary projection on the base side.
        rule: Mask rule, ``"tau_max"`` (released) or ``"quantile"`` (see the module docstring).
        quantile: q of the ``quantile`` rule, in (0, 1).
        residual: Precision of the residual stream at the visual positions through the replay
            layers in a bf16/fp16 model: ``"float32"`` (the float32 carry, see the module docstring)
            or ``"model"`` (Δ cast to the model dtype at the input of block 0; updates below half an
            ulp vanish). Float32 models give the same numbers either way.
    """

    tau: float = 0.4
    alpha: float = 10.0
    steps: int = 25
    layers: tuple[int, ...] = tuple(range(16))
    topk: int = 50
    variant: str = "released"
    select: str = "low"
    normalize: bool = True
    token_chunk: int = 256
    rule: str = "tau_max"
    quantile: float = 0.3
    residual: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        if self.rule not in ("tau_max", "quantile"):
            raise ConfigError(f"replay mask rule must be 'tau_max' or 'quantile', got {self.rule!r}")
        _ = self.mask  # validates tau and quantile
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps}")
        if not self.layers:
            raise ConfigError("no replay layers given")
        if self.topk < 1:
            raise ConfigError(f"topk must be >= 1, got {self.topk}")
        if self.variant not in ("released", "paper"):
            raise ConfigError(f"variant must be 'released' or 'paper', got {self.variant!r}")
        if self.select not in ("low", "high"):
            raise ConfigError(f"select must be 'low' or 'high', got {self.select!r}")
        if self.token_chunk < 1:
            raise ConfigError(f"token_chunk must be >= 1, got {self.token_chunk}")
        if self.residual not in ("float32", "model"):
            raise ConfigError(f"residual must be 'float32' or 'model', got {self.residual!r}")

    @property
    def mask(self) -> EntropyMask:
        """The visual-token selection rule."""
        return EntropyMask(rule=self.rule, tau=self.tau, quantile=self.quantile)


@dataclass(frozen=True)
class ReplayTargets:
    """The base side of the loss, computed once per sample.

    Attributes:
        base_entropy: ``[layers, n_visual]`` float32 base entropy at the visual tokens.
        selected: ``{layer: LongTensor[n_sel]}`` indices *into the visual tokens* in the mask.
        topk_ids: ``{layer: [n_sel, k]}`` the base's top-k vocabulary ids there.
        topk_logp: ``{layer: [n_sel, k]}`` base log-probabilities renormalised over those k ids.
    """

    base_entropy: torch.Tensor
    selected: dict[int, torch.Tensor]
    topk_ids: dict[int, torch.Tensor]
    topk_logp: dict[int, torch.Tensor]

    @property
    def n_selected(self) -> dict[int, int]:
        return {layer: int(idx.numel()) for layer, idx in self.selected.items()}


@dataclass(frozen=True)
class ReplayResult:
    """What one sample's optimisation produced.

    Attributes:
        offsets: ``[n_visual, hidden]`` float32 learned Δ (raster order of the visual tokens).
        losses: The loss at Δ_t before update t, for t = 0..steps-1 (``losses[0]`` = unmodified RLVR).
        final_loss: The loss at the final Δ (the released code never computes it).
        n_selected: Selected visual tokens per layer.
        n_visual: Number of visual tokens.
        skipped_steps: Steps skipped because the loss was exactly zero.
        loss_changed: Whether any loss after the first (``final_loss`` included) differs from
            ``losses[0]``; False means the updates never reached the forward (a warning says so).
    """

    offsets: torch.Tensor
    losses: tuple[float, ...]
    final_loss: float
    n_selected: dict[int, int]
    n_visual: int
    skipped_steps: int
    loss_changed: bool


def base_targets(pair: Any, inputs: PairInputs, config: ReplayConfig) -> ReplayTargets:
    """Base entropy, mask, top-k ids and renormalised log-probabilities, from one base forward."""
    visual = require_visual(inputs, "Activation Replay")
    layers = config.layers
    states = capture_block_residuals(pair.base, pair.adapter, inputs.model_inputs, outputs_of=layers)
    lens = lens_of(pair.base, pair.adapter)
    vis = visual.to(pair.device)
    # One full-vocabulary projection per (layer, visual token) gives both the entropy and the top-k,
    # on the visual positions only (the mask never looks elsewhere; released inefficiency 6).
    entropies, all_ids, all_logp = [], [], []
    with torch.no_grad():
        for layer in layers:
            hidden = states[("out", layer)][vis]
            parts = []
            for start in range(0, hidden.shape[0], config.token_chunk):
                logits = lens.logits(hidden[start : start + config.token_chunk])
                values, ids = logits.topk(config.topk, dim=-1)
                parts.append((entropy_from_logits(logits), ids, torch.log_softmax(values, dim=-1)))
            entropies.append(torch.cat([p[0] for p in parts]))
            all_ids.append(torch.cat([p[1] for p in parts]))
            all_logp.append(torch.cat([p[2] for p in parts]))
    base_entropy = torch.stack(entropies)
    candidates = torch.ones(vis.numel(), dtype=torch.bool, device=base_entropy.device)
    mask = config.mask.select(base_entropy, candidates, config.select)
    selected, topk_ids, topk_logp = {}, {}, {}
    for row, layer in enumerate(layers):
        idx = mask[row].nonzero().squeeze(-1)
        if idx.numel():
            selected[layer] = idx
            topk_ids[layer] = all_ids[row][idx]
            topk_logp[layer] = all_logp[row][idx]
    return ReplayTargets(base_entropy.cpu(), selected, topk_ids, topk_logp)


def kl_topk(base_logp: torch.Tensor, rlvr_logits: torch.Tensor) -> torch.Tensor:
    """``batchmean`` KL(P_base ‖ P_rlvr) over k ids, both renormalised (``F.kl_div(log q, p)``)."""
    rlvr_logq = torch.log_softmax(rlvr_logits, dim=-1)
    return (base_logp.exp() * (base_logp - rlvr_logq)).sum() / base_logp.shape[0]


def narrower_than_float32(dtype: torch.dtype) -> bool:
    """Whether a floating dtype has less precision than float32 (bf16, fp16)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


class VisualResidual:
    """Offsets Δ added at the input of block 0, and the residual stream at their positions through block ``last``.

    :meth:`install` registers a pre-hook on block 0 and a forward hook on each block 0..``last``.
    They act on forwards of ``n_tokens`` positions (the prefill) and let one-token decode steps
    through (those see Δ only through the KV cache, as released). With ``float32_carry`` and a
    bf16/fp16 model, the residual at the indexed positions is carried in float32 (see the module
    docstring): ``r_0 = float(e) + Δ``, ``r_{l+1} = r_l + (float(out_l) − float(bf16(r_l)))``, each
    block reading ``bf16(r_l)``. Otherwise Δ is cast to the model dtype and added, and block outputs
    are left alone. :attr:`current` is the residual at the indexed positions where the forward has
    got to (the input of block 0 with Δ, then each block's output), for hooks registered after these.

    The replay objective and the decoding prefill both use this, so they run the same forward.

    Args:
        positions: Sequence positions of the offsets, the same in every batch row; or a
            ``(rows, cols)`` pair of index tensors (per-row positions, for batched decoding).
        offsets: ``[n, hidden]`` float32 Δ, one row per indexed position.
        n_tokens: Sequence length of the forward the offsets belong to (the prefill).
        last: The last block the carry runs through (the deepest replay layer).
        float32_carry: Carry the residual in float32 when the model dtype is narrower.
    """

    def __init__(
        self,
        positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        offsets: torch.Tensor,
        n_tokens: int,
        last: int,
        float32_carry: bool = True,
    ) -> None:
        self.key = (slice(None), positions) if isinstance(positions, torch.Tensor) else tuple(positions)
        self.offsets, self.n_tokens, self.last = offsets, int(n_tokens), int(last)
        self.float32_carry = float32_carry
        self.current: torch.Tensor | None = None
        self._carrying = False

    def install(self, blocks: Sequence[nn.Module]) -> list[RemovableHandle]:
        """Register the hooks on the decoder ``blocks``; return their handles (the caller removes them)."""
        handles: list[RemovableHandle] = []
        try:
            handles.append(edit_input(blocks[0], self._enter))
            handles.extend(edit_output(blocks[i], self._leave) for i in range(self.last + 1))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _enter(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if hidden.shape[1] == 1:
            self.current = None  # decode step: sees Δ only through the KV cache, as released
            return None
        if hidden.shape[1] != self.n_tokens:
            raise InputError(f"prefill of {hidden.shape[1]} tokens, but Δ was learned for {self.n_tokens}")
        self._carrying = self.float32_carry and narrower_than_float32(hidden.dtype)
        edited = hidden.clone()
        if self._carrying:
            self.current = hidden[self.key].float() + self.offsets
            edited[self.key] = self.current.to(hidden.dtype)
        else:
            edited[self.key] = hidden[self.key] + self.offsets.to(hidden.dtype)
            self.current = edited[self.key]
        return edited

    def _leave(self, output: torch.Tensor) -> torch.Tensor | None:
        if self.current is None:
            return None
        if not self._carrying:
            self.current = output[self.key]
            return None
        # The block read bf16(r) at these positions; keep its contribution, not its rounded sum.
        read = self.current.to(output.dtype)
        self.current = self.current + (output[self.key].float() - read.float())
        edited = output.clone()
        edited[self.key] = self.current.to(output.dtype)
        return edited


class _FastObjective:
    """L(Δ) on the RLVR side: vision tower once, forward stopped at the last layer, k rows per token."""

    def __init__(self, pair: Any, inputs: PairInputs, config: ReplayConfig, targets: ReplayTargets) -> None:
        self.pair, self.config, self.targets = pair, config, targets
        self.model = pair.rlvr
        self.lens = lens_of(self.model, pair.adapter)
        self.visual = inputs.visual_positions.to(pair.device)
        self.n_tokens = inputs.n_tokens
        self.layers = [layer for layer in config.layers if layer in targets.selected]
        # The vision tower runs once. A family that needs more than the merged features (Qwen3-VL's
        # DeepStack) caches its own vision output and runs the full forward from it; otherwise the
        # input of block 0 (text embeddings with the vision features merged in) is captured once and
        # handed to block 0 by a hook, and the forward runs without pixels (input_ids stay, so mRoPE
        # positions are unchanged; a hook, not inputs_embeds=, because GLM-4V, InternVL and LLaVA
        # refuse input_ids and inputs_embeds together).
        cached = pair.adapter.cached_vision_inputs(self.model, inputs.model_inputs)
        self.embeds: torch.Tensor | None = None
        if cached is not None:
            self.forward_inputs: dict[str, Any] = cached
        else:
            embeds = capture_block_residuals(self.model, pair.adapter, inputs.model_inputs, inputs_of=(0,))
            self.embeds = embeds[("in", 0)].unsqueeze(0)
            self.forward_inputs = {k: v for k, v in inputs.model_inputs.items() if k not in PIXEL_KEYS}

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        config, lens, targets = self.config, self.lens, self.targets
        last = self.layers[-1]
        stream = VisualResidual(self.visual, delta, self.n_tokens, last, config.residual == "float32")
        terms: list[torch.Tensor] = []

        def term(layer: int):
            def fn(hidden: torch.Tensor) -> None:
                # The residual as the stream holds it (float32 when carried), at the selected tokens.
                assert stream.current is not None
                rows = targets.topk_ids[layer]
                logits = lens.logits(stream.current[0, targets.selected[layer]], rows=rows)
                terms.append(kl_topk(targets.topk_logp[layer], logits))
                if layer == last:
                    raise _StopForward

            return fn

        blocks = self.pair.adapter.layers(self.model)
        register = edit_input if config.variant == "released" else edit_output
        handles: list[RemovableHandle] = []
        with installed(handles):
            if self.embeds is not None:  # the captured input of block 0 replaces the plain embeddings
                handles.append(edit_input(blocks[0], lambda _: self.embeds))
            handles.extend(stream.install(blocks))  # next, so the terms read what it has written
            handles.extend(register(blocks[L], term(L)) for L in self.layers)
            try:
                self.model(**self.forward_inputs, use_cache=False)
            except _StopForward:
                pass
        loss = torch.stack(terms).sum()
        return loss / delta.shape[0] if config.normalize else loss


class ActivationReplay(Intervention):
    """Activation Replay as an intervention: :meth:`prepare` optimises Δ, :meth:`generate` decodes.

    Example:
        >>> replay = ActivationReplay(tau=0.4, alpha=10.0, steps=25, layers=range(16))
        >>> replay.prepare(pair, inputs)
        >>> replay.result.losses[0], replay.result.final_loss
        >>> replay.generate(pair, inputs).texts
        >>> replay.save_offsets("offsets.safetensors")
    """

    name = "replay"

    def __init__(
        self,
        tau: float = 0.4,
        alpha: float = 10.0,
        steps: int = 25,
        layers: Sequence[int] = tuple(range(16)),
        topk: int = 50,
        variant: str = "released",
        select: str = "low",
        normalize: bool = True,
        token_chunk: int = 256,
        rule: str = "tau_max",
        quantile: float = 0.3,
        residual: str = "float32",
    ) -> None:
        super().__init__("rlvr")
        self.config = ReplayConfig(
            tau=tau,
            alpha=alpha,
            steps=steps,
            layers=tuple(layers),
            topk=topk,
            variant=variant,
            select=select,
            normalize=normalize,
            token_chunk=token_chunk,
            rule=rule,
            quantile=quantile,
            residual=residual,
        )
        self.result: ReplayResult | None = None
        self.targets: ReplayTargets | None = None
        self._visual: torch.Tensor | None = None

    def setting(self) -> str:
        c = self.config
        name = "replay" if c.select == "low" else "replay-high"
        return (
            f"{name}[{c.mask.tag()},alpha={c.alpha:g},steps={c.steps},layers={c.layers[0]}-{c.layers[-1]}"
            f",k={c.topk},{c.variant}" + ("" if c.residual == "float32" else f",residual={c.residual}") + "]"
        )

    def prepare(self, pair: Any, inputs: PairInputs) -> ActivationReplay:
        """Optimise Δ on this sample (see the module docstring for the exact algorithm).

        Raises:
            ConfigError: Layers beyond the model or ``topk`` above the vocabulary size.
            InputError: A sample without visual tokens.
        """
        config = self.config
        check_layers(config.layers, pair.n_layers)
        vocab = int(pair.adapter.unembed(pair.rlvr).weight.shape[0])
        if config.topk > vocab:
            raise ConfigError(f"topk={config.topk} exceeds the vocabulary size {vocab}")
        visual = require_visual(inputs, "Activation Replay")
        hidden = pair.adapter.hidden_size(pair.config)
        delta = torch.zeros(visual.numel(), hidden, dtype=torch.float32, device=pair.device)
        targets = base_targets(pair, inputs, config)
        losses: list[float] = []
        skipped = 0
        if not targets.selected:
            warnings.warn(
                f"{self.setting()}: the entropy mask is empty at every layer; "
                "offsets stay zero and decoding is unchanged" + config.mask.empty_hint(),
                stacklevel=2,
            )
            losses, final, skipped = [0.0] * config.steps, 0.0, config.steps
        else:
            objective = _FastObjective(pair, inputs, config, targets)
            with frozen_weights(pair.rlvr), torch.enable_grad():
                for _ in range(config.steps):
                    delta.requires_grad_(True)
                    loss = objective(delta)
                    value = float(loss.detach())
                    losses.append(value)
                    if value == 0.0:  # released: no update on an exactly-zero loss
                        skipped += 1
                        delta = delta.detach()
                        continue
                    (grad,) = torch.autograd.grad(loss, delta)
                    delta = (delta - config.alpha * grad).detach()
                with torch.no_grad():
                    final = float(objective(delta))
        if any(v != v for v in losses) or final != final:
            raise InputError("Activation Replay produced a NaN loss; check the model dtype and inputs")
        changed = any(v != losses[0] for v in (*losses[1:], final))
        if targets.selected and not changed:
            warnings.warn(self._flat_loss_message(pair, losses[0]), stacklevel=2)
        self.targets = targets
        self._visual = visual.to(pair.device)
        self.result = ReplayResult(
            delta.detach(), tuple(losses), final, targets.n_selected, int(visual.numel()), skipped, changed
        )
        return super().prepare(pair, inputs)  # type: ignore[return-value]

    def _flat_loss_message(self, pair: Any, loss: float) -> str:
        config = self.config
        head = f"{self.setting()}: the replay loss did not change over {config.steps} step(s) ({loss:.6g} throughout)"
        if loss == 0.0:
            return head + "; it is exactly zero, so no update was made and the offsets stay zero"
        dtype = next(pair.rlvr.parameters()).dtype
        if config.residual == "model" and narrower_than_float32(dtype):
            return head + (
                f": each update is below half an ulp of the {dtype} embeddings and rounds away; "
                "use residual='float32' (the default)"
            )
        return head + f": the updates never reached the forward; alpha={config.alpha:g} may be too small"

    @property
    def offsets(self) -> torch.Tensor:
        if self.result is None:
            raise ConfigError("call prepare(pair, inputs) first")
        return self.result.offsets

    def save_offsets(self, path: str | Path) -> Path:
        """Write Δ (float32 ``[n_visual, hidden]``) and the per-step losses with safetensors."""
        from safetensors.torch import save_file

        from lens.records import atomic_write

        result = self.result
        if result is None:
            raise ConfigError("call prepare(pair, inputs) first")
        tensors = {
            "offsets": result.offsets.detach().cpu().contiguous(),
            "losses": torch.tensor(result.losses, dtype=torch.float32),
        }
        meta = {"setting": self.setting(), "final_loss": repr(result.final_loss)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def _edits(self, pair: Any) -> list[PrefillEdit]:
        result, visual = self.result, self._visual
        assert result is not None and visual is not None
        if not torch.any(result.offsets):
            return []  # zero offsets: decoding is plain generate
        # Δ is added to the input of block 0 (the embeddings) at the visual tokens, in the prefill only.
        return [PrefillEdit(0, "input", visual, result.offsets, "add")]

    def _detail(self) -> ReplayResult | None:
        return self.result

    def _install(
        self,
        model: nn.Module,
        adapter: Any,
        states: Sequence[Prepared],
        batch: Batch | None,
        copies: int | None,
    ) -> list[RemovableHandle]:
        """Decode with the forward the optimisation ran: in a bf16/fp16 model with
        ``residual="float32"``, Δ and the residual at its positions are carried in float32 through
        the replay layers (:class:`VisualResidual`), each row with its own sample's Δ; otherwise the
        plain position edit (Δ added once, rounded to the model dtype)."""
        dtype = next(model.parameters()).dtype
        edits = [(index, edit) for index, state in enumerate(states) for edit in state.edits]
        if not edits or self.config.residual != "float32" or not narrower_than_float32(dtype):
            return super()._install(model, adapter, states, batch, copies)
        if batch is None:  # one sample as is: every row shares its positions
            ((_, edit),) = edits
            key: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = edit.positions
            offsets, n_tokens = edit.values, states[0].inputs.n_tokens
        else:
            per_sample = copies or 1
            rows, columns, values = [], [], []
            for index, edit in edits:
                shifted = batch.shift(index, edit.positions)
                for copy in range(per_sample):
                    rows.append(torch.full_like(shifted, index * per_sample + copy))
                    columns.append(shifted)
                    values.append(edit.values)
            key, offsets, n_tokens = (torch.cat(rows), torch.cat(columns)), torch.cat(values), batch.n_tokens
        stream = VisualResidual(key, offsets, n_tokens, max(self.config.layers), float32_carry=True)
        return stream.install(adapter.layers(model))
