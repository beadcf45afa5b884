"""Per-module profile: MACs and parameters add up, shares are fractions, the text table, errors."""
import pytest
import torch
from torch import nn

from fractalbench.harness.metrics import count_macs, format_profile, profile_model


def test_resnet20_profile_adds_up():
    table = profile_model("resnet20", input_size=32, device="cpu", batch_size=2, in_chans=3, num_classes=10, repeats=2,
                          warmup=1)
    rows = {r["module"]: r for r in table}
    root = table[0]
    assert root["module"] == "CifarResNet" and root["depth"] == 0
    assert root["macs"] == 2 * 40_551_040  # MACs of the whole batch of 2
    assert root["params"] == 269_722 and root["macs_share"] == 1.0
    children = ["stem", "layer1", "layer2", "layer3", "head"]
    assert sum(rows[c]["macs"] for c in children) == root["macs"]
    assert sum(rows[c]["params"] for c in children) == root["params"]
    assert rows["layer1.0.conv1"]["macs"] == 2 * 16 * 16 * 9 * 32 * 32 and rows["layer1.0.conv1"]["type"] == "Conv2d"
    assert rows["head.2"]["macs"] == 2 * 64 * 10
    assert root["time_share"] == pytest.approx(1.0)
    assert all(0 <= r["time_share"] <= 1.0 + 1e-9 for r in table)
    assert sum(rows[c]["time_share"] for c in children) <= 1.0 + 1e-9
    assert rows["layer1.0"]["calls"] == 1


def test_profile_of_a_module_and_its_text_table():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    table = profile_model(model, input_size=(1, 6, 6), repeats=1, warmup=0)
    assert [r["module"] for r in table] == ["Sequential", "0", "1", "2", "3"]
    assert table[1]["macs"] == 2 * 9 * 16 and table[4]["macs"] == 32 * 3
    assert table[0]["macs"] == count_macs(model, torch.randn(1, 1, 6, 6)).total
    text = format_profile(table)
    assert text.splitlines()[0].split() == ["module", "type", "params", "MACs", "MACs", "%", "time", "ms", "time", "%"]
    assert "Conv2d" in text and "FLOPs = 2 x MACs" in text
    assert "Linear" not in format_profile(table, max_depth=0)


def test_profile_lists_ops_without_a_formula():
    table = profile_model(_BilinearNet(), input_size=(1, 1, 3), repeats=1, warmup=0)
    assert table[0]["unsupported_ops"] == {"aten._trilinear": 1}
    assert "aten._trilinear" in format_profile(table)


class _BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(3, 3, 2)

    def forward(self, x):
        v = x.flatten(1)
        return self.bil(v, v)


def test_profile_errors():
    with pytest.raises(ValueError, match="allowed: cpu, cuda or cuda:N"):
        profile_model("resnet20", device="npu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            profile_model("resnet20", device="cuda:1")
    with pytest.raises(ValueError, match="batch size"):
        profile_model("resnet20", batch_size=0)
    with pytest.raises(ValueError, match="unknown model"):
        profile_model("resnet21")
