"""A 20-point threshold sweep on a 10,000-image test split costs at most 1.5x one forward_exits pass
(marked slow; `make bench`), or run `python benchmarks/test_sweep_cost.py` to print the numbers.

Setup: BranchyNet-ResNet-20 (``branchynet_resnet20``), randomly initialised with a fixed seed and
BatchNorm statistics estimated on 512 training images, on CIFAR-10's test split when it is unpacked
under data/ (else 10,000 random 32x32 images). Grid: 20 confidence thresholds spread over the
range of the validation confidences, so that samples leave at every exit. One intra-op thread.

- baseline: one ``collect_exit_logits`` pass over the 10,000 test images (the accuracy step does
  this pass anyway);
- sweep: that pass, plus the 20 points simulated from its logits (``simulated_logits``) and the
  real-path check of every point on the suite default's 128 spread test samples
  (``check_real_path``, compact dynamic inference, which must agree);
- the old way, for reference: the real dynamic forward on the whole split for 2 of the 20 points,
  scaled to 20.

Target: sweep / baseline <= 1.5.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fractalbench.harness._sweep import check_real_path, simulated_logits  # noqa: E402
from fractalbench.harness.data import DatasetConfig, DatasetError, load_dataset  # noqa: E402
from fractalbench.harness.evaluate import collect_exit_logits, run_policy  # noqa: E402
from fractalbench.harness.policies import make_policy  # noqa: E402
from fractalbench.harness.registry import create_model  # noqa: E402

POINTS = 20
CHECK_SAMPLES = 128
MAX_RATIO = 1.5


def _data() -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, str]:
    try:
        splits = load_dataset(DatasetConfig("cifar10"))
        return splits.train, splits.test, "CIFAR-10 test split (image folder)"
    except DatasetError:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(10_000, 3, 32, 32, generator=gen), torch.randint(0, 10, (10_000,), generator=gen)
        data = torch.utils.data.TensorDataset(x, y)
        return data, data, "10,000 random 32x32 images (CIFAR-10 not unpacked)"


def measure() -> dict[str, float | str]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test, what = _data()
    model = create_model("branchynet_resnet20")
    model.train()
    with torch.no_grad():  # BatchNorm statistics from training images, no gradient steps
        model(torch.stack([train[i][0] for i in range(512)]))
    model.eval()
    t0 = time.perf_counter()
    logits, labels = collect_exit_logits(model, test, 256)
    t_pass = time.perf_counter() - t0
    conf = torch.softmax(logits[0], -1).amax(-1)
    grid = torch.quantile(conf, torch.linspace(0.05, 0.95, POINTS)).tolist()
    deciders = [make_policy("confidence", t) for t in grid]
    t1 = time.perf_counter()
    exits = [simulated_logits(d, logits)[0] for d in deciders]
    check = check_real_path(model, test, deciders, logits, CHECK_SAMPLES, 256, "cpu")
    t_sweep = t_pass + time.perf_counter() - t1
    t2 = time.perf_counter()
    for d in deciders[:: POINTS // 2]:
        run_policy(model, test, d, 256)
    t_old = (time.perf_counter() - t2) * POINTS / 2
    share_early = sum(float((e < 2).float().mean()) for e in exits) / POINTS
    return {"data": what, "samples": len(labels), "pass_s": t_pass, "sweep_s": t_sweep, "old_s": t_old,
            "ratio": t_sweep / t_pass, "old_ratio": t_old / t_pass, "mismatches": check["mismatches"],
            "near_ties": check["near_ties_excused"], "mean_share_before_last_exit": share_early}


@pytest.mark.slow
def test_twenty_point_sweep_costs_at_most_one_and_a_half_passes():
    numbers = measure()
    assert numbers["samples"] == 10_000 and numbers["mismatches"] == 0
    assert numbers["ratio"] <= MAX_RATIO, numbers


if __name__ == "__main__":
    for key, value in measure().items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
