"""Name → class registries.

Every swappable part (prior, guide, likelihood, activation, objective, data set) is looked
up by name through a :class:`Registry`. Registration is a decorator, so adding a part never
means editing an ``if``/``elif`` chain, and an unknown name is an error that lists the valid
choices.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Generic, Iterator, Tuple, TypeVar

from pvae.errors import UsageError
from pvae.options import Option, Part, declared_options

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(UsageError, KeyError):
    """Raised when a registry is asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to classes or factories of one kind.

    :param str kind: what the registry holds, used in error messages (e.g. ``"prior"``).
    :param context: constructor parameters the model builder supplies (``latent_dim``, ...);
        every other keyword parameter of an entry is one of its options
        (:func:`pvae.options.declared_options`).
    :param str doc: the docstring of this registry (``help(PRIORS)``, ``PRIORS.__doc__``); without
        it, the class's.

    Example::

        PRIORS = Registry("prior")

        @PRIORS.register("standard-normal")
        class StandardNormalPrior(...): ...

        PRIORS.get("standard-normal")
    """

    def __init__(self, kind: str, context: Tuple[str, ...] = (), doc: str = ""):
        self.kind = kind
        self.context = tuple(context)
        self._entries: Dict[str, T] = {}
        if doc:
            self.__doc__ = doc

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (names are unique)."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise UsageError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the entry registered under ``name``.

        :raises UnknownNameError: naming the unknown value and listing the valid ones.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            ) from None

    def options(self, name: str) -> Dict[str, Option]:
        """The options entry ``name`` declares (its constructor's keyword parameters)."""
        return declared_options(self.get(name), self.context)

    def part(self, value) -> Part:
        """Check a part (a :class:`~pvae.options.Part`, a name or a mapping) against the entry's
        declared options, coerce their types and fill in the defaults."""
        part = Part.parse(value, self.kind)
        declared = self.options(part.name)
        unknown = sorted(set(part.kwargs) - set(declared))
        if unknown:
            takes = f"it takes {', '.join(declared)}" if declared else "it takes no options"
            raise UsageError(f"{self.kind} {part.name!r} does not take {', '.join(unknown)}; {takes}")
        where = f"{self.kind} {part.name!r}"
        values = {k: opt.coerce(part.kwargs[k], where) if k in part.kwargs else opt.default
                  for k, opt in declared.items()}
        return Part(part.name, **values)

    def build(self, part, **context):
        """Construct the entry a part names with its options and the builder's ``context``."""
        part = self.part(part)
        entry = self.get(part.name)
        params = inspect.signature(entry).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            context = {k: v for k, v in context.items() if k in params}  # what this entry uses
        return entry(**context, **part.kwargs)

    def names(self) -> list:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
