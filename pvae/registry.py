"""Name → class registries.

Every swappable part (prior, guide, likelihood, activation, objective, data set) is looked
up by name through a :class:`Registry`. Registration is a decorator, so adding a part never
means editing an ``if``/``elif`` chain, and an unknown name is an error that lists the valid
choices.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from .errors import UsageError

T = TypeVar("T")


class UnknownNameError(UsageError, KeyError):
    """Raised when a registry is asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to classes or factories of one kind.

    :param str kind: what the registry holds, used in error messages (e.g. ``"prior"``).

    Example::

        PRIORS = Registry("prior")

        @PRIORS.register("standard-normal")
        class StandardNormalPrior(...): ...

        PRIORS.get("standard-normal")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

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

    def names(self) -> list:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
