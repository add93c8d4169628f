"""Bounded caches for the predictor: phrase → text embedding (LRU by count) and image → features (LRU by bytes)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Thread-safe LRU cache bounded by total `cost` (entry count when `cost_fn` is None)."""

    def __init__(self, capacity: int, cost_fn: Callable[[V], int] | None = None):
        self.capacity = capacity
        self.cost_fn = cost_fn or (lambda _value: 1)
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        cost = self.cost_fn(value)
        if cost > self.capacity:
            return  # would evict everything and still not fit
        with self._lock:
            if key in self._items:
                self._total -= self._items.pop(key)[1]
            self._items[key] = (value, cost)
            self._total += cost
            while self._total > self.capacity:
                _, (_, old_cost) = self._items.popitem(last=False)
                self._total -= old_cost

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def total_cost(self) -> int:
        return self._total
