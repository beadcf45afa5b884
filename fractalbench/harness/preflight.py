"""Checks of a suite that need its models or its data, made before the first cell runs.

The suite schema (:mod:`fractalbench.harness._suite_schema`) already refuses what a field alone shows (policy
thresholds out of their range, unknown fields, bad numbers). What needs more is checked here, for
every entry at once, so that a run never spends hours on the first cells to fail on a later one:

- every model builds with its keyword arguments (a timm name must be one timm knows): on the meta
  device, where no weight is allocated (on the CPU when a model cannot be built on meta);
- a batch of two inputs of the dataset's shape through every exit gives logits ``[2, num_classes]``
  (on the meta device; on the CPU when a meta forward is not possible), each wrong exit named;
- an ``attribute_sweep`` names attributes the built model has (``attribute`` and every ``set`` key);
- weights (``weights:``) are found, verified and fit the model (or the dense backbone it is built on),
  those of ``cell:LABEL`` by the shape of that entry's model; their declared normalisation fits the
  dataset; ``freeze: backbone`` is asked only of models built on a dense backbone;
- every training batch size (the suite's, a model's override, a sweep stage's) fits in the
  training split of each dataset: the trainer drops the last incomplete batch, so a batch larger
  than the split would run no step.

:func:`check_suite` returns one line per problem, each naming the suite file and the field, the
way :class:`fractalbench.harness.suites.SuiteError` does; :func:`raise_for_suite` raises them together.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from fractalbench.harness.cells import suite_folder
from fractalbench.harness.data import DatasetConfig, DataSplits
from fractalbench.harness.registry import ModelSpec
from fractalbench.harness.suites import ModelEntry, Suite, SuiteError, sweep_train_config, train_config_for


def _build(spec: ModelSpec) -> nn.Module:
    """The model on the meta device (no memory for weights); on the CPU if meta cannot build it."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return spec.build()
    except (TypeError, ValueError, KeyError, LookupError):
        raise  # wrong keywords, unknown names: the same on any device
    except Exception:  # noqa: BLE001 - an op meta tensors do not support: build it for real
        return spec.build()


def _model_problems(index: int, entry: ModelEntry, splits: DataSplits, suite: Suite | None = None,
                    unreachable: list[str] | None = None) -> tuple[list[str], nn.Module | None]:
    where = f"models[{index}]"
    spec = ModelSpec(entry.name, dict(entry.kwargs), splits.num_classes, splits.in_chans)
    try:
        model = _build(spec)
    except Exception as exc:  # noqa: BLE001 - every build failure is reported, whatever raised it
        field = f"{where}.kwargs" if entry.kwargs and isinstance(exc, (TypeError, ValueError)) else f"{where}.name"
        text = " ".join(str(exc).split())
        return [f"field '{field}': {text if text.startswith('model ') else f'model {entry.display!r}: {text}'}"], None
    problems = _weights_problems(index, entry, model, splits, suite, unreachable)
    shape = (splits.in_chans, splits.image_size, splits.image_size)
    problems += [f"field '{where}.name': model {entry.display!r}: {p}"
                 for p in exit_shape_problems(model, splits.num_classes, shape, spec.build)]
    sweep = entry.attribute_sweep
    if sweep is not None:
        for key, name in ((f"{where}.attribute_sweep.attribute", sweep.attribute),
                          *((f"{where}.attribute_sweep.set.{k}", k) for k in sweep.set)):
            if not hasattr(model, name):
                problems.append(f"field '{key}': model {entry.display!r} ({type(model).__name__}) has no attribute "
                                f"{name!r}")
    return problems, model


SHAPE_BATCH = 2  # samples in the preflight forward pass (2, so that a batch dimension squeezed away shows)


