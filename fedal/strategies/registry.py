"""Name -> strategy class registry, so every strategy is reachable from a config string."""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from fedal.exceptions import UnknownStrategyError
from fedal.strategies.base import QueryStrategy

_REGISTRY: dict[str, type[QueryStrategy]] = {}
S = TypeVar("S", bound=type[QueryStrategy])


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy reachable as ``get_strategy(name)``."""

    def deco(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy name {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_strategies() -> list[str]:
    """Sorted names of every registered strategy."""
    return sorted(_REGISTRY)


def strategy_class(name: str) -> type[QueryStrategy]:
    """The class registered as ``name`` (any case; ``-`` for ``_``).

    Raises
    ------
    UnknownStrategyError
        If no strategy has that name; the message lists the known names.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise UnknownStrategyError(
            f"unknown query strategy {name!r}; choose one of: {', '.join(available_strategies())}"
        )
    return _REGISTRY[key]


def get_strategy(name: str, **kwargs: Any) -> QueryStrategy:
    """Instantiate the strategy registered as ``name`` with its keyword options.

    Raises
    ------
    UnknownStrategyError
        If no strategy has that name; the message lists the known names.
    """
    return strategy_class(name)(**kwargs)
