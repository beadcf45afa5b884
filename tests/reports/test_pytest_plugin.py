"""The ``benchmark_model`` fixture, run in an inner pytest session with pytest-benchmark."""
import json

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
    result = pytester.runpytest_inprocess("-p", "reports.pytest_plugin", "-p", "no:cacheprovider", "-q",
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
