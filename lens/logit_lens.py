"""The logit lens over a pair: per-(layer, token) entropies and KL(P_base ‖ P_rlvr).

Each model reads its own activations through its own final norm (statistics recomputed for each
layer's activation) and its own unembedding. All math is float32 whatever the model dtype, and we
stream over layers and token chunks: at most ``token_chunk x vocab`` logits exist at once, so peak
memory does not grow with the number of layers and no ``[layers, tokens, vocab]`` tensor is built.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from lens.adapters import ArchitectureAdapter
from lens.errors import ConfigError
from lens.inputs import PairInputs
from lens.tracing import capture_residuals


@dataclass(frozen=True)
class LensConfig:
    """How to run the logit lens.

    Attributes:
        layers: Decoder layers to read (default: all).
        token_chunk: Tokens projected at once; bounds peak memory at ``token_chunk x vocab``.
        topk: Also keep each model's top-k ids and probabilities (0: no).
    """

    layers: tuple[int, ...] | None = None
    token_chunk: int = 256
    topk: int = 0

    def __post_init__(self) -> None:
        if self.token_chunk < 1:
            raise ConfigError(f"token_chunk must be >= 1, got {self.token_chunk}")
        if self.topk < 0:
            raise ConfigError(f"topk must be >= 0, got {self.topk}")


class LogitLens:
    """One model's lens: its final norm, then its unembedding, in float32.

    Args:
        model: A transformers model.
        adapter: Its family adapter.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        self.norm = adapter.final_norm(model)
        head = adapter.unembed(model)
        # A float32 copy of the unembedding only when the model is in lower precision.
        self.weight = head.weight if head.weight.dtype == torch.float32 else head.weight.float()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.float()

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm applied to ``hidden`` (any layer), computed in float32."""
        return self.norm(hidden.float()).float()

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 lens logits of ``hidden`` (``[..., hidden]``), optionally for vocabulary ``rows`` only.

        Args:
            hidden: Residual-stream activations.
            rows: Optional ``[..., k]`` vocabulary ids per position; then only those logits are
                computed (``[..., k]``), which is what Activation Replay's top-k loss needs.
        """
        x = self.normed(hidden)
        if rows is None:
            out = x @ self.weight.T
            return out if self.bias is None else out + self.bias
        w = self.weight[rows]  # [..., k, hidden]
        out = torch.einsum("...d,...kd->...k", x, w)
        return out if self.bias is None else out + self.bias[rows]


_LENSES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], LogitLens]] = weakref.WeakKeyDictionary()


