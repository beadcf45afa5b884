"""The suite file schema, declared once as pydantic models (validation and JSON Schema both come from them).

A section of a suite file is a :class:`Section`: a frozen model that forbids unknown fields and
names the allowed ones. Sections that configure an existing settings dataclass (datasets,
training, latency, memory) are built from that dataclass with :func:`dataclass_section`, so its
defaults stay the one source, and validate straight into an instance of it (:func:`parsed_as`).
:func:`validate_suite` turns every error into one line of a :class:`SuiteError`:
``suite PATH: field 'FIELD': problem`` (:func:`suite_problems`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, fields, replace
from typing import Annotated, Any, ClassVar, Union, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetPydanticSchema,
    PlainValidator,
    PrivateAttr,
    Strict,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, core_schema

from fractalbench.harness._schema_types import (
    ERROR_TYPE,
    Device,
    Flag,
    Identifier,
    Text,
    choice,
    close_matches,
    described,
    fail,
    non_empty,
    number,
    reworded,
    whole,
    whole_valued,
)
from fractalbench.harness.data import DATASET_NAMES, DatasetConfig
from fractalbench.harness.metrics.serving import ServingSettings
from fractalbench.harness.metrics.settings import LatencySettings, MemorySettings
from fractalbench.harness.policies import POLICY_NAMES
from fractalbench.harness.train import FREEZE, OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig
from fractalbench.harness.weights import ADAPTER_CHOICES, CELL_PREFIX, WeightsConfig

METRICS = ("accuracy", "cost", "latency", "memory", "sweep", "patterns", "serving")
TOP_LEVEL = "(top level)"  # the field name in errors about the whole file
UNKNOWN_FIELD = "unknown field"  # the start of the message of a field a section does not have
MAX_PASSES = 8  # validation passes, each without the unknown fields the last one found


class SuiteError(ValueError):
    """A suite that cannot be found, read or validated."""


class Section(BaseModel):
    """A mapping in a suite file: unknown fields are errors that list the allowed ones; an empty
    value (``latency:`` with nothing after it) means all defaults; ``shorthand`` names the field
    that a bare string stands for (``- resnet20`` is ``- {name: resnet20}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shorthand: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if data is None or isinstance(data, cls):
            return {} if data is None else data
        if isinstance(data, str) and cls.shorthand:
            return {cls.shorthand: data}
        allowed = ", ".join(cls.model_fields)
        if not isinstance(data, Mapping):
            raise fail("must be a mapping with keys from: {allowed}", allowed=allowed)
        unknown = [key for key in data if key not in cls.model_fields]
        if unknown:
            raise ValidationError.from_exception_data(cls.__name__, [
                {"type": fail(UNKNOWN_FIELD + "; {close}allowed: {allowed}", allowed=allowed,
                              close=close_matches(key, cls.model_fields)), "loc": (str(key),), "input": data[key]}
                for key in unknown])
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: Any) -> dict[str, Any]:
        json_schema = handler.resolve_ref_schema(handler(schema))
        if not cls.shorthand:
            return json_schema
        return {"anyOf": [json_schema["properties"][cls.shorthand], json_schema]}


def parsed_as(source: type[BaseModel], build: Callable[[Any], Any]) -> GetPydanticSchema:
    """Annotated metadata: validate the input as ``source`` (also its JSON Schema), then store ``build(section)``."""
    return GetPydanticSchema(lambda _type, handler: core_schema.no_info_after_validator_function(
        build, handler.generate_schema(source)))


