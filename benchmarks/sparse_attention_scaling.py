"""Sparse attention saves what it claims: MACs, latency and peak memory of one attention layer against
sequence length, full against Longformer-style and BigBird-style block-sparse attention. Run
`python benchmarks/sparse_attention_scaling.py` to print the table (and `--json FILE` to keep it), or
`pytest -m slow benchmarks/sparse_attention_scaling.py` to check the target (``make bench`` collects
only ``benchmarks/test_*.py``, so not this file).

Setup: the attention of ``lra_longformer``/``lra_bigbird`` (dimension 128, qkv width 64, 4 heads,
blocks of 64; Longformer: one window block on each side and the first block global; BigBird: the
same plus 3 random blocks per query block), in eval mode, batch 1, one intra-op and one inter-op
thread, random input from a fixed seed. Lengths 256 to 4,096.

Measured by :func:`fractalbench.harness.metrics.length_scaling.measure_at_lengths` (the code behind
a suite's ``cost.lengths`` rows), here on the bare attention layer:

- MACs: counted by the harness (``MacCounter``) for one call: the whole layer (projections and the two
  attention products) and the products alone (``aten.bmm``), the latter checked against the hand
  formula :func:`fractalbench.baselines.sparse_attention.attention_macs`.
- latency: ``time_calls`` around the layer, the three attentions interleaved round by round (so
  background load hits them alike), median of every timed call.
- peak memory: torch's allocator events during one call (``torch_peak_bytes``).
saving(x) = 1 - sparse / full. Target (issue 26): at 4,096, Longformer's latency saving >= 0.85 x its
MACs saving (of the whole layer).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fractalbench.baselines.sparse_attention import BlockSparseAttention, attention_macs  # noqa: E402
from fractalbench.harness.metrics.length_scaling import measure_at_lengths  # noqa: E402
from fractalbench.harness.metrics.timing import set_threads  # noqa: E402

LENGTHS = (256, 512, 1024, 2048, 4096)
CONFIGS = {"full": {}, "longformer": {}, "bigbird": {"random": 3}}
DIM, QKV, HEADS, BLOCK = 128, 64, 4, 64
TARGET_LENGTH, MIN_RATIO = 4096, 0.85
ROUNDS, CALLS, WARMUP = 8, 3, 2


def layer(attention: str, length: int) -> BlockSparseAttention:
    torch.manual_seed(0)
    return BlockSparseAttention(DIM, QKV, HEADS, length, attention, BLOCK, **CONFIGS[attention]).eval()


def measure(length: int) -> dict[str, dict[str, float]]:
    found = measure_at_lengths(lambda n: {name: layer(name, n) for name in CONFIGS},
                               lambda n: torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(1)),
                               (length,), rounds=ROUNDS, calls=CALLS, warmup=WARMUP)[length]
    out: dict[str, dict[str, float]] = {}
    for name, row in found.items():
        expected = attention_macs(length, QKV, name, BLOCK, **CONFIGS[name])
        if row["attention_macs"] != expected:
            raise AssertionError(f"{name} at {length}: counted {row['attention_macs']} attention MACs, "
                                 f"formula {expected}")
        out[name] = {"macs": row["macs"], "attention_macs": row["attention_macs"], "peak_bytes": row["peak_bytes"],
                     "ms": statistics.median(row["times"])}
    for name in ("longformer", "bigbird"):
        row, full = out[name], out["full"]
        row["macs_saving"] = 1 - row["macs"] / full["macs"]
        row["latency_saving"] = 1 - row["ms"] / full["ms"]
        row["memory_saving"] = 1 - row["peak_bytes"] / full["peak_bytes"]
        row["ratio"] = row["latency_saving"] / row["macs_saving"] if row["macs_saving"] > 0 else float("nan")
    return out


def table(lengths=LENGTHS) -> dict[int, dict[str, dict[str, float]]]:
    set_threads(1, 1)
    return {n: measure(n) for n in lengths}


def report(results: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = [f"attention layer (dim {DIM}, qkv {QKV}, {HEADS} heads, blocks of {BLOCK}), batch 1, 1 thread; "
             f"median of {ROUNDS * CALLS} interleaved calls ({torch.backends.cpu.get_cpu_capability()})"]
    for n, rows in results.items():
        parts = [f"{name} {r['macs'] / 1e6:.1f}M MACs ({r['attention_macs'] / 1e6:.1f}M in attention) "
                 f"{r['ms']:.2f} ms {r['peak_bytes'] / 2**20:.1f} MiB" for name, r in rows.items()]
        lines.append(f"  n={n}: " + "; ".join(parts))
        for name in ("longformer", "bigbird"):
            r = rows[name]
            lines.append(f"    {name}: MACs saving {r['macs_saving']:.3f}, latency saving {r['latency_saving']:.3f} "
                         f"(ratio {r['ratio']:.2f}), memory saving {r['memory_saving']:.3f}")
    return "\n".join(lines)


@pytest.mark.slow
def test_sparse_attention_latency_follows_its_macs_at_4096():
    results = table((TARGET_LENGTH,))
    print(report(results))
    row = results[TARGET_LENGTH]["longformer"]
    assert row["macs_saving"] > 0.5
    assert row["latency_saving"] >= MIN_RATIO * row["macs_saving"]


if __name__ == "__main__":
    found = table()
    print(report(found))
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(found, indent=1))
