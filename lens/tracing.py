"""Every nnsight call in replay-lens lives here, so an nnsight version change touches one file.

Idioms (nnsight 0.8.x):
- wrap a loaded transformers model once with ``NNsight(model)``; the wrapper shares the weights;
- inside ``with traced.trace(**inputs):`` read ``module.output`` in forward order and ``.save()``
  what must leave the block; a list must be built with an explicit loop and saved itself
  (a list comprehension inside the block silently produces nothing in 0.8.1);
- writes to ``module.output[...]`` edit the running forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import nnsight
import torch
from nnsight import NNsight
from torch import nn

from lens.adapters import ArchitectureAdapter

_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, NNsight] = weakref.WeakKeyDictionary()


def traced(model: nn.Module) -> NNsight:
    """The (cached) nnsight wrapper of ``model``."""
    wrapper = _WRAPPERS.get(model)
    if wrapper is None:
        wrapper = NNsight(model)
        _WRAPPERS[model] = wrapper
    return wrapper


def _envoy(wrapper: NNsight, path: str):
    obj = wrapper
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _as_tensor(output: object) -> torch.Tensor:
    # Decoder layers return a plain tensor in transformers 5.x; older releases return a tuple.
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index]


def capture_residuals(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    model_inputs: dict[str, torch.Tensor],
    layers: Sequence[int] | None = None,
    with_logits: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Capture the residual stream after each requested decoder layer.

    The captured tensors are the raw layer outputs, so entry ``i`` equals transformers'
    ``hidden_states[i + 1]`` for every layer but the last, whose ``hidden_states`` entry is
    already final-normed.

    Args:
        model: A transformers model of the adapter's family.
        adapter: Its adapter.
        model_inputs: Inputs for a batch of one.
        layers: Layer indices to capture (default: all), in increasing order.
        with_logits: Also return the model's output logits.

    Returns:
        ``(residuals, logits)``: one ``[tokens, hidden]`` tensor per requested layer, in the model's
        dtype, and the ``[tokens, vocab]`` logits or ``None``.
    """
    n_layers = adapter.n_layers(model)
    wanted = list(range(n_layers)) if layers is None else sorted(set(int(i) for i in layers))
    wrapper = traced(model)
    layer_envoys = _envoy(wrapper, adapter.layers_path)
    stop_early = not with_logits and wanted and wanted[-1] < n_layers - 1
    with torch.no_grad(), wrapper.trace(**model_inputs) as tracer:
        saved = nnsight.save([])
        for i in wanted:
            saved.append(_as_tensor(layer_envoys[i].output)[0])
        logits = wrapper.output.logits[0].save() if with_logits else None
        if stop_early:
            tracer.stop()
    return list(saved), (logits if with_logits else None)
