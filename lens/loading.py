"""Load a base/RLVR pair from checkpoint folders and refuse pairs that cannot be compared."""

from __future__ import annotations

import enum
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from lens.adapters import ArchitectureAdapter, adapter_for
from lens.errors import CheckpointError, ConfigError, PairMismatchError
from lens.inputs import ImageLike, Message, PairInputs, build_inputs
from lens.video import VideoOptions, VideoPart

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
        prompt_preset: The prompt preset the checkpoints name in their side file
            (:data:`lens.prompts.PRESET_FILE`), or ``None``; see :func:`lens.prompts.encode_sample`.
        video_options: The run's video defaults (``nframes``/``fps``, pixel bounds) for the options a
            video item leaves unset, e.g. ``VideoOptions(nframes=16, max_pixels=200704)`` (Video-R1).
    """

    base: nn.Module
    rlvr: nn.Module
    adapter: ArchitectureAdapter
    tokenizer: Any
    image_processor: Any | None = None
    image_first: bool = True
    names: tuple[str, str] = ("base", "rlvr")
    prompt_preset: str | None = None
    video_options: VideoOptions | None = None

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
        videos: Sequence[VideoPart | str | Path] = (),
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
            videos: Videos of the user turn (paths, or :class:`~lens.video.VideoPart` with options);
                unset options take :attr:`video_options`.
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
            videos=videos,
            video_options=self.video_options,
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
        prompt_preset: str | None = None,
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
        if prompt_preset is not None:
            from lens.prompts import get_preset

            prompt_preset = get_preset(prompt_preset).name
        return cls(base, rlvr, adapter, tokenizer, image_processor, image_first, names, prompt_preset)


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


# Image-processor settings that change the number of visual tokens or the pixel tensors. Qwen-VL's
# min/max pixels live in ``size`` (``shortest_edge``/``longest_edge`` in transformers 5) or, in older
# releases, in ``min_pixels``/``max_pixels`` attributes; both are compared.
_IMAGE_SETTINGS = (
    "size",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "merge_size",
    "temporal_patch_size",
    "min_patches",  # InternVL / GOT-OCR2 dynamic tiling: the tile budget sets the visual token count
    "max_patches",
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "do_pad",
    "image_grid_pinpoints",  # LLaVA-OneVision: the tilings an image may get
    "do_pan_and_scan",  # Gemma 3: crops of elongated images add visual tokens
)


def _plain(value: Any) -> Any:
    """A setting as plain Python values, so equal settings compare equal across classes."""
    if isinstance(value, Mapping) or hasattr(value, "__dataclass_fields__"):
        items = value.items() if isinstance(value, Mapping) else vars(value).items()
        return {k: _plain(v) for k, v in sorted(items) if v is not None}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return round(value, 12)
    return value


def image_processor_settings(processor: Any) -> dict[str, Any]:
    """The settings of an image processor that change its output, flattened (``size.longest_edge``)."""
    settings: dict[str, Any] = {}
    for name in _IMAGE_SETTINGS:
        value = _plain(getattr(processor, name, None))
        if isinstance(value, dict):
            settings.update({f"{name}.{k}": v for k, v in value.items()})
        elif value is not None:
            settings[name] = value
    return settings


def _visual_tokens(processor: Any, width: int, height: int) -> int | None:
    """Visual tokens an image of this size gets (for error messages); ``None`` if it cannot say."""
    try:
        out = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        merge = int(getattr(processor, "merge_size", 1) or 1)
    except Exception:  # only used to word an error; never let it hide the mismatch itself
        return None
    return t * h * w // (merge * merge)


def image_processor_mismatch(base_processor: Any, rlvr_processor: Any) -> str | None:
    """How two image processors differ (settings, or tensors for the same probe image), or ``None``.

    The settings are compared directly (pixel budget, patch, merge and temporal patch sizes,
    resampling, normalisation): a small probe image fits in any pixel budget, so only the settings
    show a different ``max_pixels`` before a large image gets a different number of visual tokens.
    """
    b_set, r_set = image_processor_settings(base_processor), image_processor_settings(rlvr_processor)
    differing = [k for k in sorted(set(b_set) | set(r_set)) if b_set.get(k) != r_set.get(k)]
    if differing:
        shown = "; ".join(f"{k}: base {b_set.get(k)!r}, rlvr {r_set.get(k)!r}" for k in differing[:4])
        counts = (_visual_tokens(base_processor, 1920, 1080), _visual_tokens(rlvr_processor, 1920, 1080))
        effect = ""
        if None not in counts and counts[0] != counts[1]:
            effect = f" (a 1920x1080 image gives {counts[0]} visual tokens in base, {counts[1]} in rlvr)"
        return f"image processors differ in their settings: {shown}{effect}"
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
                return f"image processors differ: different {key} for the same image"
    return None


def check_image_processors(base_processor: Any, rlvr_processor: Any) -> None:
    """Refuse image processors with different settings, or different tensors for the same image.

    Raises:
        PairMismatchError: Naming the difference, and the way out: make the checkpoints'
            ``preprocessor_config.json`` agree, or feed both models through one side's processor
            (``processor="rlvr"``, ``--processor rlvr``), as the released replay code does.
    """
    problem = image_processor_mismatch(base_processor, rlvr_processor)
    if problem:
        raise PairMismatchError(
            f"{problem}; make the two checkpoints' preprocessor_config.json agree, or feed both "
            "models through one side's with --processor rlvr (or base)"
        )


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


def _chat_template_from_files(folder: str) -> str | None:
    """The chat template a checkpoint ships beside its tokenizer (``chat_template.jinja`` or the older
    ``chat_template.json``), for tokenizers that did not read it.

    Raises:
        CheckpointError: A ``chat_template.json`` without a template string.
    """
    path = Path(folder)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = path / "chat_template.json"
    if not legacy.is_file():
        return None
    try:
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{legacy}: not a chat template file ({exc})".splitlines()[0]) from exc
    if not isinstance(template, str) or not template.strip():
        raise CheckpointError(f'{legacy}: expected {{"chat_template": "<jinja template>"}}')
    return template


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a tokenizer: {exc}".splitlines()[0]) from exc
    if not getattr(tokenizer, "chat_template", None) and Path(source).is_dir():
        # Older releases ship the template only as chat_template.json (read by the processor, not
        # by the tokenizer); without it every prompt would be encoded without a template.
        template = _chat_template_from_files(source)
        if template is not None:
            tokenizer.chat_template = template
    return tokenizer


def _pair_preset(base_src: str, rlvr_src: str) -> str | None:
    """The prompt preset the two checkpoints name; the RLVR checkpoint's wins when they differ."""
    from lens.prompts import PRESET_FILE, read_checkpoint_preset

    folders = [Path(src) if Path(src).is_dir() else None for src in (base_src, rlvr_src)]
    base_name, rlvr_name = (read_checkpoint_preset(f) if f else None for f in folders)
    if base_name and rlvr_name and base_name != rlvr_name:
        warnings.warn(
            f"the checkpoints' {PRESET_FILE} name different prompt presets (base {base_name!r}, "
            f"rlvr {rlvr_name!r}); using the rlvr one, the model whose behaviour is measured",
            stacklevel=3,
        )
    return rlvr_name or base_name