def lens_of(model: nn.Module, adapter: ArchitectureAdapter) -> LogitLens:
    """The model's :class:`LogitLens`, built once and reused.

    For a bf16/fp16 model the lens holds a float32 copy of the unembedding (2.2 GB at 7B), which
    must not be rebuilt for every sample. The cache is dropped if the unembedding tensor is replaced
    or modified in place (its storage or version counter changes).
    """
    weight = adapter.unembed(model).weight
    key = (weight.data_ptr(), weight._version)
    hit = _LENSES.get(model)
    if hit is None or hit[0] != key:
        hit = (key, LogitLens(model, adapter))
        _LENSES[model] = hit
    return hit[1]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(``logits``) over the last axis, with two ``[n, vocab]`` temporaries.

    ``H = log S − Σ e·(z − m) / S`` with ``m = max z``, ``e = exp(z − m)``, ``S = Σ e``: the same value
    as ``−Σ p log p`` from ``log_softmax`` (to float32 rounding) at about half the memory traffic,
    which matters at a 152k vocabulary.
    """
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    weights = shifted.exp()
    total = weights.sum(-1)
    return total.log() - torch.einsum("nv,nv->n", weights, shifted) / total


def lens_entropy(lens: LogitLens, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Float32 logit-lens entropy (nats) of ``[n, hidden]`` activations, ``chunk`` rows at a time."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk):
            out[start : start + chunk] = entropy_from_logits(lens.logits(hidden[start : start + chunk]))
    return out


def distribution_stats(
    base_logits: torch.Tensor, rlvr_logits: torch.Tensor, topk: int = 0
) -> dict[str, torch.Tensor]:
    """Entropies (nats) and KL(P_base ‖ P_rlvr) of two batches of float32 logits.

    Returns:
        ``base_entropy``, ``rlvr_entropy``, ``kl_base_rlvr`` (``[n]`` each) and, with ``topk``,
        ``base_topk_ids``, ``base_topk_probs``, ``rlvr_topk_ids``, ``rlvr_topk_probs``.
    """
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    rlvr_logp = torch.log_softmax(rlvr_logits.float(), dim=-1)
    return logp_stats(base_logp, rlvr_logp, topk)


def logp_stats(base_logp: torch.Tensor, rlvr_logp: torch.Tensor, topk: int = 0) -> dict[str, torch.Tensor]:
    """:func:`distribution_stats` from float32 log-probabilities (computed once per model and
    shared between the comparisons a model takes part in)."""
    base_p = base_logp.exp()
    stats = {
        "base_entropy": -(base_p * base_logp).sum(-1),
        # KL(P_base ‖ P_rlvr) = Σ p_base (log p_base − log p_rlvr): expectation under the base.
        "kl_base_rlvr": (base_p * (base_logp - rlvr_logp)).sum(-1).clamp_min(0.0),
    }
    del base_p
    stats["rlvr_entropy"] = -(rlvr_logp.exp() * rlvr_logp).sum(-1)
    if topk:
        for name, logp in (("base", base_logp), ("rlvr", rlvr_logp)):
            values, ids = logp.topk(topk, dim=-1)
            stats[f"{name}_topk_ids"] = ids
            stats[f"{name}_topk_probs"] = values.exp()
    return stats


@dataclass(frozen=True)
class LensResult:
    """Per-(layer, token) lens statistics of one sample.

    Tensors are float32 ``[n_layers, n_tokens]`` (top-k ones ``[n_layers, n_tokens, k]``).
    """

    layers: tuple[int, ...]
    base_entropy: torch.Tensor
    rlvr_entropy: torch.Tensor
    kl_base_rlvr: torch.Tensor
    roles: tuple[str, ...]
    topk: dict[str, torch.Tensor] | None = None

    def to_frame(self, sample_id: str | None = None) -> pd.DataFrame:
        """A tidy table, one row per (layer, position)."""
        n_layers, n_tokens = self.base_entropy.shape
        frame = pd.DataFrame(
            {
                "layer": np.repeat(np.asarray(self.layers), n_tokens),
                "position": np.tile(np.arange(n_tokens), n_layers),
                "role": np.tile(np.asarray(self.roles), n_layers),
                "base_entropy": self.base_entropy.reshape(-1).numpy(),
                "rlvr_entropy": self.rlvr_entropy.reshape(-1).numpy(),
                "kl_base_rlvr": self.kl_base_rlvr.reshape(-1).numpy(),
            }
        )
        if sample_id is not None:
            frame.insert(0, "sample_id", sample_id)
        return frame


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    out = tuple(int(i) for i in layers)
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} are outside the model's {n_layers} layers (0..{n_layers - 1})")
    if not out:
        raise ConfigError("no layers requested")
    return out


def pair_lens(
    base: nn.Module,
    rlvr: nn.Module,
    adapter: ArchitectureAdapter,
    inputs: PairInputs,
    config: LensConfig = LensConfig(),
) -> LensResult:
    """Run the logit lens of both models on the same inputs.

    Args:
        base: The base model.
        rlvr: The RLVR model.
        adapter: Their family adapter.
        inputs: Identical inputs for both models (from ``ModelPair.encode``).
        config: Layers, chunking and top-k.

    Returns:
        Entropies of both models and KL(P_base ‖ P_rlvr) per (layer, token), float32 on the CPU.
    """
    comparison = ("base", "rlvr")
    return multi_lens({"base": base, "rlvr": rlvr}, adapter, inputs, [comparison], config)[comparison]


def multi_lens(
    models: Mapping[str, nn.Module],
    adapter: ArchitectureAdapter,
    inputs: PairInputs,
    comparisons: Sequence[tuple[str, str]],
    config: LensConfig = LensConfig(),
) -> dict[tuple[str, str], LensResult]:
    """The logit lens of several models of one family, compared pairwise on the same inputs.

    Each model runs forward once and reads its lens once per (layer, token chunk), however many
    comparisons it takes part in: a base with three twins costs four forwards and four lenses,
    not six. Models run one at a time; their captured residuals are kept for the sample.

    Args:
        models: Models by name (e.g. ``{"base": b, "mm-eureka": a1, "vl-rethinker": a2}``).
        adapter: Their family adapter.
        inputs: Identical inputs for every model.
        comparisons: ``(reference, other)`` names: each gives the reference's entropy, the other's
            and KL(P_reference ‖ P_other), in the fields ``base_entropy``, ``rlvr_entropy`` and
            ``kl_base_rlvr`` of its :class:`LensResult`.
        config: Layers, chunking and top-k.

    Returns:
        One result per comparison, float32 on the CPU.

    Raises:
        ConfigError: A comparison names a model not in ``models``, or none is given.
    """
    if not comparisons:
        raise ConfigError("no comparison requested")
    names = list(dict.fromkeys(name for pair in comparisons for name in pair))
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ConfigError(f"comparison names unknown model {unknown[0]!r}; models: {', '.join(models)}")
    layers = _check_layers(config.layers, adapter.n_layers(models[names[-1]]))
    hidden = {
        name: capture_residuals(models[name], adapter, inputs.model_inputs, layers)[0] for name in names
    }
    lenses = {name: lens_of(models[name], adapter) for name in names}
    n_tokens = inputs.n_tokens
    shape = (len(layers), n_tokens)
    out = {
        pair: {name: torch.empty(shape) for name in ("base_entropy", "rlvr_entropy", "kl_base_rlvr")}
        for pair in comparisons
    }
    topk_out: dict[tuple[str, str], dict[str, torch.Tensor]] = {pair: {} for pair in comparisons}
    with torch.no_grad():
        for li in range(len(layers)):
            for start in range(0, n_tokens, config.token_chunk):
                stop = min(start + config.token_chunk, n_tokens)
                logp = {
                    name: torch.log_softmax(lenses[name].logits(hidden[name][li][start:stop]).float(), dim=-1)
                    for name in names
                }
                for pair in comparisons:
                    for name, value in logp_stats(logp[pair[0]], logp[pair[1]], config.topk).items():
                        if name.endswith(("_ids", "_probs")):
                            if name not in topk_out[pair]:
                                dtype = torch.long if name.endswith("_ids") else torch.float32
                                topk_out[pair][name] = torch.empty((*shape, config.topk), dtype=dtype)
                            topk_out[pair][name][li, start:stop] = value.cpu()
                        else:
                            out[pair][name][li, start:stop] = value.cpu()
                del logp
            # Free each layer's activations as soon as it is read.
            for name in names:
                hidden[name][li] = None  # type: ignore[call-overload]
    return {
        pair: LensResult(
            layers,
            out[pair]["base_entropy"],
            out[pair]["rlvr_entropy"],
            out[pair]["kl_base_rlvr"],
            inputs.roles,
            topk_out[pair] or None,
        )
        for pair in comparisons
    }


def lens_self_check(model: nn.Module, adapter: ArchitectureAdapter, inputs: PairInputs) -> float:
    """Max |lens(last layer) − model logits|; ~0 in float32, a few 1e-2 in bf16."""
    last = adapter.n_layers(model) - 1
    hidden, logits = capture_residuals(model, adapter, inputs.model_inputs, [last], with_logits=True)
    with torch.no_grad():
        lens_logits = lens_of(model, adapter).logits(hidden[0])
    return float((lens_logits - logits.float()).abs().max())