def dataclass_section(cls: type, name: str, doc: str, types: Mapping[str, Any], *, required: Collection[str] = (),
                      shorthand: str | None = None) -> type[Section]:
    """A :class:`Section` named ``name`` with the fields ``types`` (field -> annotated type) of
    dataclass ``cls`` and ``cls``'s defaults (``required`` fields have none)."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(cls)}
    unknown = sorted(set(types) - set(defaults))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    section = create_model(name, __base__=Section, __doc__=doc, __module__=__name__,
                           **{f: (kind, ... if f in required else defaults[f]) for f, kind in types.items()})
    section.shorthand = shorthand
    return section


def annotated_fields(cls: type, names: Collection[str]) -> dict[str, Any]:
    """The annotated types (constraints and descriptions included) of fields ``names`` of dataclass ``cls``."""
    hints = get_type_hints(cls, include_extras=True)
    return {name: hints[name] for name in names}


OptionalSize = whole(1) | None
DatasetSection = dataclass_section(DatasetConfig, "Dataset", "A dataset (harness.data.DatasetConfig); a bare name "
                                   "stands for the dataset with its defaults.", {
    "name": described(choice(DATASET_NAMES), "the embedded digits, a torchvision dataset, an image folder or "
                                             "synthetic data"),
    "root": described(Text, "directory with the dataset's files (torchvision's format, or the image folder)"),
    "image_size": described(OptionalSize, "resize every image to a square of this many pixels; null: native size"),
    "val_fraction": described(number(ge=0.01, le=0.9), "fraction of the training data held out as the validation "
                                                       "split, on which exit thresholds are chosen"),
    "download": described(Flag, "download the dataset when it is missing (needs network access)"),
    "limit_train": described(OptionalSize, "at most this many training samples (stratified); null: all"),
    "limit_test": described(OptionalSize, "at most this many test samples (stratified); null: all"),
    "num_classes": described(OptionalSize, "synthetic only: number of classes"),
    "in_chans": described(OptionalSize, "synthetic only: image channels"),
    "num_samples": described(OptionalSize, "synthetic only: number of images"),
    "memory_limit_mb": described(OptionalSize, "image folders whose uint8 pixels exceed this many MiB are streamed "
                                               "from disk; null: a quarter of the machine's memory"),
    "augment": described(Flag, "the dataset family's training augmentation (CIFAR: random crop and flip; digits: "
                               "random crop); false: none, as the LRA image task trains"),
}, required=("name",), shorthand="name")

TrainSection = dataclass_section(TrainConfig, "Training", "Training settings (harness.train.TrainConfig; the seed "
                                 "is the suite's).", {
    "epochs": described(whole(0), "passes over the training split (0: measure the model untrained)"),
    "batch_size": described(whole(1), "samples per training step"),
    "optimizer": described(choice(OPTIMIZERS), "the optimiser"),
    "lr": described(number(ge=0), "peak learning rate"),
    "momentum": described(number(ge=0), "SGD momentum (Nesterov when > 0)"),
    "weight_decay": described(number(ge=0), "L2 weight decay"),
    "schedule": described(choice(SCHEDULES), "learning-rate schedule: cosine decay, step (times gamma at each "
                                             "milestone) or none"),
    "milestones": described(tuple[whole(1), ...], "epochs at which the step schedule multiplies the rate by gamma"),
    "gamma": described(number(ge=0), "the step schedule's factor"),
    "warmup_epochs": described(number(ge=0), "linear learning-rate warm-up over this many epochs (may be a "
                                             "fraction) before the schedule; 0: none"),
    "max_steps_per_epoch": described(OptionalSize, "at most this many steps per epoch; null: the whole split"),
    "precision": described(choice(PRECISIONS), "training arithmetic: fp32, bf16 autocast of the forward pass "
                                               "and loss (fp32 weights and gradients), or auto: bf16 where the device "
                                               "has it natively, else fp32; measurement is always fp32"),
    "compile": described(Flag, "torch.compile the training step (inductor; the first steps take a minute to "
                               "compile; measurement always runs the plain model)"),
    "channels_last": described(Flag, "train in channels-last memory format (faster convolutions on GPUs)"),
    "sync_batchnorm": described(Flag, "under torchrun/DDP: batch-norm statistics over every rank's samples "
                                      "(SyncBatchNorm)"),
    "device_batches": described(Flag, "assemble and augment batches as tensors on the training device when "
                                      "the dataset is in memory (off: the DataLoader path)"),
    "freeze": described(choice(FREEZE), "backbone: train only what a dynamic model adds to its dense backbone "
                                        "(exit heads, gates, routers, experts), the backbone fixed in eval mode; "
                                        "none: train everything"),
})

#: A suite's ``latency:`` section: these fields of LatencySettings (the others are the runner's).
LATENCY_FIELDS = ("batch_sizes", "warmup", "repeats", "threads", "interop_threads", "stream_samples", "isolate",
                  "modes", "per_exit", "cross_check", "cross_check_rounds", "timeout_s",
                  "energy", "energy_idle_s", "backends")
#: A suite's ``memory:`` section: these fields of MemorySettings (threads are latency's).
MEMORY_FIELDS = ("batch_size", "repeats", "method", "timeout_s")
LatencySection = dataclass_section(LatencySettings, "Latency", "How latency is measured "
                                   "(fractalbench.harness.metrics.settings.LatencySettings).",
                                   annotated_fields(LatencySettings, LATENCY_FIELDS))
MemorySection = dataclass_section(MemorySettings, "Memory", "How peak memory is measured "
                                  "(fractalbench.harness.metrics.settings.MemorySettings).",
                                  annotated_fields(MemorySettings, MEMORY_FIELDS))

ServingSection = dataclass_section(ServingSettings, "Serving", "The serving scenario (metric serving; "
                                   "fractalbench.harness.metrics.serving): a dynamic-batching server driven by "
                                   "MLPerf LoadGen at Poisson arrival rates, and a single stream.", {
    "rates": described(tuple[number(gt=0), ...], "offered rates (samples/s) tried in order until one fails its "
                                                  "latency bound, then bisected"),
    "bound_ms": described(number(gt=0), "the p99 latency bound of a passing rate (ms)"),
    "max_batch": described(whole(1), "most samples the server runs in one step"),
    "max_wait_ms": described(number(ge=0), "how long the server lets its oldest new request wait for others"),
    "min_queries": described(whole(1), "queries per Server run at least (LoadGen's min_query_count)"),
    "min_duration_s": described(number(gt=0), "seconds per Server run at least"),
    "max_duration_s": described(number(gt=0), "seconds per run at most"),
    "search_steps": described(whole(0), "bisection steps between the last passing and the first failing rate"),
    "single_stream_queries": described(whole(1), "queries of the SingleStream run"),
    "threads": described(whole(1), "intra-op CPU threads while serving"),
    "max_points": described(whole(1), "operating points served per model at most (spread over the points the "
                                      "latency stream times)"),
})


def _instance(cls: type) -> Callable[[BaseModel], Any]:
    """``section -> cls(**its fields)``."""
    return lambda section: cls(**dict(section))


Dataset = Annotated[DatasetConfig, parsed_as(DatasetSection, _instance(DatasetConfig))]
Training = Annotated[TrainConfig, parsed_as(TrainSection, _instance(TrainConfig))]
Latency = Annotated[LatencySettings, parsed_as(LatencySection, _instance(LatencySettings))]
Memory = Annotated[MemorySettings, parsed_as(MemorySection, _instance(MemorySettings))]
Serving = Annotated[ServingSettings, parsed_as(ServingSection, _instance(ServingSettings))]
#: Overrides of training settings: only the fields given, validated like ``train:``.
TrainOverrides = Annotated[dict[str, Any], parsed_as(TrainSection, lambda s: s.model_dump(exclude_unset=True)),
                           Field(description="overrides of the suite's training settings")]


class AttributeSweep(Section):
    """A second training stage run once per value of a model attribute, each started from the
    first stage's weights (e.g. SkipNet's hybrid RL stage over ``alpha``). Each value gives one
    operating point (policy = the attribute's name, threshold = the value)."""

    attribute: described(Identifier, "the model attribute set to each value, e.g. alpha")
    values: described(non_empty(number(), "value"), "the values, one stage each; distinct")
    set: described(dict[Identifier, Any], "attributes set before the stage, e.g. training_stage: hybrid_rl") = {}
    train: TrainOverrides = {}

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if len(set(values)) != len(values):
            raise fail("values must be distinct, got {values}", values=list(values))
        return values


def _registered(name: str) -> str:
    from fractalbench.harness.registry import model_card

    try:
        model_card(name)
    except ValueError as exc:
        raise fail("{problem}", problem=str(exc)) from None
    return name


Sha256 = Annotated[str, Strict(), Field(pattern=r"^[0-9a-fA-F]{64}$"),
                   reworded("must be a sha256 of 64 hex digits, got {got}")]
Channels = Annotated[tuple[number(gt=0), ...], Field(min_length=1)]


class WeightsSection(Section):
    """Trained weights the model starts from (fractalbench.harness.weights); a bare string stands for the source."""

    shorthand = "source"
    source: described(Text, "a file (relative to the suite file's folder, or absolute), an https URL (downloaded "
                            "once into the cache, sha256-checked) or cell:LABEL (the trained checkpoint of that "
                            "model entry of this run, which runs first)")
    sha256: described(Sha256 | None, "the file's sha256; a URL without it needs a hash prefix in its file name "
                                     "(name-<8+ hex digits>.ext, the torch.hub convention)") = None
    adapter: described(choice(ADAPTER_CHOICES), "how the checkpoint's keys map onto the model: auto (every declared "
                                                "layout the keys show), none, or one adapter by name") = "auto"
    mean: described(Channels | None, "per-channel mean of [0, 1] pixels the weights were trained with (overrides "
                                     "what the checkpoint or its adapter declares)") = None
    std: described(Channels | None, "per-channel std, as mean") = None
    into: described(Text | None, "the submodule (dotted path, e.g. members.1 of a cascade) the weights load into; "
                                 "default: the whole model, or the dense network it is built on") = None

    @model_validator(mode="after")
    def _mean_with_std(self) -> WeightsSection:
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std)):
            raise ValueError("give mean and std together, one number per channel each")
        if self.source.startswith(CELL_PREFIX) and not self.source[len(CELL_PREFIX):]:
            raise ValueError("cell: needs the label of a model entry of this suite, e.g. cell:resnet56")
        return self


