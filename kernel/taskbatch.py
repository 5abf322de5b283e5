"""Client-side task submission without a round trip per task.

A :class:`TaskBatcher` sits in a task client half. It reserves blocks of
taskids from the controller
(:meth:`~kernel.interfaces.ITaskSubmission.reserve_taskids`), numbers each
submitted task itself, and sends the queued ``[taskid, flags, payload]``
specs in batches (:meth:`~kernel.interfaces.ITaskSubmission.run_batch`):

- :meth:`TaskBatcher.try_submit` numbers and queues a spec at once, from any
  thread, while reserved ids remain; the blocking client calls it from the
  caller's thread, so ``run()`` does not wait for the reactor at all;
- :meth:`TaskBatcher.submit` (reactor thread) also waits for a block when
  none is left;
- queued specs go out at the end of the reactor turn, in batches of at most
  :attr:`TaskBatcher.batch_size` specs or :attr:`TaskBatcher.batch_bytes`
  payload bytes; the next block is reserved once half of the ids are used,
  so submitting never waits for the controller in steady state;
- :meth:`TaskBatcher.settle` flushes, and waits until the batches sent so
  far are acknowledged: the client makes its other calls after that, so they
  see every task submitted before them. A small batch (under
  :attr:`TaskBatcher.ordered_bytes`) need not be waited for: the transports
  deliver calls on a connection in order, and the controller takes a batch
  as soon as it arrives, so a call sent after it finds its tasks;
- a spec the controller refused, or a batch lost with its connection, is
  remembered (:meth:`TaskBatcher.failure`) as the task's error;
- while a batch is unacknowledged, reactor shutdown (e.g. a script's
  exit) waits for it, at most :attr:`TaskBatcher.shutdown_timeout` seconds,
  so tasks ``run()`` returned ids for are not dropped on the way out.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import log, threadable
from twisted.python.failure import Failure

from kernel.error import ConnectionError, TaskError

__all__ = ["TaskBatcher"]


class TaskBatcher:
    """Numbers tasks from reserved taskid blocks and sends them in batches.

    Only :meth:`try_submit` may be called outside the reactor thread.

    :param reserve: ``reserve(count)`` -> Deferred firing ``[start, stop]``
        (the client half's ``reserve_taskids``).
    :param send: ``send(specs)`` -> Deferred firing ``[[taskid, exception],
        ...]`` for refused specs (the client half's ``run_batch``).
    :param reactor: the reactor (default: the global one).
    """

    #: Taskids reserved per request.
    block_size = 1024
    #: Most specs in one batch.
    batch_size = 256
    #: Payload bytes after which a batch is closed.
    batch_bytes = 4 * 2**20
    #: Payload bytes below which a batch reaches the controller before any
    #: call sent after it (no transport splits so small a message).
    ordered_bytes = 256 * 1024
    #: Longest wait at reactor shutdown for unacknowledged batches, seconds.
    shutdown_timeout = 10.0

    def __init__(
        self,
        reserve: Callable[[int], defer.Deferred],
        send: Callable[[list], defer.Deferred],
        reactor: Any = None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._reserve = reserve
        self._send = send
        self._lock = threading.Lock()
        # guarded by the lock:
        self._blocks: collections.deque[list[int]] = collections.deque()  # [next, stop]
        self._available = 0
        self._queue: list[list[Any]] = []
        self._scheduled = False
        self._want_block = False
        # reactor thread only:
        self._reserving = False
        self._block_waiters: list[defer.Deferred] = []
        self._serials = itertools.count()
        self._unacked: dict[int, list[defer.Deferred]] = {}
        self._large: set[int] = set()  # unacknowledged batches not known to arrive in order
        self._failures: dict[int, BaseException] = {}
        self._shutdown_trigger: Any = None

    def __repr__(self) -> str:
        return f"<TaskBatcher {self._available} ids left, {len(self._queue)} queued>"

    # -- submitting ------------------------------------------------------------

    def try_submit(self, flags: dict[str, Any], payload: Any) -> int | None:
        """Number and queue a checked spec if a reserved taskid is left (any thread).

        :returns: the taskid, or None when no reserved id is left (then
            call :meth:`submit` in the reactor thread).
        """
        with self._lock:
            if not self._blocks:
                self._want_block = True
                return None
            block = self._blocks[0]
            taskid = block[0]
            block[0] += 1
            if block[0] == block[1]:
                self._blocks.popleft()
            self._available -= 1
            if self._available < self.block_size // 2:
                self._want_block = True
            self._queue.append([taskid, flags, payload])
            if self._scheduled:
                return taskid
            self._scheduled = True
        if threadable.isInIOThread():
            self._reactor.callLater(0, self._service)
        else:
            self._reactor.callFromThread(self._service)
        return taskid

    def submit(self, flags: dict[str, Any], payload: Any) -> defer.Deferred:
        """Number and queue a checked spec, reserving ids first if none is
        left (reactor thread). Fires the taskid.

        :raises: (errback) what reserving ids failed with, e.g.
            :class:`~kernel.error.ConnectionError`.
        """
        taskid = self.try_submit(flags, payload)
        if taskid is not None:
            return defer.succeed(taskid)
        d = self._wait_for_block()
        d.addCallback(lambda _: self.submit(flags, payload))
        return d

    # -- ids -------------------------------------------------------------------

    def _wait_for_block(self) -> defer.Deferred:
        """Fire None once a new block of ids has arrived."""
        waiter: defer.Deferred = defer.Deferred()
        self._block_waiters.append(waiter)
        if not self._reserving:
            self._reserving = True
            defer.maybeDeferred(self._reserve, self.block_size).addBoth(self._got_block)
        return waiter

    def _got_block(self, result: Any) -> None:
        self._reserving = False
        waiters, self._block_waiters = self._block_waiters, []
        if not isinstance(result, Failure):
            try:
                start, stop = (int(x) for x in result)
                if stop <= start:
                    raise ValueError(result)
            except (TypeError, ValueError):
                result = Failure(TaskError(f"the controller granted a malformed block {result!r}"))
            else:
                with self._lock:
                    self._blocks.append([start, stop])
                    self._available += stop - start
                    if self._available >= self.block_size // 2:
                        self._want_block = False
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def _prefetch(self) -> None:
        if self._reserving:
            return
        self._wait_for_block().addErrback(self._prefetch_failed)

    def _prefetch_failed(self, f: Failure) -> None:
        # The next submit that needs ids reserves again and reports the error.
        if not f.check(ConnectionError):
            log.err(f, "reserving task ids")

    # -- sending ---------------------------------------------------------------

    def _service(self) -> None:
        with self._lock:
            self._scheduled = False
            want_block = self._want_block
        self.flush()
        if want_block:
            self._prefetch()

    def flush(self) -> None:
        """Send every queued spec now, in batches (reactor thread)."""
        with self._lock:
            queue, self._queue = self._queue, []
        batch: list[list[Any]] = []
        size = 0
        for spec in queue:
            batch.append(spec)
            size += getattr(spec[2], "nbytes", 0)
            if len(batch) >= self.batch_size or size >= self.batch_bytes:
                self._send_batch(batch, size)
                batch, size = [], 0
        if batch:
            self._send_batch(batch, size)

    def _send_batch(self, batch: list[list[Any]], size: int) -> None:
        serial = next(self._serials)
        self._unacked[serial] = []
        if size >= self.ordered_bytes:
            self._large.add(serial)
        add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
        if self._shutdown_trigger is None and add_trigger is not None:
            self._shutdown_trigger = add_trigger("before", "shutdown", self._at_shutdown)
        d = defer.maybeDeferred(self._send, batch)
        d.addCallbacks(self._acked, self._lost, errbackArgs=(batch,))
        d.addErrback(log.err, "handling a task batch reply")
        d.addBoth(self._settled, serial)

    def _acked(self, refused: Any) -> None:
        for taskid, error in refused:
            self._failures[taskid] = error

    def _lost(self, f: Failure, batch: list[list[Any]]) -> None:
        kind = ConnectionError if f.check(ConnectionError) else TaskError
        for taskid, _, _ in batch:
            self._failures[taskid] = kind(
                f"task {taskid} never reached the controller: {f.getErrorMessage()}. "
                "Submit it again (with a new client if the connection was lost)."
            )

    def _settled(self, _: Any, serial: int) -> None:
        self._large.discard(serial)
        for waiter in self._unacked.pop(serial):
            waiter.callback(None)
        if not self._unacked and self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None

    def _at_shutdown(self) -> defer.Deferred:
        self._shutdown_trigger = None  # the reactor drops its triggers as it runs them
        d = self.settle(acknowledged=True)
        d.addTimeout(self.shutdown_timeout, self._reactor)
        return d.addErrback(lambda _: None)

    def settle(self, acknowledged: bool = False) -> defer.Deferred:
        """Flush, then fire None once a call sent next is sure to reach the
        controller after every batch sent so far (reactor thread).

        :param acknowledged: wait until every batch sent so far has been
            acknowledged or lost (so :meth:`failure` knows its refusals),
            not only the large ones.
        """
        self.flush()
        pending = self._unacked if acknowledged else self._large
        if not pending:
            return defer.succeed(None)
        waits = []
        for serial in pending:
            waiters = self._unacked[serial]
            waiter: defer.Deferred = defer.Deferred()
            waiters.append(waiter)
            waits.append(waiter)
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- failures --------------------------------------------------------------

    def failure(self, taskid: Any) -> BaseException | None:
        """The error of a task the controller never took (refused, or its
        batch lost), else None."""
        return self._failures.get(taskid)

    def forget(self, taskids: Any = None) -> None:
        """Drop the remembered errors of ``taskids`` (all when None)."""
        if taskids is None:
            self._failures.clear()
            return
        for taskid in taskids:
            self._failures.pop(taskid, None)
