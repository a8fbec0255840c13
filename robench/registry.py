"""Name -> object registries for datasets, architectures, defenses and attacks.

A method registers itself with a decorator (as timm's ``@register_model``), so adding one means
adding one file: inside robench (``defenses/``, ``attacks/``) or anywhere on the Python path,
named in ``$ROBENCH_PLUGINS``. Looking up an unknown name raises a ``UserError`` that lists the valid choices.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Generic, Iterator, TypeVar

from robench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, populate: str | None = None) -> None:
        self.kind = kind
        self._populate = populate  # module whose import registers the entries
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry (a plugin registered for a while, as tests do)."""
        self._items.pop(name, None)

    def _load(self) -> None:
        if self._populate is not None:
            importlib.import_module(self._populate)
        load_plugins()

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}")
        return self._items[name]

    __getitem__ = get

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def ordered(self) -> list[str]:
        """Names in the order the entries declare (their ``order`` attribute), then by name."""
        self._load()
        return sorted(self._items, key=lambda n: (getattr(self._items[n], "order", 100), n))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


PLUGINS_ENV = "ROBENCH_PLUGINS"


def load_plugins() -> None:
    """Import the modules named in ``$ROBENCH_PLUGINS`` (comma-separated, on the Python path):
    a defense or attack of one's own is one file that registers itself, used without editing
    robench."""
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"cannot import plugin module {name!r} from ${PLUGINS_ENV}: {e}") from None


DATASETS: Registry = Registry("dataset", "robench.data")
ARCHS: Registry = Registry("architecture", "robench.models")
DEFENSES: Registry = Registry("defense", "robench.defenses")
ATTACKS: Registry = Registry("attack", "robench.attacks")
