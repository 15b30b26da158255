"""Options of the swappable parts, declared once: in the part's constructor.

A part's options are the keyword parameters of its constructor (or factory function) — name,
type annotation, default — with the help text from its docstring's ``:param name:`` line.
Parameters that the model builder supplies (``latent_dim``, the guide's encoder, ...) are the
registry's *context* and are not options. From these declarations come the nested config
(``{"prior": {"name": "vamp", "pseudo_inputs": 500}}``), its validation, and the command-line
flags; adding an option to a part is adding a documented keyword argument to its constructor.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from pvae.errors import UsageError

__all__ = ["Part", "Option", "declared_options"]

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    """One option of one part: ``name``, Python ``type`` (an annotation such as ``int``,
    ``Tuple[int, ...]``, ``Optional[int]`` or ``Literal["a", "b"]``), ``default`` and ``help``."""

    name: str
    type: Any
    default: Any
    help: str

    @property
    def choices(self) -> Optional[tuple]:
        return _literal_choices(self.type)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` as this option's type (a string from the command line is parsed);
        anything else is a :class:`UsageError` that names ``where`` and the option."""
        try:
            return _coerce(self.type, value)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: option {self.name!r} {exc}") from None

    def describe(self) -> str:
        choices = f" (one of {', '.join(map(str, self.choices))})" if self.choices else ""
        return f"{self.help}{choices} [default: {_show(self.default)}]"


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _literal_choices(tp) -> Optional[tuple]:
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return None


def _coerce(tp, value):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"must be a list, got {value!r}")
        return tuple(_coerce(args[0], v) for v in value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            value = value.strip()
            if not re.fullmatch(r"[+-]?\d+", value):
                raise ValueError(f"must be an integer, got {value!r}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError(f"must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"must be a string, got {value!r}")
        return value
    raise TypeError(f"has an unsupported type {tp!r}")  # a declaration error, caught by the tests


def _param_help(obj) -> Dict[str, str]:
    """``:param [type] name: text`` lines of ``obj``'s docstrings (its class and ``__init__``,
    most derived first), continuation lines joined."""
    docs = []
    for klass in getattr(obj, "__mro__", (obj,)):
        docs += [klass.__doc__ or ""]
        init = klass.__dict__.get("__init__") if isinstance(klass, type) else None
        if init is not None:
            docs.append(init.__doc__ or "")
    helps: Dict[str, str] = {}
    for doc in docs:
        doc = inspect.cleandoc(doc)
        for m in re.finditer(r":param(?:\s+[^:\s]+)*?\s+(\w+):(.*?)(?=\n\s*:|\n\s*\n|\Z)", doc, re.S):
            helps.setdefault(m.group(1), " ".join(m.group(2).split()))
    return helps


def declared_options(obj, context: Tuple[str, ...] = ()) -> Dict[str, Option]:
    """The options of a part class or factory: its keyword parameters except ``context``."""
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj)
    else:
        hints = typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
    helps = _param_help(obj)
    out: Dict[str, Option] = {}
    for name, param in inspect.signature(obj).parameters.items():
        if name in context or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is _MISSING:
            raise TypeError(f"{obj.__qualname__}: option {name!r} needs a default (or belongs in the context)")
        default = param.default
        if isinstance(default, list):
            default = tuple(default)
        out[name] = Option(name, hints.get(name, type(default)), default, helps.get(name, ""))
    return out


@dataclass(frozen=True, init=False)
class Part:
    """One chosen part and its options, e.g. ``Part("vamp", pseudo_inputs=500)``.

    In a config file: ``{"name": "vamp", "pseudo_inputs": 500}``; a bare string is the part
    with its default options. :meth:`pvae.registry.Registry.part` checks the name and options
    and fills in the defaults."""

    name: str
    options: Tuple[Tuple[str, Any], ...] = ()

    def __init__(self, name: str, **options):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    def __getitem__(self, key: str):
        return dict(self.options)[key]

    def get(self, key: str, default=None):
        return dict(self.options).get(key, default)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.options)

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}

    @classmethod
    def parse(cls, value, kind: str) -> "Part":
        """A :class:`Part` from a ``Part``, a name, or a ``{"name": ..., **options}`` mapping."""
        if isinstance(value, Part):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            values = dict(value)
            name = values.pop("name", None)
            if not isinstance(name, str):
                raise UsageError(f"the {kind} section needs a \"name\" (a string), got {value!r}")
            return cls(name, **values)
        raise UsageError(f"{kind} must be a name or a {{\"name\": ..., options}} mapping, got {value!r}")

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options)
        return f"Part({self.name!r}{opts})"
