"""The exceptions txkernel raises, and how engine failures are described.

An exception raised by user code on an engine travels as *plain data*
(:class:`RemoteError`: the type name, the message, the engine's traceback text)
plus, optionally, the pickled exception itself as an opaque blob. The
controller reads only the plain part; a client can re-raise the original
exception type with :meth:`RemoteError.original`.
"""

from __future__ import annotations

import traceback as _traceback
from typing import Any

from twisted.python.failure import Failure

from kernel.wiretext import safe_text

# Attribute names under which an engine attaches its identity and traceback
# text to an exception raised in user code.
_ENGINE_ID_ATTR = "_txkernel_engine_id"
_TRACEBACK_ATTR = "_txkernel_traceback"


class KernelError(Exception):
    """Base class of every error txkernel itself raises."""


class EngineError(KernelError):
    """An engine died or disconnected while work was queued or running on it."""


class NoEnginesRegistered(KernelError):
    """There are no engines to run on."""

    def __init__(self, message: str | None = None):
        super().__init__(
            message
            or "no engines are registered: start some with `txkernel cluster start -n 4` "
            "(or `txkernel engine` pointed at this controller)"
        )


class InvalidEngineID(KernelError):
    """A ``targets`` argument named an engine that is not registered, or was
    not an int, a list of ints or ``'all'``."""


class InvalidResultNumber(KernelError):
    """``get_result(i)`` asked for a command an engine has not run."""


class InvalidProperty(KernelError):
    """An engine property value was not plain data."""


class ResultNotCompleted(KernelError):
    """A pending result was asked for without blocking before it was ready."""


class InvalidDeferredID(KernelError):
    """A pending id is unknown to this client, or its result was already taken."""


class QueueCleared(KernelError):
    """A queued command was dropped by ``clear_queue`` before it ran."""


class ProtocolError(KernelError):
    """A peer sent something this side does not understand."""


class SecurityError(KernelError):
    """Authentication failed, or a connection file is not private."""


class ConnectionError(KernelError):  # noqa: A001 - the seeds' name
    """The controller could not be reached or found."""


class ClientError(KernelError):
    """A client was misused (for example, a blocking call on the reactor thread)."""


class SerializationError(KernelError):
    """An object could not be serialized or deserialized."""


class TaskError(KernelError):
    """Base class of task-interface errors."""


class InvalidTaskID(TaskError):
    """No task has this id (or it was cleared)."""


class TaskAborted(TaskError):
    """The task was aborted before it completed."""


class TaskWithdrawn(TaskAborted):
    """A task sent ahead to an engine was taken back before it started: it
    never ran there."""


class TaskAlreadyCompleted(TaskError):
    """An abort came after the task had finished."""


class TaskTimeout(TaskError):
    """The task did not finish in time."""


class UnmetDependency(TaskError):
    """Raised on an engine: this task cannot run here; try another engine."""


class ImpossibleDependency(UnmetDependency):
    """The task's dependencies can never be met; it will not run."""


class DependencyTimeout(ImpossibleDependency):
    """The task's dependencies were not met within its ``timeout``."""


class InvalidDependency(ImpossibleDependency):
    """A dependency names tasks that do not exist."""


