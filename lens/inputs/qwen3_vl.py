"""Images of Qwen3-VL (dense and MoE): one ``<|image_pad|>`` per merged patch, as in Qwen2.5-VL.

``Qwen3VLProcessor.replace_image_token`` (transformers 5.23) repeats the image token
``prod(image_grid_thw) / merge_size²`` times in place of the template's single placeholder, with no
per-image text of its own (only videos get per-frame ``<t seconds>`` stamps), and returns
``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (image 1, video 2; built by the
adapter from the ids). The image processor is the Qwen2-VL one with 16-px patches. So the expansion
is exactly the Qwen2-VL/Qwen2.5-VL one; it is re-exported here so that Qwen3-VL video support,
whose placeholders do differ, has a module of its own to go to.
"""

from __future__ import annotations

from lens.inputs.qwen_vl import expand_images

__all__ = ["expand_images"]
