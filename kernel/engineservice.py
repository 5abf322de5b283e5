"""The engine core: a persistent namespace that runs code, and its queue.

:class:`EngineService` is one engine: a Python namespace that keeps its
contents between commands. User code runs on one dedicated thread per engine
(see :mod:`kernel.executor`), never on the reactor thread, so the reactor
keeps answering (heartbeats, ``queue_status``, :meth:`EngineService.interrupt`)
while a long computation runs. Output written to ``sys.stdout``/``sys.stderr``
is captured per command (see :mod:`kernel.capture`) and also offered, as it is
written, to output observers (what a network engine streams to its clients).

:class:`QueuedEngine` puts a FIFO of commands in front of any engine: the
controller talks to every engine through one, so commands from several
clients run in the order they arrived, a failing command fails only itself,
and a lost engine fails its queued work with :class:`~kernel.error.EngineError`.
"""

from __future__ import annotations

import collections
import linecache
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import capture, executor, serialized
from kernel.error import (
    EngineError,
    InvalidProperty,
    InvalidResultNumber,
    QueueCleared,
    TaskWithdrawn,
    attach_engine_info,
)
from kernel.interfaces import (
    IEngineBase,
    IEngineCore,
    IEngineInterrupt,
    IEngineProperties,
    IEngineQueued,
    IEngineSerialized,
    IEngineTaskQueue,
    IEngineTasks,
)
from kernel.wiretext import safe_text

# Frames from these files are left out of the traceback text users see.
_INTERNAL_FILES = frozenset(
    m.__file__ for m in (executor, capture, serialized) if getattr(m, "__file__", None)
) | {__file__}

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _keys_list(keys: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(keys, str):
        return [keys]
    if not isinstance(keys, (list, tuple)):
        raise TypeError(f"keys must be str or a list of str, got {keys!r:.200}")
    keys = list(keys)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"keys must be str or a list of str, got {k!r}")
    return keys