class RemoteError(KernelError):
    """An exception raised on an engine, described as plain data.

    :ivar ename: the exception's type name (e.g. ``'ZeroDivisionError'``).
    :ivar evalue: ``str()`` of the exception.
    :ivar traceback: the engine's formatted traceback text.
    :ivar engine_id: the engine it happened on, or None.
    :ivar pickled: the pickled exception as bytes (opaque), or None.
    """

    def __init__(
        self,
        ename: str,
        evalue: str,
        traceback: str = "",
        engine_id: int | None = None,
        pickled: bytes | None = None,
    ):
        super().__init__(ename, evalue)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_id = engine_id
        self.pickled = pickled

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"

    def __reduce__(self):
        return (
            type(self),
            (self.ename, self.evalue, self.traceback, self.engine_id, self.pickled),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for the wire."""
        return {
            "ename": self.ename,
            "evalue": self.evalue,
            "traceback": self.traceback,
            "engine_id": self.engine_id,
            "pickled": self.pickled,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RemoteError:
        """Inverse of :meth:`to_dict`."""
        return cls(
            d["ename"], d["evalue"], d.get("traceback", ""), d.get("engine_id"), d.get("pickled")
        )

    def original(self) -> BaseException:
        """The original exception, unpickled here, with the engine's traceback
        text attached; ``self`` if it cannot be unpickled in this process, or
        if it is not an :class:`Exception` (an engine's ``SystemExit`` or
        ``KeyboardInterrupt`` must not stop the client that reads it)."""
        if self.pickled is None:
            return self
        from kernel import serialized

        try:
            exc = serialized.loads(self.pickled)
        except Exception:
            return self
        if not isinstance(exc, Exception):
            return self
        attach_engine_info(exc, self.engine_id, self.traceback)
        return exc


def attach_engine_info(exc: BaseException, engine_id: int | None, traceback_text: str) -> None:
    """Record on ``exc`` which engine raised it and the engine's traceback text."""
    try:
        setattr(exc, _ENGINE_ID_ATTR, engine_id)
        setattr(exc, _TRACEBACK_ATTR, traceback_text)
    except (AttributeError, TypeError):  # exceptions with __slots__
        pass


def engine_failure_info(f: Failure | BaseException) -> RemoteError:
    """Describe a failure from an engine as a :class:`RemoteError` (plain data).

    Works for an exception raised in-process by an engine (using the traceback
    text the engine attached) and for a :class:`RemoteError` that came over
    the wire.
    """
    exc = f.value if isinstance(f, Failure) else f
    if isinstance(exc, RemoteError):
        return exc
    tb = getattr(exc, _TRACEBACK_ATTR, None)
    if tb is None:
        if isinstance(f, Failure):
            tb = f.getTraceback()
        else:
            tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RemoteError(
        type(exc).__name__,
        _exc_text(exc),
        safe_text(tb),
        getattr(exc, _ENGINE_ID_ATTR, None),
        _try_pickle(exc),
    )


def _exc_text(exc: BaseException) -> str:
    """``str(exc)``, safe to send, even when the exception's ``__str__`` fails."""
    try:
        text = str(exc)
    except Exception as e:
        return f"<str() of this {type(exc).__name__} failed: {type(e).__name__}: {e}>"
    return safe_text(text)


def _try_pickle(exc: BaseException) -> bytes | None:
    """The pickled exception, or None if it will not pickle."""
    from kernel import serialized

    try:
        return serialized.dumps(exc)
    except Exception:
        return None


class CompositeError(KernelError):
    """Failures from one or more engines during one multiengine call.

    :ivar elist: list of :class:`RemoteError`, one per failing engine, in the
        order of the targets.
    """

    def __init__(self, message: str, elist: list[RemoteError]):
        super().__init__(message, elist)
        self.message = message
        self.elist = list(elist)

    def __reduce__(self):
        return (type(self), (self.message, self.elist))

    def __str__(self) -> str:
        lines = [f"{self.message} ({len(self.elist)} engine(s) failed)"]
        for e in self.elist:
            lines.append(f"[{_engine_label(e.engine_id)}] {e.ename}: {e.evalue}")
        return "\n".join(lines)

    def print_tracebacks(self, excid: int | None = None) -> None:
        """Print each engine's traceback (or only that of ``elist[excid]``)."""
        print(self.format_tracebacks(excid))

    def format_tracebacks(self, excid: int | None = None) -> str:
        """Each engine's traceback text, labelled with its engine id."""
        chosen = self.elist if excid is None else [self.elist[excid]]
        parts = []
        for e in chosen:
            parts.append(f"[{_engine_label(e.engine_id)}] {e.ename}: {e.evalue}\n{e.traceback}")
        return "\n".join(parts)

    def raise_exception(self, excid: int = 0):
        """Raise the original exception of ``elist[excid]`` (as its own type when
        it can be unpickled here, else as a :class:`RemoteError`)."""
        try:
            e = self.elist[excid]
        except IndexError:
            raise IndexError(f"an exception with index {excid} does not exist") from None
        raise e.original()


def _engine_label(engine_id: int | None) -> str:
    return "engine ?" if engine_id is None else f"engine {engine_id}"


def collect_exceptions(
    results: list[Any], method: str, engine_ids: list[int] | None = None
) -> list[Any]:
    """Raise a :class:`CompositeError` if any entry of ``results`` is a Failure.

    ``results`` holds one plain result or :class:`Failure` per engine, as
    gathered with ``DeferredList(consumeErrors=True)``; ``engine_ids`` (same
    order) fills in the engine of failures that do not say which it was.

    :returns: ``results`` unchanged when nothing failed.
    """
    elist = []
    for i, r in enumerate(results):
        if isinstance(r, Failure):
            info = engine_failure_info(r)
            if info.engine_id is None and engine_ids is not None:
                info.engine_id = engine_ids[i]
            elist.append(info)
    if not elist:
        return results
    raise CompositeError(f"one or more exceptions from call to method: {method}", elist)