Weights = Annotated[WeightsConfig, parsed_as(WeightsSection, _instance(WeightsConfig))]


def _as_tuple(value: Any) -> tuple[WeightsConfig, ...]:
    """One source stands for a list of one."""
    return value if isinstance(value, tuple) else (value,)


ONE_SOURCE, SOURCES = "[one source]", "[sources]"
"""Tags of the two forms of ``weights`` (their parts of an error's loc, left out of field paths)."""

#: One or several weights sources; several must each name the submodule they load into (``into``).
#: A tagged union, so that an error reports the form given, not both.
WeightsList = Annotated[
    Union[Annotated[Weights, Tag(ONE_SOURCE)],  # noqa: UP007
          Annotated[tuple[Weights, ...], Field(min_length=1), Tag(SOURCES)]],
    Discriminator(lambda v: SOURCES if isinstance(v, (list, tuple)) else ONE_SOURCE),
    AfterValidator(_as_tuple)]


class ModelEntry(Section):
    """A model to run; a bare name stands for the model with its defaults."""

    shorthand = "name"
    name: described(Annotated[Text, AfterValidator(_registered)],
                    "a registered model (`fractalbench list models`), a prefixed one (sdn:resnet56, "
                    "timm:resnet18) or an import path pkg.module:builder")
    kwargs: described(dict[str, Any], "keyword arguments of the model's builder") = {}
    label: described(str, "the name in results (default: the model name); unique within the suite") = ""
    train: TrainOverrides = {}
    attribute_sweep: described(AttributeSweep | None, "a second training stage per value of an attribute") = None
    weights: described(WeightsList | None, "trained weights to start from (a file, an https URL, or cell:LABEL), or "
                                           "a list of such sources each with `into:` (the submodule it loads into); "
                                           "their declared normalisation replaces the training split's") = None
    pretrained: described(Flag, "timm: models only: timm's own pretrained weights (downloaded by timm) and the "
                                "normalisation of their pretrained_cfg") = False
    datasets: described(tuple[Text, ...], "only these of the suite's datasets (their labels, e.g. synthetic32: the "
                                          "name and image size), for a model built for one input size; "
                                          "default: every dataset") = ()

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> ModelEntry:
        if self.pretrained and not self.name.startswith("timm:"):
            raise ValueError(f"pretrained: true is for timm: models (timm's own weights); {self.name!r} takes "
                             "`weights:` (a file, an https URL or cell:LABEL)")
        if self.pretrained and self.weights is not None:
            raise ValueError("give either `weights` or `pretrained: true`, not both")
        if self.weights is not None and len(self.weights) > 1:
            parts = [w.into for w in self.weights]
            if None in parts or len(set(parts)) < len(parts):
                raise ValueError("several weights sources must each name a different submodule to load into "
                                 f"(`into:`), got {parts}")
        return self

    @property
    def display(self) -> str:
        """The name results carry: the label, or the model name."""
        return self.label or self.name

    @property
    def weight_sources(self) -> tuple[WeightsConfig, ...]:
        """The entry's weights sources (none, one, or one per submodule)."""
        return self.weights or ()

    @property
    def cell_sources(self) -> list[str]:
        """The labels of the entries whose trained checkpoints this one starts from (``cell:LABEL``)."""
        return [w.cell_label for w in self.weight_sources if w.kind == "cell"]


