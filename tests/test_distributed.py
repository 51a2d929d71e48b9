"""Data-parallel runs (issue 9, item 2): shards under torchrun or ``--shard i/N``, merged by one process.

The merged tables must equal a single-process run's byte for byte; an interrupted shard resumes
alone; a record is never lost, mixed or counted twice, whatever the order the shards finish in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from analyses import kl_drift as kd
from lens import distributed
from lens.cli import main
from lens.distributed import Shard, merge, parse_shard, resolve
from lens.errors import ConfigError, DatasetError, OutputError

ROOT = Path(__file__).resolve().parents[1]
#: Columns of per_item.csv that record how a run went, not what it found (time, batch size).
BOOKKEEPING = ("prepare_s", "decode_s", "greedy_batch")


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    return code, out, err


def tables(folder: Path) -> dict[str, bytes]:
    """The run's CSV tables; per_item.csv without its bookkeeping columns."""
    import pandas as pd

    found = {}
    for path in sorted(folder.glob("*.csv")):
        if path.name == "per_item.csv":
            frame = pd.read_csv(path)
            found[path.name] = frame.drop(columns=[c for c in BOOKKEEPING if c in frame]).to_csv().encode()
        else:
            found[path.name] = path.read_bytes()
    assert found, f"{folder} has no tables"
    return found


def record_keys(folder: Path) -> list[str]:
    return [json.loads(line)["sample_id"] for line in (folder / "records.jsonl").read_text().splitlines()]


# -- the shard of a process ----------------------------------------------------------------------------


def test_shard_option_and_launcher_environment():
    assert parse_shard("1/4") == Shard(1, 4)
    assert resolve(None, {}) is None
    assert resolve("0/1", {}) is None  # one shard is a plain run
    launched = resolve(None, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (launched.index, launched.count, launched.launched) == (1, 2, True)
    assert launched.device("cuda") == "cuda:1" and launched.device("cpu") == "cpu"
    assert resolve(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ConfigError, match="drop --shard"):
        resolve("0/2", {"RANK": "0", "WORLD_SIZE": "2"})


def test_shards_partition_the_run_in_its_order():
    keys = {f"k{i}": "d" for i in range(7)}
    owned = [[k for k in keys if Shard(i, 3).owns_key(k, keys)] for i in range(3)]
    assert owned == [["k0", "k3", "k6"], ["k1", "k4"], ["k2", "k5"]]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--shard", "2/2"], "--shard 2/2"),
        (["--shard", "x"], "use i/N"),
    ],
)
def test_bad_shard_is_one_line_before_loading(argv, fragment, tmp_path, capfd):
    code, _, err = run_cli(["drift", "--items", "2", "--out", str(tmp_path / "o"), *argv], capfd)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -- --shard i/N: job arrays ---------------------------------------------------------------------------


DRIFT = ["drift", "--items", "5", "--layers", "0,2", "--threads", "1"]


@pytest.fixture(scope="module")
def single_drift(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "drift"
    assert main([*DRIFT, "--out", str(out)]) == 0
    return out


def test_job_array_shards_merge_to_the_single_process_tables(single_drift, tmp_path, capfd):
    out = tmp_path / "sharded"
    code, stdout, err = run_cli([*DRIFT, "--out", str(out), "--shard", "1/2"], capfd)
    assert code == 0 and "the last shard to finish merges" in err and not stdout
    assert not (out / "records.jsonl").exists() and (out / "shards" / "1-of-2" / "records.jsonl").exists()
    code, stdout, err = run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)
    assert code == 0 and "merged 2 shard(s)" in err and "Spearman" in stdout
    assert not (out / "shards").exists()
    assert tables(out) == tables(single_drift)
    assert record_keys(out) == record_keys(single_drift)
    single = kd.open_drift_table(single_drift).to_arrow()
    assert kd.open_drift_table(out).to_arrow().equals(single)


def test_interrupted_shard_resumes_alone(single_drift, tmp_path, capfd, monkeypatch):
    out = tmp_path / "sharded"
    real = kd.drift_record
    seen: list[str] = []

    def die_on_second(pair, sample, config):
        seen.append(sample.id)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(pair, sample, config)

    monkeypatch.setattr(kd, "drift_record", die_on_second)
    code, _, _ = run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)
    assert code == 130
    monkeypatch.undo()
    assert record_keys(out / "shards" / "0-of-2") == ["heldout-00000"]

    computed: list[str] = []
    monkeypatch.setattr(kd, "drift_record", lambda p, s, c: computed.append(s.id) or real(p, s, c))
    assert run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)[0] == 0
    assert computed == ["heldout-00002", "heldout-00004"]  # its own remaining samples only
    assert run_cli([*DRIFT, "--out", str(out), "--shard", "1/2"], capfd)[0] == 0
    assert computed[2:] == ["heldout-00001", "heldout-00003"]
    assert tables(out) == tables(single_drift)
    assert sorted(record_keys(out)) == sorted(record_keys(single_drift))


