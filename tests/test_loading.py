"""Loading a pair (dtype, device_map) and the lens against TransformerLens 4.x's own logit lens."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROMPT, RESPONSE

from lens import load_pair
from lens.adapters import CAUSAL_LM, QWEN2_5_VL
from lens.logit_lens import LogitLens, pair_lens
from lens.tracing import capture_residuals


def test_load_pair_vl(vl_pair, vl_dirs):
    assert vl_pair.adapter is QWEN2_5_VL
    assert vl_pair.n_layers == 4
    assert vl_pair.image_processor is not None
    assert vl_pair.names == (vl_dirs[0].name, vl_dirs[1].name)
    for model in vl_pair.models():
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert next(model.parameters()).dtype == torch.float32
    # The two checkpoints really are different models.
    assert not torch.equal(vl_pair.base.lm_head.weight, vl_pair.rlvr.lm_head.weight)


def test_load_pair_text_only(lm_pair):
    assert lm_pair.adapter is CAUSAL_LM
    assert lm_pair.image_processor is None
    assert lm_pair.n_layers == 3


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_load_pair_device_map_cpu(vl_dirs, vl_pair, vl_inputs, device_map):
    pair = load_pair(*vl_dirs, device_map=device_map)
    assert pair.device == torch.device("cpu")
    result = pair_lens(pair.base, pair.rlvr, pair.adapter, vl_inputs)
    ref = pair_lens(vl_pair.base, vl_pair.rlvr, vl_pair.adapter, vl_inputs)
    assert torch.equal(result.kl_base_rlvr, ref.kl_base_rlvr)


def test_load_pair_dtype_string_and_device(lm_dirs, lm_inputs):
    pair = load_pair(*lm_dirs, dtype="bfloat16", device="cpu")
    assert pair.base.dtype == torch.bfloat16 and pair.rlvr.dtype == torch.bfloat16
    result = pair_lens(pair.base, pair.rlvr, pair.adapter, lm_inputs)
    assert result.kl_base_rlvr.dtype == torch.float32 and torch.isfinite(result.kl_base_rlvr).all()


# -- TransformerLens ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tl_bridge(lm_dirs):
    """TransformerLens 4.x's bridge around (a deep copy of) the text-only base model."""
    pytest.importorskip("transformer_lens")
    import transformer_lens.model_bridge.sources.transformers.helpers as helpers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On a processor load failure TL would otherwise run `pip install torchvision`.
    helpers._ensure_torchvision = lambda: False
    hf = AutoModelForCausalLM.from_pretrained(lm_dirs[0], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_dirs[0])  # TL needs a tokenizer loaded from a folder
    bridge = TransformerBridge.boot_transformers(
        "local/tiny-qwen2", hf_model=copy.deepcopy(hf), tokenizer=tokenizer, device="cpu"
    )
    return bridge


def test_lens_matches_transformer_lens(tl_bridge, lm_pair):
    inputs = lm_pair.encode(PROMPT, response=RESPONSE)
    ids = inputs.input_ids
    with torch.no_grad():
        _, cache = tl_bridge.run_with_cache(ids)
        resid = cache.accumulated_resid()  # [embeddings, after layer 0, ..., after layer L-1]
        tl_lens = tl_bridge.unembed(cache.apply_ln_to_stack(resid, recompute_ln=True))
    n = lm_pair.n_layers
    assert tl_lens.shape[0] == n + 1
    captured, logits = capture_residuals(lm_pair.base, lm_pair.adapter, inputs.model_inputs, with_logits=True)
    lens = LogitLens(lm_pair.base, lm_pair.adapter)
    with torch.no_grad():
        for i in range(n):
            ours = lens.logits(captured[i])
            torch.testing.assert_close(ours, tl_lens[i + 1, 0], atol=1e-5, rtol=1e-5)
            # The readouts are informative: layers differ from one another.
            if i:
                assert (ours - tl_lens[i, 0]).abs().max() > 1e-2
    # TL's last-layer lens is the model's own logits.
    torch.testing.assert_close(tl_lens[n, 0], logits, atol=1e-5, rtol=1e-5)
