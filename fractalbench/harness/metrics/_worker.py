"""Measurement worker: ``python -m fractalbench.harness.metrics._worker JOB.json``.

Runs one latency or memory measurement in a fresh process, so that allocator and thread-pool state
of one model never leaks into the next. The job (JSON) holds:

    task          "latency" or "memory"
    spec          ModelSpec.to_dict()
    checkpoint    path or null
    settings      LatencySettings.to_dict() / MemorySettings.to_dict()
    inputs        (latency) path of a tensor file [N, ...] saved with torch.save
    input_shape   (memory) one sample's shape (C, H, W)
    paths         (memory, optional) exits to measure, null = forward
    include_weights (memory, optional)
    row_fields    fields copied into every result row
    result        where to write {"status": "ok", "rows": [...]} or {"status": "error", "error": ...}

Threads are set before any torch work starts (``set_num_threads``/``set_num_interop_threads``;
OMP/MKL variables come from the parent). The worker never prints; it writes the result file.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any


def _load_plugins(plugins: list[str]) -> None:
    """Import modules (dotted names) or Python files that register extra models."""
    for i, plugin in enumerate(plugins):
        if plugin.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"_fractalbench_plugin_{i}", plugin)
            if spec is None or spec.loader is None:
                raise ValueError(f"plugin {plugin!r} cannot be imported")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(plugin)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    settings = job["settings"]
    torch.set_num_threads(int(settings["threads"]))
    try:
        torch.set_num_interop_threads(int(settings.get("interop_threads", 1)))
    except RuntimeError:
        pass
    from fractalbench.harness.metrics.isolation import build_model, malloc_trim
    from fractalbench.harness.metrics.latency import measure_latency
    from fractalbench.harness.metrics.memory import measure_memory
    from fractalbench.harness.metrics.settings import LatencySettings, MemorySettings
    from fractalbench.harness.registry import ModelSpec

    _load_plugins(list(settings.get("plugins") or []))
    spec = ModelSpec.from_dict(job["spec"])
    row_fields = dict(job.get("row_fields") or {})
    if job["task"] == "latency":
        inputs = torch.load(job["inputs"], map_location="cpu", weights_only=True)
        model = build_model(spec, job.get("checkpoint"))
        return measure_latency(model, inputs, LatencySettings.from_dict(settings), isolated=True, **row_fields)
    if job["task"] == "memory":
        from fractalbench.harness.registry import model_card

        model_card(spec.name)  # importing the baselines, plugins and an import path's module is not weights
        gc.collect()
        malloc_trim()
        before = _rss_bytes()
        model = build_model(spec, job.get("checkpoint"))
        gc.collect()
        malloc_trim()
        weights_rss = _rss_bytes() - before
        paths = job.get("paths")
        return measure_memory(model, job["input_shape"], MemorySettings.from_dict(settings), isolated=True, paths=paths,
                              include_weights=bool(job.get("include_weights", True)), weights_rss_bytes=weights_rss,
                              **row_fields)
    raise ValueError(f"unknown worker task {job['task']!r}; allowed: latency, memory")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m fractalbench.harness.metrics._worker JOB.json\n")
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result_path = Path(job["result"])
    try:
        result = {"status": "ok", "rows": run_job(job)}
    except Exception as exc:  # noqa: BLE001 - any failure is reported to the parent as data
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=8)}
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result, default=str), encoding="utf-8")
    tmp.replace(result_path)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
