"""The researcher's daily loop gives no silent wrong answer (issue 24's findings, one test each)."""
import json

import pytest
from cli_helpers import run_cli

from fractalbench.harness.checkpoints import read_checkpoint


@pytest.fixture(scope="module")
def digits8_run(tmp_path_factory):
    """A ResNet-20 trained one epoch on the 8x8 digits (their native size) by a suite run."""
    root = tmp_path_factory.mktemp("digits8")
    suite = root / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: [resnet20]\n"
                     "train: {epochs: 1, batch_size: 64}\nmetrics: [accuracy]\n")
    from fractalbench.harness.cli import main

    assert main(["run", str(suite), "--out", str(root / "run"), "--no-report", "--no-progress"]) == 0
    (cell,) = (root / "run" / "cells").glob("*.json")
    record = json.loads(cell.read_text())
    top1 = next(r["value"] for r in record["rows"] if r["metric"] == "top1" and r.get("split", "test") == "test"
                and r.get("policy") in (None, "") and r.get("exit") in (None, 0))
    return root / "run" / "artifacts" / cell.stem / "model.pt", top1


def test_checkpoint_records_the_data_it_was_trained_on(digits8_run):
    checkpoint, _ = digits8_run
    data = read_checkpoint(checkpoint)["spec"]["data"]
    assert data["dataset"]["name"] == "digits" and data["image_size"] == 8
    assert data["num_classes"] == 10 and data["in_chans"] == 1
    assert len(data["normalisation"]["mean"]) == 1 and data["normalisation"]["std"][0] > 0


def test_evaluate_uses_the_recorded_data_and_reproduces_the_cell(digits8_run, capsys):
    """The finding: evaluated at the default 16x16 a model trained at 8x8 scored near chance, exit 0.
    Now, with nothing but the checkpoint, evaluate measures it as the cell did: the same top-1."""
    checkpoint, top1 = digits8_run
    code, out, err = run_cli(capsys, "evaluate", "--checkpoint", str(checkpoint))
    assert code == 0, err
    assert "dataset: digits test split" in out and "8x8" in out and "as the checkpoint records" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("0 "))
    assert float(row.split()[1]) == pytest.approx(top1, abs=0.005)


def test_evaluate_says_when_it_is_told_otherwise(digits8_run, capsys):
    checkpoint, _ = digits8_run
    code, out, _ = run_cli(capsys, "evaluate", "--checkpoint", str(checkpoint), "--image-size", "16")
    assert code == 0 and "trained at 8x8; evaluating at 16x16 as asked" in out


@pytest.mark.parametrize("argv, message", [
    (["resnet32"], "holds a 'resnet20' model; MODEL 'resnet32' was given"),
    (["--kwargs", '{"width": 2}'], "differ from the ones checkpoint"),
    (["--dataset", "synthetic"], "was trained for"),
])
def test_evaluate_refuses_the_mismatches_it_can_see(digits8_run, capsys, argv, message):
    checkpoint, _ = digits8_run
    model = argv[:1] if not argv[0].startswith("--") else []
    rest = argv[len(model):]
    code, _, err = run_cli(capsys, "evaluate", *model, "--checkpoint", str(checkpoint), *rest)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ----- stale results: the code that made a cell -----------------------------------------------------

NETS = '''
import torch
from torch import nn


def build(*, num_classes, in_chans, width=WIDTH):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 64, width), nn.ReLU(), nn.Linear(width, num_classes))
'''


def _user_suite(tmp_path, width):
    package = tmp_path / "mynets"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS.replace("WIDTH", str(width)))
    suite = tmp_path / "mysuite.yaml"
    suite.write_text("name: mine\ndatasets: [{name: digits}]\nmodels: [\"mynets.nets:build\", linear]\n"
                     "train: {epochs: 1, batch_size: 64}\nmetrics: [accuracy]\n")
    return suite


