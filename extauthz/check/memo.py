"""A bounded memo for values derived from the config and repeated requests."""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class Memo(Generic[V]):
    """Cleared whole when full: cheap, and a churn of distinct keys only costs recomputing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: dict[Hashable, V] = {}

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        value = self.values.get(key)
        if value is None:
            if len(self.values) >= self.size:
                self.values.clear()
            value = self.values[key] = compute()
        return value
