"""The base side of Activation Replay's loss: the entropy mask, top-k ids and log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lens.inputs import PairInputs
from lens.interventions.base import capture_block_residuals, require_visual
from lens.interventions.replay_config import ReplayConfig
from lens.logit_lens import entropy_from_logits, lens_of


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
