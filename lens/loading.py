"""Load a base/RLVR pair from checkpoint folders and refuse pairs that cannot be compared."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lens.adapters import ArchitectureAdapter, adapter_for
from lens.errors import CheckpointError, PairMismatchError
from lens.inputs import ImageLike, Message, PairInputs, build_inputs

_PROBE_TEXT = "Probe: how many red shapes are there? 12 + 30 = 42."


@dataclass
class ModelPair:
    """A base model and its RLVR twin, sharing one tokenizer and image processor.

    Attributes:
        base: The base model (e.g. Qwen2.5-VL-7B-Instruct), in eval mode with frozen weights.
        rlvr: The RLVR post-trained twin (e.g. MM-Eureka-Qwen-7B).
        adapter: The family adapter shared by both.
        tokenizer: The tokenizer (taken from the RLVR checkpoint, as the released code does).
        image_processor: The image processor, or ``None`` for text-only pairs.
        image_first: Whether images go before the text in the user turn.
        names: Display names of the two models.
    """

    base: nn.Module
    rlvr: nn.Module
    adapter: ArchitectureAdapter
    tokenizer: Any
    image_processor: Any | None = None
    image_first: bool = True
    names: tuple[str, str] = ("base", "rlvr")

    @property
    def config(self) -> Any:
        return self.rlvr.config

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.rlvr)

    @property
    def device(self) -> torch.device:
        return next(self.rlvr.parameters()).device

    def encode(
        self,
        prompt: str | None = None,
        images: Sequence[ImageLike] = (),
        response: str | None = None,
        system: str | None = None,
        image_first: bool | None = None,
        *,
        messages: Sequence[Message] | None = None,
    ) -> PairInputs:
        """Build identical inputs for both models, with the token-role map.

        Args:
            prompt: The user's text.
            images: Zero or more images (PIL images, paths or encoded bytes).
            response: Optional response for teacher forcing.
            system: Optional system prompt (``template`` role); ``None``/``""`` keeps the template's
                default.
            image_first: Override the pair's image placement.
            messages: The chat as messages instead of ``prompt``/``images``/``system``, for
                several turns or images in any turn (see :mod:`lens.inputs`).
        """
        return build_inputs(
            self.tokenizer,
            self.adapter,
            self.config,
            prompt,
            images,
            response=response,
            image_processor=self.image_processor,
            image_first=self.image_first if image_first is None else image_first,
            device=self.device,
            system=system,
            messages=messages,
        )

    def models(self) -> tuple[nn.Module, nn.Module]:
        return self.base, self.rlvr

    @classmethod
    def from_models(
        cls,
        base: nn.Module,
        rlvr: nn.Module,
        tokenizer: Any,
        image_processor: Any | None = None,
        base_tokenizer: Any | None = None,
        base_image_processor: Any | None = None,
        image_first: bool = True,
        names: tuple[str, str] = ("base", "rlvr"),
    ) -> ModelPair:
        """Wrap two in-memory models, after checking they can be compared.

        Raises:
            UnsupportedArchitectureError: If the family has no adapter.
            PairMismatchError: If architecture, depth, width, vocabulary, tokenizer or
                processor output differ.
        """
        check_configs(base.config, rlvr.config)
        adapter = adapter_for(rlvr.config)
        if base_tokenizer is not None:
            check_tokenizers(base_tokenizer, tokenizer)
        if base_image_processor is not None and image_processor is not None:
            check_image_processors(base_image_processor, image_processor)
        for model in (base, rlvr):
            model.eval()
            # Analyses and interventions never need weight gradients; freezing keeps autograd
            # from recording the weights' graph (a large memory saving for test-time replay).
            model.requires_grad_(False)
        return cls(base, rlvr, adapter, tokenizer, image_processor, image_first, names)


def check_configs(base_config: Any, rlvr_config: Any) -> None:
    """Refuse configs whose activations cannot be compared position by position."""
    base_type, rlvr_type = getattr(base_config, "model_type", None), getattr(rlvr_config, "model_type", None)
    if base_type != rlvr_type:
        raise PairMismatchError(f"architecture differs: base is {base_type!r}, rlvr is {rlvr_type!r}")
    adapter = adapter_for(rlvr_config)
    for what, getter in (
        ("layer count", adapter.num_layers),
        ("hidden size", adapter.hidden_size),
        ("vocabulary size", adapter.vocab_size),
    ):
        b, r = getter(base_config), getter(rlvr_config)
        if b != r:
            raise PairMismatchError(f"{what} differs: base has {b}, rlvr has {r}")
    if adapter.multimodal:
        b_ids, r_ids = adapter.vision_special_ids(base_config), adapter.vision_special_ids(rlvr_config)
        if b_ids != r_ids:
            raise PairMismatchError(f"vision special token ids differ: base {b_ids}, rlvr {r_ids}")


def check_tokenizers(base_tokenizer: Any, rlvr_tokenizer: Any) -> None:
    """Refuse tokenizers with different vocabularies or different encodings of a probe text."""
    b_vocab, r_vocab = base_tokenizer.get_vocab(), rlvr_tokenizer.get_vocab()
    if b_vocab != r_vocab:
        only_b = len(set(b_vocab) - set(r_vocab))
        only_r = len(set(r_vocab) - set(b_vocab))
        raise PairMismatchError(
            f"tokenizer vocabulary differs: {len(b_vocab)} vs {len(r_vocab)} entries "
            f"({only_b} only in base, {only_r} only in rlvr, others with different ids)"
        )
    if base_tokenizer(_PROBE_TEXT)["input_ids"] != rlvr_tokenizer(_PROBE_TEXT)["input_ids"]:
        raise PairMismatchError("tokenizers encode the same text differently")
    if getattr(base_tokenizer, "chat_template", None) != getattr(rlvr_tokenizer, "chat_template", None):
        warnings.warn("base and rlvr chat templates differ; the rlvr template is used for both", stacklevel=3)


def _probe_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8))


def check_image_processors(base_processor: Any, rlvr_processor: Any) -> None:
    """Refuse image processors that give different tensors for the same image."""
    image = _probe_image()
    b = base_processor(images=[image], return_tensors="pt")
    r = rlvr_processor(images=[image], return_tensors="pt")
    for key in ("image_grid_thw", "pixel_values"):
        if key in b or key in r:
            if (
                key not in b
                or key not in r
                or b[key].shape != r[key].shape
                or not torch.equal(b[key], r[key])
            ):
                raise PairMismatchError(f"image processors differ: different {key} for the same image")


def _resolve(path_or_id: str | Path) -> str:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"not a checkpoint folder (no config.json): {path}")
        return str(path)
    text = str(path_or_id)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id and not path.parent.exists():
        return text  # a hub id such as "Qwen/Qwen2.5-VL-7B-Instruct"; transformers resolves it
    raise CheckpointError(f"checkpoint folder not found: {path}")


def _auto_class(adapter: ArchitectureAdapter) -> Any:
    import transformers

    return (
        transformers.AutoModelForImageTextToText if adapter.multimodal else transformers.AutoModelForCausalLM
    )


def _load_config(source: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot load the config of {source}: {exc}".splitlines()[0]) from exc


def _load_image_processor(source: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        # Without torchvision, transformers falls back to the PIL implementation of the same
        # processor (same tensors); with torchvision it may pick the fast one.
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"cannot load the image processor of {source}: {exc}".splitlines()[0]) from exc


def load_pair(
    base: str | Path,
    rlvr: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    image_first: bool = True,
    attn_implementation: str | None = None,
) -> ModelPair:
    """Load a base/RLVR pair from two checkpoint folders (or hub ids where a network exists).

    Args:
        base: Base checkpoint folder, or ``"organism"`` for the built-in pair.
        rlvr: RLVR checkpoint folder; with ``base="organism"`` a twin name (``"rlvr"`` or ``"control"``).
        dtype: Model dtype (``torch.bfloat16`` for 7B models); default float32.
        device: Device to load both models onto (ignored when ``device_map`` is given).
        device_map: An accelerate device map, e.g. ``"auto"``.
        image_first: Whether images precede the text in the user turn.
        attn_implementation: Passed to transformers (e.g. ``"sdpa"``, ``"eager"``).

    Returns:
        The pair, in eval mode with frozen weights.

    Raises:
        CheckpointError: A folder is missing or unloadable.
        UnsupportedArchitectureError: The family has no adapter.
        PairMismatchError: The two checkpoints cannot be compared.
    """
    if str(base) == "organism":
        from lens import organism

        return organism.load_pair(
            rlvr=str(rlvr or "rlvr"),
            dtype=dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
        )
    if rlvr is None:
        raise CheckpointError("load_pair needs both a base and an rlvr checkpoint")
    from transformers import AutoTokenizer

    base_src, rlvr_src = _resolve(base), _resolve(rlvr)
    base_cfg, rlvr_cfg = _load_config(base_src), _load_config(rlvr_src)
    check_configs(base_cfg, rlvr_cfg)
    adapter = adapter_for(rlvr_cfg)
    try:
        base_tok = AutoTokenizer.from_pretrained(base_src)
        rlvr_tok = AutoTokenizer.from_pretrained(rlvr_src)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer: {exc}".splitlines()[0]) from exc
    base_ip = rlvr_ip = None
    if adapter.multimodal:
        base_ip, rlvr_ip = _load_image_processor(base_src), _load_image_processor(rlvr_src)
    # Refuse a mismatched pair before loading (possibly many GB of) weights.
    check_tokenizers(base_tok, rlvr_tok)
    if base_ip is not None and rlvr_ip is not None:
        check_image_processors(base_ip, rlvr_ip)

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    auto = _auto_class(adapter)
    models = []
    for src in (base_src, rlvr_src):
        try:
            model = auto.from_pretrained(src, **kwargs)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load weights from {src}: {exc}".splitlines()[0]) from exc
        if device_map is None and device is not None:
            model = model.to(device)
        models.append(model)
    return ModelPair.from_models(
        models[0],
        models[1],
        rlvr_tok,
        rlvr_ip,
        image_first=image_first,
        names=(Path(base_src).name or "base", Path(rlvr_src).name or "rlvr"),
    )