def plain_property(key: str, value: Any) -> Any:
    """Check that ``value`` is plain data; return a private copy of it.

    Tuples are accepted and stored as lists.

    :raises InvalidProperty: naming ``key`` and what is wrong.
    """
    if isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_property(key, v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidProperty(
                    f"property {key!r} holds a dict with the non-str key {k!r}: "
                    "property dicts need str keys"
                )
            out[k] = plain_property(key, v)
        return out
    raise InvalidProperty(
        f"property {key!r} is a {type(value).__name__}; properties hold plain data only "
        "(str, int, float, bool, None, and lists/dicts of those): convert the value, "
        "or push it into the namespace instead"
    )


def plain_properties(properties: Any) -> dict[str, Any]:
    """Check a ``set_properties`` argument: a dict of str keys and plain data.

    :returns: a private copy (see :func:`plain_property`).
    :raises InvalidProperty: naming what is wrong.
    """
    if not isinstance(properties, dict):
        raise InvalidProperty(f"set_properties() needs a dict, got {type(properties).__name__}")
    checked = {}
    for key, value in properties.items():
        if not isinstance(key, str):
            raise InvalidProperty(f"property names must be str, got {key!r}")
        checked[key] = plain_property(key, value)
    return checked


def format_user_traceback(exc: BaseException) -> str:
    """The traceback text of ``exc``, without txkernel's own frames on top."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _INTERNAL_FILES:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_command(name: str, args: tuple = (), kwargs: dict | None = None) -> str:
    """A readable one-line description of a call, e.g. ``"execute('a=5')"``.

    Namespaces are described by their keys only; long values are cut short.
    """
    parts = []
    for a in args:
        if isinstance(a, dict) and name.startswith("push"):
            parts.append(_short(sorted(a)))
        elif isinstance(a, serialized.Serialized):
            parts.append(f"<Serialized {a.nbytes} bytes>")
        else:
            parts.append(_short(a))
    for k, v in (kwargs or {}).items():
        parts.append(f"{k}={_short(v)}")
    return f"{name}({', '.join(parts)})"


@implementer(IEngineCore, IEngineSerialized, IEngineProperties, IEngineInterrupt, IEngineTasks)
class EngineService:
    """One engine: a persistent namespace, run on a dedicated thread.

    The namespace starts out holding only ``id`` (this engine's id, kept up to
    date when the controller assigns it and bound again by :meth:`reset`).
    Namespace commands (execute, push/pull, reset, keys, run_task, …) run one
    at a time in the order they were called; property methods act at once on
    the reactor thread.

    :ivar properties: dict of plain data describing this engine.
    """

    def __init__(self, id: int | None = None, reactor=None):
        """
        :param id: the engine id (usually assigned later by the controller).
        :param reactor: the reactor to deliver results through (default: the
            global one).
        """
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._id = id
        self.properties: dict[str, Any] = {}
        self._namespace: dict[str, Any] = {}
        self._history: list[dict[str, Any]] = []
        self._cells = 0
        self._output_observers: list[Callable[[str, str], None]] = []
        self._output_lock = threading.Lock()
        self._output_pending: list[tuple[str, str]] = []
        self._output_scheduled = False
        self._output_delivering = False  # observers are being called with output
        self._kill_callbacks: list[tuple[Callable, tuple, dict]] = []
        self._killed = False
        self._capturing = False
        self._executor = executor.ThreadExecutor(
            name=self._thread_name(),
            reactor=reactor,
            on_start=self._thread_started,
            on_exit=self._thread_exited,
        )
        self._reset_namespace()

    # -- identity ------------------------------------------------------------

    @property
    def id(self) -> int | None:
        """The engine's id; setting it rebinds ``id`` in the namespace."""
        return self._id

    @id.setter
    def id(self, value: int | None) -> None:
        self._id = value
        self._namespace["id"] = value
        self._executor.name = self._thread_name()
        if self._executor.thread is not None:
            self._executor.thread.name = self._executor.name

    def _thread_name(self) -> str:
        return f"txkernel-engine-{'?' if self._id is None else self._id}"

    def __repr__(self) -> str:
        return f"<EngineService id={self._id}>"

    # -- observers and lifecycle hooks -------------------------------------

    def add_output_observer(self, observer: Callable[[str, str], None]) -> None:
        """Call ``observer(stream_name, text)`` for output as it is written.

        ``stream_name`` is ``'stdout'`` or ``'stderr'``. Observers are called
        on the reactor thread, in the order the text was written, and always
        before the Deferred of the command that wrote it fires. Writes that
        arrive together are joined: consecutive writes to one stream may come
        as one piece of text.
        """
        self._output_observers.append(observer)

    def remove_output_observer(self, observer: Callable[[str, str], None]) -> None:
        """Stop calling ``observer``."""
        self._output_observers.remove(observer)

    def on_kill(self, f: Callable, *args: Any, **kwargs: Any) -> None:
        """Call ``f(*args, **kwargs)`` when :meth:`kill` is called.

        A process engine uses this to stop its reactor.
        """
        self._kill_callbacks.append((f, args, kwargs))

    def when_stopped(self) -> Deferred:
        """A Deferred firing None once the engine's thread has exited after
        :meth:`kill` (at once if it never started)."""
        return self._executor.when_stopped()

    @property
    def thread(self):
        """The engine's executor thread (None until the first command)."""
        return self._executor.thread

    # -- running on the engine thread -------------------------------------

    def _thread_started(self) -> None:
        capture.acquire()
        self._capturing = True

    def _thread_exited(self) -> None:
        if self._capturing:
            self._capturing = False
            capture.release()

    def deliver_waiting(self) -> None:
        """Fire the Deferreds of the commands that ended with their ``on_done``
        saying the result may wait (see :meth:`kernel.executor.ThreadExecutor.submit`);
        call before acting on what the engine has run. Reactor thread."""
        self._executor.deliver_waiting()

    def set_urgent(self, urgent: bool) -> None:
        """Say whether every command's Deferred must fire as soon as it ends
        (more work waits for it); see
        :meth:`kernel.executor.ThreadExecutor.set_urgent`. Reactor thread."""
        self._executor.set_urgent(urgent)

    def _stopped_error(self) -> EngineError:
        return EngineError(
            f"engine {self._id} has been killed and runs no more commands: "
            "register a new engine to continue"
        )

    def _submit(
        self,
        fn: Callable[[], Any],
        on_done: Callable[[Any], Any] | None = None,
        revocable: bool = False,
    ) -> Deferred:
        """Run ``fn`` on the engine thread; failures carry the engine's info.

        :param on_done: called on the engine thread with what ``fn`` returned,
            as soon as it returned (see :meth:`kernel.executor.ThreadExecutor.submit`).
        :param revocable: as for :meth:`kernel.executor.ThreadExecutor.submit`.
        """
        if self._killed:
            return fail(self._stopped_error())

        def run():
            try:
                return fn()
            except BaseException as e:
                attach_engine_info(e, self._id, format_user_traceback(e))
                raise

        d = self._executor.submit(run, on_done, revocable)
        d.addErrback(self._ensure_engine_info)
        return d

    def _ensure_engine_info(self, f: Failure) -> Failure:
        if isinstance(f.value, executor.ExecutorStopped):
            return Failure(self._stopped_error())
        if getattr(f.value, "_txkernel_engine_id", None) is None:
            attach_engine_info(f.value, self._id, f.getTraceback())
        return f

    def _emit(self, stream_name: str, text: str) -> None:
        # On the engine thread: hand the text to the reactor thread, batching
        # writes so a tight print loop costs one reactor wake-up per batch.
        # The batch is scheduled before the command's result is, so observers
        # always see a command's output before its Deferred fires.
        if not self._output_observers:
            return
        with self._output_lock:
            self._output_pending.append((stream_name, text))
            if self._output_scheduled:
                return
            self._output_scheduled = True
        self._reactor.callFromThread(self._notify_output)

    def output_pending(self) -> bool:
        """Is output written on any thread still on its way to the output
        observers? (Safe to ask from any thread.)"""
        with self._output_lock:
            return self._output_scheduled or self._output_delivering

    def _notify_output(self) -> None:
        with self._output_lock:
            pending, self._output_pending = self._output_pending, []
            self._output_scheduled = False
            self._output_delivering = True
        try:
            self._deliver_output(pending)
        finally:
            with self._output_lock:
                self._output_delivering = False

    def _deliver_output(self, pending: list[tuple[str, str]]) -> None:
        chunks: list[list[str]] = []  # [stream_name, text], same-stream runs joined
        for stream_name, text in pending:
            if chunks and chunks[-1][0] == stream_name:
                chunks[-1][1] += text
            else:
                chunks.append([stream_name, text])
        for stream_name, text in chunks:
            for obs in list(self._output_observers):
                try:
                    obs(stream_name, text)
                except Exception:
                    log.err(None, f"output observer {obs!r} of engine {self._id} failed")

    def _run_code(self, lines: str) -> None:
        self._cells += 1
        filename = f"<engine {self._id} input {self._cells}>"
        # Registered so tracebacks (now or from functions defined here) show the source.
        linecache.cache[filename] = (len(lines), None, lines.splitlines(True), filename)
        exec(compile(lines, filename, "exec"), self._namespace)

    def _reset_namespace(self) -> None:
        self._namespace.clear()
        self._namespace["__name__"] = "__main__"
        self._namespace["id"] = self._id

    def _lookup(self, key: str) -> Any:
        try:
            return self._namespace[key]
        except KeyError:
            raise NameError(f"name {key!r} is not defined on engine {self._id}") from None

    def _pull(self, keys: str | list[str]) -> Any:
        if isinstance(keys, str):
            return self._lookup(keys)
        return [self._lookup(k) for k in _keys_list(keys)]

    @staticmethod
    def _check_namespace(namespace: dict) -> None:
        if not isinstance(namespace, dict):
            raise TypeError(f"expected a dict of name: value, got {type(namespace).__name__}")
        for key in namespace:
            if not isinstance(key, str) or not key.isidentifier():
                raise TypeError(f"namespace keys must be valid Python names, got {key!r}")

    # -- IEngineCore -------------------------------------------------------

    def execute(self, lines: str, on_done: Callable[[dict], Any] | None = None) -> Deferred:
        """Run ``lines`` in the namespace; see :meth:`IEngineCore.execute`.

        Only commands that succeed are numbered and kept as history.

        :param on_done: called on the engine thread with the result dict as
            soon as the code has run (before the Deferred fires): a network
            engine sends the reply from there. If it returns True the
            Deferred may fire late (see :meth:`deliver_waiting`).
        """
        if not isinstance(lines, str):
            return fail(TypeError(f"execute() needs a str of Python code, got {type(lines)}"))

        def run():
            sink = capture.OutputSink(self._emit)
            with capture.capturing(sink):
                self._run_code(lines)
            result = {
                "id": self._id,
                "number": len(self._history),
                "input": lines,
                "stdout": sink.stdout.getvalue(),
                "stderr": sink.stderr.getvalue(),
            }
            self._history.append(result)
            return dict(result)

        return self._submit(run, on_done)

    def push(self, namespace: dict[str, Any]) -> Deferred:
        """Bind each ``name: value`` in the namespace (the objects themselves)."""
        try:
            self._check_namespace(namespace)
        except TypeError as e:
            return fail(e)
        namespace = dict(namespace)  # later changes by the caller do not leak in
        return self._submit(lambda: self._namespace.update(namespace))

    def pull(self, keys: str | list[str]) -> Deferred:
        """Fire the value of ``keys`` (a str) or a list of values (a list)."""
        return self._submit(lambda: self._pull(keys))

    def push_function(self, namespace: dict[str, Callable]) -> Deferred:
        """Bind functions by name (as :meth:`push`)."""
        return self.push(namespace)

    def pull_function(self, keys: str | list[str]) -> Deferred:
        """Pull functions by name (as :meth:`pull`)."""
        return self.pull(keys)

    def get_result(self, i: int | None = None) -> Deferred:
        """Fire the result dict of successful command ``i`` (None: the last)."""

        def run():
            if not self._history:
                raise InvalidResultNumber(f"engine {self._id} has not run any command yet")
            if i is None:
                return dict(self._history[-1])
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self._history):
                raise InvalidResultNumber(
                    f"engine {self._id} has no result number {i!r}: "
                    f"valid numbers are 0 to {len(self._history) - 1}"
                )
            return dict(self._history[i])

        return self._submit(run)

    def reset(self) -> Deferred:
        """Clear the namespace (``id`` stays bound). Fires None."""
        return self._submit(self._reset_namespace)

    def keys(self) -> Deferred:
        """Fire the sorted names in the namespace, ``id`` included, dunder
        names (``__builtins__``, ``__name__``) left out. A name holding a lone
        surrogate is listed with it backslash-escaped (it could not be sent)."""
        return self._submit(
            lambda: sorted(
                safe_text(k)
                for k in self._namespace
                if isinstance(k, str) and not (k.startswith("__") and k.endswith("__"))
            )
        )

    def kill(self) -> Deferred:
        """Stop the engine.

        A running command is interrupted, queued commands fail with
        :class:`~kernel.error.EngineError`, later calls fail the same way, and
        the :meth:`on_kill` callbacks run. Fires None at once; see
        :meth:`when_stopped` to wait for the thread.
        """
        if not self._killed:
            self._killed = True
            self._executor.interrupt()
            self._executor.stop(self._stopped_error())
            for f, args, kwargs in self._kill_callbacks:
                try:
                    f(*args, **kwargs)
                except Exception:
                    log.err(None, f"kill callback {f!r} of engine {self._id} failed")
        return succeed(None)

    # -- IEngineSerialized -------------------------------------------------

    def push_serialized(self, namespace: dict[str, serialized.Serialized]) -> Deferred:
        """Bind ``name: Serialized`` pairs, deserialized on the engine thread."""
        try:
            self._check_namespace(namespace)
        except TypeError as e:
            return fail(e)
        namespace = dict(namespace)
        return self._submit(
            lambda: self._namespace.update(serialized.deserialize_namespace(namespace))
        )

    def pull_serialized(self, keys: str | list[str]) -> Deferred:
        """Fire a Serialized (``keys`` a str) or a list of them, serialized on
        the engine thread."""

        def run():
            value = self._pull(keys)
            if isinstance(keys, str):
                return serialized.serialize(value)
            return [serialized.serialize(v) for v in value]

        return self._submit(run)

    # -- IEngineProperties -------------------------------------------------

    def set_properties(self, properties: dict[str, Any]) -> Deferred:
        """Update the properties; nothing changes if any value is refused.

        :raises: (errback) :class:`~kernel.error.InvalidProperty` for a value
            that is not plain data or a key that is not a str.
        """
        try:
            checked = plain_properties(properties)
        except InvalidProperty as e:
            return fail(e)
        self.properties.update(checked)
        return succeed(None)

    def get_properties(self, keys: str | list[str] | None = None) -> Deferred:
        """Fire a dict (a copy) of the named properties, all when ``keys`` is None.

        :raises: (errback) ``KeyError`` naming a property that is not set.
        """
        if keys is None:
            return succeed(plain_property("", self.properties))
        try:
            names = _keys_list(keys)
            missing = [k for k in names if k not in self.properties]
            if missing:
                raise KeyError(f"engine {self._id} has no property {missing[0]!r}")
        except (KeyError, TypeError) as e:
            return fail(e)
        return succeed({k: plain_property(k, self.properties[k]) for k in names})

    def del_properties(self, keys: str | list[str]) -> Deferred:
        """Remove the named properties (missing ones are ignored). Fires None."""
        try:
            names = _keys_list(keys)
        except TypeError as e:
            return fail(e)
        for k in names:
            self.properties.pop(k, None)
        return succeed(None)

    def has_properties(self, keys: str | list[str]) -> Deferred:
        """Fire a list of bools, one per key."""
        try:
            names = _keys_list(keys)
        except TypeError as e:
            return fail(e)
        return succeed([k in self.properties for k in names])

    def clear_properties(self) -> Deferred:
        """Remove every property. Fires None."""
        self.properties.clear()
        return succeed(None)

    # -- IEngineInterrupt --------------------------------------------------

    def interrupt(self) -> Deferred:
        """Raise ``KeyboardInterrupt`` in the running command.

        The command fails with ``KeyboardInterrupt`` and the engine goes on
        with the next one. A command blocked inside one C call (for example
        ``time.sleep(60)``) is interrupted only when that call returns.

        :returns: Deferred firing True if a command was interrupted, False
            if the engine was idle.
        """
        return succeed(self._executor.interrupt())

    # -- IEngineTasks ------------------------------------------------------

    def run_task(
        self,
        payload: serialized.Serialized,
        clear_before: bool = False,
        clear_after: bool = False,
        on_done: Callable[[dict], Any] | None = None,
    ) -> Deferred:
        """Run a task body; see :meth:`IEngineTasks.run_task`.

        ``payload`` deserializes (on the engine thread) to an object with a
        method ``run(namespace, properties)``; it is called with the live
        namespace and a copy of the properties (taken when the engine is
        handed the task), and what it returns is serialized into the result's
        ``result``.

        :param on_done: called on the engine thread with the result dict as
            soon as it is made (before the Deferred fires), as for :meth:`execute`.
        """
        return self._submit(self._task_body(payload, clear_before, clear_after), on_done)

    def _task_body(
        self,
        payload: serialized.Serialized,
        clear_before: bool,
        clear_after: bool,
        finish: Callable[[dict], dict] | None = None,
    ) -> Callable[[], dict]:
        properties = plain_property("", self.properties)

        def run():
            if clear_before:
                self._reset_namespace()
            try:
                body = serialized.deserialize(payload)
                sink = capture.OutputSink(self._emit)
                started = time.time()
                with capture.capturing(sink):
                    value = body.run(self._namespace, properties)
                completed = time.time()
                result = {
                    "result": serialized.serialize(value),
                    "stdout": sink.stdout.getvalue(),
                    "stderr": sink.stderr.getvalue(),
                    "started": started,
                    "completed": completed,
                }
            finally:
                if clear_after:
                    self._reset_namespace()
            return result if finish is None else finish(result)

        return run

    # -- tasks sent ahead to the engine thread -------------------------------

    def run_task_ahead(
        self,
        payload: serialized.Serialized,
        clear_before: bool = False,
        clear_after: bool = False,
        finish: Callable[[dict], dict] | None = None,
        on_done: Callable[[dict], Any] | None = None,
    ) -> Deferred:
        """:meth:`run_task`, queued on the engine thread so that it starts as
        soon as what runs there ends, with no round trip through the reactor
        thread; :meth:`withdraw_task` takes it back until it starts.

        :param finish: called with the result dict on the engine thread
            when the task ends, before anything else starts there; returns
            the result to fire (e.g. copies of buffers the next task could
            change, or the result as it is after :meth:`pause_engine_thread`).
        :param on_done: as for :meth:`run_task` (called after ``finish``).
        :returns: as :meth:`run_task`.
        """
        run = self._task_body(payload, clear_before, clear_after, finish)
        return self._submit(run, on_done, revocable=True)

    def withdraw_task(self, d: Deferred) -> bool:
        """Take back a task sent with :meth:`run_task_ahead` (``d`` its
        Deferred) if it has not started: True, and it never runs (``d``
        never fires); False if it has started."""
        return self._executor.revoke(d)

    def interrupt_task(self, d: Deferred) -> bool:
        """Interrupt the task sent with :meth:`run_task_ahead` (``d`` its
        Deferred) if it is the one running: True if it was sent the interrupt."""
        return self._executor.interrupt(only=d)

    def pause_engine_thread(self) -> Callable[[], None]:
        """From a task's ``finish`` (on the engine thread): start nothing
        after it until the returned function is called (from any thread)."""
        return self._executor.pause()


