"""The load-balanced, fault-tolerant task controller.

:class:`TaskController` sits on a :class:`~kernel.controllerservice.ControllerService`
and hands tasks (``(flags, payload)`` specs, see :mod:`kernel.task`) to its
engines. It never opens a payload or a result: it routes blobs, reads the
plain-data flags, and judges engine failures by their plain description
(:func:`kernel.error.engine_failure_info`).

The life of a task::

    waiting ──deps met──▶ ready ──scheduler──▶ assigned ──▶ sent ──▶ succeeded
       │                    ▲                   (per-engine         failed
       └──impossible/timeout┴──────── retry / UnmetDependency ─────  aborted

- *waiting*: its ``after``/``follow`` tasks are not done. It is indexed under
  each unfinished dependency, so a finishing task re-judges only its own
  dependents, each in O(size of its dependency).
- *ready*: the scheduler places it on an engine below the high-water mark,
  with the chosen scheme, avoiding engines that rejected it
  (:class:`~kernel.error.UnmetDependency`) and preferring ones it has not
  failed on.
- *assigned*: counted in the engine's load, not yet sent.
- *sent*: each engine is sent up to ``pipeline`` tasks at once
  (:data:`DEFAULT_PIPELINE` by default), so it never idles for a round trip
  between short tasks. They wait in the engine's task queue
  (:class:`~kernel.interfaces.IEngineTaskQueue`: over the native transport
  on the engine itself, otherwise in its
  :class:`~kernel.engineservice.QueuedEngine`), which multiengine commands
  overtake: a command waits for at most the one task running when it came.
  An aborted task that has not started there is withdrawn and never runs;
  one that has started is interrupted. When an engine runs out of tasks and
  none is ready, a task waiting behind a busy engine's running one is
  withdrawn there (if it has not started) and placed again, so a long task
  does not hold back the one sent after it. ``pipeline=1`` sends one task
  at a time. An engine without a task queue (no ``abort_task``) is always
  sent one at a time. While an engine's tasks are short (the last one ran
  under :data:`SHORT_TASK` seconds there), it is sent up to
  ``short_pipeline`` (:data:`DEFAULT_SHORT_PIPELINE`) at once: a deeper
  queue keeps it busy while the controller is slow to answer, and lets
  several tasks and results share one network write. The next task that
  runs longer brings the depth back to ``pipeline``, so tasks of unknown
  length are balanced as before.

Every change is written to the task DB (:mod:`kernel.taskdb`); a finished
task's result lives only there.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel.dependency import Dependency
from kernel.error import (
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    InvalidTaskID,
    RemoteError,
    TaskAborted,
    TaskAlreadyCompleted,
    TaskError,
    engine_failure_info,
)
from kernel.interfaces import IMapper, ITaskController, ITaskSubmission
from kernel.scheduler import LoadTable
from kernel.serialized import Serialized
from kernel.task import TaskResult
from kernel.taskdb.memory import DictDB
from kernel.taskmapper import MapperMixin

__all__ = [
    "TaskController",
    "normalize_flags",
    "DEFAULT_FLAGS",
    "DEFAULT_PIPELINE",
    "DEFAULT_SHORT_PIPELINE",
    "SHORT_TASK",
    "MAX_RESERVED_TASKIDS",
]

#: The most taskids one :meth:`TaskController.reserve_taskids` call grants.
MAX_RESERVED_TASKIDS = 1_000_000

#: Tasks sent to one engine at once, by default: the running one and the
#: next, so an engine starts its next task without waiting for a round
#: trip to the controller (see the module docstring).
DEFAULT_PIPELINE = 2

#: Tasks sent to one engine at once while its tasks are short (see the
#: module docstring), by default.
DEFAULT_SHORT_PIPELINE = 16

#: A task that ran for less than this, seconds (by its engine's clock), is
#: short: its engine may be sent ``short_pipeline`` tasks at once.
SHORT_TASK = 0.002

#: The flags of a task spec and their defaults.
DEFAULT_FLAGS: dict[str, Any] = {
    "clear_before": False,
    "clear_after": False,
    "retries": 0,
    "timeout": None,
    "after": None,
    "follow": None,
    "recovery_task": None,
    "description": "",
}


def normalize_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Check a task's flags and fill in defaults.

    :raises TypeError: if ``flags`` is not a dict.
    :raises ValueError: naming an unknown flag or a bad value.
    """
    if not isinstance(flags, dict):
        raise TypeError(f"task flags must be a dict, got {type(flags).__name__}")
    unknown = set(flags) - set(DEFAULT_FLAGS)
    if unknown:
        raise ValueError(
            f"unknown task flags {sorted(unknown)}; valid flags: {sorted(DEFAULT_FLAGS)}"
        )
    out = dict(DEFAULT_FLAGS, **flags)
    retries = out["retries"]
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    timeout = out["timeout"]
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise ValueError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
    out["timeout"] = timeout or None
    for key in ("after", "follow"):
        if out[key] is not None:
            try:
                out[key] = Dependency.from_dict(out[key]).as_dict()
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"bad {key} dependency {out[key]!r}: {e}") from None
    recovery = out["recovery_task"]
    if recovery is not None:
        if (
            not isinstance(recovery, dict)
            or not isinstance(recovery.get("payload"), (bytes, bytearray, memoryview))
            or not isinstance(recovery.get("flags"), dict)
        ):
            raise ValueError("recovery_task must be {'flags': dict, 'payload': bytes}")
        out["recovery_task"] = {
            "flags": normalize_flags(recovery["flags"]),
            "payload": bytes(recovery["payload"]),
        }
    out["clear_before"] = bool(out["clear_before"])
    out["clear_after"] = bool(out["clear_after"])
    out["description"] = str(out["description"] or "")
    return out


