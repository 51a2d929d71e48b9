"""The DeepEyes-style agent loop on the built-in organism, with a scripted tool policy.

The organism's word-level vocabulary cannot write a tool call, so the tool calls are teacher-forced
(``script=``): the model still runs at every call, with the intervention, and the crops are real
crops of the item's image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from intervention_fixtures import same_weights, weights

from lens import organism
from lens.agent import (
    DEEPEYES_USER_PROMPT,
    AgentConfig,
    ToolCallError,
    agent_decoding,
    crop_box,
    parse_tool_call,
    run_agent,
)
from lens.decoding import DecodingConfig
from lens.errors import ConfigError, InputError
from lens.inputs import ImagePart, TextPart, Turn, build_inputs
from lens.interventions import ActivationReplay, Baseline, HardInjection, hook_count
from lens.masks import RELEASED_THRESHOLDS
from lens.testing import tiny_tokenizer

ORGANISM_LAYERS = 4  # the organism is 4 blocks deep; the released swap's layers 0..6 are cut to 0..3


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return organism.load_pair()


@pytest.fixture(scope="module")
def item():
    return organism.heldout(1)[0]


def released_swap(**overrides) -> HardInjection:
    return HardInjection.released_agent(
        layers=range(ORGANISM_LAYERS), thresholds=RELEASED_THRESHOLDS[:ORGANISM_LAYERS], **overrides
    )


def zoom(bbox, name: str = "image_zoom_in_tool") -> str:
    return (
        "<think> look closer </think> <tool_call>"
        + json.dumps({"name": name, "arguments": {"bbox_2d": bbox}})
        + "</tool_call>"
    )


CONFIG = AgentConfig(max_turns=4, answer="organism")


class CheckedSwap(HardInjection):
    """The released swap, counting its calls and checking, at every prefill, that the RLVR block
    input at the selected positions is the base's (a hook registered after the swap's own)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**released_swap(**kwargs).config.__dict__})
        self.prepared = 0
        self.checked_prefills = 0

    def prepare(self, pair, inputs):
        self.prepared += 1
        return super().prepare(pair, inputs)

    def _install(self, model, adapter, states, batch, copies):
        handles = super()._install(model, adapter, states, batch, copies)
        plan = self.plan
        for layer, positions in plan.positions.items():

            def check(module, args, kwargs, layer=layer, positions=positions):
                hidden = args[0] if args else kwargs["hidden_states"]
                if hidden.shape[1] > 1:
                    assert torch.equal(hidden[0, positions], plan.values[layer])
                    self.checked_prefills += 1

            handles.append(adapter.layers(model)[layer].register_forward_pre_hook(check, with_kwargs=True))
        return handles


# -- the loop on the organism --------------------------------------------------------------------


def test_crops_are_real_crops_and_every_call_encodes_the_whole_conversation(pair, item):
    boxes = ([0, 0, 32, 32], [16, 8, 64, 48])
    run = run_agent(
        pair, Baseline(), item.question, item.image, config=CONFIG, script=[zoom(b) for b in boxes]
    )
    assert [t.status for t in run.turns[:2]] == ["tool", "tool"]
    assert run.n_calls == 3 and run.n_tool_calls == 2

    expected = [Turn("user", (TextPart(item.question), ImagePart(item.image)))]  # organism: question first
    crops = []
    for k, turn in enumerate(run.turns):
        # The call saw the whole conversation so far, encoded from scratch.
        want = build_inputs(
            pair.tokenizer,
            pair.adapter,
            pair.config,
            messages=expected,
            image_processor=pair.image_processor,
            device=pair.device,
        )
        got = turn.inputs
        assert got.model_inputs.keys() == want.model_inputs.keys()
        for key, value in want.model_inputs.items():
            assert torch.equal(got.model_inputs[key], value), key
        assert got.roles == want.roles and got.tokens == want.tokens
        # 64 px image: 16 tokens; 32x32 crop: 4 more; 48x40 crop: 6 more (16 px per merged token).
        assert got.roles.count("visual") == (16, 20, 26)[k]
        if turn.status != "tool":
            break
        crop = item.image.crop(tuple(boxes[k]))
        assert turn.box == tuple(boxes[k])
        assert np.array_equal(np.asarray(turn.crop), np.asarray(crop))
        crops.append(crop)
        expected += [
            Turn("assistant", (TextPart(turn.reply),)),
            Turn(
                "user",
                (
                    TextPart("<tool_response>", "template"),
                    ImagePart(crop),
                    TextPart(DEEPEYES_USER_PROMPT, "template"),
                    TextPart("</tool_response>", "template"),
                ),
            ),
        ]
    # The crop's own pixels are the last image the last call received.
    last = run.turns[-1].inputs.model_inputs["pixel_values"]
    own = pair.image_processor(images=[crops[-1]], return_tensors="pt")["pixel_values"]
    assert torch.equal(last[-own.shape[0] :], own.to(last.device))
    # The model answered unscripted at the third call, and the run ended there.
    assert not run.turns[2].scripted and run.turns[2].reply == run.turns[2].generated
    assert run.stop == "answer" and run.answer == run.turns[2].answer is not None
    assert organism.verify(run.turns[2].reply, run.answer)  # the extractor read the reply's number