def test_shards_skip_what_the_folder_already_holds(single_drift, tmp_path, capfd, monkeypatch):
    out = tmp_path / "grow"
    assert run_cli([*DRIFT[:2], "3", *DRIFT[3:], "--out", str(out)], capfd)[0] == 0  # 3 items, one process
    computed: list[str] = []
    real = kd.drift_record
    monkeypatch.setattr(kd, "drift_record", lambda p, s, c: computed.append(s.id) or real(p, s, c))
    for index in (0, 1):
        assert run_cli([*DRIFT, "--out", str(out), "--shard", f"{index}/2"], capfd)[0] == 0
    assert sorted(computed) == ["heldout-00003", "heldout-00004"]
    assert tables(out) == tables(single_drift)


def test_sharded_eval_and_interventions_equal_one_process(tmp_path, capfd):
    for argv in (
        ["eval", "--rlvr", "rlvr", "--items", "5", "--n", "2", "--k", "1,2", "--threads", "1"],
        [
            "intervene",
            "--items",
            "3",
            "--strategies",
            "rlvr,replay",
            "--n",
            "2",
            "--k",
            "1,2",
            "--threads",
            "1",
        ],
    ):
        name = argv[0]
        assert run_cli([*argv, "--out", str(tmp_path / f"{name}-1")], capfd)[0] == 0
        for index in (2, 0, 1):  # any order: the last to finish merges
            assert (
                run_cli([*argv, "--out", str(tmp_path / f"{name}-3"), "--shard", f"{index}/3"], capfd)[0] == 0
            )
        assert tables(tmp_path / f"{name}-3") == tables(tmp_path / f"{name}-1"), name


# -- refusals: never mix, lose or double-count ---------------------------------------------------------


def test_another_split_in_the_folder_is_refused(tmp_path, capfd):
    out = tmp_path / "o"
    assert run_cli([*DRIFT, "--out", str(out), "--shard", "0/3"], capfd)[0] == 0
    code, _, err = run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)
    assert code == 2 and "3-way run" in err and "lens merge" in err


def test_merge_refuses_a_running_shard_and_shards_of_other_data(tmp_path, capfd):
    out = tmp_path / "o"
    assert run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)[0] == 0
    holder = subprocess.Popen(  # as if the shard's process were still running
        [sys.executable, "-c", "import sys, time; from lens.outdir import claim; claim(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(300)", str(out / "shards" / "0-of-2")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(OutputError, match="0-of-2 is in use by process"):
            merge(out)
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "records.jsonl").exists()
    other = [*DRIFT[:2], "7", *DRIFT[3:]]  # shard 1 of a different dataset
    code, _, err = run_cli([*other, "--out", str(out), "--shard", "1/2"], capfd)
    assert code == 2 and "1-of-2 ran other data than" in err and "records are kept" in err
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = run_cli(["merge", str(out)], capfd)
    assert code == 2 and "ran other data" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched


def test_lens_merge_combines_finished_shards_and_reports_what_is_missing(tmp_path, capfd):
    out = tmp_path / "o"
    assert run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)[0] == 0
    code, stdout, _ = run_cli(["merge", str(out)], capfd)
    assert (
        code == 0 and "3 records from the shards" in stdout and "2 of 5 records are still missing" in stdout
    )
    assert len(record_keys(out)) == 3 and not (out / "shards").exists()
    # The rest, in one process, reuses the merged records.
    assert run_cli([*DRIFT, "--out", str(out)], capfd)[0] == 0
    assert len(record_keys(out)) == 5
    with pytest.raises(DatasetError, match="no shards to merge"):
        merge(out)


def test_merge_interrupted_before_removing_the_shards_counts_nothing_twice(tmp_path, capfd, monkeypatch):
    out = tmp_path / "o"
    assert run_cli([*DRIFT, "--out", str(out), "--shard", "0/2"], capfd)[0] == 0

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distributed.shutil, "rmtree", disk_full)
    with pytest.raises(OSError):
        merge(out)  # the log is written, the shard folder stays
    monkeypatch.undo()
    assert len(record_keys(out)) == 3 and (out / "shards" / "0-of-2").is_dir()
    report = merge(out)
    assert report.merged == 3 and report.kept == 0
    assert sorted(record_keys(out)) == sorted(set(record_keys(out))) and len(record_keys(out)) == 3
    assert not (out / "shards").exists()


# -- torchrun: two CPU processes, gloo ------------------------------------------------------------------


def test_torchrun_two_processes_merge_to_the_single_process_tables(single_drift, tmp_path):
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "lens.cli", *DRIFT, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "shard 1/2" in done.stderr and "rank 0 merges" in done.stderr
    assert "merged 2 shard(s)" in done.stderr
    assert done.stdout.count("by base-entropy bucket") == 1  # rank 0 alone reports
    assert not (out / "shards").exists()
    assert tables(out) == tables(single_drift)
    assert record_keys(out) == record_keys(single_drift)


@pytest.mark.slow
def test_accelerate_launch_two_processes_merge_to_the_single_process_tables(single_drift, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run(
        [*launch, "-m", "lens.cli", *DRIFT, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0 merges" in done.stderr and "merged 2 shard(s)" in done.stderr
    assert tables(out) == tables(single_drift)