def _forget_module(name):
    import sys

    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def test_editing_a_user_model_reruns_its_cell_and_only_its_cell(tmp_path, capsys, monkeypatch):
    """The finding: after editing a width in mynets/nets.py the run said "already done, skipped" and
    kept the old numbers. Now the cell's record names the code's digest and the edit reruns it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = _user_suite(tmp_path, 8)
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", "run", "--no-report")
    assert code == 0 and "2 cell(s) finished" in out
    user_cell = tmp_path / "run" / "cells" / "mynets.nets-build__digits__cpu.json"
    assert json.loads(user_cell.read_text())["meta"]["code"]["kind"] == "user"
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", "run", "--no-report")
    assert "2 skipped (already done)" in out
    _user_suite(tmp_path, 16)  # the edit
    _forget_module("mynets")
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", "run", "--no-report")
    assert code == 0, out
    assert "the code of mynets.nets changed since the cell ran" in out
    assert "1 cell(s) finished, 1 skipped" in out
    assert list((tmp_path / "run" / "stale").glob("rerun-*/mynets.nets-build__digits__cpu.json"))
    params = [r["value"] for r in json.loads(user_cell.read_text())["rows"] if r["metric"] == "params"]
    assert params == [] or params[0] == 64 * 16 + 16 + 16 * 10 + 10


def test_family_version_bump_reruns_and_a_changed_file_is_only_reported(tmp_path, capsys, monkeypatch):
    import dataclasses

    from fractalbench.harness import registry

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: [linear]\ntrain: {epochs: 1}\n"
                     "metrics: [accuracy]\n")
    run = tmp_path / "run"
    assert run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report")[0] == 0
    cell = run / "cells" / "linear__digits__cpu.json"
    record = json.loads(cell.read_text())
    assert record["meta"]["code"]["kind"] == "family" and record["meta"]["code"]["version"] == 1
    record["meta"]["code"]["sha256"] = "0" * 64  # as if the family's file had been edited since
    cell.write_text(json.dumps(record))
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report")
    assert code == 0 and "made by other code: fractalbench.baselines" in out and "1 skipped" in out
    entry = registry.registered("linear")
    monkeypatch.setitem(registry._MODELS, "linear", dataclasses.replace(
        entry, card=dataclasses.replace(entry.card, version=2)))
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report")
    assert code == 0 and "is now version 2 (the cell ran with version 1)" in out and "1 cell(s) finished" in out
    assert json.loads(cell.read_text())["meta"]["code"]["version"] == 2


def test_rerun_and_force_run_chosen_cells_again(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: [linear, {name: linear, label: lin2}]\n"
                     "train: {epochs: 1}\nmetrics: [accuracy]\n")
    run = tmp_path / "run"
    assert run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report")[0] == 0
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report", "--rerun", "lin2")
    assert code == 0 and "lin2__digits__cpu: --rerun" in out and "1 cell(s) finished, 1 skipped" in out
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report", "--force")
    assert code == 0 and "2 cell(s) finished, 0 skipped" in out
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report", "--rerun", "lin3")
    assert code == 2 and "--rerun: no model 'lin3' in suite s; did you mean: lin2, linear?" in err


def test_a_run_continues_from_an_export_taking_only_unchanged_cells(tmp_path, capsys):
    """--from EXPORT: a reference run continued in a later session from what was committed (cells and
    outcomes, no checkpoints). Unchanged cells are taken; an edited entry runs; a backbone that a
    pending cell starts from (cell:LABEL) is not taken, since it has no checkpoint to start from, and
    so neither is its unchanged dependent: it would stand on a backbone that this run trains again."""
    first = ("name: s\ndatasets: [{name: digits}]\nmodels: [linear, {name: linear, label: lin2},\n"
             "  {name: linear, label: base}, {name: linear, label: top, weights: 'cell:base'},\n"
             "  {name: linear, label: side, weights: 'cell:base'}]\n"
             "train: {epochs: 1}\nmetrics: [accuracy]\n")
    suite = tmp_path / "s.yaml"
    suite.write_text(first)
    run, export = tmp_path / "run", tmp_path / "export"
    assert run_cli(capsys, "run", str(suite), "--out", str(run), "--no-report")[0] == 0
    assert run_cli(capsys, "export", str(run), str(export), "--command", "x")[0] == 0
    assert not list(export.rglob("*.pt"))  # no checkpoints travel
    suite.write_text(first.replace("{name: linear, label: lin2}", "{name: linear, label: lin2, train: {lr: 0.5}}")
                     .replace("weights: 'cell:base'", "weights: 'cell:base', train: {lr: 0.2}"))
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "next"), "--no-report",
                           "--from", str(export))
    assert code == 0, out
    assert "linear__digits__cpu: taken from" in out
    assert "lin2__digits__cpu: taken" not in out and "top__digits__cpu: taken" not in out
    assert "base__digits__cpu: taken" not in out  # top runs again and needs base's checkpoint
    assert "side__digits__cpu: taken" not in out  # unchanged, but its base runs again
    assert "4 cell(s) finished, 1 skipped" in out
    taken = json.loads((tmp_path / "next" / "cells" / "linear__digits__cpu.json").read_text())
    assert taken == json.loads((run / "cells" / "linear__digits__cpu.json").read_text())
    assert (tmp_path / "next" / "outcomes" / "linear__digits__cpu.npz").is_file()
    code, _, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "n2"), "--from", str(tmp_path / "no"))
    assert code == 2 and f"--from {tmp_path / 'no'}" in err


def test_a_resume_with_nothing_to_do_builds_nothing_and_keeps_a_current_report(tmp_path, capsys, monkeypatch):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: [linear]\ntrain: {epochs: 1}\n"
                     "metrics: [accuracy]\n")
    run = tmp_path / "run"
    assert run_cli(capsys, "run", str(suite), "--out", str(run))[0] == 0
    written = (run / "report.html").stat().st_mtime_ns
    from fractalbench.harness import preflight

    built = []
    real = preflight._model_problems
    monkeypatch.setattr(preflight, "_model_problems", lambda *a, **k: built.append(a[1].display) or real(*a, **k))
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(run))
    assert code == 0 and "(up to date: no cell changed" in out and built == []  # the finished entry is not built
    assert (run / "report.html").stat().st_mtime_ns == written
    (run / "cells" / "linear__digits__cpu.json").touch()  # a cell newer than the report: drawn again
    code, out, _ = run_cli(capsys, "run", str(suite), "--out", str(run))
    assert code == 0 and "up to date" not in out and (run / "report.html").stat().st_mtime_ns > written


# ----- every suite problem at once; validate; exit shapes ----------------------------------------------

EIGHT_MISTAKES = """name: bad8
datasets: [digits]
models:
  - {name: resnet20, kwarg: {width: 2}}
  - {name: sdn:resnet20}
  - {name: branchynet_resnet2O}