#: What a policy's thresholds mean (fractalbench.harness.policies): max softmax probability, softmax entropy
#: in nats, or the number of consecutive agreeing exits.
THRESHOLDS = {"confidence": number(ge=0, le=1), "entropy": number(ge=0), "patience": whole_valued(1)}
_GRIDS = {name: TypeAdapter(tuple[kind, ...]) for name, kind in THRESHOLDS.items()}
_ANY_GRID = TypeAdapter(tuple[number(), ...])


def _grid_by_policy(schema: dict[str, Any]) -> None:
    """JSON Schema: the grid's items as each policy's THRESHOLDS entry says."""
    schema["allOf"] = [{"if": {"properties": {"name": {"const": name}}},
                        "then": {"properties": {"grid": {"items": TypeAdapter(kind).json_schema()}}}}
                       for name, kind in THRESHOLDS.items()]


def _policy_name(name: str) -> str:
    from fractalbench.harness.policies import user_policy

    try:
        user_policy(name)
    except ValueError as exc:
        raise fail("{problem}", problem=str(exc)) from None
    return name


class PolicyConfig(Section):
    """An exit policy to calibrate and sweep (fractalbench.harness.policies)."""

    model_config = ConfigDict(json_schema_extra=_grid_by_policy)
    name: described(Annotated[Text, AfterValidator(_policy_name), WithJsonSchema(
                        {"anyOf": [{"enum": list(POLICY_NAMES)}, {"type": "string", "minLength": 1}]})],
                    "confidence (max softmax), entropy (BranchyNet), patience (PABEE), a policy registered by a "
                    "user (register_policy, or entry-point group fractalbench.policies) or an import path "
                    "package.module:Class of an ExitPolicy subclass")
    grid: described(tuple[float, ...], "thresholds to sweep (empty: the policy's default grid); confidence: "
                                       "probability in [0, 1]; entropy: nats >= 0; patience: whole number >= 1") = ()

    def __init__(self, *args: Any, **data: Any) -> None:
        """Also positional: ``PolicyConfig("confidence")``, ``PolicyConfig("entropy", (0.5, 1.0))``."""
        super().__init__(**dict(zip(("name", "grid"), args)), **data)

    @field_validator("grid", mode="before")
    @classmethod
    def _thresholds(cls, grid: Any, info: ValidationInfo) -> Any:
        """Each threshold as its policy defines it (an unknown policy's grid: any numbers)."""
        return _GRIDS.get(info.data.get("name"), _ANY_GRID).validate_python(grid)


