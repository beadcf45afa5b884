"""FBS really skips channels: its batch-1 latency saving follows its MACs saving. Run
`python benchmarks/fbs_latency.py` to print the numbers, or `pytest -m slow benchmarks/fbs_latency.py`
to check the target (``make bench`` collects only ``benchmarks/test_*.py``, so not this file).

Setup: ``fbs_resnet56`` (FBS on both 3x3 convs of every block of ResNet-56) at 32x32, random weights
from a fixed seed (latency and MACs depend on how many channels each conv keeps, not on what the
weights learned), BatchNorm statistics estimated on random images at each density (forward passes in
training mode, no gradient steps) so that activations stay finite. One intra-op and one inter-op
thread, batch 1, ``mode="compact"``; a stream of distinct inputs.

Measured with the harness's own machinery:

- MACs: ``build_cost_table`` at batch 1 and ``expected_macs`` over the trace of the real dynamic
  forward at each density (every sample of a density executes the same MACs: k = ceil(d C) channels
  per gated conv). macs_saving(d) = 1 - macs(d) / macs(1.0).
- latency: ``time_calls`` (perf_counter_ns) around ``dynamic_forward`` at batch 1, the configurations
  interleaved round by round (so background load hits them alike), median over every timed call.
  latency_saving(d) = 1 - median(d) / median(1.0).

Two references separate FBS's own overhead (saliency predictors, top-k, gathering weights) from what
the convolution kernels allow at these widths:

- ``resnet56``: the dense network (no predictors) at batch 1;
- ``static floor``: the same convolution shapes as FBS at each density (conv1 C_in -> k1,
  conv2 k1 -> k2, the kept channels added into the shortcut) with weights sliced once beforehand and
  BN folded in, no predictor and no top-k: the latency of the narrow convolutions alone.
  floor ratio = its latency saving / FBS's MACs saving (the best FBS's compact path could reach with
  this backend; PyTorch's CPU convolution for these small 3x3 layers at batch 1 is im2col + GEMM, whose
  im2col part scales with the input channels, not with the kept output channels).

Target (the issue): at density 0.5, latency_saving >= 0.85 x macs_saving.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fractalbench.baselines.dynamic_width import FBSResNet, kept_channels  # noqa: E402
from fractalbench.harness import contract  # noqa: E402
from fractalbench.harness.metrics.flops import build_cost_table, expected_macs  # noqa: E402
from fractalbench.harness.metrics.timing import set_threads, time_calls  # noqa: E402
from fractalbench.harness.registry import create_model  # noqa: E402
from fractalbench.harness.train import seed_everything  # noqa: E402

MODEL = "fbs_resnet56"
DENSITIES = (1.0, 0.5, 0.25)
TARGET_DENSITY = 0.5
MIN_LATENCY_TO_MACS_SAVING = 0.85
SEED = 0
STREAM = 32  # distinct inputs cycled through
ROUNDS = 12
CALLS_PER_ROUND = 10
WARMUP = 5


@torch.no_grad()
def settle_batchnorm(model: nn.Module, images: Tensor) -> None:
    """Running mean/variance := their average over ``images`` (training-mode forward, no gradient)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(images)
    model.eval()


class StaticFloor:
    """The convolutions FBS runs at one density, with nothing dynamic: for every block, conv1's first
    k1 output rows and conv2's first k2 x k1 weights (contiguous, BN folded in, sliced once here),
    conv2's output added into the shortcut's first k2 channels by ``index_add``, ReLUs."""

    def __init__(self, model: FBSResNet, density: float) -> None:
        self.model = model
        self.blocks = []
        folds = model._bn_folds()
        for i, block in enumerate(model.blocks):
            k1 = kept_channels(block.conv1.out_channels, density)
            k2 = kept_channels(block.conv2.out_channels, density)
            (s1, t1), (s2, t2) = folds[2 * i], folds[2 * i + 1]
            w1 = (block.conv1.weight[:k1] * s1[:k1, None, None, None]).contiguous()
            w2 = (block.conv2.weight[:k2, :k1] * s2[:k2, None, None, None]).contiguous()
            idx2 = torch.arange(k2)
            self.blocks.append((block, w1, t1[:k1].contiguous(), w2, t2[:k2].contiguous(), idx2,
                                k2 == block.conv2.out_channels))

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        b = self.model.backbone
        h = b.stem(x)
        for block, w1, c1, w2, c2, idx2, full in self.blocks:
            o = F.conv2d(h, w1, c1, block.conv1.stride, 1).relu_()
            r = F.conv2d(o, w2, c2, 1, 1)
            out = block.shortcut(h)
            h = (out + r if full else out.index_add(1, idx2, r)).relu_()
        return b.head(h)


