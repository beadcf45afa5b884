"""Suites: declarative YAML files validated into typed, frozen objects.

The schema is declared once, as pydantic models in ``fractalbench.harness._suite_schema``; it gives both the
validation and :func:`suite_json_schema` (for editors). Every error is one line that names the
file, the field and what is allowed: ``suite PATH: field 'FIELD': problem; allowed: ...``. A suite
is found by name among the suites bundled with fractalbench (package data of the ``suites``
package, so an installed fractalbench finds them too) or by a ``.yaml`` path. See
``suites/default.yaml`` for a commented example.
"""
from __future__ import annotations

from dataclasses import replace
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from fractalbench.harness._suite_schema import (
    METRICS,
    AttributeSweep,
    CompareSection,
    CostConfig,
    EvaluateSettings,
    MacsBudget,
    ModelEntry,
    PolicyConfig,
    Suite,
    SuiteError,
    validate_suite,
)
from fractalbench.harness.devices import DEVICE_HELP, check_device
from fractalbench.harness.train import TrainConfig

__all__ = [
    "COMPARE_FIELDS", "DEVICE_HELP", "METRICS", "AttributeSweep", "CostConfig", "EvaluateSettings", "MacsBudget",
    "ModelEntry",
    "PolicyConfig", "Suite", "SuiteError", "check_device", "find_suite", "list_suites", "load_suite", "parse_suite",
    "suite_json_schema", "sweep_train_config", "train_config_for",
]

BUNDLED = "fractalbench.suites"  # the package whose *.yaml files are the bundled suites
COMPARE_FIELDS = tuple(CompareSection.model_fields)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _bundled() -> dict[str, Traversable]:
    """Bundled suite name -> its file."""
    try:
        package = files(BUNDLED)
    except ModuleNotFoundError:  # e.g. an editable install made before suites/ was a package
        raise SuiteError(f"the bundled suites (package `{BUNDLED}`) are not installed; reinstall fractalbench "
                         "(`make setup`, or `pip install -e .` in a checkout)") from None
    return {item.name[:-5]: item for item in package.iterdir() if item.name.endswith(".yaml") and item.is_file()}


def list_suites() -> list[str]:
    """Names of the bundled suites."""
    return sorted(_bundled())


def _locate(name_or_path: str) -> tuple[Traversable, str]:
    """(the suite's file, the path results record: ``suites/NAME.yaml`` for a bundled suite)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SuiteError(f"suite file {path} does not exist")
        return path, str(path)
    bundled = _bundled()
    if name_or_path in bundled:
        return bundled[name_or_path], f"{BUNDLED.replace('.', '/')}/{name_or_path}.yaml"
    from fractalbench.harness.registry import unknown_name
    raise SuiteError(str(unknown_name("suite", name_or_path, sorted(bundled),
                                      "see `fractalbench list suites`, or give a .yaml path")))


def find_suite(name_or_path: str) -> Traversable:
    """The file of a bundled suite (by name) or of a ``.yaml`` path; SuiteError if there is none."""
    return _locate(name_or_path)[0]


def load_suite(name_or_path: str) -> Suite:
    """Find, read and validate a suite (by bundled name or ``.yaml`` path)."""
    source, path = _locate(name_or_path)
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(f"suite {path}: not a YAML text file (byte {exc.start} is not valid UTF-8)") from None
    except OSError as exc:
        raise SuiteError(f"suite {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SuiteError(f"suite {path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_suite(raw, path)


def parse_suite(raw: Any, path: str = "<suite>") -> Suite:
    """Validate a suite given as parsed YAML (a mapping); ``path`` names it in errors and results.
    Each model's training (the suite's with the entry's and its sweep's overrides) must be valid as
    a whole, e.g. a warm-up no longer than the epochs."""
    suite = validate_suite(raw, path)
    for i, entry in enumerate(suite.models):
        where = f"models[{i}].train"
        try:
            train_config_for(suite, entry)
            where = f"models[{i}].attribute_sweep.train"
            sweep_train_config(suite, entry)
        except ValueError as exc:
            raise SuiteError(f"suite {path}: field '{where}' ({entry.display}): {exc}") from None
    return suite


def suite_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a suite file, for editors and `fractalbench schema`."""
    return {"$schema": JSON_SCHEMA_DIALECT, **Suite.model_json_schema(mode="validation"), "title": "fractalbench suite"}


def train_config_for(suite: Suite, entry: ModelEntry, seed: int | None = None) -> TrainConfig | None:
    """The suite's training settings with the model entry's overrides applied (None: no training);
    ``seed``: the cell's seed (default: the suite's first)."""
    if suite.train is None:
        return None
    return replace(suite.train, **entry.train, **({} if seed is None else {"seed": seed}))


def sweep_train_config(suite: Suite, entry: ModelEntry, seed: int | None = None) -> TrainConfig | None:
    """Training settings of an attribute sweep's stage: the model's, then the sweep's overrides."""
    base = train_config_for(suite, entry, seed)
    if base is None or entry.attribute_sweep is None:
        return None
    return replace(base, **entry.attribute_sweep.train)