class _Command:
    """One queued call: which method, its arguments and the caller's Deferred."""

    __slots__ = (
        "name",
        "args",
        "kwargs",
        "_description",
        "deferred",
        "done",
        "key",
        "extra",
        "sent",
    )

    def __init__(
        self,
        name: str,
        args: tuple,
        kwargs: dict,
        key: str | None = None,
        extra: dict[str, Any] | None = None,
    ):
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self._description: str | None = None
        self.deferred: Deferred = Deferred()
        self.done = False
        self.key = key  # a task's key (see IEngineTaskQueue)
        #: more keyword arguments for the engine method, left out of the
        #: description (how to run it, not what it is: e.g. ``on_done``)
        self.extra = extra
        self.sent: Deferred | None = None  # the engine's Deferred, once sent

    @property
    def is_task(self) -> bool:
        return self.name == "run_task"

    @property
    def description(self) -> str:
        """What :func:`describe_command` says of this call (made when first
        asked for: most commands are never described)."""
        if self._description is None:
            self._description = describe_command(self.name, self.args, self.kwargs)
        return self._description


#: What :meth:`QueuedEngine.abort_task` fires.
WITHDRAWN = "withdrawn"
INTERRUPTED = "interrupted"
RUNNING = "running"
FINISHED = "finished"