def test_intervention_is_applied_at_every_call_over_every_turn(pair, item):
    saved = weights(pair.rlvr)
    swap = CheckedSwap()
    run = run_agent(
        pair,
        swap,
        item.question,
        item.image,
        config=CONFIG,
        script=[zoom([0, 0, 32, 32]), zoom([0, 32, 32, 64])],
    )
    assert run.n_calls == 3 and swap.prepared == 3
    n_edited = [len(t.detail.positions) for t in run.turns]
    assert swap.checked_prefills == sum(n_edited) and all(n > 0 for n in n_edited)
    first_len = run.turns[0].n_tokens
    for turn in run.turns:
        plan = turn.detail
        # scope="all": every position of every turn is a candidate ...
        assert torch.equal(plan.candidates, torch.arange(turn.n_tokens))
        assert turn.setting == swap.setting() and "scope=all" in turn.setting
        # ... and each call's decode is the swap prepared afresh on that whole conversation.
        fresh = released_swap().prepare(pair, turn.inputs)
        assert fresh.generate(pair, turn.inputs, run_decoding(pair)).texts[0] == turn.generated
    # ... and positions of later turns are swapped too (the released mask is not the first turn's).
    assert any(int(pos.max()) >= first_len for pos in run.turns[-1].detail.positions.values())
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved)


def run_decoding(pair):
    return agent_decoding(pair, CONFIG)


def test_visual_scope_restricts_the_swap_to_every_image_of_every_turn(pair, item):
    run = run_agent(
        pair,
        released_swap(scope="visual"),
        item.question,
        item.image,
        config=CONFIG,
        script=[zoom([8, 8, 40, 40])],
    )
    for turn in run.turns:
        assert torch.equal(turn.detail.candidates, turn.inputs.visual_positions)
    assert run.turns[-1].detail.candidates.numel() == 16 + 4  # the image and the crop


def test_activation_replay_runs_at_every_call_on_every_image(pair, item):
    replay = ActivationReplay(layers=range(2), rule="quantile", quantile=0.3, steps=3)
    run = run_agent(pair, replay, item.question, item.image, config=CONFIG, script=[zoom([0, 0, 32, 32])] * 2)
    assert run.n_calls == 3 and run.stop == "answer"
    # One offset per visual token of the conversation at that call: the image, then each crop.
    assert [t.detail.n_visual for t in run.turns] == [16, 20, 24]
    assert [tuple(t.detail.offsets.shape[:1]) for t in run.turns] == [(16,), (20,), (24,)]
    assert all(t.detail.loss_changed for t in run.turns)
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0


def test_hooks_removed_and_weights_unchanged_when_the_tool_or_a_call_raises(pair, item):
    saved_rlvr, saved_base = weights(pair.rlvr), weights(pair.base)

    def broken_tool(image, box):
        raise RuntimeError("tool broke")

    with pytest.raises(RuntimeError, match="tool broke"):
        run_agent(
            pair,
            released_swap(),
            item.question,
            item.image,
            config=CONFIG,
            script=[zoom([0, 0, 32, 32])],
            tool=broken_tool,
        )
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0

    class FailsAtSecondCall(HardInjection):
        calls = 0

        def _install(self, model, adapter, states, batch, copies):
            handles = super()._install(model, adapter, states, batch, copies)
            FailsAtSecondCall.calls += 1
            if FailsAtSecondCall.calls == 2:

                def boom(module, args):
                    raise RuntimeError("inside the second call")

                handles.append(adapter.layers(model)[1].register_forward_pre_hook(boom))
            return handles

    swap = FailsAtSecondCall(**released_swap().config.__dict__)
    with pytest.raises(RuntimeError, match="second call"):
        run_agent(pair, swap, item.question, item.image, config=CONFIG, script=[zoom([0, 0, 32, 32])])
    assert FailsAtSecondCall.calls == 2
    assert hook_count(pair.rlvr) == 0 and hook_count(pair.base) == 0
    assert same_weights(pair.rlvr, saved_rlvr) and same_weights(pair.base, saved_base)


