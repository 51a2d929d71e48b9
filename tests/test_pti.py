"""PTI: directions, the norm-preserving step, steering the cache once at the prefill, hygiene, refusal
of foreign directions, and `lens intervene --strategies rlvr,pti` end to end (on the organism)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from intervention_fixtures import same_weights, weights
from transformers import DynamicCache

from lens import organism
from lens.cli import main
from lens.errors import ConfigError, InputError, PairMismatchError
from lens.interventions import Baseline, hook_count
from lens.interventions.pti import PTI, PTIConfig, steer
from lens.interventions.pti_directions import DirectionConfig, PTIDirections, aggregate, compute_directions
from lens.organism.calibration import calibration_items
from lens.organism.task import BACKGROUND
from lens.prompts import encode_sample


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return organism.load_pair()


@pytest.fixture(scope="module")
def directions(pair):
    return compute_directions(pair, calibration_items(4))


@pytest.fixture(scope="module")
def inputs(pair):
    return encode_sample(pair, organism.heldout(1)[0], "plain")


def _reference_steer(x: torch.Tensor, s: torch.Tensor, lam: float) -> torch.Tensor:
    """The released rule written out in float64, per vector (independent of lens.interventions.pti);
    a zero direction makes no step."""
    x, s = x.double(), s.double()
    s_norm = s.norm(dim=-1, keepdim=True)
    unit = torch.where(s_norm > 0, s / s_norm.clamp_min(1e-300), torch.zeros_like(s))
    cos = (x * -unit).sum(-1, keepdim=True) / x.norm(dim=-1, keepdim=True)
    y = lam * (1 + cos.clamp_min(0)) * unit
    z = x / x.norm(dim=-1, keepdim=True) + y
    return z / z.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)


def test_calibration_images_split_the_image_and_texts_name_the_objects():
    items = calibration_items(6)
    for item in items:
        full, obj, bg = (
            np.asarray(i, dtype=int) for i in (item.image, item.object_image, item.background_image)
        )
        assert np.array_equal(obj + bg, full)  # a partition of the pixels
        assert (obj != 0).any() and (np.all(bg == BACKGROUND, axis=-1) | np.all(bg == 0, axis=-1)).all()
        words = set(item.positive_text.split())
        assert words & {"red", "green", "blue", "yellow"} and not words & set(item.negative_text.split()) - {
            ",",
            ".",
        }
        assert "shape" in item.negative_text and not {"red", "round", "square"} & set(
            item.negative_text.split()
        )
    # The caption lists as many shapes as the image holds (a check on the shape draws).
    for index, sample in enumerate(organism.task.generate(4242, 6, "calibration")):
        listed = items[index].negative_text.split()[2]
        if sample.qtype == "total":
            assert listed == sample.answer
    with pytest.raises(ConfigError, match="at least 2"):
        calibration_items(1)


def test_directions_shapes_and_mean_aggregation_is_the_mean_contrast(pair):
    items = calibration_items(2)
    mean_dirs = compute_directions(pair, items, DirectionConfig(aggregation="mean"))
    text = pair.adapter.text_config(pair.rlvr.config)
    assert mean_dirs.shape == (
        pair.n_layers,
        text.num_key_value_heads,
        text.hidden_size // text.num_attention_heads,
    )
    # Recompute the image-key contrast of layer 1 by hand from the model's cache.
    diffs = []
    for item in items:
        means = []
        for image in (item.object_image, item.background_image):
            x = pair.encode(item.question, [image])
            with torch.no_grad():
                cache = pair.rlvr(**x.model_inputs, use_cache=True).past_key_values
            means.append(cache.layers[1].keys[0][:, x.visual_positions].double().mean(1))
        diffs.append(means[0] - means[1])
    expected = torch.stack(diffs).mean(0)
    assert torch.allclose(mean_dirs.direction("image", "keys")[1].double(), expected, atol=1e-5)


def test_pca_aggregation_is_unit_first_component_plus_mean_with_released_sign():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 3, 4, generator=gen, dtype=torch.float64)
    out = aggregate(x, DirectionConfig())
    for layer in range(2):
        flat = x[:, layer].reshape(7, -1).numpy()
        centred = flat - flat.mean(0)
        u, _, vt = np.linalg.svd(centred, full_matrices=False)
        pc = vt[0] * np.sign(u[np.abs(u[:, 0]).argmax(), 0])
        assert np.allclose(out[layer].reshape(-1).numpy(), pc + flat.mean(0), atol=1e-5)
        assert abs(np.linalg.norm(pc) - 1) < 1e-9
    assert torch.allclose(aggregate(x, DirectionConfig(aggregation="mean")), x.mean(0).float())
    same = torch.ones(5, 1, 2, 3, dtype=torch.float64)  # no variance: the direction is the mean alone
    assert torch.allclose(aggregate(same, DirectionConfig()), torch.ones(1, 2, 3))
    assert torch.equal(aggregate(torch.zeros(4, 1, 2, 3), DirectionConfig()), torch.zeros(1, 2, 3))


def test_steer_preserves_norms_and_turns_towards_the_direction():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 8, generator=gen, dtype=torch.float64)
    s = torch.randn(1, 2, 1, 8, generator=gen, dtype=torch.float64)
    for lam in (0.1, 0.6, 2.0):
        y = steer(x, s, lam).double()
        assert y.dtype == x.dtype
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6)
        assert (
            F.cosine_similarity(y, s.expand_as(y), dim=-1) > F.cosine_similarity(x, s.expand_as(x), dim=-1)
        ).all()
        assert torch.allclose(y, _reference_steer(x, s.expand_as(x), lam), atol=1e-6)
    assert torch.allclose(steer(x, s, 0.0), x, atol=1e-6)
    assert torch.allclose(steer(x, torch.zeros_like(s), 0.6), x, atol=1e-6)
    assert torch.equal(steer(torch.zeros_like(x), s, 0.6), torch.zeros_like(x))


def test_released_mode_equals_a_hand_written_cache_reference_and_steers_only_once(pair, directions, inputs):
    pti = PTI(directions).prepare(pair, inputs)
    plan = pti.state.detail
    n = inputs.n_tokens
    assert plan.text_position == n - 2  # the last cached token: PTI re-feeds the last one
    body = pair.rlvr.base_model
    lengths: list[int] = []
    counter = body.register_forward_pre_hook(
        lambda m, a, k: lengths.append(k["input_ids"].shape[1] if k.get("input_ids") is not None else -1),
        with_kwargs=True,
    )
    try:
        with pti.applied(pair) as model, torch.no_grad():
            out = model.generate(
                **inputs.model_inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
            )
        with torch.no_grad():
            plain = pair.rlvr.generate(
                **inputs.model_inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
            )
    finally:
        counter.remove()
    # One extra body call (the prefix), then single tokens: decode steps are plain steps.
    assert lengths[:4] == [n - 1, 1, 1, 1] and lengths[4:] == [n, 1, 1]

    # Reference: prefill all but the last token, steer the cache by hand, feed the rest token by token.
    mi = inputs.model_inputs
    cache = DynamicCache(config=pair.rlvr.config)
    prefix = {
        k: (v[:, :-1] if k in ("input_ids", "mm_token_type_ids", "attention_mask") else v)
        for k, v in mi.items()
    }
    with torch.no_grad():
        pair.rlvr(**prefix, past_key_values=cache, use_cache=True)
        image = plan.image_positions
        for layer_index, layer in enumerate(cache.layers):
            for part, lam_img, lam_txt in (("keys", 0.1, 0.1), ("values", 0.6, 0.6)):
                states = getattr(layer, part).clone().double()
                s_img = directions.direction("image", part)[layer_index].double()[None, :, None]
                states[:, :, image] = _reference_steer(
                    states[:, :, image], s_img.expand_as(states[:, :, image]), lam_img
                )
                s_txt = directions.direction("text", part)[layer_index].double()[None]
                states[:, :, n - 2] = _reference_steer(
                    states[:, :, n - 2], s_txt.expand_as(states[:, :, n - 2]), lam_txt
                )
                setattr(layer, part, states.to(getattr(layer, part).dtype))
        token = mi["input_ids"][:, -1:]
        generated = []
        for _ in range(3):
            logits = pair.rlvr(
                input_ids=token,
                mm_token_type_ids=torch.zeros_like(token),
                past_key_values=cache,
                use_cache=True,
            ).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(token))
    assert out.sequences[0, n:].tolist() == generated
    steered = out.past_key_values
    for layer, ref in zip(steered.layers, cache.layers, strict=True):
        width = ref.keys.shape[2]  # the reference cache lacks the last generated token's entry
        assert torch.allclose(layer.keys[:, :, :width], ref.keys, atol=1e-5)
        assert torch.allclose(layer.values[:, :, :width], ref.values, atol=1e-5)
    # In place of the plain cache: the steered positions keep their norms; earlier positions are equal.
    for layer, base in zip(steered.layers, plain.past_key_values.layers, strict=True):
        for part in ("keys", "values"):
            mine, theirs = getattr(layer, part)[0], getattr(base, part)[0]
            cols = torch.cat([image, torch.tensor([n - 2])])
            assert torch.allclose(mine[:, cols].norm(dim=-1), theirs[:, cols].norm(dim=-1), rtol=1e-5)
            assert not torch.allclose(mine[:, cols], theirs[:, cols], atol=1e-4)
            assert torch.equal(mine[:, : int(image.min())], theirs[:, : int(image.min())])


def test_inline_mode_steers_as_the_prefill_writes_and_then_stops(pair, directions, inputs):
    pti = PTI(directions, mode="inline").prepare(pair, inputs)
    n = inputs.n_tokens
    assert pti.state.detail.text_position == n - 1
    with pti.applied(pair) as model, torch.no_grad():
        out = model.generate(
            **inputs.model_inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    with torch.no_grad():
        plain = pair.rlvr(**inputs.model_inputs, use_cache=True).past_key_values
    cache = out.past_key_values
    assert "update" not in vars(cache)  # the wrapper left generate's cache after the prefill
    # Layer 0's keys/values depend on the unsteered embeddings only: steered = step(plain).
    image = pti.state.detail.image_positions
    for part, lam in (("keys", 0.1), ("values", 0.6)):
        got = getattr(cache.layers[0], part)[0]
        ref = getattr(plain.layers[0], part)[0]
        s = directions.direction("image", part)[0]
        expected = _reference_steer(ref[:, image], s[:, None].expand_as(ref[:, image]), lam)
        assert torch.allclose(got[:, image].double(), expected, atol=1e-5)
        s_txt = directions.direction("text", part)[0]
        assert torch.allclose(got[:, n - 1].double(), _reference_steer(ref[:, n - 1], s_txt, lam), atol=1e-5)


def test_batched_and_sampled_decoding_equal_one_sample_at_a_time(pair, directions):
    samples = organism.heldout(3)[1:]
    pti = PTI(directions)
    states = [pti.prepare(pair, encode_sample(pair, s, "plain")).state for s in samples]
    batched = pti.generate_batch(pair, states)
    single = [pti.generate_batch(pair, [state])[0] for state in states]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    sampled = pti.generate_batch(pair, states, n=2, do_sample=True, seed=3)
    assert [len(g.texts) for g in sampled] == [2, 2]


def test_no_weight_change_and_no_hook_left_after_success_and_exception(pair, directions, inputs):
    saved = weights(pair.rlvr)
    for mode in ("released", "inline"):
        pti = PTI(directions, mode=mode).prepare(pair, inputs)
        steered = pti.generate(pair, inputs, max_new_tokens=3)
        assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0

        def boom(module, args, output):
            raise RuntimeError("boom")

        handle = pair.adapter.layers(pair.rlvr)[2].register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                pti.generate(pair, inputs, max_new_tokens=3)
        finally:
            handle.remove()
        with pytest.raises(KeyError), pti.applied(pair):
            raise KeyError("inside")
        assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
        assert same_weights(pair.rlvr, saved)
        assert pti.generate(pair, inputs, max_new_tokens=3) == steered  # nothing leaked into the next run
    plain = Baseline().prepare(pair, inputs).generate(pair, inputs, max_new_tokens=3)
    zero = PTI(directions, image_keys=0, image_values=0, text_keys=0, text_values=0).prepare(pair, inputs)
    assert zero.generate(pair, inputs, max_new_tokens=3) == plain  # λ = 0: the released path decodes plainly


def test_save_load_and_refusals(pair, directions, inputs, tmp_path):
    path = directions.save(tmp_path / "d.safetensors")
    loaded = PTIDirections.load(path)
    assert loaded.digest() == directions.digest() and loaded.checkpoints == directions.checkpoints
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["names"] == list(pair.names) and meta["config"]["aggregation"] == "pca"
    control = organism.load_pair("control")
    with pytest.raises(PairMismatchError, match="rlvr") as info:
        PTI(loaded).prepare(control, inputs)
    assert "control" in str(info.value) and "not on" in str(info.value)
    with pytest.raises(ConfigError, match="safetensors"):
        directions.save(tmp_path / "d.pt")
    with pytest.raises(ConfigError, match="not found"):
        PTIDirections.load(tmp_path / "missing.safetensors")
    other = compute_directions(pair, calibration_items(2))
    other.save(tmp_path / "o.safetensors")
    path.with_suffix(".json").write_text((tmp_path / "o.json").read_text())
    with pytest.raises(ConfigError, match="digest"):
        PTIDirections.load(path)  # a sidecar of other tensors
    with pytest.raises(InputError, match="no"):
        PTI(directions).prepare(pair, pair.encode("how many red shapes ?"))
    for bad in ({"image_values": -1.0}, {"mode": "x"}, {"text_position": 0}, {"layers": (9,)}):
        with pytest.raises(ConfigError):
            PTI(directions, **bad)
    with pytest.raises(ConfigError):
        PTIConfig(text_keys=float("nan"))


def test_cli_directions_then_intervene_rlvr_and_pti_greedy(tmp_path, capsys):
    dirs = tmp_path / "pti.safetensors"
    common = ["--threads", "1"]
    assert main(["pti", "directions", "--n", "3", "--out", str(dirs), *common]) == 0
    assert main(["pti", "directions", "--n", "3", "--out", str(dirs), *common]) == 2  # no silent overwrite
    out = tmp_path / "run"
    argv = [
        "intervene",
        "--strategies",
        "rlvr,pti",
        "--pti-directions",
        str(dirs),
        "--items",
        "4",
        "--n",
        "0",
    ]
    assert main([*argv, "--out", str(out), *common]) == 0
    summary = (out / "summary.csv").read_text()
    assert "pti" in summary and "rlvr" in summary
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in records} == {"rlvr", "pti"} and len(records) == 8
    capsys.readouterr()
    # Directions of base/rlvr, used on base/control: refused in one line before any weight loads.
    foreign = tmp_path / "foreign"
    assert main([*argv, "--rlvr", "control", "--out", str(foreign), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "control" in err and "rlvr" in err and "not on" in err
    assert not foreign.exists()
    assert main(["intervene", "--strategies", "pti", "--out", str(foreign), *common]) == 2
    assert "--pti-directions" in capsys.readouterr().err