@implementer(IEngineBase, IEngineQueued, IEngineInterrupt, IEngineTaskQueue)
class QueuedEngine:
    """A FIFO of commands in front of an engine, and a queue of tasks behind it.

    Commands from every caller wait in one queue and are sent to the wrapped
    engine in order, at most ``max_in_flight`` at a time (1 by default; more
    lets a network engine pipeline). A command that fails fails only itself.
    :meth:`interrupt`, :meth:`queue_status`, :meth:`clear_queue`,
    :meth:`abort_task` and the property reads (:meth:`get_properties`,
    :meth:`has_properties`) act at once; every other method is queued.

    Tasks (:meth:`run_task`) wait in a second queue that commands overtake
    (:class:`~kernel.interfaces.IEngineTaskQueue`): a task is sent only when
    no command waits, so a command waits for at most the task running when
    it came, never for the tasks the task controller has sent ahead. If the
    wrapped engine keeps such a queue itself (it has ``abort_task``: the
    engine side of a pipelining transport), tasks are sent on as slots allow,
    always leaving one for a command (when ``max_in_flight`` is above 1), and
    it orders them; otherwise a task is sent only to an idle engine and
    nothing else is sent while it runs, so :meth:`abort_task` knows without
    asking that a task in flight is the one running.

    :ivar engine: the wrapped engine (any :class:`IEngineBase` provider).
    """

    def __init__(self, engine: Any, max_in_flight: int = 1):
        """
        :param engine: the engine to wrap (in-process or a remote reference's
            client half).
        :param max_in_flight: how many commands may be running on the engine
            at once.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._queue: collections.deque[_Command] = collections.deque()
        self._tasks: collections.deque[_Command] = collections.deque()
        self._in_flight: list[_Command] = []
        self._engine_queues_tasks = callable(getattr(engine, "abort_task", None))
        self._pumping = False
        self._failure_observers: list[Callable[[Failure], Any]] = []
        self._lost_reason: str | None = None

    def __repr__(self) -> str:
        return f"<QueuedEngine id={self.id} {self.engine!r}>"

    @property
    def id(self) -> int | None:
        """The wrapped engine's id (setting it sets the engine's)."""
        return self.engine.id

    @id.setter
    def id(self, value: int | None) -> None:
        self.engine.id = value

    @property
    def properties(self) -> dict[str, Any]:
        """The wrapped engine's properties."""
        return self.engine.properties

    @property
    def is_lost(self) -> bool:
        """True once :meth:`lost` has been called."""
        return self._lost_reason is not None

    # -- the queue ---------------------------------------------------------

    def _lost_error(self, description: str | None = None) -> EngineError:
        what = f"{description} failed: " if description else ""
        msg = (
            f"{what}engine {self.id} was lost ({self._lost_reason}); "
            "run the work again on another engine"
        )
        exc = EngineError(msg)
        attach_engine_info(exc, self.id, f"EngineError: {msg}\n")
        return exc

    def _enqueue(self, name: str, *args: Any, **kwargs: Any) -> Deferred:
        return self._enqueue_command(_Command(name, args, kwargs))

    def _enqueue_command(self, cmd: _Command) -> Deferred:
        if self.is_lost:
            return fail(self._lost_error(cmd.description))
        self._queue.append(cmd)
        self._pump()
        return cmd.deferred

    def _next(self) -> _Command | None:
        """The next command or task to send now, or None."""
        if len(self._in_flight) >= self.max_in_flight or self.is_lost:
            return None
        if not self._engine_queues_tasks and self._in_flight and self._in_flight[0].is_task:
            return None  # a task runs alone on an engine that cannot withdraw it
        if self._queue:
            return self._queue.popleft()
        if not self._tasks:
            return None
        if not self._engine_queues_tasks:
            return None if self._in_flight else self._tasks.popleft()
        # tasks leave a slot free, so a command is sent at once, however
        # many tasks wait (it then waits only for the one running there)
        if self.max_in_flight > 1 and len(self._in_flight) >= self.max_in_flight - 1:
            return None
        return self._tasks.popleft()

    def _pump(self) -> None:
        # Re-entrant calls (a command that completes synchronously, a
        # callback that queues more work) just let the running loop continue.
        if self._pumping:
            return
        self._pumping = True
        try:
            while (cmd := self._next()) is not None:
                self._in_flight.append(cmd)
                d = cmd.sent = self._start(cmd)
                d.addBoth(self._finished, cmd)
        finally:
            self._pumping = False

    def _start(self, cmd: _Command) -> Deferred:
        """Send ``cmd`` to the engine; its Deferred."""
        kwargs = cmd.kwargs
        if cmd.is_task and self._engine_queues_tasks:
            kwargs = dict(kwargs, key=cmd.key)
        if cmd.extra:
            kwargs = {**kwargs, **cmd.extra}
        return maybeDeferred(getattr(self.engine, cmd.name), *cmd.args, **kwargs)

    def _withdrawn(self, cmd: _Command) -> None:
        """Fail a task taken back before it started with TaskWithdrawn."""
        cmd.done = True
        cmd.deferred.errback(
            TaskWithdrawn(f"task {cmd.key} was taken back from engine {self.id} before it started")
        )

    def _finished(self, result: Any, cmd: _Command) -> None:
        if cmd.done:  # failed already because the engine was lost: ignore
            return None
        cmd.done = True
        self._in_flight.remove(cmd)
        if isinstance(result, Failure):
            cmd.deferred.errback(result)
        else:
            cmd.deferred.callback(result)
        self._pump()
        return None

    # -- IEngineQueued -----------------------------------------------------

    def clear_queue(self) -> Deferred:
        """Drop every waiting command; each fails with
        :class:`~kernel.error.QueueCleared`. The running one is not touched,
        nor are waiting tasks (they belong to the task controller: abort them
        there)."""
        dropped, self._queue = list(self._queue), collections.deque()
        for cmd in dropped:
            cmd.done = True
            cmd.deferred.errback(
                QueueCleared(
                    f"{cmd.description} was removed from engine {self.id}'s queue by "
                    "clear_queue() before it ran"
                )
            )
        return succeed(None)

    def queue_status(self) -> Deferred:
        """Fire ``{'queue': [descriptions...], 'pending': description or None}``.

        ``pending`` is the oldest command running on the engine; ``queue``
        lists what waits in the order it will run: commands, then tasks.
        """
        if self.is_lost:
            return fail(self._lost_error("queue_status()"))
        return succeed(
            {
                "queue": [cmd.description for cmd in self._queue]
                + [cmd.description for cmd in self._tasks],
                "pending": self._in_flight[0].description if self._in_flight else None,
            }
        )

    def register_failure_observer(self, obs: Callable[[Failure], Any]) -> None:
        """Call ``obs(failure)`` when the engine is lost."""
        self._failure_observers.append(obs)

    def unregister_failure_observer(self, obs: Callable[[Failure], Any]) -> None:
        """Stop calling ``obs``."""
        self._failure_observers.remove(obs)

    def lost(self, reason: str) -> None:
        """Declare the engine lost (died, disconnected).

        The running and every queued command fail with
        :class:`~kernel.error.EngineError` naming the engine and ``reason``,
        the failure observers are called, every later call fails at once the
        same way, and results the engine sends late are ignored.
        """
        if self.is_lost:
            return
        self._lost_reason = reason
        cmds = self._in_flight + list(self._queue) + list(self._tasks)
        self._in_flight, self._queue, self._tasks = [], collections.deque(), collections.deque()
        for cmd in cmds:
            cmd.done = True
            cmd.deferred.errback(Failure(self._lost_error(cmd.description)))
        f = Failure(self._lost_error())
        for obs in list(self._failure_observers):
            try:
                obs(f)
            except Exception:
                log.err(None, f"failure observer {obs!r} of engine {self.id} failed")

    # -- bypassing the queue -----------------------------------------------

    def interrupt(self) -> Deferred:
        """Interrupt the running command now (not queued); fires as
        :meth:`EngineService.interrupt` (False if the engine cannot be
        interrupted)."""
        if self.is_lost:
            return fail(self._lost_error("interrupt()"))
        method = getattr(self.engine, "interrupt", None)
        if method is None:
            return succeed(False)
        return maybeDeferred(method)

    def get_properties(self, keys: str | list[str] | None = None) -> Deferred:
        """Read properties now (not queued)."""
        if self.is_lost:
            return fail(self._lost_error("get_properties()"))
        return maybeDeferred(self.engine.get_properties, keys)

    def has_properties(self, keys: str | list[str]) -> Deferred:
        """Check properties now (not queued)."""
        if self.is_lost:
            return fail(self._lost_error("has_properties()"))
        return maybeDeferred(self.engine.has_properties, keys)

    # -- queued ------------------------------------------------------------

    def execute(self, lines: str) -> Deferred:
        """Queue :meth:`IEngineCore.execute`."""
        return self._enqueue("execute", lines)

    def push(self, namespace: dict[str, Any]) -> Deferred:
        """Queue :meth:`IEngineCore.push`."""
        return self._enqueue("push", namespace)

    def pull(self, keys: str | list[str]) -> Deferred:
        """Queue :meth:`IEngineCore.pull`."""
        return self._enqueue("pull", keys)

    def push_function(self, namespace: dict[str, Callable]) -> Deferred:
        """Queue :meth:`IEngineCore.push_function`."""
        return self._enqueue("push_function", namespace)

    def pull_function(self, keys: str | list[str]) -> Deferred:
        """Queue :meth:`IEngineCore.pull_function`."""
        return self._enqueue("pull_function", keys)

    def get_result(self, i: int | None = None) -> Deferred:
        """Queue :meth:`IEngineCore.get_result`."""
        return self._enqueue("get_result", i)

    def reset(self) -> Deferred:
        """Queue :meth:`IEngineCore.reset`."""
        return self._enqueue("reset")

    def keys(self) -> Deferred:
        """Queue :meth:`IEngineCore.keys`."""
        return self._enqueue("keys")

    def kill(self) -> Deferred:
        """Queue :meth:`IEngineCore.kill` (it runs after the commands before it)."""
        return self._enqueue("kill")

    def push_serialized(self, namespace: dict[str, serialized.Serialized]) -> Deferred:
        """Queue :meth:`IEngineSerialized.push_serialized`."""
        return self._enqueue("push_serialized", namespace)

    def pull_serialized(self, keys: str | list[str]) -> Deferred:
        """Queue :meth:`IEngineSerialized.pull_serialized`."""
        return self._enqueue("pull_serialized", keys)

    def set_properties(self, properties: dict[str, Any]) -> Deferred:
        """Queue :meth:`IEngineProperties.set_properties`."""
        return self._enqueue("set_properties", properties)

    def del_properties(self, keys: str | list[str]) -> Deferred:
        """Queue :meth:`IEngineProperties.del_properties`."""
        return self._enqueue("del_properties", keys)

    def clear_properties(self) -> Deferred:
        """Queue :meth:`IEngineProperties.clear_properties`."""
        return self._enqueue("clear_properties")

    def run_task(
        self,
        payload: serialized.Serialized,
        clear_before: bool = False,
        clear_after: bool = False,
        key: str | None = None,
    ) -> Deferred:
        """Queue a task behind the waiting commands (see
        :meth:`IEngineTaskQueue.run_task`).

        :param key: names the task for :meth:`abort_task`.
        """
        cmd = _Command(
            "run_task", (payload,), {"clear_before": clear_before, "clear_after": clear_after}, key
        )
        return self._enqueue_task(cmd)

    def _enqueue_task(self, cmd: _Command) -> Deferred:
        if self.is_lost:
            return fail(self._lost_error(cmd.description))
        self._tasks.append(cmd)
        self._pump()
        return cmd.deferred

    def abort_task(self, key: str, interrupt: bool = True) -> Deferred:
        """Take back a waiting task, or interrupt it if it runs (see
        :meth:`IEngineTaskQueue.abort_task`).

        A task still here is withdrawn. One sent on to an engine that queues
        tasks itself is aborted there (which decides); one sent to any other
        engine is running (it runs alone), so it is interrupted if
        ``interrupt``.

        :returns: Deferred firing ``"withdrawn"``, ``"interrupted"``,
            ``"running"`` or ``"finished"``.
        """
        if key is None:
            return succeed(FINISHED)
        if self.is_lost:
            return fail(self._lost_error(f"abort_task({key!r})"))
        for cmd in self._tasks:
            if cmd.key == key:
                self._tasks.remove(cmd)
                self._withdrawn(cmd)
                return succeed(WITHDRAWN)
        for cmd in self._in_flight:
            if cmd.key == key:
                if self._engine_queues_tasks:
                    return maybeDeferred(self.engine.abort_task, key, interrupt=interrupt)
                if not interrupt:
                    return succeed(RUNNING)
                return self.interrupt().addCallback(
                    lambda interrupted: INTERRUPTED if interrupted else FINISHED
                )
        return succeed(FINISHED)
