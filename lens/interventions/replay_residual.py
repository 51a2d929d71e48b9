"""The float32 residual carry: Δ added at block 0's input, the stream at its positions kept in float32.

:mod:`lens.interventions.replay` explains why a bf16/fp16 model needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lens.errors import InputError
from lens.interventions.base import edit_input, edit_output


def narrower_than_float32(dtype: torch.dtype) -> bool:
    """Whether a floating dtype has less precision than float32 (bf16, fp16)."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


class VisualResidual:
    """Offsets Δ added at the input of block 0, and the residual stream at their positions through block ``last``.

    :meth:`install` registers a pre-hook on block 0 and a forward hook on each block 0..``last``.
    They act on forwards of ``n_tokens`` positions (the prefill) and let one-token decode steps
    through (those see Δ only through the KV cache, as released). With ``float32_carry`` and a
    bf16/fp16 model, the residual at the indexed positions is carried in float32 (see
    :mod:`lens.interventions.replay`): ``r_0 = float(e) + Δ``,
    ``r_{l+1} = r_l + (float(out_l) − float(bf16(r_l)))``, each block reading ``bf16(r_l)``.
    Otherwise Δ is cast to the model dtype and added, and block outputs are left alone.
    :attr:`current` is the residual at the indexed positions where the forward has got to (the
    input of block 0 with Δ, then each block's output), for hooks registered after these.

    The replay objective and the decoding prefill both use this, so they run the same forward.

    Args:
        positions: Sequence positions of the offsets, the same in every batch row; or a
            ``(rows, cols)`` pair of index tensors (per-row positions, for batched decoding).
        offsets: ``[n, hidden]`` float32 Δ, one row per indexed position.
        n_tokens: Sequence length of the forward the offsets belong to (the prefill).
        last: The last block the carry runs through (the deepest replay layer).
        float32_carry: Carry the residual in float32 when the model dtype is narrower.
    """

    def __init__(
        self,
        positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        offsets: torch.Tensor,
        n_tokens: int,
        last: int,
        float32_carry: bool = True,
    ) -> None:
        self.key = (slice(None), positions) if isinstance(positions, torch.Tensor) else tuple(positions)
        self.offsets, self.n_tokens, self.last = offsets, int(n_tokens), int(last)
        self.float32_carry = float32_carry
        self.current: torch.Tensor | None = None
        self._carrying = False

    def install(self, blocks: Sequence[nn.Module]) -> list[RemovableHandle]:
        """Register the hooks on the decoder ``blocks``; return their handles (the caller removes them)."""
        handles: list[RemovableHandle] = []
        try:
            handles.append(edit_input(blocks[0], self._enter))
            handles.extend(edit_output(blocks[i], self._leave) for i in range(self.last + 1))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _enter(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if hidden.shape[1] == 1:
            self.current = None  # decode step: sees Δ only through the KV cache, as released
            return None
        if hidden.shape[1] != self.n_tokens:
            raise InputError(f"prefill of {hidden.shape[1]} tokens, but Δ was learned for {self.n_tokens}")
        self._carrying = self.float32_carry and narrower_than_float32(hidden.dtype)
        edited = hidden.clone()
        if self._carrying:
            self.current = hidden[self.key].float() + self.offsets
            edited[self.key] = self.current.to(hidden.dtype)
        else:
            edited[self.key] = hidden[self.key] + self.offsets.to(hidden.dtype)
            self.current = edited[self.key]
        return edited

    def _leave(self, output: torch.Tensor) -> torch.Tensor | None:
        if self.current is None:
            return None
        if not self._carrying:
            self.current = output[self.key]
            return None
        # The block read bf16(r) at these positions; keep its contribution, not its rounded sum.
        read = self.current.to(output.dtype)
        self.current = self.current + (output[self.key].float() - read.float())
        edited = output.clone()
        edited[self.key] = self.current.to(output.dtype)
        return edited
