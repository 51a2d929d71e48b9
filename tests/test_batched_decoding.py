"""Batched greedy decoding equals item-by-item decoding, each row with its own edit; hook hygiene."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from intervention_fixtures import PROMPT, image, same_weights, tiny_pair, weights

import lens
from analyses.intervention import InterventionRunConfig, make_intervention, run_settings
from lens import organism
from lens.batching import collate
from lens.datasets import Sample
from lens.decoding import decoding_for
from lens.errors import ConfigError, InputError
from lens.interventions import ActivationReplay, Baseline, HardInjection, hook_count
from lens.interventions.base import PrefillEdit


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def samples(pair):
    """Three prompts of different lengths with images of different sizes: every row is padded differently."""
    return [
        pair.encode(PROMPT, [image(0, 112)]),
        pair.encode("Short?", [image(1, 56)]),
        pair.encode(PROMPT + " Count them twice, please.", [image(2, 84)]),
    ]


def strategies():
    return {
        "baseline": Baseline(),
        "hard": HardInjection(layers=(0, 1, 2), rule="quantile", quantile=0.5),
        "replay": ActivationReplay(layers=(0, 1), steps=3, topk=5, rule="quantile", quantile=0.3),
    }


@pytest.mark.parametrize("name", ["baseline", "hard", "replay"])
def test_batched_equals_item_by_item(pair, samples, name):
    intervention = strategies()[name]
    states = [intervention.prepare(pair, x).state for x in samples]
    if name != "baseline":
        assert all(state.edits for state in states), "the test needs an edit in every row"
    assert len(set(collate([s.inputs for s in states], 0).pads)) == 3
    decoding = decoding_for(pair, max_new_tokens=6)
    batched = intervention.generate_batch(pair, states, decoding, first_logits=True)
    alone = [intervention.generate_batch(pair, [s], decoding, first_logits=True)[0] for s in states]
    for together, single in zip(batched, alone, strict=True):
        assert torch.allclose(together.first_logits, single.first_logits, atol=1e-4, rtol=0)
        assert together == single
    # A batch of one is the old single-sample path: the edit applied to the unpadded prefill.
    for x, single in zip(samples, alone, strict=True):
        with intervention.prepare(pair, x).applied(pair) as model, torch.no_grad():
            logits = model(**x.model_inputs).logits[0, -1]
        assert torch.allclose(logits.float(), single.first_logits[0], atol=1e-5, rtol=0)


def test_each_row_gets_its_own_edit(pair, samples):
    replay = strategies()["replay"]
    states = [replay.prepare(pair, x).state for x in samples]
    one_step = decoding_for(pair, max_new_tokens=1)
    baseline = Baseline()
    plain = baseline.generate_batch(
        pair, [baseline.prepare(pair, x).state for x in samples], one_step, first_logits=True
    )
    edited = replay.generate_batch(pair, states, one_step, first_logits=True)
    for before, after in zip(plain, edited, strict=True):
        assert (before.first_logits - after.first_logits).abs().max() > 1e-3  # the edit matters
    # Give row 0 other offsets (row 1's, reversed and fitted to row 0's visual tokens): row 0 changes,
    # the other rows do not, so each row reads its own Δ and nothing else.
    (edit,) = states[1].edits
    visual = states[0].inputs.visual_positions
    values = edit.values.flip(0).repeat(visual.numel() // edit.values.shape[0] + 1, 1)[: visual.numel()]
    other = replace(states[0], edits=(PrefillEdit(0, "input", visual, values, "add"),))
    mixed = replay.generate_batch(pair, [other, *states[1:]], one_step, first_logits=True)
    assert (mixed[0].first_logits - edited[0].first_logits).abs().max() > 1e-3
    for row in (1, 2):
        assert torch.allclose(mixed[row].first_logits, edited[row].first_logits, atol=1e-5, rtol=0)


def test_text_only_pair_batches_too(lm_pair):
    xs = [lm_pair.encode(PROMPT), lm_pair.encode("Short?"), lm_pair.encode(PROMPT + " Twice.")]
    decoding = decoding_for(lm_pair, max_new_tokens=5)
    for intervention in (
        Baseline(),
        HardInjection(layers=(0, 1), rule="quantile", quantile=0.5, scope="all"),
    ):
        states = [intervention.prepare(lm_pair, x).state for x in xs]
        batched = intervention.generate_batch(lm_pair, states, decoding, first_logits=True)
        alone = [intervention.generate_batch(lm_pair, [s], decoding, first_logits=True)[0] for s in states]
        for together, single in zip(batched, alone, strict=True):
            assert torch.allclose(together.first_logits, single.first_logits, atol=1e-4, rtol=0)
            assert together == single


def test_sampling_n_per_item_is_one_call_with_each_rows_edit(pair, samples):
    replay = strategies()["replay"]
    states = [replay.prepare(pair, x).state for x in samples[:2]]
    decoding = decoding_for(pair, max_new_tokens=4)
    greedy = replay.generate_batch(pair, states, decoding, first_logits=True)
    drawn = replay.generate_batch(pair, states, decoding, n=3, do_sample=True, seed=5, first_logits=True)
    assert [len(g.texts) for g in drawn] == [3, 3]
    for one, many in zip(greedy, drawn, strict=True):
        assert torch.allclose(many.first_logits, one.first_logits.expand(3, -1), atol=1e-4, rtol=0)
    again = replay.generate_batch(pair, states, decoding, n=3, do_sample=True, seed=5)
    assert again == drawn  # seeded


def test_hygiene_of_the_batched_path(pair, samples):
    saved = weights(pair.rlvr)
    config = pair.rlvr.generation_config
    hard = strategies()["hard"]
    states = [hard.prepare(pair, x).state for x in samples]
    hard.generate_batch(pair, states, decoding_for(pair, max_new_tokens=3))
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    calls = {"n": 0}

    def boom(module, args, output):  # raises on the second decode step, mid-generate
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    handle = pair.adapter.layers(pair.rlvr)[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            hard.generate_batch(pair, states, decoding_for(pair, max_new_tokens=5), first_logits=True)
    finally:
        handle.remove()
    assert calls["n"] == 3
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved) and pair.rlvr.generation_config is config


def test_bad_batches(pair, samples):
    hard = strategies()["hard"]
    state = hard.prepare(pair, samples[0]).state
    with pytest.raises(ConfigError, match="at least one"):
        hard.generate_batch(pair, [])
    with pytest.raises(ConfigError, match="prepared by"):
        Baseline().generate_batch(pair, [state])
    with pytest.raises(ConfigError, match="prepared samples"):
        hard.generate_batch(pair, [samples[0]])
    odd = replace(samples[0], model_inputs={**samples[0].model_inputs, "extra": torch.ones(1)})
    with pytest.raises(InputError, match="extra"):
        collate([odd], 0)
    without = {k: v for k, v in samples[1].model_inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(InputError, match="some samples only"):
        collate([samples[0], replace(samples[1], model_inputs=without)], 0)
    with pytest.raises(ConfigError, match="batch size"):
        InterventionRunConfig(batch_size=0)
    with pytest.raises(ConfigError, match="batch size"):
        InterventionRunConfig(batch_size=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        InterventionRunConfig(max_new_tokens=0)


def test_organism_greedy_outputs_are_identical():
    pair = lens.load_pair("organism")
    items = organism.heldout(6)
    # The organism's images are all 64x64; smaller ones give rows with fewer visual tokens (padding).
    sizes = [(64, 64), (32, 32), (48, 32)]
    inputs = [pair.encode(it.question, [it.image.resize(sizes[i % 3])]) for i, it in enumerate(items)]
    assert len({x.n_tokens for x in inputs}) == 3
    decoding = decoding_for(pair)
    assert decoding.max_new_tokens == 4
    for intervention in (
        Baseline(),
        HardInjection(layers=(0, 1, 2), rule="quantile", quantile=0.3),
        ActivationReplay(layers=(0, 1, 2), steps=5, rule="quantile", quantile=0.3),
    ):
        states = [intervention.prepare(pair, x).state for x in inputs]
        batched = intervention.generate_batch(pair, states, decoding)
        alone = [intervention.generate_batch(pair, [s], decoding)[0] for s in states]
        assert batched == alone
        assert all(g.texts[0].startswith("answer") for g in batched)


def test_runner_results_do_not_depend_on_the_batch_size(pair, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    items = []
    for i, side in enumerate((56, 112, 84, 56)):
        path = folder / f"{i}.png"
        image(seed=i, side=side).save(path)
        items.append(
            Sample(id=f"s{i}", question="how many red shapes ?" + " really" * i, images=(path,), answer="2")
        )
    base = InterventionRunConfig(
        strategies=("rlvr", "hard-low", "replay"),
        layers=(0, 1),
        steps=2,
        topk=5,
        mask_rule="quantile",
        n=2,
        ks=(1, 2),
        max_new_tokens=3,
        n_boot=50,
    )

    def run(config, out):
        interventions = [(s, make_intervention(s, config, pair.n_layers)) for s in config.strategies]
        return run_settings(pair, items, interventions, config, tmp_path / out)

    one = run(base, "b1")
    three = run(replace(base, batch_size=3), "b3")
    columns = ["setting", "item", "response", "greedy", "correct", "n"]
    assert one[columns].equals(three[columns])
    assert set(three["greedy_batch"]) == {3, 1} and set(one["greedy_batch"]) == {1}
    settings = json.loads((tmp_path / "b3" / "records.settings.json").read_text())["settings"]
    assert settings["decoding"]["max_new_tokens"] == 3 and settings["decoding"]["repetition_penalty"] == 1.0
    assert "batch_size" not in settings
    # Resuming with another batch size is allowed and does no work.
    again = run(replace(base, batch_size=2), "b3")
    assert again[columns].equals(three[columns])


def test_bf16_replay_decodes_batched_rows_with_the_float32_carry(pair, samples):
    """In bf16 the replay prefill carries Δ in float32 (VisualResidual); batched rows must get their own
    Δ through that path too: each row's first-step logits equal its single-sample decode (bf16 tolerance),
    and differ from plain decoding."""
    import copy

    bf16 = copy.copy(pair)
    bf16.base = copy.deepcopy(pair.base).to(torch.bfloat16)
    bf16.rlvr = copy.deepcopy(pair.rlvr).to(torch.bfloat16)
    replay = ActivationReplay(layers=(0, 1), steps=3, topk=5, rule="quantile", quantile=0.3, alpha=1000.0)
    assert replay.config.residual == "float32"
    states = [replay.prepare(bf16, x).state for x in samples]
    one_step = decoding_for(bf16, max_new_tokens=1)
    batched = replay.generate_batch(bf16, states, one_step, first_logits=True)
    alone = [replay.generate_batch(bf16, [s], one_step, first_logits=True)[0] for s in states]
    baseline = Baseline()
    plain = baseline.generate_batch(
        bf16, [baseline.prepare(bf16, x).state for x in samples], one_step, first_logits=True
    )
    for together, single, before in zip(batched, alone, plain, strict=True):
        scale = single.first_logits.abs().max()
        assert torch.allclose(
            together.first_logits, single.first_logits, atol=float(4 * 2**-8 * scale), rtol=0
        )
        assert (together.first_logits - before.first_logits).abs().max() > 0
    assert hook_count(bf16.rlvr) == 0
