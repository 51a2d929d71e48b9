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

The settings and result live in :mod:`lens.interventions.replay_config`, the base side of the loss
in :mod:`lens.interventions.replay_targets`, the float32 carry in
:mod:`lens.interventions.replay_residual`; every name is importable from here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
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
from lens.interventions.replay_config import ReplayConfig, ReplayResult
from lens.interventions.replay_residual import VisualResidual, narrower_than_float32
from lens.interventions.replay_targets import ReplayTargets, base_targets
from lens.logit_lens import lens_of


def kl_topk(base_logp: torch.Tensor, rlvr_logits: torch.Tensor) -> torch.Tensor:
    """``batchmean`` KL(P_base ‖ P_rlvr) over k ids, both renormalised (``F.kl_div(log q, p)``)."""
    rlvr_logq = torch.log_softmax(rlvr_logits, dim=-1)
    return (base_logp.exp() * (base_logp - rlvr_logq)).sum() / base_logp.shape[0]


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
