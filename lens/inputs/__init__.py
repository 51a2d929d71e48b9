"""Turn a chat (system prompt, user turns with images, optional response) into identical model
inputs plus a token-role map.

A VLM processor does three things: render the chat template with one placeholder per image,
expand each placeholder to the image's number of visual tokens, and tokenize. We do the same three
steps here with the tokenizer and image processor directly, because the stock processor classes
cannot be built without torchvision; the tests check the tensors are identical to the processor's.
The middle step is the family's: each adapter names its image builder, a module of this package
(``qwen_vl`` for Qwen2-VL and Qwen2.5-VL) with an ``expand_images`` function. Doing it ourselves also lets us keep character offsets, which give the role
of every token (visual, prompt text, chat template, response).

Roles. Every token gets one of :data:`ROLES`:

- ``visual``: an image placeholder token (one per merged patch);
- ``prompt``: the text of a user turn, and the text of *earlier* assistant turns of a conversation
  (they are context the model reads, like the question; they are not what it is scored on);
- ``template``: chat scaffolding, the template's default system prompt, a system prompt given by
  the caller, and the fixed instruction text of a prompt preset (see :mod:`lens.prompts`);
- ``response``: the teacher-forced ``response`` after the generation prompt, and its end token.

A chat is given either as ``prompt`` (+ ``images``, ``system``) or as ``messages``: a list of
``{"role": "system" | "user" | "assistant", "content": str | [items]}`` where an item is
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL | path | bytes}``, or as
:class:`Turn` objects, which also say the role of each text piece. The last message must be a
user turn: the model answers it (after the template's generation prompt), and the answer to
score or teacher-force is ``response``. A message without images is passed to the chat template
as a plain string, as real text-only templates (Qwen2.5, Llama 3) require; where the template then
drops the text (it reads typed parts only, as LLaVA-OneVision's does), every content is sent as
typed parts instead.

The chat's objects (:class:`Turn`, :class:`TextPart`, :class:`ImagePart`, the roles) live in
:mod:`lens.inputs.messages`, the template rendering with character spans in
:mod:`lens.inputs.template`; every name is importable from here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lens.adapters import ArchitectureAdapter
from lens.errors import InputError
from lens.inputs.messages import (  # noqa: F401  (public API of lens.inputs)
    CHAT_ROLES,
    ROLE_PROMPT,
    ROLE_RESPONSE,
    ROLE_TEMPLATE,
    ROLE_VISUAL,
    ROLES,
    ImageLike,
    ImagePart,
    Message,
    TextPart,
    Turn,
    _load_image,
    open_image,
    prompt_turns,
    system_turn,
    to_turns,
    user_turn,
)
from lens.inputs.template import _fill, _render, _skeleton_messages
from lens.video import VideoClip, VideoOptions, VideoPart


@dataclass(frozen=True)
class PairInputs:
    """Inputs shared by both models of a pair, plus what every analysis needs to know about them.

    Attributes:
        model_inputs: Keyword arguments for ``model(**model_inputs)`` (batch of one).
        roles: Role of every position, one of :data:`ROLES`.
        tokens: The token string at every position (for plots and debugging).
        image_grids: ``(t, h, w)`` patch grid of each image, before the spatial merge.
        merge_size: Spatial merge factor (2 for Qwen-VL); merged grid is ``(h/merge, w/merge)``.
        response_start: Index of the first response token, or ``None`` without a response.
        video_grids: ``(t, h, w)`` patch grid of each video (``t`` temporal patches).
        frames: Per position, the temporal patch of a video token (patch ``t`` holds sampled frames
            ``2t`` and ``2t+1``), and -1 for every other position; empty when there is no video.
    """

    model_inputs: dict[str, torch.Tensor]
    roles: tuple[str, ...]
    tokens: tuple[str, ...]
    image_grids: tuple[tuple[int, int, int], ...] = ()
    merge_size: int = 1
    response_start: int | None = None
    video_grids: tuple[tuple[int, int, int], ...] = ()
    frames: tuple[int, ...] = ()
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.model_inputs["input_ids"]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def positions(self, role: str) -> torch.Tensor:
        """Indices of the positions that have ``role``."""
        return torch.tensor([i for i, r in enumerate(self.roles) if r == role], dtype=torch.long)

    @property
    def visual_positions(self) -> torch.Tensor:
        return self.positions(ROLE_VISUAL)

    @property
    def role_array(self) -> np.ndarray:
        return np.asarray(self.roles)

    def to(self, device: torch.device | str) -> PairInputs:
        moved = {k: v.to(device) for k, v in self.model_inputs.items()}
        return PairInputs(
            moved,
            self.roles,
            self.tokens,
            self.image_grids,
            self.merge_size,
            self.response_start,
            video_grids=self.video_grids,
            frames=self.frames,
        )


def build_inputs(
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    config: Any,
    prompt: str | None = None,
    images: Sequence[ImageLike] = (),
    response: str | None = None,
    image_processor: Any | None = None,
    image_first: bool = True,
    use_chat_template: bool = True,
    device: torch.device | str | None = None,
    *,
    system: str | None = None,
    messages: Sequence[Message] | None = None,
    videos: Sequence[VideoPart | VideoClip | str | Path] = (),
    video_options: VideoOptions | None = None,
) -> PairInputs:
    """Build one sample's inputs and its token-role map.

    Args:
        tokenizer: A fast tokenizer (offsets are needed for the role map).
        adapter: The pair's architecture adapter.
        config: The model config (visual token ids live there).
        prompt: The user's text (the prompt form; leave ``None`` with ``messages``).
        images: Zero or more images (PIL images, paths or encoded bytes) of the user turn.
        response: Optional response, appended after the generation prompt and ended with the
            tokenizer's EOS token, for teacher forcing.
        image_processor: The image processor; required when there are images.
        image_first: Put images before the text in the user turn (Qwen's usual order).
        use_chat_template: Render with the tokenizer's chat template when it has one.
        device: Where to put the tensors.
        system: A system prompt (its tokens are ``template``); ``None`` or ``""`` for none, which
            leaves the template's default system prompt, if it has one.
        messages: The chat as messages instead of ``prompt``/``images``/``system`` (see the module
            docstring); the last one must be a user message.
        videos: Videos of the user turn (files, :class:`~lens.video.VideoPart` with per-video
            options, or decoded :class:`~lens.video.VideoClip`), placed before the images.
        video_options: The run's video defaults (frames, pixel bounds) for options a video leaves unset.

    Returns:
        The inputs, with one role per position.

    Raises:
        InputError: For unreadable images, images given to a text-only model, an empty prompt or
            message, malformed messages, or a chat template that cannot place the text.
    """
    if messages is not None:
        if prompt is not None or len(images) or system or len(videos):
            raise InputError("give either prompt (with images, videos, system) or messages, not both")
        turns = to_turns(messages)
    else:
        turns = prompt_turns(prompt, images, system, image_first, videos)  # type: ignore[arg-type]
    video_parts = [v for turn in turns for v in turn.videos]
    if video_parts:
        _check_video_family(adapter, image_processor)
    all_images = [im for turn in turns for im in turn.images]
    pil_images = [_load_image(im) for im in all_images]
    if pil_images and not adapter.multimodal:
        raise InputError(f"{adapter.name} takes no images, but {len(pil_images)} were given")
    if pil_images and image_processor is None:
        raise InputError("images were given but the pair has no image processor")

    if use_chat_template and getattr(tokenizer, "chat_template", None):
        skeleton, pieces = _render(tokenizer, turns)
    else:
        if pil_images or video_parts:
            raise InputError(
                "images and videos need a chat template that places them; the tokenizer has none"
            )
        if len(turns) != 1:
            raise InputError(
                "a system prompt or a conversation needs a chat template; the tokenizer has none"
            )
        _, pieces = _skeleton_messages(turns, "whole")
        skeleton = "".join(p.marker for p in pieces)

    pixel_inputs: dict[str, torch.Tensor] = {}
    grids: tuple[tuple[int, int, int], ...] = ()
    merge, expected = 1, 0
    if pil_images:
        expansion = adapter.image_builder().expand_images(
            skeleton, pil_images, image_processor, tokenizer, config
        )
        skeleton, pixel_inputs = expansion.skeleton, expansion.pixel_inputs
        grids, merge, expected = expansion.grids, expansion.merge, expansion.n_visual
    video_grids: tuple[tuple[int, int, int], ...] = ()
    token_frames: tuple[int, ...] = ()
    if video_parts:
        clips = [v.clip(video_options) for v in video_parts]
        sizing = [v.pixel_options(video_options) for v in video_parts]
        video_expansion = adapter.image_builder().expand_videos(
            skeleton, clips, sizing, image_processor, tokenizer, config
        )
        skeleton = video_expansion.skeleton
        pixel_inputs = {**pixel_inputs, **video_expansion.pixel_inputs}
        video_grids, token_frames = video_expansion.grids, video_expansion.token_frames
        merge, expected = video_expansion.merge, expected + video_expansion.n_visual

    text, spans = _fill(skeleton, pieces)
    response_span = None
    if response is not None:
        eos = tokenizer.eos_token or ""
        response_span = (len(text), len(text) + len(response))
        text = text + response + eos

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
    input_ids = enc["input_ids"]
    offsets = enc["offset_mapping"][0].tolist()
    visual_ids = set(adapter.visual_token_ids(config))
    starts = [s for s, _, _ in spans]
    roles: list[str] = []
    response_start = None
    for i, (tid, (s, e)) in enumerate(zip(input_ids[0].tolist(), offsets, strict=True)):
        if tid in visual_ids:
            roles.append(ROLE_VISUAL)
            continue
        if response_span is not None and s >= response_span[0] and e > s:
            if response_start is None:
                response_start = i
            # The EOS after the response belongs to the response: it is what the model must emit.
            roles.append(ROLE_RESPONSE)
            continue
        # A token takes a text piece's role only when it lies wholly inside the piece; tokens that
        # straddle a piece and the scaffolding around it count as template.
        k = bisect.bisect_right(starts, s) - 1
        inside = k >= 0 and e > s and e <= spans[k][1]
        roles.append(spans[k][2] if inside else ROLE_TEMPLATE)

    n_visual = roles.count(ROLE_VISUAL)
    if n_visual != expected:
        raise InputError(f"tokenized {n_visual} visual tokens but the images need {expected}")

    model_inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        **pixel_inputs,
        **adapter.extra_model_inputs(input_ids, config),
    }
    if device is not None:
        model_inputs = {k: v.to(device) for k, v in model_inputs.items()}
    tokens = tuple(tokenizer.convert_ids_to_tokens(input_ids[0].tolist()))
    frames = _position_frames(input_ids[0], config, token_frames) if video_parts else ()
    return PairInputs(
        model_inputs,
        tuple(roles),
        tokens,
        grids,
        merge,
        response_start,
        video_grids=video_grids,
        frames=frames,
    )


def _check_video_family(adapter: ArchitectureAdapter, image_processor: Any) -> None:
    """Refuse videos for a family without a video builder (text-only pairs included)."""
    if not adapter.multimodal:
        raise InputError(f"{adapter.name} takes no videos (a text-only pair)")
    if not hasattr(adapter.image_builder(), "expand_videos"):
        raise InputError(f"videos are not supported for {adapter.name} yet")
    if image_processor is None:
        raise InputError("a video was given but the pair has no image processor")


def _position_frames(input_ids: torch.Tensor, config: Any, token_frames: Sequence[int]) -> tuple[int, ...]:
    """Each position's temporal patch: the video tokens in order take ``token_frames``; others -1."""
    frames = [-1] * int(input_ids.shape[0])
    video_positions = (input_ids == int(config.video_token_id)).nonzero().flatten().tolist()
    if len(video_positions) != len(token_frames):
        raise InputError(
            f"tokenized {len(video_positions)} video tokens but the videos need {len(token_frames)}"
        )
    for position, frame in zip(video_positions, token_frames, strict=True):
        frames[position] = frame
    return tuple(frames)
