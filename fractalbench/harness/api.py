"""The Python API: benchmark a model you hold (an ``nn.Module``) without registering it or writing a suite.

:func:`benchmark` builds a one-cell suite from its arguments (so validation, defaults and every
error message are the suite's, :func:`fractalbench.harness.suites.parse_suite`), checks it like ``fractalbench
run`` does (:func:`fractalbench.harness.preflight.raise_for_suite`) and runs the cell with the runner's own
machinery (:func:`fractalbench.harness.runner.run_cell`: the steps of :mod:`fractalbench.harness.steps` on a
:class:`fractalbench.harness.cell_state.CellState`). It returns the tidy rows the runner writes.

A model object is served to the registry under the name ``object:NAME`` for the length of the call
(a registry prefix, :func:`fractalbench.harness.registry.register_prefix`); rows carry it as ``variant`` and
``NAME`` as ``model``. Such a model cannot be rebuilt in a fresh process, so its latency and memory
are measured in the calling process (:func:`in_process_reason`), and every such row says so in its
detail: ``"isolated": false, "why": "model object cannot be rebuilt in a fresh process"``. A model
given by name (as a suite's ``models:`` entry takes it) is rebuilt in worker processes as in any suite.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from fractalbench.harness import contract
from fractalbench.harness.data import DatasetConfig, DataSplits, load_dataset, stratified_split
from fractalbench.harness.devices import check_device
from fractalbench.harness.outcomes import outcomes_path
from fractalbench.harness.registry import ModelCard, ModelSpec, register_prefix
from fractalbench.harness.registry import in_process_reason as registry_in_process_reason
from fractalbench.harness.results import ROW_FIELDS, RunStore, label_in_process, slug
from fractalbench.harness.suites import METRICS, Suite, parse_suite

__all__ = ["NOT_REBUILDABLE", "OBJECT_PREFIX", "benchmark", "in_process_reason", "label_in_process"]

OBJECT_PREFIX = "object"  # registry prefix of the model objects given to benchmark()
NOT_REBUILDABLE = "model object cannot be rebuilt in a fresh process"
SUITE_PATH = "fractalbench.harness.api.benchmark"  # names the one-cell suite in errors and in suite.json
TEST_FRACTION = 0.2  # a single Dataset: this share of each class is the test split ...
VAL_FRACTION = 0.1  # ... and this share of the rest the validation split (as the embedded digits)
# Suite fields that benchmark() sets from its own arguments; ``settings`` may give the others.
OWN_FIELDS = ("name", "models", "datasets", "devices", "metrics", "train", "policies", "budgets")
PLACEHOLDER = {"name": "synthetic"}  # validates a suite whose data are Dataset objects; replaced before it runs
SETTINGS_FIELDS = ("description", "seed", "evaluate", "latency", "memory", "cost", "compare")

_OBJECTS: dict[str, nn.Module] = {}  # NAME -> the model object served as ``object:NAME`` during a call


def _held_object(rest: str) -> nn.Module:
    if rest not in _OBJECTS:
        raise ValueError(f"model {OBJECT_PREFIX}:{rest} was a model object given to fractalbench.benchmark; "
                         "it exists only during that call, in that process, and cannot be rebuilt here")
    return _OBJECTS[rest]


def _object_factory(rest: str, *, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    """The held object itself (``num_classes``/``in_chans`` are checked on the data by :func:`benchmark`)."""
    if kwargs:
        raise ValueError(f"a model object takes no builder kwargs, got {sorted(kwargs)}")
    return _held_object(rest)


def _object_card(rest: str) -> ModelCard:
    model = _held_object(rest)
    return ModelCard(family="model object", paper=f"a {type(model).__name__} object given to fractalbench.benchmark",
                     dynamic_kind=contract.dynamic_kind(model),
                     notes="measured in the calling process: it cannot be rebuilt in a fresh one")


register_prefix(OBJECT_PREFIX, _object_factory, _object_card, not_rebuildable=NOT_REBUILDABLE)


def in_process_reason(spec: ModelSpec) -> str | None:
    """Why the model of ``spec`` must be measured in this process (:data:`NOT_REBUILDABLE` for a
    model object given to :func:`benchmark`); None when a worker process can rebuild it."""
    return registry_in_process_reason(spec.name)


@contextmanager
def _serving(name: str, model: nn.Module | None) -> Iterator[None]:
    """Serve ``model`` as ``object:name`` while the block runs (nothing for a registered name)."""
    if model is None:
        yield
        return
    if name in _OBJECTS:
        raise ValueError(f"a model object named {name!r} is being benchmarked already; give another name=")
    _OBJECTS[name] = model
    try:
        yield
    finally:
        _OBJECTS.pop(name, None)


# ----- arguments --------------------------------------------------------------------------------

def _model_entry(model: Any, name: str | None, kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(the suite's model entry, the name results carry) of a model object or a model name."""
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(model, str):
        entry: dict[str, Any] = {"name": model, "kwargs": dict(kwargs or {})}
        return ({**entry, "label": name} if name else entry), name or model
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise ValueError(f"model is the class {model.__name__}; give an instance, e.g. {model.__name__}(...)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module (or a registered model name), got {type(model).__name__}")
    if kwargs:
        raise ValueError("kwargs are builder options of a registered model name; a model object is used as given")
    label = name or type(model).__name__
    return {"name": f"{OBJECT_PREFIX}:{label}", "label": label}, label


