"""Engines over the native transport: registration and remote use.

The engine side of the native adapter is the Foolscap adapter's
(:mod:`kernel.engineremote`, which imports no Foolscap), carried over
:mod:`kernel.nativeproto` (the same pieces and envelopes; no second copy of
their logic). Only the data methods differ: over Foolscap a
:class:`~kernel.serialized.Serialized` travels as one joined blob
(:meth:`~kernel.serialized.Serialized.to_bytes`), while the native wire
carries its frames as they are, so a pushed array crosses without being
joined, and lands in the engine's namespace in the buffer it was received in.

- Engine process: :class:`NativeEngineConnector` keeps the engine registered
  (:class:`kernel.engineremote.EngineConnector`: register, ask for the previous id
  after a reconnection, exponential backoff, give up on a
  :class:`~kernel.error.SecurityError`), reaching the controller through a
  :class:`NativeControllerLocator` with the cluster key of ``native.json``.
  The engine is exposed as :class:`NativeEngineReferenceFromService`. A
  large pulled value (or task result) is replied from its own memory, not
  copied: the engine's queue starts nothing else until the reply is written
  (see :class:`_Lender`). A small reply to ``execute`` or ``run_task``
  leaves from the engine's executor thread as the command ends
  (:class:`~kernel.nativeproto.ThreadReply`), unless the command wrote
  output (which goes first, through the reactor thread); the reactor thread
  is not woken for it while no other command waits, and ends it when the
  next call comes. Tasks sent ahead wait on the engine thread itself
  (:meth:`~kernel.engineservice.EngineService.run_task_ahead`), which runs
  them back to back; a command, an abort or a hold takes back those that
  have not started (see :class:`_EngineSideQueue`).
- Controller process: :class:`NativeEngineRegistrar` registers each engine as
  ``PipelinedEngine(NativeEngineFromReference(reference), max_in_flight=PIPELINE)``:
  up to :data:`PIPELINE` commands are sent ahead to each engine, which runs
  them in order from a queue of its own, so the next command is already there
  when one ends (``queue_status`` and ``clear_queue`` keep their meaning).
  Lost connections and missed heartbeats unregister the engine as with
  Foolscap. An ``execute`` or ``apply`` made for a client's multiengine
  call gets its reply unread (:class:`~kernel.nativeproto.Verbatim`), to
  be passed on to the client as it came.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import nativeproto
from kernel.engineremote import (
    EngineConnector,
    EngineFromReference,
    EngineReferenceFromService,
    EngineRegistrar,
    _open,
)
from kernel.engineservice import (
    FINISHED,
    INTERRUPTED,
    RUNNING,
    WITHDRAWN,
    QueuedEngine,
    _Command,
)
from kernel.envelope import package_success
from kernel.error import ConnectionError
from kernel.interfaces import IEngineBase, IEngineInterrupt, IEngineTaskQueue
from kernel.serialized import Serialized

__all__ = [
    "PIPELINE",
    "REGISTRAR",
    "NativeEngineReferenceFromService",
    "NativeEngineFromReference",
    "NativeEngineRegistrar",
    "NativeControllerLocator",
    "NativeEngineConnector",
]

#: Commands and tasks in flight per engine (sent ahead; the engine runs them
#: in order): one more than the task controller sends an engine running short
#: tasks (:data:`kernel.taskcontroller.DEFAULT_SHORT_PIPELINE`), as tasks
#: leave one slot free for a command.
PIPELINE = 17
#: A reply viewing at least this many bytes of live objects is sent from
#: their memory, holding the engine's queue meanwhile; a smaller one is copied.
LEND_BYTES = 1 << 20
#: Tasks on an engine's thread at once (the running one and those sent ahead).
ENGINE_THREAD_TASKS = 16
#: How often an engine that has never registered looks for its controller, seconds.
STARTUP_POLL = 0.01
#: For how long after it starts an engine looks that often, seconds.
STARTUP_WINDOW = 10.0
#: The service name of the engine registrar on a native controller.
REGISTRAR = "registrar"


def _owned(s: Serialized) -> Serialized:
    """``s`` with buffers that share no memory with live objects (copies of
    those that are not ``bytes``)."""
    if all(type(b) is bytes for b in s.buffers):
        return s
    return Serialized(s.data, [b if type(b) is bytes else bytes(b) for b in s.buffers])


def _lent_bytes(blobs: list[Serialized]) -> int:
    """Bytes of the blobs' buffers that view live objects' memory."""
    return sum(memoryview(b).nbytes for s in blobs for b in s.buffers if type(b) is not bytes)


class _Lender:
    """Sends a reply that views live objects (a pulled value, a task's result)
    without copying it, if it is large.

    The engine may run the next command (sent ahead, see
    :class:`PipelinedEngine`) as soon as one ends, and that command could
    change the value while its reply is still being written. A reply with
    less than :data:`LEND_BYTES` of such memory is copied (cheap); a larger
    one holds the engine's queue until the reply has left that memory
    (:class:`kernel.nativeproto.AfterWritten`), and goes out as it is.

    :param queue: the engine-side queue to hold.
    """

    __slots__ = ("queue", "release", "paused", "finished")

    def __init__(self, queue: _EngineSideQueue):
        self.queue = queue
        self.release: Callable[[], None] | None = None
        self.paused: Callable[[], None] | None = None  # resumes the engine thread
        self.finished = False

    def lend(self, blobs: list[Serialized]) -> list[Serialized]:
        """The blobs to reply with (runs as the command ends, before the queue
        starts the next one)."""
        if _lent_bytes(blobs) < LEND_BYTES:
            return [_owned(s) for s in blobs]
        self.release = self.queue.hold()
        return blobs

    def finish_task(self, result: dict) -> dict:
        """On the engine thread, as a task sent ahead ends (before the next
        one starts there): copy a small result; for a large one, pause the
        engine thread until the reply is written."""
        self.finished = True
        blob = result["result"]
        if _lent_bytes([blob]) < LEND_BYTES:
            result["result"] = _owned(blob)
        else:
            self.paused = self.queue.engine.pause_engine_thread()
        return result

    def task_result(self, result: dict) -> dict:
        """The result dict to reply with (reactor thread)."""
        if not self.finished:  # (not sent ahead: lend it here)
            return dict(result, result=self.lend([result["result"]])[0])
        if self.paused is not None:
            hold, resume = self.queue.hold(), self.paused
            self.paused = None

            def release() -> None:
                resume()
                hold()

            self.release = release
        return result

    def reply(self, reply: Any) -> Any:
        """The reply, wrapped so the queue is released once it is written."""
        release, self.release = self.release, None
        if release is None:
            release, self.paused = self.paused, None
        if release is None:
            return reply
        if isinstance(reply, Failure):
            release()
            return reply
        return nativeproto.AfterWritten(reply, release)


class _EngineSideQueue(QueuedEngine):
    """The engine process's own FIFO of the commands sent ahead to it, so
    that ``clear_queue`` can still drop those that have not started.

    Tasks go on to the engine thread while no command waits or runs (up to
    :data:`ENGINE_THREAD_TASKS` there), so it starts the next as soon as one
    ends. A command that comes takes back those that have not started
    (:meth:`~kernel.engineservice.EngineService.withdraw_task`), so it
    waits for the running one only; :meth:`abort_task` withdraws a task
    there that has not started, and interrupts it only while it is the one
    running.

    :meth:`hold` keeps the next command from starting (see :class:`_Lender`).
    """

    def __init__(self, engine: Any):
        super().__init__(engine)
        self._holds = 0
        #: the engine takes tasks ahead on its thread
        self._ahead = callable(getattr(engine, "run_task_ahead", None))

    def hold(self) -> Callable[[], None]:
        """Start no command until the returned function is called (once)."""
        self._holds += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._holds -= 1
                self._pump()

        return release

    def _pump(self) -> None:
        if not self._holds:
            super()._pump()
        # A command that waits here needs the running one's end at once;
        # otherwise a command whose reply left from the engine thread may
        # end here later (see NativeEngineReferenceFromService._call).
        set_urgent = getattr(self.engine, "set_urgent", None)
        if set_urgent is not None:
            set_urgent(bool(self._queue or self._tasks))

    def execute(self, lines: str, on_done: Callable[[dict], Any] | None = None) -> defer.Deferred:
        """Queue ``execute``; ``on_done`` as for :meth:`EngineService.execute`."""
        extra = None if on_done is None else {"on_done": on_done}
        return self._enqueue_command(_Command("execute", (lines,), {}, extra=extra))

    def _next(self) -> _Command | None:
        if not self._ahead:
            return super()._next()
        if self._holds or self.is_lost:
            return None
        in_flight = self._in_flight
        if self._queue:
            if in_flight:
                self._take_back()
                if in_flight:
                    return None  # after the one running
            return self._queue.popleft()
        if (
            self._tasks
            and len(in_flight) < ENGINE_THREAD_TASKS
            and (not in_flight or in_flight[0].is_task)
        ):
            return self._tasks.popleft()
        return None

    def _take_back(self) -> None:
        """Take back the tasks on the engine thread behind the oldest that
        have not started (newest first), to wait here again in their order.
        (The oldest counts as running, as on an engine without this queue.)"""
        in_flight = self._in_flight
        while len(in_flight) > 1:
            cmd = in_flight[-1]
            if not (cmd.is_task and cmd.sent is not None and self.engine.withdraw_task(cmd.sent)):
                return
            in_flight.pop()
            cmd.sent = None
            self._tasks.appendleft(cmd)

    def _start(self, cmd: _Command) -> defer.Deferred:
        if not (cmd.is_task and self._ahead):
            return super()._start(cmd)
        return self.engine.run_task_ahead(*cmd.args, **cmd.kwargs, **(cmd.extra or {}))

    def run_task(
        self,
        payload: Serialized,
        clear_before: bool = False,
        clear_after: bool = False,
        key: str | None = None,
        finish: Callable[[dict], dict] | None = None,
        on_done: Callable[[dict], Any] | None = None,
    ) -> defer.Deferred:
        """Queue a task (see :meth:`QueuedEngine.run_task`).

        :param finish: passed to
            :meth:`~kernel.engineservice.EngineService.run_task_ahead`
            (unused by an engine without it).
        :param on_done: as for :meth:`EngineService.run_task`.
        """
        kwargs = {"clear_before": clear_before, "clear_after": clear_after}
        extra = {"finish": finish} if finish is not None and self._ahead else {}
        if on_done is not None:
            extra["on_done"] = on_done
        return self._enqueue_task(_Command("run_task", (payload,), kwargs, key, extra or None))

    def abort_task(self, key: str, interrupt: bool = True) -> defer.Deferred:
        """Withdraw the task ``key`` if it has not started (here or on the
        engine thread); interrupt it if it runs and ``interrupt``."""
        if self._ahead and key is not None and not self.is_lost:
            for cmd in self._in_flight:
                if cmd.key == key and cmd.sent is not None:
                    if self.engine.withdraw_task(cmd.sent):
                        self._in_flight.remove(cmd)
                        self._withdrawn(cmd)
                        self._pump()
                        return defer.succeed(WITHDRAWN)
                    if not interrupt:
                        return defer.succeed(RUNNING)
                    interrupted = self.engine.interrupt_task(cmd.sent)
                    return defer.succeed(INTERRUPTED if interrupted else FINISHED)
        return super().abort_task(key, interrupt)

    def queue_status(self) -> defer.Deferred:
        """As :meth:`QueuedEngine.queue_status`, the tasks on the engine
        thread behind the running one counted as waiting."""
        if not self._ahead or self.is_lost:
            return super().queue_status()
        in_flight = self._in_flight
        return defer.succeed(
            {
                "queue": [cmd.description for cmd in self._queue]
                + [cmd.description for cmd in in_flight[1:]]
                + [cmd.description for cmd in self._tasks],
                "pending": in_flight[0].description if in_flight else None,
            }
        )

    def add_output_observer(self, observer: Callable[[str, str], Any]) -> None:
        self.engine.add_output_observer(observer)

    def remove_output_observer(self, observer: Callable[[str, str], Any]) -> None:
        self.engine.remove_output_observer(observer)


class NativeEngineReferenceFromService(EngineReferenceFromService):
    """Expose an engine to a controller over the native transport (engine
    process): :class:`kernel.engineremote.EngineReferenceFromService` with
    Serialized blobs passed as they arrive, and the commands the controller
    sends ahead waiting in a queue here (see :class:`PipelinedEngine`).

    :param engine: the engine service.
    :param on_kill: as for the Foolscap class.
    """

    #: Remote methods beyond the ``RIEngine`` schema.
    native_remote_methods = ("clear_queue", "queue_status", "abort_task")

    def __init__(self, engine: Any, on_kill: Callable[[], Any] | None = None):
        super().__init__(_EngineSideQueue(engine), on_kill=on_kill)
        self.service = engine

    def _reply_from_thread(
        self, thread_reply: nativeproto.ThreadReply | None
    ) -> Callable[[dict], bool] | None:
        """The ``on_done`` of a command whose reply may leave from the
        engine's thread as soon as it ends (see :class:`~kernel.nativeproto.ThreadReply`):
        when the command wrote no output and no output waits to be sent
        (output goes before the reply, through the reactor thread), the
        reply envelope is sent from there, and the command may end here
        later (:meth:`_call` ends it before the next call acts); else (or
        if the reply is not a small frame) it goes the usual way."""
        if thread_reply is None:
            return None
        pending = getattr(self.service, "output_pending", None)

        def on_done(result: dict) -> bool:  # on the engine thread
            if result.get("stdout") or result.get("stderr"):
                return False
            # (in this order: output leaves the engine service before it
            # reaches the chunks waiting here)
            if pending is not None and pending():
                return False
            if self._chunks or self._flush_call is not None:
                return False
            return thread_reply.send(package_success(result))

        return on_done

    def remote_execute(self, lines, thread_reply=None):
        on_done = self._reply_from_thread(thread_reply)
        return self._call("execute", lines, **({} if on_done is None else {"on_done": on_done}))

    def remote_clear_queue(self):
        return self._call("clear_queue")

    def remote_queue_status(self):
        return self._call("queue_status")

    def remote_abort_task(self, key, interrupt=True):
        if not isinstance(key, str):
            key = None  # no such task
        return self._call("abort_task", key, interrupt=bool(interrupt))

    def _call(self, method: str, *args: Any, convert: Callable | None = None, **kwargs: Any):
        # Commands that ended with their replies sent from the engine thread
        # end here first, so that this call finds the queue as it is.
        deliver_waiting = getattr(self.service, "deliver_waiting", None)
        if deliver_waiting is not None:
            deliver_waiting()
        d = super()._call(method, *args, convert=convert, **kwargs)
        d.addBoth(self._output_first)
        return d

    def _output_first(self, reply: Any) -> Any:
        # Send the output a command wrote before its reply (same connection,
        # so it reaches the controller, and the client, first).
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush()
        return reply

    # Anything but Serialized values fails in the engine (SerializationError).

    def remote_push_serialized(self, namespace):
        return self._call("push_serialized", namespace)

    def remote_pull_serialized(self, keys):
        lender = _Lender(self.engine)

        def convert(result):
            if isinstance(keys, str):
                return lender.lend([result])[0]
            return lender.lend(list(result))

        d = self._call("pull_serialized", keys, convert=convert)
        d.addBoth(lender.reply)
        return d

    def remote_run_task(
        self, payload, clear_before=False, clear_after=False, key=None, thread_reply=None
    ):
        lender = _Lender(self.engine)
        on_done = self._reply_from_thread(thread_reply)
        d = self._call(
            "run_task",
            payload,
            clear_before=bool(clear_before),
            clear_after=bool(clear_after),
            key=key if isinstance(key, str) else None,
            finish=lender.finish_task,
            convert=lender.task_result,
            **({} if on_done is None else {"on_done": on_done}),
        )
        d.addBoth(lender.reply)
        return d


# A command's small reply leaves from the engine's thread as the command ends.
nativeproto.allow_thread_reply(NativeEngineReferenceFromService, ("execute", "run_task"))


class PipelinedEngine(QueuedEngine):
    """A controller-side :class:`~kernel.engineservice.QueuedEngine` that
    sends up to ``max_in_flight`` commands and tasks ahead to a native engine.

    The engine runs them one at a time from a queue of its own
    (:class:`_EngineSideQueue`: commands in order, overtaking the tasks sent
    ahead, which it can withdraw), so only the engine knows which one runs:
    :meth:`queue_status` asks it, and :meth:`clear_queue` drops the waiting
    commands on the engine too (each fails with
    :class:`~kernel.error.QueueCleared`).
    """

    def execute(self, lines: str) -> defer.Deferred:
        """Queue ``execute``. Made for a client's multiengine call (see
        :data:`kernel.nativeproto.PASSING_ON`), its reply comes back unread
        (a :class:`~kernel.nativeproto.Verbatim`), to be passed on as it is."""
        extra = {"verbatim": True} if nativeproto.PASSING_ON.get() else None
        return self._enqueue_command(_Command("execute", (lines,), {}, extra=extra))

    def run_task(
        self,
        payload: Serialized,
        clear_before: bool = False,
        clear_after: bool = False,
        key: str | None = None,
    ) -> defer.Deferred:
        """Queue a task (see :meth:`QueuedEngine.run_task`). A multiengine
        ``apply`` (no ``key``) made for a client's call comes back unread,
        as :meth:`execute`."""
        kwargs = {"clear_before": clear_before, "clear_after": clear_after}
        verbatim = key is None and nativeproto.PASSING_ON.get()
        extra = {"verbatim": True} if verbatim else None
        return self._enqueue_task(_Command("run_task", (payload,), kwargs, key, extra))

    def queue_status(self) -> defer.Deferred:
        """Fire ``{'queue': [...], 'pending': description or None}``: what
        runs on the engine, then what waits there and here, in the order it
        will run (commands, then tasks)."""
        if self.is_lost or not self._in_flight:
            return super().queue_status()
        here = [cmd.description for cmd in self._queue]
        here_tasks = [cmd.description for cmd in self._tasks]

        def combine(status: dict) -> dict:
            there = [str(q) for q in status.get("queue", [])]
            tasks = [q for q in there if q.startswith("run_task(")]
            commands = [q for q in there if not q.startswith("run_task(")]
            return {
                "queue": commands + here + tasks + here_tasks,
                "pending": status.get("pending"),
            }

        return self.engine.queue_status().addCallback(combine)

    def clear_queue(self) -> defer.Deferred:
        """Drop every command that has not started, here and on the engine."""
        d = super().clear_queue()
        if len(self._in_flight) > 1 and not self.is_lost:
            d.addCallback(lambda _: self.engine.clear_queue())
        return d


@implementer(IEngineBase, IEngineInterrupt, IEngineTaskQueue)
class NativeEngineFromReference(EngineFromReference):
    """An engine in another process, used over the native transport
    (controller process): :class:`kernel.engineremote.EngineFromReference` with
    Serialized blobs sent and received as they are (never joined, never opened).
    """

    def _call_verbatim(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        """:meth:`_call`, with a success's value left unread
        (:meth:`kernel.nativeproto.NativeRemote.callRemoteVerbatim`)."""
        d = defer.maybeDeferred(self.reference.callRemoteVerbatim, method, *args, **kwargs)
        if self._streaming:
            d.addBoth(self._after_output)
        d.addCallbacks(_open, self._translate)
        return d

    def execute(self, lines: str, verbatim: bool = False) -> defer.Deferred:
        """Run ``lines`` on the engine; fire its result dict (with
        ``verbatim``, a :class:`~kernel.nativeproto.Verbatim` of it, to be
        passed on unread)."""
        if verbatim:
            return self._call_verbatim("execute", lines)
        return self._call("execute", lines)

    def push_serialized(self, namespace: dict[str, Serialized]) -> defer.Deferred:
        """Push ``name: Serialized`` pairs, unopened."""
        return self._call("push_serialized", dict(namespace))

    def pull_serialized(self, keys: str | list[str]) -> defer.Deferred:
        """Fire a Serialized (``keys`` a str) or a list of them, unopened.

        The reply is cut through: it fires once its header has verified, its
        large buffers still arriving, and whoever passes it on over a native
        connection forwards them as they come (see
        :mod:`kernel.nativeproto`, "Cut-through forwarding").
        """
        keys = keys if isinstance(keys, str) else list(keys)
        d = defer.maybeDeferred(self.reference.callRemoteStreamed, "pull_serialized", keys)
        if self._streaming:
            d.addBoth(self._after_output)
        d.addCallbacks(_open, self._translate)
        return d

    def clear_queue(self) -> defer.Deferred:
        """Drop the commands waiting on the engine (each fails with
        :class:`~kernel.error.QueueCleared`)."""
        return self._call("clear_queue")

    def queue_status(self) -> defer.Deferred:
        """Fire the engine's own ``{'queue': [...], 'pending': ...}``."""
        return self._call("queue_status")

    def run_task(
        self,
        payload: Serialized,
        clear_before: bool = False,
        clear_after: bool = False,
        key: str | None = None,
        verbatim: bool = False,
    ) -> defer.Deferred:
        """Queue a task body on the engine (behind its waiting commands);
        fires its result dict with ``result`` a Serialized (unopened).

        :param key: names the task for :meth:`abort_task`.
        :param verbatim: fire a :class:`~kernel.nativeproto.Verbatim` of the
            result dict instead, to be passed on unread.
        """
        call = self._call_verbatim if verbatim else self._call
        return call(
            "run_task",
            payload,
            clear_before=bool(clear_before),
            clear_after=bool(clear_after),
            key=key,
        )

    def abort_task(self, key: str, interrupt: bool = True) -> defer.Deferred:
        """Withdraw the task ``key`` on the engine if it has not started, or
        interrupt it if it runs (and ``interrupt``); fires ``"withdrawn"``,
        ``"interrupted"``, ``"running"`` or ``"finished"`` (decided by the
        engine, see :meth:`kernel.interfaces.IEngineTaskQueue.abort_task`)."""
        return self._call("abort_task", key, interrupt=bool(interrupt))


