"""fractalbench's harness. ``fractalbench.harness.benchmark`` is
:func:`fractalbench.harness.api.benchmark`, imported on first use so that ``import fractalbench.harness``
(e.g. in a measurement worker process) stays light."""
from __future__ import annotations

from typing import Any

__all__ = ["benchmark"]


def __getattr__(name: str) -> Any:
    if name == "benchmark":
        from fractalbench.harness.api import benchmark

        return benchmark
    raise AttributeError(f"module 'fractalbench.harness' has no attribute {name!r}")
