"""Command-line flags from the config dataclasses: ``--train.steps 100 --model.dim 256``.

argparse owns the command line: every field of every nested dataclass becomes ``--<section>.<field>``
(grouped by section), its help the docstring under the field (where the config is documented)
followed by its default. Values go through the conversion Hydra's configs go through
(:mod:`ringrt.run.schema`, pydantic): each word when it is parsed (:func:`ringrt.run.schema.from_text`,
so a bad word is an argparse error, exit 2), the whole config in :func:`build`
(:func:`ringrt.run.schema.from_dict`: a new object whose ``__post_init__`` checks run on the final
values; the defaults are never changed).

    --train.steps 10                  an int, a float (3e-3, nan), a string
    --train.resume false              a bool: true/false, yes/no, on/off, 1/0
    --train.init_from none            none or null: None, for an optional field
    --compression.ks 2 4 8            a list: any number of words; a tuple: exactly its length
    --train.precision bf16            one of a Literal's choices
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from typing import Literal

from ..run.schema import ConfigError, from_dict, from_text, to_dict


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
        for field_, doc in zip(body, body[1:], strict=False):
            if (isinstance(field_, ast.AnnAssign) and isinstance(field_.target, ast.Name) and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                docs[field_.target.id] = _plain(doc.value.value)
    return docs


def field_help(cls, name: str, default) -> str:
    """argparse help for field ``name`` of ``cls``: its docstring, then its default."""
    doc = fields_doc(cls).get(name, "")
    return (f"{doc} (default {default!r})" if doc else f"(default {default!r})").replace("%", "%%")


def _word(tp):
    """argparse's ``type=`` for a field of type ``tp``: its error is argparse's ``argument --x: <why>``."""
    def convert(text: str):
        try:
            return from_text(tp, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def add_field(parser, cls, name: str, default, *, flag: str, dest: str, bool_metavar: str | None = None) -> None:
    """The flag ``flag`` for field ``name`` of ``cls``, stored in ``args.<dest>`` only when given."""
    tp = typing.get_type_hints(cls)[name]
    kw: dict = {"dest": dest, "default": argparse.SUPPRESS, "help": field_help(cls, name, default)}
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        kw["nargs"] = "*" if origin is list else len(typing.get_args(tp))
        tp = typing.get_args(tp)[0]
    literal = next((a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is Literal), None)  # X or X | None
    choices = typing.get_args(literal) if literal is not None else ()
    kw["type"] = _word(tp)
    if choices:
        kw["metavar"] = "{" + ",".join(map(str, choices)) + "}"
    else:
        kw["metavar"] = bool_metavar if tp is bool and bool_metavar else name.upper()
    parser.add_argument(flag, **kw)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, defaults=None) -> None:
    """A ``--<section>.<field>`` flag for every field of every section of ``cls``, grouped by section,
    each with its field's docstring and default as help."""
    defaults = defaults if defaults is not None else cls()
    parser.usage = "%(prog)s [-h] [--<section>.<field> VALUE ...]"
    for section in dataclasses.fields(cls):
        sub = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(sub):
            add_field(parser, cls, section.name, sub, flag=f"--{section.name}", dest=section.name)
            continue
        about = fields_doc(cls).get(section.name) or _plain((type(sub).__doc__ or "").split("\n\n")[0])
        group = parser.add_argument_group(section.name, description=about.replace("%", "%%") or None)
        for f in dataclasses.fields(sub):
            key = f"{section.name}.{f.name}"
            add_field(group, type(sub), f.name, getattr(sub, f.name), flag=f"--{key}", dest=key)


def build(cls, args: argparse.Namespace, defaults=None):
    """The dataclass ``cls``: ``defaults`` (or ``cls()``) with every given flag applied, as a new object
    (``defaults`` is not changed) whose ``__post_init__`` checks see the final values."""
    data = to_dict(defaults if defaults is not None else cls())
    for dest, value in vars(args).items():
        *path, name = dest.split(".")
        node = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, path, data)
        if isinstance(node, dict) and name in node:
            node[name] = value
    return from_dict(cls, data)
