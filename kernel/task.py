"""Load-balanced tasks: what a client submits and what it gets back.

A task is built on the client and split by :meth:`BaseTask.to_spec` into

- *flags*: plain data the controller schedules by (retries, timeout, graph
  dependencies ``after``/``follow``, namespace clearing, a recovery task, a
  description), and
- a *payload*: a :class:`~kernel.serialized.Serialized` *task body* holding
  everything the user supplied (function, arguments, code, pushed values, the
  functional dependency). Only an engine opens it: the engine deserializes the
  body and calls ``body.run(namespace, properties)``.

:class:`MapTask` calls a function; :class:`StringTask` pushes names, runs
code, and pulls names. The controller answers with a :class:`TaskResult`
whose result stays serialized until the client reads it.

The controller itself is :class:`kernel.taskcontroller.TaskController`
(also importable from here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import serialized
from kernel.dependency import Dependency, as_dependency
from kernel.error import RemoteError, UnmetDependency
from kernel.interfaces import ITask
from kernel.serialized import Serialized

__all__ = [
    "BaseTask",
    "MapTask",
    "StringTask",
    "TaskResult",
    "ResultNS",
    "TaskController",  # noqa: F822 - resolved lazily by __getattr__
    "STATUSES",
]

#: Every status a task can have, in the order a task passes through them.
STATUSES = ("pending", "running", "succeeded", "failed", "aborted")

#: The statuses of a finished task.
DONE_STATUSES = frozenset({"succeeded", "failed", "aborted"})

# ---------------------------------------------------------------------------
# Engine-side task bodies
# ---------------------------------------------------------------------------


class TaskBody:
    """What travels in a task's payload and runs on an engine.

    :param depend: None, or ``depend(properties) -> bool`` judged against the
        engine's properties before the task runs; a false answer raises
        :class:`~kernel.error.UnmetDependency`.
    """

    def __init__(self, depend: Callable[[dict], bool] | None = None):
        self.depend = depend

    def run(self, namespace: dict, properties: dict) -> Any:
        """Run on an engine: check the functional dependency, then do the work.

        :param namespace: the engine's user namespace.
        :param properties: the engine's properties (plain data).
        :returns: the task's results.
        :raises UnmetDependency: when ``depend`` rejects this engine.
        """
        if self.depend is not None and not self.depend(dict(properties)):
            name = getattr(self.depend, "__name__", "depend")
            raise UnmetDependency(f"{name}(properties) is false on this engine")
        return self.work(namespace)

    def work(self, namespace: dict) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class MapTaskBody(TaskBody):
    """Call ``function(*args, **kwargs)``; its return value is the result."""

    def __init__(self, function: Callable, args: Sequence, kwargs: Mapping, depend=None):
        super().__init__(depend)
        self.function = function
        self.args = tuple(args)
        self.kwargs = dict(kwargs)

    def work(self, namespace: dict) -> Any:
        return self.function(*self.args, **self.kwargs)


class StringTaskBody(TaskBody):
    """Bind ``push`` in the namespace, run ``expression``, return the dict of
    the ``pull`` names."""

    def __init__(self, expression: str, pull: Sequence[str], push: Mapping, depend=None):
        super().__init__(depend)
        self.expression = expression
        self.pull = list(pull)
        self.push = dict(push)

    def work(self, namespace: dict) -> dict[str, Any]:
        namespace.update(self.push)
        exec(compile(self.expression, "<task>", "exec"), namespace)
        out = {}
        for name in self.pull:
            try:
                out[name] = namespace[name]
            except KeyError:
                raise NameError(
                    f"name {name!r} is not defined on the engine after running the task; "
                    "check the task's code or its pull list"
                ) from None
        return out


def apply_chunk(function: Callable, arglists: Sequence[Sequence]) -> list:
    """Call ``function(*args)`` for each ``args`` in ``arglists`` (a chunk of a
    load-balanced map)."""
    return [function(*args) for args in arglists]


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


@implementer(ITask)
class BaseTask:
    """Scheduling options shared by every task.

    :param clear_before: reset the engine's namespace before the task runs.
    :param clear_after: reset it after the task runs.
    :param retries: how many times to resubmit the task after it fails,
        preferably to another engine.
    :param recovery_task: a task to run (under the same taskid) once the
        retries are spent; its outcome becomes this task's outcome.
    :param depend: ``depend(properties) -> bool``, run *on the engine* with its
        properties: a false answer sends the task to another engine.
    :param after: taskids, :class:`TaskResult` objects or a
        :class:`~kernel.dependency.Dependency`: do not start before these
        tasks are done.
    :param follow: as ``after``, and run on the engine where they ran.
    :param timeout: seconds to wait for the dependencies (and an engine able
        to run the task) before failing with
        :class:`~kernel.error.DependencyTimeout`; None or 0 waits as long as
        they can still be met.
    :param description: a human description kept in the task record.
    """

    def __init__(
        self,
        clear_before: bool = False,
        clear_after: bool = False,
        retries: int = 0,
        recovery_task: BaseTask | None = None,
        depend: Callable[[dict], bool] | None = None,
        after: Any = None,
        follow: Any = None,
        timeout: float | None = None,
        description: str | None = None,
    ):
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        if recovery_task is not None and not isinstance(recovery_task, BaseTask):
            raise TypeError(f"recovery_task must be a task, got {type(recovery_task).__name__}")
        if depend is not None and not callable(depend):
            raise TypeError(f"depend must be a callable depend(properties) -> bool, got {depend!r}")
        self.clear_before = bool(clear_before)
        self.clear_after = bool(clear_after)
        self.retries = retries
        self.recovery_task = recovery_task
        self.depend = depend
        self.after: Dependency | None = as_dependency(after)
        self.follow: Dependency | None = as_dependency(follow)
        self.timeout = timeout or None
        self.description = description

    def body(self) -> TaskBody:
        """The engine-side body of this task."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description."""
        return self.description or type(self).__name__

    def to_spec(self) -> tuple[dict[str, Any], Serialized]:
        """Split into ``(flags, payload)`` (see the module docstring).

        :raises kernel.error.SerializationError: if something user-supplied
            cannot be serialized.
        """
        payload = serialized.serialize(self.body())
        recovery = None
        if self.recovery_task is not None:
            rflags, rpayload = self.recovery_task.to_spec()
            recovery = {"flags": rflags, "payload": rpayload.to_bytes()}
        flags = {
            "clear_before": self.clear_before,
            "clear_after": self.clear_after,
            "retries": self.retries,
            "timeout": self.timeout,
            "after": self.after.as_dict() if self.after else None,
            "follow": self.follow.as_dict() if self.follow else None,
            "recovery_task": recovery,
            "description": self.describe(),
        }
        return flags, payload


