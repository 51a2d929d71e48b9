"""Planted checkpoints (weight edits) equal the hook plants they stand for, and refuse what they cannot do."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image

from lens import load_pair, organism
from lens.cli import main
from lens.controls import plant
from lens.errors import CheckpointError, ConfigError
from lens.planted_checkpoint import WeightPlant, apply_weight_plant, check_weight_plant, plant_checkpoint
from lens.testing import save_checkpoint
from lens.testing.internvl import tiny_internvl, tiny_internvl_image_processor, tiny_internvl_tokenizer
from lens.testing.qwen3_vl import tiny_qwen3vl, tiny_qwen3vl_image_processor, tiny_qwen3vl_tokenizer


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return organism.load_pair()


@pytest.fixture(scope="module")
def item_inputs(pair):
    item = organism.heldout(1)[0]
    return pair.encode(item.question, [item.image], response="3")


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs.model_inputs).logits[0].double()


def _hook_logits(pair, weight_plant: WeightPlant, inputs) -> torch.Tensor:
    hook = weight_plant.hook_equivalent()
    with plant(pair, hook.where, hook.size, hook.layer, hook.fraction, hook.seed, hook.relative) as twin:
        return _logits(twin.rlvr, inputs)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["visual", "text"])
def test_organism_weight_plant_equals_its_hook_plant(pair, item_inputs, tmp_path, where):
    base_file = organism.model_dir("base") / "model.safetensors"
    before = _sha(base_file)
    edit = WeightPlant(where=where, size=2.0, seed=3)
    out = plant_checkpoint(organism.model_dir("base"), tmp_path / "planted", edit)
    assert _sha(base_file) == before  # the base checkpoint is read, never written
    record = json.loads((out / "planted.json").read_text())
    assert record["where"] == where and record["size"] == 2.0 and record["hook_equivalent"]["fraction"] == 1.0

    planted = organism.load_pair(rlvr=str(out))  # the organism's prompt layout, a folder twin
    weight = _logits(planted.rlvr, item_inputs)
    hook = _hook_logits(pair, edit, item_inputs)
    base = _logits(pair.base, item_inputs)
    # The edit moves the logits by far more than the rounding between the two ways of adding it.
    assert (weight - base).abs().max() > 0.05
    assert (weight - hook).abs().max() < 1e-4
    # Tokens before the first edited position see nothing: the question precedes the image.
    first = int(item_inputs.visual_positions[0]) if where == "visual" else 0
    if first > 0:
        assert torch.equal(weight[:first], base[:first])


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_visual_weight_plant_equals_hook_plant_on_other_families(tmp_path, family):
    if family == "qwen3_vl":
        tok, ip = tiny_qwen3vl_tokenizer(), tiny_qwen3vl_image_processor()
        model = tiny_qwen3vl(tok, seed=0)
    else:
        tok, ip = tiny_internvl_tokenizer(), tiny_internvl_image_processor()
        model = tiny_internvl(tok, seed=0)
    base_dir = save_checkpoint(model, tok, tmp_path / "base", ip)
    edit = WeightPlant(where="visual", size=1.5, seed=1)
    out = plant_checkpoint(base_dir, tmp_path / "planted", edit)
    hooked = load_pair(base_dir, base_dir)
    planted = load_pair(base_dir, out)
    inputs = hooked.encode(PROMPT, [random_image(56, 56, seed=1)], response=RESPONSE)
    weight = _logits(planted.rlvr, inputs)
    hook = _hook_logits(hooked, edit, inputs)
    assert (weight - _logits(hooked.base, inputs)).abs().max() > 1e-3
    assert (weight - hook).abs().max() < 1e-4


def test_bad_plants_are_refused_before_loading(pair, tmp_path):
    with pytest.raises(ConfigError, match="lens.controls.plant"):
        WeightPlant(where="low")
    for size in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite and >= 0"):
            WeightPlant(size=size)
    tied = pair.base.config.__class__.from_dict(pair.base.config.to_dict())
    tied.tie_word_embeddings = True
    tied.text_config.tie_word_embeddings = True
    with pytest.raises(ConfigError, match="tied embeddings"):
        check_weight_plant(tied, WeightPlant(where="text"))
    base = organism.model_dir("base")
    with pytest.raises(ConfigError, match="is the base checkpoint itself"):
        plant_checkpoint(base, base, WeightPlant())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        plant_checkpoint(base, tmp_path / "file", WeightPlant())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("previous result")
    with pytest.raises(ConfigError, match="not empty"):
        plant_checkpoint(base, tmp_path / "full", WeightPlant())
    assert (tmp_path / "full" / "keep.txt").read_text() == "previous result"
    with pytest.raises(CheckpointError):
        plant_checkpoint(tmp_path / "missing", tmp_path / "out", WeightPlant())
    assert not (tmp_path / "out").exists()


def test_families_without_a_projector_bias_refuse_a_visual_plant():
    from lens.testing.gemma3 import tiny_gemma3, tiny_gemma3_tokenizer

    model = tiny_gemma3(tiny_gemma3_tokenizer())  # its projector is a bias-free matrix
    with pytest.raises(ConfigError, match="no visual weight plant"):
        apply_weight_plant(model, WeightPlant(where="visual"))


def test_cli_plants_then_drift_reads_the_folder_twin(tmp_path, capsys):
    out = tmp_path / "pv"
    assert main(["plant", "--where", "visual", "--size", "1", "--out", str(out)]) == 0
    assert f"--rlvr {out}" in capsys.readouterr().out
    assert (
        main(["drift", "--rlvr", str(out), "--items", "2", "--layers", "0", "--out", str(tmp_path / "d")])
        == 0
    )
    assert (tmp_path / "d" / "drift_buckets.csv").is_file()

    for args, message in [
        (["--where", "text", "--size", "-2"], "finite and >= 0"),
        (["--where", "visual", "--size", "1"], "not empty"),  # the folder written above
    ]:
        capsys.readouterr()
        assert main(["plant", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):  # argparse's own refusal: exit 2, usage on stderr
        main(["plant", "--where", "low", "--size", "1", "--out", str(out)])
    assert json.loads((out / "planted.json").read_text())["where"] == "visual"  # untouched


def test_visual_rms_is_the_block0_input_rms_at_visual_tokens(pair):
    from lens.planted_checkpoint import visual_rms

    items = organism.heldout(2)
    expected = []
    for item in items:
        inputs = pair.encode(item.question, [item.image])
        with torch.no_grad():
            hidden = pair.base(**inputs.model_inputs, output_hidden_states=True).hidden_states[0][0]
        expected.append(hidden[inputs.visual_positions].double().pow(2).mean().sqrt().item())
    assert visual_rms(pair, items) == pytest.approx(sum(expected) / 2, rel=1e-6)
