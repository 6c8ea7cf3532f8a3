"""Plain nested mappings (YAML, Hydra, JSON) and command-line words -> typed config dataclasses, strictly.

``launch/`` hands the composed Hydra config here as a plain dict (``OmegaConf.to_container(cfg,
resolve=True)``), ``ringrt.jobs.flags`` each flag's word and then the whole config; everything below
sees dataclasses only.

    cfg = from_dict(TrainRun, {"train": {"steps": 10}, "model": {"n_layers": 2}})

pydantic converts, over the plain dataclasses themselves (nothing in them knows pydantic):
:func:`from_dict` in strict JSON mode with unknown keys forbidden, so values are read as YAML and
JSON spell them (``"10"`` is not an int, ``1`` is not a bool, ``1`` is the float 1.0, a list fills a
tuple; strict Python mode would want dataclass instances and tuples), and each ``__post_init__`` runs
on the final values; :func:`from_text` in lax mode, which parses a word (``"10"``, ``"3e-3"``,
``"no"``), plus ``none`` / ``null`` for None.

Ours is the wording: pydantic's first error becomes one line that names the dotted key, the value
and what would be valid, with a "did you mean" for an unknown key::

    unknown key 'model.n_layrs'; did you mean 'n_layers'? valid keys of model: vocab_size, dim, ...
    train.steps='10' must be an integer
    logging.wandb='on' is not valid; valid: 'offline', 'online', 'disabled'

Why not ``OmegaConf.structured``: OmegaConf 2.3 rejects ``Literal[...]`` annotations, which our
configs use for every choice, and its errors do not list the valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from typing import Any, Mapping, TypeVar, Union

import pydantic

T = TypeVar("T")

_MUST = {"int": "must be an integer", "float": "must be a number", "bool": "must be true or false",
         "string": "must be a string", "list": "must be a list", "tuple": "must be a list", "dict": "must be a mapping"}


class ConfigError(ValueError):
    """A config value that does not fit the schema (names the key, the value and what is valid)."""


@functools.cache
def _strict(cls) -> type[pydantic.BaseModel]:
    # One field, ``value: cls``: the model carries the config down to every nested dataclass
    # (pydantic takes no config for a stdlib dataclass itself).
    config = pydantic.ConfigDict(strict=True, extra="forbid")
    return pydantic.create_model(f"{cls.__name__}Settings", __config__=config, value=(cls, ...))


@functools.cache
def _lax(tp) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build ``cls`` (a dataclass, possibly nested) from ``data``, rejecting anything that does not fit."""
    try:
        return _strict(cls).model_validate_json(json.dumps({"value": {} if data is None else data})).value
    except pydantic.ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ConfigError(_message(cls, err["loc"][1:], err)) from None


def from_text(tp, text: str):
    """One command-line word as a value of type ``tp`` (``int``, ``float | None``, ``Literal[...]``, ...)."""
    if text.lower() in ("none", "null") and _optional(tp):
        return None
    try:
        return _lax(tp).validate_python(text, strict=False)
    except pydantic.ValidationError as e:
        raise ConfigError(f"{text!r} {_sentence(tp, e.errors(include_url=False)[0], null='none')}") from None


def unknown_key(cls, key: str) -> str | None:
    """:func:`from_dict`'s message for a dotted key (``model.n_layrs``) that ``cls`` does not have, else
    None. Below a field that is not a dataclass (a mapping, a leaf) no key is the schema's to judge."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part not in _names(cls):
            return _unknown(cls, part, ".".join(parts[:i]))
        cls = _strip_none(typing.get_type_hints(cls)[part])
        if not dataclasses.is_dataclass(cls):
            return None
    return None


def to_dict(obj) -> dict[str, Any]:
    """A dataclass config as plain nested dicts/lists (for YAML/JSON dumps and logging)."""
    return dataclasses.asdict(obj)


# --- the wording of pydantic's errors -------------------------------------------------------------


def _message(cls, loc: tuple, err: dict) -> str:
    if err["type"] == "unexpected_keyword_argument":
        return _unknown(_type_at(cls, loc[:-1]), str(loc[-1]), _dotted(loc[:-1]))
    if err["type"] == "value_error":  # a dataclass's own check (``__post_init__``), worded by it
        return str(err["ctx"]["error"])
    if err["type"] == "missing_keyword_argument":
        return f"missing required key {_dotted(loc)!r}"
    if err["type"] == "missing":  # a tuple's item: the message is about the tuple
        loc = loc[:-1]
    return f"{_dotted(loc) or cls.__name__}={err['input']!r} {_sentence(_type_at(cls, loc), err)}"


def _sentence(tp, err: dict, null: str = "null") -> str:
    """What a value of the declared type ``tp`` must be, for pydantic's error ``err``."""
    kind, inner = err["type"], _strip_none(tp)
    if kind == "literal_error":
        text = "is not valid; valid: " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif kind in ("missing", "too_long", "too_short") and typing.get_origin(inner) is tuple:
        text = f"must have {len(typing.get_args(inner))} items"
    elif kind.startswith("dataclass"):
        text = f"must be a mapping of {inner.__name__} settings"
    else:
        text = _MUST.get(kind.split("_")[0], f"is not valid ({err['msg']})")
    return f"{text} (or {null})" if _optional(tp) else text


def _unknown(cls, name: str, prefix: str) -> str:
    names = _names(cls)
    near = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ";"
    key = f"{prefix}.{name}" if prefix else name
    return f"unknown key {key!r}{hint} valid keys of {prefix or cls.__name__}: {', '.join(names)}"


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _dotted(loc) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _optional(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_none(tp):
    """``X`` for ``X | None``, else ``tp``."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if _optional(tp) else []
    return arms[0] if len(arms) == 1 else tp


def _type_at(tp, loc):
    """The declared type at a location inside ``tp``: field names of dataclasses, indices of lists
    and tuples, keys of mappings."""
    for part in loc:
        tp = _strip_none(tp)
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part, Any)
            continue
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        fixed = typing.get_origin(tp) is tuple and len(args) > 1 and isinstance(part, int)
        tp = args[part] if fixed and part < len(args) else (args[-1] if args else Any)
    return tp