def fbs_savings(model_name: str = MODEL) -> dict:
    """MACs and batch-1 latency of FBS at each density, of the dense ResNet-56 and of the static floor."""
    seed_everything(SEED)
    previous = set_threads(1, 1)
    try:
        model = create_model(model_name)
        dense = create_model("resnet56")
        gen = torch.Generator().manual_seed(SEED)
        images = torch.randn(64, 3, 32, 32, generator=gen)
        stream = torch.randn(STREAM, 3, 32, 32, generator=gen)
        settle_batchnorm(dense, images)
        models, floors = {}, {}
        macs, macs_per_sample = {}, {}
        for d in DENSITIES:
            m = create_model(model_name, density=d)
            m.load_state_dict(model.state_dict())
            settle_batchnorm(m, images)  # statistics of the kept, boosted channels at this density
            models[d], floors[d] = m, StaticFloor(m, d)
            table = build_cost_table(m, stream[:1])
            with torch.no_grad():
                trace = contract.dynamic_forward(m, stream[:8]).trace
            cost = expected_macs(trace, table)
            macs[d] = cost.mean
            macs_per_sample[d] = sorted(set(cost.per_sample.tolist()))
        dense_macs = float(build_cost_table(dense, stream[:1]).exits[-1])

        calls = {f"fbs@{d:g}": (lambda i, m=models[d]: contract.dynamic_forward(m, stream[i % STREAM:i % STREAM + 1]))
                 for d in DENSITIES}
        calls.update({f"floor@{d:g}": (lambda i, f=floors[d]: f(stream[i % STREAM:i % STREAM + 1])) for d in DENSITIES})
        calls["resnet56"] = lambda i: dense(stream[i % STREAM:i % STREAM + 1])
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for fn in calls.values():  # warm-up
                time_calls(fn, WARMUP)
            for r in range(ROUNDS):
                for name, fn in calls.items():
                    times[name] += time_calls(lambda i, fn=fn, r=r: fn(r * CALLS_PER_ROUND + i), CALLS_PER_ROUND)
        median = {name: statistics.median(ts) for name, ts in times.items()}
    finally:
        set_threads(previous["threads"])

    rows = []
    for d in DENSITIES:
        macs_saving = 1.0 - macs[d] / macs[1.0]
        latency_saving = 1.0 - median[f"fbs@{d:g}"] / median["fbs@1"]
        floor_saving = 1.0 - median[f"floor@{d:g}"] / median["floor@1"]
        rows.append({
            "density": d, "macs": macs[d], "macs_per_sample": macs_per_sample[d], "macs_saving": macs_saving,
            "fbs_ms": median[f"fbs@{d:g}"], "latency_saving": latency_saving,
            "ratio": latency_saving / macs_saving if macs_saving > 0 else float("nan"),
            "floor_ms": median[f"floor@{d:g}"], "floor_saving": floor_saving,
            "floor_ratio": floor_saving / macs_saving if macs_saving > 0 else float("nan"),
            "overhead_ms": median[f"fbs@{d:g}"] - median[f"floor@{d:g}"],
            "vs_dense_latency_saving": 1.0 - median[f"fbs@{d:g}"] / median["resnet56"],
            "vs_dense_macs_saving": 1.0 - macs[d] / dense_macs,
        })
    return {"model": model_name, "threads": 1, "batch_size": 1, "calls_per_config": ROUNDS * CALLS_PER_ROUND,
            "dense_macs": dense_macs, "dense_ms": median["resnet56"], "rows": rows}


def format_result(r: dict) -> str:
    lines = [f"{r['model']} at 32x32, batch 1, {r['threads']} thread, compact mode; median of "
             f"{r['calls_per_config']} interleaved calls per configuration",
             f"  resnet56 (dense, no predictors): {r['dense_macs'] / 1e6:.2f}M MACs, {r['dense_ms']:.2f} ms"]
    for row in r["rows"]:
        lines.append(
            f"  density {row['density']:g}: {row['macs'] / 1e6:.2f}M MACs (every sample: "
            f"{', '.join(f'{m / 1e6:.3f}M' for m in row['macs_per_sample'])}), FBS {row['fbs_ms']:.2f} ms, "
            f"static floor {row['floor_ms']:.2f} ms (FBS overhead {row['overhead_ms']:.2f} ms)")
        if row["density"] < 1.0:
            lines.append(
                f"    vs density 1: MACs saving {row['macs_saving']:.3f}, latency saving {row['latency_saving']:.3f}, "
                f"ratio {row['ratio']:.3f} (target >= {MIN_LATENCY_TO_MACS_SAVING} at {TARGET_DENSITY:g}); "
                f"static floor saving {row['floor_saving']:.3f}, floor ratio {row['floor_ratio']:.3f}")
            lines.append(
                f"    vs dense resnet56: MACs saving {row['vs_dense_macs_saving']:.3f}, latency saving "
                f"{row['vs_dense_latency_saving']:.3f}")
    return "\n".join(lines)


@pytest.mark.slow
def test_fbs_latency_saving_follows_macs_saving():
    result = fbs_savings()
    print("\n" + format_result(result))
    row = next(r for r in result["rows"] if r["density"] == TARGET_DENSITY)
    assert row["macs_saving"] > 0.5
    assert row["latency_saving"] >= MIN_LATENCY_TO_MACS_SAVING * row["macs_saving"]


if __name__ == "__main__":
    print(format_result(fbs_savings(sys.argv[1] if len(sys.argv) > 1 else MODEL)))