class _Task:
    """The controller's state for one unfinished task."""

    def __init__(self, taskid: int, flags: dict[str, Any], payload: Serialized, now: float):
        self.taskid = taskid
        self.submitted = now
        self.stage = "new"  # waiting | ready | assigned | sent | done
        self.waiters: list[Deferred] = []
        self.timer = None
        self.timed_out = False
        self.attempt = 0  # bumped per send; results of older attempts are ignored
        self.attempts = 0
        self.worker: _Worker | None = None
        self.started: float | None = None
        self.set_spec(flags, payload)

    def set_spec(self, flags: dict[str, Any], payload: Serialized) -> None:
        """Take on a (new) spec: at submission, and for a recovery task."""
        self.flags = flags
        self.payload = payload
        self.retries_left = flags["retries"]
        self.after = Dependency.from_dict(flags["after"]) if flags["after"] else None
        self.follow = Dependency.from_dict(flags["follow"]) if flags["follow"] else None
        #: outcomes of its dependencies as they finish: taskid -> (ok, worker serial)
        self.known: dict[int, tuple[bool, int | None]] = {}
        self.blacklist: set[int] = set()  # workers that raised UnmetDependency
        self.tried: set[int] = set()  # workers it failed on

    def outcome(self, taskid: int) -> bool | None:
        known = self.known.get(taskid)
        return None if known is None else known[0]

    def __repr__(self) -> str:
        return f"<task {self.taskid} {self.stage}>"


class _Worker:
    """The controller's view of one registered engine."""

    def __init__(self, serial: int, engine_id: int, engine: Any):
        self.serial = serial  # unique per registration (engine ids are reused)
        self.engine_id = engine_id
        self.engine = engine
        self.assigned: collections.deque[_Task] = collections.deque()
        #: tasks sent to the engine and not yet back, oldest first -> attempt token
        self.sent: dict[_Task, int] = {}
        #: the most tasks sent to the engine at once: now, for tasks of
        #: unknown length, and while its tasks are short
        self.depth = self.base_depth = self.short_depth = 1
        #: whether the engine has a task queue (IEngineTaskQueue)
        self.queues_tasks = False
        #: a task being taken back from the engine to run elsewhere
        self.moving: _Task | None = None
        self.lost = False

    def __repr__(self) -> str:
        return f"<worker {self.serial} engine {self.engine_id}>"


class _Done:
    """What is kept in memory about a finished task (its record is in the DB)."""

    __slots__ = ("status", "serial")

    def __init__(self, status: str, serial: int | None):
        self.status = status
        self.serial = serial


#: Failures (by type name) that end a task at once, whatever its retries.
_NEVER_RETRIED = frozenset({"ImpossibleDependency", "InvalidDependency", "DependencyTimeout"})

_WAIT = "wait"
_READY = "ready"


