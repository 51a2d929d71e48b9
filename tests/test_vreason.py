"""V-Reason: the controller's reach, the update schedule, Lite pruning, hygiene, refusals and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PROMPT, write_dataset
from intervention_fixtures import same_weights, tiny_pair, weights
from test_video import write_video
from transformers import DynamicCache

from lens.cli import main
from lens.decoding import decoding_for
from lens.errors import ConfigError, InputError
from lens.interventions import hook_count
from lens.interventions.vreason import (
    EntropySchedule,
    VReason,
    VReasonConfig,
    attach_controller,
    lowest_norm,
    video_positions,
)
from lens.video import VideoOptions, VideoPart


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vreason") / "clip.mkv"
    write_video(path, np.random.default_rng(3).integers(0, 256, (6, 42, 70, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def inputs(pair, video_path):
    return pair.encode(PROMPT, videos=[VideoPart(video_path, VideoOptions(nframes=4))])


def decoding(pair, tokens: int = 9):
    return decoding_for(pair, max_new_tokens=tokens, min_new_tokens=tokens)


def test_controller_touches_only_last_layer_values_at_video_positions(pair, inputs):
    model, n_layers = pair.rlvr, pair.n_layers
    columns = video_positions(inputs)
    seen: dict[str, list] = {"plain": [], "offset": []}
    for name in seen:
        cache = DynamicCache(config=model.config)
        if name == "offset":
            rows, heads, _, dim = seen["plain"][-1][2].shape
            offset = torch.randn(
                rows, heads, columns.numel(), dim, generator=torch.Generator().manual_seed(0)
            )
            attach_controller(cache, n_layers - 1, columns, offset)
        inner = cache.update

        def spy(k, v, i, *a, _inner=inner, _out=seen[name], **kw):
            keys, values = _inner(k, v, i, *a, **kw)
            _out.append((i, keys.clone(), values.clone()))
            return keys, values

        cache.update = spy
        with torch.no_grad():
            model(**inputs.model_inputs, past_key_values=cache, use_cache=True)
    for (i, k0, v0), (j, k1, v1) in zip(seen["plain"], seen["offset"], strict=True):
        assert i == j and torch.equal(k0, k1)
        changed = (v0 != v1).any(dim=(0, 1, 3)).nonzero().flatten()
        if i == n_layers - 1:
            assert torch.equal(changed, columns)  # every video position, nothing else
            assert torch.allclose(v1[:, :, columns] - v0[:, :, columns], offset, atol=1e-6)
        else:
            assert changed.numel() == 0


def test_schedule_switches_sign_at_the_ema_peak():
    config = VReasonConfig(ema_beta=0.5, patience=2)
    schedule = EntropySchedule(config)
    sequence = [1.0, 2.0, 3.0, 4.0, 3.9, 1.0, 0.5, 0.4, 3.0, 5.0]
    signs, emas = [], []
    for h in sequence:
        schedule.observe(torch.tensor([h]))
        signs.append(float(schedule.sign()))
        emas.append(float(schedule.ema))
    expected = [1.0]
    for h in sequence[1:]:
        expected.append(0.5 * expected[-1] + 0.5 * h)
    assert emas == pytest.approx(expected)
    peak = int(np.argmax(expected))
    assert peak == 4  # the EMA still rises at 3.9
    # Explore until the EMA has stayed below its running max for 2 steps (steps 5, 6), exploit after,
    # even when the entropy rises again (macro-exploitation is final).
    assert signs == [1.0] * 6 + [-1.0] * 4
    micro = EntropySchedule(VReasonConfig(ema_beta=0.5, patience=2, switch="micro"))
    micro.observe(torch.tensor([2.0]))
    micro.observe(torch.tensor([1.0]))  # below its EMA (1.5): explore
    assert float(micro.sign()) == 1.0
    micro.observe(torch.tensor([3.0]))  # above its EMA (2.25): exploit
    assert float(micro.sign()) == -1.0


def test_updates_every_k_tokens_weights_unchanged_no_hooks(pair, inputs):
    saved = weights(pair.rlvr)
    for every in (2, 3):
        vr = VReason(VReasonConfig(every=every, lr=0.5))
        out = vr.prepare(pair, inputs).generate(pair, inputs, decoding(pair))
        assert len(out.token_ids[0]) == 9
        # 9 tokens: the prefill then 8 decode steps; an update before the step after every k-th token.
        assert vr.trace.updates == [t for t in range(1, 9) if t % every == 0]
        assert len(vr.trace.entropies) == 9 and len(vr.trace.losses) == len(vr.trace.updates)
        assert vr.trace.offset_norm > 0
        assert len(vr.trace.signs) == len(vr.trace.updates)
    assert hook_count(pair.rlvr) == 0 and same_weights(pair.rlvr, saved)
    assert all(p.grad is None for p in pair.rlvr.parameters())
    # The controller changes the distributions it is trained on (entropy moved after an update).
    plain = VReason(VReasonConfig(lr=1e-12)).prepare(pair, inputs)
    plain.generate(pair, inputs, decoding(pair))
    strong = VReason(VReasonConfig(lr=0.5)).prepare(pair, inputs)
    strong.generate(pair, inputs, decoding(pair))
    weak_h, strong_h = np.array(plain.trace.entropies), np.array(strong.trace.entropies)
    # Identical until the first update (before the step that gives token 3), different from it on.
    assert np.allclose(weak_h[:2], strong_h[:2], atol=1e-5)
    assert not np.allclose(weak_h[2:], strong_h[2:], atol=1e-4)


def test_sampled_rows_and_lite_prune_the_lowest_norm_half(pair, inputs):
    columns = video_positions(inputs)
    cache = DynamicCache(config=pair.rlvr.config)
    with torch.no_grad():
        pair.rlvr(**inputs.model_inputs, past_key_values=cache, use_cache=True)
    values = cache.layers[pair.n_layers - 1].values[0]  # [heads, seq, dim]
    norms = values[:, columns].float().pow(2).sum(dim=(0, 2))
    expected = set(columns[norms.argsort()[: columns.numel() // 2]].tolist())
    assert set(lowest_norm(cache.layers[-1].values, columns, 0.5)[0].tolist()) == expected
    vr = VReason(VReasonConfig(lite=True)).prepare(pair, inputs)
    out = vr.generate(pair, inputs, decoding(pair, 5), n=3, do_sample=True, seed=0)
    assert len(out.token_ids) == 3
    assert len(vr.trace.pruned) == 3 and all(set(row) == expected for row in vr.trace.pruned)
    assert len(vr.trace.entropies[0]) == 3  # one controller and schedule per row
    # Pruning changes what the decode steps see.
    full = VReason(VReasonConfig()).prepare(pair, inputs)
    full.generate(pair, inputs, decoding(pair, 5), n=3, do_sample=True, seed=0)
    assert not np.allclose(vr.trace.entropies[1], full.trace.entropies[1], atol=1e-5)
    assert hook_count(pair.rlvr) == 0


def test_exception_mid_decode_leaves_no_hooks_and_same_weights(pair, inputs, monkeypatch):
    import lens.interventions.vreason as module

    saved = weights(pair.rlvr)
    flags = {n: p.requires_grad for n, p in pair.rlvr.named_parameters()}

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module._Run, "optimise", boom)
    vr = VReason().prepare(pair, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        vr.generate(pair, inputs, decoding(pair))
    assert hook_count(pair.rlvr) == 0 and same_weights(pair.rlvr, saved)
    assert flags == {n: p.requires_grad for n, p in pair.rlvr.named_parameters()}


def test_refusals(pair):
    with pytest.raises(InputError, match="video tokens"):
        VReason().prepare(pair, pair.encode(PROMPT))
    for bad in ({"lr": 0}, {"every": 0}, {"ema_beta": 1.0}, {"switch": "x"}, {"prune_fraction": 1.0}):
        with pytest.raises(ConfigError):
            VReasonConfig(**bad)


def test_cli_rlvr_and_vreason_on_a_video_dataset(tmp_path, vl_dirs, video_path, capsys):
    rows = [
        {"id": f"v{i}", "question": PROMPT, "answer": "2", "video": str(video_path), "nframes": 4}
        for i in range(2)
    ]
    data = write_dataset(tmp_path, rows)
    common = ["--base", str(vl_dirs[0]), "--rlvr", str(vl_dirs[1]), "--threads", "1", "--n", "0"]
    argv = ["intervene", "--strategies", "rlvr,vreason", "--data", str(data), "--max-new-tokens", "4"]
    out = tmp_path / "run"
    assert main([*argv, *common, "--vreason-every", "1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in records} == {"rlvr", "vreason"} and len(records) == 4
    assert any(r["setting"].startswith("vreason[lr=0.01,k=1") for r in records)
    capsys.readouterr()
    # Image-only items and bad settings: one line, before any weight loads, nothing written.
    images = write_dataset(tmp_path, [{"id": "i", "question": PROMPT, "answer": "2"}], name="text.jsonl")
    bad = tmp_path / "bad"
    assert (
        main(["intervene", "--strategies", "vreason", "--data", str(images), *common, "--out", str(bad)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no video" in err and "vreason" in err
    assert main([*argv, *common, "--vreason-every", "0", "--out", str(bad)]) == 2
    assert "every" in capsys.readouterr().err
    assert not bad.exists()
