"""pytest-benchmark over registered models: the ``benchmark_model`` fixture.

Installing fractalbench registers this module under pytest's ``pytest11`` entry point (named
``fractalbench.harness.pytest_plugin``, like the module), so every pytest session in that environment has the
fixture; ``-p fractalbench.harness.pytest_plugin`` or ``pytest_plugins = ["fractalbench.harness.pytest_plugin"]`` still
work (the plugin is found already registered, not loaded twice) and ``-p
no:fractalbench.harness.pytest_plugin`` switches it off. Then::

    def test_resnet20_b1(benchmark_model):
        benchmark_model("resnet20", batch_size=1)

    def test_branchynet_exit0(benchmark_model):
        benchmark_model("branchynet_resnet20", exit=0)           # forced path to exit 0

    def test_branchynet_policy(benchmark_model):
        benchmark_model("branchynet_resnet20", policy="confidence", thresholds=0.9)

Each call builds the model with ``fractalbench.harness.registry.create_model`` (random weights, eval mode), a
random input of the model card's size (or ``input_size``/``in_chans``), and times one call per
round with pytest-benchmark's ``benchmark`` fixture under ``torch.no_grad()``: ``model(x)``, the
forced path to ``exit``, or ``dynamic_forward`` with ``policy`` (compact inference). On CUDA the
call is followed by ``torch.cuda.synchronize()`` so the timed region covers the kernels.
``benchmark.extra_info`` records the model, batch size, input shape, device, threads, exit,
policy and parameter count, so ``--benchmark-json`` output says what was measured. Everything
pytest-benchmark offers (``--benchmark-compare``, ``--benchmark-autosave``, groups, histograms)
works as usual.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest


def _prepare(name: str, *, batch_size: int, input_size: int | None, in_chans: int | None, num_classes: int,
             exit: int | None, policy: str | None, thresholds: float | Sequence[float] | None, device: str,
             seed: int, mode: str, model_kwargs: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    import torch

    from fractalbench.harness import contract
    from fractalbench.harness.registry import create_model, model_card

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"benchmark_model: batch_size must be a whole number >= 1, got {batch_size!r}")
    if exit is not None and policy is not None:
        raise ValueError("benchmark_model: give either exit (a forced path) or policy (dynamic inference), not both")
    card = model_card(name)
    size = input_size or card.input_size
    chans = in_chans or card.in_chans
    model = create_model(name, num_classes=num_classes, in_chans=chans, **model_kwargs).eval().to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, chans, size, size, generator=gen).to(device)
    if exit is not None:
        contract.check_exit_index(model, exit)
        call: Callable[[], Any] = lambda: contract.forced_forward(model, x, exit)  # noqa: E731
    elif policy is not None:
        from fractalbench.harness.policies import make_policy

        if policy == "default":  # the model's own decisions (gates, router; early exit: never exit early)
            chosen = None
        elif thresholds is None:
            raise ValueError(f"benchmark_model: policy {policy!r} needs thresholds (or use policy='default')")
        else:
            chosen = make_policy(policy, thresholds)
        call = lambda: contract.dynamic_forward(model, x, chosen, mode)  # noqa: E731
    else:
        call = lambda: model(x)  # noqa: E731

    def timed() -> Any:
        with torch.no_grad():
            out = call()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return out

    info = {"model": name, "batch_size": batch_size, "input_shape": list(x.shape), "device": device,
            "threads": torch.get_num_threads(), "exit": exit, "policy": policy,
            "thresholds": list(thresholds) if isinstance(thresholds, (list, tuple)) else thresholds,
            "mode": mode if policy is not None else None, "dynamic_kind": contract.dynamic_kind(model),
            "params": sum(p.numel() for p in model.parameters()), "kwargs": model_kwargs}
    return timed, info


@pytest.fixture
def benchmark_model(benchmark: Any) -> Any:
    """``benchmark_model(name, batch_size=1, *, input_size=None, in_chans=None, num_classes=10,
    exit=None, policy=None, thresholds=None, threads=None, device="cpu", seed=0, mode="compact",
    **model_kwargs)``: time one registered model with pytest-benchmark and return the last output.
    ``threads`` sets ``torch.set_num_threads`` for the test (restored afterwards)."""
    import torch

    previous = torch.get_num_threads()

    def run(name: str, batch_size: int = 1, *, input_size: int | None = None, in_chans: int | None = None,
            num_classes: int = 10, exit: int | None = None, policy: str | None = None,
            thresholds: float | Sequence[float] | None = None, threads: int | None = None, device: str = "cpu",
            seed: int = 0, mode: str = "compact", **model_kwargs: Any) -> Any:
        if threads is not None:
            torch.set_num_threads(int(threads))
        timed, info = _prepare(name, batch_size=batch_size, input_size=input_size, in_chans=in_chans,
                               num_classes=num_classes, exit=exit, policy=policy, thresholds=thresholds, device=device,
                               seed=seed, mode=mode, model_kwargs=model_kwargs)
        benchmark.extra_info.update(info)
        return benchmark(timed)

    yield run
    torch.set_num_threads(previous)
