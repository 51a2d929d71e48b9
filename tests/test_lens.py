"""Capture and the logit lens, against transformers and an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPT, RESPONSE

from lens import load_pair
from lens.logit_lens import LensConfig, LogitLens, distribution_stats, lens_self_check, pair_lens
from lens.tracing import capture_residuals


@pytest.fixture(params=["vl", "lm"])
def case(request, vl_pair, vl_inputs, lm_pair, lm_inputs):
    return (vl_pair, vl_inputs) if request.param == "vl" else (lm_pair, lm_inputs)


# -- capture -------------------------------------------------------------------------------------


def test_capture_equals_hidden_states(case):
    pair, inputs = case
    for model in pair.models():
        with torch.no_grad():
            out = model(**inputs.model_inputs, output_hidden_states=True)
        hs = out.hidden_states
        captured, logits = capture_residuals(model, pair.adapter, inputs.model_inputs, with_logits=True)
        n = pair.n_layers
        assert len(captured) == n and len(hs) == n + 1
        for i in range(n - 1):  # hs[0] is the embeddings, hs[i + 1] the output of layer i
            assert torch.equal(captured[i], hs[i + 1][0]), i
        # The last hidden_states entry is already final-normed.
        assert not torch.allclose(captured[-1], hs[-1][0])
        with torch.no_grad():
            normed = pair.adapter.final_norm(model)(captured[-1])
        assert torch.equal(normed, hs[-1][0])
        assert torch.equal(logits, out.logits[0])


def test_capture_layer_subset(vl_pair, vl_inputs):
    full, _ = capture_residuals(vl_pair.rlvr, vl_pair.adapter, vl_inputs.model_inputs)
    sub, logits = capture_residuals(vl_pair.rlvr, vl_pair.adapter, vl_inputs.model_inputs, layers=[2, 0])
    assert logits is None and len(sub) == 2
    assert torch.equal(sub[0], full[0]) and torch.equal(sub[1], full[2])


# -- independent float64 reference ----------------------------------------------------------------


def _hooked_residuals(model, adapter, model_inputs) -> list[torch.Tensor]:
    """Layer outputs via plain torch forward hooks (no nnsight)."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o)[0]))
        for layer in adapter.layers(model)
    ]
    try:
        with torch.no_grad():
            model(**model_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _reference_logp(model, adapter, hidden: torch.Tensor) -> torch.Tensor:
    """RMSNorm (recomputed by hand), then lm_head, then log-softmax, all in float64."""
    norm, head = adapter.final_norm(model), adapter.unembed(model)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    h = hidden.double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    logits = normed @ head.weight.double().T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.double()
    return torch.log_softmax(logits, dim=-1)


def test_lens_matches_float64_reference(case):
    pair, inputs = case
    result = pair_lens(pair.base, pair.rlvr, pair.adapter, inputs)
    base_h = _hooked_residuals(pair.base, pair.adapter, inputs.model_inputs)
    rlvr_h = _hooked_residuals(pair.rlvr, pair.adapter, inputs.model_inputs)
    vocab = pair.adapter.vocab_size(pair.config)
    for li in range(pair.n_layers):
        lp_b = _reference_logp(pair.base, pair.adapter, base_h[li])
        lp_r = _reference_logp(pair.rlvr, pair.adapter, rlvr_h[li])
        ent_b = -(lp_b.exp() * lp_b).sum(-1)
        ent_r = -(lp_r.exp() * lp_r).sum(-1)
        kl = (lp_b.exp() * (lp_b - lp_r)).sum(-1)
        torch.testing.assert_close(result.base_entropy[li].double(), ent_b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(result.rlvr_entropy[li].double(), ent_r, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(result.kl_base_rlvr[li].double(), kl, atol=2e-5, rtol=1e-5)
        # Non-trivial distributions: far from uniform, varying across positions, models differ.
        assert ent_b.max() < 0.75 * math.log(vocab)
        assert ent_b.std() > 0.2
        assert kl.mean() > 0.05
    assert result.base_entropy.dtype == torch.float32
    assert result.base_entropy.shape == (pair.n_layers, inputs.n_tokens)
    assert (result.kl_base_rlvr >= 0).all()


def test_self_check_fp32(case):
    pair, inputs = case
    for model in pair.models():
        assert lens_self_check(model, pair.adapter, inputs) < 1e-5


def test_kl_of_identical_models_is_zero(vl_dirs, vl_inputs):
    same = load_pair(vl_dirs[0], vl_dirs[0])
    result = pair_lens(same.base, same.rlvr, same.adapter, vl_inputs)
    assert result.kl_base_rlvr.abs().max() < 1e-6
    assert torch.equal(result.base_entropy, result.rlvr_entropy)
    assert result.base_entropy.min() > 0


def test_bf16_lens_math_is_float32(vl_dirs, vl_pair, image):
    pair = load_pair(*vl_dirs, dtype="bfloat16")
    assert pair.base.dtype == torch.bfloat16 and pair.rlvr.dtype == torch.bfloat16
    inputs = pair.encode(PROMPT, [image], response=RESPONSE)
    captured, _ = capture_residuals(pair.rlvr, pair.adapter, inputs.model_inputs)
    assert captured[0].dtype == torch.bfloat16
    lens = LogitLens(pair.rlvr, pair.adapter)
    assert lens.weight.dtype == torch.float32
    assert lens.logits(captured[0]).dtype == torch.float32
    result = pair_lens(pair.base, pair.rlvr, pair.adapter, inputs)
    for t in (result.base_entropy, result.rlvr_entropy, result.kl_base_rlvr):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # The self-check bound scales with the logits. The model's own logits are bf16 numbers, each
    # within u·|logit| of exact (u = 2^-8, bf16's unit roundoff), and its lm_head reads the final-normed
    # residual rounded to bf16, which moves each logit by about as much again. Measured max error /
    # max|logit|: 0.7u on these tiny models, 0.9u on random 7B-width ones (0.02 at max|logit| 6.3; real
    # 7B logits are larger, hence the 0.1-0.2 seen there). 4u·max|logit| leaves a 4x margin, while a
    # wrong lens is off by a sizeable fraction of the logits (checked below), far above the bound.
    last = pair.n_layers - 1
    hidden, logits = capture_residuals(
        pair.rlvr, pair.adapter, inputs.model_inputs, [last - 1], with_logits=True
    )
    bound = 4 * 2.0**-8 * float(logits.float().abs().max())
    assert lens_self_check(pair.rlvr, pair.adapter, inputs) < bound
    with torch.no_grad():
        wrong_layer = LogitLens(pair.rlvr, pair.adapter).logits(hidden[0])  # one layer too early
        wrong_model = LogitLens(pair.base, pair.adapter).logits(captured[last])  # the other unembedding
    for wrong in (wrong_layer, wrong_model):
        assert float((wrong - logits.float()).abs().max()) > 3 * bound
    # bf16 entropies stay close to the float32 pair's.
    fp32 = pair_lens(vl_pair.base, vl_pair.rlvr, vl_pair.adapter, inputs)
    assert (result.base_entropy - fp32.base_entropy).abs().mean() < 0.05


# -- distribution_stats, rows, streaming ----------------------------------------------------------


def test_distribution_stats_topk():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 50, generator=gen) * 3
    rlvr = torch.randn(6, 50, generator=gen) * 3
    stats = distribution_stats(base, rlvr, topk=4)
    for name, logits in (("base", base), ("rlvr", rlvr)):
        p = torch.softmax(logits.double(), -1)
        values, ids = p.topk(4, dim=-1)
        assert torch.equal(stats[f"{name}_topk_ids"], ids)
        torch.testing.assert_close(stats[f"{name}_topk_probs"].double(), values, atol=1e-6, rtol=1e-5)
        assert (stats[f"{name}_topk_probs"].diff(dim=-1) <= 0).all()
        torch.testing.assert_close(
            stats[f"{name}_entropy"].double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5
        )
    p, q = torch.softmax(base.double(), -1), torch.softmax(rlvr.double(), -1)
    torch.testing.assert_close(
        stats["kl_base_rlvr"].double(), (p * (p / q).log()).sum(-1), atol=1e-5, rtol=1e-5
    )
    assert set(distribution_stats(base, rlvr)) == {"base_entropy", "rlvr_entropy", "kl_base_rlvr"}


def test_pair_lens_topk_matches_full_logits(vl_pair, vl_inputs):
    result = pair_lens(vl_pair.base, vl_pair.rlvr, vl_pair.adapter, vl_inputs, LensConfig(topk=3))
    assert result.topk["base_topk_ids"].shape == (vl_pair.n_layers, vl_inputs.n_tokens, 3)
    captured, _ = capture_residuals(vl_pair.rlvr, vl_pair.adapter, vl_inputs.model_inputs)
    with torch.no_grad():
        probs = torch.softmax(LogitLens(vl_pair.rlvr, vl_pair.adapter).logits(captured[1]), -1)
    values, ids = probs.topk(3, dim=-1)
    assert torch.equal(result.topk["rlvr_topk_ids"][1], ids)
    torch.testing.assert_close(result.topk["rlvr_topk_probs"][1], values, atol=1e-6, rtol=1e-5)


def test_logits_rows_equal_gather(vl_pair, vl_inputs):
    lens = LogitLens(vl_pair.base, vl_pair.adapter)
    captured, _ = capture_residuals(vl_pair.base, vl_pair.adapter, vl_inputs.model_inputs, layers=[1])
    hidden = captured[0]
    rows = torch.randint(
        0, lens.weight.shape[0], (hidden.shape[0], 5), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        full = lens.logits(hidden)
        part = lens.logits(hidden, rows=rows)
    assert part.shape == rows.shape
    torch.testing.assert_close(part, full.gather(-1, rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(part, full.gather(-1, rows.roll(1, dims=-1)))


def test_streaming_chunks_give_identical_results(vl_pair, vl_inputs):
    runs = [
        pair_lens(vl_pair.base, vl_pair.rlvr, vl_pair.adapter, vl_inputs, LensConfig(token_chunk=c))
        for c in (1, 7, 10_000)
    ]
    # Identical up to float32 rounding: BLAS picks a different kernel for 1 row than for many,
    # so the last bits of a logit can differ (measured: <= 3e-6 on entropies of ~2 nats).
    for other in runs[1:]:
        for name in ("base_entropy", "rlvr_entropy", "kl_base_rlvr"):
            torch.testing.assert_close(getattr(other, name), getattr(runs[0], name), atol=1e-5, rtol=1e-5)
    subset = pair_lens(vl_pair.base, vl_pair.rlvr, vl_pair.adapter, vl_inputs, LensConfig(layers=(1, 3)))
    assert subset.layers == (1, 3)
    for name in ("base_entropy", "rlvr_entropy", "kl_base_rlvr"):
        assert torch.equal(getattr(subset, name), getattr(runs[-1], name)[[1, 3]])


def test_lens_config_rejects_bad_values(vl_pair, vl_inputs):
    from lens.errors import ConfigError

    with pytest.raises(ConfigError):
        LensConfig(token_chunk=0)
    with pytest.raises(ConfigError, match="outside"):
        pair_lens(vl_pair.base, vl_pair.rlvr, vl_pair.adapter, vl_inputs, LensConfig(layers=(0, 9)))


def test_lens_of_reuses_the_float32_unembedding_until_it_changes(vl_dirs):
    from lens.logit_lens import lens_of

    pair = load_pair(*vl_dirs, dtype="bfloat16")
    first = lens_of(pair.rlvr, pair.adapter)
    assert first.weight.dtype == torch.float32
    assert lens_of(pair.rlvr, pair.adapter) is first  # no new 2.2 GB copy per sample at 7B
    assert lens_of(pair.base, pair.adapter) is not first
    head = pair.adapter.unembed(pair.rlvr)
    with torch.no_grad():
        head.weight.mul_(2)  # an in-place edit bumps the version counter
    second = lens_of(pair.rlvr, pair.adapter)
    assert second is not first
    assert torch.equal(second.weight, head.weight.float())