class MapTask(BaseTask):
    """A task that calls ``function(*args, **kwargs)`` on an engine.

    Its :attr:`TaskResult.results` is the function's return value.

    :param function: any picklable callable (closures and lambdas included).
    :param args: positional arguments.
    :param kwargs: keyword arguments.
    :param flags: the options of :class:`BaseTask`.
    """

    def __init__(
        self,
        function: Callable,
        args: Sequence | None = None,
        kwargs: Mapping | None = None,
        **flags: Any,
    ):
        if not callable(function):
            raise TypeError(f"MapTask needs a callable, got {function!r}")
        super().__init__(**flags)
        self.function = function
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})

    def describe(self) -> str:
        return self.description or f"MapTask({getattr(self.function, '__name__', 'function')})"

    def body(self) -> MapTaskBody:
        return MapTaskBody(self.function, self.args, self.kwargs, self.depend)


class StringTask(BaseTask):
    """A task that pushes names, runs Python code, and pulls names back.

    Its :attr:`TaskResult.results` is the dict of the pulled names
    (:attr:`TaskResult.ns` gives attribute access to it).

    :param expression: Python source to run in the engine's namespace.
    :param pull: a name or list of names to return after the code ran.
    :param push: a dict of names to bind before the code runs.
    :param flags: the options of :class:`BaseTask`.
    """

    def __init__(
        self,
        expression: str,
        pull: str | Sequence[str] | None = None,
        push: Mapping[str, Any] | None = None,
        **flags: Any,
    ):
        if not isinstance(expression, str):
            raise TypeError(f"StringTask needs Python source as str, got {expression!r}")
        super().__init__(**flags)
        compile(expression, "<task>", "exec")  # a SyntaxError belongs to the caller
        self.expression = expression
        if pull is None:
            pull = []
        elif isinstance(pull, str):
            pull = [pull]
        self.pull = list(pull)
        self.push = dict(push or {})
        for name in [*self.pull, *self.push]:
            if not isinstance(name, str):
                raise TypeError(f"pushed and pulled names must be str, got {name!r}")

    def describe(self) -> str:
        if self.description:
            return self.description
        first = self.expression.strip().splitlines()[0] if self.expression.strip() else ""
        return f"StringTask({first[:60]!r})"

    def body(self) -> StringTaskBody:
        return StringTaskBody(self.expression, self.pull, self.push, self.depend)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class ResultNS:
    """Attribute access to a dict of results (``tr.ns.x`` for ``tr.results['x']``)."""

    def __init__(self, d: Mapping[str, Any]):
        self.__dict__.update(d)

    def __getitem__(self, key: str) -> Any:
        return self.__dict__[key]

    def __repr__(self) -> str:
        return f"<ResultNS {sorted(self.__dict__)}>"


