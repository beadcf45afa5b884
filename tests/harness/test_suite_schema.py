"""The suite JSON Schema (fractalbench.harness.suites.suite_json_schema) against the suite validation.

``jsonschema`` is not a dependency, so a small checker of the keywords the schema uses (listed in
``KEYWORDS``) stands in for it; a keyword outside that list fails the test, so the checker cannot
silently skip a constraint. Where the schema and the validation can both judge a suite, they agree:
bundled suites pass both, and a malformed suite fails both at the same field path.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, fields
from importlib.resources import files
from typing import Any

import pytest
import yaml

from fractalbench.harness._suite_schema import (
    LATENCY_FIELDS,
    MEMORY_FIELDS,
    DatasetSection,
    LatencySection,
    MemorySection,
    TrainSection,
    field_path,
)
from fractalbench.harness.suites import METRICS, SuiteError, list_suites, parse_suite, suite_json_schema

KEYWORDS = {"$schema", "$defs", "$ref", "title", "description", "default", "type", "enum", "const", "anyOf", "oneOf",
            "allOf",
            "if", "then", "properties", "required", "additionalProperties", "patternProperties", "items", "minItems",
            "minLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(kind: str, value: Any) -> bool:
    if kind in ("integer", "number"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and (kind == "number" or float(value).is_integer())
    return isinstance(value, TYPES[kind])


def _scalar_ok(schema: dict[str, Any], value: Any) -> bool:
    checks = {
        "type": lambda t: _type_ok(t, value), "enum": lambda e: value in e, "const": lambda c: value == c,
        "minimum": lambda m: value >= m, "maximum": lambda m: value <= m, "exclusiveMinimum": lambda m: value > m,
        "exclusiveMaximum": lambda m: value < m, "multipleOf": lambda m: math.isclose(value % m, 0),
        "minLength": lambda n: len(value) >= n, "pattern": lambda p: re.search(p, value) is not None,
        "minItems": lambda n: len(value) >= n,
    }
    return all(check(schema[key]) for key, check in checks.items() if key in schema)


def schema_errors(schema: dict[str, Any], value: Any, root: dict[str, Any], at: tuple = ()) -> list[tuple]:
    """Field paths where ``value`` breaks ``schema``, deepest explanation first."""
    assert set(schema) <= KEYWORDS, f"checker does not know {set(schema) - KEYWORDS}"
    if "$ref" in schema:
        return schema_errors(root["$defs"][schema["$ref"].split("/")[-1]], value, root, at)
    if "anyOf" in schema:
        branches = [schema_errors(option, value, root, at) for option in schema["anyOf"]]
        return [] if [] in branches else max(branches, key=lambda errors: len(errors[0]))
    if "oneOf" in schema:  # exactly one branch (a tagged union: one source, or a list of sources)
        branches = [schema_errors(option, value, root, at) for option in schema["oneOf"]]
        if branches.count([]) == 1:
            return []
        return [at] if branches.count([]) > 1 else max(branches, key=lambda errors: len(errors[0]))
    errors = [] if _scalar_ok(schema, value) else [at]
    for part in schema.get("allOf", ()):
        if not schema_errors(part.get("if", {}), value, root, at):
            errors += schema_errors(part["then"], value, root, at)
    if isinstance(value, dict) and not errors:
        properties = schema.get("properties", {})
        errors += [(*at, key) for key in schema.get("required", ()) if key not in value]
        for key, item in value.items():
            patterns = [s for p, s in schema.get("patternProperties", {}).items() if re.search(p, key)]
            if key in properties:
                errors += schema_errors(properties[key], item, root, (*at, key))
            elif patterns:
                errors += schema_errors(patterns[0], item, root, (*at, key))
            elif schema.get("additionalProperties") is False or "patternProperties" in schema:
                errors.append((*at, key))
    if isinstance(value, list) and not errors and "items" in schema:
        errors += [e for i, item in enumerate(value) for e in schema_errors(schema["items"], item, root, (*at, i))]
    return errors


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return suite_json_schema()


def bundled_raw(name: str) -> Any:
    return yaml.safe_load((files("fractalbench.suites") / f"{name}.yaml").read_text(encoding="utf-8"))


def test_schema_is_json_draft_2020_12_and_every_reference_resolves(schema):
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    refs = set(re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(schema)))
    assert refs and refs <= set(schema["$defs"])


def test_every_field_is_described(schema):
    for name, definition in [("suite", schema), *schema["$defs"].items()]:
        for option in definition.get("anyOf", [definition]):
            for field, spec in option.get("properties", {}).items():
                assert spec.get("description"), f"{name}.{field} has no description"


def test_schema_spot_checks(schema):
    defs, top = schema["$defs"], schema["properties"]
    assert schema["required"] == ["name", "datasets", "models"] and schema["additionalProperties"] is False
    assert top["metrics"]["items"]["enum"] == list(METRICS)
    from fractalbench.harness.data import DATASET_NAMES
    from fractalbench.harness.policies import POLICY_NAMES
    assert defs["PolicyConfig"]["properties"]["name"]["anyOf"][0]["enum"] == list(POLICY_NAMES)
    assert defs["Dataset"]["anyOf"][0]["enum"] == list(DATASET_NAMES)  # a bare name, or the mapping
    assert list(defs["Latency"]["properties"]) == list(LATENCY_FIELDS)
    assert list(defs["Memory"]["properties"]) == list(MEMORY_FIELDS)
    assert defs["Latency"]["properties"]["repeats"]["minimum"] == 1
    grids = {p["if"]["properties"]["name"]["const"]: p["then"]["properties"]["grid"]["items"]
             for p in defs["PolicyConfig"]["allOf"]}
    assert grids["confidence"] == {"type": "number", "minimum": 0, "maximum": 1}
    assert grids["entropy"]["minimum"] == 0 and grids["patience"]["minimum"] == 1


@pytest.mark.parametrize("name", list_suites())
def test_bundled_suites_validate_against_the_schema(schema, name):
    assert schema_errors(schema, bundled_raw(name), schema) == []


BASE = {"name": "t", "datasets": ["digits"], "models": ["resnet20"]}


@pytest.mark.parametrize("changes", [
    {"modles": []}, {"seed": -1}, {"devices": ["tpu"]}, {"datasets": [{"name": "cifar11"}]},
    {"datasets": [{"name": "digits", "image_size": 0}]}, {"train": {"optimizer": "rmsprop"}},
    {"train": {"epochs": 2.5}}, {"metrics": ["accuracy", "speed"]}, {"latency": {"repeats": 0}},
    {"latency": {"device": "cuda"}}, {"memory": {"method": "rss"}}, {"budgets": [1.5]},
    {"policies": [{"name": "confidence", "grid": [0.5, 1.5]}]}, {"policies": [{"name": "patience", "grid": [1.5]}]},
    {"compare": {"p_value": 0}}, {"models": [{"name": "skipnet38", "attribute_sweep": {"attribute": "alpha",
                                                                                       "values": [0.1, "x"]}}]},
    {"models": [{"name": "resnet20", "train": {"lr": -1}}]},
])
def test_malformed_suite_fails_the_schema_and_the_validation_at_the_same_field(schema, changes):
    raw = {**BASE, **changes}
    errors = schema_errors(schema, raw, schema)
    assert errors, "the schema accepted it"
    with pytest.raises(SuiteError) as err:
        parse_suite(raw, "x.yaml")
    assert f"field '{field_path(errors[0])}':" in str(err.value)


@pytest.mark.parametrize("section, cls, skip", [
    (DatasetSection, "fractalbench.harness.data:DatasetConfig", ()),
    (TrainSection, "fractalbench.harness.train:TrainConfig", ("seed",)),
])
def test_sections_cover_their_dataclass_with_its_defaults(section, cls, skip):
    import importlib

    module, name = cls.split(":")
    dataclass = getattr(importlib.import_module(module), name)
    assert list(section.model_fields) == [f.name for f in fields(dataclass) if f.name not in skip]
    for f in fields(dataclass):
        if f.name in section.model_fields and f.name != "name":
            assert section.model_fields[f.name].default == (f.default if f.default_factory is MISSING
                                                            else f.default_factory())


def test_compare_section_matches_the_compare_thresholds():
    from fractalbench.harness.suites import COMPARE_FIELDS
    from fractalbench.reports.compare import Thresholds

    assert COMPARE_FIELDS == Thresholds.names()


@pytest.mark.parametrize("section, cls", [(LatencySection, "LatencySettings"), (MemorySection, "MemorySettings")])
def test_settings_bounds_agree_with_their_post_init_checks(section, cls):
    """Whole-number settings: the schema's minimum is what ``__post_init__`` accepts, and one less is refused."""
    import fractalbench.harness.metrics.settings as settings

    build = getattr(settings, cls)
    props = section.model_json_schema()["properties"]
    whole = {name: spec["minimum"] for name, spec in props.items() if spec.get("type") == "integer"}
    assert whole, "no whole-number settings found"
    for name, low in whole.items():
        build(**{name: low})
        with pytest.raises(ValueError):
            build(**{name: low - 1})
        with pytest.raises(ValueError):
            section.model_validate({name: low - 1})
