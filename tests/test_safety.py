"""Runs that never mix, lose or double-count results (issue 9, items 3-5).

Each failure an outside audit found gets a regression test: the CLI prints one line on stderr and
exits 2, leaves nothing behind, and destroys nothing of a previous run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, RESPONSE, random_image, write_dataset

import lens.loading
from analyses import kl_drift as kd
from analyses.kl_drift import DriftConfig, run_drift
from lens.cli import describe_error, main
from lens.datasets import load_jsonl
from lens.errors import CheckpointError
from lens.fingerprint import (
    check_safetensors,
    checkpoint_identity,
    describe_changes,
    sample_digest,
)
from lens.outdir import LOCK_NAME, claim, release
from lens.records import RecordWriter
from lens.testing import save_checkpoint, tiny_qwen25vl

ROOT = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (empty when the folder does not exist), but the lock."""
    if not folder.exists():
        return {}
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def run_cli(argv: list[str], capfd) -> tuple[int, list[str]]:
    """``lens.cli.main(argv)`` in-process; returns the exit code and the stderr lines."""
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def assert_refused(argv: list[str], capfd, fragment: str, command: str | None = None) -> str:
    """The command exits 2 with exactly one stderr line containing ``fragment``."""
    code, lines = run_cli(argv, capfd)
    assert code == 2, lines
    assert len(lines) == 1, lines
    command = command or argv[0]
    assert lines[0].startswith(f"lens {command}: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def run_process(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """``python -m lens.cli ARGV`` in a fresh process, from the repository root."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lens.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
        **kw,
    )


def error_lines(stderr: str) -> list[str]:
    """stderr without progress-bar lines (tqdm writes them to stderr)."""
    return [line for line in stderr.strip().splitlines() if "%|" not in line and line.strip()]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(lens.loading, "load_pair", refuse)


@pytest.fixture
def pair_args(vl_dirs):
    return ["--base", str(vl_dirs[0]), "--rlvr", str(vl_dirs[1]), "--threads", "1"]


@pytest.fixture
def data(make_dataset):
    return make_dataset(3)