class CostConfig(Section):
    """Compute measurement settings."""

    oracle_samples: described(whole(0), "test samples whose MACs are counted one by one to check the expected "
                                        "cost from the cost table (0: no check)") = 8
    input_sizes: described(tuple[whole(1), ...], "extra input sizes (pixels) for a cost-only table, e.g. 224") = ()
    lengths: described(tuple[whole(1), ...], "sequence lengths at which sequence models (the LRA transformers) "
                                             "are measured against full attention of the same size: MACs, latency "
                                             "and peak memory per length, batch 1, e.g. [256, 1024, 4096]") = ()
    sweep_check_samples: described(whole(0), "test samples on which every threshold-sweep point of an early-exit "
                                             "cascade also runs the real stopping path, which must agree with the "
                                             "sweep computed from exit logits (0: run the real path on all of "
                                             "test for every point instead)") = 128


class EvaluateSettings(Section):
    """Accuracy evaluation settings."""

    batch_size: described(whole(1), "test samples per evaluation call") = 256


class MacsBudget(Section):
    """A compute budget in absolute MACs per image, the same for every model of the suite."""

    macs: described(number(gt=0), "expected MACs per image, e.g. 20e6")

    @property
    def label(self) -> str:
        """``20M`` for 20e6: how the budget names its operating points (``confidence@macs20M``)."""
        return macs_label(self.macs)


