"""Routing schemes for load-balanced tasks, and the load table they read.

A *scheme* is a function ``scheme(loads) -> index``: ``loads`` lists the
outstanding task count of each candidate engine in least-recently-used order
(the engine that was given work longest ago first), and the function returns
the index of the engine to use. The built-in schemes:

``lru``
    always the least recently used engine (close to round-robin).
``plainrandom``
    a uniformly random engine.
``twobin``
    two engines at random, the less recently used of the two.
``weighted``
    two engines at random, weighted by inverse load, the less loaded of the two.
``leastload`` (the default)
    the engine with the fewest outstanding tasks; the least recently used one
    among equals.

Any callable with the same signature can be passed instead of a name.
:class:`LoadTable` keeps the loads in LRU order and applies a per-engine
high-water mark.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Sequence

__all__ = [
    "SCHEMES",
    "LoadTable",
    "get_scheme",
    "leastload",
    "lru",
    "plainrandom",
    "twobin",
    "weighted",
]

Scheme = Callable[[Sequence[int]], int]

_random = random.Random()


def lru(loads: Sequence[int], rng: random.Random = _random) -> int:
    """Always the front of the line (``loads`` is in LRU order; its values are ignored)."""
    return 0


def plainrandom(loads: Sequence[int], rng: random.Random = _random) -> int:
    """A uniformly random pick."""
    return rng.randrange(len(loads))


def twobin(loads: Sequence[int], rng: random.Random = _random) -> int:
    """Pick two at random and use the least recently used of the two (values ignored)."""
    n = len(loads)
    return min(rng.randrange(n), rng.randrange(n))


def weighted(loads: Sequence[int], rng: random.Random = _random) -> int:
    """Pick two at random with inverse load as weight; use the less loaded one.

    A load of 0 gets a large finite weight so idle engines are strongly
    preferred without excluding the others.
    """
    weights = [1.0 / load if load > 0 else 1e6 for load in loads]
    first, second = rng.choices(range(len(loads)), weights=weights, k=2)
    if loads[second] < loads[first]:
        return second
    return first


def leastload(loads: Sequence[int], rng: random.Random = _random) -> int:
    """The lowest load; the first (least recently used) among equal loads."""
    return min(range(len(loads)), key=loads.__getitem__)


#: The built-in schemes by name.
SCHEMES: dict[str, Callable[..., int]] = {
    "lru": lru,
    "plainrandom": plainrandom,
    "twobin": twobin,
    "weighted": weighted,
    "leastload": leastload,
}


def get_scheme(scheme: str | Callable[..., int]) -> Callable[..., int]:
    """Resolve a scheme given by name or as a callable.

    :raises ValueError: for an unknown name, listing the valid ones.
    :raises TypeError: for something that is neither a name nor callable.
    """
    if callable(scheme):
        return scheme
    if isinstance(scheme, str):
        try:
            return SCHEMES[scheme]
        except KeyError:
            raise ValueError(
                f"unknown scheduling scheme {scheme!r}: use one of "
                f"{', '.join(sorted(SCHEMES))} or pass a function scheme(loads) -> index"
            ) from None
    raise TypeError(f"a scheme is a name or a callable, got {scheme!r}")


class LoadTable:
    """Outstanding task counts per engine, kept in least-recently-used order.

    Engines are identified by any hashable key. ``hwm`` caps the outstanding
    tasks per engine (0: no cap); an engine added with its own ``hwm`` has
    that cap instead.
    """

    def __init__(self, scheme: str | Callable[..., int] = "leastload", hwm: int = 0):
        if not isinstance(hwm, int) or hwm < 0:
            raise ValueError(f"hwm must be an int >= 0 (0 means unlimited), got {hwm!r}")
        self.scheme = get_scheme(scheme)
        self.hwm = hwm
        # dicts keep insertion order: the first key is the least recently used
        self._loads: dict[Hashable, int] = {}
        self._caps: dict[Hashable, int] = {}  # engines with their own cap

    def __contains__(self, key: Hashable) -> bool:
        return key in self._loads

    def __len__(self) -> int:
        return len(self._loads)

    def keys(self) -> list[Hashable]:
        """Engine keys in LRU order."""
        return list(self._loads)

    def load(self, key: Hashable) -> int:
        """Outstanding tasks on ``key``."""
        return self._loads[key]

    def add_engine(self, key: Hashable, hwm: int | None = None) -> None:
        """Add an engine with no load, as the most recently used.

        :param hwm: this engine's own cap (0: none); None: the table's ``hwm``.
        """
        self._loads.setdefault(key, 0)
        if hwm is not None:
            self._caps[key] = hwm

    def remove_engine(self, key: Hashable) -> None:
        """Forget an engine (no error if unknown)."""
        self._loads.pop(key, None)
        self._caps.pop(key, None)

    def has_room(self, key: Hashable) -> bool:
        """Is ``key`` below its high-water mark?"""
        cap = self._caps.get(key, self.hwm)
        return cap == 0 or self._loads[key] < cap

    def has_room_anywhere(self) -> bool:
        """Is any engine below its high-water mark?"""
        if self.hwm == 0 and not self._caps:
            return bool(self._loads)
        return any(self.has_room(k) for k in self._loads)

    def available(self) -> list[Hashable]:
        """Engines below their high-water mark, in LRU order."""
        if self.hwm == 0 and not self._caps:
            return list(self._loads)
        return [k for k in self._loads if self.has_room(k)]

    def choose(self, candidates: Iterable[Hashable] | None = None) -> Hashable | None:
        """Pick an engine with the scheme among ``candidates`` (default: all
        available) that are below the high-water mark.

        :returns: the chosen key, or None if none is available.
        """
        if candidates is None:
            keys = self.available()
        else:
            allowed = set(candidates)
            keys = [k for k in self._loads if k in allowed and self.has_room(k)]
        if not keys:
            return None
        index = self.scheme([self._loads[k] for k in keys])
        if not isinstance(index, int) or not 0 <= index < len(keys):
            raise ValueError(
                f"scheduling scheme {getattr(self.scheme, '__name__', self.scheme)!r} returned "
                f"{index!r} for {len(keys)} engines; it must return an index into loads"
            )
        return keys[index]

    def add_job(self, key: Hashable) -> None:
        """``key`` was just given a task: one more outstanding, and it becomes
        the most recently used."""
        load = self._loads.pop(key) + 1
        self._loads[key] = load

    def finish_job(self, key: Hashable) -> None:
        """``key`` finished a task (no error if the engine is gone)."""
        if key in self._loads:
            self._loads[key] = max(0, self._loads[key] - 1)
