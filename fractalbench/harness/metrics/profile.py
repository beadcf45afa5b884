"""Per-module profile: MACs, parameters and time share of one forward (``fractalbench profile``).

Definitions: ``macs`` are counted by :func:`fractalbench.harness.metrics.flops.count_macs` for the whole batch
(``macs_share`` = share of the model's total); ``params`` counts a module's parameters including
its children; ``time_ms`` is the mean inclusive wall time of the module per forward, measured with
forward pre/post hooks (synchronised on CUDA) over ``repeats`` forwards after ``warmup`` ones;
``time_share`` = time_ms / the model's time_ms. Hooks add their own small cost, so shares of tiny
modules read high; use the latency metrics for end-to-end numbers.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fractalbench.harness.devices import check_device
from fractalbench.harness.metrics.flops import count_macs, eval_mode
from fractalbench.harness.metrics.timing import set_threads


def _input_shape(input_size: int | Sequence[int], in_chans: int) -> tuple[int, ...]:
    if isinstance(input_size, int):
        if input_size < 1:
            raise ValueError(f"input size must be >= 1, got {input_size}")
        return (in_chans, input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 2:
        return (in_chans, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input size is N, (H, W) or (C, H, W), got {tuple(input_size)}")
    return shape


def _module_times(model: nn.Module, x: torch.Tensor, device: str, repeats: int,
                  warmup: int) -> tuple[dict[nn.Module, float], Counter]:
    cuda = device.startswith("cuda")
    starts: dict[nn.Module, list[int]] = defaultdict(list)
    total_ns: dict[nn.Module, float] = defaultdict(float)
    calls: Counter = Counter()

    def pre(mod: nn.Module, args: Any) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        starts[mod].append(time.perf_counter_ns())

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        total_ns[mod] += time.perf_counter_ns() - starts[mod].pop()
        calls[mod] += 1

    for _ in range(warmup):
        model(x)
    handles = []
    try:
        for mod in model.modules():
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
        for _ in range(repeats):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {m: t / repeats / 1e6 for m, t in total_ns.items()}, calls


def profile_model(model: str | nn.Module, input_size: int | Sequence[int] = 32, device: str = "cpu",
                  batch_size: int = 1, *, in_chans: int = 3, num_classes: int = 10,
                  kwargs: dict[str, Any] | None = None, repeats: int = 5, warmup: int = 2,
                  threads: int | None = None) -> list[dict[str, Any]]:
    """One dict per module (depth-first order): module, type, depth, params, macs, macs_share,
    time_ms, time_share, calls. ``model`` is a registry name or a module."""
    device = check_device(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if isinstance(model, str):
        from fractalbench.harness.registry import create_model

        model = create_model(model, num_classes=num_classes, in_chans=in_chans, **(kwargs or {}))
    shape = _input_shape(input_size, in_chans)
    previous = set_threads(threads) if threads else None
    try:
        model = model.to(device)
        x = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        with eval_mode(model), torch.no_grad():
            macs = count_macs(model, x)
            times, calls = _module_times(model, x, device, repeats, warmup)
    finally:
        if previous:
            torch.set_num_threads(previous["threads"])
    root = type(model).__name__
    by_module = {(k[len(root) + 1:] if k.startswith(root + ".") else ("" if k == root else k)): v
                 for k, v in macs.by_module.items()}
    total_time = times.get(model, 0.0)
    table = []
    for name, mod in model.named_modules():
        params = sum(p.numel() for p in mod.parameters())
        m = by_module.get(name, 0)
        t = times.get(mod, 0.0)
        table.append({"module": name or root, "type": type(mod).__name__, "depth": name.count(".") + 1 if name else 0,
                      "params": int(params), "macs": m, "macs_share": m / macs.total if macs.total else 0.0,
                      "time_ms": t, "time_share": t / total_time if total_time else 0.0,
                      "calls": calls.get(mod, 0) // max(repeats, 1),
                      "batch_size": batch_size, "input_shape": [batch_size, *shape], "device": device})
    if macs.unsupported_ops:
        table[0]["unsupported_ops"] = macs.unsupported_ops
    return table


def _human(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def format_profile(table: list[dict[str, Any]], max_depth: int | None = None) -> str:
    """The profile as a text table (the CLI prints it); ``max_depth`` hides deeper modules."""
    from tabulate import tabulate

    if not table:
        return "(empty profile)"
    rows = []
    for r in table:
        if max_depth is not None and r["depth"] > max_depth:
            continue
        rows.append(["  " * r["depth"] + r["module"], r["type"], _human(r["params"]), _human(r["macs"]),
                     f"{100 * r['macs_share']:.1f}", f"{r['time_ms']:.3f}", f"{100 * r['time_share']:.1f}"])
    head = table[0]
    text = tabulate(rows, headers=["module", "type", "params", "MACs", "MACs %", "time ms", "time %"],
                    colalign=("left", "left", "right", "right", "right", "right", "right"))
    note = (f"input {head['input_shape']} on {head['device']}; MACs for the whole batch (FLOPs = 2 x MACs); "
            "time: mean inclusive wall time per forward, from module hooks")
    if head.get("unsupported_ops"):
        note += f"\nops without a MAC formula (not counted): {', '.join(sorted(head['unsupported_ops']))}"
    return text + "\n" + note


def cost_profile(model: nn.Module, input_size: int | Sequence[int] = 32, device: str = "cpu", *,
                 in_chans: int = 3) -> list[dict[str, Any]]:
    """The cost table of a dynamic model at batch 1 (:func:`fractalbench.harness.metrics.flops.build_cost_table`,
    random normal input of ``input_size``), one dict per row: ``part`` is ``exit`` (exit k's forced
    path: what a sample that leaves there runs, cumulative), ``unit`` (a cost unit: a sample's MACs
    are the sum over units of its count x the unit's MACs) or ``forward`` (``forward()`` at batch 1,
    where it is a fixed path); ``name``, ``macs``, ``baseline`` (units) and the MACs by role
    (backbone, heads, gates, routers). [] for a static model (its cost is the forward profile)."""
    from fractalbench.harness import contract
    from fractalbench.harness.metrics.flops import build_cost_table

    if not contract.is_dynamic(model):
        return []
    device = check_device(device)
    shape = _input_shape(input_size, in_chans)
    model = model.to(device)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    table = build_cost_table(model, x)
    rows = [{"part": "exit", "name": f"exit {k}", "macs": macs, "baseline": None, **table.exit_roles[k]}
            for k, macs in enumerate(table.exits)]
    rows += [{"part": "unit", "name": name, "macs": macs, "baseline": table.baselines[name], **table.unit_roles[name]}
             for name, macs in table.units.items()]
    if table.forward_count is not None:
        rows.append({"part": "forward", "name": "forward()", "macs": table.forward_count.total, "baseline": None,
                     **table.roles_of(table.forward_count)})
    for row in rows:
        row["input_shape"] = [1, *shape]
    return rows


def format_cost_profile(rows: list[dict[str, Any]]) -> str:
    """The cost table of :func:`cost_profile` as text (the CLI prints it after the module profile):
    the forced exits, the cost units, and how they relate to ``forward()``; "" for no rows."""
    from tabulate import tabulate

    if not rows:
        return ""
    roles = ["backbone", "heads", "gates", "routers"]
    table = lambda part, first: tabulate(  # noqa: E731
        [[r["name"], _human(r["macs"]), r["baseline"] or "", *(_human(r[k]) for k in roles)]
         for r in rows if r["part"] == part], headers=[first, "MACs", "baseline", *roles],
        colalign=("left", "right", "left", "right", "right", "right", "right"))
    exits = [r["macs"] for r in rows if r["part"] == "exit"]
    forward = [r for r in rows if r["part"] == "forward"]
    text = [f"cost table at batch 1, input {rows[0]['input_shape']}: what one sample runs",
            "", table("exit", "forced exit (cumulative path)"), "", table("unit", "cost unit"), "",
            "a sample's MACs = sum over cost units of (times it ran the unit) x the unit's MACs"
            + (f": {_human(min(exits))} to {_human(max(exits))} by the exit it takes" if len(exits) > 1 else "")]
    if forward:
        text.append(f"forward() (the module profile above) is one fixed path, {_human(forward[0]['macs'])} at "
                    f"batch 1; what a sample costs is its forced exit's path above")
    else:
        text.append("forward() decides per sample (gates or routers): the module profile above shows one batch's "
                    "decisions; the cost units give each sample's cost")
    return "\n".join(text)
