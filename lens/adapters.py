"""Architecture adapters: the only place that knows where a family keeps its parts.

One small adapter per architecture names the decoder layers, the final norm, the unembedding,
the point where input embeddings (image features already merged in) enter layer 0, and which
token ids are visual. Everything else in replay-lens goes through these accessors, so adding a
family means adding one class here (the TransformerLens 4.x bridge-adapter pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lens.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one architecture family keeps its parts.

    Attributes:
        name: Human-readable family name, shown in error messages.
        layers_path: Dotted path from the top-level model to the ``nn.ModuleList`` of decoder layers.
        norm_path: Dotted path to the final norm applied before the unembedding.
        unembed_path: Dotted path to the unembedding (``lm_head``).
        embed_path: Dotted path to the token embedding.
        multimodal: Whether the family takes images.
        image_inputs: The family's image builder, a module of :mod:`lens.inputs` with an
            ``expand_images`` function (``""`` for text-only families).
        projector_out_path: Dotted path to the vision projector's last linear layer, whose output
            (bias included) is exactly the visual tokens' input to block 0; ``""`` where no such
            layer exists (a weight plant, :mod:`lens.planted_checkpoint`, edits its bias).
    """

    name: str
    layers_path: str
    norm_path: str
    unembed_path: str
    embed_path: str
    multimodal: bool
    image_inputs: str = ""
    projector_out_path: str = ""

    model_types: ClassVar[tuple[str, ...]] = ()

    # -- module access -------------------------------------------------------------------------
    def _get(self, model: nn.Module, path: str) -> Any:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self._get(model, self.layers_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The final norm (its statistics are recomputed for whatever activation it is given)."""
        return self._get(model, self.norm_path)

    def unembed(self, model: nn.Module) -> nn.Linear:
        """The unembedding ``lm_head``."""
        return self._get(model, self.unembed_path)

    def embed(self, model: nn.Module) -> nn.Embedding:
        """The token embedding."""
        return self._get(model, self.embed_path)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def image_builder(self) -> Any:
        """The module that expands this family's image placeholders (see :mod:`lens.inputs`)."""
        import importlib

        if not self.image_inputs:
            raise UnsupportedArchitectureError(f"{self.name} takes no images")
        return importlib.import_module(f"lens.inputs.{self.image_inputs}")

    # -- config facts ----------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        return config

    def hidden_size(self, config: Any) -> int:
        return int(self.text_config(config).hidden_size)

    def vocab_size(self, config: Any) -> int:
        return int(self.text_config(config).vocab_size)

    def num_layers(self, config: Any) -> int:
        return int(self.text_config(config).num_hidden_layers)

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        """Token ids whose positions carry visual features (image and video placeholders)."""
        return ()

    def vision_special_ids(self, config: Any) -> tuple[int, ...]:
        """Ids that sampling must never emit: placeholders and vision delimiters."""
        return ()

    def extra_model_inputs(self, input_ids: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
        """Model inputs derived from the token ids alone (e.g. Qwen's ``mm_token_type_ids``)."""
        return {}

    def cached_vision_inputs(
        self, model: nn.Module, model_inputs: dict[str, torch.Tensor]
    ) -> dict[str, Any] | None:
        """Forward inputs that run the same forward as ``model_inputs`` without the vision tower.

        For repeated forwards of one sample (Activation Replay's steps): the vision tower runs once
        here. ``None`` (the default) means the family needs nothing beyond the merged image features,
        so the caller feeds the input of block 0 as ``inputs_embeds``; a family whose vision tower
        also feeds later layers (Qwen3-VL's DeepStack) returns its own cached inputs.
        """
        return None


@dataclass(frozen=True)
class QwenVLAdapter(ArchitectureAdapter):
    """Qwen2-VL and Qwen2.5-VL (transformers 5.x module tree)."""

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id), int(config.video_token_id))

    def vision_special_ids(self, config: Any) -> tuple[int, ...]:
        return (
            int(config.image_token_id),
            int(config.video_token_id),
            int(config.vision_start_token_id),
            int(config.vision_end_token_id),
        )

    def extra_model_inputs(self, input_ids: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
        # Without mm_token_type_ids transformers 5.x silently falls back to 1-D RoPE positions.
        image = input_ids == int(config.image_token_id)
        video = input_ids == int(config.video_token_id)
        return {"mm_token_type_ids": image.long() + 2 * video.long()}  # int64, as the processor returns


@dataclass(frozen=True)
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL, dense and MoE (transformers 5.x module tree; ids and ``mm_token_type_ids`` as Qwen2.5-VL).

    DeepStack: the vision tower also returns features from intermediate blocks, one level per
    entry of ``vision_config.deepstack_visual_indexes`` (3 in the published models), and
    ``Qwen3VLTextModel`` adds level ``l`` to the hidden states at the visual positions *after*
    decoder layer ``l``, for the first ``len(deepstack_visual_indexes)`` layers. What replay-lens
    reads and edits there:

    * the lens reads each decoder layer's own output, before the DeepStack addition that follows
      it. That is transformers' ``hidden_states[l + 1]`` (recorded at the layer's output), so
      capture equals ``output_hidden_states``, and a layer's lens shows what the layer computed,
      not the raw vision features added after it;
    * the *input* of block ``l`` as a hook on the block sees it (``capture_block_residuals``'s
      ``"in"``, hard injection at ``depth="released"``) is what the block reads: for ``l`` in
      ``1..levels`` that is ``hidden_states[l]`` plus DeepStack level ``l - 1`` at the visual
      positions. Activation Replay's loss reads ``hidden_states[l]`` (the reference's definition);
    * "layer 0 input", where Replay's Δ is added (and the embedding perturbation's noise, and
      ``"in"``/injection at block 0), is ``inputs_embeds``: the token embeddings with the merger's
      image features scattered in at the ``<|image_pad|>`` positions (= ``hidden_states[0]``). No
      DeepStack level has been added yet; all of them are still added on top, unchanged by Δ (in
      bf16, Replay's float32 carry keeps them in the carried residual).

    Replay's repeated forwards pass the cached vision-tower output (``mm_encoder_outputs``) with the
    token ids, so DeepStack is applied in every step exactly as in the full forward (an
    ``inputs_embeds`` forward would drop it, and transformers refuses ids and embeddings together).
    The lens self-check assumes the last decoder layer gets no DeepStack level (true of every
    published config: 3 levels on 28-94 layers).
    """

    def cached_vision_inputs(
        self, model: nn.Module, model_inputs: dict[str, torch.Tensor]
    ) -> dict[str, Any] | None:
        forward_inputs: dict[str, Any] = {
            k: v for k, v in model_inputs.items() if k not in ("pixel_values", "pixel_values_videos")
        }
        encoder_outputs = {}
        with torch.no_grad():
            if model_inputs.get("pixel_values") is not None:
                encoder_outputs["image"] = model.model.get_image_features(
                    model_inputs["pixel_values"], model_inputs["image_grid_thw"], return_dict=True
                )
            if model_inputs.get("pixel_values_videos") is not None:
                encoder_outputs["video"] = model.model.get_video_features(
                    model_inputs["pixel_values_videos"], model_inputs["video_grid_thw"], return_dict=True
                )
        if encoder_outputs:
            forward_inputs["mm_encoder_outputs"] = encoder_outputs
        return forward_inputs


@dataclass(frozen=True)
class InternVLAdapter(ArchitectureAdapter):
    """InternVL 3 / 3.5 in the transformers-native ``-hf`` format (``InternVLForConditionalGeneration``),
    with a Qwen2 (InternVL 3) or Qwen3 (InternVL 3.5) language model; both keep the same module tree.

    Layer 0 input: the language model's ``inputs_embeds``, i.e. the token embeddings with the
    projected image features (ViT -> pixel shuffle -> ``multi_modal_projector``) scattered into every
    ``<IMG_CONTEXT>`` position, one row per token of every tile and of the thumbnail; no scaling is
    applied after that. Replay's Δ and injection act there, at those positions only (``<img>`` and
    ``</img>`` are template).

    The config names only ``<IMG_CONTEXT>`` (``image_token_id``). InternVL checkpoints add ``<img>``,
    ``</img>`` and ``<IMG_CONTEXT>`` as consecutive special tokens, in that order (151665-151667 in
    InternVL 3; ``<IMG_CONTEXT>`` is 151671 in InternVL 3.5), so the delimiters are the two ids before
    it; the image builder (:mod:`lens.inputs.internvl`) refuses a tokenizer for which that does not hold.
    """

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        # Videos are expanded into per-frame <img><IMG_CONTEXT>...</img> too: one id covers both.
        return (int(config.image_token_id),)

    def vision_special_ids(self, config: Any) -> tuple[int, ...]:
        context = int(config.image_token_id)
        return (context - 2, context - 1, context)


@dataclass(frozen=True)
class Glm4vAdapter(ArchitectureAdapter):
    """GLM-4.1V (``glm4v``) and GLM-4.5V (``glm4v_moe``), transformers 5.x module tree.

    The chat template puts ``<|begin_of_image|><|image|><|end_of_image|>`` per image; the processor
    repeats ``<|image|>`` once per merged patch (``t*h*w / merge²``). Video frames reuse ``<|image|>``
    between ``<|begin_of_video|>`` and ``<|end_of_video|>``, so ``<|image|>`` is the only id that
    carries visual features; ``<|video|>`` is a template placeholder that never reaches the model.

    Layer 0 input: ``model.language_model.layers[0]``'s input, i.e. the token embeddings with the
    vision tower's merged-patch features (already projected to the text width) scattered into the
    ``<|image|>`` positions; GLM adds nothing to the residual before block 0 (positions enter as
    3-D M-RoPE inside attention), so this is where Replay's Δ and injections act, as for Qwen-VL.
    The last ``hidden_states`` entry is final-normed, as in Qwen-VL.
    """

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id),)

    def vision_special_ids(self, config: Any) -> tuple[int, ...]:
        return tuple(
            int(getattr(config, name))
            for name in (
                "image_token_id",
                "video_token_id",
                "image_start_token_id",
                "image_end_token_id",
                "video_start_token_id",
                "video_end_token_id",
            )
        )

    def extra_model_inputs(self, input_ids: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
        # The model refuses image_grid_thw without mm_token_type_ids (it needs them for M-RoPE).
        # As Glm4vProcessor builds them: 1 for <|image|>, 2 for <|image|> inside a video segment.
        starts = (input_ids == int(config.video_start_token_id)).cumsum(-1)
        ends = (input_ids == int(config.video_end_token_id)).cumsum(-1)
        image = input_ids == int(config.image_token_id)
        in_video = starts > ends
        return {"mm_token_type_ids": (image & ~in_video).long() + 2 * (image & in_video).long()}


_QWEN_VL_PATHS = dict(
    layers_path="model.language_model.layers",
    norm_path="model.language_model.norm",
    unembed_path="lm_head",
    embed_path="model.language_model.embed_tokens",
    multimodal=True,
    image_inputs="qwen_vl",
    projector_out_path="model.visual.merger.mlp.2",
)

QWEN2_5_VL = QwenVLAdapter(name="Qwen2.5-VL", **_QWEN_VL_PATHS)
QWEN2_VL = QwenVLAdapter(name="Qwen2-VL", **_QWEN_VL_PATHS)
INTERNVL = InternVLAdapter(
    name="InternVL",
    layers_path="model.language_model.layers",
    norm_path="model.language_model.norm",
    unembed_path="lm_head",
    embed_path="model.language_model.embed_tokens",
    multimodal=True,
    image_inputs="internvl",
    projector_out_path="model.multi_modal_projector.linear_2",
)
_GLM4V_PATHS = dict(
    layers_path="model.language_model.layers",
    norm_path="model.language_model.norm",
    unembed_path="lm_head",
    embed_path="model.language_model.embed_tokens",
    multimodal=True,
    image_inputs="glm4v",
)

GLM4V = Glm4vAdapter(name="GLM-4.1V", **_GLM4V_PATHS)
GLM4V_MOE = Glm4vAdapter(name="GLM-4.5V", **_GLM4V_PATHS)
_QWEN3_VL_PATHS = {
    **_QWEN_VL_PATHS,
    "image_inputs": "qwen3_vl",
    "projector_out_path": "model.visual.merger.linear_fc2",  # DeepStack's own mergers feed later layers
}
QWEN3_VL = Qwen3VLAdapter(name="Qwen3-VL", **_QWEN3_VL_PATHS)
QWEN3_VL_MOE = Qwen3VLAdapter(name="Qwen3-VL-MoE", **_QWEN3_VL_PATHS)
CAUSAL_LM = ArchitectureAdapter(
    name="decoder-only causal LM (Qwen2/Llama-style)",
    layers_path="model.layers",
    norm_path="model.norm",
    unembed_path="lm_head",
    embed_path="model.embed_tokens",
    multimodal=False,
)


@dataclass(frozen=True)
class LlavaOnevisionAdapter(ArchitectureAdapter):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``: SigLIP tower, 2-layer MLP projector,
    Qwen2 language model; transformers 5.x module tree).

    Visual tokens are the ``<image>`` (and ``<video>``) placeholders, expanded one per feature: an
    image's base-tile features, its unpadded anyres-grid features and the learned ``image_newline``
    vector closing each grid row (see :mod:`lens.inputs.llava_onevision`). There are no
    vision start/end delimiters.

    Layer 0 input (where Activation Replay adds Δ and hard injection writes at block 0): the input of
    ``model.language_model.layers[0]``, i.e. ``inputs_embeds`` after the projected image features
    (newline vectors included) have been scattered into the ``<image>`` positions; the language
    model adds no positional embedding to it (RoPE acts inside attention), so it is exactly
    ``hidden_states[0]``.
    """

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id), int(config.video_token_id))

    def vision_special_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id), int(config.video_token_id))