_FRACTION = TypeAdapter(number(ge=0, le=1))
_MACS_BUDGET = TypeAdapter(MacsBudget)


def _budget(value: Any) -> Any:
    """A budget: a mapping is a :class:`MacsBudget`, anything else a fraction in [0, 1]; one error
    from the form it is in (not one per form)."""
    adapter = _MACS_BUDGET if isinstance(value, Mapping) else _FRACTION
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        inner = f"{field_path(error['loc'])}: " if error["loc"] else ""
        raise fail("{inner}{problem}", inner=inner, problem=problem(error)) from None


Budget = Annotated[Any, PlainValidator(_budget), WithJsonSchema({"anyOf": [
    {"type": "number", "minimum": 0, "maximum": 1}, _MACS_BUDGET.json_schema()]})]


def macs_label(macs: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if macs >= scale:
            return f"{macs / scale:.4g}{suffix}"
    return f"{macs:.4g}"


class CompareSection(Section):
    """Regression thresholds of `fractalbench compare` (fractalbench.reports.compare.Thresholds); unset
    ones keep the defaults."""

    accuracy_points: described(number(ge=0) | None, "allowed drop of top-1/top-5, percentage points") = None
    latency_ratio: described(number(ge=1) | None, "latency slowdown factor candidate/baseline that fails") = None
    memory_ratio: described(number(ge=1) | None, "memory growth factor candidate/baseline that fails") = None
    p_value: described(number(gt=0, lt=1) | None, "significance level of the latency/memory tests") = None
    exit_drift_p_value: described(number(gt=0, lt=1) | None, "significance level of the exit-histogram "
                                                             "chi-square test") = None


class ResourcesSection(Section):
    """What each cell asks a cluster for when it runs as its own job (`fractalbench run --executor slurm` or
    `local`); the cell's numbers do not depend on it (editing it reruns nothing)."""

    gpus: described(whole(0) | None, "GPUs per cell job; null: 1 for a cell on a cuda device, 0 on cpu") = None
    cpus: described(whole(1), "CPU cores per cell job (Slurm's cpus-per-task; the cell's torch threads)") = 4
    mem_gb: described(whole(1), "memory per cell job, GiB") = 16
    timeout_min: described(whole(1), "wall-clock limit per job, minutes; a job that reaches it (or is preempted) "
                                     "is requeued and resumes from its last epoch checkpoint") = 240
    partition: described(Text | None, "Slurm partition; null: the cluster's default") = None


#: The thresholds given (unset and null ones are left out), as
#: fractalbench.reports.compare.Thresholds.updated takes them.
CompareThresholds = Annotated[dict[str, float], parsed_as(CompareSection, lambda s: s.model_dump(exclude_none=True))]


class Suite(Section):
    """A fractalbench suite: what to train and measure (see suites/default.yaml for a commented example)."""

    name: described(Text, "the suite's name (results are stored under it)")
    description: described(str, "one line on what the suite is for") = ""
    seed: described(whole(0), "random seed of model initialisation and training") = 0
    seeds: described(tuple[whole(0), ...], "several seeds: every model runs once per seed, each a cell "
                                           "(instead of `seed`); distinct") = ()
    devices: described(non_empty(Device, "device"), "devices to run every cell on") = ("cpu",)
    datasets: described(non_empty(Dataset, "dataset"), "datasets; every model runs on each")
    models: described(non_empty(ModelEntry, "model"), "models to train and measure")
    train: described(Training | None, "training settings; absent: models are measured untrained") = None
    evaluate: described(EvaluateSettings, "accuracy evaluation") = Field(default_factory=EvaluateSettings)
    metrics: described(tuple[choice(METRICS), ...], "what to measure") = ("accuracy",)
    latency: described(Latency, "latency measurement (metric latency)") = Field(default_factory=LatencySettings)
    memory: described(Memory, "peak memory measurement (metric memory)") = Field(default_factory=MemorySettings)
    cost: described(CostConfig, "compute measurement (metric cost)") = Field(default_factory=CostConfig)
    serving: described(Serving, "the serving scenario under load (metric serving)") = Field(
        default_factory=ServingSettings)
    policies: described(tuple[PolicyConfig, ...], "exit policies to calibrate and sweep (default: confidence)") = ()
    budgets: described(tuple[Budget, ...],
                       "compute budgets: a fraction of each model's own full cost (its last exit's MACs; gated and "
                       "routed models: of its range), or {macs: N}, the same absolute MACs per image for every "
                       "model, so that all have a point at one cost; each gets thresholds fitted on the validation "
                       "split") = ()
    compare: described(CompareThresholds, "regression thresholds of `fractalbench compare` for runs of this suite") = {}
    resources: described(ResourcesSection, "per-cell job resources for `fractalbench run --executor slurm|local`") = (
        Field(default_factory=ResourcesSection))
    _path: str = PrivateAttr("<suite>")
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _unique_labels(cls, models: tuple[ModelEntry, ...]) -> tuple[ModelEntry, ...]:
        labels = [m.display for m in models]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise fail("labels must be unique; repeated: {repeated} (give each a distinct `label`)",
                       repeated=", ".join(repeated))
        def visit(i: int, entry: ModelEntry, current: ModelEntry, seen: list[str]) -> None:
            for label in current.cell_sources:
                if label not in labels:
                    raise fail("models[{i}].weights.source cell:{label}: no model entry of this suite has that "
                               "label; allowed: {allowed}", i=i, label=label,
                               allowed=", ".join(x for x in labels if x != entry.display))
                if label in seen:
                    raise fail("models[{i}].weights.source cell:{label}: the weights refer back to themselves "
                               "({chain})", i=i, label=label, chain=" -> ".join([*seen, label]))
                visit(i, entry, models[labels.index(label)], [*seen, label])

        for i, entry in enumerate(models):
            visit(i, entry, entry, [entry.display])
        return models

    @model_validator(mode="after")
    def _model_datasets(self) -> Suite:
        known = [d.label for d in self.datasets]
        for i, entry in enumerate(self.models):
            unknown = [d for d in entry.datasets if d not in known]
            if unknown:
                raise fail("models[{i}].datasets: {unknown} is not a dataset of this suite; allowed: {allowed}",
                           i=i, unknown=", ".join(unknown), allowed=", ".join(known))
            for label in entry.cell_sources:  # a cell it starts from must run on each of its datasets
                source = next(m for m in self.models if m.display == label)
                missing = [d for d in (entry.datasets or known) if source.datasets and d not in source.datasets]
                if missing:
                    raise fail("models[{i}].weights.source cell:{label} does not run on {missing}, where this "
                               "model runs", i=i, label=label, missing=", ".join(missing))
        return self

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) < len(seeds):
            raise fail("seeds must be distinct, got {seeds}", seeds=list(seeds))
        return seeds

    @model_validator(mode="before")
    @classmethod
    def _seed_or_seeds(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "seed" in data and data.get("seeds"):
            error = fail("give either `seed` or `seeds`, not both")
            raise ValidationError.from_exception_data(cls.__name__, [{"type": error, "loc": ("seeds",),
                                                                      "input": data["seeds"]}])
        return data

    @field_validator("train")
    @classmethod
    def _suite_seed(cls, train: TrainConfig | None, info: ValidationInfo) -> TrainConfig | None:
        seeds = info.data.get("seeds") or (info.data.get("seed", 0),)
        return None if train is None else replace(train, seed=seeds[0])

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds every model runs with: ``seeds``, else ``(seed,)``."""
        return self.seeds or (self.seed,)

    @property
    def path(self) -> str:
        """Where the suite came from: ``suites/NAME.yaml`` for a bundled one, else the path given."""
        return self._path

    @property
    def raw(self) -> dict[str, Any]:
        """The suite as written (the YAML mapping)."""
        return self._raw

    @property
    def eval_batch_size(self) -> int:
        return self.evaluate.batch_size

    @property
    def digest(self) -> str:
        """Content hash of the suite as written (identity in stored results)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_models(self, names: list[str]) -> Suite:
        """Keep only entries whose name or label is listed (CLI --models)."""
        known = {m.display for m in self.models} | {m.name for m in self.models}
        missing = [n for n in names if n not in known]
        if missing:
            from fractalbench.harness.registry import unknown_name
            raise SuiteError(str(unknown_name(f"model in suite {self.name}", missing[0], sorted(known))))
        wanted = {m.display for m in self.models if m.name in names or m.display in names}
        pending = [m for m in self.models if m.display in wanted]  # and the entries their weights come from
        while pending:
            for label in pending.pop().cell_sources:
                if label not in wanted:
                    wanted.add(label)
                    pending.append(next(m for m in self.models if m.display == label))
        kept = tuple(m for m in self.models if m.display in wanted)
        return self.model_copy(update={"models": kept})

    def with_data_root(self, root: str) -> Suite:
        """Every dataset that reads from disk reads from ``root`` instead (CLI --data-root); the
        suite's identity (digest) is unchanged, the data's source is stored with every cell."""
        from dataclasses import replace

        from fractalbench.harness.data import IN_MEMORY_DATASETS

        moved = tuple(d if d.name in IN_MEMORY_DATASETS else replace(d, root=root) for d in self.datasets)
        return self.model_copy(update={"datasets": moved})


def suite_problems(raw: Any) -> list[str]:
    """Every problem of a parsed suite file, one line each (``field 'F': problem``).

    pydantic reports every invalid field of one pass, but a section with unknown fields stops at
    them; so each pass drops the unknown fields the last one found and validates again, until no new
    one appears (at most :data:`MAX_PASSES`)."""
    import copy

    found: dict[tuple[str, str], None] = {}
    data = copy.deepcopy(raw)
    for _ in range(MAX_PASSES):
        try:
            Suite.model_validate(data)
            break
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        # a section whose items failed also reports itself (e.g. "at least 1 item ... not 0"): keep the items'
        locs = [tuple(p for p in e["loc"] if p not in LOC_MARKERS) for e in errors]
        errors = [e for e, loc in zip(errors, locs)
                  if not any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs)]
        dropped = False
        for error in errors:
            found.setdefault((field_path(error["loc"]), problem(error)), None)
            if error["type"] == ERROR_TYPE and error["msg"].startswith(UNKNOWN_FIELD):
                dropped |= _drop(data, [p for p in error["loc"] if p not in LOC_MARKERS])
        if not dropped:
            break
    return [f"field '{where}': {what}" for where, what in found]


