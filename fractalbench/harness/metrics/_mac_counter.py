"""Layer 2 of :mod:`fractalbench.harness.metrics.flops`: the counting engine (:class:`MacCounter`:
``FlopCounterMode`` with :data:`~fractalbench.harness.metrics._mac_formulas.EXTRA_FORMULAS`, plus a dispatch mode
that records every aten op so that ops no formula covers are listed, not silently dropped),
:func:`count_macs`, and fvcore's count as a cross-check for static models."""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fractalbench.harness.metrics._mac_formulas import EXTRA_FORMULAS, ZERO_MAC_OPS, _op_name


@dataclass(frozen=True)
class MacCount:
    """MACs of one counted call. ``by_module`` uses FlopCounterMode's module hierarchy
    (``RootClass.child.grandchild``); ``unsupported_ops`` maps op name -> times executed."""

    total: int | float
    by_module: dict[str, int | float] = field(default_factory=dict)
    by_operator: dict[str, int | float] = field(default_factory=dict)
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    op_calls: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int | float:
        return 2 * self.total


def _macs(flops: int) -> int | float:
    return flops // 2 if flops % 2 == 0 else flops / 2


class _OpRecorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher below FlopCounterMode (after its decompositions)."""

    def __init__(self, registry: Mapping[Any, Any]) -> None:
        super().__init__()
        self.registry = registry
        self.calls: Counter[str] = Counter()
        self.unsupported: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.calls[name] += 1
        if getattr(func, "_overloadpacket", func) not in self.registry and name not in ZERO_MAC_OPS:
            self.unsupported[name] += 1
        return func(*args, **(kwargs or {}))


class MacCounter:
    """Context manager: counts the MACs of everything run inside it. ``module`` names the module
    hierarchy (without it, names start at the first module called). Grad mode is left as it is."""

    def __init__(self, module: nn.Module | None = None) -> None:
        self.module = module
        self._result: MacCount | None = None

    def __enter__(self) -> MacCounter:
        self._counter = FlopCounterMode(display=False, depth=None, custom_mapping=EXTRA_FORMULAS)
        if self.module is not None:
            _seed_module_names(self._counter, self.module)
        self._recorder = _OpRecorder(self._counter.flop_registry)
        self._recorder.__enter__()
        try:
            self._counter.__enter__()
        except BaseException:
            self._recorder.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._counter.__exit__(*exc)
        finally:
            self._recorder.__exit__(*exc)
        counts = self._counter.get_flop_counts()
        glob = counts.get("Global", {})
        self._result = MacCount(
            total=_macs(sum(glob.values())),
            by_module={name: _macs(sum(ops.values())) for name, ops in counts.items() if name != "Global"},
            by_operator={_op_name(op): _macs(v) for op, v in glob.items()},
            unsupported_ops=dict(self._recorder.unsupported),
            op_calls=dict(self._recorder.calls),
        )

    def result(self) -> MacCount:
        if self._result is None:
            raise RuntimeError("MacCounter.result() is available after the with-block ends")
        return self._result


def _seed_module_names(counter: FlopCounterMode, module: nn.Module) -> None:
    """Name every submodule by its path in ``module`` even when the root's forward is not called
    (probes and forced paths call submodules directly)."""
    tracker = getattr(counter, "mod_tracker", None)
    known, seen = getattr(tracker, "_known_modules", None), getattr(tracker, "_seen_modules", None)
    if known is None or seen is None:
        return
    root = type(module).__name__
    for name, mod in module.named_modules():
        if mod not in known:
            known[mod] = f"{root}.{name}" if name else root
            seen.add(mod)


def count_macs(fn: Callable[..., Any], *args: Any, module: nn.Module | None = None, **kwargs: Any) -> MacCount:
    """MACs executed by ``fn(*args, **kwargs)`` under ``torch.no_grad()``.

    ``module`` names the module hierarchy in ``by_module`` (default: ``fn`` if it is a module).
    """
    if module is None and isinstance(fn, nn.Module):
        module = fn
    with torch.no_grad(), MacCounter(module) as counter:
        fn(*args, **kwargs)
    return counter.result()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


# ----- fvcore cross-check -------------------------------------------------------------------------

FVCORE_MAC_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum", "mm")
"""fvcore operators that are multiply-accumulates (fvcore counts one fused multiply-add as one flop)."""


@dataclass(frozen=True)
class FvcoreCount:
    """fvcore's count. ``macs``: its conv/linear/matmul operators only (comparable with
    :func:`count_macs`); ``total``: everything it counts (also norms, pooling, upsampling)."""

    macs: int
    total: int
    by_operator: dict[str, int]
    unsupported_ops: dict[str, int]
    uncalled_modules: list[str]


def fvcore_count(model: nn.Module, x: Tensor) -> FvcoreCount:
    """fvcore ``FlopCountAnalysis`` of ``model(x)`` (traced with torch.jit; static models only)."""
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and jit tracing warn; the result says what it skipped
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, (x,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = {k: int(v) for k, v in analysis.by_operator().items()}
        total = int(analysis.total())
        unsupported = dict(analysis.unsupported_ops())
        uncalled = sorted(analysis.uncalled_modules())
    return FvcoreCount(sum(by_op.get(k, 0) for k in FVCORE_MAC_OPS), total, by_op, unsupported, uncalled)