LLAVA_ONEVISION = LlavaOnevisionAdapter(
    name="LLaVA-OneVision",
    layers_path="model.language_model.layers",
    norm_path="model.language_model.norm",
    unembed_path="lm_head",
    embed_path="model.language_model.embed_tokens",
    multimodal=True,
    image_inputs="llava_onevision",
)


@dataclass(frozen=True)
class Gemma3Adapter(ArchitectureAdapter):
    """Gemma 3 (``Gemma3ForConditionalGeneration``: SigLIP tower, average-pooling projector, Gemma 3
    language model; transformers 5.x module tree).

    The chat template puts ``<start_of_image>`` per image; the processor turns it into
    ``\\n\\n<start_of_image>`` + ``<image_soft_token>`` x ``mm_tokens_per_image`` + ``<end_of_image>\\n\\n``
    (see :mod:`lens.inputs.gemma3`). ``<image_soft_token>`` is the only id that carries visual
    features; ``<start_of_image>`` and ``<end_of_image>`` are template.

    Layer 0 input (where Activation Replay adds Δ and hard injection writes at block 0): the input of
    ``model.language_model.layers[0]`` (= ``hidden_states[0]``), i.e. the token embeddings *already
    multiplied by* ``sqrt(hidden_size)`` (``Gemma3TextScaledWordEmbedding``; the scale is cast to the
    model dtype first) with the projector's image features scattered into the ``<image_soft_token>``
    positions. The image features are not scaled, so Δ lives in the units of the projected features;
    nothing is added to the residual before block 0 (RoPE acts inside attention).

    ``token_type_ids`` (1 at ``<image_soft_token>``) are derived from the ids: the model needs them to
    let the tokens of one image attend to each other bidirectionally (in full and sliding-window
    layers alike); without them the mask is plainly causal. ``lm_head`` is tied to the (unscaled)
    embedding matrix, and the final norm is Gemma's ``(1 + weight)`` RMSNorm, which the lens calls as
    the model's own module. The published checkpoints set no ``final_logit_softcapping``
    (``Gemma3ForConditionalGeneration`` applies none), so the lens of the last layer is the model's logits.
    """

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def visual_token_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id),)

    def vision_special_ids(self, config: Any) -> tuple[int, ...]:
        return (int(config.image_token_id), int(config.boi_token_id), int(config.eoi_token_id))

    def extra_model_inputs(self, input_ids: torch.Tensor, config: Any) -> dict[str, torch.Tensor]:
        # As Gemma3Processor builds them (int64): 1 at the image soft tokens, 0 elsewhere.
        return {"token_type_ids": (input_ids == int(config.image_token_id)).long()}