def _metrics(metrics: str | Sequence[str]) -> list[str]:
    chosen = [metrics] if isinstance(metrics, str) else list(metrics)
    for metric in chosen:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return chosen


def _suite_dict(entries: list[dict[str, Any]], dataset: dict[str, Any], metrics: list[str], device: str, train: Any,
                policies: Any, budgets: Sequence[Any], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The suite (one cell per model) as a suite file would write it."""
    extra = dict(settings or {})
    for key in extra:
        if key not in SETTINGS_FIELDS:
            hint = "; give it as benchmark()'s own argument" if key in OWN_FIELDS else ""
            raise ValueError(f"settings key {key!r} is not allowed{hint}; allowed: {', '.join(SETTINGS_FIELDS)}")
    first = entries[0]
    raw: dict[str, Any] = {"name": f"api-{slug(first.get('label') or first['name'])}", **extra,
                           "datasets": [dataset], "models": entries, "devices": [device], "metrics": metrics}
    if train is not None:
        raw["train"] = train
    if policies is not None:
        raw["policies"] = [policies] if isinstance(policies, str) else list(policies)
    if budgets:
        raw["budgets"] = list(budgets)
    return raw


# ----- data ---------------------------------------------------------------------------------------

def _given_datasets(data: Any) -> tuple[Dataset, ...] | None:
    """The Dataset objects of ``data`` (one, or a train/val/test triple); None for a dataset entry."""
    if isinstance(data, (str, Mapping)):
        return None
    if isinstance(data, Dataset):
        return (data,)
    if isinstance(data, (tuple, list)) and len(data) == 3 and all(isinstance(d, Dataset) for d in data):
        return tuple(data)
    raise ValueError("data must be a dataset name (e.g. 'digits'), a dataset entry as in a suite (e.g. "
                     "{'name': 'digits', 'image_size': 8}), a torch Dataset of (image, label) pairs, or a "
                     f"(train, val, test) triple of them; got {type(data).__name__}")


def _is_label(y: Any) -> bool:
    if isinstance(y, Tensor):
        return y.dim() == 0 and not y.dtype.is_floating_point and not y.dtype.is_complex and y.dtype != torch.bool
    return isinstance(y, (int, np.integer)) and not isinstance(y, bool)


def _check_image(x: Any, where: str) -> tuple[int, ...]:
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
        got = f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"data: {where}: the image must be a float tensor [channels, height, width], got {got}")
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"data: {where}: images must be square (height = width), got shape {list(x.shape)}")
    return tuple(x.shape)


def _scan(ds: Dataset, whose: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(the image shape, every label) of ``ds`` (``whose``: "the dataset", "the train split" ...);
    ValueError naming the first sample that is not an (image [C, H, W] float, integer label) pair
    or whose shape differs from the first."""
    if len(ds) == 0:  # type: ignore[arg-type]
        raise ValueError(f"data: {whose} is empty")
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        shape = _check_image(ds.tensors[0][0], f"sample 0 of {whose}")
        if ds.tensors[1].dim() != 1 or not _is_label(ds.tensors[1][0]):
            raise ValueError(f"data: the labels of {whose} must be integer class indices, one per sample, got a "
                             f"{ds.tensors[1].dtype} tensor of shape {list(ds.tensors[1].shape)}")
        return shape, ds.tensors[1].numpy()
    shape, labels = None, []
    for i in range(len(ds)):  # type: ignore[arg-type]
        item, where = ds[i], f"sample {i} of {whose}"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"data: {where} must be an (image, label) pair, got {type(item).__name__}")
        here = _check_image(item[0], where)
        if shape is not None and here != shape:
            raise ValueError(f"data: {where} has shape {list(here)}, sample 0 {list(shape)}")
        if not _is_label(item[1]):
            raise ValueError(f"data: {where}: the label must be an integer class index, got {item[1]!r}")
        shape = here
        labels.append(int(item[1]))
    return shape, np.asarray(labels, dtype=np.int64)


