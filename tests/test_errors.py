"""Every bad input: a typed exception from Python; from the CLI one stderr line, exit != 0, no traceback,
and no output left in --out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROMPT, random_image, write_dataset

from analyses.kl_drift import run_drift
from lens import load_pair
from lens.cli import main
from lens.datasets import load_jsonl
from lens.errors import (
    CheckpointError,
    DatasetError,
    InputError,
    PairMismatchError,
    ReplayLensError,
    UnsupportedArchitectureError,
)
from lens.testing import save_checkpoint, tiny_causal_lm, tiny_image_processor, tiny_qwen25vl, tiny_tokenizer

# name -> (exception, message fragment)
MISMATCHES = {
    "layers": (PairMismatchError, "layer count differs"),
    "hidden": (PairMismatchError, "hidden size differs"),
    "vocab": (PairMismatchError, "vocabulary size differs"),
    "architecture": (PairMismatchError, "architecture differs"),
    "tokenizer": (PairMismatchError, "tokenizer vocabulary differs"),
    "processor_pixels": (PairMismatchError, "image processors differ"),
    "processor_patch": (PairMismatchError, "image processors differ"),
}


@pytest.fixture(scope="module")
def odd_dirs(ckpt_root, tok, image_processor):
    """Checkpoints that cannot be paired with ``vl_dirs[1]``, plus a GPT-2 pair."""
    root = ckpt_root / "odd"
    same = tiny_qwen25vl(tok, seed=2)
    dirs = {
        "layers": save_checkpoint(tiny_qwen25vl(tok, num_layers=3), tok, root / "layers", image_processor),
        "hidden": save_checkpoint(tiny_qwen25vl(tok, hidden_size=32), tok, root / "hidden", image_processor),
        "vocab": save_checkpoint(
            tiny_qwen25vl(tok, vocab_size=len(tok) + 16), tok, root / "vocab", image_processor
        ),
        "architecture": save_checkpoint(tiny_causal_lm(tok), tok, root / "architecture"),
        # Same model vocabulary size, but a tokenizer trained to a smaller vocabulary.
        "tokenizer": save_checkpoint(
            same, tiny_tokenizer(vocab_size=300), root / "tokenizer", image_processor
        ),
        "processor_pixels": save_checkpoint(
            same, tok, root / "processor_pixels", tiny_image_processor(max_side=56)
        ),
        "processor_patch": save_checkpoint(
            same, tok, root / "processor_patch", tiny_image_processor(patch_size=16)
        ),
    }
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    for name in ("gpt2_a", "gpt2_b"):
        dirs[name] = save_checkpoint(gpt2, tok, root / name)
    return dirs


@pytest.fixture
def good_data(tmp_path):
    random_image(56, 84).save(tmp_path / "ok.png")
    return write_dataset(tmp_path, [{"id": "a", "question": PROMPT, "image": "ok.png"}])


# -- Python ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MISMATCHES))
def test_pair_mismatch_raises(name, odd_dirs, vl_dirs):
    error, fragment = MISMATCHES[name]
    with pytest.raises(error, match=fragment):
        load_pair(odd_dirs[name], vl_dirs[1])


def test_unsupported_architecture_names_supported_ones(odd_dirs):
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_pair(odd_dirs["gpt2_a"], odd_dirs["gpt2_b"])
    message = str(info.value)
    assert "gpt2" in message
    for supported in ("qwen2_5_vl", "qwen2_vl", "qwen2", "llama"):
        assert supported in message


def test_missing_folder_raises(tmp_path, vl_dirs):
    with pytest.raises(CheckpointError, match="not found"):
        load_pair(tmp_path / "nope", vl_dirs[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pair(vl_dirs[0], tmp_path / "empty")


def test_dataset_errors_raise(tmp_path):
    bad = write_dataset(tmp_path, [{"id": "a", "question": "q"}, '{"id": "b", "question": ', "{}"])
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: malformed JSON"):
        load_jsonl(bad)
    with pytest.raises(DatasetError, match="no samples"):
        load_jsonl(write_dataset(tmp_path, ["", "   "], name="empty.jsonl"))
    with pytest.raises(DatasetError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match=":1: missing required field 'question'"):
        load_jsonl(write_dataset(tmp_path, [{"id": "a"}], name="noq.jsonl"))
    with pytest.raises(DatasetError, match="no samples"):
        run_drift(None, [], tmp_path / "out")


def test_corrupt_image_in_run_drift_leaves_no_output(vl_pair, tmp_path):
    random_image(56, 84).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage" * 20)
    rows = [
        {"id": "a", "question": PROMPT, "image": "ok.png"},
        {"id": "b", "question": PROMPT, "image": "bad.png"},
    ]
    samples = load_jsonl(write_dataset(tmp_path, rows))
    with pytest.raises(InputError, match="sample 'b'.*corrupt"):
        run_drift(vl_pair, samples, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_images_for_text_only_pair_leave_no_output(lm_pair, good_data, tmp_path):
    with pytest.raises(InputError, match="takes no images"):
        run_drift(lm_pair, load_jsonl(good_data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- CLI -------------------------------------------------------------------------------------------


def _bad_cli_cases(tmp_path, vl_dirs, odd_dirs, good_data):
    """name -> (base, rlvr, data, expected message fragment)."""
    base, rlvr = (str(p) for p in vl_dirs)
    random_image(56, 84).save(tmp_path / "ok2.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    corrupt = write_dataset(
        tmp_path,
        [
            {"id": "a", "question": PROMPT, "image": "ok2.png"},
            {"id": "b", "question": PROMPT, "image": "bad.png"},
        ],
        name="corrupt.jsonl",
    )
    malformed = write_dataset(
        tmp_path,
        [{"id": "a", "question": PROMPT}, {"id": "b", "question": PROMPT}, '{"id": "c",'],
        name="bad.jsonl",
    )
    empty = write_dataset(tmp_path, ["", " "], name="empty.jsonl")
    data = str(good_data)
    cases = {
        "missing_folder": (str(tmp_path / "missing"), rlvr, data, "checkpoint folder not found"),
        "missing_dataset": (base, rlvr, str(tmp_path / "missing.jsonl"), "dataset not found"),
        "corrupt_image": (base, rlvr, str(corrupt), "corrupt image"),
        "malformed_jsonl": (base, rlvr, str(malformed), "bad.jsonl:3: malformed JSON"),
        "empty_dataset": (base, rlvr, str(empty), "no samples"),
        "unsupported": (str(odd_dirs["gpt2_a"]), str(odd_dirs["gpt2_b"]), data, "supported model types: "),
    }
    for name, (_, fragment) in MISMATCHES.items():
        cases[f"mismatch_{name}"] = (str(odd_dirs[name]), rlvr, data, fragment)
    return cases


CLI_CASES = [
    "missing_folder",
    "missing_dataset",
    "corrupt_image",
    "malformed_jsonl",
    "empty_dataset",
    "unsupported",
    *(f"mismatch_{n}" for n in sorted(MISMATCHES)),
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(case, tmp_path, vl_dirs, odd_dirs, good_data, capfd):
    base, rlvr, data, fragment = _bad_cli_cases(tmp_path, vl_dirs, odd_dirs, good_data)[case]
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(
        ["drift", "--base", base, "--rlvr", rlvr, "--data", data, "--out", str(out), "--threads", "1"]
    )
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lens drift: error: ") and fragment in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_cli_console_script_bad_input(tmp_path, good_data):
    """The installed ``lens`` script, in a fresh process: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "lens.cli", "drift", "--base", str(tmp_path / "nope"), "--rlvr", str(tmp_path)]
        + ["--data", str(good_data), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lens drift: error: checkpoint folder not found: {tmp_path / 'nope'}"
    ]
    assert not out.exists()


