"""Registry of model builders, each with a model card.

A builder is a function with keyword-only arguments ``num_classes`` and ``in_chans`` (plus its own
options) that returns an ``nn.Module`` following :mod:`fractalbench.harness.contract`. Register it with
``@register_model(card=ModelCard(...))``. Names are unique: registering one twice raises a
ValueError naming both origins; an unknown name raises :class:`UnknownNameError` with the close
matches.

Where models come from, in the order :func:`discover` loads them (once, on first use):

1. every module of the ``baselines/`` package (imported, so their ``register_model`` calls run);
2. the entry points of group ``fractalbench.models`` of installed distributions
   (:data:`ENTRY_POINT_GROUP`): an entry point naming a module is imported (its registrations
   run); one naming a callable registers that callable as a builder under the entry point's name
   with a default card. A plugin that fails (import error, duplicate name, neither module nor
   callable) registers nothing, is logged as one warning line naming the entry point and its
   distribution, and is listed by :func:`plugin_errors`; asking for its name raises that message.

How a name is read (:func:`name_kind`):

- no ``:`` -> a registered name (``resnet20``);
- ``HEAD:REST`` with HEAD a registered prefix -> that prefix's factory: ``timm:NAME`` builds any
  timm model randomly initialised (no download); baseline files add their own (``sdn:BACKBONE``).
  Registered prefixes always win;
- otherwise, HEAD containing a ``.`` or HEAD a top-level module that can be imported -> an import
  path ``package.module:function`` (REST may be dotted, ``module:Class.factory``): the module is
  imported and the callable called as a builder. It is not registered; its card (family
  ``import path``) names the path and the module's file;
- otherwise -> UnknownNameError for the unknown prefix.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import pkgutil
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fractalbench.harness.contract import DYNAMIC_KINDS, DynamicModel

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fractalbench.models"

Builder = Callable[..., nn.Module]


class UnknownNameError(ValueError):
    """An unknown model/suite/dataset/... name. The message lists close matches."""


def unknown_name(kind: str, name: str, known: list[str], hint: str = "") -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; did you mean: {', '.join(close)}?"
    elif known and len(known) <= 40:
        msg += f"; allowed: {', '.join(sorted(known))}"
    if hint:
        msg += f" ({hint})"
    return UnknownNameError(msg)


@dataclass(frozen=True)
class ModelCard:
    """What a registered model is and the published numbers to check it against.

    reference: published numbers, e.g. {"params": 0.85e6, "macs": 125.5e6, "top1_cifar10": 93.03}
    (parameters as a count, MACs per 1 image at ``input_size``, accuracy in percent).
    notes: where this build differs from the paper, and why.
    version: the family's version, bumped by a change of its code that alters its numbers; a finished
    cell of an older version runs again (:func:`code_identity`).
    paper_recipe: how the paper trained the model behind ``reference`` (:func:`recipe_text`):
    ``key=value`` pairs named like the suite's ``train:`` fields (plus ``nesterov`` yes/no, Adam's
    ``betas`` and ``stage2.<field>`` for an attribute-sweep stage) that the report compares with a
    run's own recipe, then `` | `` and free text; "" when unknown.
    """

    family: str
    paper: str
    dynamic_kind: str = "static"
    input_size: int = 32
    in_chans: int = 3
    reference: dict[str, float] = field(default_factory=dict)
    reference_source: str = ""
    notes: str = ""
    paper_recipe: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        if self.dynamic_kind not in DYNAMIC_KINDS:
            raise ValueError(f"dynamic_kind {self.dynamic_kind!r} is not one of {DYNAMIC_KINDS}")


def recipe_text(fields: dict[str, Any], note: str = "") -> str:
    """A model card's ``paper_recipe``: ``key=value`` for each of ``fields`` (yes/no for booleans,
    comma-joined sequences, numbers as ``%g``), then `` | `` and ``note``."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, (list, tuple)):
            return ",".join(value(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    pairs = " ".join(f"{k}={value(v)}" for k, v in fields.items())
    return f"{pairs} | {note}" if note else pairs


@dataclass(frozen=True)
class RegisteredModel:
    """A registered builder; ``origin`` says who registered it (module, and entry point if any)."""

    name: str
    builder: Builder
    card: ModelCard
    origin: str = ""


@dataclass
class _Plugin:
    """One entry point of :data:`ENTRY_POINT_GROUP` as loaded: what it registered, the modules its
    loading imported first, and ``error`` (one line) when it failed."""

    name: str
    where: str
    models: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    error: str = ""


_MODELS: dict[str, RegisteredModel] = {}
_PREFIXES: dict[str, tuple[Callable[..., nn.Module], Callable[[str], ModelCard]]] = {}
_PREFIX_ORIGINS: dict[str, str] = {}
_NOT_REBUILDABLE: dict[str, str] = {}  # prefix -> why its models cannot be rebuilt in a fresh process
_PLUGINS: list[_Plugin] = []
_LOADING: list[str] = []  # the entry point being loaded (origin of the registrations it makes)
_DISCOVERED = False
_PLUGINS_LOADED = False


def _origin(module: str | None) -> str:
    via = f" via {_LOADING[-1]}" if _LOADING else ""
    return f"module {module or '?'}{via}"


def register_model(name: str | None = None, *, card: ModelCard) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` (default: the function's name). A name that
    is taken raises a ValueError naming the first registration's origin and this one's."""

    def deco(builder: Builder) -> Builder:
        key = name or builder.__name__
        origin = _origin(getattr(builder, "__module__", None))
        if key in _MODELS:
            raise ValueError(f"a model is already registered under the name {key!r} (by {_MODELS[key].origin}; "
                             f"registered again by {origin})")
        if ":" in key:
            raise ValueError(f"model name {key!r} may not contain ':' (reserved for prefixes and import paths)")
        _MODELS[key] = RegisteredModel(key, builder, card, origin)
        return builder

    return deco


def register_prefix(prefix: str, factory: Callable[..., nn.Module], card_for: Callable[[str], ModelCard], *,
                    not_rebuildable: str | None = None) -> None:
    """Serve names ``prefix:REST`` with ``factory(REST, num_classes=..., in_chans=..., **kw)``; a
    prefix that is taken raises a ValueError naming both origins. ``not_rebuildable``: why its models
    cannot be built again in a fresh process (they exist only in this one), for :func:`in_process_reason`."""
    origin = _origin(getattr(factory, "__module__", None))
    if prefix in _PREFIXES:
        raise ValueError(f"a model prefix is already registered under the name {prefix!r} "
                         f"(by {_PREFIX_ORIGINS[prefix]}; registered again by {origin})")
    _PREFIXES[prefix] = (factory, card_for)
    _PREFIX_ORIGINS[prefix] = origin
    if not_rebuildable:
        _NOT_REBUILDABLE[prefix] = not_rebuildable


def in_process_reason(name: str) -> str | None:
    """Why model ``name`` must be measured in this process (its prefix's ``not_rebuildable``, e.g. a
    model object given to the Python API); None when a worker process can rebuild it by name."""
    head = name.split(":", 1)[0] if ":" in name else None
    return _NOT_REBUILDABLE.get(head) if head is not None else None


def unregister_model(name: str) -> None:
    """Remove a registration (tests use this to clean up temporary models)."""
    _MODELS.pop(name, None)


def discover() -> None:
    """Import every module of the ``baselines`` package once, then load the entry points of
    :data:`ENTRY_POINT_GROUP` once (a failing plugin is logged and recorded, never raised)."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        from fractalbench import baselines

        for info in sorted(pkgutil.iter_modules(baselines.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"fractalbench.baselines.{info.name}")
    if not _PLUGINS_LOADED:
        _load_plugins()


# ----- plugins: entry points of installed distributions ------------------------------------------

def _load_plugins() -> None:
    global _PLUGINS_LOADED
    _PLUGINS_LOADED = True
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for point in sorted(points, key=lambda p: (p.name, p.value)):
        plugin = _load_entry_point(point)
        _PLUGINS.append(plugin)
        if plugin.error:
            log.warning("%s", plugin.error)


def _load_entry_point(point: importlib.metadata.EntryPoint) -> _Plugin:
    """Load one entry point; on any failure undo its registrations and record one error line."""
    dist = getattr(point, "dist", None)
    dist_name = f"{dist.name} {dist.version}" if dist is not None else "(unknown distribution)"
    plugin = _Plugin(point.name, f"entry point {point.name!r} = {point.value!r} of distribution {dist_name}")
    models, prefixes, modules = set(_MODELS), set(_PREFIXES), set(sys.modules)
    _LOADING.append(plugin.where)
    try:
        obj = point.load()
        if not isinstance(obj, types.ModuleType):
            if not callable(obj):
                raise TypeError(f"it names a {type(obj).__name__}, neither a module nor a callable builder")
            card = default_card(obj, "plugin", f"{point.value} (entry point of distribution {dist_name})")
            register_model(point.name, card=card)(obj)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the other models
        plugin.error = f"model plugin {plugin.where} failed to load: {type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        _LOADING.pop()
    plugin.models = sorted(set(_MODELS) - models)
    plugin.prefixes = sorted(set(_PREFIXES) - prefixes)
    plugin.modules = sorted(set(sys.modules) - modules)
    if plugin.error:
        _forget(plugin)
    return plugin


def _forget(plugin: _Plugin) -> None:
    """Unregister what ``plugin`` registered (names registered since by someone else stay)."""
    for name in plugin.models:
        if name in _MODELS and plugin.where in _MODELS[name].origin:
            del _MODELS[name]
    for prefix in plugin.prefixes:
        if plugin.where in _PREFIX_ORIGINS.get(prefix, ""):
            _PREFIXES.pop(prefix, None)
            _PREFIX_ORIGINS.pop(prefix, None)


def plugin_errors() -> list[str]:
    """One line per entry point of :data:`ENTRY_POINT_GROUP` that failed to load (after discovery)."""
    discover()
    return [p.error for p in _PLUGINS if p.error]


def reset_plugins() -> None:
    """Forget every entry-point plugin: its models and prefixes are unregistered, the modules first
    imported while loading it are dropped from ``sys.modules``, and the next :func:`discover`
    reads the entry points again (tests use this around temporary plugins)."""
    global _PLUGINS_LOADED
    for plugin in _PLUGINS:
        _forget(plugin)
        for module in plugin.modules:
            sys.modules.pop(module, None)
    _PLUGINS.clear()
    _PLUGINS_LOADED = False
    importlib.invalidate_caches()


def _builder_kind(builder: Any) -> str:
    """The dynamic kind a builder declares: its own ``dynamic_kind`` when it is a DynamicModel
    class, else that of its return annotation's class; ``static`` when it declares none."""
    target = builder
    if not isinstance(builder, type):
        try:
            target = inspect.signature(builder, eval_str=True).return_annotation
        except Exception:  # noqa: BLE001 - an unresolvable annotation declares nothing
            return "static"
    if isinstance(target, type) and issubclass(target, DynamicModel) and target.dynamic_kind in DYNAMIC_KINDS:
        return target.dynamic_kind
    return "static"


def default_card(builder: Any, family: str, origin: str) -> ModelCard:
    """The card of a builder that brings none (entry-point callables, import paths): ``family``,
    ``origin`` as its paper, the dynamic kind it declares (:func:`_builder_kind`), no reference."""
    return ModelCard(family=family, paper=origin, dynamic_kind=_builder_kind(builder),
                     notes="default card: no published numbers to check against")


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard (prefixed factories are not enumerated)."""
    discover()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def registered(name: str) -> RegisteredModel | None:
    """The registry entry (builder, card, origin) under exactly ``name``, None when there is none
    (prefixed and import-path names are built on demand and have no entry)."""
    discover()
    return _MODELS.get(name)


def list_prefixes() -> list[str]:
    discover()
    return sorted(_PREFIXES)


def name_kind(name: str) -> str:
    """How ``name`` is read: ``registered`` (no ``:``), ``prefix`` (the part before the first ``:``
    is a registered prefix), ``import`` (that part contains a ``.`` or is an importable top-level
    module) or ``unknown prefix``. Registered prefixes win over modules of the same name."""
    discover()
    if ":" not in name:
        return "registered"
    head = name.split(":", 1)[0]
    if head in _PREFIXES:
        return "prefix"
    if "." in head or (head.isidentifier() and _importable(head)):
        return "import"
    return "unknown prefix"


def _importable(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _split_prefix(name: str) -> tuple[str, str] | None:
    kind = name_kind(name)
    if kind in ("registered", "import"):
        return None
    prefix, rest = name.split(":", 1)
    if kind == "unknown prefix":
        raise unknown_name("model prefix", prefix, list(_PREFIXES),
                           "prefixes are written like timm:resnet18; an import path like package.module:function")
    if not rest:
        raise UnknownNameError(f"model name {name!r} has nothing after the prefix {prefix!r}:")
    return prefix, rest


def _import_module(path: str, module_name: str) -> types.ModuleType:
    what = f"import path {path!r}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UnknownNameError(f"{what}: no module named {exc.name!r} (it must be importable here and in "
                                   "measurement workers: installed, in the working directory or on "
                                   "PYTHONPATH)") from None
        raise ValueError(f"{what}: importing {module_name!r} failed: ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, one line naming the path
        raise ValueError(f"{what}: importing {module_name!r} failed: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}") from None


def _import_builder(path: str) -> tuple[Builder, ModelCard]:
    """The callable an import path ``package.module:attr[.attr]`` names, and its default card.
    ValueError (UnknownNameError for a missing module or attribute) naming the path otherwise."""
    module_name, _, attr = path.partition(":")
    parts = [*module_name.split("."), *attr.split(".")]
    if not attr or not all(p.isidentifier() for p in parts):
        raise UnknownNameError(f"import path {path!r} is not of the form package.module:function")
    obj: Any = _import_module(path, module_name)
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=3, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            raise UnknownNameError(f"import path {path!r}: {where!r} has no attribute {part!r}{hint}")
        obj, where = getattr(obj, part), f"{where}.{part}"
    if not callable(obj):
        raise ValueError(f"import path {path!r}: {attr!r} is a {type(obj).__name__}, not a callable builder")
    source = getattr(sys.modules.get(module_name), "__file__", None) or "built-in"
    return obj, default_card(obj, "import path", f"import path {path} ({source})")


def _registered(name: str) -> RegisteredModel:
    if name in _MODELS:
        return _MODELS[name]
    failed = [p for p in _PLUGINS if p.error]
    for plugin in failed:
        if name == plugin.name or name in plugin.models:
            raise UnknownNameError(plugin.error)
    hint = "see `fractalbench list models`"
    if failed:
        hint += "; model plugins that failed to load: " + ", ".join(p.where for p in failed)
    raise unknown_name("model", name, list(_MODELS), hint)


def model_card(name: str) -> ModelCard:
    """The card of a registered name, a prefixed name or an import path (which is imported)."""
    discover()
    split = _split_prefix(name)
    if split:
        return _PREFIXES[split[0]][1](split[1])
    if name_kind(name) == "import":
        return _import_builder(name)[1]
    return _registered(name).card


def create_model(name: str, *, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model, prefixed name or import path by name, randomly initialised."""
    discover()
    split = _split_prefix(name)
    if split:
        return _PREFIXES[split[0]][0](split[1], num_classes=num_classes, in_chans=in_chans, **kwargs)
    builder = _import_builder(name)[0] if name_kind(name) == "import" else _registered(name).builder
    try:
        model = builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not take these options {sorted(kwargs)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: its builder returned a {type(model).__name__}, not an nn.Module")
    return model


# ----- timm: any timm model as a static baseline -------------------------------------------------

def _timm_factory(rest: str, *, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.list_models(rest):
        raise unknown_name("timm model", rest, timm.list_models(), "timm.list_models() lists them")
    kwargs.pop("pretrained", None)  # never download weights
    return timm.create_model(rest, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _timm_card(rest: str) -> ModelCard:
    return ModelCard(family="timm", paper=f"timm model {rest} (randomly initialised)", input_size=224)


register_prefix("timm", _timm_factory, _timm_card)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model in another process: name, options, classes, channels."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    in_chans: int = 3

    def build(self) -> nn.Module:
        return create_model(self.name, num_classes=self.num_classes, in_chans=self.in_chans, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs), "num_classes": self.num_classes,
                "in_chans": self.in_chans}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelSpec:
        return ModelSpec(data["name"], dict(data.get("kwargs", {})), int(data["num_classes"]), int(data["in_chans"]))


# ----- which code a model is built by, for finished cells (stale results) -------------------------

PACKAGE_PREFIX = "fractalbench."
_MAX_CODE_FILES = 500  # a user package larger than this is identified by its builder's module alone


def _sha256_file(path: str) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _module_files(module_name: str) -> list[str]:
    """The source files that define ``module_name``'s code: every ``.py`` file of its top-level package
    when that is a folder (a user's ``mynets/``), else the module's own file; [] for built-ins."""
    import os

    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return []
    top = sys.modules.get(module_name.split(".")[0])
    roots = list(getattr(top, "__path__", []) or [])
    if roots:
        from pathlib import Path

        files = sorted(str(f) for root in roots for f in Path(root).rglob("*.py") if "__pycache__" not in f.parts)
        if 0 < len(files) <= _MAX_CODE_FILES:
            return files
    return [os.path.abspath(file)]


def _builder_module(name: str) -> str | None:
    split = _split_prefix(name)
    if split:
        return getattr(_PREFIXES[split[0]][0], "__module__", None)
    if name_kind(name) == "import":
        return name.partition(":")[0]
    return getattr(_registered(name).builder, "__module__", None)


def code_identity(name: str) -> dict[str, Any] | None:
    """Which code builds model ``name``, recorded in each cell (``meta.code``) so that a finished cell
    made by other code is seen:

    - a family of this package (``fractalbench.baselines...``, and prefixes like ``sdn:``): its card's
      ``version`` and its module file's sha256. A new version reruns the cell; a changed file of the
      same version is reported, not rerun (a refactor must not retrain a reference run);
    - a user's model (an import path, a plugin, a model registered at run time): the sha256 of its
      source files (every ``.py`` of its top-level package folder, or its module file), so editing
      them reruns the cell.

    None for code without source files (e.g. a model object's class defined interactively)."""
    discover()
    module = _builder_module(name)
    if not module or in_process_reason(name):  # a model object: its class is the caller's, not a file's
        return None
    if module.startswith(PACKAGE_PREFIX):
        card = model_card(name)
        file = getattr(sys.modules.get(module), "__file__", None)
        return {"kind": "family", "family": card.family, "version": int(card.version), "module": module,
                "sha256": _sha256_file(file) if file else None}
    files = _module_files(module)
    if not files:
        return None
    import hashlib
    import os

    base = os.path.commonpath([os.path.dirname(f) for f in files])
    digest = hashlib.sha256()
    for f in files:
        digest.update(os.path.relpath(f, base).encode() + b"\0" + _sha256_file(f).encode())
    return {"kind": "user", "module": module, "files": len(files), "sha256": digest.hexdigest()}


def code_change(recorded: dict[str, Any] | None, now: dict[str, Any] | None) -> tuple[str, str] | None:
    """How the code of a finished cell (``recorded``, its ``meta.code``) differs from ``now``:
    ("rerun", why) when the cell must run again (a user's code edited, a family's version changed),
    ("note", what) when a family's file changed at the same version, None when nothing changed or
    nothing can be told (a cell recorded before code identities, or code without files)."""
    if not recorded or not now or recorded.get("kind") != now.get("kind"):
        return None
    if now["kind"] == "user":
        if recorded.get("sha256") != now["sha256"]:
            return "rerun", f"the code of {now['module']} changed since the cell ran"
        return None
    if int(recorded.get("version", 1)) != now["version"]:
        return "rerun", (f"family {now['family']} is now version {now['version']} (the cell ran with version "
                         f"{recorded.get('version', 1)})")
    if recorded.get("sha256") and now.get("sha256") and recorded["sha256"] != now["sha256"]:
        return "note", (f"made by other code: {now['module']} changed since the cell ran, at the same version "
                        f"{now['version']}; kept (`fractalbench run ... --rerun MODEL` runs it again)")
    return None