@pytest.mark.parametrize(
    "reply, message",
    [
        (zoom([0, 0, 32]), "x1, y1, x2, y2"),
        (zoom(["0", "0", "32", "32"]), "finite numbers"),
        (zoom([0, 0, 65, 32]), "outside"),
        (zoom([10, 10, 10, 30]), "zero area"),
        (
            '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 32, 32]</tool_call>',
            "JSON",
        ),
        (zoom([0, 0, 32, 32], name="image_rotate_tool"), "unknown tool"),
    ],
    ids=["arity", "strings", "outside", "zero-area", "not-json", "other-tool"],
)
def test_malformed_call_is_a_failed_turn_and_the_model_goes_on(pair, item, reply, message):
    run = run_agent(pair, Baseline(), item.question, item.image, config=CONFIG, script=[reply])
    failed = run.turns[0]
    assert failed.status == "tool_error" and message in failed.error and failed.crop is None
    assert run.n_failed == 1 and run.n_calls == 2  # the model was asked again, and answered
    error_turn = run.messages[2]
    assert error_turn.role == "user" and error_turn.text == f"Error: {failed.error}"
    assert run.turns[1].inputs.n_tokens > failed.n_tokens  # the second call saw the reply and the error


def test_failed_call_can_stop_the_run_and_boxes_can_be_clipped(pair, item):
    stop = AgentConfig(max_turns=4, on_tool_error="stop")
    run = run_agent(pair, Baseline(), item.question, item.image, config=stop, script=[zoom([-4, 0, 32, 32])])
    assert run.stop == "tool_error" and run.n_calls == 1 and run.answer is None
    clip = AgentConfig(max_turns=2, clip_bbox=True, answer="organism")
    run = run_agent(
        pair, Baseline(), item.question, item.image, config=clip, script=[zoom([-4, 40, 32.5, 80])]
    )
    assert run.turns[0].box == (0, 40, 33, 64)
    assert np.array_equal(np.asarray(run.turns[0].crop), np.asarray(item.image.crop((0, 40, 33, 64))))


def test_turn_limit_is_respected(pair, item):
    config = AgentConfig(max_turns=3)
    script = [zoom([0, 0, 32, 32])] * 5
    swap = CheckedSwap()
    run = run_agent(pair, swap, item.question, item.image, config=config, script=script)
    assert run.n_calls == 3 == swap.prepared and run.stop == "turn_limit"
    assert [t.status for t in run.turns] == ["tool", "tool", "turn_limit"]
    assert run.turns[-1].crop is None  # the last call's tool request is not executed
    assert sum(any(isinstance(p, ImagePart) for p in m.parts) for m in run.messages) == 3


def test_answer_tag_and_no_tool_call_end_the_run(pair, item):
    run = run_agent(
        pair, Baseline(), item.question, item.image, script=["<think> 3 </think> <answer> 3 </answer>"]
    )
    assert run.stop == "answer" and run.answer == "3" and run.n_calls == 1
    # A complete answer wins over a tool call in the same reply (the released loop checks it first).
    run = run_agent(
        pair, Baseline(), item.question, item.image, script=[zoom([0, 0, 8, 8]) + "<answer>2</answer>"]
    )
    assert run.stop == "answer" and run.answer == "2"
    run = run_agent(pair, Baseline(), item.question, item.image, script=["not sure"])
    assert run.stop == "no_tool_call" and run.answer is None and run.turns[0].status == "no_tool_call"
    record = json.loads(json.dumps(run.to_dict()))
    assert record["stop"] == "no_tool_call" and record["turns"][0]["reply"] == "not sure"


