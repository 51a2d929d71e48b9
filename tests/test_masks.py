"""EntropyMask: each rule, low/high complement within the candidates, validation, CLI bad input."""

from __future__ import annotations

import pytest
import torch

from lens.errors import ConfigError
from lens.masks import EntropyMask, fixed_threshold_mask, quantile_mask, tau_max_mask

# Near-uniform rows (like the organism's early layers, 5.0-5.6 nats) and one spread-out row.
ENTROPY = torch.tensor(
    [
        [5.04, 5.20, 5.31, 5.44, 5.56, 0.10],
        [1.00, 2.00, 3.00, 4.00, 5.00, 6.00],
    ]
)
CANDIDATES = torch.tensor([True, True, True, True, True, False])


def test_tau_max_rule_is_the_released_function_and_empty_on_near_uniform_entropies():
    mask = EntropyMask()  # the faithful default
    assert (mask.rule, mask.tau) == ("tau_max", 0.4)
    chosen = mask.select(ENTROPY, CANDIDATES)
    assert torch.equal(chosen, tau_max_mask(ENTROPY, CANDIDATES, 0.4))
    assert not chosen[0].any()  # 0.4 x 5.56 is below every candidate: nothing selected
    assert chosen[1].tolist() == [True, True, False, False, False, False]
    assert "quantile" in mask.empty_hint()


def test_quantile_rule_selects_the_lowest_fraction_per_layer():
    mask = EntropyMask("quantile", quantile=0.4)
    chosen = mask.select(ENTROPY, CANDIDATES)
    assert torch.equal(chosen, quantile_mask(ENTROPY, CANDIDATES, 0.4))
    # q = 0.4 over 5 candidates: the two lowest, whatever the spread; never the non-candidate.
    assert chosen.tolist() == [[True, True, False, False, False, False]] * 2
    assert mask.empty_hint() == ""


def test_fixed_rule_with_and_without_rlvr_condition():
    thresholds = (5.3, 3.5)
    rlvr = ENTROPY + torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0, 1.0]] * 2)
    mask = EntropyMask("fixed", thresholds=thresholds)
    assert mask.base_below_rlvr  # as released
    chosen = mask.select(ENTROPY, CANDIDATES, rlvr_entropy=rlvr)
    assert torch.equal(chosen, fixed_threshold_mask(ENTROPY, CANDIDATES, thresholds, "low", rlvr))
    assert chosen[0].tolist() == [True, False, False, False, False, False]
    with pytest.raises(ConfigError, match="rlvr_entropy"):
        mask.select(ENTROPY, CANDIDATES)
    plain = EntropyMask("fixed", thresholds=thresholds, require_base_below_rlvr=False)
    assert plain.select(ENTROPY, CANDIDATES)[0].tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize(
    "mask",
    [
        EntropyMask(),
        EntropyMask(tau=0.95),
        EntropyMask("quantile", quantile=0.3),
        EntropyMask("quantile", quantile=0.5, require_base_below_rlvr=True),
        EntropyMask("fixed", thresholds=(5.3, 3.5)),
    ],
)
def test_high_is_the_complement_of_low_within_the_candidates(mask):
    rlvr = ENTROPY.flip(-1)
    low = mask.select(ENTROPY, CANDIDATES, "low", rlvr_entropy=rlvr)
    high = mask.select(ENTROPY, CANDIDATES, "high", rlvr_entropy=rlvr)
    assert not (low & high).any()
    assert torch.equal(low | high, CANDIDATES.expand_as(low))


def test_no_candidates_selects_nothing():
    none = torch.zeros(6, dtype=torch.bool)
    for mask in (EntropyMask(), EntropyMask("quantile")):
        for select in ("low", "high"):
            assert not mask.select(ENTROPY, none, select).any()


def test_describe_and_tag():
    assert EntropyMask().describe() == "τ·max, τ=0.4"
    assert EntropyMask("quantile", quantile=0.3).describe() == "quantile q=0.3"
    assert EntropyMask("quantile", quantile=0.3).tag() == "q=0.3"
    assert EntropyMask(tau=0.2).tag() == "tau=0.2"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "median"}, "rule"),
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"rule": "quantile", "quantile": 0.0}, "quantile"),
        ({"rule": "quantile", "quantile": 1.0}, "quantile"),
        ({"rule": "fixed"}, "thresholds"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EntropyMask(**kwargs)
    with pytest.raises(ConfigError, match="select"):
        EntropyMask().select(ENTROPY, CANDIDATES, "middle")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["intervene", "--mask", "median"], "mask rule"),
        (["intervene", "--mask", "quantile", "--quantile", "1.5"], "quantile"),
        (["replay", "--grid", "--mask", "quantile", "--quantiles", "0.2,0"], "quantile"),
        (["replay", "--mask", "fixed"], "mask rule"),
        (["perturb", "--mask", "quantile", "--quantile", "0"], "quantile"),
        (["perturb", "--mask", "nope"], "mask rule"),
    ],
)
def test_cli_bad_mask_is_one_line_config_error(argv, match, tmp_path, capsys):
    from lens import cli

    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and err.startswith(f"lens {argv[0]}: error:")