@implementer(ITaskController, ITaskSubmission, IMapper)
class TaskController(MapperMixin, service.Service):
    """The load-balanced task queue over a controller's engines.

    :param controller: an :class:`~kernel.interfaces.IControllerCore` whose
        engines provide :class:`~kernel.interfaces.IEngineTasks` (normally
        :class:`~kernel.engineservice.QueuedEngine`).
    :param scheme: a scheduling scheme name (see :mod:`kernel.scheduler`) or a
        callable ``scheme(loads) -> index``.
    :param hwm: the most tasks outstanding on one engine at a time (0: no
        limit). None, the default, allows each engine as many as it is sent at
        once (see ``pipeline``): an engine gets its next task when it finishes
        one, the best balance for tasks of unknown length.
    :param pipeline: the most tasks sent to one engine's task queue at a
        time (default :data:`DEFAULT_PIPELINE`); 1 sends the next only when
        one finishes. An engine without a task queue (no ``abort_task``) is
        sent one at a time.
    :param short_pipeline: the most tasks sent to one engine's task queue
        at a time while its tasks are short (see the module docstring;
        default :data:`DEFAULT_SHORT_PIPELINE`); never fewer than
        ``pipeline``, and unused when ``pipeline`` is 1.
    :param db: the :class:`~kernel.interfaces.ITaskDB` to record tasks in
        (default: a new :class:`~kernel.taskdb.memory.DictDB`).
    :param clock: an ``IReactorTime`` for timeouts (default: the reactor).
    :param first_taskid: the first taskid to hand out (a controller restarted
        on an existing task database starts past the ids it holds and the
        blocks it granted: its ``next_taskid()``).
    """

    name = "task_controller"

    #: Seconds between checks whether an aborted task that is still queued on
    #: its engine has started (so it can be interrupted).
    abort_poll_interval = 0.05

    def __init__(
        self,
        controller: Any,
        scheme: str | Callable[..., int] = "leastload",
        hwm: int | None = None,
        db: Any = None,
        clock: Any = None,
        first_taskid: int = 0,
        pipeline: int = DEFAULT_PIPELINE,
        short_pipeline: int = DEFAULT_SHORT_PIPELINE,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.controller = controller
        self.clock = clock
        self.db = DictDB() if db is None else db
        for name, depth in (("pipeline", pipeline), ("short_pipeline", short_pipeline)):
            if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
                raise ValueError(f"{name} must be an int >= 1, got {depth!r}")
        self._hwm = hwm
        self.pipeline = pipeline
        self.short_pipeline = short_pipeline
        self._table = LoadTable(scheme, 0 if hwm is None else hwm)
        self._first_taskid = self._next_taskid = first_taskid
        #: blocks of taskids granted to clients: start -> [first unused, stop]
        self._grants: dict[int, list[int]] = {}
        self._grant_starts: list[int] = []  # sorted
        self._serials = itertools.count()
        self._tasks: dict[int, _Task] = {}  # unfinished tasks
        self._done: dict[int, _Done] = {}  # finished, not yet cleared
        self._ready: collections.OrderedDict[int, _Task] = collections.OrderedDict()
        self._dependents: dict[int, set[int]] = {}
        self._workers: dict[int, _Worker] = {}  # by serial
        self._by_id: dict[int, _Worker] = {}  # by engine id
        self._finished_deps: collections.deque[tuple[int, bool, int | None]] = collections.deque()
        self._to_feed: set[_Worker] = set()
        self._idle: set[_Worker] = set()  # workers that ran out of tasks
        self._looping = False
        self._again = False
        self._db_tail: Deferred = succeed(None)
        self._db_pending = 0  # DB calls started or queued and not yet finished
        self._stopped = False
        controller.on_register_engine_do(self._engine_registered, True)
        controller.on_unregister_engine_do(self._engine_unregistered, True)
        for engine_id in sorted(controller.engines):
            self._engine_registered(engine_id)

    # -- configuration -------------------------------------------------------

    @property
    def scheme(self) -> Callable[..., int]:
        """The scheduling scheme in use."""
        return self._table.scheme

    @property
    def hwm(self) -> int | None:
        """The per-engine high-water mark (0: unlimited; None: each engine's
        pipeline depth)."""
        return self._hwm

    def stopService(self):  # noqa: N802 - Twisted's name
        """Stop: stop watching engines, and end every unfinished task as
        aborted (so no caller waits for it forever). Later submissions fail."""
        self._stopped = True
        self.controller.on_register_engine_do_not(self._engine_registered)
        self.controller.on_unregister_engine_do_not(self._engine_unregistered)
        for state in list(self._tasks.values()):
            self._finish(
                state,
                "aborted",
                error=TaskAborted(
                    f"the task controller stopped before task {state.taskid} finished"
                ),
            )
        return super().stopService()

    # -- ITaskController -----------------------------------------------------

    def run(self, task: Any) -> Deferred:
        """Submit an :class:`~kernel.interfaces.ITask`; fires its int taskid.

        :raises: (errback) whatever ``task.to_spec()`` raises (e.g.
            :class:`~kernel.error.SerializationError`), or as :meth:`run_spec`.
        """
        try:
            flags, payload = task.to_spec()
        except Exception:
            return fail()
        return self.run_spec(flags, payload)

    def run_spec(self, flags: dict[str, Any], payload: Serialized) -> Deferred:
        """Submit a task already split into ``(flags, payload)``; fires its taskid.

        This is what a network adapter calls: the payload stays opaque.

        :raises: (errback) ``ValueError``/``TypeError`` for bad flags or a
            payload that is not a :class:`~kernel.serialized.Serialized`.
        """
        if self._stopped:
            return fail(self._stopped_error())
        try:
            flags = _check_spec(flags, payload)
        except (TypeError, ValueError):
            return fail()
        taskid = self._next_taskid
        self._next_taskid += 1
        self._accept(taskid, flags, payload)
        self._kick()
        return succeed(taskid)

    def _accept(self, taskid: int, flags: dict[str, Any], payload: Serialized) -> None:
        """Take on a checked spec under ``taskid`` (the caller kicks the scheduler)."""
        state = _Task(taskid, flags, payload, self.clock.seconds())
        self._tasks[taskid] = state
        self._db_write(
            "add_record",
            taskid,
            {
                "status": "pending",
                "description": flags["description"],
                "flags": _flags_for_record(flags),
                "payload": payload.to_bytes(),
                "submitted": state.submitted,
                "attempts": 0,
            },
        )
        if flags["timeout"]:
            state.timer = self.clock.callLater(flags["timeout"], self._on_timeout, state)
        self._admit(state)

    def _stopped_error(self) -> TaskError:
        return TaskError("this task controller has stopped: submit tasks to a running one")

    # -- ITaskSubmission -------------------------------------------------------

    def reserve_taskids(self, count: int) -> Deferred:
        """Grant a block of ``count`` fresh taskids (see
        :meth:`kernel.interfaces.ITaskSubmission.reserve_taskids`); fires
        ``[start, stop]``.

        The block is recorded in the task DB first (when it can record
        reservations), so a controller restarted on it never reuses the ids.

        :raises: (errback) ValueError unless 1 <= ``count`` <=
            :data:`MAX_RESERVED_TASKIDS`; TaskError once stopped.
        """
        if self._stopped:
            return fail(self._stopped_error())
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or not 1 <= count <= MAX_RESERVED_TASKIDS
        ):
            return fail(
                ValueError(
                    f"reserve_taskids takes a count from 1 to {MAX_RESERVED_TASKIDS}, not {count!r}"
                )
            )
        start = self._next_taskid
        stop = self._next_taskid = start + count
        self._grants[start] = [start, stop]
        bisect.insort(self._grant_starts, start)
        if getattr(self.db, "reserve_taskids_below", None) is None:
            return succeed([start, stop])
        d = self._db_call("reserve_taskids_below", stop)
        d.addCallback(lambda _: [start, stop])
        return d

    def run_batch(self, specs: Iterable[Any]) -> Deferred:
        """Submit ``[taskid, flags, payload]`` specs numbered from granted
        blocks (see :meth:`kernel.interfaces.ITaskSubmission.run_batch`).

        A spec with bad flags or payload becomes a failed task (its
        TaskResult raises the ValueError/TypeError that names the problem);
        a taskid already taken is ignored, so a batch sent again changes
        nothing. Fires ``[[taskid, exception], ...]`` for specs refused
        outright: a taskid that is not free in a granted block.

        :raises: (errback) TypeError if ``specs`` is not a list of triples;
            TaskError once stopped.
        """
        if self._stopped:
            return fail(self._stopped_error())
        if not isinstance(specs, (list, tuple)) or not all(
            isinstance(spec, (list, tuple)) and len(spec) == 3 for spec in specs
        ):
            return fail(TypeError("run_batch takes a list of [taskid, flags, payload] specs"))
        refused: list[list[Any]] = []
        for taskid, flags, payload in specs:
            verdict = self._claim_taskid(taskid)
            if verdict is None:
                continue  # sent before: already taken
            if isinstance(verdict, Exception):
                refused.append([taskid, verdict])
                continue
            try:
                checked = _check_spec(flags, payload)
            except (TypeError, ValueError) as e:
                self._record_rejected(taskid, flags, e)
                continue
            self._accept(taskid, checked, payload)
        self._kick()
        return succeed(refused)

    def _claim_taskid(self, taskid: Any) -> bool | InvalidTaskID | None:
        """May ``taskid`` start a new task? True (and it is taken now), None
        if it was taken before (a resubmission), or the error refusing it.

        Clients use each block's ids in increasing order, so a block only
        keeps its first unused id: those below it were taken (or skipped).
        An id this controller handed out that lies in no open block was
        taken, even if its task has been cleared since.
        """
        if isinstance(taskid, int) and not isinstance(taskid, bool):
            if taskid in self._tasks or taskid in self._done:
                return None
            i = bisect.bisect_right(self._grant_starts, taskid) - 1
            if i >= 0:
                start = self._grant_starts[i]
                grant = self._grants[start]
                if taskid < grant[1]:
                    if taskid < grant[0]:
                        return None  # taken (or skipped) earlier in this block
                    grant[0] = taskid + 1
                    if grant[0] == grant[1]:
                        del self._grants[start]
                        del self._grant_starts[i]
                    return True
            if self._first_taskid <= taskid < self._next_taskid:
                return None
        return InvalidTaskID(
            f"task id {taskid!r} was not reserved for a new task on this controller "
            "(not granted by reserve_taskids, or granted before the controller restarted): "
            "submit the task again with run()"
        )

    def _record_rejected(self, taskid: int, flags: Any, error: Exception) -> None:
        """Record ``taskid`` as failed at once: its spec was not acceptable."""
        now = self.clock.seconds()
        self._done[taskid] = _Done("failed", None)
        description = flags.get("description") if isinstance(flags, dict) else None
        self._db_write(
            "add_record",
            taskid,
            {
                "status": "failed",
                "description": description if isinstance(description, str) else "",
                "submitted": now,
                "completed": now,
                "attempts": 0,
                "error": _describe(error, None).to_dict(),
            },
        )
        self._finished_deps.append((taskid, False, None))

    def get_task_result(self, taskid: int, block: bool = False) -> Deferred:
        """Fire the :class:`~kernel.task.TaskResult` of ``taskid``, or None if
        it is not done and ``block`` is false.

        :raises: (errback) :class:`~kernel.error.InvalidTaskID` if unknown or cleared.
        """
        if taskid in self._done:
            return self._read_result(taskid)
        state = self._tasks.get(taskid)
        if state is None:
            return fail(self._invalid(taskid))
        if not block:
            return succeed(None)
        d = self._waiter(state)
        d.addCallback(lambda _: self._read_result(taskid))
        return d

    def get_task_results(self, taskids: Iterable[int], block: bool = False) -> Deferred:
        """Fire the TaskResults of several tasks, in order (None for each one
        not done, unless ``block``): :meth:`get_task_result` for many at once.

        :raises: (errback) :class:`~kernel.error.InvalidTaskID` for an unknown
            or cleared id (checked before waiting).
        """
        taskids = self._as_known_ids(taskids)
        if isinstance(taskids, Deferred):
            return taskids

        async def collect() -> list[Any]:
            return [await self.get_task_result(tid, block) for tid in taskids]

        return ensureDeferred(collect())

    def abort(self, taskid: int) -> Deferred:
        """Abort a task (see :meth:`ITaskController.abort`). Fires None.

        A task waiting in the controller is dropped; one waiting in an
        engine's task queue is withdrawn there (it never starts); one running
        is interrupted. Its result is a :class:`~kernel.error.TaskAborted`
        failure either way.
        """
        state = self._tasks.get(taskid)
        if state is None:
            if taskid in self._done:
                return fail(
                    TaskAlreadyCompleted(
                        f"task {taskid} already finished ({self._done[taskid].status}); "
                        "there is nothing to abort"
                    )
                )
            return fail(self._invalid(taskid))
        if state.stage == "ready":
            del self._ready[taskid]
        elif state.stage == "assigned":
            worker = state.worker
            worker.assigned.remove(state)
            self._table.finish_job(worker.serial)
        sent = state.stage == "sent"
        self._finish(
            state,
            "aborted",
            error=TaskAborted(f"task {taskid} was aborted before it completed"),
        )
        if sent:
            # after _finish: what the engine says of the attempt (perhaps at
            # once) is then ignored
            self._abort_sent(state)
        return succeed(None)

    def barrier(self, taskids: Iterable[int]) -> Deferred:
        """Fire None once every task in ``taskids`` is done, whatever its outcome.

        :raises: (errback) :class:`~kernel.error.InvalidTaskID` for an unknown id.
        """
        if isinstance(taskids, int):
            taskids = [taskids]
        waits = []
        for tid in taskids:
            if tid in self._done:
                continue
            state = self._tasks.get(tid)
            if state is None:
                return fail(self._invalid(tid))
            waits.append(self._waiter(state))
        if not waits:
            return succeed(None)
        return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallback(
            lambda _: None
        )

    def spin(self) -> Deferred:
        """Run the scheduler once. Fires None."""
        self._kick()
        return succeed(None)

    def queue_status(self, verbose: bool = False) -> Deferred:
        """Fire ``{'pending', 'running', 'succeeded', 'failed', 'aborted'}``:
        counts, or sorted lists of taskids when ``verbose``.

        *running* tasks are each the oldest task sent to its engine (the one
        it runs, unless a multiengine command runs first); *pending* ones
        wait, in the controller (for dependencies or an engine) or in an
        engine's pipeline behind its running task.
        """
        groups: dict[str, list[int]] = {
            k: [] for k in ("pending", "running", "succeeded", "failed", "aborted")
        }
        heads = {next(iter(w.sent)) for w in self._workers.values() if w.sent}
        for tid, state in self._tasks.items():
            groups["running" if state in heads else "pending"].append(tid)
        for tid, done in self._done.items():
            groups[done.status].append(tid)
        if verbose:
            return succeed({k: sorted(v) for k, v in groups.items()})
        return succeed({k: len(v) for k, v in groups.items()})

    def clear(self, taskids: Iterable[int] | None = None) -> Deferred:
        """Forget finished tasks and drop their records (all finished tasks when
        ``taskids`` is None). Unfinished tasks in ``taskids`` are left alone.

        :raises: (errback) :class:`~kernel.error.InvalidTaskID` for an unknown id
            (nothing is cleared then).
        """
        if taskids is None:
            drop = list(self._done)
        else:
            taskids = self._as_known_ids(taskids)
            if isinstance(taskids, Deferred):
                return taskids
            drop = [tid for tid in taskids if tid in self._done]
        for tid in drop:
            del self._done[tid]
        return self._db_call("drop_records", drop)

    # -- the task database -----------------------------------------------------

    def db_query(self, query: dict[str, Any], keys: Iterable[str] | str | None = None) -> Deferred:
        """Fire the task records matching the MongoDB-style ``query`` (see
        :meth:`kernel.interfaces.ITaskDB.find_records`); blobs stay bytes.

        :raises: (errback) ``TypeError`` if ``query`` is not a dict.
        """
        if not isinstance(query, dict):
            return fail(
                TypeError(
                    f"db_query takes a dict query, e.g. {{'status': 'failed'}}, "
                    f"not a {type(query).__name__}"
                )
            )
        return self._db_call("find_records", query, keys)

    def resubmit(self, taskids: Iterable[int]) -> Deferred:
        """Run finished tasks again, as new tasks with the same body and flags
        (their ``after``/``follow`` dependencies, already met once, dropped).

        :returns: Deferred firing the list of new taskids, in order.
        :raises: (errback) :class:`~kernel.error.InvalidTaskID` for an unknown
            id; ``ValueError`` for a task that has not finished.
        """
        if isinstance(taskids, int):
            taskids = [taskids]
        taskids = list(taskids)
        for tid in taskids:
            if tid in self._tasks:
                return fail(
                    ValueError(
                        f"task {tid} has not finished: only finished tasks can be resubmitted "
                        "(abort it first to rerun it)"
                    )
                )
            if tid not in self._done:
                return fail(self._invalid(tid))

        async def again() -> list[int]:
            new = []
            for tid in taskids:
                record = await self._db_call("get_record", tid)
                flags = dict(record["flags"], after=None, follow=None)
                payload = Serialized.from_bytes(record["payload"])
                new.append(await self.run_spec(flags, payload))
            return new

        return ensureDeferred(again())

    # -- engines -------------------------------------------------------------

    def _engine_registered(self, id: int) -> None:
        engine = self.controller.engines.get(id)
        if engine is None:
            return
        old = self._by_id.get(id)
        if old is not None:
            self._retire(old, "it was replaced by a new engine with the same id")
        worker = _Worker(next(self._serials), id, engine)
        worker.queues_tasks = callable(getattr(engine, "abort_task", None))
        base = self.pipeline if worker.queues_tasks else 1
        short = max(base, self.short_pipeline) if base > 1 else base
        if self._hwm:
            base, short = min(base, self._hwm), min(short, self._hwm)
        worker.depth = worker.base_depth = base
        worker.short_depth = short
        self._workers[worker.serial] = worker
        self._by_id[id] = worker
        self._table.add_engine(worker.serial, worker.depth if self._hwm is None else None)
        self._idle.add(worker)  # it may take tasks waiting on busy engines
        self._kick()

    def _engine_unregistered(self, id: int) -> None:
        worker = self._by_id.get(id)
        if worker is not None:
            self._retire(worker, "it unregistered")
        self._kick()

    def _retire(self, worker: _Worker, why: str) -> None:
        """Stop using ``worker``: its unsent tasks go back to the ready queue,
        its running task is retried or failed with EngineError."""
        if worker.lost:
            return
        worker.lost = True
        self._workers.pop(worker.serial, None)
        if self._by_id.get(worker.engine_id) is worker:
            del self._by_id[worker.engine_id]
        self._table.remove_engine(worker.serial)
        self._to_feed.discard(worker)
        self._idle.discard(worker)
        for state in reversed(worker.assigned):
            self._make_ready(state, front=True)
        worker.assigned.clear()
        sent, worker.sent = worker.sent, {}
        for state, token in sent.items():
            if state.stage == "sent" and state.attempt == token:
                state.attempt += 1  # ignore whatever the lost engine still sends
                exc = EngineError(
                    f"engine {worker.engine_id} was lost ({why}) while running task "
                    f"{state.taskid}; give the task retries to have it rerun elsewhere"
                )
                self._retry_or_fail(state, _describe(exc, worker.engine_id))

    # -- the scheduling loop -------------------------------------------------

    def _kick(self) -> None:
        """Propagate finished dependencies, place ready tasks, feed engines;
        repeat until nothing changes. Re-entrant calls just ask for another
        round, so synchronous engines cannot recurse deeply."""
        if self._looping:
            self._again = True
            return
        self._looping = True
        try:
            while True:
                self._again = False
                self._propagate()
                self._place_ready()
                self._feed_engines()
                if self._idle and not self._ready:
                    self._rebalance()
                if not (self._again or self._finished_deps):
                    break
        finally:
            self._looping = False

    def _admit(self, state: _Task) -> None:
        """Analyse a task's graph dependencies: fail, wait or make ready."""
        pending = []
        unknown = []
        for dep in (state.after, state.follow):
            if not dep:
                continue
            for tid in dep:
                if tid in state.known:
                    continue
                done = self._done.get(tid)
                if done is not None:
                    state.known[tid] = (done.status == "succeeded", done.serial)
                elif tid in self._tasks and tid != state.taskid:
                    pending.append(tid)
                else:
                    unknown.append(tid)
        if unknown:
            self._finish(
                state,
                "failed",
                error=InvalidDependency(
                    f"task {state.taskid} depends on unknown task(s) {sorted(set(unknown))}: "
                    "they were never submitted or have been cleared"
                ),
            )
            return
        verdict = self._judge(state)
        if isinstance(verdict, Exception):
            self._finish(state, "failed", error=verdict)
        elif verdict is _READY:
            self._make_ready(state)
        else:
            state.stage = "waiting"
            for tid in pending:
                self._dependents.setdefault(tid, set()).add(state.taskid)

    def _judge(self, state: _Task) -> str | Exception:
        """Are a task's graph dependencies met (O(size of the dependencies))?"""
        for name, dep in (("after", state.after), ("follow", state.follow)):
            if dep and dep.is_unreachable(state.outcome):
                return ImpossibleDependency(
                    f"task {state.taskid}'s {name} dependency {dep!r} can never be met: "
                    f"{_explain_outcomes(dep, state.outcome)}"
                )
        follow = state.follow
        if follow and follow.all:
            engines = {state.known[t][1] for t in follow.counting(state.outcome)}
            if len(engines) > 1:
                return ImpossibleDependency(
                    f"task {state.taskid} follows tasks {sorted(follow)} with all=True, but "
                    "they ran on different engines, so no single engine can satisfy it; "
                    "use Dependency(..., all=False) to run where any of them ran"
                )
        for dep in (state.after, follow):
            if dep and not dep.is_met(state.outcome):
                return _WAIT
        return _READY

    def _propagate(self) -> None:
        """Re-judge the dependents of tasks that finished."""
        while self._finished_deps:
            tid, ok, serial = self._finished_deps.popleft()
            for dependent_id in self._dependents.pop(tid, ()):
                state = self._tasks.get(dependent_id)
                if state is None or state.stage != "waiting":
                    continue
                state.known[tid] = (ok, serial)
                verdict = self._judge(state)
                if isinstance(verdict, Exception):
                    self._finish(state, "failed", error=verdict)
                elif verdict is _READY:
                    self._make_ready(state)

    def _make_ready(self, state: _Task, front: bool = False) -> None:
        state.stage = "ready"
        state.worker = None
        self._ready[state.taskid] = state
        if front:
            self._ready.move_to_end(state.taskid, last=False)

    def _place_ready(self) -> None:
        """Assign ready tasks to engines, oldest first, while engines have room.

        Stops at the first moment no engine has room, so a long ready queue
        costs nothing while the engines are full.
        """
        if not self._workers:
            return  # tasks wait for engines
        placed: list[_Task] = []
        impossible: list[tuple[_Task, Exception]] = []
        for state in self._ready.values():
            if not self._table.has_room_anywhere():
                break
            allowed = self._allowed_workers(state)
            if isinstance(allowed, Exception):
                impossible.append((state, allowed))
                continue
            serial = self._choose(state, allowed)
            if serial is None:
                continue
            worker = self._workers[serial]
            placed.append(state)
            state.stage = "assigned"
            state.worker = worker
            worker.assigned.append(state)
            self._table.add_job(serial)
            self._to_feed.add(worker)
        for state in placed:
            del self._ready[state.taskid]
        for state, error in impossible:
            self._finish(state, "failed", error=error)

    def _allowed_workers(self, state: _Task) -> set[int] | None | Exception:
        """The workers a task may go to (None: any), or why it can go nowhere."""
        allowed: set[int] | None = None
        follow = state.follow
        if follow:
            ran_on = {state.known[t][1] for t in follow.counting(state.outcome)}
            allowed = {s for s in ran_on if s in self._workers}
            if not allowed:
                return ImpossibleDependency(
                    f"task {state.taskid} must follow tasks {sorted(follow)}, but the engine(s) "
                    "they ran on are gone"
                )
        if state.blacklist:
            allowed = (set(self._workers) if allowed is None else allowed) - state.blacklist
            if not allowed:
                if state.timer is not None and not state.timed_out:
                    return set()  # a new engine may register before the timeout
                rejected = sorted(
                    self._workers[s].engine_id for s in state.blacklist if s in self._workers
                )
                return ImpossibleDependency(
                    f"no registered engine can run task {state.taskid}: its functional "
                    f"dependency was unmet on engine(s) {rejected} (and on every other engine "
                    "it tried); start an engine that meets it, or give the task a timeout "
                    "to wait for one"
                )
        return allowed

    def _choose(self, state: _Task, allowed: set[int] | None) -> int | None:
        if allowed is None and not state.tried:
            return self._table.choose()
        candidates = set(self._workers) if allowed is None else allowed
        fresh = candidates - state.tried
        if fresh:
            serial = self._table.choose(fresh)
            if serial is not None:
                return serial
        return self._table.choose(candidates)

    def _feed_engines(self) -> None:
        """Send each engine its next assigned tasks while it has fewer than
        its pipeline depth in flight."""
        while self._to_feed:
            worker = self._to_feed.pop()
            while not worker.lost and worker.assigned and len(worker.sent) < worker.depth:
                self._send(worker, worker.assigned.popleft())

    def _send(self, worker: _Worker, state: _Task) -> None:
        state.stage = "sent"
        state.attempt += 1
        state.attempts += 1
        token = state.attempt
        worker.sent[state] = token
        state.started = self.clock.seconds()
        changes: dict[str, Any] = {
            "status": "running",
            "engine_id": worker.engine_id,
            "started": state.started,
            "attempts": state.attempts,
        }
        if state.attempts > 1:
            changes["resubmitted"] = state.started
        self._db_write("update_record", state.taskid, changes)
        flags = state.flags
        kwargs = {"clear_before": flags["clear_before"], "clear_after": flags["clear_after"]}
        if worker.queues_tasks:
            kwargs["key"] = _task_key(state.taskid, token)
        d = maybeDeferred(worker.engine.run_task, state.payload, **kwargs)
        d.addCallbacks(
            self._on_result,
            self._on_failure,
            callbackArgs=(state, worker, token),
            errbackArgs=(state, worker, token),
        )
        d.addErrback(log.err, f"task controller: handling the outcome of task {state.taskid}")

    def _release(self, worker: _Worker, state: _Task, token: int) -> None:
        """The engine is done with this attempt: free its slot."""
        if worker.sent.get(state) == token:
            del worker.sent[state]
            if not worker.lost:
                self._table.finish_job(worker.serial)
                self._to_feed.add(worker)
                if not worker.sent and not worker.assigned:
                    self._idle.add(worker)

    def _rebalance(self) -> None:
        """With nothing ready to place: give each engine that ran out of
        tasks one taken back from a busy engine, where it waits behind the
        running one (the newest such task the idle engine may run).

        The busy engine's task queue decides (without interrupting): a task
        taken back fails there with ``TaskWithdrawn`` and is made ready
        again (see :meth:`_on_failure`); one that has started stays.
        """
        while self._idle:
            idle = self._idle.pop()
            if idle.lost or idle.sent or idle.assigned:
                continue
            donors = [
                w
                for w in self._workers.values()
                if len(w.sent) > 1 and w.moving is None and w.queues_tasks
            ]
            donors.sort(key=lambda w: len(w.sent), reverse=True)
            for donor in donors:
                waiting = list(donor.sent)[1:]  # the oldest is (about to be) running
                for state in reversed(waiting):
                    allowed = self._allowed_workers(state)
                    if isinstance(allowed, Exception):
                        continue
                    if allowed is None or idle.serial in allowed:
                        self._take_back(donor, state)
                        break
                else:
                    continue
                break

    def _adapt_depth(self, worker: _Worker, result: Any) -> None:
        """Send ``worker`` more tasks at once while its tasks are short,
        fewer once one is not (see the module docstring)."""
        try:
            short = result["completed"] - result["started"] < SHORT_TASK
        except (KeyError, TypeError):
            short = False  # no times: treat it as long
        depth = worker.short_depth if short else worker.base_depth
        if depth != worker.depth:
            worker.depth = depth
            if self._hwm is None:
                self._table.add_engine(worker.serial, depth)  # its new cap
            self._to_feed.add(worker)

    def _take_back(self, worker: _Worker, state: _Task) -> None:
        """Ask ``worker``'s engine to withdraw ``state`` if it has not started."""
        worker.moving = state
        key = _task_key(state.taskid, state.attempt)

        def done(outcome: Any) -> None:
            if worker.moving is state:
                worker.moving = None
            if isinstance(outcome, Failure):
                log.msg(f"could not take task {state.taskid} back from its engine: {outcome.value}")

        maybeDeferred(worker.engine.abort_task, key, interrupt=False).addBoth(done)

    def _on_result(self, result: dict, state: _Task, worker: _Worker, token: int) -> None:
        self._release(worker, state, token)
        if worker.short_depth != worker.base_depth and not worker.lost:
            self._adapt_depth(worker, result)
        if state.stage == "sent" and state.attempt == token:
            self._finish(state, "succeeded", result=result, worker=worker)  # and kicks
        else:
            self._kick()

    def _on_failure(self, f: Failure, state: _Task, worker: _Worker, token: int) -> None:
        self._release(worker, state, token)
        if state.stage != "sent" or state.attempt != token:
            self._kick()
            return  # aborted, or already handled as an engine loss
        info = _describe(f, worker.engine_id)
        if info.ename == "TaskWithdrawn":
            # taken back (see _rebalance) before it started: place it again
            state.attempts -= 1
            self._make_ready(state, front=True)
        elif info.ename == "UnmetDependency":
            state.blacklist.add(worker.serial)
            self._make_ready(state, front=True)
        elif info.ename in _NEVER_RETRIED:
            # the task itself says it can never run: retrying cannot help
            self._finish(state, "failed", error=info, worker=worker)
        elif info.ename == "EngineError":
            # The engine is gone (or killed): do not send it anything else.
            state.attempt += 1
            self._retire(worker, "it failed with EngineError")
            self._retry_or_fail(state, info, worker)
        else:
            state.tried.add(worker.serial)
            self._retry_or_fail(state, info, worker)
        self._kick()

    def _retry_or_fail(self, state: _Task, info: RemoteError, worker: _Worker | None = None):
        """After a failed attempt: retry, else run the recovery task, else fail."""
        if state.retries_left > 0:
            state.retries_left -= 1
            self._make_ready(state, front=True)
        elif state.flags["recovery_task"] is not None:
            recovery = state.flags["recovery_task"]
            state.set_spec(recovery["flags"], Serialized.from_bytes(recovery["payload"]))
            self._db_write(
                "update_record",
                state.taskid,
                {"description": f"{state.flags['description']} (recovery task)".strip()},
            )
            self._admit(state)
        else:
            self._finish(state, "failed", error=info, worker=worker)

    def _abort_sent(self, state: _Task) -> None:
        """Stop an aborted task that was sent to an engine: its task queue
        withdraws it if it has not started (it never will), else interrupts
        it. The outcome of the task's ``run_task`` is ignored either way."""
        worker = state.worker
        if worker.lost:
            return  # the engine is gone, and the task with it
        if not worker.queues_tasks:
            self._interrupt(state)
            return
        d = maybeDeferred(worker.engine.abort_task, _task_key(state.taskid, state.attempt))
        d.addErrback(
            lambda f: log.msg(f"could not abort task {state.taskid} on its engine: {f.value}")
        )

    def _interrupt(self, state: _Task) -> None:
        """Interrupt an aborted task on an engine without a task queue as
        soon as it runs there.

        Such an engine's queue cannot withdraw a command, and interrupting hits
        whatever runs, so the engine is asked every :attr:`abort_poll_interval`
        seconds until this task is the one running: it is the oldest task
        this controller has sent to the engine (so the oldest ``run_task``
        command there), the oldest command in flight is a ``run_task`` and
        no ``run_task`` still waits in the queue. Then it is interrupted. Its
        outcome is ignored either way.
        """
        worker = state.worker
        engine = worker.engine
        token = state.attempt

        def still_there() -> bool:
            return not worker.lost and worker.sent.get(state) == token

        def running(status: dict) -> bool:
            if next(iter(worker.sent)) is not state:
                return False  # tasks sent before it run first
            pending = status.get("pending")
            if pending is not None and not str(pending).startswith("run_task("):
                return False  # a multiengine command runs first
            return not any(str(q).startswith("run_task(") for q in status.get("queue", []))

        def check(status: dict) -> Any:
            if not still_there():
                return None
            if not running(status):
                self.clock.callLater(self.abort_poll_interval, attempt)
                return None
            return engine.interrupt()

        def attempt() -> None:
            if not still_there():
                return
            if hasattr(engine, "queue_status"):
                d = maybeDeferred(engine.queue_status).addCallback(check)
            else:
                d = maybeDeferred(engine.interrupt)
            d.addErrback(
                lambda f: log.msg(f"could not interrupt aborted task {state.taskid}: {f.value}")
            )

        attempt()

    def _on_timeout(self, state: _Task) -> None:
        state.timer = None
        state.timed_out = True
        if state.stage in ("waiting", "ready", "new"):
            self._ready.pop(state.taskid, None)
            self._finish(
                state,
                "failed",
                error=DependencyTimeout(
                    f"task {state.taskid} could not start within its timeout of "
                    f"{state.flags['timeout']} s: its dependencies were not met, or no engine "
                    "could take it"
                ),
            )
            self._kick()

    # -- finishing -----------------------------------------------------------

    def _finish(
        self,
        state: _Task,
        status: str,
        result: dict | None = None,
        error: BaseException | RemoteError | None = None,
        worker: _Worker | None = None,
    ) -> None:
        """Record a task's final outcome, wake its waiters and dependents."""
        if state.stage == "done":
            return
        if worker is None and state.stage == "sent":
            worker = state.worker
        state.stage = "done"
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = None
        self._tasks.pop(state.taskid, None)
        self._ready.pop(state.taskid, None)
        serial = worker.serial if worker is not None else None
        engine_id = worker.engine_id if worker is not None else None
        self._done[state.taskid] = _Done(status, serial)
        now = self.clock.seconds()
        changes: dict[str, Any] = {"status": status, "completed": now}
        if worker is not None:
            changes["engine_id"] = engine_id
        if result is not None:
            blob = result.get("result")
            changes.update(
                result=blob.to_bytes() if isinstance(blob, Serialized) else blob,
                stdout=result.get("stdout", ""),
                stderr=result.get("stderr", ""),
                started=result.get("started", state.started),
                completed=result.get("completed", now),
            )
        if error is not None:
            info = error if isinstance(error, RemoteError) else _describe(error, engine_id)
            changes["error"] = info.to_dict()
        self._db_write("update_record", state.taskid, changes)
        waiters, state.waiters = state.waiters, []
        for d in waiters:
            d.callback(None)
        self._finished_deps.append((state.taskid, status == "succeeded", serial))
        self._kick()

    # -- helpers -------------------------------------------------------------

    def _waiter(self, state: _Task) -> Deferred:
        def cancel(d: Deferred) -> None:
            if d in state.waiters:
                state.waiters.remove(d)

        d = Deferred(cancel)
        state.waiters.append(d)
        return d

    def _as_known_ids(self, taskids: Any) -> list[Any] | Deferred:
        """``taskids`` (one id or several) as a list, or a failed Deferred
        naming the first id this controller does not know."""
        taskids = [taskids] if isinstance(taskids, int) else list(taskids)
        for tid in taskids:
            if tid not in self._done and tid not in self._tasks:
                return fail(self._invalid(tid))
        return taskids

    def _invalid(self, taskid: Any) -> InvalidTaskID:
        return InvalidTaskID(
            f"no task with id {taskid!r}: it was never submitted to this controller, "
            "or it has been cleared"
        )

    def _read_result(self, taskid: int) -> Deferred:
        def missing(f: Failure) -> Failure:
            f.trap(KeyError)
            return Failure(self._invalid(taskid))

        d = self._db_call("get_record", taskid)
        d.addCallbacks(TaskResult.from_dict, missing)
        return d

    def _db_call(self, method: str, *args: Any) -> Deferred:
        """Call a DB method after every earlier DB call has finished (so reads
        see earlier writes even with an asynchronous backend).

        While no earlier call is outstanding (always, for a synchronous
        backend such as SQLite) the method is called at once, with no
        Deferred chain on the hot path.
        """
        if self._db_pending == 0:
            d = maybeDeferred(getattr(self.db, method), *args)
            if not d.called:
                self._wait_for_db(d)
            return d
        result = Deferred()

        def step(_: Any) -> Deferred:
            d = maybeDeferred(getattr(self.db, method), *args)

            def deliver(outcome: Any) -> None:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

            d.addBoth(deliver)
            return d

        self._db_pending += 1
        self._db_tail.addCallback(step).addBoth(self._db_call_done)
        return result

    def _wait_for_db(self, d: Deferred) -> None:
        """Make later DB calls wait for the outstanding call ``d``."""
        self._db_pending += 1
        tail = Deferred()
        d.addBoth(lambda outcome: (tail.callback(None), outcome)[1])
        self._db_tail = tail
        tail.addBoth(self._db_call_done)

    def _db_call_done(self, _: Any) -> None:
        self._db_pending -= 1
        return None

    def _db_write(self, method: str, *args: Any) -> None:
        """Write to the DB in order with every other call; failures are
        logged. A write that succeeds at once (SQLite, memory) costs no
        callbacks."""
        if self._db_pending == 0:
            try:
                d = getattr(self.db, method)(*args)
            except Exception:
                log.err(None, f"task controller: task DB {method} failed")
                return
            if not isinstance(d, Deferred):
                return
            if not d.called:
                self._wait_for_db(d)
            elif not isinstance(d.result, Failure):
                return
        else:
            d = self._db_call(method, *args)
        d.addErrback(log.err, f"task controller: task DB {method} failed")