# -- the lock on --out --------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_process_into_a_folder_in_use_is_refused(tmp_path, capfd, no_loading):
    """Two real processes: a holder of the lock, and this one, refused with one line naming the holder.
    Once the holder is killed, the kernel has dropped its lock and the folder is free."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a finished result")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lens.outdir import claim; claim(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(300)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = snapshot(out)
        line = assert_refused(
            ["drift", "--items", "2", "--threads", "1", "--out", str(out)],
            capfd,
            f"{out} is in use by process {holder.pid} (-c {out}); wait for it to finish or use another --out",
        )
        assert line.startswith(f"lens drift: error: {out} is in use")
        assert snapshot(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).exists()  # the killed holder could not clean up ...
    claim(out)  # ... but its lock died with it
    release(out)
    assert not (out / LOCK_NAME).exists()
    assert (out / "keep.txt").read_text() == "a finished result"


def test_claim_is_reentrant_and_cleans_up(tmp_path):
    out = tmp_path / "a" / "b"
    claim(out)
    claim(out)  # the command and its record writer, in one process
    assert (out / LOCK_NAME).is_file()
    release(out)
    assert (out / LOCK_NAME).is_file()
    release(out)
    assert not (tmp_path / "a").exists()  # the claim made both folders, and they stayed empty


# -- fingerprint: checkpoints, dtype, device, sample inputs -------------------------------------------------


@pytest.fixture
def rlvr_copy(vl_dirs, tmp_path):
    """A copy of the RLVR checkpoint that a test may modify."""
    return Path(shutil.copytree(vl_dirs[1], tmp_path / "ckpt" / "vl_rlvr"))


def test_checkpoint_identity_is_content_not_folder(vl_dirs, rlvr_copy, tok, image_processor, tmp_path):
    original = checkpoint_identity(vl_dirs[1])
    assert (
        describe_changes(
            {"checkpoints": {"rlvr": original}}, {"checkpoints": {"rlvr": checkpoint_identity(rlvr_copy)}}
        )
        == []
    )
    # Another checkpoint of the same shape, saved under the same folder name: same size, other bytes.
    other = tmp_path / "other" / "vl_rlvr"
    save_checkpoint(tiny_qwen25vl(tok, seed=7), tok, other, image_processor)
    changes = describe_changes(
        {"checkpoints": {"rlvr": original}}, {"checkpoints": {"rlvr": checkpoint_identity(other)}}
    )
    assert changes and changes[0].startswith("rlvr checkpoint changed: model.safetensors content differs")
    fp = {"checkpoints": {}, "dtype": "float32", "device": "cpu"}
    assert describe_changes(fp, {**fp, "dtype": "bfloat16", "device": "cuda"}) == [
        "dtype changed: float32 -> bfloat16",
        "device type changed: cpu -> cuda",
    ]


def test_truncated_safetensors_is_refused_before_loading(
    rlvr_copy, pair_args, data, tmp_path, capfd, no_loading
):
    weights = rlvr_copy / "model.safetensors"
    size = weights.stat().st_size
    check_safetensors(weights)
    with open(weights, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        check_safetensors(weights)
    out = tmp_path / "out"
    argv = ["drift", "--base", pair_args[1], "--rlvr", str(rlvr_copy), "--data", str(data), "--out", str(out)]
    assert_refused(argv, capfd, f"{weights}: safetensors file truncated")
    assert not out.exists()


def test_resume_with_another_checkpoint_of_the_same_name_is_refused(
    vl_dirs, rlvr_copy, tok, image_processor, data, tmp_path, capfd
):
    out = tmp_path / "out"
    argv = [
        "drift",
        "--base",
        str(vl_dirs[0]),
        "--rlvr",
        str(rlvr_copy),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    assert run_cli([*argv, "--threads", "1"], capfd)[0] == 0
    before = snapshot(out)
    # Re-trained in place: same folder, same file names and sizes, other weights.
    save_checkpoint(tiny_qwen25vl(tok, seed=9), tok, rlvr_copy, image_processor)
    line = assert_refused(
        argv,
        capfd,
        "holds records made with other models: rlvr checkpoint changed: model.safetensors content differs",
    )
    assert "--no-resume" in line
    assert snapshot(out) == before


def test_a_moved_checkpoint_resumes_without_recomputing(vl_dirs, rlvr_copy, data, tmp_path, capfd):
    out = tmp_path / "out"
    argv = ["drift", "--base", str(vl_dirs[0]), "--data", str(data), "--out", str(out), "--threads", "1"]
    assert run_cli([*argv, "--rlvr", str(rlvr_copy)], capfd)[0] == 0
    records = (out / "records.jsonl").read_bytes()
    moved = shutil.move(rlvr_copy, tmp_path / "elsewhere" / "vl_rlvr")  # same folder name, same content
    assert run_cli([*argv, "--rlvr", str(moved)], capfd)[0] == 0
    assert (out / "records.jsonl").read_bytes() == records


def test_resume_with_another_dtype_is_refused_before_loading(pair_args, data, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out"
    argv = ["drift", *pair_args, "--data", str(data), "--out", str(out), "--layers", "0-1"]
    assert run_cli(argv, capfd)[0] == 0
    before = snapshot(out)
    monkeypatch.setattr(lens.loading, "load_pair", lambda *a, **k: pytest.fail("loaded weights"))
    assert_refused([*argv, "--dtype", "bfloat16"], capfd, "dtype changed: float32 -> bfloat16")
    assert snapshot(out) == before


def test_a_changed_sample_is_recomputed_alone_and_never_counted_twice(
    vl_pair, make_dataset, tmp_path, monkeypatch
):
    samples = load_jsonl(make_dataset(4))
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run_drift(vl_pair, samples, out, DriftConfig(n_buckets=2), csv=True)
    old = sample_digest(samples[1])
    random_image(84, 56, seed=99).save(samples[1].image)  # the dataset's image changes on disk
    assert sample_digest(samples[1]) != old
    calls = []
    real = kd.drift_record
    monkeypatch.setattr(kd, "drift_record", lambda p, s, c: calls.append(s.id) or real(p, s, c))
    run_drift(vl_pair, samples, out, DriftConfig(n_buckets=2), csv=True)
    assert calls == ["s1"]
    ids = [json.loads(line)["sample_id"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["s0", "s1", "s2", "s3"]  # the old s1 line is gone
    run_drift(vl_pair, samples, fresh, DriftConfig(n_buckets=2), csv=True)
    for name in ("drift_table.csv", "drift_buckets.csv", "drift_spearman.csv"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


def test_sample_digest_covers_question_image_response_and_options(tmp_path):
    from lens.datasets import Sample

    random_image(56, 84).save(tmp_path / "a.png")
    a = Sample(id="a", question=PROMPT, images=(tmp_path / "a.png",), response=RESPONSE)
    assert sample_digest(a) == sample_digest(
        Sample(id="other id", question=PROMPT, images=(tmp_path / "a.png",), response=RESPONSE)
    )
    for changed in (
        Sample(id="a", question=PROMPT + "?", images=(tmp_path / "a.png",), response=RESPONSE),
        Sample(id="a", question=PROMPT, images=(tmp_path / "a.png",), response=RESPONSE + "!"),
        Sample(id="a", question=PROMPT, response=RESPONSE),
    ):
        assert sample_digest(changed) != sample_digest(a)

    class WithOptions:
        id, question, image, options, hint = "a", PROMPT, None, ["A. 1", "B. 2"], None

    other = WithOptions()
    other.options = ["A. 1", "B. 3"]
    assert sample_digest(WithOptions()) != sample_digest(other)


# -- --no-resume never destroys a finished run early ------------------------------------------------------


def test_no_resume_with_a_typo_keeps_the_finished_run(pair_args, data, tmp_path, capfd):
    out = tmp_path / "out"
    argv = ["drift", *pair_args, "--data", str(data), "--out", str(out)]
    assert run_cli(argv, capfd)[0] == 0
    before = snapshot(out)
    assert_refused(
        [*argv, "--no-resume", "--layers", "0-9"],
        capfd,
        "--layers [4, 5, 6, 7, 8, 9] outside the model's 4 layers",
    )
    assert_refused([*argv, "--no-resume", "--limit", "0"], capfd, "--limit must be >= 1, got 0")
    assert snapshot(out) == before


def test_no_resume_replaces_records_only_with_the_first_new_one(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path, settings={"a": 1}) as writer:
        writer.write("x", {"v": 1})
        writer.write("y", {"v": 2})
    before = snapshot(tmp_path)
    writer = RecordWriter(path, resume=False, settings={"a": 2})
    assert "x" not in writer
    assert snapshot(tmp_path) == before  # nothing deleted yet: a failure here loses nothing
    writer.write("y", {"v": 3})
    assert writer.read(["x", "y"]) == [{"sample_id": "y", "v": 3}]
    assert len(path.read_text().splitlines()) == 1
    assert json.loads((tmp_path / "records.settings.json").read_text())["settings"] == {"a": 2}
    writer.close()


def test_interrupted_no_resume_run_keeps_old_records(vl_pair, make_dataset, tmp_path, monkeypatch):
    samples = load_jsonl(make_dataset(2))
    out = tmp_path / "out"
    run_drift(vl_pair, samples, out)
    before = snapshot(out)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd, "drift_record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_drift(vl_pair, samples, out, resume=False)
    assert snapshot(out) == before


def test_records_of_another_run_stamp_are_not_reused(tmp_path):
    """A run that died between writing its settings and its first record cannot mix records."""
    path = tmp_path / "records.jsonl"
    with RecordWriter(path, settings={"layers": [0]}) as writer:
        writer.write("x", {"v": 1})
    stored = json.loads((tmp_path / "records.settings.json").read_text())
    stored["settings"] = {"layers": [1]}
    (tmp_path / "records.settings.json").write_text(json.dumps(stored))
    with RecordWriter(path, settings={"layers": [1]}) as writer:
        assert "x" not in writer


# -- --limit / --items / --threads / --device / --out -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["drift", "--limit", "-1"], "--limit must be >= 1, got -1"),
        (["drift", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["drift", "--items", "0"], "--items must be >= 1, got 0"),
        (["perturb", "--limit", "0"], "--limit must be >= 1, got 0"),
        (["perturb", "--items", "-3"], "--items must be >= 1, got -3"),
        (["intervene", "--items", "0"], "--items must be >= 1, got 0"),
        (["replay", "--items", "-1"], "--items must be >= 1, got -1"),
        (["eval", "--items", "0"], "--items must be >= 1, got 0"),
        (["drift", "--threads", "-1"], "--threads must be >= 1, got -1"),
        (["intervene", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["eval", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["reproduce", "--threads", "-1"], "--threads must be >= 1, got -1"),
        (["drift", "--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["perturb", "--device", "meta"], "--device 'meta': unsupported device type"),
        (["drift", "--layers", "3-1"], "--layers range '3-1' is empty"),
        (["drift", "--layers", "7"], "--layers [7] outside the model's 4 layers"),
        (["intervene", "--layers", "0,4"], "--layers [4] outside the model's 4 layers"),
        (["replay", "--topk", "100000"], "--topk must be in 1..272"),
    ],
)
def test_bad_option_refused_before_anything(argv, fragment, tmp_path, capfd, no_loading):
    """On the organism (the default pair): refused before loading, nothing written."""
    out = tmp_path / "out"
    assert_refused([*argv, "--out", str(out)], capfd, fragment)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["drift", "intervene", "replay", "perturb"])
def test_cuda_without_cuda_is_refused(command, tmp_path, capfd, no_loading):
    out = tmp_path / "out"
    assert_refused(
        [command, "--device", "cuda", "--out", str(out)], capfd, "--device cuda: no cuda device is available"
    )
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, capfd, no_loading):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    for command in ("drift", "eval", "intervene", "perturb", "replay", "reproduce"):
        assert_refused([command, "--out", str(target)], capfd, f"--out {target} is an existing file")
        assert_refused(
            [command, "--out", str(target / "sub")],
            capfd,
            f"{target} is a file, so the folder cannot be created",
        )
    assert target.read_text() == "not a folder"


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
def test_read_only_out_is_refused(tmp_path, capfd):
    out = tmp_path / "ro" / "out"
    out.mkdir(parents=True)
    (out / "old.csv").write_text("finished")
    argv = ["drift", "--items", "2", "--threads", "1", "--no-resume", "--out", str(out)]
    if os.geteuid() != 0:
        os.chmod(tmp_path / "ro", 0o555)
        os.chmod(out, 0o555)
        try:
            assert_refused(argv, capfd, f"--out {out}: {out} is not writable")
        finally:
            os.chmod(out, 0o755)
            os.chmod(tmp_path / "ro", 0o755)
    elif _can_unshare():  # root ignores permissions: use a read-only mount in a private namespace
        script = f'mount --bind "{out}" "{out}" && mount -o remount,bind,ro "{out}" && exec "$@"'
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "lens.cli", *argv],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"lens drift: error: --out {out}: {out} is read-only"]
    else:
        pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
    assert (out / "old.csv").read_text() == "finished"


# -- samples the method or the processor cannot take ----------------------------------------------------


def test_text_only_item_for_replay_is_refused_with_its_row(pair_args, tmp_path, capfd, no_loading):
    random_image(56, 84).save(tmp_path / "ok.png")
    rows = [
        {"id": "a", "question": PROMPT, "image": "ok.png", "answer": "1"},
        {"id": "b", "question": PROMPT, "answer": "2"},
    ]
    data = write_dataset(tmp_path, rows)
    out = tmp_path / "out"
    for command, extra, fragment in (
        (
            "intervene",
            ["--strategies", "rlvr,hard-low"],
            "has no image or video, but --strategies hard-low acts on visual tokens",
        ),
        ("replay", [], "has no image or video, but --strategies replay acts on visual tokens"),
    ):
        line = assert_refused(
            [command, *pair_args, "--data", str(data), "--out", str(out), *extra], capfd, fragment
        )
        assert f"{data}:2 (sample 'b')" in line
    assert_refused(
        ["perturb", *pair_args, "--data", str(data), "--out", str(out)],
        capfd,
        "needs an image for every sample",
    )
    assert not out.exists()
    # Strategies that do not touch visual tokens take text-only items.
    assert_refused(["intervene", *pair_args, "--data", str(data), "--out", str(out), "--strategies", "rlvr", "--threads", "0"],
                   capfd, "--threads must be >= 1")  # fmt: skip


def test_image_the_processor_refuses_is_refused_before_loading(pair_args, tmp_path, capfd, no_loading):
    random_image(56, 84).save(tmp_path / "ok.png")
    random_image(2, 402).save(tmp_path / "wide.png")  # aspect ratio 201 > 200 (Qwen2-VL smart_resize)
    rows = [
        {"id": "a", "question": PROMPT, "image": "ok.png"},
        {"id": "b", "question": PROMPT, "image": "wide.png"},
    ]
    data = write_dataset(tmp_path, rows)
    out = tmp_path / "out"
    assert_refused(
        ["drift", *pair_args, "--data", str(data), "--out", str(out)],
        capfd,
        f"{data}:2 (sample 'b'): wide.png is 402x2 px, which the image processor refuses: absolute aspect ratio",
    )
    assert not out.exists()


def test_non_utf8_dataset_line_is_refused_with_its_row(pair_args, tmp_path, capfd, no_loading):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"id": "a", "question": PROMPT}).encode()
    data.write_bytes(good + b"\n" + b'{"id": "b", "question": "caf\xe9"}\n')
    out = tmp_path / "out"
    assert_refused(
        ["drift", *pair_args, "--data", str(data), "--out", str(out)], capfd, f"{data}:2: not valid UTF-8"
    )
    assert not out.exists()


# -- the error boundary -----------------------------------------------------------------------------------


def test_os_error_inside_a_command_is_one_line_and_debug_shows_the_traceback(tmp_path, capfd):
    """``lens plot`` does no --out checks of its own: a file where a folder should be reaches the boundary."""
    table = tmp_path / "buckets.csv"
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"scope": ["pooled"], "layer": [-1], "token_group": ["visual"], "bucket": [1], "entropy_lo": [0.0],
                  "entropy_hi": [1.0], "n": [3], "mean_kl": [0.1], "median_kl": [0.1], "sem_kl": [0.01],
                  "ci_low": [0.08], "ci_high": [0.12]}).to_csv(table, index=False)  # fmt: skip
    (tmp_path / "file").write_text("x")
    argv = ["plot", "kl-by-entropy", str(table), "--out", str(tmp_path / "file" / "fig.pdf")]
    line = assert_refused(argv, capfd, "a file is where a folder should be")
    assert str(tmp_path / "file") in line
    capfd.readouterr()
    assert main(["--debug", *argv]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == line
    assert main([*argv, "--debug"]) == 2
    assert "Traceback" in capfd.readouterr().err


def test_library_errors_become_one_line(tmp_path):
    """Real exceptions from safetensors and torch, described by the boundary."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(Exception) as info:
        load_file(str(path))
    assert describe_error(info.value).startswith("corrupt or truncated safetensors file: ")
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)) as info:
            torch.zeros(1, device="cuda")
        assert describe_error(info.value).startswith("CUDA is not usable: ")
    assert describe_error(ValueError("a bug")) is None  # bugs keep their traceback
    with pytest.raises(UnicodeDecodeError) as info:
        b"\xff".decode("utf-8")
    assert "not valid UTF-8" in describe_error(info.value)


