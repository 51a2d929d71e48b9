"""Planted checkpoints: a base checkpoint plus a known weight edit, saved so the CLI loads it by path.

:func:`lens.controls.plant` plants an offset with hooks, inside one Python session. For runs that
take folders (``lens drift --rlvr DIR``, several GPUs, other tools), :func:`plant_checkpoint`
writes the same kind of twin as a checkpoint. Two edits are offered; both add a fixed offset
``size * u`` (``u`` = :func:`lens.controls.plant_direction`, RMS 1) at the input of block 0, and each
equals a hook plant exactly (up to float rounding, tested):

* ``"visual"``: ``u * size`` is added to the bias of the vision projector's last linear layer, the
  one whose output becomes the visual tokens' input to block 0. Every visual token moves by the
  same offset: the hook plant ``plant(pair, where="random", fraction=1.0, layer=0, size=size,
  relative=False, seed=seed)``. Offered where the adapter names that layer
  (``ArchitectureAdapter.projector_out_path``) and it has a bias.
* ``"text"``: ``u * size`` is added to every row of the token embedding except the visual
  placeholder ids and the vision delimiters (``adapter.visual_token_ids`` and
  ``vision_special_ids``): the hook plant ``where="text", fraction=1.0``, whose text tokens are the
  same. Refused for tied embeddings, where it would also edit the
  unembedding.

What a weight cannot do: choose tokens by the base's entropy (``"low"``/``"high"``), a fraction
q < 1, a layer other than 0, or a size relative to each sample's residual. Those stay hook plants.
``size`` here is absolute (residual units); :func:`visual_rms` gives the base's typical RMS at the
visual tokens' block-0 input, to pick sizes in the same units as the hook plants' relative ones.

The folder gets the edited weights (``save_pretrained``), every other file of the base checkpoint
(tokenizer, processor, chat template) copied unchanged, and ``planted.json`` naming the edit, the
base folder and a digest of ``u``. It is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lens.adapters import ArchitectureAdapter, adapter_for
from lens.controls import PlantConfig, plant_direction, plant_size
from lens.errors import CheckpointError, ConfigError

#: Where a weight plant can go.
WEIGHT_PLANT_SITES = ("visual", "text")

#: Files of a checkpoint folder that hold weights (replaced by the edited model's own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class WeightPlant:
    """One weight edit.

    Attributes:
        where: ``"visual"`` (the projector's output bias) or ``"text"`` (the token embedding rows).
        size: RMS of the offset in residual units (absolute); ``>= 0`` and finite.
        seed: Seed of the direction, as for :class:`lens.controls.PlantConfig`.
    """

    where: str = "visual"
    size: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.where not in WEIGHT_PLANT_SITES:
            raise ConfigError(
                f"a weight plant goes at {' or '.join(WEIGHT_PLANT_SITES)}, got {self.where!r} "
                "(low/high/random plants choose tokens per sample: use lens.controls.plant)"
            )
        object.__setattr__(self, "size", plant_size(self.size))
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ConfigError(f"plant seed must be an integer, got {self.seed!r}")

    def hook_equivalent(self) -> PlantConfig:
        """The hook plant this edit reproduces (see the module docstring)."""
        return PlantConfig(
            where="random" if self.where == "visual" else "text",
            size=self.size,
            layer=0,
            fraction=1.0,
            seed=self.seed,
            relative=False,
        )


def _no_visual_plant(adapter: ArchitectureAdapter) -> ConfigError:
    return ConfigError(
        f"{adapter.name} offers no visual weight plant (its adapter names no projector output "
        "layer); use the hook plant lens.controls.plant(where='random', fraction=1.0)"
    )


def _projector_bias(model: torch.nn.Module, adapter: ArchitectureAdapter) -> torch.Tensor:
    if not adapter.projector_out_path:
        raise _no_visual_plant(adapter)
    layer = adapter._get(model, adapter.projector_out_path)
    if getattr(layer, "bias", None) is None:
        raise ConfigError(f"{adapter.name}'s projector output layer has no bias to plant in")
    return layer.bias


def check_weight_plant(config: Any, plant: WeightPlant) -> ArchitectureAdapter:
    """Refuse an edit the checkpoint cannot take, from its config alone (before any weights load).

    Raises:
        UnsupportedArchitectureError: The family has no adapter.
        ConfigError: A visual plant on a family without a projector path or a text-only model, or a
            text plant on tied embeddings.
    """
    adapter = adapter_for(config)
    if plant.where == "visual":
        if not adapter.multimodal:
            raise ConfigError(f"a visual plant needs a model that takes images; {adapter.name} does not")
        if not adapter.projector_out_path:
            raise _no_visual_plant(adapter)
    elif bool(getattr(adapter.text_config(config), "tie_word_embeddings", False)) or bool(
        getattr(config, "tie_word_embeddings", False)
    ):
        raise ConfigError(
            "a text weight plant on tied embeddings would also edit the unembedding; "
            "use the hook plant lens.controls.plant(where='text', fraction=1.0)"
        )
    return adapter


@torch.no_grad()
def apply_weight_plant(model: torch.nn.Module, plant: WeightPlant) -> torch.Tensor:
    """Edit ``model``'s weights in place (for a fresh copy about to be saved, never a pair's model).

    Returns:
        The offset added, float32 ``[hidden]``.
    """
    adapter = check_weight_plant(model.config, plant)
    hidden = adapter.hidden_size(model.config)
    offset = plant_direction(hidden, plant.seed) * plant.size
    if plant.where == "visual":
        bias = _projector_bias(model, adapter)
        if bias.shape[-1] != hidden:
            raise ConfigError(f"projector bias has {bias.shape[-1]} features, the decoder {hidden}")
        bias.copy_((bias.float() + offset.to(bias.device)).to(bias.dtype))
    else:
        weight = adapter.embed(model).weight
        rows = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        skipped = {*adapter.visual_token_ids(model.config), *adapter.vision_special_ids(model.config)}
        for token_id in skipped:
            if 0 <= token_id < weight.shape[0]:
                rows[token_id] = False
        weight[rows] = (weight[rows].float() + offset.to(weight.device)).to(weight.dtype)
    return offset


def _direction_digest(hidden: int, seed: int) -> str:
    return hashlib.sha256(plant_direction(hidden, seed).numpy().tobytes()).hexdigest()[:16]


def plant_checkpoint(
    base: str | Path,
    out: str | Path,
    plant: WeightPlant,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``base`` plus the weight edit ``plant`` as a new checkpoint folder ``out``.

    Args:
        base: The base checkpoint folder.
        out: The new folder (must not exist, or be empty, unless ``overwrite``).
        plant: The edit.
        dtype: Load and save dtype (default: the checkpoint's own, ``torch_dtype``/``dtype`` in its
            config, else float32).
        overwrite: Replace an existing non-empty ``out`` (only once the new one is complete).

    Returns:
        The folder.

    Raises:
        CheckpointError: ``base`` is not a checkpoint folder or cannot load; ``out`` is ``base``.
        ConfigError: The edit does not fit the checkpoint, or ``out`` exists and is not empty.
    """
    from lens.loading import _auto_class, _load_config, _resolve

    source = Path(_resolve(base))
    if not source.is_dir():
        raise CheckpointError(f"a planted checkpoint needs a local base folder, got {base}")
    target = Path(out)
    if target.resolve() == source.resolve():
        raise ConfigError(f"--out {target} is the base checkpoint itself")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out {target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"--out {target} exists and is not empty (pass --overwrite to replace it)")
    config = _load_config(str(source))
    adapter = check_weight_plant(config, plant)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    try:
        model = _auto_class(adapter).from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load weights from {source}: {exc}".splitlines()[0]) from exc
    apply_weight_plant(model, plant)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        for item in source.iterdir():
            if item.is_dir() or item.name in _WEIGHT_INDEXES or item.suffix in _WEIGHT_SUFFIXES:
                continue
            if item.name in ("config.json", "planted.json") or (tmp / item.name).exists():
                continue  # save_pretrained wrote its own config (and generation config)
            shutil.copy2(item, tmp / item.name)
        hidden = adapter.hidden_size(config)
        record = {
            **asdict(plant),
            "units": "absolute (residual RMS)",
            "base": str(source.resolve()),
            "direction_sha256_16": _direction_digest(hidden, plant.seed),
            "hook_equivalent": asdict(plant.hook_equivalent()),
        }
        (tmp / "planted.json").write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():
            old = target.with_name(f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@torch.no_grad()
def visual_rms(pair: Any, samples: Sequence[Any]) -> float:
    """The base's RMS at the visual tokens' input to block 0, averaged over ``samples``.

    A hook plant of relative size ``s`` is, on average, an absolute offset of ``s * visual_rms``.

    Raises:
        ConfigError: No sample has visual tokens.
    """
    from lens.interventions.base import capture_block_residuals

    values = []
    for sample in samples:
        inputs = pair.encode(sample.question, [sample.image])
        visual = inputs.visual_positions
        if visual.numel() == 0:
            continue
        block_in = capture_block_residuals(pair.base, pair.adapter, inputs.model_inputs, inputs_of=(0,))[("in", 0)]
        values.append(block_in[visual.to(block_in.device)].float().pow(2).mean().sqrt().item())
    if not values:
        raise ConfigError("visual_rms needs at least one sample with visual tokens")
    return float(sum(values) / len(values))