def load_pair(
    base: str | Path,
    rlvr: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    image_first: bool = True,
    attn_implementation: str | None = None,
    processor: str | None = None,
) -> ModelPair:
    """Load a base/RLVR pair from two checkpoint folders (or hub ids where a network exists).

    Args:
        base: Base checkpoint folder, or ``"organism"`` for the built-in pair (``"organism-tied"``: the
            opt-in readable organism).
        rlvr: RLVR checkpoint folder; with ``base="organism"`` a twin name (``"rlvr"`` or ``"control"``).
        dtype: Model dtype (``torch.bfloat16`` for 7B models); default float32.
        device: Device to load both models onto (ignored when ``device_map`` is given).
        device_map: An accelerate device map, e.g. ``"auto"``.
        image_first: Whether images precede the text in the user turn.
        attn_implementation: Passed to transformers (e.g. ``"sdpa"``, ``"eager"``).
        processor: ``None`` refuses image processors that differ; ``"rlvr"`` or ``"base"`` feeds both
            models through that checkpoint's (as the released replay code feeds both through one),
            with a warning naming the differences.

    Returns:
        The pair, in eval mode with frozen weights.

    Raises:
        CheckpointError: A folder is missing or unloadable, or its ``replay_lens.json`` or
            ``chat_template.json`` is malformed.
        ConfigError: A ``replay_lens.json`` names an unknown prompt preset.
        UnsupportedArchitectureError: The family has no adapter.
        PairMismatchError: The two checkpoints cannot be compared.
    """
    from lens import organism

    if str(base) in organism.VARIANTS:
        return organism.load_pair(
            rlvr=str(rlvr or "rlvr"),
            variant=str(base),
            dtype=dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
            processor=processor,
        )
    if rlvr is None:
        raise CheckpointError("load_pair needs both a base and an rlvr checkpoint")
    base_src, rlvr_src = _resolve(base), _resolve(rlvr)
    prompt_preset = _pair_preset(base_src, rlvr_src)
    base_cfg, rlvr_cfg = _load_config(base_src), _load_config(rlvr_src)
    check_configs(base_cfg, rlvr_cfg)
    adapter = adapter_for(rlvr_cfg)
    base_tok, rlvr_tok = _load_tokenizer(base_src), _load_tokenizer(rlvr_src)
    base_ip = rlvr_ip = None
    if adapter.multimodal:
        base_ip, rlvr_ip = _load_image_processor(base_src), _load_image_processor(rlvr_src)
    # Refuse a mismatched pair before loading (possibly many GB of) weights.
    check_tokenizers(base_tok, rlvr_tok)
    if processor not in (None, "rlvr", "base"):
        raise ConfigError(f"processor must be 'rlvr' or 'base', got {processor!r}")
    if base_ip is not None and rlvr_ip is not None:
        if processor is None:
            check_image_processors(base_ip, rlvr_ip)
        else:
            problem = image_processor_mismatch(base_ip, rlvr_ip)
            if problem:
                warnings.warn(f"{problem}; both models get the {processor} checkpoint's", stacklevel=2)
            if processor == "base":
                rlvr_ip = base_ip

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
        prompt_preset=prompt_preset,
    )