def test_ctrl_c_exits_130_and_keeps_the_records(pair_args, data, tmp_path, capfd, monkeypatch):
    out = tmp_path / "out"
    real = kd.drift_record
    calls = []

    def interrupt_second(pair, sample, config):
        calls.append(sample.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pair, sample, config)

    monkeypatch.setattr(kd, "drift_record", interrupt_second)
    code, lines = run_cli(["drift", *pair_args, "--data", str(data), "--out", str(out)], capfd)
    assert code == 130
    assert error_lines("\n".join(lines)) == ["lens drift: interrupted; run the same command again to resume"]
    assert len((out / "records.jsonl").read_text().splitlines()) == 1
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_disk_full_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A real full disk: a 96 KiB tmpfs in a private mount namespace (skipped where there is none)."""
    if not _can_unshare():
        pytest.skip("no unprivileged mount namespaces here")
    mount = tmp_path / "small"
    mount.mkdir()
    out = mount / "out"
    script = f'mount -t tmpfs -o size=96k tmpfs "{mount}" && "$@"; code=$?; ls -a "{out}"; exit $code'
    argv = ["drift", "--items", "3", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "lens.cli", *argv],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert error_lines(proc.stderr) == ["lens drift: error: no space left on device"], proc.stderr
    assert "Traceback" not in proc.stderr
    listing = proc.stdout.split()
    assert "records.jsonl" in listing  # the finished samples are kept for the resume
    assert not [name for name in listing if ".tmp" in name or name == LOCK_NAME], listing


# -- lens eval: a resumed run equals an uninterrupted one ------------------------------------------------


def test_item_records_do_not_depend_on_the_other_items():
    from analyses.evaluate import EvalConfig, score_model
    from lens import organism
    from lens.organism.model import Encoder

    model, tok, _ = organism.load_model("rlvr")
    items = organism.heldout(4)
    cfg = EvalConfig(ks=(1, 8), n=8)
    together = score_model(model, Encoder(tok), items, organism.verify, cfg, "rlvr")
    torch.manual_seed(123)  # the caller's RNG state must not matter either
    alone = score_model(model, Encoder(tok), items[2:3], organism.verify, cfg, "rlvr")
    assert alone.iloc[0].to_dict() == together.iloc[2].to_dict()


def test_interrupted_eval_resumes_to_the_same_tables_byte_for_byte(tmp_path, capfd, monkeypatch):
    argv = ["eval", "--items", "4", "--n", "4", "--k", "1,2,4", "--threads", "1"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli([*argv, "--out", str(whole)], capfd)[0] == 0
    real = RecordWriter.write
    written = []

    def write_then_die(self, key, record):
        if len(written) == 5:  # base finished, rlvr one item in
            raise KeyboardInterrupt
        written.append(key)
        real(self, key, record)

    monkeypatch.setattr(RecordWriter, "write", write_then_die)
    assert run_cli([*argv, "--out", str(resumed)], capfd)[0] == 130
    monkeypatch.undo()
    (records,) = resumed.glob("records-*.jsonl")
    assert len(records.read_text().splitlines()) == 5
    assert run_cli([*argv, "--out", str(resumed)], capfd)[0] == 0
    keys = [json.loads(line)["sample_id"] for line in records.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 12
    for name in ("per_item.csv", "summary.csv", "differences.csv", "table.md"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
