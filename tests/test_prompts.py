"""Prompt presets: the registry, VLMEvalKit's question layout, encoding a sample, the checkpoint side file."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image

from lens import load_pair
from lens.datasets import Sample
from lens.errors import CheckpointError, ConfigError, InputError
from lens.inputs import ROLE_PROMPT, ROLE_TEMPLATE, ROLE_VISUAL
from lens.prompts import (
    EXTRACTORS,
    PRESET_FILE,
    PRESETS,
    PromptPreset,
    encode_sample,
    get_preset,
    layout_question,
    preset_names,
)


@dataclass(frozen=True)
class Item:
    """A dataset item as the readers give it (question, hint, options, images)."""

    id: str
    question: str
    hint: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    images: tuple = ()


MCQ = Item(
    "q1", "Which shape is red?", hint="Look at the left side.", options=(("A", "circle"), ("B", "square"))
)


def role_text(pair, inputs, role: str) -> str:
    return pair.tokenizer.decode(inputs.input_ids[0, inputs.positions(role)])


# -- registry ------------------------------------------------------------------------------------------


def test_registry_has_the_published_presets():
    assert {"plain", "mm-eureka", "vl-rethinker", "thinklite-vl", "openvlthinker"} <= set(preset_names())
    for preset in PRESETS.values():
        assert preset.extractor in EXTRACTORS and preset.source
        assert get_preset(preset.name) is preset and get_preset(preset) is preset
    assert get_preset("mm-eureka").extractor == "boxed"
    assert get_preset("openvlthinker").extractor == "answer_tag"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown prompt preset 'mm-eurka'; known: plain, mm-eureka"):
        get_preset("mm-eurka")


def test_preset_texts_are_the_cited_ones():
    """Digests of (system, user template), computed after checking each text equals its source
    (see the comments in lens/prompts.py); any edit to a text must be checked against the source again."""
    digests = {
        "plain": "4f1fb2eaa3656ad6807c494d5791f5035363b7e47f8223fcb357b51747c71aff",
        "mm-eureka": "246dac4c49d2974443390d5bdf249fb735ca8bf95eadf1c55f8b45a8c2effb67",
        "vl-rethinker": "2bc9807dcea601ed118623ad7a3d7bdcda7dc7bcc22341061ab9c445fec0ba14",
        "vl-rethinker-card": "6a1659c2bf5962f9ab6f917c30afc9fd98bcb18a23359c2dcb4cb364eddbd9c9",
        "thinklite-vl": "8175451cea524c06732e5b96f58bca71b8d2d09d6530cc48b1dcf82c6f598fe6",
        "openvlthinker": "4f1fb2eaa3656ad6807c494d5791f5035363b7e47f8223fcb357b51747c71aff",
    }
    for name, digest in digests.items():
        preset = PRESETS[name]
        text = (preset.system or "") + "\x00" + preset.user_template
        assert hashlib.sha256(text.encode()).hexdigest() == digest, name
    eureka = PRESETS["mm-eureka"].system
    assert eureka.startswith("Solve the question.") and eureka.endswith("end with </answer>.")
    assert "\\\\boxed{2}" in eureka  # two backslashes, as the source string gives them
    assert PRESETS["vl-rethinker"].system.count("\\boxed{}") == 1
    assert PRESETS["thinklite-vl"].system is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(user_template="no placeholder"), "exactly once"),
        (dict(user_template="{query} {query}"), "exactly once"),
        (dict(extractor="regex"), "unknown extractor 'regex'"),
        (dict(system="  "), "empty system prompt"),
    ],
)
def test_bad_presets_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptPreset(name="x", system=kwargs.pop("system", None), **kwargs)


# -- layout ------------------------------------------------------------------------------------------


def test_layout_is_vlmevalkits():
    assert layout_question("What is 2+2?") == "What is 2+2?"
    assert layout_question(MCQ.question, MCQ.hint, MCQ.options) == (
        "Hint: Look at the left side.\n"
        "Question: Which shape is red?\n"
        "Options:\nA. circle\nB. square\n"
        "Please select the correct answer from the options above. \n"
    )
    assert layout_question("Q?", options=(("A", "1"),)).startswith("Question: Q?\nOptions:\nA. 1\n")
    assert layout_question("Q?", hint="h") == "Hint: h\nQuestion: Q?\n"


def test_user_text_per_preset():
    query = layout_question(MCQ.question, MCQ.hint, MCQ.options)
    assert PRESETS["plain"].user_text(MCQ) == query
    assert PRESETS["mm-eureka"].user_text(MCQ) == query
    assert (
        PRESETS["thinklite-vl"].user_text(MCQ)
        == query + "You FIRST think" + PRESETS["thinklite-vl"].user_template.split("You FIRST think")[1]
    )
    card = PRESETS["vl-rethinker-card"].user_text(Item("q", "What is 2+2?"))
    assert card == "What is 2+2?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    # Samples without hint/options (today's JSONL Sample) and a blank hint give the bare question.
    assert PRESETS["plain"].user_text(Sample(id="s", question="How many?")) == "How many?"
    assert PRESETS["plain"].user_text(Item("q", "How many?", hint="  ")) == "How many?"
    with pytest.raises(InputError, match="sample 'q': the question is empty"):
        PRESETS["plain"].user_text(Item("q", " "))
    with pytest.raises(InputError, match=r"\(letter, text\) pairs"):
        PRESETS["plain"].user_text(Item("q", "Q?", options=(("A",),)))


# -- encoding a sample -----------------------------------------------------------------------------


def test_plain_preset_equals_encode(vl_pair, image):
    """With no system prompt and no options, a preset gives exactly ``pair.encode(question, images)``."""
    ours = encode_sample(vl_pair, Item("s", PROMPT, images=(image,)), "plain", response=RESPONSE)
    ref = vl_pair.encode(PROMPT, [image], response=RESPONSE)
    assert ours.roles == ref.roles
    for key, value in ref.model_inputs.items():
        assert torch.equal(ours.model_inputs[key], value), key


def test_preset_roles(vl_pair, image):
    inputs = encode_sample(vl_pair, MCQ.__class__(**{**MCQ.__dict__, "images": (image,)}), "thinklite-vl")
    preset = PRESETS["thinklite-vl"]
    assert role_text(vl_pair, inputs, ROLE_PROMPT) == preset.query(MCQ)
    # The fixed instruction after the question is template text, like the scaffolding.
    assert preset.user_template.replace("{query}", "") in role_text(vl_pair, inputs, ROLE_TEMPLATE)
    assert inputs.roles.count(ROLE_VISUAL) == 12


def test_system_prompt_override_and_drop(vl_pair, image):
    item = Item("s", PROMPT, images=(image,))
    with_system = encode_sample(vl_pair, item, "vl-rethinker")
    assert PRESETS["vl-rethinker"].system[:60] in role_text(vl_pair, with_system, ROLE_TEMPLATE)
    override = encode_sample(vl_pair, item, "vl-rethinker", system="Be brief.")
    assert "Be brief." in role_text(vl_pair, override, ROLE_TEMPLATE)
    assert "thoughtful" not in role_text(vl_pair, override, ROLE_TEMPLATE)
    dropped = encode_sample(vl_pair, item, "vl-rethinker", system="")
    assert torch.equal(dropped.input_ids, vl_pair.encode(PROMPT, [image]).input_ids)


def test_image_bytes_equal_paths(vl_pair, image, tmp_path):
    path = tmp_path / "img.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    from_path = encode_sample(vl_pair, Item("s", PROMPT, images=(path,)), "mm-eureka")
    from_bytes = encode_sample(vl_pair, Item("s", PROMPT, images=(buffer.getvalue(),)), "mm-eureka")
    for key, value in from_path.model_inputs.items():
        assert torch.equal(from_bytes.model_inputs[key], value), key
    with pytest.raises(InputError, match=r"sample .bad.: unreadable or corrupt image \(12 bytes\)"):
        encode_sample(vl_pair, Item("bad", PROMPT, images=(b"not an image",)), "plain")


def test_organism_pair_plain_preset_is_unchanged():
    """The default pair keeps its encoding (question before the image, no system prompt)."""
    from lens import organism

    pair = organism.load_pair()
    item = organism.heldout(1)[0]
    ours = encode_sample(pair, Item("o", item.question, images=(item.image,)))
    ref = pair.encode(item.question, [item.image])
    assert torch.equal(ours.input_ids, ref.input_ids) and ours.roles == ref.roles
    assert pair.prompt_preset is None


# -- the checkpoint side file ------------------------------------------------------------------------


@pytest.fixture
def side_dirs(vl_dirs, tmp_path):
    """Copies of the tiny VL checkpoints (without weights, so a load that gets that far fails)."""
    copies = []
    for src in vl_dirs:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        copies.append(dst)
    return copies


def write_side(folder, content) -> None:
    (folder / PRESET_FILE).write_text(content if isinstance(content, str) else json.dumps(content))


def test_side_file_names_the_pair_preset(vl_dirs, tmp_path):
    base, rlvr = (shutil.copytree(d, tmp_path / d.name) for d in vl_dirs)
    write_side(rlvr, {"prompt": "mm-eureka"})
    assert load_pair(base, rlvr).prompt_preset == "mm-eureka"
    write_side(base, {"prompt": "vl-rethinker"})
    with pytest.warns(UserWarning, match="different prompt presets.*using the rlvr one"):
        pair = load_pair(base, rlvr)
    assert pair.prompt_preset == "mm-eureka"
    (rlvr / PRESET_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair = load_pair(base, rlvr)
    assert pair.prompt_preset == "vl-rethinker"
    # encode_sample uses the pair's preset when none is given.
    item = Item("s", PROMPT, images=(random_image(56, 56),))
    assert torch.equal(
        encode_sample(pair, item).input_ids, encode_sample(pair, item, "vl-rethinker").input_ids
    )


@pytest.mark.parametrize(
    "content, error, match",
    [
        ("{not json", CheckpointError, "not valid JSON"),
        ({"prompt": 3}, CheckpointError, 'expected {"prompt": "<preset name>"}'),
        ({"prompt": "plain", "extra": 1}, CheckpointError, 'expected {"prompt"'),
        (["plain"], CheckpointError, 'expected {"prompt"'),
        ({"prompt": "mm-eurka"}, ConfigError, "unknown prompt preset 'mm-eurka'; known: plain"),
    ],
)
def test_bad_side_file_fails_before_weights_load(side_dirs, content, error, match):
    base, rlvr = side_dirs
    (rlvr / "model.safetensors").unlink()  # were weights read, the error would be about them
    write_side(rlvr, content)
    with pytest.raises(error, match=match) as info:
        load_pair(base, rlvr)
    assert PRESET_FILE in str(info.value)
