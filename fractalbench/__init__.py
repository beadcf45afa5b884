"""fractalbench: a benchmarking and evaluation harness for dynamic neural networks.

One import namespace, so that no folder of a user's project (a ``baselines/`` or ``reports/`` of
their own) can shadow the harness:

- :mod:`fractalbench.harness`: the engine (registry, model contract, data, training, policies,
  metrics, runner, results, CLI); ``fractalbench.benchmark`` is :func:`fractalbench.harness.api.benchmark`;
- :mod:`fractalbench.baselines`: one file per model family, registered by name;
- :mod:`fractalbench.reports`: tables, plots and the HTML report, from stored results only;
- :mod:`fractalbench.suites`: the bundled suite files (data, not code).

Importing this package is light: ``benchmark`` is imported on first use.
"""
from __future__ import annotations

from typing import Any

__all__ = ["benchmark", "__version__"]

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("fractalbench")
except PackageNotFoundError:  # pragma: no cover - a checkout on sys.path without an install
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "benchmark":
        from fractalbench.harness.api import benchmark

        return benchmark
    raise AttributeError(f"module 'fractalbench' has no attribute {name!r}")