GEMMA3 = Gemma3Adapter(
    name="Gemma 3",
    layers_path="model.language_model.layers",
    norm_path="model.language_model.norm",
    unembed_path="lm_head",
    embed_path="model.language_model.embed_tokens",
    multimodal=True,
    image_inputs="gemma3",
)

#: config.model_type -> adapter. The single registry of supported families.
ADAPTERS: dict[str, ArchitectureAdapter] = {
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen2_vl": QWEN2_VL,
    "internvl": INTERNVL,
    "glm4v": GLM4V,
    "glm4v_moe": GLM4V_MOE,
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL_MOE,
    "qwen2": CAUSAL_LM,
    "qwen3": CAUSAL_LM,
    "llama": CAUSAL_LM,
    "mistral": CAUSAL_LM,
    "llava_onevision": LLAVA_ONEVISION,
    "gemma3": GEMMA3,
}


def supported_architectures() -> str:
    """A one-line list of the supported ``model_type`` values."""
    return ", ".join(sorted(ADAPTERS))


def adapter_for(config: Any) -> ArchitectureAdapter:
    """Return the adapter for a transformers config.

    Raises:
        UnsupportedArchitectureError: If no adapter covers ``config.model_type``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported model types: {supported_architectures()}"
        )
    return ADAPTERS[model_type]