def test_bad_input_is_refused_before_any_model_call(pair, item):
    swap = CheckedSwap()
    with pytest.raises(InputError, match="image"):
        run_agent(pair, swap, item.question, b"not an image")
    with pytest.raises(InputError, match="prompt is empty"):
        run_agent(pair, swap, " ", item.image)
    with pytest.raises(ConfigError, match="script"):
        run_agent(pair, swap, item.question, item.image, script="answer 3")
    assert swap.prepared == 0
    for bad in (
        dict(max_turns=0),
        dict(on_tool_error="ignore"),
        dict(answer="boxed"),
        dict(max_new_tokens=0),
    ):
        with pytest.raises(ConfigError):
            AgentConfig(**bad)


# -- pieces without a model ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "no bbox_2d"),
        ({"bbox_2d": "0 0 8 8"}, "x1, y1, x2, y2"),
        ({"bbox_2d": [0, 0, 8, 8, 8]}, "x1, y1, x2, y2"),
        ({"bbox_2d": [0, 0, True, 8]}, "finite numbers"),
        ({"bbox_2d": [0, 0, float("nan"), 8]}, "finite numbers"),
        ({"bbox_2d": [0, 0, None, 8]}, "finite numbers"),
        ({"bbox_2d": [-1, 0, 8, 8]}, "outside"),
        ({"bbox_2d": [0, 0, 8, 65]}, "outside"),
        ({"bbox_2d": [20, 0, 10, 8]}, "zero area"),
        ({"bbox_2d": [0, 0, 64, 0.2]}, "aspect ratio"),  # 64 x 1 px with max_aspect_ratio 50
    ],
)
def test_crop_box_refuses_malformed_boxes(arguments, message):
    with pytest.raises(ToolCallError, match=message):
        crop_box(arguments, (64, 64), AgentConfig(max_aspect_ratio=50))


def test_crop_box_and_parse_tool_call():
    assert crop_box({"bbox_2d": [1.5, 2, 10.2, 64]}, (64, 64), AgentConfig()) == (1, 2, 11, 64)
    # Clipped (DeepEyes' environment), a box wholly outside is still refused.
    assert crop_box({"bbox_2d": [-3, -3, 70, 9]}, (64, 64), AgentConfig(clip_bbox=True)) == (0, 0, 64, 9)
    with pytest.raises(ToolCallError, match="zero area"):
        crop_box({"bbox_2d": [70, 0, 80, 9]}, (64, 64), AgentConfig(clip_bbox=True))
    call = parse_tool_call(
        'a <tool_call>\n{"name": "t", "arguments": {"bbox_2d": [1, 2, 3, 4]}}\n</tool_call> b'
    )
    assert call.name == "t" and call.arguments == {"bbox_2d": [1, 2, 3, 4]}
    assert parse_tool_call("no call here") is None
    # An unclosed call (the budget ran out) is read to the end of the reply.
    assert parse_tool_call('<tool_call>{"name": "t", "arguments": {}}').name == "t"
    for bad in ('<tool_call>["t"]</tool_call>', '<tool_call>{"name": "t", "arguments": 3}</tool_call>'):
        with pytest.raises(ToolCallError):
            parse_tool_call(bad)


def test_replies_end_at_the_tool_call_as_an_end_token_or_a_stop_string():
    base = DecodingConfig(max_new_tokens=16, eos_token_ids=(2,), pad_token_id=0)
    tok = tiny_tokenizer()
    plain = agent_decoding(SimpleNamespace(tokenizer=tok), AgentConfig(max_new_tokens=5), base)
    assert (
        plain.stop_strings == ("</tool_call>",) and plain.eos_token_ids == (2,) and plain.max_new_tokens == 5
    )
    tok.add_tokens(["</tool_call>"])  # as Qwen2.5's tokenizer has it
    token = agent_decoding(SimpleNamespace(tokenizer=tok), AgentConfig(), base)
    assert token.eos_token_ids == (2, tok.convert_tokens_to_ids("</tool_call>")) and not token.stop_strings


def test_released_agent_swap_settings():
    swap = HardInjection.released_agent()
    c = swap.config
    assert c.layers == tuple(range(7)) and c.thresholds == RELEASED_THRESHOLDS
    assert (c.rule, c.select, c.scope, c.depth, c.base_below_rlvr) == (
        "fixed",
        "low",
        "all",
        "released",
        True,
    )
    assert HardInjection.released_agent(scope="visual").config.scope == "visual"
    assert HardInjection().config.scope == "visual"  # the plain default is unchanged


def test_readme_agent_example_runs_as_written(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "run_agent(pair, swap" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip()
    comment = next(line for line in example.splitlines() if line.startswith("print(run.stop"))
    assert printed == comment.split("# ", 1)[1]
