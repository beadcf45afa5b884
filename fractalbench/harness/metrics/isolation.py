"""Process isolation: run one measurement in a fresh worker process (``python -m
fractalbench.harness.metrics._worker JOB.json``) so that allocator and thread-pool state never leaks from one
measurement into the next, and rebuild the model there from its registry spec and checkpoint.

The worker starts from the installed ``harness`` package (the folder it was imported from is put on
``PYTHONPATH``, so a source checkout and an installed wheel both work) in the caller's working
directory (relative plugin paths resolve as the caller wrote them), with the caller's ``sys.path``
after its ``PYTHONPATH``: a folder added at run time (``sys.path.append`` in a notebook, a test's
``syspath_prepend``) holds models the worker must import as well.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fractalbench
from fractalbench.harness.registry import ModelSpec

PACKAGE_PARENT = Path(fractalbench.__file__).resolve().parent.parent  # where ``import fractalbench`` finds it


class MeasurementError(RuntimeError):
    """A measurement worker that failed, timed out or returned nothing."""


def malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc), so RSS readings start from what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _search_path() -> list[str]:
    """This process's ``sys.path`` as folders a worker can use: existing directories only (a missing
    zip of the standard library is left out), '' as the working directory, no repeats."""
    out: list[str] = []
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        if os.path.isdir(folder) and folder not in out:
            out.append(folder)
    return out


def worker_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: this one, with OMP/MKL threads set, ``harness`` importable and
    this process's search path after its ``PYTHONPATH`` (so a folder added to ``sys.path`` at run
    time reaches the worker; the other entries are the ones it would have anyway, in the same order)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", ""), *_search_path())
                                        if p)
    env.update(extra or {})
    return env


# A small process that starts the worker as its own child. Linux carries a process's ru_maxrss
# across exec from the memory image it replaces, and a child forked from this (large) process
# would start with this process's peak; forked from the small launcher, it starts near zero.
_LAUNCHER = ("import subprocess, sys\n"
             "try:\n    sys.exit(subprocess.run(sys.argv[2:], timeout=float(sys.argv[1])).returncode)\n"
             "except subprocess.TimeoutExpired:\n    sys.exit(124)\n")


def run_worker(job: Mapping[str, Any], env: Mapping[str, str], timeout_s: float,
               tensors: Mapping[str, Tensor] | None = None, fresh_maxrss: bool = False) -> list[dict[str, Any]]:
    """Run ``python -m fractalbench.harness.metrics._worker JOB.json`` and return its rows; MeasurementError on failure.

    fresh_maxrss: start the worker through a small launcher so its ru_maxrss does not inherit
    this process's peak (needed by the ru_maxrss memory method)."""
    with tempfile.TemporaryDirectory(prefix="fractalbench-worker-") as tmp:
        tmp_path = Path(tmp)
        job = dict(job, result=str(tmp_path / "result.json"))
        for key, tensor in (tensors or {}).items():
            path = tmp_path / f"{key}.pt"
            torch.save(tensor.detach().cpu().contiguous(), path)
            job[key] = str(path)
        (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
        what = f"{job.get('task', 'measurement')} worker for model {job.get('spec', {}).get('name', '?')!r}"
        command = [sys.executable, "-m", "fractalbench.harness.metrics._worker", str(tmp_path / "job.json")]
        if fresh_maxrss:
            command = [sys.executable, "-c", _LAUNCHER, str(timeout_s)] + command
        try:
            proc = subprocess.run(command, env=dict(env), capture_output=True, text=True,
                                  timeout=timeout_s + (5 if fresh_maxrss else 0))
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"{what} timed out after {timeout_s:g} s") from None
        if fresh_maxrss and proc.returncode == 124:
            raise MeasurementError(f"{what} timed out after {timeout_s:g} s")
        result_path = tmp_path / "result.json"
        if not result_path.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise MeasurementError(f"{what} exited with code {proc.returncode} and no result: {' | '.join(tail)}")
        data = json.loads(result_path.read_text(encoding="utf-8"))
    if data.get("status") != "ok":
        raise MeasurementError(f"{what} failed: {data.get('error', 'unknown error')}")
    return list(data["rows"])


def build_model(spec: ModelSpec, checkpoint: Path | str | None) -> nn.Module:
    """The model of ``spec`` in eval mode, with the weights of ``checkpoint`` when given."""
    model = spec.build()
    if checkpoint is not None:
        from fractalbench.harness.checkpoints import load_checkpoint

        load_checkpoint(Path(checkpoint), model)
    return model.eval()