def test_cli_happy_path(vl_dirs, tmp_path, capfd):
    random_image(56, 84).save(tmp_path / "ok.png")
    rows = [
        {"id": f"s{i}", "question": f"{PROMPT} {i}", "image": "ok.png", "response": "42"} for i in range(3)
    ]
    data = write_dataset(tmp_path, rows)
    out = tmp_path / "out"
    argv = ["drift", "--base", str(vl_dirs[0]), "--rlvr", str(vl_dirs[1]), "--data", str(data)]
    code = main([*argv, "--out", str(out), "--buckets", "3", "--layers", "0-1,3", "--threads", "1"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "Spearman rho" in captured.out and "mean KL (visual)" in captured.out
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in records] == ["s0", "s1", "s2"]
    assert all(r["layers"] == [0, 1, 3] for r in records)
    assert (out / "kl_by_entropy.png").exists() and (out / "drift_buckets.csv").exists()
    # Running again resumes: nothing recomputed, nothing duplicated.
    assert main([*argv, "--out", str(out), "--buckets", "3", "--layers", "0-1,3"]) == 0
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


def test_all_errors_are_replay_lens_errors():
    for error in (CheckpointError, DatasetError, InputError, PairMismatchError, UnsupportedArchitectureError):
        assert issubclass(error, ReplayLensError)
