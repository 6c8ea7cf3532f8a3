"""Command-line flags from the config dataclasses: ``--train.steps 100 --model.dim 256``.

Every field of every nested dataclass becomes ``--<section>.<field>``; values are parsed from the
field's type (int, float, str, bool, optional, list and tuple of those, Literal choices).
Unset flags keep the dataclass default. Each flag's help is the docstring under its field (where the
config is documented) followed by its default.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean; valid: true, false")


def _scalar(tp) -> tuple[Any, list | None]:
    """(converter, choices) for a scalar type, unwrapping Optional."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        conv, choices = _scalar(args[0])
        return (lambda s: None if s.lower() in ("none", "null") else conv(s)), choices
    if get_origin(tp) is Literal:
        return str, list(get_args(tp))
    if tp is bool:
        return _parse_bool, None
    return tp, None


def _plain(doc: str) -> str:
    """A docstring on one line, without reST markup: ``x`` and :func:`x` read as x."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc).replace("``", "")
    return " ".join(doc.split())


@functools.cache
def fields_doc(cls) -> dict[str, str]:
    """{field name: its docstring on one line} for a dataclass: the string literal written under each
    field, base classes included. Fields without one are absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a class made at run time)
            continue
        body = tree.body[0].body
        for field_, doc in zip(body, body[1:]):
            if (isinstance(field_, ast.AnnAssign) and isinstance(field_.target, ast.Name) and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                docs[field_.target.id] = _plain(doc.value.value)
    return docs


def field_help(cls, name: str, default) -> str:
    """argparse help for field ``name`` of ``cls``: its docstring, then its default."""
    doc = fields_doc(cls).get(name, "")
    return (f"{doc} (default {default!r})" if doc else f"(default {default!r})").replace("%", "%%")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, defaults=None) -> None:
    """A ``--<section>.<field>`` flag for every field of every section of ``cls``, grouped by section,
    each with its field's docstring and default as help."""
    defaults = defaults if defaults is not None else cls()
    parser.usage = "%(prog)s [-h] [--<section>.<field> VALUE ...]"
    for section in dataclasses.fields(cls):
        sub = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(sub):
            conv, choices = _scalar(get_type_hints(cls)[section.name])
            parser.add_argument(f"--{section.name}", type=conv, choices=choices, default=None,
                                help=field_help(cls, section.name, sub))
            continue
        about = fields_doc(cls).get(section.name) or _plain((type(sub).__doc__ or "").split("\n\n")[0])
        grp = parser.add_argument_group(section.name, description=about.replace("%", "%%") or None)
        hints = get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            tp, default = hints[f.name], getattr(sub, f.name)
            origin = get_origin(tp)
            kw: dict = {"default": None, "help": field_help(type(sub), f.name, default), "dest": f"{section.name}.{f.name}"}
            if origin in (list, tuple):
                conv, choices = _scalar(get_args(tp)[0])
                kw.update(type=conv, nargs="*" if origin is list else len(get_args(tp)))
            else:
                conv, choices = _scalar(tp)
                kw.update(type=conv, choices=choices)
            if not choices:
                kw["metavar"] = f.name.upper()
            grp.add_argument(f"--{section.name}.{f.name}", **kw)


def build(cls, args: argparse.Namespace, defaults=None):
    """The dataclass ``cls`` with every given flag applied over ``defaults`` (or ``cls()``)."""
    cfg = defaults if defaults is not None else cls()
    for section in dataclasses.fields(cls):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            v = getattr(args, section.name, None)
            if v is not None:
                setattr(cfg, section.name, v)
            continue
        for f in dataclasses.fields(sub):
            v = getattr(args, f"{section.name}.{f.name}", None)
            if v is not None:
                setattr(sub, f.name, tuple(v) if isinstance(getattr(sub, f.name), tuple) else v)
    return cfg
