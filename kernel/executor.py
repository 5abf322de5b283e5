"""One dedicated thread that runs an engine's commands, in order.

The reactor thread submits callables and gets Deferreds back; results return
through ``reactor.callFromThread``. A running callable can be interrupted:
:meth:`ThreadExecutor.interrupt` raises ``KeyboardInterrupt`` in the thread
with ``PyThreadState_SetAsyncExc``. Python checks for such an exception
between bytecodes, so a thread blocked in one long C call (``time.sleep``,
a blocking ``socket.recv``, a long NumPy operation) is interrupted only when
that call returns.

Work can be sent ahead: a callable submitted with ``revocable=True`` can be
taken back (:meth:`ThreadExecutor.revoke`) until it starts, so the thread
goes from one to the next without waiting for the reactor thread. A
callable may :meth:`~ThreadExecutor.pause` the thread after it, until the
reactor thread releases it (e.g. once its result, which views live memory,
has been written).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python import log
from twisted.python.failure import Failure

_STOP = object()


def _set_async_exc(ident: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in thread ``ident`` (None clears a pending one)."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None
    )


class ExecutorStopped(Exception):
    """Work was submitted to, or left queued in, a stopped executor."""


class ThreadExecutor:
    """Runs submitted callables one at a time on its own thread.

    The thread starts with the first submission and is a daemon thread, so a
    command stuck in C code cannot keep the process alive.
    """

    def __init__(
        self,
        name: str = "txkernel-executor",
        reactor=None,
        on_start: Callable[[], None] | None = None,
        on_exit: Callable[[], None] | None = None,
    ):
        """
        :param name: the thread's name.
        :param reactor: the reactor results are delivered through.
        :param on_start: called on the new thread before its first command.
        :param on_exit: called on the reactor thread once the thread has exited.
        """
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.name = name
        self._on_start = on_start
        self._on_exit = on_exit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running = False  # a submitted callable is executing now
        self._interrupted = False  # an interrupt was sent to the running callable
        self._stopping = False
        self._exited = False
        self._exit_waiters: list[Deferred] = []
        #: Results whose Deferreds may fire late (see :meth:`submit`), in order.
        self._waiting: list[tuple[Deferred, Any]] = []
        self._urgent = False
        self._waiting_lock = threading.Lock()
        # revocable callables not started yet, and those taken back (by Deferred)
        self._revocable: set[Deferred] = set()
        self._revoked: set[Deferred] = set()
        self._current: Deferred | None = None  # the Deferred of the running callable
        self._gate: threading.Event | None = None  # set by pause()

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread, or None before the first submission."""
        return self._thread

    @property
    def busy(self) -> bool:
        """True while a submitted callable is executing."""
        return self._running

    def submit(
        self,
        fn: Callable[[], Any],
        on_done: Callable[[Any], Any] | None = None,
        revocable: bool = False,
    ) -> Deferred:
        """Queue ``fn`` to run on the thread.

        :param on_done: called on the thread with ``fn()``'s return value
            (only if it returned), before the Deferred is handed to the
            reactor thread: it may act on the value at once (an engine sends
            a command's reply from there). If it returns True, nothing
            needs the Deferred to fire soon: unless :meth:`set_urgent` says
            otherwise, the reactor thread is not woken for it, and it fires
            at the next :meth:`deliver_waiting` (or with the next result that
            wakes the reactor thread, in order). The Deferred may also fire
            (from :meth:`deliver_waiting`) while ``on_done`` runs, so both
            must agree on who acts (see :class:`kernel.nativeproto.ThreadReply`).
            What it raises is logged.
        :param revocable: :meth:`revoke` may take ``fn`` back until it starts.
        :returns: a Deferred firing with ``fn()``'s return value, or failing
            with what it raised (:class:`ExecutorStopped` if the executor
            stops before ``fn`` runs).
        """
        d: Deferred = Deferred()
        if self._stopping:
            d.errback(Failure(ExecutorStopped(f"{self.name} has stopped")))
            return d
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        if revocable:
            with self._lock:
                self._revocable.add(d)
        self._queue.put((fn, d, on_done))
        return d

    def revoke(self, d: Deferred) -> bool:
        """Take back the callable submitted with ``revocable=True`` whose
        Deferred is ``d``, if it has not started.

        :returns: True if it will never run (``d`` is left unfired: the
            caller decides what it means); False if it has started (or
            finished, or was not revocable).
        """
        with self._lock:
            if d not in self._revocable:
                return False
            self._revocable.discard(d)
            self._revoked.add(d)
            return True

    def is_running(self, d: Deferred) -> bool:
        """Is the callable whose Deferred is ``d`` executing now?"""
        with self._lock:
            return self._running and self._current is d

    def pause(self) -> Callable[[], None]:
        """Start nothing after the running callable until the returned
        function is called (from any thread). Call it from the running
        callable; :meth:`stop` releases the pause too."""
        gate = self._gate = threading.Event()
        return gate.set

    def deliver_waiting(self) -> None:
        """Fire, in order, the Deferreds of the results that were left to
        fire late (see :meth:`submit`). Reactor thread."""
        with self._waiting_lock:
            waiting, self._waiting = self._waiting, []
        for d, value in waiting:
            d.callback(value)

    def set_urgent(self, urgent: bool) -> None:
        """Say whether the reactor thread needs every result at once (for
        example: more work waits for the running callable to end). Setting
        it also fires the results that waited. Reactor thread."""
        with self._waiting_lock:
            self._urgent = urgent
            if not self._waiting:
                return
        self.deliver_waiting()

    def interrupt(self, only: Deferred | None = None) -> bool:
        """Raise ``KeyboardInterrupt`` in the running callable.

        At most one interrupt is sent per callable.

        :param only: interrupt only the callable whose Deferred this is.
        :returns: True if a callable was running and has been sent the
            interrupt, False if the thread was idle (or ran another one).
        """
        with self._lock:
            if not self._running or self._interrupted or self._thread is None:
                return False
            if only is not None and self._current is not only:
                return False
            self._interrupted = True
            _set_async_exc(self._thread.ident, KeyboardInterrupt)
            return True

    def stop(self, reason: BaseException | None = None) -> list[Deferred]:
        """Stop after the running callable; queued callables do not run.

        :param reason: what the queued callables' Deferreds fail with
            (default :class:`ExecutorStopped`).
        :returns: the Deferreds of the callables that were dropped (already
            failed).
        """
        if self._stopping:
            return []
        self._stopping = True
        dropped = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                if item[1] in self._revoked:
                    self._revoked.discard(item[1])
                    continue  # taken back: not ours to fail
                self._revocable.discard(item[1])
            dropped.append(item[1])
        self._queue.put(_STOP)
        if self._gate is not None:
            self._gate.set()
        if self._thread is None:
            self._exit()
        for d in dropped:
            d.errback(Failure(reason or ExecutorStopped(f"{self.name} has stopped")))
        return dropped

    def when_stopped(self) -> Deferred:
        """A Deferred firing None once the thread has exited after :meth:`stop`."""
        d: Deferred = Deferred()
        if self._exited:
            d.callback(None)
        else:
            self._exit_waiters.append(d)
        return d

    # -- the worker thread ------------------------------------------------

    def _loop(self) -> None:
        if self._on_start is not None:
            self._on_start()
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                gate = self._gate
                if gate is not None:
                    gate.wait()
                    self._gate = None
                fn, d, on_done = item
                outcome = self._call(fn, d)
                if outcome is None:
                    continue  # revoked: it does not run
                ok, value = outcome
                if ok and on_done is not None:
                    # Waiting before on_done acts, so that whatever the
                    # reactor thread does once on_done's effect is seen
                    # (the next call) finds this result there.
                    with self._waiting_lock:
                        may_wait = not self._urgent
                        if may_wait:
                            self._waiting.append((d, value))
                    done = self._done(on_done, value)
                    if may_wait:
                        if not done:
                            # It waits already: the reactor thread must end it now.
                            self._reactor.callFromThread(self.deliver_waiting)
                        continue
                self._reactor.callFromThread(self._deliver, d, ok, value)
        finally:
            self._reactor.callFromThread(self._exit)

    def _done(self, on_done: Callable[[Any], Any], value: Any) -> bool:
        try:
            return on_done(value) is True
        except Exception:
            log.err(None, f"{self.name}: a callable's on_done hook failed")
            return False

    def _call(self, fn: Callable[[], Any], d: Deferred) -> tuple[bool, Any] | None:
        # An interrupt can only be sent while _running is set, and _disarm
        # clears both the flag and any not-yet-delivered interrupt under the
        # lock, so no KeyboardInterrupt escapes past this method.
        # None: fn was revoked, and does not run.
        try:
            with self._lock:
                if self._revocable or self._revoked:
                    if d in self._revoked:
                        self._revoked.discard(d)
                        return None
                    self._revocable.discard(d)
                self._running = True
                self._interrupted = False
                self._current = d
            try:
                value = fn()
            finally:
                self._disarm()
            return True, value
        except BaseException:
            self._disarm()
            f = Failure()
            f.cleanFailure()
            return False, f

    def _disarm(self) -> None:
        with self._lock:
            if self._running and self._interrupted:
                _set_async_exc(threading.get_ident(), None)
            self._running = False
            self._current = None

    # -- the reactor thread -----------------------------------------------

    def _deliver(self, d: Deferred, ok: bool, value: Any) -> None:
        if self._waiting:
            self.deliver_waiting()  # (results that waited come first)
        if ok:
            d.callback(value)
        else:
            d.errback(value)

    def _exit(self) -> None:
        if self._exited:
            return
        self.deliver_waiting()
        self._exited = True
        if self._thread is not None and self._thread is not threading.current_thread():
            # The thread called us as its last act; let it finish returning.
            self._thread.join(1.0)
        if self._on_exit is not None:
            self._on_exit()
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(None)
