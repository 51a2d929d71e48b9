"""``lens agent``: the zoom-in agent loop over a dataset, from the command line, on the organism.

The organism cannot write a tool call, so its own runs are one-turn runs; ``--script`` teacher-forces
tool calls (the model still runs at every call) to drive the multi-turn path: real crops, failed
turns, resume and batching.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lens import organism
from lens.agent import AgentConfig, AgentEpisode, assistant_turn, run_agent, run_agents, tool_response_turn
from lens.cli import main
from lens.inputs import prompt_turns
from lens.interventions import Baseline
from lens.records import iter_records
from lens.scoring import score

ZOOM = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 32, 32]}}</tool_call>'
OUTSIDE = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 99, 32]}}</tool_call>'
#: Bookkeeping columns that depend on timing or batching, not on the results.
TIMING = ["seconds", "batch"]


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return organism.load_pair()


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(["agent", "--threads", "1", *argv])
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    return code, out, err


def script(tmp_path: Path, *replies: str) -> str:
    path = tmp_path / f"script{len(list(tmp_path.glob('script*')))}.json"
    path.write_text(json.dumps(list(replies)))
    return str(path)


def records(out: Path) -> list[dict]:
    return list(iter_records(out / "records.jsonl"))


def per_item(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "per_item.csv").drop(columns=TIMING)


def test_organism_runs_are_one_turn_runs_scored_and_summarised(tmp_path, capfd):
    out = tmp_path / "run"
    code, printed, _ = run_cli(
        ["--items", "3", "--strategies", "rlvr,base,hard-agent", "--out", str(out)], capfd
    )
    assert code == 0 and "accuracy [95% CI]" in printed and "hard-agent" in printed
    found = records(out)
    assert len(found) == 9 and len({r["sample_id"] for r in found}) == 9
    items = {s.id: s for s in organism.heldout(3)}
    for record in found:
        (turn,) = record["turns"]  # the organism's vocabulary cannot write a tool call
        assert record["n_calls"] == 1 and record["n_tool_calls"] == record["n_failed"] == 0
        assert turn["status"] == record["stop"] and turn["reply"] == turn["generated"] == record["response"]
        assert record["n_generated"] == turn["n_generated"] >= 1
        assert record["correct"] == int(score(record["response"], items[record["item"]]).correct)
    # The released swap (layers 0..3 on the 4-block organism) is a different setting from the plain swap.
    assert {r["setting"] for r in found if r["strategy"] == "hard-agent"} == {
        "hard-low[fixed,layers=0-3,scope=all,depth=released]"
    }
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    table = per_item(out)
    for strategy, group in table.groupby("strategy"):
        assert summary.loc[strategy, "accuracy"] == pytest.approx(group["correct"].mean())
        assert (
            summary.loc[strategy, "ci_low"]
            <= summary.loc[strategy, "accuracy"]
            <= summary.loc[strategy, "ci_high"]
        )
        assert summary.loc[strategy, "mean_calls"] == 1 and summary.loc[strategy, "failed_total"] == 0
    assert "delta_vs_rlvr" in summary and pd.isna(summary.loc["rlvr", "delta_vs_rlvr"])
    assert len(pd.read_csv(out / "turns.csv")) == 9


def test_scripted_zoom_gives_two_turns_with_the_real_crop(tmp_path, capfd, pair):
    out = tmp_path / "run"
    argv = ["--items", "2", "--strategies", "rlvr,hard-agent", "--script", script(tmp_path, ZOOM)]
    code, _, _ = run_cli([*argv, "--out", str(out)], capfd)
    assert code == 0
    items = {s.id: s for s in organism.heldout(2)}
    for record in records(out):
        first, second = record["turns"]
        assert first["status"] == "tool" and first["scripted"] and first["box"] == [0, 0, 32, 32]
        assert not second["scripted"] and second["status"] == record["stop"] == "answer"
        assert record["n_tool_calls"] == 1 and record["agent_answer"] == second["answer"] is not None
        # The second call saw the question, the image, the zoom reply and the crop of the image.
        item = items[record["item"]]
        conversation = list(prompt_turns(item.question, [item.image], None, pair.image_first))
        conversation += [
            assistant_turn(ZOOM),
            tool_response_turn(item.image.crop((0, 0, 32, 32)), AgentConfig(tool_prompt="")),
        ]
        want = pair.encode(messages=conversation)
        assert second["n_tokens"] == want.n_tokens > first["n_tokens"]
        assert want.roles.count("visual") == 16 + 4  # the 64 px image and the 32 px crop
    # The baseline's records equal the Python API's run (which test_agent.py checks pixel by pixel).
    item = organism.heldout(1)[0]
    api = run_agent(
        pair,
        Baseline(),
        item.question,
        item.image,
        script=[ZOOM],
        config=AgentConfig(tool_prompt="", answer="organism"),
    )
    mine = next(r for r in records(out) if r["sample_id"] == f"rlvr/{item.id}")
    assert mine["turns"] == api.to_dict()["turns"] and mine["stop"] == api.stop
    turns = pd.read_csv(out / "turns.csv")
    assert list(turns["status"]) == ["tool", "answer"] * 4 and (turns["box"].dropna() == "0,0,32,32").all()


def test_malformed_box_is_a_failed_turn_not_a_crash(tmp_path, capfd):
    out = tmp_path / "run"
    bad = script(
        tmp_path,
        OUTSIDE,
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0</tool_call>',
    )
    code, printed, _ = run_cli(
        ["--items", "2", "--strategies", "rlvr", "--script", bad, "--out", str(out)], capfd
    )
    assert code == 0
    for record in records(out):
        outside, not_json, third = record["turns"]
        assert outside["status"] == not_json["status"] == "tool_error"
        assert "outside the 64x64 image" in outside["error"] and "not valid JSON" in not_json["error"]
        assert third["status"] == "answer" and record["n_failed"] == 2 and record["n_tool_calls"] == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "failed_total"] == 4 and summary.loc[0, "mean_failed"] == 2
    # --on-tool-error stop ends the run at the failed call.
    stop = tmp_path / "stop"
    code, _, _ = run_cli(
        [
            "--items",
            "2",
            "--strategies",
            "rlvr",
            "--script",
            bad,
            "--on-tool-error",
            "stop",
            "--out",
            str(stop),
        ],
        capfd,
    )
    assert code == 0
    assert all(r["stop"] == "tool_error" and r["n_calls"] == 1 for r in records(stop))
    # --clip-bbox clips the box first: the call succeeds.
    clip = tmp_path / "clip"
    code, _, _ = run_cli(
        [
            "--items",
            "1",
            "--strategies",
            "rlvr",
            "--script",
            script(tmp_path, OUTSIDE),
            "--clip-bbox",
            "--out",
            str(clip),
        ],
        capfd,
    )
    assert code == 0 and records(clip)[0]["turns"][0]["box"] == [0, 0, 64, 32]


def test_interrupted_run_resumes_to_the_same_table_and_refuses_changed_settings(tmp_path, capfd, monkeypatch):
    import analyses.agent

    argv = ["--items", "3", "--strategies", "rlvr,hard-agent", "--script", script(tmp_path, ZOOM)]
    whole = tmp_path / "whole"
    assert run_cli([*argv, "--out", str(whole)], capfd)[0] == 0

    made = []
    real = analyses.agent.agent_record

    def interrupt_after_four(*args, **kwargs):
        if len(made) == 4:
            raise KeyboardInterrupt
        made.append(args[1].id)
        return real(*args, **kwargs)

    monkeypatch.setattr(analyses.agent, "agent_record", interrupt_after_four)
    part = tmp_path / "part"
    code, _, err = run_cli([*argv, "--out", str(part)], capfd)
    assert code == 130 and "run the same command again to resume" in err
    assert len(records(part)) == 4 and not (part / "per_item.csv").exists()

    made.clear()
    monkeypatch.setattr(analyses.agent, "agent_record", real)
    counted = []
    monkeypatch.setattr(
        analyses.agent, "agent_record", lambda *a, **k: counted.append(a[1].id) or real(*a, **k)
    )
    assert run_cli([*argv, "--out", str(part)], capfd)[0] == 0
    assert len(counted) == 2  # only the runs the interrupted run had not finished
    keys = [r["sample_id"] for r in records(part)]
    assert len(keys) == len(set(keys)) == 6  # never counted twice
    pd.testing.assert_frame_equal(per_item(part), per_item(whole))
    pd.testing.assert_frame_equal(pd.read_csv(part / "summary.csv"), pd.read_csv(whole / "summary.csv"))

    before = (part / "records.jsonl").read_bytes()
    code, _, err = run_cli([*argv, "--max-turns", "5", "--out", str(part)], capfd)
    assert code == 2 and "other settings (max_turns)" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*argv[:-2], "--script", script(tmp_path, OUTSIDE), "--out", str(part)], capfd)
    assert code == 2 and "other settings (script)" in err
    assert (part / "records.jsonl").read_bytes() == before


def dataset(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "img.png"
    organism.heldout(1)[0].image.save(path)
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "rlvr,bogus"], "unknown agent strategies ['bogus']"),
        (["--strategies", "pti"], "unknown agent strategies ['pti']"),
        (["--strategies", "rlvr,rlvr"], "named twice"),
        (["--max-turns", "0"], "max_turns must be an integer >= 1"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--batch-size", "0"], "batch size must be an integer >= 1"),
        (["--items", "0"], "--items must be >= 1"),
        (["--layers", "2-9"], "outside the model's 4 layers"),
        (["--strategies", "replay", "--topk", "0"], "--topk must be in"),
        (["--mask", "median"], "mask rule"),
        (["--verifier", "judge"], "unknown verifier"),
        (["--script", "missing.json"], "--script missing.json: no such file"),
        (["--script", "{bad"], "not valid JSON"),
        (["--script", '{"a": 1}'], "must be a JSON list of reply strings"),
        (["--data", "{noimage}"], "has no image"),
        (["--data", "{twoimages}"], "2 images; the agent loop zooms into exactly one image"),
        (["--data", "{torn}"], "data.jsonl:2"),
        (["--out", "{file}"], "--out"),
    ],
)
def test_bad_input_is_one_line_before_loading_and_writes_nothing(tmp_path, capfd, image_file, argv, message):
    answer = {"question": "How many red shapes are there?", "answer": "3"}
    placeholders = {
        "{noimage}": dataset(tmp_path, [{"id": "a", **answer}], "text.jsonl"),
        "{twoimages}": dataset(
            tmp_path, [{"id": "a", "images": [image_file, image_file], **answer}], "two.jsonl"
        ),
        "{torn}": dataset(tmp_path, [{"id": "a", "image": image_file, **answer}]) + "",
        "{file}": str(tmp_path / "a_file"),
    }
    (tmp_path / "a_file").write_text("x")
    if "{torn}" in argv:
        with open(placeholders["{torn}"], "a") as fh:
            fh.write('{"id": "b", "question": \n')
    if argv[0] == "--script" and argv[1] != "missing.json":
        (tmp_path / "s.json").write_text(argv[1])
        argv = ["--script", str(tmp_path / "s.json")]
    argv = [placeholders.get(a, a) for a in argv]
    out = tmp_path / "out"
    code, _, err = run_cli([*argv] + ([] if "--out" in argv else ["--out", str(out)]), capfd)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_batched_runs_equal_one_at_a_time(pair):
    """Episodes of different lengths in one batch: each run equals its own unbatched run."""
    items = organism.heldout(4)
    scripts = [[ZOOM, ZOOM], [], [OUTSIDE], [ZOOM]]
    config = AgentConfig(max_turns=4, answer="organism", tool_prompt="")

    def episodes():
        return [
            AgentEpisode(pair, s.question, s.image, config=config, script=script)
            for s, script in zip(items, scripts, strict=True)
        ]

    batched = run_agents(pair, Baseline(), episodes(), batch_size=4)
    alone = [run_agents(pair, Baseline(), [e])[0] for e in episodes()]
    assert [r.n_calls for r in batched] == [3, 1, 2, 2]
    assert [r.to_dict() for r in batched] == [r.to_dict() for r in alone]
    with pytest.raises(Exception, match="batch_size"):
        run_agents(pair, Baseline(), episodes(), batch_size=0)


def test_batch_size_does_not_change_the_tables(tmp_path, capfd):
    argv = ["--items", "3", "--strategies", "rlvr,hard-agent", "--script", script(tmp_path, ZOOM)]
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_cli([*argv, "--out", str(one)], capfd)[0] == 0
    assert run_cli([*argv, "--batch-size", "3", "--out", str(three)], capfd)[0] == 0
    assert set(pd.read_csv(three / "per_item.csv")["batch"]) == {3}
    pd.testing.assert_frame_equal(per_item(one), per_item(three))
    # batch_size is not a setting: a run resumes under another batch size.
    assert run_cli([*argv, "--batch-size", "2", "--out", str(three)], capfd)[0] == 0


def test_shards_merge_to_the_single_run_tables(tmp_path, capfd):
    argv = ["--items", "3", "--strategies", "rlvr,hard-agent", "--script", script(tmp_path, ZOOM)]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert run_cli([*argv, "--out", str(whole)], capfd)[0] == 0
    assert run_cli([*argv, "--shard", "0/2", "--out", str(sharded)], capfd)[0] == 0
    assert not (sharded / "per_item.csv").exists()
    code, _, err = run_cli([*argv, "--shard", "1/2", "--out", str(sharded)], capfd)
    assert code == 0 and "merged 2 shard(s)" in err
    pd.testing.assert_frame_equal(per_item(sharded), per_item(whole))


def test_checkpoint_pair_with_deepeyes_prompts_and_choice_items(tmp_path, capfd, vl_dirs):
    """A tiny random Qwen2.5-VL pair from folders: DeepEyes' prompts by default, choice items scored
    on the last reply's answer tag."""
    from conftest import random_image

    image = tmp_path / "img.png"
    random_image(56, 84).save(image)
    rows = [
        {
            "id": f"q{i}",
            "question": "Which colour is the car?",
            "image": str(image),
            "answer": "B",
            "options": {"A": "red", "B": "blue"},
        }
        for i in range(2)
    ]
    data = dataset(tmp_path, rows)
    reply = script(tmp_path, ZOOM.replace("32, 32", "40, 28"), "<think>blue</think> <answer>B</answer>")
    base, rlvr = (str(d) for d in vl_dirs)
    common = [
        "--base",
        base,
        "--rlvr",
        rlvr,
        "--data",
        data,
        "--max-new-tokens",
        "3",
        "--strategies",
        "rlvr,hard-agent",
    ]
    out = tmp_path / "run"
    assert run_cli([*common, "--script", reply, "--out", str(out)], capfd)[0] == 0
    found = records(out)
    assert len(found) == 4
    for record in found:
        assert [t["status"] for t in record["turns"]] == ["tool", "answer"]
        assert record["turns"][0]["box"] == [0, 0, 40, 28]
        assert record["stop"] == "answer" and record["agent_answer"] == "B"
        assert record["verifier"] == "choice" and record["correct"] == 1
    # The first call saw DeepEyes' system prompt and instruction (more prompt tokens than without).
    bare = tmp_path / "bare"
    one = ["--items", "1", "--strategies", "rlvr"]
    assert run_cli([*common, *one, "--script", reply, "--system", "none", "--out", str(bare)], capfd)[0] == 0
    assert records(bare)[0]["turns"][0]["n_tokens"] < found[0]["turns"][0]["n_tokens"]
    # Unscripted, the random model writes neither a tool call nor an answer tag: one no_tool_call turn.
    free = tmp_path / "free"
    assert run_cli([*common, *one, "--out", str(free)], capfd)[0] == 0
    assert all(r["stop"] in ("no_tool_call", "tool_error", "turn_limit") for r in records(free))


def test_released_agent_swap_layers_follow_the_model_depth():
    from analyses.agent import AgentRunConfig, make_agent_intervention
    from lens.errors import ConfigError
    from lens.masks import RELEASED_THRESHOLDS

    deep = make_agent_intervention("hard-agent", AgentRunConfig(), n_layers=28).config
    assert deep.layers == tuple(range(7)) and deep.thresholds == RELEASED_THRESHOLDS and deep.scope == "all"
    picked = make_agent_intervention("hard-agent", AgentRunConfig(layers=(1, 5)), n_layers=28).config
    assert picked.thresholds == (RELEASED_THRESHOLDS[1], RELEASED_THRESHOLDS[5])
    with pytest.raises(ConfigError, match=r"layers \[7\] have none"):
        make_agent_intervention("hard-agent", AgentRunConfig(layers=(0, 7)), n_layers=28)
