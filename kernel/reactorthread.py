"""The reactor thread behind the blocking clients.

Blocking clients (:mod:`kernel.client`) are plain synchronous objects, but
every network conversation happens in Twisted's reactor. This module runs the
global reactor in one daemon thread, started the first time a blocking call
needs it (never on import), and hands work to it with :func:`blocking_call`.

- If the reactor already runs in another thread (for example a program that
  started it itself), that reactor is used and no thread is started.
- Calling a blocking method *on* the reactor thread would wait for the
  reactor to do something while stopping it from doing anything; instead it
  raises :class:`~kernel.error.ClientError` saying what to use instead.
- Every call is thread-safe: any number of threads may block at once.
- At interpreter exit the reactor thread is stopped so connections close
  cleanly.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import threadable
from twisted.python.failure import Failure

from kernel.error import ClientError

__all__ = [
    "Call",
    "blocking_call",
    "submit",
    "ensure_running",
    "in_reactor_thread",
    "is_running",
    "stop",
    "STARTUP_TIMEOUT",
]

#: Seconds to wait for a freshly started reactor thread to come up.
STARTUP_TIMEOUT = 30.0

#: Seconds to wait for the reactor thread to stop at exit.
SHUTDOWN_TIMEOUT = 5.0

_lock = threading.Lock()
_thread: threading.Thread | None = None
_atexit_registered = False


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def in_reactor_thread() -> bool:
    """Is the calling thread the one running the reactor?"""
    return _reactor().running and threadable.isInIOThread()


def is_running() -> bool:
    """Does the reactor run (in this module's thread or elsewhere)?"""
    return bool(_reactor().running)


def ensure_running() -> None:
    """Start the reactor in a daemon thread unless it already runs.

    :raises ClientError: the reactor ran in this process before and was
        stopped (a Twisted reactor cannot be restarted), or it did not come up
        within :data:`STARTUP_TIMEOUT` seconds.
    """
    global _thread, _atexit_registered
    reactor = _reactor()
    if reactor.running:
        return
    with _lock:
        if reactor.running:
            return
        if _thread is not None and _thread.is_alive():
            started = None  # another caller started it; wait below
        else:
            if getattr(reactor, "_startedBefore", False):
                raise ClientError(
                    "the Twisted reactor of this process has already been stopped and "
                    "cannot be restarted: blocking clients need a new Python process"
                )
            started = threading.Event()
            reactor.callWhenRunning(started.set)
            _thread = threading.Thread(
                target=_run_reactor, args=(reactor,), name="txkernel-reactor", daemon=True
            )
            _thread.start()
            if not _atexit_registered:
                atexit.register(stop)
                _atexit_registered = True
    if started is not None:
        if not started.wait(STARTUP_TIMEOUT):
            raise ClientError(
                f"the reactor thread did not start within {STARTUP_TIMEOUT:.0f} s; "
                "check that nothing else in this process holds the reactor"
            )
    else:
        _wait_until_running(reactor)


def _wait_until_running(reactor: Any) -> None:
    waited = 0.0
    while not reactor.running:
        if waited >= STARTUP_TIMEOUT:
            raise ClientError(f"the reactor thread did not start within {STARTUP_TIMEOUT:.0f} s")
        threading.Event().wait(0.01)
        waited += 0.01


def _run_reactor(reactor: Any) -> None:
    # Signal handlers can only be installed from the main thread.
    reactor.run(installSignalHandlers=False)


def stop() -> None:
    """Stop the reactor thread started by this module (if any) and wait for it.

    Called at interpreter exit; after it, blocking clients no longer work in
    this process.
    """
    global _thread
    thread = _thread
    if thread is None or not thread.is_alive():
        return
    reactor = _reactor()
    if reactor.running:
        reactor.callFromThread(reactor.stop)
    thread.join(SHUTDOWN_TIMEOUT)


class Call:
    """A call handed to the reactor thread by :func:`submit`."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._box: list[Any] = []

    def _fired(self, result: Any) -> None:
        self._box.append(result)
        self._done.set()

    def done(self) -> bool:
        """Has the call finished?"""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (None: until it finishes).

        :returns: whether the call has finished.
        """
        return self._done.wait(timeout)

    def result(self) -> Any:
        """Wait for the call to finish and return its result.

        :raises Exception: what the call raised, or its Deferred failed with.
        """
        self._done.wait()
        result = self._box[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result


def submit(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
    """Start ``f(*args, **kwargs)`` in the reactor thread without waiting.

    If ``f`` returns a Deferred, the :class:`Call` finishes when it fires.
    The reactor thread is started first if need be.

    :raises ClientError: when called from the reactor thread itself.
    """
    if in_reactor_thread():
        name = getattr(f, "__qualname__", repr(f))
        raise ClientError(
            f"blocking call {name}() made from the reactor thread, where waiting would "
            "deadlock: in Twisted code use the asynchronous clients of kernel.asyncclient "
            "(they return Deferreds), or make blocking calls from another thread, "
            "e.g. with twisted.internet.threads.deferToThread"
        )
    ensure_running()
    call = Call()

    def run() -> None:
        defer.maybeDeferred(f, *args, **kwargs).addBoth(call._fired)

    _reactor().callFromThread(run)
    return call


def blocking_call(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``f(*args, **kwargs)`` in the reactor thread and wait for its result.

    If ``f`` returns a Deferred, wait for it to fire. The reactor thread is
    started first if need be.

    :returns: ``f``'s result (or what its Deferred fires with).
    :raises ClientError: when called from the reactor thread itself.
    :raises Exception: whatever ``f`` raises, or its Deferred fails with.
    """
    return submit(f, *args, **kwargs).result()
