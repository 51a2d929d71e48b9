"""Activation Replay: fast == reference at every step, loss decreases, bad input, hygiene."""

from __future__ import annotations

import warnings

import pytest
import torch
from intervention_fixtures import PROMPT, image, same_weights, tiny_pair, weights
from reference_replay import reference_replay

import lens.interventions.replay as replay_mod
from lens.errors import ConfigError, InputError
from lens.interventions import ActivationReplay, Baseline, hook_count


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def inputs(pair):
    return pair.encode(PROMPT, [image()])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the released algorithm
        {"variant": "paper"},
        {"select": "high", "tau": 0.6},
        {"normalize": False, "alpha": 0.5, "topk": 7},
        {"layers": (1, 3)},  # the last layer included, gaps allowed
        {"rule": "quantile", "quantile": 0.3},  # the rank-based mask
        {"rule": "quantile", "quantile": 0.5, "select": "high", "variant": "paper"},
    ],
)
def test_fast_equals_reference_at_every_step(pair, inputs, kwargs):
    settings = {"tau": 0.4, "alpha": 10.0, "steps": 6, "layers": (0, 1, 2), **kwargs}
    fast = ActivationReplay(**settings).prepare(pair, inputs).result
    ref_offsets, ref_losses = reference_replay(pair, inputs, **settings)
    assert len(fast.losses) == len(ref_losses) == 6
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(ref_losses), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(fast.offsets, ref_offsets, rtol=1e-4, atol=1e-5)


def test_loss_decreases_and_offsets_move(pair, inputs):
    result = ActivationReplay(layers=(0, 1, 2), steps=10).prepare(pair, inputs).result
    assert result.losses[0] > 0
    assert result.final_loss < result.losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(result.losses[1:], result.losses[2:], strict=False))
    assert result.offsets.dtype == torch.float32 and result.offsets.abs().sum() > 0
    assert set(result.n_selected) <= {0, 1, 2}


def test_quantile_mask_is_non_empty_at_every_layer_and_loss_decreases(pair, inputs):
    replay = ActivationReplay(rule="quantile", quantile=0.3, layers=(0, 1, 2), steps=10).prepare(pair, inputs)
    result, n_visual = replay.result, inputs.visual_positions.numel()
    assert set(result.n_selected) == {0, 1, 2}
    # About a fraction q per layer, whatever the spread of the entropies.
    assert all(1 <= n <= round(0.3 * n_visual) + 1 for n in result.n_selected.values())
    assert result.losses[0] > 0 and result.final_loss < result.losses[0]
    assert replay.setting().startswith("replay[q=0.3,alpha=10,")
    high = ActivationReplay(rule="quantile", quantile=0.3, select="high", layers=(0, 1, 2), steps=1)
    high.prepare(pair, inputs)
    assert all(high.result.n_selected[i] + n == n_visual for i, n in result.n_selected.items())


def test_empty_mask_keeps_offsets_zero_and_decoding_unchanged(pair, inputs):
    replay = ActivationReplay(tau=1e-9, layers=(0, 1), steps=3)
    with pytest.warns(UserWarning, match="empty at every layer.*--mask quantile"):
        replay.prepare(pair, inputs)
    assert torch.count_nonzero(replay.offsets) == 0
    assert replay.result.losses == (0.0, 0.0, 0.0) and replay.result.final_loss == 0.0
    plain = Baseline().prepare(pair, inputs).generate(pair, inputs, max_new_tokens=5)
    assert replay.generate(pair, inputs, max_new_tokens=5) == plain


def test_offsets_change_prefill_only_and_save(pair, inputs, tmp_path):
    replay = ActivationReplay(layers=(0, 1, 2), steps=3, alpha=200.0).prepare(pair, inputs)
    layer = pair.adapter.layers(pair.rlvr)[0]
    seen = []
    with replay.applied(pair) as model:
        handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                model.generate(**inputs.model_inputs, max_new_tokens=3, do_sample=False)
        finally:
            handle.remove()
    embeds = replay_mod.capture_block_residuals(pair.rlvr, pair.adapter, inputs.model_inputs, inputs_of=(0,))
    vis = inputs.visual_positions
    torch.testing.assert_close(seen[0][0, vis], embeds[("in", 0)][vis] + replay.offsets)
    assert [s.shape[1] for s in seen] == [inputs.n_tokens, 1, 1]
    from safetensors.torch import load_file

    path = replay.save_offsets(tmp_path / "offsets.safetensors")
    loaded = load_file(str(path))
    assert torch.equal(loaded["offsets"], replay.offsets)
    assert loaded["losses"].shape == (3,)


def test_weights_unchanged_no_hooks_flags_restored_after_exception(pair, inputs, monkeypatch):
    saved = weights(pair.rlvr)
    pair.rlvr.lm_head.weight.requires_grad_(True)  # a caller's unfrozen weight must stay as it was
    try:
        ActivationReplay(layers=(0, 1), steps=2).prepare(pair, inputs)
        calls = {"n": 0}
        original = replay_mod.kl_topk

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("mid-optimisation")
            return original(*args)

        monkeypatch.setattr(replay_mod, "kl_topk", flaky)
        with pytest.raises(RuntimeError, match="mid-optimisation"):
            ActivationReplay(layers=(0, 1), steps=4).prepare(pair, inputs)
        assert pair.rlvr.lm_head.weight.requires_grad
        assert not pair.rlvr.model.language_model.layers[0].mlp.up_proj.weight.requires_grad
    finally:
        pair.rlvr.lm_head.weight.requires_grad_(False)
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)
    assert pair.rlvr.lm_head.weight.grad is None


def test_bad_input(pair, inputs):
    for kwargs, match in (
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.01}, "tau"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"steps": 0}, "steps"),
        ({"topk": 0}, "topk"),
        ({"variant": "mid"}, "variant"),
        ({"select": "mid"}, "select"),
        ({"layers": ()}, "layers"),
        ({"rule": "fixed"}, "rule"),
        ({"rule": "quantile", "quantile": 1.0}, "quantile"),
    ):
        with pytest.raises(ConfigError, match=match):
            ActivationReplay(**kwargs)
    with pytest.raises(ConfigError, match="outside"):
        ActivationReplay(layers=range(16)).prepare(pair, inputs)  # the released default on a 4-layer model
    with pytest.raises(ConfigError, match="vocabulary"):
        ActivationReplay(layers=(0,), topk=10**6).prepare(pair, inputs)
    with pytest.raises(InputError, match="visual"):
        ActivationReplay(layers=(0,)).prepare(pair, pair.encode(PROMPT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tau = 1 selects every visual token: no warning, no NaN
        result = ActivationReplay(tau=1.0, layers=(0,), steps=2).prepare(pair, inputs).result
    assert result.n_selected == {0: inputs.visual_positions.numel()}
    assert all(v == v for v in result.losses)
