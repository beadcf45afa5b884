"""Everything checkable is checked before the first cell: one line per problem, exit 2, no run
directory; a run with a failed cell exits 1."""
import pytest
import yaml

from fractalbench.harness import registry
from fractalbench.harness.cli import main
from fractalbench.harness.registry import ModelCard, register_model

BASE = {"name": "t", "datasets": [{"name": "digits", "image_size": 8}], "models": ["linear"],
        "train": {"epochs": 1, "max_steps_per_epoch": 2}, "metrics": ["accuracy"]}


def run(tmp_path, capsys, suite, *extra):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--no-report", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("change, message", [
    ({"models": ["branchynet_resnet20"], "policies": [{"name": "confidence", "grid": [0.5, 1.5]}]},
     "field 'policies[0].grid[1]': must be a number between 0 and 1, got 1.5"),
    ({"models": ["branchynet_resnet20"], "policies": [{"name": "entropy", "grid": [-2]}]},
     "field 'policies[0].grid[0]': must be a number >= 0, got -2"),
    ({"models": [{"name": "resnet20", "kwargs": {"no_such_kwarg": 3}}]},
     "field 'models[0].kwargs': model 'resnet20' does not take these options ['no_such_kwarg']"),
    ({"models": [{"name": "resnet20", "attribute_sweep": {"attribute": "nope", "values": [1]}}]},
     "field 'models[0].attribute_sweep.attribute': model 'resnet20' (CifarResNet) has no attribute 'nope'"),
    ({"models": ["timm:no_such_net"]}, "field 'models[0].name': model 'timm:no_such_net': unknown timm model"),
    ({"train": {"epochs": 1, "batch_size": 100_000_000}},
     "field 'train.batch_size': batch size 100,000,000 is larger than the training split of digits8 "
     "(1,295 samples); no training step would run (allowed: 1 to 1,295)"),
])
def test_each_bad_suite_is_one_line_and_exit_2_before_any_cell(tmp_path, capsys, change, message):
    code, out, err = run(tmp_path, capsys, {**BASE, **change})
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"fractalbench: error: suite {tmp_path / 's.yaml'}: {message}")
    assert not (tmp_path / "run").exists()


def test_every_problem_of_a_suite_is_reported_at_once(tmp_path, capsys):
    suite = {**BASE, "models": [{"name": "resnet20", "kwargs": {"no_such_kwarg": 3}},
                                {"name": "resnet20", "label": "r2",
                                 "attribute_sweep": {"attribute": "nope", "values": [1], "set": {"also_not": 1}}}],
             "train": {"epochs": 1, "batch_size": 100_000_000}}
    code, out, err = run(tmp_path, capsys, suite)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4 and all(line.startswith("fractalbench: error: suite ") for line in lines)
    for field in ("models[0].kwargs", "train.batch_size", "models[1].attribute_sweep.attribute",
                  "models[1].attribute_sweep.set.also_not"):
        assert sum(f"field '{field}'" in line for line in lines) == 1


def test_an_unreadable_suite_file_is_named(tmp_path, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and f"suite {path}: not a YAML text file" in err


@pytest.fixture
def broken_model():
    import torch

    class Raises(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # fails in the cell's training; preflight's eval-mode pass gives logits
            if self.training:
                raise RuntimeError("kaboom in forward")
            return x.flatten(1)[:, :10] * self.w

    register_model("tmp_preflight_raises", card=ModelCard(family="test", paper="none"))(
        lambda *, num_classes, in_chans: Raises())
    yield
    registry.unregister_model("tmp_preflight_raises")


def test_a_run_with_a_failed_cell_exits_1_and_says_how_many(tmp_path, capsys, broken_model):
    code, out, err = run(tmp_path, capsys, {**BASE, "models": ["linear", "tmp_preflight_raises"]})
    assert code == 1
    assert "1 cell(s) failed: tmp_preflight_raises__digits8__cpu" in err
    assert (tmp_path / "run" / "cells" / "linear__digits8__cpu.json").is_file()  # the others ran


AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    from fractalbench.harness.environment import cpu_flags, cpu_native_bf16

    assert cpu_native_bf16(AVX2_EPYC) is False and cpu_native_bf16(SAPPHIRE_RAPIDS) is True
    assert cpu_native_bf16("Features\t: fp asimd bf16 i8mm\n") is True  # Arm
    assert cpu_flags("model name\t: x\n") is None and cpu_native_bf16("") is None  # unknown: no warning


def test_bf16_training_on_a_cpu_without_native_bf16_is_warned_once(tmp_path):
    from fractalbench.harness.preflight import precision_warnings
    from fractalbench.harness.suites import parse_suite

    models = ["linear", {"name": "noop", "train": {"precision": "bf16"}},
              {"name": "skipnet38", "attribute_sweep": {"attribute": "alpha", "values": [1.0],
                                                        "train": {"epochs": 1, "precision": "bf16"}}},
              {"name": "resnet20", "train": {"precision": "bf16", "epochs": 0}}]  # not trained: no warning
    suite = parse_suite({**BASE, "models": models}, "s.yaml")
    (line,) = precision_warnings(suite, ["cpu"], native_bf16=False)
    assert line.startswith("warning: 2 model(s) (noop, skipnet38) train under bf16 autocast on the CPU")
    assert "set `precision: fp32` in the train settings of suite s.yaml" in line
    assert precision_warnings(suite, ["cpu"], native_bf16=True) == []
    assert precision_warnings(suite, ["cuda"], native_bf16=False) == []
    fp32 = parse_suite({**BASE, "train": {**BASE["train"], "precision": "fp32"}}, "s.yaml")
    assert precision_warnings(fp32, ["cpu"], native_bf16=False) == []


def test_the_run_prints_the_bf16_warning(tmp_path, capsys, monkeypatch):
    import fractalbench.harness.environment

    monkeypatch.setattr(fractalbench.harness.environment, "cpu_native_bf16", lambda cpuinfo=None: False)
    code, out, _ = run(tmp_path, capsys, {**BASE, "train": {**BASE["train"], "precision": "bf16"}})
    assert code == 0 and "warning: 1 model(s) (linear) train under bf16 autocast" in out