_UNSET = object()


class TaskResult:
    """The outcome of a task.

    The result stays a :class:`~kernel.serialized.Serialized` blob until
    :attr:`results` or :attr:`ns` is read (on the client), so the controller
    that builds and routes a TaskResult never unpickles user data.

    :ivar taskid: the task's id.
    :ivar status: ``succeeded``, ``failed`` or ``aborted``.
    :ivar engine_id: the engine that ran the final attempt, or None.
    :ivar submitted: POSIX time the controller received the task.
    :ivar started: POSIX time the engine started it (None if it never ran).
    :ivar completed: POSIX time it finished.
    :ivar stdout: text it wrote to stdout.
    :ivar stderr: text it wrote to stderr.
    :ivar error: a :class:`~kernel.error.RemoteError` describing the failure
        as plain data, or None.
    :ivar serialized_result: the result blob, or None.
    """

    def __init__(
        self,
        taskid: int,
        status: str,
        serialized_result: Serialized | None = None,
        error: RemoteError | None = None,
        engine_id: int | None = None,
        submitted: float | None = None,
        started: float | None = None,
        completed: float | None = None,
        stdout: str = "",
        stderr: str = "",
    ):
        self.taskid = taskid
        self.status = status
        self.serialized_result = serialized_result
        self.error = error
        self.engine_id = engine_id
        self.submitted = submitted
        self.started = started
        self.completed = completed
        self.stdout = stdout or ""
        self.stderr = stderr or ""
        self._results: Any = _UNSET

    @property
    def duration(self) -> float | None:
        """Seconds from start to completion on the engine (None if it never ran)."""
        if self.started is None or self.completed is None:
            return None
        return self.completed - self.started

    @property
    def failure(self) -> Failure | None:
        """A Failure wrapping the task's exception (its original type when it
        can be unpickled here), or None if the task succeeded."""
        if self.error is None:
            return None
        return Failure(self.error.original())

    def raise_exception(self) -> None:
        """Raise the task's exception, if it failed (else do nothing)."""
        if self.error is not None:
            raise self.error.original()

    @property
    def results(self) -> Any:
        """The task's results: a MapTask's return value, a StringTask's dict of
        pulled names. Raises the task's exception if it failed."""
        self.raise_exception()
        if self._results is _UNSET:
            if self.serialized_result is None:
                self._results = None
            else:
                self._results = serialized.deserialize(self.serialized_result)
        return self._results

    @property
    def ns(self) -> ResultNS:
        """Attribute access to :attr:`results` when they are a dict of names."""
        results = self.results
        if not isinstance(results, Mapping):
            raise TypeError(
                f"task {self.taskid}'s results are a {type(results).__name__}, not a dict "
                "of names; use .results"
            )
        return ResultNS(results)

    @property
    def keys(self) -> list[str]:
        """The pulled names of a StringTask (empty for other results)."""
        results = self.results
        return list(results) if isinstance(results, Mapping) else []

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the wire (the result as bytes, the error as a dict)."""
        return {
            "taskid": self.taskid,
            "status": self.status,
            "result": None if self.serialized_result is None else self.serialized_result.to_bytes(),
            "error": None if self.error is None else self.error.to_dict(),
            "engine_id": self.engine_id,
            "submitted": self.submitted,
            "started": self.started,
            "completed": self.completed,
            "stdout": self.stdout,
            "stderr": self.stderr,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskResult:
        """Inverse of :meth:`to_dict`; also reads a task DB record."""
        blob = d.get("result")
        err = d.get("error")
        return cls(
            d["taskid"],
            d["status"],
            None if blob is None else Serialized.from_bytes(blob),
            None if err is None else RemoteError.from_dict(err),
            d.get("engine_id"),
            d.get("submitted"),
            d.get("started"),
            d.get("completed"),
            d.get("stdout") or "",
            d.get("stderr") or "",
        )

    def __reduce__(self):
        # a module function: see kernel.dependency.Dependency.__reduce__
        return (_task_result_from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        extra = f" {self.error}" if self.error is not None else ""
        return f"<TaskResult taskid={self.taskid} {self.status} on engine {self.engine_id}{extra}>"


def _task_result_from_dict(d: Mapping[str, Any]) -> TaskResult:
    return TaskResult.from_dict(d)


def __getattr__(name: str) -> Any:
    # The controller lives in its own module, which imports this one.
    if name == "TaskController":
        from kernel.taskcontroller import TaskController

        return TaskController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