def exit_shape_problems(model: nn.Module, num_classes: int, input_shape: tuple[int, int, int],
                        rebuild: Callable[[], nn.Module] | None = None) -> list[str]:
    """One line per exit whose logits are not ``[batch, num_classes]`` on a batch of
    :data:`SHAPE_BATCH` inputs (the final ``forward`` too, for a static model), or one line when the
    forward pass itself fails. On the meta device when the model is there (no computation); when a
    meta forward is not possible (data-dependent control flow), ``rebuild()`` gives a CPU model run on
    zeros."""
    from fractalbench.harness import contract

    def shapes(net: nn.Module, device: str) -> list[tuple[str, tuple[int, ...]]]:
        x = torch.zeros(SHAPE_BATCH, *input_shape, device=device)
        net.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if contract.is_dynamic(net):
                outs = contract.forward_exits(net, x)
                n = len(outs)
                return [(f"exit {k} of {n}", tuple(o.shape) if isinstance(o, torch.Tensor) else ())
                        for k, o in enumerate(outs)]
            out = net(x)
            return [("forward", tuple(out.shape) if isinstance(out, torch.Tensor) else ())]

    on_meta = any(p.is_meta for p in model.parameters())
    try:
        found = shapes(model, "meta" if on_meta else "cpu")
    except Exception as exc:  # noqa: BLE001 - a meta forward is not always possible; then a real one
        if not on_meta or rebuild is None:
            return [f"a forward pass on a batch of {SHAPE_BATCH} failed: {type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:300]}"]
        try:
            found = shapes(rebuild(), "cpu")
        except Exception as exc2:  # noqa: BLE001 - whatever the model raises, one line
            return [f"a forward pass on a batch of {SHAPE_BATCH} zeros failed: {type(exc2).__name__}: "
                    f"{' '.join(str(exc2).split())[:300]}"]
    want = (SHAPE_BATCH, num_classes)
    return [f"{what} returns logits of shape {list(shape)}; every exit must return [batch, num_classes] = "
            f"{list(want)}" for what, shape in found if shape != want]


def _weights_problems(index: int, entry: ModelEntry, model: nn.Module, splits: DataSplits,
                      suite: Suite | None = None, unreachable: list[str] | None = None) -> list[str]:
    from fractalbench.harness.data import with_normalisation
    from fractalbench.harness.weights import (
        WeightsError,
        WeightsUnreachable,
        adapt,
        fit_weights,
        read_state,
        resolve,
        submodule,
    )

    problems: list[str] = []
    several = len(entry.weight_sources) > 1
    for j, cfg in enumerate(entry.weight_sources):
        where = f"field 'models[{index}].weights" + (f"[{j}]'" if several else "'")
        try:
            part = submodule(model, cfg.into, entry.display)
            name = entry.display if cfg.into is None else f"{entry.display}.{cfg.into}"
            if cfg.kind == "cell":
                if suite is not None:
                    source = next(m for m in suite.models if m.display == cfg.cell_label)
                    other = _build(ModelSpec(source.name, dict(source.kwargs), splits.num_classes, splits.in_chans))
                    fit_weights(part, other.state_dict(), cfg.source, name)
                continue
            found = resolve(cfg, _suite_folder(suite))
            state, recorded = read_state(found.path)
            state, used = adapt(state, cfg.adapter)
            fit_weights(part, state, cfg.source, name)
            declared = cfg.declared_normalisation() or recorded or next(
                (a.normalisation for a in used if a.normalisation is not None), None)
            if declared is not None and splits.info.get("stand_in"):
                if len(declared.mean) != splits.in_chans:
                    raise ValueError(f"the weights' normalisation has {len(declared.mean)} channel(s) (declared by "
                                     f"{declared.declared_by}); dataset {splits.name} has {splits.in_chans}")
            elif declared is not None:
                with_normalisation(splits, declared.mean, declared.std, declared.declared_by)
        except WeightsUnreachable as exc:
            if unreachable is None:
                problems.append(f"{where}: {' '.join(str(exc).split())}")
            else:
                unreachable.append(f"{where}: {' '.join(str(exc).split())}")
        except (WeightsError, ValueError) as exc:
            problems.append(f"{where}: {' '.join(str(exc).split())}")
    return problems


def _suite_folder(suite: Suite | None) -> Path:
    return Path.cwd() if suite is None else suite_folder(suite)


def _freeze_problems(suite: Suite, index: int, entry: ModelEntry, model: nn.Module) -> list[str]:
    from fractalbench.harness.train import frozen_part

    problems = []
    for field, cfg in ((f"models[{index}].train.freeze", train_config_for(suite, entry)),
                       (f"models[{index}].attribute_sweep.train.freeze", sweep_train_config(suite, entry))):
        if cfg is None or cfg.epochs == 0 or cfg.freeze == "none":
            continue
        try:
            frozen_part(model, cfg.freeze)
        except ValueError as exc:
            problems.append(f"field '{field}': model {entry.display!r}: {exc}")
    return problems


