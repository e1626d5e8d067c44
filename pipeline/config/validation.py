"""The one validation system of the params: pydantic v2 models, their field types, and how problems read.

`pipeline/config/` declares a model per `params.yaml` section and `pipeline/data/tasks.py` one per task's options
(`finetune.tasks.<task>`, `lengths.task_options`), both on `Section`; types and ranges are field constraints, a
check involving several fields is a validator beside them that raises `Problems`. `describe` turns pydantic's
errors into one 'yaml.path: what is wrong' line each, so every problem reads the same wherever it was found.
YAML 1.1 reads `1e-4` as a string: `Float` fields accept such strings as numbers.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Problems(ValueError):
    """Raised by validators: one or more 'relative.path: what is wrong' lines (paths relative to the model)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))


class Section(BaseModel):
    """A params section: unknown keys rejected, no silent type coercion, field docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, validate_default=False)
    ITEM: ClassVar[str] = "key"
    """What a key of this mapping is, in messages ('unknown option', 'expected a mapping of options')."""


# ------------------------------------------------------------------------------------------- field types


def yaml_float(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string: take numeric text as the float it means."""
    if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    return value


def between(lo: float, hi: float, bounds: str) -> AfterValidator:
    """A range check on a number, `bounds` one of `()`, `(]`, `[)`, `[]` (open/closed ends)."""

    def check(value: float) -> float:
        low_ok = value > lo if bounds[0] == "(" else value >= lo
        high_ok = value < hi if bounds[1] == ")" else value <= hi
        if not (low_ok and high_ok):
            raise ValueError(f"must be in {bounds[0]}{lo:g}, {hi:g}{bounds[1]}, got {value}")
        return value

    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(yaml_float)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]


def with_yaml_floats(tp: Any) -> Any:
    """`tp` with every `float` replaced by `Float` (YAML 1.1 float text accepted)."""
    if tp is float:
        return Float
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        out = with_yaml_floats(args[0])
        for arg in args[1:]:
            out = out | with_yaml_floats(arg)
        return out
    if origin is list:
        return list[with_yaml_floats(args[0])]
    return tp


# ----------------------------------------------------------------------------------------- error messages


_TYPE_NAMES = {
    "int_type": "int",
    "int_parsing": "int",
    "int_from_float": "int",
    "float_type": "float",
    "float_parsing": "float",
    "bool_type": "bool",
    "bool_parsing": "bool",
    "string_type": "str",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "null",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model reached by `loc` from `model` (None where `loc` leads to no model)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model reached by `loc` from `model` (for 'did you mean' hints)."""
    found = _model_at(model, loc)
    return list(found.model_fields) if found else []


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return tp


def _path(loc: tuple, model: type[BaseModel]) -> str:
    """`a.b[2].c` from a pydantic location, dropping union-member tags (`int`, `literal['auto']`, ...)."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and part not in _fields_at(model, loc[:i]) and _fields_at(model, loc[:i]):
            out += f".{part}"  # an unknown key: keep it, the message names it
        elif re.match(r"^[a-z]+[\[-]", part) or part in ("int", "float", "str", "bool", "list", "none"):
            continue  # a union member's tag
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One 'yaml.path: problem' line per problem (several failed union members at one path merged); paths are
    relative to `model`, and a problem of the whole input is at `<top>`."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors():
        by_path.setdefault(_path(err["loc"], model), []).append(err)
    lines = []
    for path, errs in by_path.items():
        lines += _lines(path, errs, model)
    return lines


def nest(path: str, lines: list[str]) -> list[str]:
    """`describe`'s lines of a model validated at `path` of an enclosing one, as lines of the enclosing one."""
    return [f"{path}: {line[7:]}" if line.startswith("<top>: ") else f"{path}.{line}" for line in lines]


def _number(bound: Any) -> Any:
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def _lines(path: str, errs: list[dict[str, Any]], model: type[BaseModel]) -> list[str]:
    where = path or "<top>"
    err = next((e for e in errs if e["type"] in _BOUNDS or e["type"] in ("value_error", "too_short", "too_long")),
               errs[0])  # fmt: skip
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        known = _fields_at(model, err["loc"][:-1])
        item = getattr(_model_at(model, err["loc"][:-1]), "ITEM", "key")
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"{where}: unknown {item}{hint}; allowed: {', '.join(known)}"]
    if kind == "value_error":
        text = str(ctx.get("error", err["msg"]))
        return [_join(path, line) for line in text.splitlines()]
    if kind in _BOUNDS:
        bound = _number(next(iter(ctx.values())))
        return [f"{where}: must be {_BOUNDS[kind]} {bound}, got {value!r}"]
    if kind in ("too_short", "too_long"):
        return [f"{where}: expected {ctx.get('min_length')} to {ctx.get('max_length', 'any number of')} items"
                f", got {value!r}" if kind == "too_long" else f"{where}: must have at least "
                f"{ctx.get('min_length')} item(s), got {value!r}"]  # fmt: skip
    if kind == "literal_error":
        allowed = str(ctx.get("expected", "")).replace(" or ", ", ")
        return [f"{where}: expected one of {allowed}, got {value!r}"]
    if kind == "missing":
        return [f"{where}: missing"]
    if value is None and all(e["type"] in _TYPE_NAMES for e in errs):
        return [f"{where}: must not be null"]
    if kind in ("model_type", "model_attributes_type") and len(errs) == 1:
        item = getattr(_model_at(model, err["loc"]), "ITEM", "key")
        of = f" of {item}s" if item != "key" else ""
        return [f"{where}: expected a mapping{of}, got {value!r}"]
    names = [n for n in dict.fromkeys(_TYPE_NAMES.get(e["type"]) for e in errs) if n]
    if names:
        literals = [str((e.get("ctx") or {}).get("expected")) for e in errs if e["type"] == "literal_error"]
        return [f"{where}: expected {' | '.join(names + literals)}, got {value!r}"]
    return [f"{where}: {err['msg']}, got {value!r}"]


def _join(path: str, line: str) -> str:
    """`path` + a validator's 'relative.path: problem' line (`<here>` or no path: the problem is at `path`)."""
    rel, sep, rest = line.partition(": ")
    if not sep or rel == "<here>" or " " in rel:
        return f"{path or '<top>'}: {rest if rel == '<here>' else line}"
    return f"{path}.{rel}: {rest}" if path else f"{rel}: {rest}"
