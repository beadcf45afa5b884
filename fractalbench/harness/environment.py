"""The run's environment: CPU, GPU, threads, library versions and git commit."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpuinfo_value(key: str) -> str:
    """The first ``key`` line's value in /proc/cpuinfo ("model name", "vendor_id"); "" where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return cpuinfo_value("model name") or platform.processor() or "unknown"


#: /proc/cpuinfo flags of native bf16 arithmetic (x86: AVX512-BF16, AMX; Arm: the BF16 extension).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); None where
    that file is not there (macOS, Windows) or lists none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and value.strip():
            return frozenset(value.split())
    return None


def cpu_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bf16 natively (None: unknown). Without it PyTorch's bf16 autocast
    still gives bf16 results, emulated: on an AVX2 AMD EPYC, training steps ran 8-12x slower than
    fp32 (FractalBrainNet-small 359 -> 43 images/s, ResNet-20 220 -> 19, batch 128, 2 threads)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & BF16_FLAGS)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        commit = out.stdout.strip()
        if out.returncode or not commit:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def _version(module: str) -> str:
    """Installed version from package metadata (no import: importing timm or seaborn takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTIONS.get(module, module))
    except metadata.PackageNotFoundError:
        return "absent"


ONEDNN_ENV = "FRACTALBENCH_ONEDNN"
"""Set to 0 to run convolutions on ATen's reference kernels instead of oneDNN (the CI gate does, see
benchmarks/gate.py): oneDNN picks its blocking from the CPU's caches, so its results differ in the
last bits between CPU models even with the ISA capped, and training turns that into accuracy."""


def apply_kernel_settings() -> None:
    """Honour :data:`ONEDNN_ENV` in this process."""
    if os.environ.get(ONEDNN_ENV, "1") == "0":
        import torch

        torch.backends.mkldnn.enabled = False


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where one cell ran, for its own record: a run resumed over several sessions may run its cells
    on different machines, and environment.json keeps only the last invocation's."""
    import torch

    info: dict[str, Any] = {"hostname": platform.node(), "cpu": cpu_model(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                            "cpu_native_bf16": cpu_native_bf16(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def collect_environment() -> dict[str, Any]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_bytes": props.total_memory})
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "onednn_enabled": bool(torch.backends.mkldnn.enabled),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": gpus,
        "libraries": {name: _version(name) for name in ("torch", "torchvision", "timm", "fvcore", "numpy", "pandas",
                                                        "sklearn", "seaborn")},
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
