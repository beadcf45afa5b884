"""Every bad input gets one line on stderr and exit code 2; no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

from fractalbench.harness.checkpoints import save_checkpoint
from fractalbench.harness.registry import create_model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, message", [
    (["run", "nosuch"], "unknown suite 'nosuch'"),
    (["run", "smoke", "--models", "resnet99"], "unknown model in suite smoke 'resnet99'"),
    (["run", "smoke", "--device", "cuda"], "no CUDA device"),
    (["profile", "resnet2"], "unknown model 'resnet2'"),
    (["show", "/nonexistent/run"], "not a fractalbench run directory"),
    (["run", "smoke", "--data-root", "/nonexistent/data"], "--data-root /nonexistent/data is not a directory"),
    (["report", "/nonexistent/run"], "not a fractalbench run directory"),
    (["evaluate", "resnet20", "--checkpoint", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
    (["evaluate", "resnet20", "--weights", "x.pt", "--dataset", "cifar10", "--root", "/nonexistent"],
     "dataset cifar10: files not found"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("fractalbench: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["run", "smoke", "--device", "gpu"], "'gpu' is not a device; allowed: cpu, cuda, cuda:N"),
    (["profile", "resnet20", "--batch-size", "0"], "must be >= 1, got 0"),
    (["list", "things"], "invalid choice: 'things'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["compare", "a"], "the following arguments are required: candidate"),
    (["compare", "a", "b", "--latency-ratio", "fast"], "argument --latency-ratio: 'fast' is not a number"),
    (["baseline", "runs/smoke"], "the following arguments are required: FILE"),
])
def test_bad_cli_values_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("fractalbench: error: ") and len(err.strip().splitlines()) == 1


def test_compare_options_are_the_comparison_thresholds():
    """Every threshold of fractalbench.reports.compare has a `fractalbench compare` option, and the defaults the
    help states are the real ones."""
    from fractalbench.harness.cli import COMPARE_THRESHOLDS, build_parser
    from fractalbench.reports.compare import Thresholds

    assert tuple(COMPARE_THRESHOLDS) == Thresholds.names()
    assert {n: float(d) for n, (_, _, d) in COMPARE_THRESHOLDS.items()} == vars(Thresholds())
    args = build_parser().parse_args(["compare", "a", "b", "--accuracy-points", "0.5", "--latency-ratio", "1.5",
                                      "--memory-ratio", "2", "--p-value", "0.05", "--exit-drift-p-value", "0.001"])
    assert (args.accuracy_points, args.latency_ratio, args.memory_ratio, args.p_value, args.exit_drift_p_value) == \
        (0.5, 1.5, 2.0, 0.05, 0.001)


def test_corrupt_and_mismatched_checkpoint_via_cli(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    code, _, err = run_cli(capsys, "evaluate", "resnet20", "--checkpoint", str(bad), "--image-size", "8")
    assert code == 2 and f"checkpoint {bad} is corrupt" in err
    other = tmp_path / "r32.pt"
    save_checkpoint(other, create_model("resnet32", in_chans=1))
    code, _, err = run_cli(capsys, "evaluate", "resnet20", "--checkpoint", str(other), "--image-size", "8")
    assert code == 2 and "does not match the model" in err and len(err.strip().splitlines()) == 1


def test_malformed_suite_file_via_cli(capsys, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndatasets: [digits]\nmodels: [resnet20]\ntrain: {epochs: -1}\n")
    code, _, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and f"suite {path}: field 'train.epochs': must be a whole number >= 0, got -1" in err


def test_list_and_run_and_show(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "list", "models", "--pattern", "resnet5*")
    assert code == 0 and "resnet56" in out and "resnet20" not in out
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndatasets: [{name: digits, image_size: 8}]\nmodels: [linear]\n"
                    "train: {epochs: 1, batch_size: 32}\n")
    code, out, _ = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "run"), "--no-report")
    assert code == 0 and "1 cell(s) finished" in out
    code, out, _ = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "run"), "--no-report")
    assert code == 0 and "1 skipped (already done)" in out
    code, out, _ = run_cli(capsys, "show", str(tmp_path / "run"), "--metric", "top1")
    assert code == 0 and "top1" in out and "linear" in out


def test_data_root_overrides_the_suites_root_and_is_recorded(capsys, tmp_path):
    import json

    from image_fixtures import write_image_folder

    data = write_image_folder(tmp_path / "elsewhere")
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndatasets: [{name: imagefolder, root: /no/such/folder}]\nmodels: [linear]\n"
                    "train: {epochs: 1, batch_size: 4}\n")
    code, _, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "bad"), "--no-report")
    assert code == 2 and "/no/such/folder/train/<class>/" in err  # the suite's own root is used without the flag
    code, out, _ = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "run"), "--no-report",
                           "--data-root", str(data))
    assert code == 0 and "1 cell(s) finished" in out and "0 failed" in out
    (cell,) = (tmp_path / "run" / "cells").glob("*.json")
    assert str(data) in json.loads(cell.read_text())["meta"]["data"]["source"]


def test_export_copies_results_and_report_but_no_checkpoints(capsys, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndatasets: [{name: digits, image_size: 8}]\nmodels: [linear]\n"
                    "train: {epochs: 1, batch_size: 32}\n")
    assert run_cli(capsys, "run", str(path), "--out", str(tmp_path / "run"))[0] == 0
    assert (tmp_path / "run" / "artifacts" / "linear__digits8__cpu" / "model.pt").is_file()
    code, out, _ = run_cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "results"),
                           "--command", "fractalbench run s.yaml --out run")
    assert code == 0 and "exported" in out
    files = {p.relative_to(tmp_path / "results").as_posix() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert {"results.csv", "results.json", "environment.json", "suite.json", "report.html", "COMMAND",
            "cells/linear__digits8__cpu.json"} <= files
    assert not any(f.endswith(".pt") or f.startswith("artifacts") for f in files)
    assert (tmp_path / "results" / "COMMAND").read_text() == "fractalbench run s.yaml --out run\n"
    code, _, err = run_cli(capsys, "export", str(tmp_path / "nothing"), str(tmp_path / "r2"), "--command", "x")
    assert code == 2 and "does not exist" in err


def test_console_script_exit_code_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "fractalbench", "run", "nosuch"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("fractalbench: error: unknown suite 'nosuch'")
