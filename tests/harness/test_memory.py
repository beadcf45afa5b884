"""Memory: weights by hand, activation peaks of a model whose activations are known exactly,
the fresh-process measurement against torch's own accounting, and errors."""
import json
import mmap
import sys

import pytest
import torch
from torch import nn

from fractalbench.harness.metrics import MemorySettings, measure_memory, memory_rows, weight_bytes
from fractalbench.harness.metrics.memory import _proc_status, can_reset_peak_rss, reset_peak_rss, torch_peak_bytes
from fractalbench.harness.registry import ModelSpec, unregister_model

MiB = 2**20

BLOB_PLUGIN = '''
import torch
from torch import nn
from fractalbench.harness.registry import ModelCard, list_models, register_model


class Blob(nn.Module):
    """forward makes one activation of exactly 64 x the input (x.repeat), then reduces it."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (x.repeat(1, 64, 1, 1) * 1).amax(dim=(2, 3))[:, : self.num_classes] * self.scale


if "memtest_blob" not in list_models():
    register_model("memtest_blob", card=ModelCard(family="test", paper="none"))(
        lambda *, num_classes=10, in_chans=3: Blob(num_classes))
'''


@pytest.fixture
def blob(tmp_path):
    plugin = tmp_path / "blob_plugin.py"
    plugin.write_text(BLOB_PLUGIN, encoding="utf-8")
    from fractalbench.harness.metrics._worker import _load_plugins

    _load_plugins([str(plugin)])
    yield str(plugin)
    unregister_model("memtest_blob")


def blob_activation_mib(batch, shape):
    """x.repeat(1, 64, 1, 1) and the product (x 1) are each 64 x the input; both are alive at once."""
    c, h, w = shape
    return 2 * batch * 64 * c * h * w * 4 / MiB


def test_weight_bytes_by_hand():
    assert weight_bytes(nn.Linear(10, 5)) == (10 * 5 + 5) * 4
    bn = nn.BatchNorm1d(3)  # weight, bias, running_mean, running_var (float32) + num_batches_tracked (int64)
    assert weight_bytes(bn) == 4 * 3 * 4 + 8
    shared = nn.Linear(4, 4)
    assert weight_bytes(nn.Sequential(shared, shared)) == (16 + 4) * 4
    assert weight_bytes(nn.Linear(4, 4).half()) == (16 + 4) * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux")
def test_peak_rss_can_be_reset_here():
    assert can_reset_peak_rss()
    block = mmap.mmap(-1, 64 * MiB)  # anonymous pages, touched, then unmapped: RSS rises and falls back
    for offset in range(0, 64 * MiB, 4096):
        block[offset] = 1
    block.close()
    status = _proc_status()
    assert status["VmHWM"] - status["VmRSS"] >= 60 * MiB
    assert reset_peak_rss()
    status = _proc_status()
    assert status["VmHWM"] - status["VmRSS"] < 8 * MiB


def test_torch_accounting_of_a_known_allocation():
    result = torch_peak_bytes(lambda: torch.ones(3 * MiB // 4) + 1)  # two 3 MiB tensors alive together
    assert 6 * MiB <= result["bytes"] <= 6 * MiB + 1024  # plus a few bytes for the wrapped scalar


def test_isolated_peak_of_a_known_activation_agrees_with_torch(blob):
    shape, batch = (3, 64, 64), 4
    expected = blob_activation_mib(batch, shape)  # 24 MiB
    rows = memory_rows(ModelSpec("memtest_blob"), None, shape, MemorySettings(batch_size=batch, plugins=(blob,)),
                       model="blob", device="cpu")
    by = {r["metric"]: r for r in rows}
    assert all(r["error"] == "" for r in rows), rows
    assert by["memory_weights"]["value"] == 4 / MiB  # one float32 parameter
    peak = by["memory_peak_activations"]
    detail = json.loads(peak["detail"])
    assert detail["method"] == "vmhwm" and detail["isolated"] is True and peak["batch_size"] == batch
    assert expected * 0.98 <= peak["value"] <= expected * 1.10  # RSS pages: reused heap pages can shave a little
    assert by["memory_peak_torch"]["value"] == pytest.approx(expected, rel=0.01)
    assert peak["value"] == pytest.approx(by["memory_peak_torch"]["value"], rel=0.10)


def test_ru_maxrss_fallback_in_fresh_processes(blob):
    shape, batch = (3, 64, 64), 16
    expected = blob_activation_mib(batch, shape)  # 96 MiB: above anything the process peaked at before
    rows = memory_rows(ModelSpec("memtest_blob"), None, shape,
                       MemorySettings(batch_size=batch, method="ru_maxrss", plugins=(blob,)))
    peak = [r for r in rows if r["metric"] == "memory_peak_activations"][0]
    assert peak["error"] == "", peak
    assert json.loads(peak["detail"])["method"] == "ru_maxrss"
    assert expected <= peak["value"] <= expected * 1.25  # first-call allocations are included


def test_in_process_rows_cover_every_forced_exit(tiny_models):
    model = tiny_models["tiny_two_exit"]()
    rows = measure_memory(model, (2, 4, 4),
                          MemorySettings(batch_size=2, isolate=False, repeats=1, torch_accounting=False), model="tiny")
    assert [(r["metric"], r["exit"]) for r in rows] == [
        ("memory_weights", None), ("memory_peak_activations", None), ("memory_peak_activations", 0),
        ("memory_peak_activations", 1)]
    assert rows[0]["value"] == weight_bytes(model) / MiB
    assert all(r["value"] >= 0 and r["model"] == "tiny" and r["device"] == "cpu" for r in rows)
    assert model.training  # measured in eval mode, restored afterwards


def test_bad_input_raises():
    spec = ModelSpec("linear")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        memory_rows(spec, None, (1, 3, 8, 8), MemorySettings())
    with pytest.raises(ValueError, match="'method'"):
        MemorySettings(method="guess")
    with pytest.raises(ValueError, match="allowed: cpu, cuda or cuda:N"):
        memory_rows(spec, None, (3, 8, 8), MemorySettings(device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            memory_rows(spec, None, (3, 8, 8), MemorySettings(device="cuda"))
    with pytest.raises(ValueError, match="exits 0..0"):
        measure_memory(nn.Linear(3, 2), (3, 1, 1), MemorySettings(isolate=False), paths=[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peak_of_a_known_activation(blob):
    shape, batch = (3, 64, 64), 4
    rows = memory_rows(ModelSpec("memtest_blob"), None, shape,
                       MemorySettings(batch_size=batch, device="cuda", plugins=(blob,)))
    by = {r["metric"]: r for r in rows}
    expected = blob_activation_mib(batch, shape)
    assert by["memory_peak_activations"]["value"] == pytest.approx(expected, rel=0.02)
    assert by["memory_peak_reserved"]["value"] >= by["memory_peak_activations"]["value"] * 0.9
