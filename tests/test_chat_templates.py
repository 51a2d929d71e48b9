"""Encoding with the real chat templates of public checkpoints (Qwen2.5, Qwen2.5-VL, Llama 3.1).

The project's own tiny template accepts anything; real ones do not: the Qwen2.5 text template
concatenates ``message.content`` as a string (list content raised a raw ``TypeError``), and the
Llama 3 templates ``trim`` the content (a list became its repr, so the prompt text was not found).
Each test checks the token ids against ``tokenizer.apply_chat_template`` on plain messages, and
the role map against the text each role should hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image

from lens import load_pair
from lens.errors import InputError
from lens.inputs import ROLE_PROMPT, ROLE_RESPONSE, ROLE_TEMPLATE, ROLE_VISUAL
from lens.loading import ModelPair
from lens.testing import save_checkpoint, tiny_causal_lm, tiny_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SYSTEM = "You are a careful tutor. Think step by step."
# VLMEvalKit's multiple-choice layout ends with a space and a newline, which Llama 3 trims.
MCQ_PROMPT = "Question: How many red shapes?\nOptions:\nA. 2\nB. 3\nPlease select the correct answer from the options above. \n"

LLAMA_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def llama_tokenizer(chat_template: str):
    """A byte-level BPE tokenizer with the Llama 3 special tokens (bos/eos as the real one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(LLAMA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(
        [PROMPT, RESPONSE, SYSTEM, MCQ_PROMPT, "Cutting Knowledge Date: December 2023"] * 4, trainer
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )
    tok.chat_template = chat_template
    return tok


def text_pair(root: Path, tok, family: str) -> ModelPair:
    base = save_checkpoint(tiny_causal_lm(tok, seed=0, family=family), tok, root / "base")
    rlvr = save_checkpoint(tiny_causal_lm(tok, seed=1, family=family), tok, root / "rlvr")
    return load_pair(base, rlvr)


@pytest.fixture(scope="module")
def qwen_text_pair(tmp_path_factory):
    return text_pair(
        tmp_path_factory.mktemp("qwen25"),
        tiny_tokenizer(chat_template=template("qwen2.5-7b-instruct")),
        "qwen2",
    )


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return text_pair(
        tmp_path_factory.mktemp("llama31"), llama_tokenizer(template("llama-3.1-8b-instruct")), "llama"
    )


def expected_ids(tok, messages, response: str | None = None) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if response is not None:
        text += response + tok.eos_token
    return tok(text, add_special_tokens=False)["input_ids"]


def role_text(pair: ModelPair, inputs, role: str) -> str:
    return pair.tokenizer.decode(inputs.input_ids[0, inputs.positions(role)])


@pytest.mark.parametrize("pair_name", ["qwen_text_pair", "llama_pair"])
def test_text_only_real_templates(pair_name, request):
    pair = request.getfixturevalue(pair_name)
    tok = pair.tokenizer
    assert tok.chat_template == template(
        "qwen2.5-7b-instruct" if pair_name == "qwen_text_pair" else "llama-3.1-8b-instruct"
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    inputs = pair.encode(PROMPT, response=RESPONSE, system=SYSTEM)
    assert inputs.input_ids[0].tolist() == expected_ids(tok, messages, RESPONSE)
    assert role_text(pair, inputs, ROLE_PROMPT) == PROMPT
    assert role_text(pair, inputs, ROLE_RESPONSE) == RESPONSE + tok.eos_token
    assert SYSTEM in role_text(pair, inputs, ROLE_TEMPLATE)
    assert ROLE_VISUAL not in inputs.roles
    # Without a system prompt the template's own default (if any) is template text.
    plain = pair.encode(PROMPT)
    assert plain.input_ids[0].tolist() == expected_ids(tok, [{"role": "user", "content": PROMPT}])
    assert role_text(pair, plain, ROLE_PROMPT) == PROMPT
    if pair_name == "qwen_text_pair":
        assert "You are Qwen, created by Alibaba Cloud." in role_text(pair, plain, ROLE_TEMPLATE)


def test_llama_trims_like_the_template(llama_pair):
    """Llama 3 ``trim``s message content: the encoded text must be what the template really renders."""
    tok = llama_pair.tokenizer
    inputs = llama_pair.encode(MCQ_PROMPT, system="  " + SYSTEM + "\n")
    messages = [{"role": "system", "content": "  " + SYSTEM + "\n"}, {"role": "user", "content": MCQ_PROMPT}]
    assert inputs.input_ids[0].tolist() == expected_ids(tok, messages)
    assert role_text(llama_pair, inputs, ROLE_PROMPT) == MCQ_PROMPT.strip()
    assert inputs.tokens[0] == "<|begin_of_text|>" and inputs.tokens.count("<|begin_of_text|>") == 1


def test_conversation_roles_real_template(qwen_text_pair):
    """Several turns: user and earlier assistant text are prompt, the final response is response."""
    tok = qwen_text_pair.tokenizer
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "How many red shapes?"},
        {"role": "assistant", "content": "There are 12."},
        {"role": "user", "content": "And blue ones?"},
    ]
    inputs = qwen_text_pair.encode(messages=messages, response=RESPONSE)
    assert inputs.input_ids[0].tolist() == expected_ids(tok, messages, RESPONSE)
    assert role_text(qwen_text_pair, inputs, ROLE_PROMPT) == "How many red shapes?There are 12.And blue ones?"
    assert inputs.response_start == inputs.roles.index(ROLE_RESPONSE)
    with pytest.raises(InputError, match="last message must be a user message"):
        qwen_text_pair.encode(messages=messages[:3])
    with pytest.raises(InputError, match="unknown role 'tool'"):
        qwen_text_pair.encode(messages=[{"role": "tool", "content": "x"}, messages[-1]])
    with pytest.raises(InputError, match="either prompt"):
        qwen_text_pair.encode(PROMPT, messages=messages)
    with pytest.raises(InputError, match=r"messages\[1\] \(user\) is empty"):
        qwen_text_pair.encode(messages=[messages[0], {"role": "user", "content": "  "}])


# -- Qwen2.5-VL: images, tensors equal to the stock processor ----------------------------------------


@pytest.fixture(scope="module")
def vl_real_pair(vl_pair):
    """The tiny VL models with the real Qwen2.5-VL chat template."""
    tok = tiny_tokenizer(chat_template=template("qwen2.5-vl-7b-instruct"))
    return ModelPair.from_models(vl_pair.base, vl_pair.rlvr, tok, vl_pair.image_processor)


def stock_processor(pair: ModelPair):
    from transformers import Qwen2_5_VLProcessor

    class Processor(Qwen2_5_VLProcessor):  # the stock class, buildable without torchvision
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Processor(image_processor=pair.image_processor, tokenizer=pair.tokenizer, video_processor=None)


def assert_equal_to_processor(pair: ModelPair, inputs, messages, images, response: str | None = None):
    tok = pair.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if response is not None:
        text += response + tok.eos_token
    expected = stock_processor(pair)(text=[text], images=images or None, return_tensors="pt")
    ours = inputs.model_inputs
    assert set(ours) == set(expected.keys())
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def test_qwen25_vl_real_template_with_system_and_image(vl_real_pair, image):
    inputs = vl_real_pair.encode(PROMPT, [image], response=RESPONSE, system=SYSTEM)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
    ]
    assert_equal_to_processor(vl_real_pair, inputs, messages, [image], RESPONSE)
    assert role_text(vl_real_pair, inputs, ROLE_PROMPT) == PROMPT
    assert SYSTEM in role_text(vl_real_pair, inputs, ROLE_TEMPLATE)
    assert "You are a helpful assistant." not in role_text(vl_real_pair, inputs, ROLE_TEMPLATE)
    assert inputs.roles.count(ROLE_VISUAL) == 12


def test_qwen25_vl_real_template_conversation_with_images_in_two_turns(vl_real_pair):
    first, second = random_image(56, 84, seed=3), random_image(84, 56, seed=4)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": first}, {"type": "text", "text": "Count the shapes."}],
        },
        {"role": "assistant", "content": "There are 3."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And here?"}, {"type": "image", "image": second}],
        },
    ]
    inputs = vl_real_pair.encode(messages=messages, response=RESPONSE)
    plain = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the shapes."}]},
        {"role": "assistant", "content": "There are 3."},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
    ]
    assert_equal_to_processor(vl_real_pair, inputs, plain, [first, second], RESPONSE)
    assert len(inputs.image_grids) == 2
    assert role_text(vl_real_pair, inputs, ROLE_PROMPT) == "Count the shapes.There are 3.And here?"


def test_qwen25_vl_real_template_text_only_question(vl_real_pair):
    inputs = vl_real_pair.encode(PROMPT)
    assert_equal_to_processor(vl_real_pair, inputs, [{"role": "user", "content": PROMPT}], [])
    assert "pixel_values" not in inputs.model_inputs
