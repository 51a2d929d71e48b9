"""Activation Replay in bf16 (issue 8): the float32 residual carry, the flat-loss warning, decoding.

The tiny bf16 pair below is the float32 tiny pair rounded to bf16; its float32 twin holds the same
(bf16-representable) weights in float32, so the two compute the same function up to arithmetic.
At ``ALPHA`` every update is below half a bf16 ulp of the visual embeddings (checked directly), as
it is at α = 10 on a 7B-wide pair with ~1,200 visual tokens (``benchmarks/bench_replay_bf16.py``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from intervention_fixtures import PROMPT, image, tiny_pair
from reference_replay import reference_replay

import lens.interventions.replay as replay_mod
from lens.errors import ConfigError
from lens.interventions import ActivationReplay, hook_count
from lens.loading import ModelPair

BF16 = torch.bfloat16
ALPHA = 1e-7
SETTINGS = {"alpha": ALPHA, "steps": 4, "layers": (0, 1, 2)}


@pytest.fixture(scope="module")
def pairs() -> tuple[ModelPair, ModelPair]:
    """(bf16 pair, float32 twin with the same bf16-rounded weights)."""
    pair = tiny_pair()
    base16, rlvr16 = pair.base.to(BF16), pair.rlvr.to(BF16)
    base32, rlvr32 = copy.deepcopy(base16).float(), copy.deepcopy(rlvr16).float()
    return (
        ModelPair.from_models(base16, rlvr16, pair.tokenizer, pair.image_processor),
        ModelPair.from_models(base32, rlvr32, pair.tokenizer, pair.image_processor),
    )


@pytest.fixture(scope="module")
def inputs(pairs):
    return pairs[0].encode(PROMPT, [image()])


def visual_embeddings(pair, inputs) -> torch.Tensor:
    """The input of block 0 (in the model dtype) at the visual positions."""
    states = replay_mod.capture_block_residuals(pair.rlvr, pair.adapter, inputs.model_inputs, inputs_of=(0,))
    return states[("in", 0)][inputs.visual_positions]


def strictly_decreasing(values) -> bool:
    return all(b < a for a, b in zip(values, values[1:], strict=False))


def test_old_rule_is_flat_in_bf16_and_the_carry_falls_as_float32_does(pairs, inputs):
    pair16, pair32 = pairs
    # Before the fix: Δ cast to bf16 and added to the bf16 embeddings. The forward never changes.
    old = ActivationReplay(residual="model", **SETTINGS)
    with pytest.warns(
        UserWarning, match=r"did not change over 4 step.*below half an ulp.*residual='float32'"
    ):
        old.prepare(pair16, inputs)
    assert not old.result.loss_changed
    assert len(set(old.result.losses)) == 1 and old.result.final_loss == old.result.losses[0]
    # Why: Δ did move (the gradient is the same at every step, so Δ_t = t·α·g is largest at the
    # end), but even the final Δ rounds away when added to the bf16 embeddings.
    embeds = visual_embeddings(pair16, inputs)
    assert old.offsets.abs().max() > 0
    assert torch.equal(embeds + old.offsets.to(BF16), embeds)
    # ... while float32 holds it: the carried residual float(e) + Δ differs from e.
    assert not torch.equal(embeds.float() + old.offsets, embeds.float())

    # After the fix (the default): the loss falls at every step, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = ActivationReplay(**SETTINGS).prepare(pair16, inputs).result
    losses16 = (*new.losses, new.final_loss)
    assert new.loss_changed and strictly_decreasing(losses16)

    # The float32 twin falls too, and by about as much (the bf16 blocks add rounding noise).
    ref = ActivationReplay(**SETTINGS).prepare(pair32, inputs).result
    losses32 = (*ref.losses, ref.final_loss)
    assert ref.loss_changed and strictly_decreasing(losses32)
    drop16, drop32 = losses16[0] - losses16[-1], losses32[0] - losses32[-1]
    assert 0.5 < drop16 / drop32 < 2.0, (losses16, losses32)
    # In a float32 model the two rules are the same computation, to the bit.
    same = ActivationReplay(residual="model", **SETTINGS).prepare(pair32, inputs).result
    assert same.losses == ref.losses and torch.equal(same.offsets, ref.offsets)


def test_flat_loss_warns_and_is_flagged(pairs, inputs):
    _, pair32 = pairs
    replay = ActivationReplay(alpha=1e-30, steps=3, layers=(0, 1, 2))  # updates below float32's ulp
    with pytest.warns(UserWarning, match=r"replay loss did not change over 3 step\(s\).*alpha=1e-30"):
        replay.prepare(pair32, inputs)
    assert not replay.result.loss_changed
    assert replay.offsets.abs().max() > 0  # Δ did move; it just never reached the forward
    with pytest.raises(ConfigError, match="residual"):
        ActivationReplay(residual="bf16")
    assert ActivationReplay(residual="model").setting().endswith(",released,residual=model]")
    assert "residual" not in ActivationReplay().setting()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the released algorithm, α = 10
        {"variant": "paper"},
        {"layers": (1, 3)},  # the carry runs through block 3, the last one
        {"alpha": ALPHA},  # the regime where the old rule is flat
        {"alpha": ALPHA, "residual": "model"},  # the old rule itself
    ],
)
def test_fast_equals_reference_in_bf16(pairs, inputs, kwargs):
    """Tolerances: the forwards are the same bf16 computation, but the backward sums each token's
    gradient from several layers' terms in bf16, in a different order in the two graphs; Δ then
    differs by about one bf16 rounding of the gradient (observed: losses <= 7e-4 relative, Δ <= 4e-3
    relative in norm)."""
    pair16, _ = pairs
    settings = {"tau": 0.4, "alpha": 10.0, "steps": 5, "layers": (0, 1, 2), **kwargs}
    fast = ActivationReplay(**settings).prepare(pair16, inputs).result
    ref_offsets, ref_losses = reference_replay(pair16, inputs, **settings)
    torch.testing.assert_close(
        torch.tensor(fast.losses, dtype=torch.float64),
        torch.tensor(ref_losses, dtype=torch.float64),
        rtol=2e-3,
        atol=0.0,
    )
    assert float((fast.offsets - ref_offsets).norm() / ref_offsets.norm()) < 1e-2


def block_inputs(pair, blocks: range, run) -> dict[int, torch.Tensor]:
    """The input of each of ``blocks`` at the visual positions during ``run()`` (first forward only)."""
    seen: dict[int, torch.Tensor] = {}
    layers = pair.adapter.layers(pair.rlvr)

    def reader(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, hidden[0].detach().clone())

        return hook

    handles = [layers[i].register_forward_pre_hook(reader(i), with_kwargs=True) for i in blocks]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_decoding_prefill_runs_the_forward_that_was_optimised(pairs, inputs):
    pair16, _ = pairs
    replay = ActivationReplay(alpha=1e-3, steps=3, layers=(0, 1, 2)).prepare(pair16, inputs)
    delta, vis = replay.offsets, inputs.visual_positions
    # The optimisation's forward at the final Δ (no grad), and the prefill of generate().
    objective = replay_mod._FastObjective(pair16, inputs, replay.config, replay.targets)
    with torch.no_grad():
        optimised = block_inputs(pair16, range(1, 3), lambda: objective(delta))
    with replay.applied(pair16) as model, torch.no_grad():  # readers after the replay hooks: they see Δ
        run = lambda: model.generate(**inputs.model_inputs, max_new_tokens=3, do_sample=False)  # noqa: E731
        decoded = block_inputs(pair16, range(0, 4), run)
    for layer in (1, 2):  # every block input the loss depends on is the same, to the bit
        assert torch.equal(decoded[layer][vis], optimised[layer][vis])
    # Block 0 reads bf16(float(e) + Δ), not e + bf16(Δ); this Δ is large enough for the two to differ.
    embeds = visual_embeddings(pair16, inputs)
    assert torch.equal(decoded[0][vis], (embeds.float() + delta).to(BF16))
    assert not torch.equal(decoded[0][vis], embeds + delta.to(BF16))
    assert hook_count(pair16.rlvr) == 0


def test_zero_offsets_carry_is_the_plain_bf16_forward(pairs, inputs):
    """With Δ = 0 the carry rounds back to exactly the model's own bf16 residual at every block."""
    pair16, _ = pairs
    model, vis = pair16.rlvr, inputs.visual_positions
    hidden = pair16.adapter.hidden_size(pair16.config)
    stream = replay_mod.VisualResidual(vis, torch.zeros(vis.numel(), hidden), inputs.n_tokens, last=3)
    with torch.no_grad():
        plain = model(**inputs.model_inputs, use_cache=False).logits
        handles = stream.install(pair16.adapter.layers(model))
        try:
            carried = model(**inputs.model_inputs, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
    assert stream.current is not None and stream.current.dtype == torch.float32  # it did carry
    assert torch.equal(carried, plain)


def test_per_row_positions_match_the_shared_positions(pairs, inputs):
    """The ``(rows, cols)`` form (for batched decoding) does what the shared-positions form does."""
    pair16, _ = pairs
    model, vis = pair16.rlvr, inputs.visual_positions
    hidden = pair16.adapter.hidden_size(pair16.config)
    offsets = torch.randn(vis.numel(), hidden, generator=torch.Generator().manual_seed(0)) * 1e-3
    mi = inputs.model_inputs
    batch = {
        "input_ids": mi["input_ids"].repeat(2, 1),
        "attention_mask": mi["attention_mask"].repeat(2, 1),
        "pixel_values": mi["pixel_values"].repeat(2, 1),
        "image_grid_thw": mi["image_grid_thw"].repeat(2, 1),
    }
    rows = torch.arange(2).repeat_interleave(vis.numel())
    streams = {
        "shared": replay_mod.VisualResidual(vis, offsets, inputs.n_tokens, last=2),
        "per_row": replay_mod.VisualResidual(
            (rows, vis.repeat(2)), offsets.repeat(2, 1), inputs.n_tokens, last=2
        ),
    }
    logits = {}
    for name, stream in streams.items():
        handles = stream.install(pair16.adapter.layers(model))
        try:
            with torch.no_grad():
                logits[name] = model(**batch, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
    assert torch.equal(logits["shared"], logits["per_row"])
    assert torch.equal(streams["shared"].current.flatten(0, 1), streams["per_row"].current)
    with torch.no_grad():
        plain = model(**batch, use_cache=False).logits
    assert not torch.equal(logits["shared"], plain)  # the offsets did reach the forward