def _task_key(taskid: int, attempt: int) -> str:
    """The key naming one attempt of a task in its engine's task queue."""
    return f"{taskid}.{attempt}"


def _describe(f: Failure | BaseException, engine_id: int | None) -> RemoteError:
    info = engine_failure_info(f)
    if info.engine_id is None:
        info.engine_id = engine_id
    return info


def _explain_outcomes(dep: Dependency, outcome: Callable[[int], bool | None]) -> str:
    failed = sorted(t for t in dep if outcome(t) is False)
    succeeded = sorted(t for t in dep if outcome(t) is True)
    parts = []
    if failed:
        parts.append(f"task(s) {failed} failed")
    if succeeded:
        parts.append(f"task(s) {succeeded} succeeded")
    return " and ".join(parts) or "its tasks can no longer finish as required"


def _check_spec(flags: Any, payload: Any) -> dict[str, Any]:
    """The normalized flags of an acceptable spec.

    :raises TypeError: a payload that is not a Serialized, or flags not a dict.
    :raises ValueError: bad flags (see :func:`normalize_flags`).
    """
    flags = normalize_flags(flags)
    if not isinstance(payload, Serialized):
        raise TypeError(f"a task payload must be a Serialized, got {type(payload).__name__}")
    return flags


def _flags_for_record(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags as stored in a record (a recovery payload is kept, as bytes)."""
    return dict(flags)
