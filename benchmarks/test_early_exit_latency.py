"""BranchyNet really stops early: its batch-1 latency saving follows its MACs saving (marked slow;
`make bench`), or run `python benchmarks/test_early_exit_latency.py` to print the numbers.

Setup: B-ResNet-110 (``branchynet_resnet110``, the paper's network; exit 0 costs about 5% of the
full network's MACs) on the embedded ``digits`` data at 32x32. The weights are not trained (training
the 110-layer network takes minutes on 2 CPU cores): they come from a fixed seed, and only the
BatchNorm running statistics are estimated on training images (forward passes, no gradient
steps), so that every exit gives finite, spread-out entropies instead of exploding activations.
The entropy thresholds are chosen on the VALIDATION split with
``fractalbench.harness.calibration.thresholds_for_fractions`` so that 75% / 12.5% / 12.5% of the validation
samples leave at exits 0 / 1 / 2; the test split is only evaluated. Latency and MACs depend on
which path each sample takes, not on whether its prediction is right, so accuracy is not a target.

Measured with the harness's own machinery:

- MACs: ``build_cost_table`` (forced paths at batch 1) and ``expected_macs`` over the trace of the
  real dynamic forward on every test sample (batch 1, compact mode).
  macs_saving = 1 - expected_macs / full_macs.
- latency: ``latency_rows`` in a fresh worker process, 1 intra-op and 1 inter-op thread, batch 1:
  the policy stream (every test sample once, the policy deciding, ``mode="compact"``) and the
  forced full path (exit 2). latency_saving = 1 - stream_mean / full_mean (means in ms).

Targets: at least half of the test stream leaves at exit 0, and
latency_saving >= 0.7 x macs_saving (an early exit that really stops saves wall time in proportion
to the work it skips; a masked or half-stopping cascade would not).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fractalbench.harness import calibration, contract  # noqa: E402
from fractalbench.harness.checkpoints import save_checkpoint  # noqa: E402
from fractalbench.harness.data import DatasetConfig, load_dataset  # noqa: E402
from fractalbench.harness.evaluate import collect_exit_logits, run_policy, topk_accuracy  # noqa: E402
from fractalbench.harness.metrics.flops import build_cost_table, expected_macs  # noqa: E402
from fractalbench.harness.metrics.latency import LatencySettings, latency_rows  # noqa: E402
from fractalbench.harness.policies import make_policy  # noqa: E402
from fractalbench.harness.registry import ModelSpec  # noqa: E402
from fractalbench.harness.train import seed_everything  # noqa: E402

MODEL = "branchynet_resnet110"
DATASET = DatasetConfig("digits", image_size=32)
VALIDATION_EXIT_SHARES = (0.75, 0.125, 0.125)  # share of validation samples sent to exits 0, 1, 2
MIN_EXIT0_FRACTION = 0.5
MIN_LATENCY_TO_MACS_SAVING = 0.7
SEED = 0
BATCHNORM_SAMPLES = 256


def _detail(row: dict) -> dict:
    return json.loads(row["detail"]) if row.get("detail") else {}


@torch.no_grad()
def estimate_batchnorm_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> None:
    """Replace every BatchNorm's running mean/variance by their average over ``images`` (forward
    passes through every exit in train mode, no gradients, weights unchanged); leaves eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    model.train()
    try:
        for chunk in images.split(batch_size):
            contract.forward_exits(model, chunk)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def early_exit_savings(model_name: str = MODEL, workdir: Path | None = None) -> dict:
    """Exit fractions, MACs (full / expected) and batch-1 latency (full / policy stream) of a
    BranchyNet with validation-calibrated entropy thresholds, on the digits test split."""
    seed_everything(SEED)
    splits = load_dataset(DATASET)
    spec = ModelSpec(model_name, {}, splits.num_classes, splits.in_chans)
    model = spec.build().eval()
    test_x, _test_labels = splits.test.tensors  # type: ignore[attr-defined]
    train_images = torch.stack([splits.train[i][0] for i in range(min(BATCHNORM_SAMPLES, len(splits.train)))])  # type: ignore[arg-type]
    estimate_batchnorm_statistics(model, train_images)

    table = build_cost_table(model, test_x[:1])
    val_logits, val_labels = collect_exit_logits(model, splits.val)
    thresholds = calibration.thresholds_for_fractions("entropy", val_logits, VALIDATION_EXIT_SHARES)
    policy = make_policy("entropy", thresholds)
    val_point = calibration.evaluate(policy, val_logits, val_labels, table.exits, split="validation")

    # The real dynamic forward, one test sample at a time: its trace gives the executed MACs.
    logits, trace, labels = run_policy(model, splits.test, policy, batch_size=1)
    cost = expected_macs(trace, table)
    full_macs = float(table.exits[-1])

    settings = LatencySettings(batch_sizes=(1,), warmup=10, repeats=60, threads=1, interop_threads=1,
                               stream_samples=int(test_x.shape[0]), isolate=True, policies=(policy,))
    with tempfile.TemporaryDirectory(prefix="fractalbench-bench-", dir=workdir) as tmp:
        checkpoint = Path(tmp) / f"{model_name}.pt"
        save_checkpoint(checkpoint, model, spec=spec.to_dict())
        rows = latency_rows(spec, checkpoint, test_x, settings, model=model_name, dataset=splits.name)
    errors = [r["error"] for r in rows if r["error"]]
    if errors:
        raise RuntimeError(f"latency measurement failed: {errors}")
    last = len(table.exits) - 1
    forced = {r["exit"]: r for r in rows if r["metric"] == "latency" and _detail(r).get("path") == "forced"}
    stream = next(r for r in rows if r["metric"] == "latency" and _detail(r).get("path") == "policy stream")
    predicted = next((r for r in rows if r["metric"] == "latency_predicted"), None)
    stream_fractions = _detail(stream)["exit_fractions"]

    full_ms, dyn_ms = float(forced[last]["value"]), float(stream["value"])
    macs_saving = 1.0 - cost.mean / full_macs
    latency_saving = 1.0 - dyn_ms / full_ms
    return {
        "model": model_name, "dataset": splits.name, "threads": _detail(stream)["threads"],
        "policy": policy.describe(), "test_samples": int(test_x.shape[0]),
        "validation_exit_fractions": list(val_point.exit_fractions),
        "stream_exit_fractions": stream_fractions, "trace_exit_fractions": cost.histograms["exit_fractions"],
        "exit0_fraction": stream_fractions[0],
        "test_accuracy": topk_accuracy(logits, labels),
        "macs_per_exit": [float(m) for m in table.exits], "full_macs": full_macs, "expected_macs": cost.mean,
        "latency_per_exit_ms": [float(forced[k]["value"]) for k in sorted(forced)],
        "full_ms": full_ms, "full_p50_ms": forced[last]["p50"], "dynamic_ms": dyn_ms, "dynamic_p50_ms": stream["p50"],
        "predicted_dynamic_ms": None if predicted is None else predicted["value"],
        "macs_saving": macs_saving, "latency_saving": latency_saving,
        "saving_ratio": latency_saving / macs_saving if macs_saving > 0 else float("nan"),
    }


