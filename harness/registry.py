"""Registry of model builders, each with a model card.

A builder is a function with keyword-only arguments ``num_classes`` and ``in_chans`` (plus its own
options) that returns an ``nn.Module`` following :mod:`harness.contract`. Register it with
``@register_model(card=ModelCard(...))``. Names are unique: registering one twice raises; an unknown
name raises :class:`UnknownNameError` with the close matches.

Prefixed names are served by factories: ``timm:NAME`` builds any timm model randomly initialised
(no download), and baseline files may add their own (``sdn:BACKBONE``).

Baseline files in ``baselines/`` are discovered automatically (every module in the package is
imported once, on first use of the registry).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from harness.contract import DYNAMIC_KINDS

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
    name: str
    builder: Builder
    card: ModelCard


_MODELS: dict[str, RegisteredModel] = {}
_PREFIXES: dict[str, tuple[Callable[..., nn.Module], Callable[[str], ModelCard]]] = {}
_DISCOVERED = False


def register_model(name: str | None = None, *, card: ModelCard) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder`` under ``name`` (default: the function's name)."""

    def deco(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _MODELS:
            raise ValueError(f"a model is already registered under the name {key!r}")
        if ":" in key:
            raise ValueError(f"model name {key!r} may not contain ':' (reserved for prefixes)")
        _MODELS[key] = RegisteredModel(key, builder, card)
        return builder

    return deco


def register_prefix(prefix: str, factory: Callable[..., nn.Module], card_for: Callable[[str], ModelCard]) -> None:
    """Serve names ``prefix:REST`` with ``factory(REST, num_classes=..., in_chans=..., **kw)``."""
    if prefix in _PREFIXES:
        raise ValueError(f"a model prefix is already registered under the name {prefix!r}")
    _PREFIXES[prefix] = (factory, card_for)


def unregister_model(name: str) -> None:
    """Remove a registration (tests use this to clean up temporary models)."""
    _MODELS.pop(name, None)


def discover() -> None:
    """Import every module of the ``baselines`` package once, so their registrations run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import baselines

    for info in sorted(pkgutil.iter_modules(baselines.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"baselines.{info.name}")


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard (prefixed factories are not enumerated)."""
    discover()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def list_prefixes() -> list[str]:
    discover()
    return sorted(_PREFIXES)


def _split_prefix(name: str) -> tuple[str, str] | None:
    if ":" not in name:
        return None
    prefix, rest = name.split(":", 1)
    if prefix not in _PREFIXES:
        raise unknown_name("model prefix", prefix, list(_PREFIXES), "prefixes are written like timm:resnet18")
    if not rest:
        raise UnknownNameError(f"model name {name!r} has nothing after the prefix {prefix!r}:")
    return prefix, rest


def model_card(name: str) -> ModelCard:
    discover()
    split = _split_prefix(name)
    if split:
        return _PREFIXES[split[0]][1](split[1])
    if name not in _MODELS:
        raise unknown_name("model", name, list(_MODELS), "see `fractalbench list models`")
    return _MODELS[name].card


def create_model(name: str, *, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model by name, randomly initialised."""
    discover()
    split = _split_prefix(name)
    if split:
        return _PREFIXES[split[0]][0](split[1], num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name not in _MODELS:
        raise unknown_name("model", name, list(_MODELS), "see `fractalbench list models`")
    try:
        return _MODELS[name].builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} does not take these options {sorted(kwargs)}: {exc}") from None


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
