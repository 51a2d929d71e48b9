"""A straightforward re-statement of the released Activation Replay loop, for tests and benchmarks only.

Every iteration runs the full RLVR forward (vision tower, all layers, full-sequence logits) with
``output_hidden_states``, the full-vocabulary lens on both sides, and recomputes the base top-k, as
``vlmevalkit/vlmeval/vlm/replay_qwen2_vl.py`` does. Differences from the release, all shared with
the fast implementation: float32 lens/KL/Δ (no bf16 quirks B2/B7), the raw output of the last block
(no B3), frozen weights.

Precision rule (``residual="float32"``, the default): in a model narrower than float32 (bf16, fp16) the
residual stream at the visual positions is carried in float32 from the input of block 0 through the
deepest replay layer: r_0 = e + Δ, r_{l+1} = r_l + (out_l − in_l) with in_l = bf16(r_l) the value
written into the stream before block l and out_l what block l returned; the block's output at those
positions is replaced by bf16(r_{l+1}), and the lens reads r. Whatever the model adds between two
blocks (Qwen3-VL's DeepStack features, after the first few) thus counts as part of the next block's
contribution and stays in r. In float32 models, or with ``residual="model"``, Δ is cast to the model dtype
and added to the input of block 0, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lens.logit_lens import LogitLens


def reference_replay(
    pair,
    inputs,
    tau=0.4,
    alpha=10.0,
    steps=25,
    layers=range(16),
    topk=50,
    variant="released",
    select="low",
    normalize=True,
    rule="tau_max",
    quantile=0.3,
    residual="float32",
):
    """Returns ``(offsets, losses)`` with ``losses[t]`` the loss at Δ_t before update t.

    ``rule="quantile"``: per layer, visual tokens with entropy ≤ the layer's ``quantile``-quantile
    over the visual tokens (linear interpolation, as ``torch.quantile``), instead of ≤ τ · max.
    """
    layers = list(layers)
    base, rlvr, adapter = pair.base, pair.rlvr, pair.adapter
    vmask = torch.zeros(inputs.n_tokens, dtype=torch.bool)
    vmask[inputs.visual_positions] = True
    vmask = vmask.to(pair.device)
    n_vis = int(vmask.sum())
    layer_index = {block: i for i, block in enumerate(adapter.layers(rlvr))}
    n_layers = adapter.n_layers(rlvr)
    dtype = next(rlvr.parameters()).dtype
    carry = residual == "float32" and torch.finfo(dtype).bits < 32

    def raw_outputs(model, extra_hooks=()):
        """Full forward; raw block outputs (hidden_states[L + 1] without the final norm on the last)."""
        outs = {}
        handles = [
            adapter.layers(model)[i].register_forward_hook(
                lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)
            )
            for i in range(n_layers)
        ]
        handles += list(extra_hooks)
        try:
            result = model(**inputs.model_inputs, output_hidden_states=True, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return result, outs

    # Base pass, once: states after block L and their full-vocab entropy at all positions.
    base_lens, rlvr_lens = LogitLens(base, adapter), LogitLens(rlvr, adapter)
    with torch.no_grad():
        _, base_out = raw_outputs(base)
        base_state = {L: base_out[L][0] for L in layers}
        base_entropy = {}
        for L in layers:
            logp = torch.log_softmax(base_lens.logits(base_state[L]), -1)
            base_entropy[L] = -(logp.exp() * logp).sum(-1)

    delta = torch.zeros(n_vis, adapter.hidden_size(pair.config), dtype=torch.float32, device=pair.device)
    losses = []
    for _ in range(steps):
        delta.requires_grad_(True)
        captured = {}
        stream = {}  # depth d -> float32 residual at the visual positions (input of block d), when carried

        def add_delta(module, args, kwargs, delta=delta, captured=captured, stream=stream):
            h = args[0] if args else kwargs["hidden_states"]
            h = h.clone()
            if carry:
                stream[0] = h[:, vmask].float() + delta
                h[:, vmask] = stream[0].to(h.dtype)
            else:
                h[:, vmask] = h[:, vmask] + delta.to(h.dtype)
            captured[0] = h
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        def carry_output(module, args, output, stream=stream):
            out = output[0] if isinstance(output, tuple) else output
            depth = layer_index[module]
            # The block's contribution measured from what was written before it, bf16(r_depth):
            # not from the block's own input, which may hold an addition made between blocks.
            written = stream[depth].to(out.dtype).float()
            stream[depth + 1] = stream[depth] + (out[:, vmask].float() - written)
            out = out.clone()
            out[:, vmask] = stream[depth + 1].to(out.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        hooks = [adapter.layers(rlvr)[0].register_forward_pre_hook(add_delta, with_kwargs=True)]
        if carry:
            for i in range(max(layers) + 1):
                hooks.append(adapter.layers(rlvr)[i].register_forward_hook(carry_output))
        with torch.enable_grad():
            result, rlvr_out = raw_outputs(rlvr, hooks)
            hs = result.hidden_states
            loss = torch.zeros((), dtype=torch.float32, device=pair.device)
            for L in layers:
                ent = base_entropy[L].masked_fill(~vmask, float("inf"))
                if rule == "tau_max":
                    thr = tau * ent[vmask].max()
                else:
                    thr = torch.quantile(ent[vmask].double(), quantile).to(ent.dtype)
                low = (ent <= thr) & vmask
                mask = low if select == "low" else (~low & vmask)
                if not mask.any():
                    continue
                if carry:  # the lens reads the float32 residual, at the visual positions only
                    r_vis = stream[L if variant == "released" else L + 1][0][mask[vmask]]
                elif variant == "released":
                    r_vis = (captured[0][0] if L == 0 else hs[L][0])[mask]
                else:
                    r_vis = rlvr_out[L][0][mask]
                b_logits = base_lens.logits(base_state[L][mask])
                r_logits = rlvr_lens.logits(r_vis)
                idx = b_logits.topk(topk, dim=-1).indices
                p = torch.softmax(b_logits.gather(-1, idx), -1)
                log_q = torch.log_softmax(r_logits.gather(-1, idx), -1)
                loss = loss + F.kl_div(log_q, p, reduction="batchmean")
            if normalize:
                loss = loss / n_vis
            losses.append(float(loss.detach()))
            if losses[-1] == 0.0:
                delta = delta.detach()
                continue
            (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta - alpha * grad).detach()
    return delta, losses