class NativeEngineRegistrar(EngineRegistrar):
    """The controller's registration desk for engines over the native transport.

    :class:`kernel.engineremote.EngineRegistrar` (same arguments) registering
    :class:`NativeEngineFromReference` engines behind a
    :class:`PipelinedEngine` (``max_in_flight`` = :data:`PIPELINE`) unless
    ``wrap`` says otherwise.
    """

    engine_class = NativeEngineFromReference

    def __init__(self, controller: Any, monitor: Any = None, wrap: Callable | None = None, **kw):
        if wrap is None:
            wrap = functools.partial(PipelinedEngine, max_in_flight=PIPELINE)
        super().__init__(controller, monitor, wrap=wrap, **kw)


class NativeControllerLocator:
    """Finds a controller's engine registrar over the native transport.

    Plays the part of the Foolscap ``Tub`` for
    :class:`~kernel.engineremote.EngineConnector`: :meth:`getReference` takes the
    connection info (``native.json``'s content) where the Tub takes a FURL.

    :param timeout: bound on each connection and handshake, seconds.
    """

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout

    def getReference(self, info: dict[str, Any]) -> defer.Deferred:  # noqa: N802
        """Connect, prove the cluster key, and fire the registrar (a
        :class:`~kernel.nativeproto.NativeRemote`).

        :raises: (errback) :class:`~kernel.error.SecurityError` if the keys
            differ; :class:`~kernel.error.ConnectionError` if the controller
            cannot be reached.
        """
        return defer.ensureDeferred(nativeproto.connect_info(info, REGISTRAR, self.timeout))


