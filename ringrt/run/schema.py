"""Plain nested mappings (YAML, Hydra, JSON) -> typed config dataclasses, strictly.

The entry points in ``launch/`` hand the composed Hydra config here as a plain dict
(``OmegaConf.to_container(cfg, resolve=True)``); everything below them sees dataclasses only.

    cfg = from_dict(RunConfig, {"train": {"steps": 10}, "model": {"n_layers": 2}})

Rejected, with the full dotted key, the value and what would be valid, before anything runs:
an unknown key (with a "did you mean" suggestion), a missing required key, a value of the wrong
type (``"10"`` for an int, ``1`` for a bool), a value outside a ``Literal[...]``. The dataclass's own
``__post_init__`` checks then run as usual.

Why not ``OmegaConf.structured``: OmegaConf 2.3 rejects ``Literal[...]`` annotations, which our
configs use for every choice, and its errors do not list the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that does not fit the schema (names the key, the value and what is valid)."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if origin is Literal:
        if value not in args or type(value) is not type(next(a for a in args if a == value)):
            raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(repr(a) for a in args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own message, plus null
            try:
                return _convert(arms[0], value, key)
            except ConfigError as e:
                raise ConfigError(f"{e} (or null)" if type(None) in args else str(e)) from None
        for a in arms:
            try:
                return _convert(a, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_describe(tp)}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list ({_describe(tp)})")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}={value!r} must have {len(args)} items")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        items = [_convert(args[0], v, f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        vt = args[1] if args else Any
        return {k: _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {_describe(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Build ``cls`` (a dataclass, possibly nested) from ``data``, rejecting anything that does not fit."""
    where = prefix or cls.__name__
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}={data!r} must be a mapping of {cls.__name__} settings")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for k in data:
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ";"
            raise ConfigError(f"unknown key {(prefix + '.' if prefix else '') + str(k)!r}{hint} valid keys of {where}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key!r} ({_describe(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def to_dict(obj) -> dict[str, Any]:
    """A dataclass config as plain nested dicts/lists (for YAML/JSON dumps and logging)."""
    return dataclasses.asdict(obj)
