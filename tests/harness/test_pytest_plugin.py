"""The ``benchmark_model`` fixture, run in an inner pytest session with pytest-benchmark; the
``pytest11`` entry point that loads it automatically once fractalbench is installed."""
import json
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

INNER = '''
def test_static(benchmark_model):
    out = benchmark_model("resnet20", batch_size=2, input_size=16)
    assert tuple(out.shape) == (2, 10)

def test_forced_exit(benchmark_model):
    out = benchmark_model("branchynet_resnet20", input_size=16, exit=0)
    assert tuple(out.shape) == (1, 10)

def test_policy(benchmark_model):
    out = benchmark_model("branchynet_resnet20", input_size=16, policy="confidence", thresholds=0.5)
    assert tuple(out.logits.shape) == (1, 10)

def test_bad_batch_size(benchmark_model):
    import pytest
    with pytest.raises(ValueError, match="batch_size"):
        benchmark_model("resnet20", batch_size=0)
'''


def test_benchmark_model_fixture(pytester):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "fractalbench.harness.pytest_plugin", "-p", "no:cacheprovider", "-q",
                                          "--benchmark-json=bench.json", "--benchmark-min-rounds=2",
                                          "--benchmark-max-time=0.02", "--benchmark-warmup=off")
    result.assert_outcomes(passed=4)
    data = json.loads((pytester.path / "bench.json").read_text())
    info = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    assert set(info) == {"test_static", "test_forced_exit", "test_policy"}
    assert info["test_static"]["model"] == "resnet20" and info["test_static"]["input_shape"] == [2, 3, 16, 16]
    assert info["test_static"]["params"] == 269722  # ResNet-20, 10 classes, option-A shortcuts (He et al.: 0.27M)
    assert info["test_forced_exit"]["exit"] == 0
    assert info["test_policy"]["policy"] == "confidence" and info["test_policy"]["dynamic_kind"] == "early_exit"
    assert all(b["stats"]["rounds"] >= 2 for b in data["benchmarks"])


ONE_TEST = '''
def test_static(benchmark_model):
    out = benchmark_model("resnet20", batch_size=1, input_size=8)
    assert tuple(out.shape) == (1, 10)
'''


def test_installed_entry_point_names_the_plugin_module():
    """Named like the module, so ``-p fractalbench.harness.pytest_plugin`` / ``pytest_plugins`` find it already
    registered (no 'Plugin already registered under a different name') and ``-p
    no:fractalbench.harness.pytest_plugin`` turns it off. Fails until the project is reinstalled (make setup)."""
    found = [ep for ep in entry_points(group="pytest11") if ep.value == "fractalbench.harness.pytest_plugin"]
    assert [ep.name for ep in found] == ["fractalbench.harness.pytest_plugin"], found


@pytest.mark.parametrize("how", ["entry point only", "-p on the command line", "pytest_plugins in conftest.py"])
def test_fixture_is_available_once_however_it_is_enabled(pytester, how):
    pytester.makepyfile(test_inner=ONE_TEST)
    args = ["-p", "no:cacheprovider", "-q", "--benchmark-disable"]
    if how.startswith("-p"):
        args = ["-p", "fractalbench.harness.pytest_plugin", *args]
    elif how.startswith("pytest_plugins"):
        pytester.makeconftest('pytest_plugins = ["fractalbench.harness.pytest_plugin"]')
    result = pytester.runpytest_inprocess(*args)
    result.assert_outcomes(passed=1)
    assert "already registered" not in result.stdout.str() + result.stderr.str()


def test_plugin_can_be_switched_off(pytester):
    pytester.makepyfile(test_inner=ONE_TEST)
    result = pytester.runpytest_inprocess("-p", "no:fractalbench.harness.pytest_plugin", "-p", "no:cacheprovider", "-q",
                                          "--benchmark-disable")
    result.assert_outcomes(errors=1)
    assert "fixture 'benchmark_model' not found" in result.stdout.str()
