"""Constrained value types for validated settings (suite files, measurement settings).

Each is an ``Annotated`` type for pydantic: the constraint appears in the JSON Schema (``minimum``,
``enum``, ``pattern``, ...) and a value that breaks it fails with one plain sentence that says what
is allowed and what was given, e.g. ``must be a whole number >= 1, got 0``. Scalars are strict (no
``"2"`` for 2, no ``true`` for 1); sequences accept YAML lists.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from fractalbench.harness.devices import DEVICE_HELP, parse_device

ERROR_TYPE = "suite_value"  # the error type of every reworded error


def reworded(template: str, types: Collection[str] | None = None) -> Any:
    """A wrap validator that replaces the errors of this level by ``template``, formatted with ``got``
    (the repr of the value), when every error is of this level (none of an item inside it) and, if
    ``types`` is given, of those pydantic error types."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors()
            if all(e["loc"] == () and (types is None or e["type"] in types) for e in errors):
                hint = _yaml_number_hint(value)
                raise PydanticCustomError(ERROR_TYPE, template + hint, {"got": repr(value)}) from None
            raise

    return WrapValidator(check)


def fail(template: str, **context: Any) -> PydanticCustomError:
    """An error with a plain message (``{name}`` fields filled from ``context``) for a validator to raise."""
    return PydanticCustomError(ERROR_TYPE, template, context)


def whole(low: int = 0) -> Any:
    """A whole number >= ``low`` (booleans and floats such as 2.0 are not whole numbers here)."""
    return Annotated[int, Strict(), Field(ge=low), reworded(f"must be a whole number >= {low}, got {{got}}")]


def _yaml_number_hint(value: Any) -> str:
    """For a string that reads as a number: YAML 1.1 (PyYAML) reads ``1.5e6`` as text, not a float."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (a string: YAML reads a number like 1.5e6 as text; write 1.5e+6 or 1500000)"


def number(ge: float | None = None, le: float | None = None, gt: float | None = None, lt: float | None = None) -> Any:
    """A finite number (whole numbers allowed) within the given bounds."""
    limits = ((">=", ge), ("<=", le), (">", gt), ("<", lt))
    bounds = [f"{sign} {value:g}" for sign, value in limits if value is not None]
    closed = ge is not None and le is not None and len(bounds) == 2
    text = f"between {ge:g} and {le:g}" if closed else " and ".join(bounds)
    message = f"must be a number {text}".rstrip() + ", got {got}"
    return Annotated[float, Strict(), Field(ge=ge, le=le, gt=gt, lt=lt, allow_inf_nan=False), reworded(message)]


def whole_valued(low: int = 0) -> Any:
    """A number without a fractional part (2 or 2.0) >= ``low``, kept as a float (e.g. a patience threshold)."""
    return Annotated[float, Strict(), Field(ge=low, multiple_of=1, allow_inf_nan=False),
                     reworded(f"must be a whole number >= {low}, got {{got}}")]


def close_matches(word: Any, allowed: Collection[str]) -> str:
    """``did you mean: a, b? `` for the allowed names close to ``word`` ("" when none is close)."""
    import difflib

    close = difflib.get_close_matches(str(word), list(allowed), n=3, cutoff=0.6)
    return f"did you mean: {', '.join(close)}? " if close else ""


def choice(values: Sequence[str]) -> Any:
    """One of ``values`` (a JSON Schema ``enum``); an error names the close matches."""
    allowed = ", ".join(values)

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(ERROR_TYPE, "{got} is not allowed; {close}allowed: {allowed}",
                                      {"got": repr(value), "close": close_matches(value, values),
                                       "allowed": allowed}) from None

    return Annotated[Literal[tuple(values)], WrapValidator(check)]


def non_empty(item: Any, noun: str) -> Any:
    """A list of at least one ``item``, stored as a tuple; an empty one fails with ``needs at least one NOUN``."""
    return Annotated[tuple[item, ...], Field(min_length=1), reworded(f"needs at least one {noun}", {"too_short"})]


Text = Annotated[str, Strict(), Field(min_length=1), reworded("must be a non-empty string, got {got}")]
Flag = Annotated[bool, Strict(), reworded("must be true or false, got {got}")]
Identifier = Annotated[str, Strict(), Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
                       reworded("must be a model attribute name, got {got}")]
Device = Annotated[str, Strict(), AfterValidator(parse_device),
                   WithJsonSchema({"type": "string", "pattern": r"^(cpu|cuda(:[0-9]+)?)$",
                                   "description": f"a device: {DEVICE_HELP}"}),
                   reworded(f"{{got}} is not allowed; allowed: {DEVICE_HELP}")]

WholeNumber = whole(0)
Count = whole(1)  # a whole number >= 1
PositiveNumber = number(gt=0)


def described(kind: Any, text: str) -> Any:
    """``kind`` with a JSON Schema description (what the value is, and its unit)."""
    return Annotated[kind, Field(description=text)]
