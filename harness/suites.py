"""Suites: declarative YAML files in ``suites/`` validated into typed objects.

Every error names the file, the field and what is allowed. A suite is found by name
(``suites/<name>.yaml``) or by path. See ``suites/default.yaml`` for a commented example.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from harness.data import DATASET_NAMES, DatasetConfig
from harness.train import OPTIMIZERS, SCHEDULES, TrainConfig

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
METRICS = ("accuracy", "cost", "latency", "memory", "sweep", "patterns")
DEVICE_HELP = "cpu, cuda or cuda:N"


class SuiteError(ValueError):
    """A suite that cannot be found or does not validate."""


@dataclass(frozen=True)
class AttributeSweep:
    """A second training stage run once per value of a model attribute, each started from the
    first stage's weights (e.g. SkipNet's hybrid RL stage over ``alpha``). ``set``: attributes
    set before the stage (e.g. ``training_stage: hybrid_rl``); ``train``: overrides of the
    model's training settings for the stage. Each value gives one operating point (policy =
    the attribute's name, threshold = the value)."""

    attribute: str
    values: tuple[float, ...]
    set: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """A model to run: registry name, builder options, an optional label (default: the name),
    per-model training overrides (e.g. more epochs) and an optional attribute sweep (a second
    training stage per value, e.g. SkipNet's alpha)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    attribute_sweep: AttributeSweep | None = None

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 5
    repeats: int = 30
    threads: int = 1
    stream_samples: int = 100
    isolate: bool = True


@dataclass(frozen=True)
class MemoryConfig:
    batch_size: int = 16


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    grid: tuple[float, ...] = ()


@dataclass(frozen=True)
class CostConfig:
    oracle_samples: int = 8
    input_sizes: tuple[int, ...] = ()  # extra input sizes for a cost-only table (e.g. 32, 224)


@dataclass(frozen=True)
class Suite:
    name: str
    path: str
    description: str = ""
    seed: int = 0
    devices: tuple[str, ...] = ("cpu",)
    datasets: tuple[DatasetConfig, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    train: TrainConfig | None = None
    eval_batch_size: int = 256
    metrics: tuple[str, ...] = ("accuracy",)
    latency: LatencyConfig = LatencyConfig()
    memory: MemoryConfig = MemoryConfig()
    cost: CostConfig = CostConfig()
    policies: tuple[PolicyConfig, ...] = ()
    budgets: tuple[float, ...] = ()
    compare: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def digest(self) -> str:
        """Content hash of the suite as written (identity in stored results)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_models(self, names: list[str]) -> "Suite":
        """Keep only entries whose name or label is listed (CLI --models)."""
        known = {m.display for m in self.models} | {m.name for m in self.models}
        missing = [n for n in names if n not in known]
        if missing:
            from harness.registry import unknown_name
            raise SuiteError(str(unknown_name(f"model in suite {self.name}", missing[0], sorted(known))))
        return replace(self, models=tuple(m for m in self.models if m.name in names or m.display in names))


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def find_suite(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    from harness.registry import unknown_name
    raise SuiteError(str(unknown_name("suite", name_or_path, list_suites(), f"suites live in {SUITES_DIR} or give a .yaml path")))


def load_suite(name_or_path: str) -> Suite:
    path = find_suite(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SuiteError(f"suite {path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_suite(raw, str(path))


# ----- validation ---------------------------------------------------------------------------------

class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> SuiteError:
        return SuiteError(f"suite {self.path}: field '{where}': {problem}")

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping with keys from: {', '.join(allowed)}")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{where}.{key}" if where else str(key), f"unknown field; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.fail(f"{where}.{key}" if where else key, "is required")
        return value

    def integer(self, value: Any, where: str, low: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(where, f"must be a whole number >= {low}, got {value!r}")
        return value

    def number(self, value: Any, where: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(where, f"must be between {low} and {high}, got {value!r}")
        return float(value)

    def choice(self, value: Any, where: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(where, f"{value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value

    def text(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {value!r}")
        return value

    def seq(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {value!r}")
        return value


def check_device(device: str) -> str:
    """Validate a device string; asking for CUDA where there is none raises ValueError."""
    import torch

    if not isinstance(device, str):
        raise ValueError(f"device must be a string ({DEVICE_HELP}), got {device!r}")
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA device; use cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ValueError(f"device {device!r} is not allowed; allowed: {DEVICE_HELP}")


TOP_FIELDS = ("name", "description", "seed", "devices", "datasets", "models", "train", "evaluate", "metrics",
              "latency", "memory", "cost", "policies", "budgets", "compare")
DATASET_FIELDS = tuple(f.name for f in fields(DatasetConfig))
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")


def parse_suite(raw: Any, path: str = "<suite>") -> Suite:
    c = _Checker(path)
    top = c.mapping(raw, "", TOP_FIELDS, required=("name", "datasets", "models"))
    name = c.text(top["name"], "name")
    seed = c.integer(top.get("seed", 0), "seed")
    devices = tuple(c.choice(d, f"devices[{i}]", ("cpu", "cuda")) if not str(d).startswith("cuda:") else str(d)
                    for i, d in enumerate(c.seq(top.get("devices", ["cpu"]), "devices")))
    datasets = tuple(_dataset(c, d, f"datasets[{i}]") for i, d in enumerate(c.seq(top["datasets"], "datasets")))
    if not datasets:
        raise c.fail("datasets", "needs at least one dataset")
    models = tuple(_model(c, m, f"models[{i}]") for i, m in enumerate(c.seq(top["models"], "models")))
    if not models:
        raise c.fail("models", "needs at least one model")
    labels = [m.display for m in models]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise c.fail("models", f"labels must be unique; repeated: {', '.join(dupes)} (give each a distinct `label`)")
    train = None
    if top.get("train") is not None:
        train = _train(c, top["train"], "train", seed)
    ev = c.mapping(top.get("evaluate"), "evaluate", ("batch_size",))
    metrics = tuple(c.choice(m, f"metrics[{i}]", METRICS) for i, m in enumerate(c.seq(top.get("metrics", ["accuracy"]), "metrics")))
    lat = c.mapping(top.get("latency"), "latency", tuple(f.name for f in fields(LatencyConfig)))
    latency = LatencyConfig(
        batch_sizes=tuple(c.integer(b, f"latency.batch_sizes[{i}]", 1) for i, b in enumerate(c.seq(lat.get("batch_sizes", [1]), "latency.batch_sizes"))),
        warmup=c.integer(lat.get("warmup", 5), "latency.warmup"),
        repeats=c.integer(lat.get("repeats", 30), "latency.repeats", 1),
        threads=c.integer(lat.get("threads", 1), "latency.threads", 1),
        stream_samples=c.integer(lat.get("stream_samples", 100), "latency.stream_samples", 1),
        isolate=bool(lat.get("isolate", True)),
    )
    mem = c.mapping(top.get("memory"), "memory", ("batch_size",))
    cost = c.mapping(top.get("cost"), "cost", ("oracle_samples", "input_sizes"))
    from harness.policies import POLICY_NAMES

    policies = []
    for i, p in enumerate(c.seq(top.get("policies", []), "policies")):
        pm = c.mapping(p, f"policies[{i}]", ("name", "grid"), required=("name",))
        policies.append(PolicyConfig(c.choice(pm["name"], f"policies[{i}].name", POLICY_NAMES),
                                     tuple(c.number(g, f"policies[{i}].grid[{j}]") for j, g in enumerate(c.seq(pm.get("grid", []), f"policies[{i}].grid")))))
    budgets = tuple(c.number(b, f"budgets[{i}]", 0.0, 1.0) for i, b in enumerate(c.seq(top.get("budgets", []), "budgets")))
    compare = {str(k): c.number(v, f"compare.{k}") for k, v in c.mapping(top.get("compare"), "compare", COMPARE_FIELDS).items()}
    return Suite(
        name=name, path=path, description=str(top.get("description", "")), seed=seed, devices=devices,
        datasets=datasets, models=models, train=train,
        eval_batch_size=c.integer(ev.get("batch_size", 256), "evaluate.batch_size", 1), metrics=metrics,
        latency=latency, memory=MemoryConfig(c.integer(mem.get("batch_size", 16), "memory.batch_size", 1)),
        cost=CostConfig(c.integer(cost.get("oracle_samples", 8), "cost.oracle_samples"),
                        tuple(c.integer(s, f"cost.input_sizes[{i}]", 1) for i, s in enumerate(c.seq(cost.get("input_sizes", []), "cost.input_sizes")))),
        policies=tuple(policies), budgets=budgets, compare=compare, raw=top,
    )


COMPARE_FIELDS = ("accuracy_points", "latency_ratio", "memory_ratio", "p_value", "exit_drift_p_value")


def _dataset(c: _Checker, d: Any, where: str) -> DatasetConfig:
    if isinstance(d, str):
        d = {"name": d}
    dm = c.mapping(d, where, DATASET_FIELDS, required=("name",))
    c.choice(dm["name"], f"{where}.name", DATASET_NAMES)
    kw: dict[str, Any] = {"name": dm["name"]}
    for key in ("image_size", "limit_train", "limit_test", "num_classes", "in_chans", "num_samples"):
        if dm.get(key) is not None:
            kw[key] = c.integer(dm[key], f"{where}.{key}", 1)
    if "val_fraction" in dm:
        kw["val_fraction"] = c.number(dm["val_fraction"], f"{where}.val_fraction", 0.01, 0.9)
    if "root" in dm:
        kw["root"] = c.text(dm["root"], f"{where}.root")
    if "download" in dm:
        if not isinstance(dm["download"], bool):
            raise c.fail(f"{where}.download", f"must be true or false, got {dm['download']!r}")
        kw["download"] = dm["download"]
    return DatasetConfig(**kw)


def _model(c: _Checker, m: Any, where: str) -> ModelEntry:
    if isinstance(m, str):
        m = {"name": m}
    mm = c.mapping(m, where, ("name", "kwargs", "label", "train", "attribute_sweep"), required=("name",))
    name = c.text(mm["name"], f"{where}.name")
    from harness.registry import model_card

    try:
        model_card(name)
    except ValueError as exc:
        raise c.fail(f"{where}.name", str(exc)) from None
    kwargs = c.mapping(mm.get("kwargs"), f"{where}.kwargs", tuple(mm.get("kwargs") or ()))
    train = c.mapping(mm.get("train"), f"{where}.train", TRAIN_FIELDS)
    sweep = None
    if mm.get("attribute_sweep") is not None:
        sweep = _attribute_sweep(c, mm["attribute_sweep"], f"{where}.attribute_sweep")
    return ModelEntry(name, dict(kwargs), str(mm.get("label", "")), dict(train), sweep)


def _attribute_sweep(c: _Checker, s: Any, where: str) -> AttributeSweep:
    sm = c.mapping(s, where, ("attribute", "values", "set", "train"), required=("attribute", "values"))
    attribute = c.text(sm["attribute"], f"{where}.attribute")
    if not attribute.isidentifier():
        raise c.fail(f"{where}.attribute", f"must be a model attribute name, got {attribute!r}")
    values = tuple(c.number(v, f"{where}.values[{i}]") for i, v in enumerate(c.seq(sm["values"], f"{where}.values")))
    if not values:
        raise c.fail(f"{where}.values", "needs at least one value")
    if len(set(values)) != len(values):
        raise c.fail(f"{where}.values", f"values must be distinct, got {list(values)}")
    settings = c.mapping(sm.get("set"), f"{where}.set", tuple(sm.get("set") or ()))
    for key in settings:
        if not str(key).isidentifier():
            raise c.fail(f"{where}.set.{key}", "must be a model attribute name")
    train = c.mapping(sm.get("train"), f"{where}.train", TRAIN_FIELDS)
    _train(c, train, f"{where}.train", 0)  # validate now, not halfway through a run
    return AttributeSweep(attribute, values, dict(settings), dict(train))


def _train(c: _Checker, t: Any, where: str, seed: int, base: TrainConfig | None = None) -> TrainConfig:
    tm = c.mapping(t, where, TRAIN_FIELDS)
    base = base or TrainConfig(seed=seed)
    kw: dict[str, Any] = {}
    for key in ("epochs", "batch_size", "max_steps_per_epoch"):
        if key in tm and tm[key] is not None:
            kw[key] = c.integer(tm[key], f"{where}.{key}", 0 if key == "epochs" else 1)
    for key in ("lr", "momentum", "weight_decay", "gamma"):
        if key in tm:
            kw[key] = c.number(tm[key], f"{where}.{key}", 0.0)
    if "optimizer" in tm:
        kw["optimizer"] = c.choice(tm["optimizer"], f"{where}.optimizer", OPTIMIZERS)
    if "schedule" in tm:
        kw["schedule"] = c.choice(tm["schedule"], f"{where}.schedule", SCHEDULES)
    if "milestones" in tm:
        kw["milestones"] = tuple(c.integer(v, f"{where}.milestones[{i}]", 1) for i, v in enumerate(c.seq(tm["milestones"], f"{where}.milestones")))
    return replace(base, seed=seed, **kw)


def train_config_for(suite: Suite, entry: ModelEntry) -> TrainConfig | None:
    """The suite's training settings with the model entry's overrides applied."""
    if suite.train is None:
        return None
    if not entry.train:
        return suite.train
    return _train(_Checker(suite.path), entry.train, f"models[{entry.display}].train", suite.seed, suite.train)


def sweep_train_config(suite: Suite, entry: ModelEntry) -> TrainConfig | None:
    """Training settings of an attribute sweep's stage: the model's, then the sweep's overrides."""
    base = train_config_for(suite, entry)
    if base is None or entry.attribute_sweep is None:
        return None
    sweep = entry.attribute_sweep
    return _train(_Checker(suite.path), sweep.train, f"models[{entry.display}].attribute_sweep.train", suite.seed, base)
