"""Perturbation study: perplexity, noise hooks, σ = 0 reference, correlation statistics, bad input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats as sps

from analyses import perturbation as pt
from lens.errors import ConfigError, DatasetError
from lens.loading import ModelPair
from lens.logit_lens import LensConfig, pair_lens
from lens.masks import tau_max_mask
from lens.testing import tiny_image_processor, tiny_qwen25vl, tiny_tokenizer

torch.set_num_threads(1)
PROMPT = "How many red shapes are in the image?"


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    image: Any
    answer: str | None
    qtype: str = "red"


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    tok = tiny_tokenizer()
    base = tiny_qwen25vl(tok, seed=0)
    rlvr = tiny_qwen25vl(tok, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in rlvr.parameters():  # a small RLVR-like shift of the base
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return ModelPair.from_models(base, rlvr, tok, tiny_image_processor())


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return [Item(f"s{i}", PROMPT, _image(i), str(i % 4)) for i in range(3)]


CONFIG = pt.PerturbConfig(sigmas=(0.0, 0.5, 2.0), tau=0.8, incorrect="offset", n_boot=50)


def test_response_nll_matches_direct_computation(pair):
    inputs = pair.encode(PROMPT, [_image(0)], response="answer 3")
    with torch.no_grad():
        logits = pair.rlvr(**inputs.model_inputs).logits[0]
    ids = inputs.input_ids[0]
    start = inputs.response_start
    direct = [-torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(start, len(ids))]
    nll = pt.response_nll(logits, inputs.input_ids, start)
    assert ids[-1].item() == pair.tokenizer.eos_token_id  # the EOS is scored
    assert len(direct) == nll.numel() >= 2
    np.testing.assert_allclose(nll.numpy(), direct, rtol=1e-5, atol=1e-5)
    assert pt.perplexity(nll) == pytest.approx(float(np.exp(np.mean(direct))), rel=1e-5)


def test_sigma_zero_reproduces_clean_numbers(pair, items):
    item = items[0]
    record = pt.perturb_record(pair, item, CONFIG)
    clean = [r for r in record["rows"] if r["sigma"] == 0]
    assert {r["noise_kind"] for r in clean} == {"pixel", "embedding"}
    inputs = pair.encode(item.question, [item.image], response=record["correct_response"])
    layers = CONFIG.drift_layers(pair.n_layers)
    assert layers == (0, 1)  # first half of the tiny model's 4 layers
    lens = pair_lens(pair.base, pair.rlvr, pair.adapter, inputs, LensConfig(layers=layers))
    visual = inputs.visual_positions
    mask = tau_max_mask(lens.base_entropy[:, visual], torch.ones(len(visual), dtype=torch.bool), CONFIG.tau)
    assert mask.any() and not mask.all()
    expected_low = lens.kl_base_rlvr[:, visual][mask].mean().item()
    with torch.no_grad():
        logits = pair.rlvr(**inputs.model_inputs).logits[0]
    expected_ppl = pt.perplexity(pt.response_nll(logits, inputs.input_ids, inputs.response_start))
    for row in clean:
        assert row["kl_low_entropy"] == pytest.approx(expected_low, rel=1e-4)
        assert row["kl_visual_all"] == pytest.approx(lens.kl_base_rlvr[:, visual].mean().item(), rel=1e-4)
        assert row["ppl_correct"] == pytest.approx(expected_ppl, rel=1e-4)
    assert record["incorrect_response"] == f"answer {int(item.answer) + 1}"
    assert record["incorrect_source"] == "offset"
    # Noise moves the drift; the same seed gives the same numbers.
    noisy = [r for r in record["rows"] if r["sigma"] == 2.0]
    assert all(r["kl_visual_all"] != pytest.approx(expected_low) for r in noisy)
    assert pt.perturb_record(pair, item, CONFIG)["rows"] == record["rows"]


def test_embedding_noise_hook_is_always_removed(pair):
    inputs = pair.encode(PROMPT, [_image(1)])
    layer0 = pair.adapter.layers(pair.rlvr)[0]
    with torch.no_grad():
        clean = pair.rlvr(**inputs.model_inputs).logits
    eps = torch.randn(len(inputs.visual_positions), pair.adapter.hidden_size(pair.config))
    with pt.embedding_noise(pair.rlvr, pair.adapter, inputs.visual_positions, 1.0, eps) as info:
        assert len(layer0._forward_pre_hooks) == 1
        with torch.no_grad():
            noisy = pair.rlvr(**inputs.model_inputs).logits
    assert info["rms"] > 0
    assert not torch.allclose(noisy, clean)
    assert len(layer0._forward_pre_hooks) == 0
    with (
        pytest.raises(RuntimeError),
        pt.embedding_noise(pair.rlvr, pair.adapter, inputs.visual_positions, 1.0, eps),
    ):
        raise RuntimeError("boom")
    assert len(layer0._forward_pre_hooks) == 0
    with torch.no_grad():
        assert torch.equal(pair.rlvr(**inputs.model_inputs).logits, clean)


def test_pixel_noise_scales_with_std_and_leaves_inputs_alone(pair):
    inputs = pair.encode(PROMPT, [_image(2)])
    pixels = inputs.model_inputs["pixel_values"].clone()
    eps = torch.randn(pixels.shape)
    noisy = pt.pixel_noised(inputs.model_inputs, 0.5, eps)["pixel_values"]
    torch.testing.assert_close(noisy, pixels + 0.5 * pixels.std() * eps)
    assert torch.equal(inputs.model_inputs["pixel_values"], pixels)
    assert pt.pixel_noised(inputs.model_inputs, 0.0, eps) is inputs.model_inputs


def test_run_writes_tidy_table_and_resumes(pair, items, tmp_path):
    supplied = {"s1": "answer 9"}
    result = pt.run_perturbation(pair, items, tmp_path, CONFIG, incorrect=supplied)
    table = result.table
    assert len(table) == len(items) * 2 * len(CONFIG.sigmas) * 2
    assert set(table["answer_kind"]) == {"correct", "incorrect"}
    assert table.loc[table["sample_id"] == "s1", "incorrect_source"].eq("supplied").all()
    for name in ("perturb_table.csv", "perturb_spearman.csv", "perturb_summary.csv", "perturbation.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert set(result.correlations["scope"]) == {"pooled", "within_sample"}
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    again = pt.run_perturbation(pair, items, tmp_path, CONFIG, incorrect=supplied)
    assert (tmp_path / "records.jsonl").read_text().splitlines() == lines
    pd.testing.assert_frame_equal(again.table, table)


def test_sampled_incorrect_uses_model_draws_or_falls_back(pair, items):
    config = pt.PerturbConfig(sigmas=(0.0,), kinds=("pixel",), tau=0.8, n_incorrect_draws=4, max_new_tokens=3)
    prompt_inputs = pair.encode(PROMPT, [items[0].image])
    draws = pt.sample_responses(pair, prompt_inputs, 4, 3, seed=1)
    assert draws == pt.sample_responses(pair, prompt_inputs, 4, 3, seed=1)
    # The random tiny model never writes "answer N": every draw is malformed, so the offset is used.
    response, source = pt.choose_incorrect(
        pair, items[0], prompt_inputs, config, pt.organism_response, pt.organism_extract, None
    )
    assert (response, source) == ("answer 1", "offset")
    # With an extractor that reads every draw as answer 7, the (wrong) draw is used verbatim.
    response, source = pt.choose_incorrect(
        pair, items[0], prompt_inputs, config, pt.organism_response, lambda text: "7", None
    )
    assert source == "sampled" and response in draws


def _known_table() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for s in range(8):
        for sigma in (0.0, 0.1, 0.2, 0.4):
            drift = sigma + 0.3 * s + rng.normal(0, 0.05)
            for kind, sign in (("correct", 1.0), ("incorrect", -1.0)):
                ppl = np.exp(sign * drift + rng.normal(0, 0.2))
                rows.append(
                    {
                        "sample_id": f"s{s}",
                        "noise_kind": "pixel",
                        "sigma": sigma,
                        "answer_kind": kind,
                        "kl_low_entropy": drift,
                        "ppl": ppl,
                    }
                )
    # One sample whose PPL never changes: its within-sample ρ is undefined and left out.
    for sigma in (0.0, 0.1):
        for kind in ("correct", "incorrect"):
            rows.append(
                {
                    "sample_id": "flat",
                    "noise_kind": "pixel",
                    "sigma": sigma,
                    "answer_kind": kind,
                    "kl_low_entropy": sigma,
                    "ppl": 2.0,
                }
            )
    return pd.DataFrame(rows)


def test_correlations_match_scipy():
    table = _known_table()
    corr = pt.correlation_table(table, n_boot=300, seed=1)
    for kind in ("correct", "incorrect"):
        frame = table[table["answer_kind"] == kind]
        pooled = corr[(corr["answer_kind"] == kind) & (corr["scope"] == "pooled")].iloc[0]
        rho, p = sps.spearmanr(frame["kl_low_entropy"], frame["ppl"])
        assert pooled["spearman_rho"] == pytest.approx(rho)
        assert pooled["p_value"] == pytest.approx(p)
        assert pooled["ci_low"] <= pooled["spearman_rho"] <= pooled["ci_high"]
        assert pooled["n_samples"] == 9 and pooled["n_points"] == len(frame)
        within = corr[(corr["answer_kind"] == kind) & (corr["scope"] == "within_sample")].iloc[0]
        per_sample = [
            sps.spearmanr(g["kl_low_entropy"], g["ppl"])[0]
            for sid, g in frame.groupby("sample_id")
            if sid != "flat"
        ]
        assert within["spearman_rho"] == pytest.approx(np.mean(per_sample))
        assert within["n_points"] == 8
        assert within["ci_low"] <= within["spearman_rho"] <= within["ci_high"]
    signs = corr[corr["scope"] == "pooled"].set_index("answer_kind")["spearman_rho"]
    assert signs["correct"] > 0.5 and signs["incorrect"] < -0.5
    pd.testing.assert_frame_equal(corr, pt.correlation_table(table, n_boot=300, seed=1))


@pytest.mark.parametrize("bad", ["0,-0.1", "0,abc", "", "nan", "0,inf", [0.1, True]])
def test_bad_noise_levels_are_config_errors(bad):
    with pytest.raises(ConfigError):
        pt.parse_sigmas(bad)


def test_bad_config_and_datasets():
    with pytest.raises(ConfigError, match="negative"):
        pt.PerturbConfig(sigmas=(0.1, -1.0))
    with pytest.raises(ConfigError, match="noise kinds"):
        pt.PerturbConfig(kinds=("audio",))
    assert pt.PerturbConfig(sigmas=(0.2, 0.1, 0.2)).sigmas == (0.0, 0.1, 0.2)
    with pytest.raises(DatasetError, match="needs an 'answer'"):
        pt.check_samples([Item("a", PROMPT, _image(0), None)])
    with pytest.raises(DatasetError, match="needs an image"):
        pt.check_samples([Item("a", PROMPT, None, "3")])
    with pytest.raises(DatasetError):
        pt.check_samples([])
    with pytest.raises(DatasetError, match="non-integer"):
        pt.offset_answer("seven")


def test_cli_rejects_bad_input_with_one_line(tmp_path, monkeypatch, capsys):
    from lens import cli

    assert cli.main(["perturb", "--sigmas", "0,-0.5", "--out", str(tmp_path / "o")]) == 2
    assert "negative" in capsys.readouterr().err
    assert cli.main(["perturb", "--sigmas", "0,x", "--out", str(tmp_path / "o")]) == 2
    assert "not a number" in capsys.readouterr().err
    _image(0).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"id": "a", "question": PROMPT, "image": "a.png"}) + "\n")
    assert cli.main(["perturb", "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs an 'answer'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_quantile_mask_gives_finite_low_entropy_drift(pair, items):
    # τ tiny: the τ·max rule selects nothing and the drift is NaN; the rank-based rule always selects.
    empty = pt.PerturbConfig(sigmas=(0.0, 0.5), kinds=("embedding",), tau=1e-6, incorrect="offset", n_boot=20)
    record = pt.perturb_record(pair, items[0], empty)
    assert record["n_masked"] == 0 and all(np.isnan(r["kl_low_entropy"]) for r in record["rows"])
    config = pt.PerturbConfig(
        sigmas=(0.0, 0.5),
        kinds=("embedding",),
        mask_rule="quantile",
        quantile=0.3,
        incorrect="offset",
        n_boot=20,
    )
    record = pt.perturb_record(pair, items[0], config)
    assert 0 < record["n_masked"] < record["n_visual"] * len(config.drift_layers(pair.n_layers))
    assert all(np.isfinite(r["kl_low_entropy"]) and r["kl_low_entropy"] >= 0 for r in record["rows"])
    with pytest.raises(ConfigError, match="mask rule"):
        pt.PerturbConfig(mask_rule="fixed")
    with pytest.raises(ConfigError, match="quantile"):
        pt.PerturbConfig(mask_rule="quantile", quantile=1.0)