class NativeEngineConnector(EngineConnector):
    """Keep an engine registered with a controller over the native transport.

    Until it first registers, and for at most :data:`STARTUP_WINDOW` seconds,
    an engine that finds no controller yet (no ``native.json``, nothing
    listening: :class:`~kernel.error.ConnectionError`) tries again every
    :data:`STARTUP_POLL` seconds instead of backing off, so engines started
    together with their controller register as soon as it listens. After
    that, retries back off as for Foolscap.

    :param get_info: returns the controller's connection info (e.g.
        ``lambda: nativeproto.read_connection_info(cluster_dir)``); called
        before each attempt, so a rewritten ``native.json`` is picked up.
    :param engine: the engine service to expose.
    :param kwargs: the other arguments of
        :class:`~kernel.engineremote.EngineConnector` (``on_fatal``, ``on_kill``,
        ``initial_delay``, ``max_delay``, ``clock``).
    """

    reference_class = NativeEngineReferenceFromService

    def __init__(self, get_info: Callable[[], dict], engine: Any, **kwargs: Any):
        super().__init__(NativeControllerLocator(), get_info, engine, **kwargs)
        self._started_at: float | None = None
        self._not_there_yet = False

    def startService(self) -> None:  # noqa: N802
        self._started_at = self.clock.seconds()
        super().startService()

    def _failed(self, f: Failure) -> None:
        self._not_there_yet = f.check(ConnectionError) is not None
        super()._failed(f)

    def _schedule(self) -> None:
        starting = (
            self.registrations == 0
            and self._not_there_yet
            and self._started_at is not None
            and self.clock.seconds() - self._started_at < STARTUP_WINDOW
        )
        if starting:
            self.delay = min(self.delay, STARTUP_POLL)
        super()._schedule()
        if starting:
            self.delay = self.initial_delay  # back off from the start afterwards
