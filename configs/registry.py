"""Name -> object registries with helpful errors.

Datasets, sim tasks, policies, critics and language encoders are all looked up by name from the
config. An unknown name is a user error: the message lists the known names and suggests the closest
one, so `data=brige` answers "did you mean 'bridge'?" instead of a KeyError.

Pure Python on purpose: light modules (the robot client, the policy server) use it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from configs.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A config named something that no registry entry provides."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it plainly.
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to objects of one kind, filled by a decorator.

    >>> tasks = Registry[type]("sim task")
    >>> @tasks.register("lift")
    ... class Lift: ...
    >>> tasks.get("lift") is Lift
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under `name`; names are unique."""

        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}."

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
