"""Several models of one family compared pairwise: a base with several RLVR twins, or the stages
of a base → SFT → RL triplet.

A :class:`ModelSet` holds the models by name and the comparisons to make, each a
``(reference, other)`` pair of names. Every model runs forward once per sample, whatever the number
of comparisons it takes part in (:func:`lens.logit_lens.multi_lens`), so a base with three twins
costs four forwards instead of the six of three separate pair runs.

Two shapes are built for you (:func:`comparisons_for`):

* **twins** (``lens drift --rlvr A1 --rlvr A2``): the first model is the reference of every other;
* **stages** (``lens drift --models base=B sft=S rl=R``): each consecutive pair, then first → last:
  base→sft, sft→rl and base→rl. Each comparison is bucketed by the entropy of *its* reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lens.adapters import ArchitectureAdapter
from lens.errors import CheckpointError, ConfigError, PairMismatchError
from lens.inputs import ImageLike, Message, PairInputs
from lens.loading import ModelPair

#: How the comparisons of a set are drawn from its ordered models.
SHAPES = ("twins", "stages")


def comparisons_for(names: Sequence[str], shape: str = "twins") -> tuple[tuple[str, str], ...]:
    """The comparisons of ordered model names.

    Args:
        names: Model names, the reference (base) first.
        shape: ``"twins"``: first → each other; ``"stages"``: each consecutive pair, then first → last
            when there are more than two.

    Raises:
        ConfigError: Fewer than two models, a name given twice, or an unknown shape.
    """
    names = list(names)
    if len(names) < 2:
        raise ConfigError(f"a comparison needs at least two models, got {len(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"model {repeated[0]!r} is named twice; give each model once")
    if shape == "twins":
        return tuple((names[0], other) for other in names[1:])
    if shape == "stages":
        steps = [(a, b) for a, b in zip(names, names[1:], strict=False)]
        return tuple(steps + ([(names[0], names[-1])] if len(names) > 2 else []))
    raise ConfigError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def label(comparison: tuple[str, str]) -> str:
    """``("base", "rl")`` -> ``"base→rl"`` (the ``comparison`` column of the tables)."""
    return f"{comparison[0]}→{comparison[1]}"


def stack_comparisons(frames: Mapping[tuple[str, str], Any]) -> Any:
    """One table from per-comparison tables, with ``comparison``, ``reference`` and ``twin`` first."""
    import pandas as pd

    parts = []
    for (reference, other), frame in frames.items():
        frame = frame.copy()
        frame.insert(0, "twin", other)
        frame.insert(0, "reference", reference)
        frame.insert(0, "comparison", label((reference, other)))
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


@dataclass
class ModelSet:
    """Models of one family by name, sharing one tokenizer and image processor, and their comparisons.

    Attributes:
        models: Models by name, in order (the reference of the twins first).
        comparisons: ``(reference, other)`` names.
        adapter: The family adapter shared by all.
        tokenizer: The tokenizer (of the last model, as a pair takes its RLVR model's).
        image_processor: The image processor, or ``None`` for text-only models.
        image_first: Whether images go before the text in the user turn.
        prompt_preset: The prompt preset named in the checkpoints' side files, or ``None``.
        video_options: The run's video defaults (see :attr:`lens.ModelPair.video_options`).
    """

    models: dict[str, nn.Module]
    comparisons: tuple[tuple[str, str], ...]
    adapter: ArchitectureAdapter
    tokenizer: Any
    image_processor: Any | None = None
    image_first: bool = True
    prompt_preset: str | None = None
    video_options: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(next(iter(self.models.values())))

    def pair(self, reference: str, other: str) -> ModelPair:
        """The two models of one comparison as a :class:`lens.ModelPair` (no copy)."""
        return ModelPair(
            self.models[reference],
            self.models[other],
            self.adapter,
            self.tokenizer,
            self.image_processor,
            self.image_first,
            (reference, other),
            self.prompt_preset,
            video_options=self.video_options,
        )

    def encode(
        self,
        prompt: str | None = None,
        images: Sequence[ImageLike] = (),
        response: str | None = None,
        system: str | None = None,
        image_first: bool | None = None,
        *,
        messages: Sequence[Message] | None = None,
        videos: Sequence[Any] = (),
    ) -> PairInputs:
        """Identical inputs for every model (see :meth:`lens.ModelPair.encode`)."""
        return self.pair(*self.comparisons[0]).encode(
            prompt, images, response, system, image_first, messages=messages, videos=videos
        )

    @classmethod
    def from_pairs(cls, pairs: Mapping[str, ModelPair], shape: str = "twins") -> ModelSet:
        """Join pairs that share their base model object (e.g. the organism's two twins).

        Raises:
            PairMismatchError: The pairs do not share one base model or one family.
        """
        first = next(iter(pairs.values()))
        for name, pair in pairs.items():
            if pair.base is not first.base:
                raise PairMismatchError(f"twin {name!r} was loaded against another base model object")
            if pair.adapter != first.adapter:
                raise PairMismatchError(f"twin {name!r} is {pair.adapter.name}, not {first.adapter.name}")
        models = {first.names[0]: first.base, **{name: pair.rlvr for name, pair in pairs.items()}}
        return cls(
            models,
            comparisons_for(list(models), shape),
            first.adapter,
            first.tokenizer,
            first.image_processor,
            first.image_first,
            first.prompt_preset,
        )


def load_models(
    sources: Mapping[str, str | Path],
    shape: str = "twins",
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    image_first: bool = True,
) -> ModelSet:
    """Load several checkpoints of one family as a :class:`ModelSet`.

    Every checkpoint's config, tokenizer and image processor is checked against the first one's
    before any weight loads; a mismatch names the model.

    Args:
        sources: Checkpoint folders by name, the reference first (e.g. ``{"base": ..., "sft": ...,
            "rl": ...}``).
        shape: ``"twins"`` or ``"stages"`` (:func:`comparisons_for`).
        dtype: Model dtype.
        device: Device for every model (ignored with ``device_map``).
        device_map: An accelerate device map (``"auto"`` spreads each model over the visible GPUs).
        max_memory: Per-device memory caps for ``device_map`` (e.g. ``{0: "70GiB", "cpu": "200GiB"}``).
        image_first: Whether images precede the text in the user turn.

    Raises:
        ConfigError: Fewer than two models or a name given twice.
        CheckpointError / UnsupportedArchitectureError: As :func:`lens.load_pair`.
        PairMismatchError: A model that cannot be compared with the first (named).
    """
    from lens.adapters import adapter_for
    from lens.loading import (
        _auto_class,
        _load_config,
        _load_image_processor,
        _load_tokenizer,
        _pair_preset,
        _resolve,
        check_configs,
        check_image_processors,
        check_tokenizers,
    )

    names = list(sources)
    comparisons = comparisons_for(names, shape)
    resolved = {name: _resolve(src) for name, src in sources.items()}
    configs = {name: _load_config(src) for name, src in resolved.items()}
    reference = names[0]
    adapter = adapter_for(configs[reference])
    tokenizers = {name: _load_tokenizer(src) for name, src in resolved.items()}
    processors = (
        {name: _load_image_processor(src) for name, src in resolved.items()} if adapter.multimodal else {}
    )
    for name in names[1:]:
        try:
            check_configs(configs[reference], configs[name])
            check_tokenizers(tokenizers[reference], tokenizers[name])
            if processors:
                check_image_processors(processors[reference], processors[name])
        except PairMismatchError as exc:
            raise PairMismatchError(
                f"model {name!r} ({resolved[name]}) cannot be compared with {reference!r}: {exc}"
            ) from None
    preset = _pair_preset(resolved[reference], resolved[names[-1]])
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    auto = _auto_class(adapter)
    models: dict[str, nn.Module] = {}
    for name, src in resolved.items():
        try:
            model = auto.from_pretrained(src, **kwargs)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load weights from {src}: {exc}".splitlines()[0]) from exc
        if device_map is None and device is not None:
            model = model.to(device)
        model.eval()
        model.requires_grad_(False)  # nothing here needs weight gradients
        models[name] = model
    if preset is not None:
        from lens.prompts import get_preset

        preset = get_preset(preset).name
    last = names[-1]
    return ModelSet(models, comparisons, adapter, tokenizers[last], processors.get(last), image_first, preset)


def organism_sources(twins: Sequence[str], variant: str = "organism") -> dict[str, str]:
    """The organism's base and the twins (``rlvr``, ``control`` or checkpoint folders) as folders.

    Raises:
        ConfigError: An unknown twin.
    """
    from lens import organism

    return {
        "base": str(organism.model_dir("base", variant)),
        **{t: organism.twin_source(t, variant) for t in twins},
    }
