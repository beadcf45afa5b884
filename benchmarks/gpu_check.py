"""The prepared GPU check (issue 14): every CUDA path of the harness against an independent measure.

Run through ``benchmarks/gpu_check.sh`` on a machine with a CUDA device (about 5 minutes on one
GPU; without one it says so and exits 0). It prints, section by section:

1. latency: CUDA-event batch-1 latency of resnet20 and resnet56 (the harness's ``measure_latency``)
   against ``torch.utils.benchmark.Timer`` on the same model and input (their ratio);
2. memory: the harness's GPU peak activation memory of resnet56 at batch 64 against a direct
   ``torch.cuda.max_memory_allocated`` above the baseline around the same forward;
3. early exit on GPU: BranchyNet-ResNet-20 (random weights) with a confidence threshold set so that
   about half of 256 samples leave at the first exit: its latency saving (streamed, batch 1) against
   its MACs saving (cost table x trace), both relative to the full network;
4. trainer images/s against a bare PyTorch loop (``benchmarks/bench_trainer.py``, bf16);
5. one short CIFAR-10 training cell (``--data-root DIR`` with CIFAR-10 in torchvision's or the
   image-folder layout; without it, a synthetic CIFAR-shaped dataset, said so): 1 epoch of
   resnet20, accuracy and training time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def latency_check(device: str) -> None:
    from torch.utils.benchmark import Timer

    from fractalbench.harness.metrics.latency import measure_latency
    from fractalbench.harness.metrics.settings import LatencySettings
    from fractalbench.harness.registry import create_model

    x = torch.randn(8, 3, 32, 32)
    for name in ("resnet20", "resnet56"):
        model = create_model(name, num_classes=10).eval()
        settings = LatencySettings(device=device, batch_sizes=(1,), repeats=200, warmup=20, isolate=False,
                                   cross_check=False, modes=())
        rows = [r for r in measure_latency(model, x, settings, model=name) if r["metric"] == "latency"]
        harness_ms = rows[0]["p50"]
        sample = x[:1].to(device)
        with torch.no_grad():
            timer = Timer("model(sample); torch.cuda.synchronize()", globals={"model": model, "sample": sample,
                                                                             "torch": torch})
            timer_ms = timer.blocked_autorange(min_run_time=2.0).median * 1e3
        print(f"latency {name} batch 1: harness CUDA events p50 {harness_ms:.3f} ms, torch.utils.benchmark "
              f"median {timer_ms:.3f} ms, ratio {harness_ms / timer_ms:.3f}")


def memory_check(device: str) -> None:
    from fractalbench.harness.metrics.memory import measure_memory
    from fractalbench.harness.metrics.settings import MemorySettings
    from fractalbench.harness.registry import create_model

    model = create_model("resnet56", num_classes=10).eval().to(device)
    settings = MemorySettings(device=device, batch_size=64, isolate=False, per_exit=False)
    rows = measure_memory(model, (3, 32, 32), settings, model="resnet56")
    peak = next(r for r in rows if r["metric"] == "memory_peak_activations")["value"]
    x = torch.randn(64, 3, 32, 32, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    direct = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f"memory resnet56 batch 64: harness peak activations {peak:.2f} MiB, direct max_memory_allocated "
          f"above baseline {direct:.2f} MiB, ratio {peak / direct:.3f}")


def early_exit_check(device: str) -> None:
    from fractalbench.harness import contract
    from fractalbench.harness.metrics.flops import build_cost_table, expected_macs
    from fractalbench.harness.metrics.latency import measure_latency
    from fractalbench.harness.metrics.settings import LatencySettings, StreamPoint
    from fractalbench.harness.policies import make_policy
    from fractalbench.harness.registry import create_model

    torch.manual_seed(0)
    model = create_model("branchynet_resnet20", num_classes=10).eval().to(device)
    x = torch.randn(256, 3, 32, 32, device=device)
    with torch.no_grad():
        first = contract.forward_exits(model, x)[0].softmax(-1).amax(-1)
    policy = make_policy("confidence", float(first.median()))
    with torch.no_grad():
        trace = contract.dynamic_forward(model, x, policy).trace
    table = build_cost_table(model, x[:1])
    macs_saving = 1 - expected_macs(trace, table).mean / table.exits[-1]
    settings = LatencySettings(device=device, batch_sizes=(1,), repeats=100, warmup=10, isolate=False, modes=(),
                               cross_check=False, stream_samples=256, policies=(StreamPoint("half", None, policy),))
    rows = measure_latency(model, x.cpu(), settings, model="branchynet_resnet20")
    full = next(r for r in rows if r["metric"] == "latency" and r.get("exit") == len(table.exits) - 1
                and not r.get("policy"))["value"]
    stream = next(r for r in rows if r["metric"] == "latency" and r.get("policy") == "half")["value"]
    left = float((trace.exit_index == 0).float().mean())
    print(f"early exit branchynet_resnet20 on GPU: {left:.0%} leave at exit 0; MACs saving {macs_saving:.1%}, "
          f"latency saving {1 - stream / full:.1%} (stream {stream:.3f} ms vs full {full:.3f} ms, batch 1)")


def trainer_check(device: str) -> None:
    import bench_trainer

    bench_trainer.main(["--device", device, "--bf16", "--steps", "50", "--rounds", "3"])


def cifar_cell(device: str, data_root: str | None) -> None:
    from fractalbench.harness.runner import run_suite
    from fractalbench.harness.suites import parse_suite

    dataset = ({"name": "cifar10", "root": data_root, "val_fraction": 0.1} if data_root else
               {"name": "synthetic", "image_size": 32, "num_classes": 10, "in_chans": 3, "num_samples": 6000})
    raw = {"name": "gpu_check", "devices": [device], "datasets": [dataset], "models": ["resnet20"],
           "train": {"epochs": 1, "batch_size": 128, "lr": 0.1, "precision": "bf16", "channels_last": True},
           "metrics": ["accuracy", "latency"], "latency": {"batch_sizes": [1, 128], "repeats": 50}}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_suite(parse_suite(raw, "gpu_check"), Path(out))
        from fractalbench.harness.results import load_run

        frame = load_run(out)
    top1 = frame[frame.metric == "top1"].value.tolist()
    secs = frame[frame.metric == "train_seconds"].value.tolist()
    print(f"training cell resnet20 on {'CIFAR-10 ' + data_root if data_root else 'synthetic CIFAR-shaped data'}: "
          f"{len(summary.finished)} ok, {len(summary.failed)} failed; top1 {top1}, train {secs} s, "
          f"cell {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="CIFAR-10 folder for the training cell")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check, skipped")
        return 0
    device = "cuda"
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    failed = 0
    for check in (latency_check, memory_check, early_exit_check, trainer_check):
        try:
            check(device)
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others
            failed += 1
            print(f"{check.__name__}: FAILED {type(exc).__name__}: {exc}")
    try:
        cifar_cell(device, args.data_root)
    except Exception as exc:  # noqa: BLE001
        failed += 1
        print(f"cifar_cell: FAILED {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