def _batch_problems(suite: Suite, index: int, entry: ModelEntry, dataset: DatasetConfig,
                    splits: DataSplits) -> list[str]:
    problems = []
    n = len(splits.train)
    for field, cfg in ((f"models[{index}].train.batch_size" if "batch_size" in entry.train else "train.batch_size",
                        train_config_for(suite, entry)),
                       (f"models[{index}].attribute_sweep.train.batch_size", sweep_train_config(suite, entry))):
        if cfg is None or cfg.epochs == 0 or cfg.batch_size <= n:
            continue
        if field.startswith(f"models[{index}].attribute_sweep") and "batch_size" not in entry.attribute_sweep.train:
            continue  # the same batch size as the model's, reported once
        whose = "" if field == "train.batch_size" else f" for model {entry.display!r}"
        problems.append(f"field '{field}': batch size {cfg.batch_size:,} is larger than the training split of "
                        f"{dataset.label} ({n:,} samples){whose}; no training step would run (allowed: 1 to {n:,})")
    return problems


def check_suite(suite: Suite, splits: Mapping[DatasetConfig, DataSplits],
                unreachable: list[str] | None = None, finished: Collection[str] = ()) -> list[str]:
    """Every problem of ``suite`` with its data ``splits`` (each dataset of the suite, loaded), one
    line each: ``suite PATH: field 'FIELD': problem``. Empty when the suite can run. With an
    ``unreachable`` list, weights URLs that cannot be downloaded here go there instead of the problems.
    ``finished``: labels of entries whose every cell is done in the run (a resume): they are not
    built and run again here (a resume with nothing to do stays quick); their settings still are checked."""
    problems: list[str] = []
    for dataset in suite.datasets:
        for i, entry in enumerate(suite.models):
            if entry.datasets and dataset.label not in entry.datasets:
                continue  # the model does not run on this dataset
            if entry.display in finished:
                found = _batch_problems(suite, i, entry, dataset, splits[dataset])
                problems += [p for p in found if p not in problems]
                continue
            found, model = _model_problems(i, entry, splits[dataset], suite, unreachable)
            if model is not None:
                found += _freeze_problems(suite, i, entry, model)
            found += _batch_problems(suite, i, entry, dataset, splits[dataset])
            problems += [p for p in found if p not in problems]
    return [f"suite {suite.path}: {p}" for p in problems]


def precision_warnings(suite: Suite, devices: Sequence[str], native_bf16: bool | None = None) -> list[str]:
    """One warning line when some model of ``suite`` trains under bf16 autocast on a CPU without
    native bf16 (:func:`fractalbench.harness.environment.cpu_native_bf16`; ``native_bf16`` overrides the
    probe): the numbers are valid, the training is several times slower than fp32. Empty otherwise."""
    from fractalbench.harness.environment import cpu_model, cpu_native_bf16

    native = cpu_native_bf16() if native_bf16 is None else native_bf16
    if native is not False or not any(d == "cpu" for d in devices):
        return []
    slow = [entry.display for entry in suite.models
            if any(cfg is not None and cfg.epochs > 0 and cfg.precision == "bf16"
                   for cfg in (train_config_for(suite, entry), sweep_train_config(suite, entry)))]
    if not slow:
        return []
    return [f"warning: {len(slow)} model(s) ({', '.join(slow)}) train under bf16 autocast on the CPU, "
            f"but this CPU ({cpu_model()}, "
            f"{torch.backends.cpu.get_cpu_capability()}) has no native bf16 (no avx512_bf16 or amx_bf16 flag): "
            "PyTorch emulates it, 8-12x slower than fp32 on an AVX2 AMD EPYC; the numbers stay valid. To train in "
            f"fp32 here, set `precision: fp32` in the train settings of suite {suite.path} (a new recipe: those "
            "cells run again)"]


def raise_for_suite(suite: Suite, splits: Mapping[DatasetConfig, DataSplits], finished: Collection[str] = ()) -> None:
    """SuiteError with every problem of :func:`check_suite` (one per line), if there is any."""
    problems = check_suite(suite, splits, finished=finished)
    if problems:
        raise SuiteError("\n".join(problems))
