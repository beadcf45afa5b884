"""Cells in parallel processes (`--jobs N`) and through submitit (`--executor local`): the same rows as
the sequential path, resume after a kill, a crashed cell process recorded as an error, the pinning rule."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fractalbench.harness import registry
from fractalbench.harness.catalogue import metric_info
from fractalbench.harness.executors import check_executor, placement, slurm_gpus, submitit_executor, threads_per_job
from fractalbench.harness.registry import ModelCard, register_model
from fractalbench.harness.results import RunStore, load_run
from fractalbench.harness.runner import cell_digests, run_suite
from fractalbench.harness.suites import parse_suite

CELLS = ["linear__digits8__cpu", "noop__digits8__cpu", "resnet20__digits8__cpu"]
RAW = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": ["linear", "noop", "resnet20"],
       "train": {"epochs": 1, "batch_size": 64, "max_steps_per_epoch": 2}, "metrics": ["accuracy"]}


def tiny(models=None, **extra):
    return parse_suite({**RAW, **({"models": models} if models else {}), **extra}, "t.yaml")


def machine_independent(run_dir):
    """(cell, metric, exit, policy, threshold) -> value of every row whose number does not depend on the machine."""
    frame = load_run(run_dir)
    keep = frame[[not metric_info(m).machine_dependent for m in frame.metric]]
    key = ["cell_id", "metric", "exit", "policy", "threshold"]
    return {tuple(None if pd.isna(v) else v for v in row[key]): row["value"] for _, row in keep.iterrows()}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The tiny suite run the sequential way (--jobs 1, in this process)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sequential")
    summary = run_suite(tiny(), out)
    assert summary.finished == CELLS
    # --jobs 1 is the in-process path: no cell processes, no logs, no `execution` in environment.json
    assert not (out / "logs").exists() and "execution" not in json.loads((out / "environment.json").read_text())
    assert all("process" not in record.meta for record in RunStore(out).read_cells())
    return out


def test_jobs_2_gives_the_rows_of_jobs_1(sequential, tmp_path):
    lines = []
    summary = run_suite(tiny(), tmp_path, jobs=2, echo=lines.append)
    assert sorted(summary.finished) == CELLS and not summary.failed
    rows, expected = machine_independent(tmp_path), machine_independent(sequential)
    assert rows == expected  # accuracy, top-5, ECE, losses, parameters: equal, not close
    assert sum(1 for k in rows if k[1] == "top1") == 3
    # one line per finished cell, numbered in finishing order
    assert [line.split()[0] for line in lines if ": ok" in line] == ["[1/3]", "[2/3]", "[3/3]"]
    for record in RunStore(tmp_path).read_cells():  # each cell ran in a process of its own, with 1 thread
        assert record.meta["process"]["pid"] != os.getpid() and record.meta["process"]["threads"] == 1
    assert len({r.meta["process"]["pid"] for r in RunStore(tmp_path).read_cells()}) == 3
    assert json.loads((tmp_path / "environment.json").read_text())["execution"] == {
        "executor": "process", "jobs": 2, "threads_per_cell": 1}
    assert all((tmp_path / "logs" / f"{c}.log").is_file() for c in CELLS)
    assert not list((tmp_path / "logs").glob(".*.job"))  # the pickled jobs are cleaned up


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "kill", "kill-9"])
def test_a_killed_parallel_run_resumes_without_losing_or_repeating_cells(tmp_path, stop):
    suite_file, out = tmp_path / "t.yaml", tmp_path / "run"
    suite_file.write_text(yaml.safe_dump({**RAW, "models": ["resnet20", "linear", "noop"]}))
    command = [sys.executable, "-m", "fractalbench", "run", str(suite_file), "--out", str(out), "--jobs", "2",
               "--no-report", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # SIGINT back to its default in the child: a test run started in the background (nohup, `cmd &`)
    # inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored, so Ctrl-C would never arrive
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob("cells/*.json")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(stop)
    output = first.communicate(timeout=60)[0]
    assert first.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}.get(stop, -signal.SIGKILL), output
    if stop == signal.SIGTERM:
        assert "terminated (SIGTERM): finished cells are saved" in output
    pids = [int(line.split()[3]) for log in out.glob("logs/*.log") for line in log.read_text().splitlines()
            if line.startswith("--- cell process")]
    for _ in range(100):  # every cell process stops with its parent
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.1)
    assert pids and not any(_alive(pid) for pid in pids)
    before = {p.name: p.read_bytes() for p in out.glob("cells/*.json")}
    assert 1 <= len(before) < 3, output

    second = run_suite(tiny(["resnet20", "linear", "noop"]), out, jobs=2)
    assert sorted(second.skipped) == sorted(name[:-5] for name in before)
    assert sorted(second.finished) == sorted(set(CELLS) - set(second.skipped)) and not second.failed
    assert {p.name: p.read_bytes() for p in out.glob("cells/*.json") if p.name in before} == before
    frame = load_run(out)
    assert sorted(frame[frame.metric == "top1"].cell_id) == CELLS
    assert not frame.duplicated(["cell_id", "metric", "exit", "policy", "threshold"]).any()
    assert (out / "results.csv").read_text().count("\n") == len(frame) + 1


class Exits(torch.nn.Module):
    """A model whose cell process dies in forward (as a segfault or an out-of-memory kill would). In the
    test's own process (the run's preflight passes a batch through every model) it gives logits."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if str(os.getpid()) != os.environ.get(TEST_PROCESS):  # the variable holds the test's pid, children inherit it
            os._exit(3)
        return x.flatten(1)[:, :10] * self.w


