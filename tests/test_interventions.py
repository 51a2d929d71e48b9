"""HardInjection invariants, the decode-untouched guarantee and hook/weight hygiene."""

from __future__ import annotations

import pytest
import torch
from intervention_fixtures import PROMPT, image, same_weights, tiny_pair, weights

from lens.errors import ConfigError, InputError
from lens.interventions import Baseline, HardInjection, hook_count
from lens.interventions.base import capture_block_residuals


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def inputs(pair):
    return pair.encode(PROMPT, [image()])


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs.model_inputs, use_cache=False).logits[0]


@pytest.mark.parametrize("depth", ["released", "same"])
def test_positions_before_first_edit_keep_logits_and_edited_state_equals_base(pair, inputs, depth):
    inj = HardInjection(layers=(1, 2), tau=0.5, depth=depth).prepare(pair, inputs)
    assert inj.plan.positions, "the test needs a non-empty selection"
    first = min(int(p.min()) for p in inj.plan.positions.values())
    plain = _logits(pair.rlvr, inputs)
    side = "in" if depth == "released" else "out"
    with inj.applied(pair) as model:
        edited = _logits(model, inputs)
        states = capture_block_residuals(
            model, pair.adapter, inputs.model_inputs, **{f"{side}puts_of": (1, 2)}
        )
    base_states = capture_block_residuals(
        pair.base, pair.adapter, inputs.model_inputs, **{f"{side}puts_of": (1, 2)}
    )
    assert torch.equal(edited[:first], plain[:first])
    assert not torch.allclose(edited[first:], plain[first:])
    for layer, pos in inj.plan.positions.items():
        assert torch.equal(states[(side, layer)][pos], base_states[(side, layer)][pos])
    # Unselected positions at the first edited layer still carry the RLVR's own state.
    rlvr_states = capture_block_residuals(
        pair.rlvr, pair.adapter, inputs.model_inputs, **{f"{side}puts_of": (1,)}
    )
    keep = torch.ones(inputs.n_tokens, dtype=torch.bool)
    keep[inj.plan.positions.get(1, torch.tensor([], dtype=torch.long))] = False
    assert torch.equal(states[(side, 1)][keep], rlvr_states[(side, 1)][keep])


def test_decode_steps_are_untouched(pair, inputs):
    inj = HardInjection(layers=(0, 1), tau=0.6).prepare(pair, inputs)
    layer = pair.adapter.layers(pair.rlvr)[0]
    seen: list[tuple[int, bool]] = []
    before: list[torch.Tensor] = []
    with inj.applied(pair) as model:
        # One hook before the injection's, one after: equal inputs mean the forward was not edited.
        h1 = layer.register_forward_pre_hook(
            lambda m, a, k: before.append(a[0].clone()), prepend=True, with_kwargs=True
        )
        h2 = layer.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0].shape[1], torch.equal(a[0], before[-1]))), with_kwargs=True
        )
        try:
            with torch.no_grad():
                model.generate(**inputs.model_inputs, max_new_tokens=4, do_sample=False)
        finally:
            h1.remove()
            h2.remove()
    assert seen[0] == (inputs.n_tokens, False)  # the prefill was edited
    assert len(seen) == 4 and all(n == 1 and same for n, same in seen[1:])  # decode steps were not


def test_empty_selection_generates_like_plain_generate(pair, inputs):
    with pytest.warns(UserWarning, match="no position selected"):
        inj = HardInjection(layers=(0, 1), tau=1e-9).prepare(pair, inputs)
    plain = Baseline().prepare(pair, inputs).generate(pair, inputs, max_new_tokens=6)
    assert inj.generate(pair, inputs, max_new_tokens=6) == plain
    sampled = inj.generate(pair, inputs, n=3, do_sample=True, seed=3, max_new_tokens=6)
    assert sampled == Baseline().prepare(pair, inputs).generate(
        pair, inputs, n=3, do_sample=True, seed=3, max_new_tokens=6
    )


def test_rules_select_and_high_is_complement(pair, inputs):
    low = HardInjection(layers=(0, 1, 2), rule="quantile", quantile=0.5).prepare(pair, inputs).plan
    high = (
        HardInjection(layers=(0, 1, 2), rule="quantile", quantile=0.5, select="high")
        .prepare(pair, inputs)
        .plan
    )
    n_vis = inputs.visual_positions.numel()
    for layer in (0, 1, 2):
        assert low.n_selected[layer] + high.n_selected[layer] == n_vis
    fixed = HardInjection(layers=(0, 1), rule="fixed", thresholds=(50.0, 50.0), scope="all").prepare(
        pair, inputs
    )
    assert fixed.config.base_below_rlvr  # released rule: base entropy < RLVR entropy as well
    assert 0 < sum(fixed.plan.n_selected.values()) <= 2 * inputs.n_tokens


def test_weights_unchanged_and_no_hooks_after_success_and_exception(pair, inputs):
    saved = weights(pair.rlvr)
    inj = HardInjection(layers=(0, 1), tau=0.6).prepare(pair, inputs)
    inj.generate(pair, inputs, max_new_tokens=3)
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = pair.adapter.layers(pair.rlvr)[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            inj.generate(pair, inputs, max_new_tokens=3)
    finally:
        handle.remove()
    with pytest.raises(KeyError), inj.applied(pair):
        raise KeyError("inside")
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)


def test_bad_input(pair, inputs):
    text_only = pair.encode(PROMPT)
    with pytest.raises(InputError, match="no"):
        HardInjection(layers=(0,)).prepare(pair, text_only)
    HardInjection(layers=(0,), scope="all").prepare(pair, text_only)  # fine on all tokens
    with pytest.raises(ConfigError, match="outside"):
        HardInjection(layers=(0, 9)).prepare(pair, inputs)
    for kwargs in (
        {"tau": 0.0},
        {"tau": 1.5},
        {"select": "mid"},
        {"rule": "x"},
        {"scope": "text"},
        {"depth": "x"},
    ):
        with pytest.raises(ConfigError):
            HardInjection(layers=(0,), **kwargs)
    with pytest.raises(ConfigError, match="thresholds"):
        HardInjection(layers=(0, 1), rule="fixed")  # 7 released thresholds for 2 layers
    inj = HardInjection(layers=(0,))
    with pytest.raises(ConfigError, match="prepare"):
        inj.generate(pair, inputs)
    inj.prepare(pair, inputs)
    with pytest.raises(ConfigError, match="do_sample"):
        inj.generate(pair, inputs, n=2)
