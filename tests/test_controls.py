"""Planted-drift twins on the organism: each method must find an edit whose size and place are known.

Every threshold below was set from a first measurement on the same fixed setting (organism base,
held-out items, seed 0) and is stated next to it; the settings are small so the file stays fast.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analyses.intervention import InterventionRunConfig, run_settings
from analyses.kl_drift import DriftConfig, run_drift
from lens import organism
from lens.controls import PlantConfig, PlantedPair, module_view, plant
from lens.errors import ConfigError, InputError
from lens.interventions import ActivationReplay, Baseline, HardInjection, hook_count
from lens.interventions.base import capture_block_residuals
from lens.logit_lens import pair_lens

Q = 0.2  # planted fraction, and the quantile of the masks that should find it


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return organism.load_pair()


@pytest.fixture(scope="module")
def items():
    return organism.heldout(40)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def _view(twin: PlantedPair) -> torch.nn.Module:
    return twin.__dict__["rlvr"]  # the RLVR side without the guard, to count its hooks after exit


# -- construction and bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": -1.0},
        {"size": float("nan")},
        {"size": float("inf")},
        {"where": "middle"},
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"layer": -1},
        {"on": "control"},
    ],
)
def test_bad_plant_settings_are_one_config_error(kwargs):
    with pytest.raises(ConfigError):
        PlantConfig(**kwargs)


def test_layer_beyond_the_model_and_a_twin_outside_its_block(pair):
    with pytest.raises(ConfigError, match="outside the model's 4 layers"):
        plant(pair, layer=4)
    twin = plant(pair)
    with pytest.raises(ConfigError, match="inside its block"):
        twin.rlvr  # noqa: B018 - outside `with`, the twin must not pass for the plain base


def test_a_visual_plant_on_a_text_only_item_is_one_input_error(pair, items):
    twin = plant(pair, where="low", size=1.0)
    text_only = twin.encode(items[0].question, [])
    with pytest.raises(InputError, match="visual tokens, but the input has none"):
        twin.plan(text_only)
    with twin, pytest.raises(InputError, match="visual tokens"):
        pair_lens(twin.base, twin.rlvr, twin.adapter, text_only)
    assert hook_count(_view(twin)) == 0 and hook_count(pair.base) == 0


def test_the_view_shares_every_tensor_and_a_null_plant_changes_nothing(pair, items):
    view = module_view(pair.base)
    assert all(a is b for a, b in zip(view.parameters(), pair.base.parameters(), strict=True))
    assert all(a is not b for a, b in zip(view.modules(), pair.base.modules(), strict=True))
    inputs = pair.encode(items[0].question, [items[0].image])
    with plant(pair, size=0.0) as twin:
        result = pair_lens(twin.base, twin.rlvr, twin.adapter, inputs)
    assert float(result.kl_base_rlvr.abs().max()) == 0.0


def test_selection_matches_the_quantile_mask_and_the_offset_has_its_size(pair, items):
    inputs = pair.encode(items[1].question, [items[1].image])
    with plant(pair, where="low", size=1.5, fraction=Q, seed=3) as twin:
        low = twin.plan(inputs)
        injection = HardInjection(layers=(0,), select="low", rule="quantile", quantile=Q).prepare(
            twin, inputs
        )
    assert torch.equal(low.positions, injection.plan.positions[0].cpu())  # same tokens as the mask
    entropy = low.entropy
    assert (
        entropy is not None
        and entropy[low.candidate_index].max() <= entropy.sort().values[low.positions.numel()]
    )
    with plant(pair, where="high", size=1.5, fraction=Q, seed=3) as twin:
        high = twin.plan(inputs)
    assert (
        high.entropy[high.candidate_index].min()
        >= high.entropy.sort(descending=True).values[high.positions.numel()]
    )
    assert torch.equal(low.candidates, inputs.visual_positions.cpu())
    # RMS of the offset = size x RMS of the base's block-0 input (image features in) at the visual tokens.
    block_in = capture_block_residuals(pair.base, pair.adapter, inputs.model_inputs, inputs_of=(0,))[
        ("in", 0)
    ]
    expected = 1.5 * float(block_in[inputs.visual_positions].float().pow(2).mean().sqrt())
    assert math.isclose(float(low.offset.pow(2).mean().sqrt()), expected, rel_tol=1e-5)
    assert math.isclose(float(high.offset.pow(2).mean().sqrt()), expected, rel_tol=1e-5)
    assert torch.allclose(low.offset / low.offset.norm(), twin.direction / twin.direction.norm(), atol=1e-6)


# -- drift: the KL lands where it was planted ------------------------------------------------------


@pytest.fixture(scope="module")
def drift_shares(pair, items):
    """Layer-0 visual mean KL per base-entropy quintile, for each plant (20 items, size 2)."""
    out = {}
    for where in ("low", "high", "random"):
        with plant(pair, where=where, size=2.0, layer=0, fraction=Q, seed=0) as twin:
            drift = run_drift(twin, items[:20], config=DriftConfig(layers=(0,)))
        b = drift.buckets
        out[where] = b[(b.token_group == "visual") & (b.layer == 0)].sort_values("bucket").mean_kl.to_numpy()
    return out


def test_low_entropy_plant_lands_in_bucket_1(drift_shares):
    kl = drift_shares["low"]
    # Measured: [0.127, 0.026, 0.001, 0.002, 0.0005], 81% of the KL in bucket 1.
    assert kl[0] > 3 * kl[1:].max()
    assert kl[0] / kl.sum() > 0.7


def test_high_entropy_plant_lands_in_the_top_buckets(drift_shares):
    kl = drift_shares["high"]
    # Measured: [1e-4, 0, 0.010, 0.021, 0.017]: < 0.2% in buckets 1-2, the peak in bucket 4 (not 5:
    # the highest-entropy tokens carry larger residuals, so the same offset moves them less).
    assert kl[:2].sum() / kl.sum() < 0.01
    assert kl[4] > 50 * kl[0] and kl[3] > 50 * kl[0]
    assert kl[4] > kl[2] and kl[4] > kl[1]


def test_random_plant_spreads_over_buckets(drift_shares):
    share = drift_shares["random"] / drift_shares["random"].sum()
    # Measured shares: [0.35, 0.35, 0.11, 0.10, 0.10]; low plant 0.81 in bucket 1, high 0.00.
    assert share.max() < 0.5 and share.min() > 0.05
    low = drift_shares["low"] / drift_shares["low"].sum()
    assert share[0] < low[0] - 0.3


# -- hard injection: planting lowers accuracy; the matching injection removes it exactly -----------


@pytest.fixture(scope="module")
def injection_runs(pair, items):
    config = InterventionRunConfig(n=0, batch_size=len(items), mask_rule="quantile", quantile=Q)
    runs = {}
    for where in ("low", "high"):
        with plant(pair, where=where, size=4.0, layer=0, fraction=Q, seed=0) as twin:
            strategies = [
                ("planted", Baseline()),
                ("base", Baseline("base")),
                ("hard-low", HardInjection(layers=(0,), select="low", rule="quantile", quantile=Q)),
                ("hard-high", HardInjection(layers=(0,), select="high", rule="quantile", quantile=Q)),
            ]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = run_settings(twin, items, strategies, config)
        runs[where] = {s: g.sort_values("item") for s, g in table.groupby("strategy")}
    return runs


def test_a_low_plant_lowers_accuracy_and_hard_low_restores_every_answer(injection_runs):
    run = injection_runs["low"]
    # Measured on 40 items: base 0.475 -> planted 0.275 (size 4); hard-low 0.475, hard-high 0.275.
    assert run["planted"].greedy.mean() <= run["base"].greedy.mean() - 0.1
    assert list(run["hard-low"].response) == list(run["base"].response)
    assert list(run["hard-high"].response) == list(run["planted"].response)


def test_a_high_plant_is_removed_by_hard_high_not_hard_low(injection_runs):
    run = injection_runs["high"]
    # Measured: a high plant barely moves accuracy (0.475 -> 0.45 at size 4, 0.575 at size 1), so
    # only the recovery is asserted: hard-high restores the base's answers, hard-low changes nothing.
    assert list(run["hard-high"].response) == list(run["base"].response)
    assert list(run["hard-low"].response) == list(run["planted"].response)
    assert (run["planted"].response.to_numpy() != run["base"].response.to_numpy()).any()


# -- Activation Replay: Δ opposes the plant at the planted tokens -------------------------------------


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_replay_offsets_oppose_a_plant_at_layer_0(pair, items, variant):
    cosines, other, drop = [], [], []
    with plant(pair, where="low", size=2.0, layer=0, fraction=Q, seed=0) as twin:
        for item in items[:6]:
            inputs = twin.encode(item.question, [item.image])
            planted = twin.plan(inputs)
            replay = ActivationReplay(
                alpha=1000.0, steps=25, layers=(0,), rule="quantile", quantile=Q, variant=variant
            ).prepare(twin, inputs)
            delta, idx = replay.result.offsets, planted.candidate_index
            assert torch.equal(replay.targets.selected[0].cpu(), idx)  # replay's mask = the plant's tokens
            cosines += F.cosine_similarity(delta[idx], planted.offset.expand(len(idx), -1), dim=-1).tolist()
            rest = torch.ones(delta.shape[0], dtype=torch.bool)
            rest[idx] = False
            other += F.cosine_similarity(
                delta[rest], planted.offset.expand(int(rest.sum()), -1), dim=-1
            ).tolist()
            drop.append(replay.result.final_loss / replay.result.losses[0])
    # Measured (8 items, alpha 1000): mean cosine -0.12 (released) / -0.125 (paper), every token in
    # [-0.13, -0.116]; |Δ| ≈ 0.09 |plant|; the loss falls to ~8% of its first value. The anti-alignment
    # is real but weak: the top-k lens sees only a small part of a random 128-d direction.
    assert np.mean(cosines) < -0.08 and max(cosines) < 0
    assert np.mean(drop) < 0.3
    # Away from the planted tokens Δ is ~orthogonal to the plant (measured +0.00 released, +0.07 paper).
    assert abs(np.mean(other)) < 0.15


# -- hygiene ------------------------------------------------------------------------------------------


def test_no_hook_left_and_no_weight_changed_after_success_and_exception(pair, items):
    saved_base, saved_rlvr = _state(pair.base), _state(pair.rlvr)
    flags = [p.requires_grad for p in pair.base.parameters()]
    inputs = pair.encode(items[2].question, [items[2].image])
    twin = plant(pair, where="low", size=3.0, fraction=Q)
    with twin:
        ActivationReplay(alpha=100.0, steps=2, layers=(0, 1), rule="quantile", quantile=Q).prepare(
            twin, inputs
        )
        Baseline().prepare(twin, inputs).generate(twin, inputs)
        assert hook_count(_view(twin)) == 3  # the plant's own hooks, while active
    assert hook_count(_view(twin)) == 0 and hook_count(pair.base) == 0
    with pytest.raises(RuntimeError, match="boom"), twin:
        pair_lens(twin.base, twin.rlvr, twin.adapter, inputs)
        raise RuntimeError("boom")
    assert hook_count(_view(twin)) == 0 and hook_count(pair.base) == 0
    with pytest.raises(ConfigError, match="cannot nest"), twin, twin:
        pass
    assert hook_count(_view(twin)) == 0
    assert _unchanged(pair.base, saved_base) and _unchanged(pair.rlvr, saved_rlvr)
    assert flags == [p.requires_grad for p in pair.base.parameters()]
    with plant(pair, size=3.0, on="rlvr") as on_rlvr:
        pair_lens(on_rlvr.base, on_rlvr.rlvr, on_rlvr.adapter, inputs)
    assert _unchanged(pair.rlvr, saved_rlvr) and hook_count(pair.rlvr) == 0


def test_batched_decoding_plants_each_row_at_its_own_positions(pair, items):
    with plant(pair, where="low", size=4.0, fraction=Q) as twin:
        inputs = [
            twin.encode(items[3].question, [items[3].image]),
            twin.encode("count the shapes : " + items[4].question, [items[4].image]),
        ]
        assert inputs[0].n_tokens != inputs[1].n_tokens
        states = [Baseline().prepare(twin, x).state for x in inputs]
        batched = Baseline().generate_batch(twin, states, first_logits=True)
        alone = [Baseline().generate_batch(twin, [s], first_logits=True)[0] for s in states]
        base_state = Baseline("base").prepare(twin, inputs[0]).state
        clean = Baseline("base").generate_batch(twin, [base_state], first_logits=True)[0]
    for b, a in zip(batched, alone, strict=True):
        assert torch.allclose(b.first_logits, a.first_logits, atol=1e-4)
    assert not torch.allclose(alone[0].first_logits, clean.first_logits, atol=1e-3)  # the plant acts