def _split_one(ds: Dataset, labels: np.ndarray) -> tuple[Dataset, Dataset, Dataset]:
    rest, test = stratified_split(labels, TEST_FRACTION)
    fit, val = stratified_split(labels[rest], VAL_FRACTION)
    parts = [Subset(ds, rest[fit].tolist()), Subset(ds, rest[val].tolist()), Subset(ds, test.tolist())]
    for split, part in zip(("train", "val", "test"), parts):
        if len(part) == 0:
            raise ValueError(f"data: {len(labels)} samples are too few to split: the {split} split would be empty")
    return parts[0], parts[1], parts[2]


def splits_from_datasets(given: tuple[Dataset, ...], label: str) -> DataSplits:
    """DataSplits of Dataset objects, used as given (no normalisation, no augmentation). One Dataset
    is split like the embedded digits: 20% of each class is test, 10% of the rest validation
    (stratified, fixed seed). num_classes = 1 + the largest label; in_chans and image_size from the
    image shape [C, H, W] (square), which must be the same in every sample of every split."""
    names = ("the train split", "the val split", "the test split") if len(given) == 3 else ("the dataset",)
    scans = [_scan(ds, whose) for ds, whose in zip(given, names)]
    shapes = {shape for shape, _ in scans}
    if len(shapes) > 1:
        raise ValueError(f"data: the train, val and test images differ in shape: {sorted(list(s) for s in shapes)}")
    labels = np.concatenate([y for _, y in scans])
    if labels.min() < 0:
        raise ValueError(f"data: labels must be class indices >= 0, found {int(labels.min())}")
    train, val, test = given if len(given) == 3 else _split_one(given[0], scans[0][1])
    (chans, size, _), kind = scans[0][0], type(given[0]).__name__
    how = "given as (train, val, test)" if len(given) == 3 else (
        f"one dataset split here: {TEST_FRACTION:.0%} of each class test, {VAL_FRACTION:.0%} of the rest validation")
    info = {"source": f"{kind} objects given to fractalbench.harness.api.benchmark, used as given (no normalisation, "
                      f"no augmentation)", "splits": how, "n_train": len(train), "n_val": len(val), "n_test": len(test)}
    return DataSplits(train, val, test, int(labels.max()) + 1, chans, size, label, info)


def _resolve_data(suite: Suite, raw: dict[str, Any], given: tuple[Dataset, ...] | None,
                  dataset_name: str | None) -> tuple[Suite, DataSplits]:
    """(the suite with its real dataset, that dataset's splits): a named dataset is loaded; Dataset
    objects replace the placeholder entry the suite was validated with."""
    if given is None:
        return suite, load_dataset(suite.datasets[0])
    label = dataset_name or type(given[0]).__name__.lower()
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"dataset_name must be a non-empty string, got {label!r}")
    splits = splits_from_datasets(given, label)
    real = suite.model_copy(update={"datasets": (DatasetConfig(name=label),)})
    real._path, real._raw = suite.path, {**raw, "datasets": [{"name": label, **splits.info}]}
    return real, splits


def _check_model_on_data(model: nn.Module, splits: DataSplits, device: str) -> None:
    """ValueError unless every exit of ``model`` gives [1, num_classes] logits on one test sample."""
    x = splits.test[0][0].unsqueeze(0).to(device)
    was_training = model.training
    try:
        model.to(device).eval()
        with torch.no_grad():
            outs = contract.forward_exits(model, x)
    except Exception as exc:  # noqa: BLE001 - any failure here means the data does not fit the model
        raise ValueError(f"model {type(model).__name__} cannot run on the data's samples (shape "
                         f"{list(x.shape)}): {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    for k, out in enumerate(outs):
        if not isinstance(out, Tensor) or tuple(out.shape) != (1, splits.num_classes):
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model {type(model).__name__}: exit {k} gives logits of shape {got} on one sample, "
                             f"but the data has {splits.num_classes} classes (expected [1, {splits.num_classes}])")