train: {epoch: 1, optimiser: adam}
latancy: {repeats: 3}
policies:
  - {name: confidance}
budgets: [50]
compare: {latency_ratio: 0.9}
"""


def test_a_suite_with_eight_mistakes_is_reported_in_one_run(tmp_path, capsys):
    """The finding: 8 mistakes took 9 runs to clean, one line per run, and never a "did you mean"."""
    path = tmp_path / "bad.yaml"
    path.write_text(EIGHT_MISTAKES)
    for command in ("run", "validate"):
        code, _, err = run_cli(capsys, command, str(path), *(("--out", str(tmp_path / "run")) if command == "run"
                                                              else ()))
        lines = err.strip().splitlines()
        assert code == 2 and lines[0].endswith("suite " + str(path) + ": 8 problems"), err
        expected = ["field 'models[0].kwarg': unknown field; did you mean: kwargs?",
                    "field 'models[2].name': unknown model 'branchynet_resnet2O'; did you mean: branchynet_resnet20",
                    "field 'train.epoch': unknown field; did you mean: epochs?",
                    "field 'train.optimiser': unknown field; did you mean: optimizer?",
                    "field 'latancy': unknown field; did you mean: latency?",
                    "field 'policies[0].name': unknown exit policy 'confidance'; did you mean: confidence?",
                    "field 'budgets[0]': must be a number between 0 and 1, got 50",
                    "field 'compare.latency_ratio': must be a number >= 1, got 0.9"]
        for text in expected:
            assert sum(text in line for line in lines[1:]) == 1, (text, err)
        assert len(lines) == 9
    assert not (tmp_path / "run").exists()  # nothing written


def test_validate_passes_every_shipped_suite(capsys):
    from fractalbench.harness.suites import list_suites

    for name in list_suites():
        code, out, err = run_cli(capsys, "validate", name)
        assert code == 0 and f"fractalbench/suites/{name}.yaml: ok" in out, (name, err)


WRONG_SHAPES = '''
import torch
from torch import nn

from fractalbench.harness.early_exit import EarlyExitNetwork


def squeezed_not(*, num_classes, in_chans):
    return nn.Sequential(nn.Conv2d(in_chans, num_classes, 8))  # logits [B, C, 1, 1] on 8x8 inputs


def flat(*, num_classes, in_chans):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * 64, num_classes))  # only for 8x8 inputs


class TwoExits(EarlyExitNetwork):
    def __init__(self, num_classes, in_chans):
        stages = [nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU()),
                  nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())]
        heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes + 1)),
                 nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))]
        super().__init__(stages, heads)


def two_exits(*, num_classes, in_chans):
    return TwoExits(num_classes, in_chans)
'''


@pytest.fixture
def wrongnets(tmp_path, monkeypatch):
    (tmp_path / "wrongnets").mkdir()
    (tmp_path / "wrongnets" / "__init__.py").write_text("")
    (tmp_path / "wrongnets" / "nets.py").write_text(WRONG_SHAPES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    _forget_module("wrongnets")


def test_wrong_shape_exits_fail_preflight_naming_the_exit(wrongnets, capsys):
    suite = wrongnets / "s.yaml"
    suite.write_text("name: s\ndatasets: [digits]\nmodels: ['wrongnets.nets:squeezed_not', "
                     "'wrongnets.nets:two_exits', linear]\ntrain: {epochs: 1}\n")
    code, _, err = run_cli(capsys, "run", str(suite), "--out", "run")
    assert code == 2 and not (wrongnets / "run").exists()
    assert "models[0].name': model 'wrongnets.nets:squeezed_not': forward returns logits of shape [2, 10, 1, 1]" in err
    assert "models[1].name': model 'wrongnets.nets:two_exits': exit 0 of 2 returns logits of shape [2, 11]" in err
    assert "exit 1 of 2" not in err and "Traceback" not in err


@pytest.mark.parametrize("model, size, message", [
    ("wrongnets.nets:squeezed_not", "8", "exit shapes: FAIL: forward returns logits of shape [8, 10, 1, 1]"),
    ("wrongnets.nets:squeezed_not", None, "exit shapes: FAIL: forward returns logits of shape [8, 10, 25, 25]"),
    ("wrongnets.nets:flat", None, "exit shapes: FAIL: forward_exits on a batch [8, 3, 32, 32] failed: RuntimeError"),
    ("wrongnets.nets:two_exits", None, "exit shapes: FAIL: exit 0 of 2 returns logits of shape [8, 11]"),
])
def test_check_never_raises_a_defect_is_a_fail_line(wrongnets, capsys, model, size, message):
    """The finding: "forced exits: ok" then five lines of ValueError, or a whole traceback, exit 1."""
    code, out, err = run_cli(capsys, "check", model, *(("--input-size", size) if size else ()))
    assert code == 1 and message in out and "Traceback" not in out + err and err == ""
    assert out.count("skipped (the") == 7 and "ok" not in out.replace("ok (", "")


# ----- show and export for people -------------------------------------------------------------------------

def test_show_is_wide_readable_filtered_and_strict(digits8_run, capsys):
    run = digits8_run[0].parents[2]
    code, out, _ = run_cli(capsys, "show", str(run))
    header, row = out.splitlines()[:2]
    assert code == 0 and "top1 (%)" in header and "params (count)" in header and "e+" not in out
    assert "0.27 M" in row or " k" in row  # ResNet-20's parameters in k/M, not 2.7e+05
    code, out, _ = run_cli(capsys, "show", str(run), "--model", "resnet*", "--metric", "top1", "--exit", "0")
    assert code == 0 and len(out.strip().splitlines()) == 2 and out.splitlines()[1].split()[3] == "0"
    code, _, err = run_cli(capsys, "show", str(run), "--metric", "top11")
    assert code == 2 and "--metric top11: no such metric" in err and "did you mean: top1" in err
    code, _, err = run_cli(capsys, "show", str(run), "--model", "resnet2")
    assert code == 2 and "did you mean: resnet20" in err
    code, out, _ = run_cli(capsys, "show", str(run), "--long", "--metric", "top1")
    assert code == 0 and out.splitlines()[0].split()[-3:] == ["metric", "unit", "value"]


def test_show_into_a_closed_pipe_is_quiet(digits8_run):
    import subprocess
    import sys

    run = digits8_run[0].parents[2]
    proc = subprocess.run(f"'{sys.executable}' -m fractalbench show '{run}' --long | head -1", shell=True,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1 and proc.stderr == ""


def test_export_takes_the_recorded_command(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: [linear]\ntrain: {epochs: 1}\n"
                     "metrics: [accuracy]\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fractalbench", "run", str(suite), "--out", str(tmp_path / "run"),
                           "--no-report"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    code, out, _ = run_cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "dest"))
    assert code == 0 and (tmp_path / "dest" / "COMMAND").read_text().startswith(
        f"fractalbench run {suite} --out {tmp_path / 'run'} --no-report")


# ----- import paths from the working directory ------------------------------------------------------------

def test_the_working_directory_is_importable_for_the_fractalbench_command(tmp_path):
    """The finding: from the folder holding mynets/, `fractalbench check mynets.nets:build` and
    `fractalbench run mysuite.yaml` failed with "no module named 'mynets'" unless PYTHONPATH was set.
    The run measures latency in an isolated worker process, which must import mynets too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "fractalbench"
    if not script.is_file():
        pytest.skip(f"no fractalbench script beside {sys.executable} (not installed into this environment)")
    _user_suite(tmp_path, 8)
    (tmp_path / "mysuite.yaml").write_text(
        "name: mine\ndatasets: [{name: digits}]\nmodels: [\"mynets.nets:build\"]\ntrain: {epochs: 1}\n"
        "metrics: [accuracy, latency]\nlatency: {repeats: 3, warmup: 1, stream_samples: 4, isolate: true}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([str(script), "check", "mynets.nets:build", "--input-size", "8"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert "no module named" not in check.stderr and "exit shapes: ok" in check.stdout, check.stderr
    run = subprocess.run([str(script), "run", "mysuite.yaml", "--out", "run", "--no-report"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(next((tmp_path / "run" / "cells").glob("*.json")).read_text())["rows"]
    latency = [r for r in rows if r["metric"] == "latency"]
    assert latency and all(r["value"] > 0 and not r.get("error") for r in latency)
    from fractalbench.harness.results import detail_of

    assert all(detail_of(r["detail"]).get("isolated") is True for r in latency)


# ----- comparable operating points: budgets in absolute MACs ------------------------------------------------

def test_decision_threshold_fits_an_absolute_budget():
    from fractalbench.harness.calibration import fit_decision_threshold

    def measure(t):  # cost falls linearly from 100 (threshold 0: everything runs) to 20 (threshold 1)
        return 100.0 - 80.0 * t, 90.0 - 10.0 * t

    fit = fit_decision_threshold(measure, None, budget_macs=60.0, iterations=10)
    assert fit.budget_macs == 60.0 and fit.meets_budget and 59.9 <= fit.expected_macs <= 60.0
    fraction = fit_decision_threshold(measure, 0.5, iterations=10)  # 20 + 0.5 x 80 = the same 60
    assert fraction.policy.value == pytest.approx(fit.policy.value)
    with pytest.raises(ValueError, match="give one of budget_fraction and budget_macs"):
        fit_decision_threshold(measure, 0.5, budget_macs=60.0)


def test_every_model_gets_a_point_at_the_same_absolute_cost(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: ['sdn:resnet20', branchynet_resnet20]\n"
                     "train: {epochs: 0}\nmetrics: [accuracy, cost, sweep]\nbudgets: [0.5, {macs: 1.5e+6}]\n")
    assert run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "run"), "--no-report")[0] == 0
    from fractalbench.harness.results import detail_of, load_run

    frame = load_run(tmp_path / "run")
    points = frame[(frame["metric"] == "policy_top1") & (frame["policy"] == "confidence@macs1.5M")]
    assert sorted(points["model"]) == ["branchynet_resnet20", "sdn:resnet20"]
    for _, row in points.iterrows():
        detail = detail_of(row["detail"])
        assert detail["budget_macs"] == 1.5e6 and detail["budget_absolute_macs"] == 1.5e6
        assert detail["fitted_on"] == "validation" and detail["budget_fraction"] is None
        assert detail["validation_expected_macs"] <= 1.5e6 or detail["meets_budget"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text(suite.read_text().replace("{macs: 1.5e+6}", "{mac: 1.5e6}, {macs: 1.5e6}"))
    code, _, err = run_cli(capsys, "validate", str(bad))
    assert code == 2 and "field 'budgets[1]': mac: unknown field; did you mean: macs?" in err
    assert "field 'budgets[2]': macs: must be a number > 0, got '1.5e6' (a string: YAML reads" in err


# ----- exit policies of users ---------------------------------------------------------------------------------

MARGIN = '''
import torch

from fractalbench.harness.policies import ExitPolicy


class Margin(ExitPolicy):
    """Leave when the top-1 softmax probability beats the runner-up by at least the threshold."""

    default_grid = (0.0, 0.2, 0.5, 0.8, 1.01)

    def decide(self, k, logits, state):
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        return (top2[:, 0] - top2[:, 1]) >= self.threshold_at(k), state
'''


def test_a_users_exit_policy_by_import_path_and_by_registration(tmp_path, capsys, monkeypatch):
    from fractalbench.harness import policies
    from fractalbench.harness.results import detail_of, load_run

    (tmp_path / "mypol.py").write_text(MARGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ndatasets: [{name: digits}]\nmodels: ['sdn:resnet20']\ntrain: {epochs: 0}\n"
                     "metrics: [accuracy, cost, sweep]\npolicies: [{name: 'mypol:Margin'}, {name: margin2, "
                     "grid: [0.1, 0.3]}]\nbudgets: [0.5]\n")
    code, _, err = run_cli(capsys, "validate", str(suite))
    assert code == 2 and "unknown exit policy 'margin2'" in err
    import mypol

    policies.register_policy("margin2", mypol.Margin)
    try:
        code, _, err = run_cli(capsys, "run", str(suite), "--out", str(tmp_path / "run"), "--no-report")
        assert code == 0, err
        frame = load_run(tmp_path / "run")
        rows = frame[frame["metric"] == "policy_top1"]
        grid = rows[rows["policy"] == "mypol:Margin"]
        assert sorted(grid["threshold"]) == [0.0, 0.2, 0.5, 0.8, 1.01]  # its default_grid
        assert sorted(rows[rows["policy"] == "margin2"]["threshold"]) == [0.1, 0.3]  # the suite's grid
        (fit,) = rows[rows["policy"] == "mypol:Margin@budget0.5"].itertuples()
        assert detail_of(fit.detail)["fitted_on"] == "validation"
        # threshold 1.01 never leaves early: the whole cascade, the forced last exit's accuracy
        last = frame[(frame["metric"] == "top1") & (frame["exit"] == frame["exit"].max())]["value"].iloc[0]
        assert grid[grid["threshold"] == 1.01]["value"].iloc[0] == pytest.approx(last)
    finally:
        policies.unregister_policy("margin2")
        _forget_module("mypol")


def test_benchmark_takes_several_models_and_returns_one_frame(tmp_path):
    from torch import nn

    from fractalbench import benchmark

    mine = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    frame = benchmark(["linear", mine, "sdn:resnet20"], {"name": "digits"}, ["accuracy", "cost"],
                      train={"epochs": 1, "batch_size": 64}, name=["lin", "mine", "sdn"], out=tmp_path / "run",
                      as_frame=True)
    assert sorted(frame["model"].unique()) == ["lin", "mine", "sdn"]
    top1 = frame[(frame["metric"] == "top1")].groupby("model")["exit"].count().to_dict()
    assert top1 == {"lin": 1, "mine": 1, "sdn": 7}  # SDN-ResNet-20: 6 internal classifiers and the last exit
    assert len(list((tmp_path / "run" / "cells").glob("*.json"))) == 3
    with pytest.raises(ValueError, match="must be a list of 2 names"):
        benchmark(["linear", "linear"], "digits", name="x")
    with pytest.raises(ValueError, match="the same name 'linear'"):
        benchmark(["linear", "linear"], "digits")