def _drop(data: Any, loc: list[int | str]) -> bool:
    """Remove the key at ``loc`` (a field path) from nested ``data``; whether it was there."""
    for part in loc[:-1]:
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return False
    if isinstance(data, dict) and loc and loc[-1] in data:
        del data[loc[-1]]
        return True
    return False


def problems_error(path: str, problems: list[str]) -> SuiteError:
    """One SuiteError for ``problems``: ``suite PATH: field 'F': problem`` for one, a count and one
    indented line per problem for several."""
    if len(problems) == 1:
        return SuiteError(f"suite {path}: {problems[0]}")
    return SuiteError(f"suite {path}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems))


def validate_suite(raw: Any, path: str) -> Suite:
    """The validated suite; SuiteError naming the file and every field with a problem otherwise."""
    try:
        suite = Suite.model_validate(raw)
    except ValidationError:
        raise problems_error(path, suite_problems(raw)) from None
    suite._path, suite._raw = path, raw if isinstance(raw, dict) else {}
    return suite


LOC_MARKERS = ("[key]", ONE_SOURCE, SOURCES)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``('models', 2, 'attribute_sweep', 'values', 0)`` -> ``models[2].attribute_sweep.values[0]``."""
    text = ""
    for part in loc:
        if part in LOC_MARKERS:  # pydantic's marker of an error in a mapping's key, our unions' tags
            continue
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or TOP_LEVEL


def problem(error: ErrorDetails) -> str:
    """What is wrong, in words (ours for our error types, pydantic's otherwise)."""
    kind, got = error["type"], error.get("input")
    if kind == ERROR_TYPE:
        return error["msg"]
    if kind == "missing":
        return "is required"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, got {got!r}"
    if kind == "dict_type":
        return f"must be a mapping, got {got!r}"
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{error['msg']}, got {got!r}"