TEST_PROCESS = "FRACTALBENCH_TEST_EXITS_PARENT"


def build_exits(*, num_classes, in_chans):
    return Exits()


@pytest.fixture
def exiting_model(monkeypatch):
    monkeypatch.setenv(TEST_PROCESS, str(os.getpid()))
    register_model("tmp_exits", card=ModelCard(family="test", paper="none"))(build_exits)
    yield
    registry.unregister_model("tmp_exits")


def test_a_crashed_cell_process_is_an_error_record_and_the_others_finish(tmp_path, exiting_model):
    summary = run_suite(tiny(["linear", "tmp_exits", "noop"]), tmp_path, jobs=2)
    assert summary.failed == ["tmp_exits__digits8__cpu"]
    assert sorted(summary.finished) == ["linear__digits8__cpu", "noop__digits8__cpu"]
    frame = load_run(tmp_path)
    error = frame[frame.metric == "error"]
    assert list(error.cell_id) == ["tmp_exits__digits8__cpu"] and list(error.model) == ["tmp_exits"]
    assert "process exited with code 3 before writing its result" in error.error.iloc[0]
    assert len(frame[frame.metric == "top1"]) == 2
    again = run_suite(tiny(["linear", "tmp_exits", "noop"]), tmp_path, jobs=2)  # a failure is data: kept
    assert sorted(again.skipped) == sorted(summary.failed + summary.finished)


def test_submitit_local_executor_gives_the_rows_of_jobs_1(sequential, tmp_path):
    summary = run_suite(tiny(), tmp_path, jobs=2, executor="local")
    assert sorted(summary.finished) == CELLS
    assert machine_independent(tmp_path) == machine_independent(sequential)
    assert list((tmp_path / "submitit").glob("*_0_log.out"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parallel_cuda_cells_get_one_gpu_each(tmp_path):
    from fractalbench.harness.executors import visible_gpus

    gpus = visible_gpus()
    summary = run_suite(tiny(["linear", "noop"], devices=["cuda"]), tmp_path, jobs=2)
    assert sorted(summary.finished) == ["linear__digits8__cuda", "noop__digits8__cuda"]
    seen = sorted(r.meta["process"]["cuda_visible_devices"] for r in RunStore(tmp_path).read_cells())
    assert seen == sorted([gpus[0], gpus[1 % len(gpus)]])  # slots 0 and 1: one GPU each when there are two


def test_pinning_rule():
    gpus = ["0", "1"]
    assert [placement("cuda", slot, 4, gpus).cuda_visible for slot in range(4)] == ["0", "1", "0", "1"]
    assert placement("cuda:1", 0, 4, gpus).cuda_visible == "0,1"  # cuda:N sees every GPU and picks N
    assert placement("cpu", 1, 4, gpus).cuda_visible is None
    assert placement("cuda", 0, 2, []).cuda_visible is None  # no GPU here: left as it is
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert [threads_per_job(n) for n in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    finally:
        torch.set_num_threads(threads)


def test_slurm_without_sbatch_is_one_line_error(tmp_path, monkeypatch, capsys):
    from fractalbench.harness.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="needs Slurm"):
        check_executor("slurm", None)
    assert main(["run", "smoke", "--executor", "slurm", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fractalbench: error: --executor slurm needs Slurm (`sbatch`, `srun` not on PATH); use "
                   "--executor local or --jobs N on this machine"]
    assert not (tmp_path / "r").exists()


def test_resources_section_defaults_and_no_effect_on_cell_identity():
    plain = tiny()
    assert (plain.resources.gpus, plain.resources.cpus, plain.resources.mem_gb, plain.resources.timeout_min,
            plain.resources.partition) == (None, 4, 16, 240, None)
    sized = tiny(resources={"gpus": 1, "cpus": 8, "partition": "gpu"})
    assert sized.resources.cpus == 8 and sized.digest != plain.digest
    assert cell_digests(sized) == cell_digests(plain)  # editing resources reruns no cell


def test_slurm_jobs_ask_for_the_suites_resources(tmp_path, monkeypatch):
    """The sbatch script submitit writes for a cell (a stand-in `srun` on PATH: there is no Slurm here)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    suite = tiny(resources={"cpus": 8, "mem_gb": 32, "timeout_min": 90, "partition": "gpu"})
    executor = submitit_executor("slurm", RunStore(tmp_path / "run"), suite)
    executor.update_parameters(gpus_per_node=slurm_gpus("cuda", suite.resources))
    script = executor._executor._make_submission_file_text("CMD", "uid")
    for line in ("--cpus-per-task=8", "--mem=32GB", "--time=90", "--partition=gpu", "--gpus-per-node=1",
                 "--job-name=fractalbench-t", f"--output={tmp_path / 'run' / 'submitit'}/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in script
    assert (slurm_gpus("cpu", suite.resources), slurm_gpus("cuda", tiny(resources={"gpus": 2}).resources)) == (0, 2)
