"""Engine liveness: a heartbeat monitor that knows nothing of transports.

The controller adds each registered engine with a ``ping`` callable (for
Foolscap, a ``callRemote('ping')``). Every ``period`` seconds the monitor
pings each engine that has no ping in flight; an answer marks the engine
alive. An engine is declared dead when

- a ping *fails* (the connection is gone), or
- a ping stays unanswered for ``max_missed`` heartbeats (a hung or
  SIGSTOPped process: its TCP connection stays open but nothing answers),
  so it is dead at most ``period * (max_missed + 1)`` seconds after it froze.

Misses are counted in heartbeats, not seconds: if the controller itself is
busy (say, serializing a large push) and its heartbeats run late, the engines
are not blamed for the time the controller could not listen.

Declaring an engine dead removes it from the monitor and calls
``on_dead(engine_id, reason)`` once; the controller then unregisters it.
The clock is injected, so the whole policy is unit-tested with
:class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python import log
from twisted.python.failure import Failure

from kernel.error import EngineError


class _Watched:
    """Book-keeping for one engine."""

    __slots__ = ("ping", "missed", "in_flight")

    def __init__(self, ping: Callable[[], Any]):
        self.ping = ping
        self.missed = 0
        self.in_flight = False


class HeartMonitor(service.Service):
    """Ping engines periodically and report the ones that stop answering.

    :param period: seconds between heartbeats.
    :param on_dead: called as ``on_dead(engine_id, reason)`` with a
        :class:`~twisted.python.failure.Failure` of
        :class:`~kernel.error.EngineError` when an engine is declared dead.
    :param max_missed: heartbeats an engine may miss before it is dead.
    :param clock: an ``IReactorTime`` provider (the reactor by default).
    """

    def __init__(
        self,
        period: float,
        on_dead: Callable[[int, Failure], Any],
        max_missed: int = 3,
        clock: IReactorTime | None = None,
    ):
        if period <= 0:
            raise ValueError(f"heartbeat period must be positive, got {period!r}")
        if max_missed < 1:
            raise ValueError(f"max_missed must be at least 1, got {max_missed!r}")
        if clock is None:
            from twisted.internet import reactor as clock
        self.period = period
        self.max_missed = max_missed
        self.on_dead = on_dead
        self.clock = clock
        self._engines: dict[int, _Watched] = {}
        self._loop: task.LoopingCall | None = None

    @property
    def timeout(self) -> float:
        """Seconds of silence after which an engine is declared dead, at most
        (when heartbeats run on time)."""
        return self.period * (self.max_missed + 1)

    def watched(self) -> list[int]:
        """The ids of the engines being watched, sorted."""
        return sorted(self._engines)

    def add(self, engine_id: int, ping: Callable[[], Any]) -> None:
        """Start watching ``engine_id``; ``ping()`` returns a Deferred (or a value)
        that fires when the engine answers and fails if it cannot be reached."""
        self._engines[engine_id] = _Watched(ping)

    def remove(self, engine_id: int) -> None:
        """Stop watching ``engine_id`` (no-op if it is not watched)."""
        self._engines.pop(engine_id, None)

    def beat(self, engine_id: int) -> None:
        """Record a sign of life from ``engine_id`` (any message counts)."""
        watched = self._engines.get(engine_id)
        if watched is not None:
            watched.missed = 0

    def startService(self) -> None:
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.period, now=False)

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> None:
        """One heartbeat: count a miss for each unanswered ping, declare
        engines with ``max_missed`` misses dead, ping the others."""
        for engine_id, watched in list(self._engines.items()):
            if watched.in_flight:
                watched.missed += 1
                if watched.missed >= self.max_missed:
                    self._declare_dead(
                        engine_id,
                        EngineError(
                            f"engine {engine_id} did not answer {watched.missed} heartbeats "
                            f"({self.period:g} s apart): declared dead"
                        ),
                    )
            else:
                self._ping(engine_id, watched)

    def _ping(self, engine_id: int, watched: _Watched) -> None:
        watched.in_flight = True
        d = defer.maybeDeferred(watched.ping)

        def answered(_):
            watched.in_flight = False
            watched.missed = 0

        def failed(f):
            watched.in_flight = False
            if self._engines.get(engine_id) is watched:
                self._declare_dead(
                    engine_id,
                    EngineError(f"engine {engine_id} cannot be reached: {f.getErrorMessage()}"),
                )

        d.addCallbacks(answered, failed)

    def _declare_dead(self, engine_id: int, error: EngineError) -> None:
        self._engines.pop(engine_id, None)
        try:
            self.on_dead(engine_id, Failure(error))
        except Exception:
            log.err(None, f"while handling the death of engine {engine_id}")
