"""Measurements of one perturbed sample: low-entropy KL drift to the clean base, answer perplexity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from analyses.perturb_noise import perturbed
from lens.errors import InputError
from lens.inputs import PairInputs
from lens.logit_lens import LogitLens, distribution_stats, lens_entropy, lens_of
from lens.masks import EntropyMask
from lens.tracing import capture_residuals


def response_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_start: int) -> torch.Tensor:
    """Per-token NLL (nats) of the response tokens, EOS included, from teacher-forced logits.

    Args:
        logits: ``[tokens, vocab]`` logits of one sequence.
        input_ids: ``[tokens]`` (or ``[1, tokens]``) ids of the same sequence.
        response_start: Index of the first response token.
    """
    ids = input_ids.reshape(-1)
    if not 0 < response_start < ids.numel():
        raise InputError(f"response_start {response_start} outside the sequence of {ids.numel()} tokens")
    # The logits at position t predict token t + 1.
    logp = torch.log_softmax(logits[response_start - 1 : -1].float(), dim=-1)
    targets = ids[response_start:].to(logp.device)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """``exp(mean NLL)``."""
    return float(torch.exp(nll.mean()))


@dataclass
class BaseReference:
    """What the clean base contributes to every comparison of one sample.

    Attributes:
        layers: Drift layers.
        hidden: Clean base residuals at the visual positions, ``[layers, n_visual, hidden]``.
        base_entropy: Clean base lens entropy at the visual positions, ``[layers, n_visual]``.
        mask: Activation Replay low-entropy mask, ``[layers, n_visual]``.
    """

    layers: tuple[int, ...]
    hidden: torch.Tensor
    base_entropy: torch.Tensor
    mask: torch.Tensor
    lens: LogitLens = field(repr=False)


def base_reference(
    pair: Any, inputs: PairInputs, layers: Sequence[int], mask: EntropyMask | float, chunk: int
) -> BaseReference:
    """Run the clean base once: residuals and entropies at the visual positions, and the mask.

    Args:
        pair: The model pair.
        inputs: One encoded sample with an image.
        layers: Drift layers.
        mask: The selection rule, or a τ for the released τ·max rule.
        chunk: Lens chunk size.
    """
    rule = mask if isinstance(mask, EntropyMask) else EntropyMask(tau=mask)
    visual = inputs.visual_positions
    if visual.numel() == 0:
        raise InputError("the sample has no visual tokens; the perturbation study needs an image")
    hidden, _ = capture_residuals(pair.base, pair.adapter, inputs.model_inputs, layers)
    stacked = torch.stack([h[visual] for h in hidden])
    lens = lens_of(pair.base, pair.adapter)
    entropy = torch.stack([lens_entropy(lens, layer_hidden, chunk) for layer_hidden in stacked]).cpu()
    candidates = torch.ones(stacked.shape[1], dtype=torch.bool)
    selected = rule.select(entropy, candidates)
    return BaseReference(tuple(layers), stacked, entropy, selected, lens)


def visual_kl(
    reference: BaseReference, rlvr_hidden: Sequence[torch.Tensor], rlvr_lens: LogitLens, chunk: int
) -> torch.Tensor:
    """KL(P_base ‖ P_rlvr) at every (drift layer, visual token), ``[layers, n_visual]``."""
    kl = torch.empty(reference.base_entropy.shape)
    with torch.no_grad():
        for li, hr in enumerate(rlvr_hidden):
            hb = reference.hidden[li]
            for start in range(0, hb.shape[0], chunk):
                stats = distribution_stats(
                    reference.lens.logits(hb[start : start + chunk]),
                    rlvr_lens.logits(hr[start : start + chunk]),
                )
                kl[li, start : start + chunk] = stats["kl_base_rlvr"].cpu()
    return kl


def measure(
    pair: Any,
    reference: BaseReference,
    answers: Mapping[str, PairInputs],
    kind: str,
    sigma: float,
    eps: torch.Tensor,
    chunk: int = 256,
) -> dict[str, Any]:
    """Drift and answer perplexities of one sample under one noise setting.

    Args:
        pair: The model pair.
        reference: The clean base of this sample.
        answers: Teacher-forcing inputs per answer kind (same prompt and image).
        kind: Noise kind.
        sigma: Noise magnitude.
        eps: The sample's standard normal noise for ``kind``.
        chunk: Lens chunk size.

    Returns:
        ``kl_low_entropy``, ``kl_visual_all``, and ``ppl_<answer>``, ``nll_<answer>``,
        ``n_tokens_<answer>`` per answer kind.
    """
    rlvr_lens = lens_of(pair.rlvr, pair.adapter)
    out: dict[str, Any] = {"noise_kind": kind, "sigma": float(sigma)}
    for i, (answer_kind, inputs) in enumerate(answers.items()):
        if inputs.response_start is None:
            raise InputError("teacher forcing needs a response")
        with perturbed(pair, inputs, kind, sigma, eps) as model_inputs:
            if i == 0:
                # The visual positions precede the response, so one answer's forward gives the drift.
                hidden, logits = capture_residuals(
                    pair.rlvr, pair.adapter, model_inputs, reference.layers, with_logits=True
                )
                visual = inputs.visual_positions
                kl = visual_kl(reference, [h[visual] for h in hidden], rlvr_lens, chunk)
                masked = kl[reference.mask]
                out["kl_low_entropy"] = float(masked.mean()) if masked.numel() else float("nan")
                out["kl_visual_all"] = float(kl.mean())
            else:
                with torch.no_grad():
                    logits = pair.rlvr(**model_inputs).logits[0]
        nll = response_nll(logits, inputs.input_ids, inputs.response_start)
        out[f"nll_{answer_kind}"] = float(nll.mean())
        out[f"ppl_{answer_kind}"] = perplexity(nll)
        out[f"n_tokens_{answer_kind}"] = int(nll.numel())
    return out