# ----- running ------------------------------------------------------------------------------------

def _prepare_out(out: Path, suite: Suite, cell_ids: list[str]) -> None:
    """Refuse a folder that holds anything but an earlier run of the same call; clear that call's cells."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; give a folder")
    store = RunStore(out)
    old = store.read_meta("suite.json") if (out / "suite.json").is_file() else None
    if old is None and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out {out} is not empty and holds no fractalbench run; give a new or empty folder")
    if old is not None and old.get("digest") != suite.digest:
        raise ValueError(f"out {out} holds another run (suite {old.get('name')!r}, digest {old.get('digest')}, "
                         f"this call: {suite.digest}); give another folder")
    for cell_id in cell_ids:
        shutil.rmtree(out / "artifacts" / cell_id, ignore_errors=True)  # no training resumes from an old checkpoint
        outcomes_path(out, cell_id).unlink(missing_ok=True)
        store.cell_path(cell_id).unlink(missing_ok=True)


def _run(suite: Suite, splits: DataSplits, out: Path, progress: bool) -> list[dict[str, Any]]:
    """Run the suite's cells (one per model) into ``out`` as the runner does; their rows as written to
    disk, model by model. RuntimeError naming the first cell that failed (after every cell ran)."""
    from fractalbench.harness.cells import Cell, run_cell
    from fractalbench.harness.environment import collect_environment

    cells = [Cell(entry, suite.datasets[0], suite.devices[0]) for entry in suite.models]
    _prepare_out(out, suite, [c.cell_id for c in cells])
    store = RunStore(out)
    store.write_meta("suite.json", {"name": suite.name, "path": suite.path, "digest": suite.digest,
                                    "content": suite.raw})
    environment = collect_environment()
    store.write_meta("environment.json", environment)
    rows, failed = [], []
    for cell in cells:
        record = run_cell(cell, suite, store, splits, progress=progress, commit=environment["git_commit"])
        store.write_cell(record)
        store.write_tables()
        if record.status != "ok":
            failed.append((cell, record))
            continue
        rows += json.loads(store.cell_path(cell.cell_id).read_text(encoding="utf-8"))["rows"]
    if failed:
        cell, record = failed[0]
        trace = (record.meta or {}).get("traceback", "")
        more = f" ({len(failed) - 1} other cell(s) failed too)" if len(failed) > 1 else ""
        raise RuntimeError(f"benchmark of {cell.model.display} on {cell.dataset.label} failed: {record.error}"
                           f"{more} (its error row is in {out})\n{trace}")
    return rows


DEFAULT_METRICS = ("accuracy", "cost", "sweep", "latency")


def benchmark(model: nn.Module | str | Sequence[nn.Module | str], data: Any,
              metrics: str | Sequence[str] = DEFAULT_METRICS, *,
              train: Mapping[str, Any] | None = None, policies: Sequence[Any] | None = None,
              budgets: Sequence[Any] = (), out: Path | str | None = None, device: str = "cpu",
              name: str | Sequence[str] | None = None, kwargs: Mapping[str, Any] | None = None,
              dataset_name: str | None = None,
              settings: Mapping[str, Any] | None = None, report: bool = False, as_frame: bool = False,
              progress: bool = False, weights: str | Mapping[str, Any] | None = None, pretrained: bool = False) -> Any:
    """Train (optionally) and measure one model, or several, on one dataset; return the tidy rows the
    runner writes (of every model: one list, or one frame).

    model: an ``nn.Module`` (static, or a :class:`fractalbench.harness.contract.DynamicModel`: early exit, gated,
    routed), deep-copied first so the object you hold is never trained, moved or changed; or a
    model name as a suite's ``models:`` entry takes it (builder options in ``kwargs``). ``name``:
    the model's name in results (default: the class name, or the model name). Several models: a list
    (or tuple) of them, each measured as one cell of the same run, with ``name`` a list of as many
    names (or None); ``kwargs``, ``weights`` and ``pretrained`` are for one model.
    data: a dataset name (``"digits"``) or a suite dataset entry (``{"name": "digits", "image_size":
    8}``), loaded and split as in a suite; or Dataset objects, see :func:`splits_from_datasets`
    (``dataset_name``: their name in results, default the class name in lower case).
    metrics: suite metrics (:data:`fractalbench.harness.suites.METRICS`). train, policies, budgets: the suite
    fields of those names (``train=None``: measured untrained); ``settings``: the other suite
    fields (:data:`SETTINGS_FIELDS`, e.g. ``{"latency": {"repeats": 10}}``).
    out: a folder to write the run directory to (cells/, results.csv/json, suite.json, outcomes/),
    for ``fractalbench report``/``compare`` and :func:`fractalbench.harness.results.load_run`; it must be new,
    empty or hold an earlier run of the same call, which is replaced. None: a temporary folder,
    deleted afterwards. ``report``: also write ``out/report.html`` (needs ``out``). ``progress``:
    training progress bars. ``weights``: trained weights to start from, as a suite entry's
    ``weights:`` (a file relative to the working directory, an https URL, or a mapping with
    ``source``, ``sha256``, ``adapter``, ``mean``, ``std``; :mod:`fractalbench.harness.weights`); their declared
    normalisation replaces the data's; ``train={"epochs": 0}`` measures them as loaded,
    ``train={"freeze": "backbone", ...}`` trains only what a dynamic model adds. ``pretrained``:
    timm's own weights of a ``timm:NAME`` model.
    Returns a list of row dicts (``as_frame``: a pandas DataFrame with columns ``ROW_FIELDS``).
    A model object's latency and memory rows are measured in this process and labelled so
    (:func:`label_in_process`). ValueError on bad input (before anything runs); RuntimeError when
    the cell fails (its error row is written to ``out``).
    """
    models, names = _several(model, name)
    if len(models) > 1 and (kwargs or weights is not None or pretrained):
        raise ValueError("kwargs, weights and pretrained apply to one model; with several, give each as a suite "
                         "model entry in a suite file, or call benchmark() once per model")
    entries, labels = zip(*(_model_entry(m, n, kwargs) for m, n in zip(models, names)))
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"two models would carry the same name {', '.join(map(repr, repeated))} in results; give "
                         "names=[...] (one per model)")
    entry = entries[0]
    if weights is not None:
        entry["weights"] = dict(weights) if isinstance(weights, Mapping) else weights
    if pretrained:
        entry["pretrained"] = True
    chosen, given = _metrics(metrics), _given_datasets(data)
    check_device(device)
    if report and out is None:
        raise ValueError("report=True writes out/report.html; give out=")
    held = [None if isinstance(m, str) else copy.deepcopy(m) for m in models]
    with ExitStack() as serving:
        for label, obj in zip(labels, held):
            serving.enter_context(_serving(label, obj))
        dataset = {"name": data} if isinstance(data, str) else dict(data) if given is None else dict(PLACEHOLDER)
        raw = _suite_dict(list(entries), dataset, chosen, device, train, policies, budgets, settings)
        suite, splits = _resolve_data(parse_suite(raw, SUITE_PATH), raw, given, dataset_name)
        rows = _checked_run(suite, splits, [h for h in held if h is not None], None if out is None else Path(out),
                            progress)
    if report:
        from fractalbench.reports.html import write_report

        write_report(Path(out))
    if as_frame:
        import pandas as pd

        return pd.DataFrame(rows, columns=list(ROW_FIELDS))
    return rows


def _several(model: Any, name: Any) -> tuple[list[Any], list[str | None]]:
    """(the models, their names) of ``benchmark``'s ``model`` and ``name``: one, or a list/tuple of each."""
    if not isinstance(model, (list, tuple)):
        if isinstance(name, (list, tuple)):
            raise ValueError("name is a list but model is one model; give a list of models too")
        return [model], [name]
    if not model:
        raise ValueError("model is an empty list; give at least one model")
    if name is None:
        return list(model), [None] * len(model)
    if not isinstance(name, (list, tuple)) or len(name) != len(model):
        raise ValueError(f"with {len(model)} models, name must be a list of {len(model)} names (or None)")
    return list(model), list(name)


def _checked_run(suite: Suite, splits: DataSplits, held: list[nn.Module], out: Path | None,
                 progress: bool) -> list[dict[str, Any]]:
    """Check the suite as ``fractalbench run`` does (and each model object on the data), then run it
    into ``out`` (None: a temporary folder)."""
    from fractalbench.harness.preflight import raise_for_suite

    for obj in held:
        _check_model_on_data(obj, splits, suite.devices[0])
    raise_for_suite(suite, {suite.datasets[0]: splits})
    if out is not None:
        return _run(suite, splits, out, progress)
    with tempfile.TemporaryDirectory(prefix="fractalbench-api-") as tmp:
        return _run(suite, splits, Path(tmp) / slug(suite.models[0].display), progress)
