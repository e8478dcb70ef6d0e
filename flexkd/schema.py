"""Config schemas are pydantic models; this turns their errors into one-line ConfigErrors.

A message starts with the key path and the value (`strategy.temperature=0 ...`) and ends with
a hint read from the field's declaration: its description, its choices (a `Literal`) or its
range (`ge`, `gt`, `le`). Unknown keys get a "did you mean" and the valid keys.
"""

from __future__ import annotations

import difflib
import types
import typing

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from flexkd.errors import ConfigError

# Config values arrive typed (YAML / Hydra overrides): no string-to-number coercion, and a
# non-finite float is as wrong as a string.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<="))
_KINDS = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false)",
          "string": "a string", "list": "a list", "tuple": "a list", "dict": "a mapping",
          "model": "a mapping", "literal": "a valid choice"}


def show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _unwrap(annotation):
    """`X | None` -> X (also through Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def choices(info: FieldInfo) -> tuple | None:
    annotation = _unwrap(info.annotation)
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def bounds(info: FieldInfo) -> list[str]:
    out = []
    for meta in info.metadata:
        for kind, attr, op in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{op} {getattr(meta, attr)}")
    return out


def hint(info: FieldInfo | None, with_bounds: bool = True) -> str:
    """` (doc; one of: a, b; >= 0)`, or '' when the field declares nothing to say."""
    if info is None:
        return ""
    parts = [info.description] if info.description else []
    if options := choices(info):
        parts.append("one of: " + ", ".join(str(c) for c in options))
    if with_bounds and (limits := bounds(info)):
        parts.append(" and ".join(limits))
    return f" ({'; '.join(parts)})" if parts else ""


def _submodel(annotation) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def field_at(model: type[BaseModel], loc: tuple) -> tuple[FieldInfo | None, type[BaseModel]]:
    """The field a location points into (list indices are skipped), and the model holding it."""
    info, holder = None, model
    for key in loc:
        if isinstance(key, int):
            continue
        if holder is None or key not in holder.model_fields:
            return None, holder
        info = holder.model_fields[key]
        sub = _submodel(info.annotation)
        if sub is None:
            return info, holder
        holder = sub
    return info, holder


def _value_at(data, loc: tuple):
    for key in loc:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def to_config_error(exc: ValidationError, model: type[BaseModel], data: dict, prefix: str = "",
                    what: str = "the config", extra_keys=()) -> ConfigError:
    """The first error of `exc` (unknown keys first) as a one-line ConfigError.

    `prefix` is the key path of `data` in the whole config; `extra_keys` are keys accepted
    next to the model's fields at the top level (listed among the valid keys)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        _, holder = field_at(model, loc[:-1])
        valid = set(holder.model_fields) | (set(extra_keys) if len(loc) == 1 else set())
        parent = join(prefix, ".".join(str(k) for k in loc[:-1])) if len(loc) > 1 else prefix
        return unknown_key_error(parent, loc[-1], valid, what if len(loc) == 1 else parent)
    if error["type"] == "missing" and loc and isinstance(loc[-1], int):  # a short tuple
        loc, error = loc[:-1], {**error, "type": "too_short"}
    path = prefix
    for key in loc:
        path = join(path, key)
    info, _ = field_at(model, loc)
    value = _value_at(data, loc)
    kind = error["type"]
    if kind == "missing":
        return ConfigError(f"{path} is missing{hint(info)}")
    if kind == "literal_error":
        options = [str(c) for c in choices(info) or ()]
        close = difflib.get_close_matches(str(value), options, n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"{path}={show(value)} is not a valid choice{maybe}; choose one of: "
                           f"{', '.join(options)}")
    for kind_, attr, op in _BOUNDS:
        if attr in (error.get("ctx") or {}):
            declared = [getattr(m, attr) for m in (info.metadata if info else ()) if isinstance(m, kind_)]
            doc = f" ({info.description})" if info is not None and info.description else ""
            return ConfigError(f"{path}={show(value)} is out of range: it must be {op} "
                               f"{declared[0] if declared else error['ctx'][attr]}{doc}")
    if kind == "finite_number":
        return ConfigError(f"{path}={value} is not a finite number{hint(info)}")
    expected = _KINDS.get(kind.split("_")[0])
    if value is None and expected:
        return ConfigError(f"{path} must not be null; expected {expected}{hint(info)}")
    if kind in ("too_short", "too_long"):
        return ConfigError(f"{path}={show(value)} has the wrong length ({error['msg'].lower()})"
                           f"{hint(info)}")
    if expected:
        return ConfigError(f"{path}={show(value)} is not {expected}{hint(info)}")
    return ConfigError(f"{path}={show(value)}: {error['msg']}{hint(info)}")


def unknown_key_error(path: str, key, valid, what: str, list_all: bool = True) -> ConfigError:
    """`list_all=False`: name the valid keys only when no close match exists (long lists)."""
    full = join(path, key)
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
    maybe = f"did you mean {join(path, close[0])}?" if close else ""
    if close and not list_all:
        return ConfigError(f"{full} is not a key of {what}; {maybe}")
    return ConfigError(f"{full} is not a key of {what}; {maybe + ' ' if maybe else ''}valid keys: "
                       f"{', '.join(sorted(str(v) for v in valid))}")


def validate(model: type[BaseModel], data, prefix: str = "", what: str = "the config",
             extra_keys=()) -> BaseModel:
    """`model(**data)`, or the one-line ConfigError of its first problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}={show(data)} is not a mapping; expected the keys of {what}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise to_config_error(e, model, data, prefix, what, extra_keys) from None
