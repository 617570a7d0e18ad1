"""One registry class for every named thing a user can choose: criteria, allocations, zoo models.

Why one class: a name typed in a recipe, on the command line or in Python must resolve the same way
everywhere, with the same verbs (``register`` / ``get`` / ``list``) and the same did-you-mean error
(timm's ``list_models`` / ``create_model`` is the model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from secateur.errors import ConfigError, did_you_mean

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Names -> objects (usually factories) of one ``kind`` ("criterion", "allocation", "model", ...).

    Example::

        CRITERIA = Registry("group criterion")

        @CRITERIA.register("l1")
        class L1: ...

        CRITERIA.get("l1")        # the class
        CRITERIA.list()           # ['l1']
        CRITERIA.get("l2")        # ConfigError: unknown group criterion 'l2' (did you mean 'l1'?); ...
    """

    def __init__(self, kind: str, *, allow_replace: bool = False) -> None:
        self.kind = kind
        self.allow_replace = allow_replace
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it decorates.

        Raises:
            ConfigError: ``name`` is not a non-empty string, or is taken and the registry does not allow
                replacing (two entries must not silently shadow each other).
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} names must be non-empty strings, got {name!r}")

        def add(o: T) -> T:
            if name in self._entries and not self.allow_replace and self._entries[name] is not o:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """The object registered under ``name``.

        Raises:
            ConfigError: unknown name; the message suggests the closest names and lists all of them.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; available: {self.list()}"
            ) from None

    def list(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plug-ins that register temporarily); unknown names are ignored."""
        self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
