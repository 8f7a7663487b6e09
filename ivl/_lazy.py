"""Lazy public names for a package: imported on first access, then cached in the package."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(
    package: dict[str, Any], table: dict[str, str], modules: frozenset[str] = frozenset()
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` (its ``globals()``): ``table`` maps each public
    name to the module that defines it; names in ``modules`` are that module itself."""
    where = package["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {where!r} has no attribute {name!r}")
        module = importlib.import_module(table[name])
        value = module if name in modules else getattr(module, name)
        package[name] = value
        return value

    return __getattr__