def format_result(r: dict) -> str:
    fr = lambda xs: "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
    predicted = "n/a" if r["predicted_dynamic_ms"] is None else f"{r['predicted_dynamic_ms']:.3f} ms"
    return (f"{r['model']} on {r['dataset']} ({r['test_samples']} test samples, {r['threads']} thread, batch 1), "
            f"policy {r['policy']}\n"
            f"  exit fractions: validation {fr(r['validation_exit_fractions'])}, "
            f"test stream {fr(r['stream_exit_fractions'])}, "
            f"test trace {fr(r['trace_exit_fractions'])}; exit-0 fraction {r['exit0_fraction']:.3f} "
            f"(target >= {MIN_EXIT0_FRACTION}); test top-1 {r['test_accuracy']:.1f}% "
            f"(untrained weights, chance is 10%)\n"
            f"  MACs per exit {'/'.join(f'{m / 1e6:.1f}M' for m in r['macs_per_exit'])}: "
            f"full {r['full_macs'] / 1e6:.1f}M, "
            f"expected {r['expected_macs'] / 1e6:.1f}M -> MACs saving {r['macs_saving']:.3f}\n"
            f"  latency per exit {'/'.join(f'{t:.3f}' for t in r['latency_per_exit_ms'])} ms: "
            f"full {r['full_ms']:.3f} ms "
            f"(p50 {r['full_p50_ms']:.3f}), dynamic stream {r['dynamic_ms']:.3f} ms (p50 {r['dynamic_p50_ms']:.3f}; "
            f"predicted sum p_k t_k {predicted}) -> latency saving {r['latency_saving']:.3f}\n"
            f"  latency saving / MACs saving = {r['saving_ratio']:.3f} (target >= {MIN_LATENCY_TO_MACS_SAVING})")


@pytest.mark.slow
def test_branchynet_latency_saving_follows_macs_saving(tmp_path):
    result = early_exit_savings(workdir=tmp_path)
    print("\n" + format_result(result))
    assert result["exit0_fraction"] >= MIN_EXIT0_FRACTION
    assert result["macs_saving"] > 0
    assert result["latency_saving"] >= MIN_LATENCY_TO_MACS_SAVING * result["macs_saving"]


if __name__ == "__main__":
    print(format_result(early_exit_savings(sys.argv[1] if len(sys.argv) > 1 else MODEL)))
