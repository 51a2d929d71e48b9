"""Checkpoint layouts of real releases: a template only in ``chat_template.json``, and base/RLVR image
processors whose pixel budgets differ (a difference the small probe image cannot show)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image

from lens import load_pair
from lens.errors import CheckpointError, PairMismatchError
from lens.loading import check_image_processors, image_processor_settings
from lens.testing import (
    QWEN_VL_CHAT_TEMPLATE,
    save_checkpoint,
    tiny_image_processor,
    tiny_qwen25vl,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def json_template_dirs(tmp_path_factory, vl_pair):
    """The tiny VL pair saved as an older release: the chat template only in chat_template.json."""
    root = tmp_path_factory.mktemp("json_template")
    bare = tiny_tokenizer(chat_template=None)
    dirs = []
    for name, model in (("base", vl_pair.base), ("rlvr", vl_pair.rlvr)):
        folder = save_checkpoint(model, bare, root / name, vl_pair.image_processor)
        assert not (folder / "chat_template.jinja").exists()
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}))
        dirs.append(folder)
    return dirs


def test_chat_template_json_is_read(json_template_dirs, vl_pair, image):
    pair = load_pair(*json_template_dirs)
    assert pair.tokenizer.chat_template == QWEN_VL_CHAT_TEMPLATE
    inputs = pair.encode(PROMPT, [image], response=RESPONSE, system="Be brief.")
    ref = vl_pair.encode(PROMPT, [image], response=RESPONSE, system="Be brief.")
    assert inputs.roles == ref.roles
    for key, value in ref.model_inputs.items():
        assert torch.equal(inputs.model_inputs[key], value), key


@pytest.mark.parametrize(
    "content, match",
    [("{broken", "not a chat template file"), (json.dumps({"template": "x"}), 'expected {"chat_template"')],
)
def test_malformed_chat_template_json(json_template_dirs, tmp_path, content, match):
    rlvr = shutil.copytree(json_template_dirs[1], tmp_path / "rlvr")
    (rlvr / "chat_template.json").write_text(content)
    (rlvr / "model.safetensors").unlink()  # the error must come before any weights load
    with pytest.raises(CheckpointError, match=match):
        load_pair(json_template_dirs[0], rlvr)


# -- pixel budget -----------------------------------------------------------------------------------


def test_pixel_budget_mismatch_is_caught(tmp_path):
    """Processors that differ only in max pixels: the probe image (128x96) fits both budgets."""
    small, large = tiny_image_processor(max_side=112), tiny_image_processor(max_side=224)
    probe = random_image(96, 128)
    assert torch.equal(
        small(images=[probe], return_tensors="pt")["pixel_values"],
        large(images=[probe], return_tensors="pt")["pixel_values"],
    )
    differing = {
        k
        for k in image_processor_settings(small)
        if image_processor_settings(large)[k] != image_processor_settings(small)[k]
    }
    assert differing == {"size.longest_edge"}
    with pytest.raises(
        PairMismatchError, match=r"size\.longest_edge: base 12544, rlvr 50176.*1920x1080 image gives"
    ):
        check_image_processors(small, large)
    check_image_processors(small, tiny_image_processor(max_side=112))  # equal settings pass

    # Through load_pair, before any weights load.
    tok = tiny_tokenizer()
    model = tiny_qwen25vl(tok)
    base = save_checkpoint(model, tok, tmp_path / "base", small)
    rlvr = save_checkpoint(model, tok, tmp_path / "rlvr", large)
    (rlvr / "model.safetensors").unlink()
    with pytest.raises(
        PairMismatchError, match="image processors differ in their settings: size.longest_edge"
    ):
        load_pair(base, rlvr)


def test_legacy_min_max_pixels_keys_are_compared(tmp_path):
    """Hub configs of Qwen2.5-VL releases name the budget min_pixels/max_pixels."""
    from transformers import AutoImageProcessor

    def processor(max_pixels: int):
        folder = tmp_path / str(max_pixels)
        folder.mkdir()
        config = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": 3136,
            "max_pixels": max_pixels,
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(config))
        return AutoImageProcessor.from_pretrained(folder)

    with pytest.raises(PairMismatchError, match="12845056.*501760"):
        check_image_processors(processor(12845056), processor(501760))


def test_processor_choice_feeds_both_models_through_one_side_and_is_fingerprinted(tmp_path, capfd):
    """The released code feeds both models through one processor; --processor does the same, warns
    with the difference, and a resume with the other choice is refused (its visual tokens differ)."""
    import warnings

    from lens.cli import main
    from lens.fingerprint import describe_changes, pair_fingerprint

    small, large = tiny_image_processor(max_side=112), tiny_image_processor(max_side=224)
    tok = tiny_tokenizer()
    base = save_checkpoint(tiny_qwen25vl(tok, seed=0), tok, tmp_path / "base", small)
    rlvr = save_checkpoint(tiny_qwen25vl(tok, seed=1), tok, tmp_path / "rlvr", large)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_base = load_pair(base, rlvr, processor="base")
    assert any("both models get the base checkpoint's" in str(w.message) for w in caught)
    on_rlvr = load_pair(base, rlvr, processor="rlvr")
    assert on_base.image_processor.size == small.size and on_rlvr.image_processor.size == large.size
    changes = describe_changes(pair_fingerprint(on_rlvr), pair_fingerprint(on_base))
    assert changes and changes[0].startswith("image processor changed: size")
    image = random_image(200, 200)
    assert on_base.encode(PROMPT, [image]).n_tokens < on_rlvr.encode(PROMPT, [image]).n_tokens

    data = tmp_path / "data.jsonl"
    image.save(tmp_path / "img.png")
    data.write_text(
        json.dumps({"id": "a", "question": PROMPT, "image": "img.png", "response": RESPONSE}) + "\n"
    )
    argv = ["drift", "--base", str(base), "--rlvr", str(rlvr), "--data", str(data), "--threads", "1"]
    out = str(tmp_path / "out")
    assert main([*argv, "--out", out]) == 2  # refused: the processors differ
    assert "--processor rlvr" in capfd.readouterr().err
    assert main([*argv, "--processor", "rlvr", "--out", out]) == 0
    capfd.readouterr()
    assert main([*argv, "--processor", "base", "--out", out]) == 2
    assert "image processor changed" in capfd.readouterr().err
