"""A Foolscap interface to a TaskController.

This module lets Foolscap clients talk to a
:class:`~kernel.taskcontroller.TaskController`:

- :class:`IFCTaskController`: the Foolscap ``RemoteInterface``;
- :class:`FCTaskControllerFromTaskController` (server half, in the
  controller): adapts a TaskController to IFCTaskController. The controller
  publishes it as ``task.furl``;
- :class:`FCTaskClient` (client half): makes a RemoteReference to it look like
  an actual :class:`~kernel.interfaces.ITaskController`, and adapts itself to a
  blocking client (:class:`~kernel.interfaces.IBlockingClientAdaptor`).

A task crosses the wire as its ``(flags, payload)`` spec: plain-data
scheduling flags and the opaque :class:`~kernel.serialized.Serialized` body,
which only an engine opens. A :class:`~kernel.task.TaskResult` comes back as
plain fields plus its Serialized result blob (a Foolscap copyable, see
:func:`register_task_result_copyable`); the client deserializes the result
only when ``results`` is read.
"""

from __future__ import annotations

from typing import Any

from foolscap.api import Referenceable, RemoteInterface, registerCopier, registerRemoteCopyFactory
from foolscap.constraint import Optional
from foolscap.copyable import AttributeDictConstraint
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import fcutil
from kernel.error import RemoteError
from kernel.fcutil import Anything, Flag
from kernel.interfaces import IBlockingClientAdaptor, ITaskController
from kernel.serialized import Serialized
from kernel.task import TaskResult
from kernel.taskmapper import MapperMixin
from kernel.wiretext import check_sendable

__all__ = [
    "CLIENT_NAME",
    "IFCTaskController",
    "FCTaskControllerFromTaskController",
    "FCTaskClient",
    "TASK_RESULT_TYPE",
    "register_task_result_copyable",
]

#: What ``get_client_name`` answers: the class a client builds over the reference.
CLIENT_NAME = "kernel.taskfc.FCTaskClient"

#: The Foolscap copyable type name of a TaskResult.
TASK_RESULT_TYPE = "txkernel.TaskResult.v1"

_RESULT_FIELDS = (
    "taskid",
    "status",
    "result",
    "error",
    "engine_id",
    "submitted",
    "started",
    "completed",
    "stdout",
    "stderr",
)


# -- TaskResult on the wire ---------------------------------------------------


def _copy_task_result(tr: TaskResult) -> tuple[str, dict[str, Any]]:
    state = {
        "taskid": tr.taskid,
        "status": tr.status,
        "result": tr.serialized_result,  # a Serialized copyable, or None
        "error": None if tr.error is None else tr.error.to_dict(),
        "engine_id": tr.engine_id,
        "submitted": tr.submitted,
        "started": tr.started,
        "completed": tr.completed,
        "stdout": tr.stdout,
        "stderr": tr.stderr,
    }
    return TASK_RESULT_TYPE, state


def _build_task_result(state: dict[str, Any]) -> TaskResult:
    blob = state.get("result")
    if blob is not None and not isinstance(blob, Serialized):
        raise TypeError(f"a TaskResult's result must be a Serialized, got {type(blob).__name__}")
    if blob is not None and blob.buffers:
        # Writable buffers, so arrays in the result are writable as in process.
        blob = Serialized(blob.data, [bytearray(b) for b in blob.buffers])
    err = state.get("error")
    return TaskResult(
        state["taskid"],
        state["status"],
        blob,
        None if err is None else RemoteError.from_dict(err),
        state.get("engine_id"),
        state.get("submitted"),
        state.get("started"),
        state.get("completed"),
        state.get("stdout") or "",
        state.get("stderr") or "",
    )


_registered = False


def register_task_result_copyable() -> None:
    """Teach Foolscap to send and receive :class:`~kernel.task.TaskResult`
    (idempotent; done when this module is imported)."""
    global _registered
    if _registered:
        return
    registerCopier(TaskResult, _copy_task_result)
    registerRemoteCopyFactory(
        TASK_RESULT_TYPE,
        _build_task_result,
        stateSchema=AttributeDictConstraint(
            *[(name, Anything) for name in _RESULT_FIELDS], ignoreUnknown=True
        ),
        cyclic=False,
    )
    _registered = True


register_task_result_copyable()


# -- the remote interface ------------------------------------------------------

#: ``clear``'s argument may be left out (the seed's ``remote_clear()``).
_OptionalTaskids = Optional(Anything, None)


class IFCTaskController(RemoteInterface):
    """Foolscap interface to task controller.

    See :class:`~kernel.interfaces.ITaskController` for what each method
    does. Every method but ``get_client_name`` answers with an envelope
    (:func:`kernel.fcutil.package_success` / :func:`~kernel.fcutil.package_failure`).
    """

    __remote_name__ = "IFCTaskController.txkernel"

    def run(ptask=Anything):
        """``ptask`` is the task's ``(flags, payload)`` spec; fires the taskid."""
        return Anything

    def get_task_result(taskid=Anything, block=Flag):
        return Anything

    def abort(taskid=Anything):
        return Anything

    def barrier(taskids=Anything):
        return Anything

    def spin():
        return Anything

    def queue_status(verbose=Flag):
        return Anything

    def clear(taskids=_OptionalTaskids):
        return Anything

    def db_query(query=Anything, keys=Anything):
        """Task records matching a MongoDB-style query (blobs as bytes)."""
        return Anything

    def resubmit(taskids=Anything):
        """Run finished tasks again; fires the new taskids."""
        return Anything

    def get_client_name():
        return str


# -- server half ---------------------------------------------------------------


@implementer(IFCTaskController)
class FCTaskControllerFromTaskController(Referenceable):
    """Adapt a TaskController to an IFCTaskController.

    This class is used to expose a TaskController over the wire using the
    Foolscap network protocol. It only translates: payloads stay
    :class:`~kernel.serialized.Serialized`, so nothing a user sent is
    unpickled here.

    :param taskController: the controller's
        :class:`~kernel.interfaces.ITaskController` (with ``run_spec``).
    """

    def __init__(self, taskController: Any):  # noqa: N803 - the seed's name
        self.taskController = taskController

    def packageFailure(self, f: Failure) -> tuple:  # noqa: N802 - the seed's name
        """The wire form of a failure (:func:`kernel.fcutil.package_failure`)."""
        return fcutil.package_failure(f)

    def packageSuccess(self, obj: Any) -> tuple:  # noqa: N802 - the seed's name
        """The wire form of a result (:func:`kernel.fcutil.package_success`)."""
        return fcutil.package_success(obj)

    def _call(self, method: str, *args: Any) -> defer.Deferred:
        d = defer.maybeDeferred(getattr(self.taskController, method), *args)
        d.addCallbacks(self.packageSuccess, self.packageFailure)
        return d

    def remote_run(self, ptask):
        if not (isinstance(ptask, (tuple, list)) and len(ptask) == 2):
            return self.packageFailure(
                Failure(TypeError("run takes a task spec: a (flags, payload) pair"))
            )
        flags, payload = ptask
        return self._call("run_spec", flags, payload)

    def remote_get_task_result(self, taskid, block=False):
        return self._call("get_task_result", taskid, block)

    def remote_abort(self, taskid):
        return self._call("abort", taskid)

    def remote_barrier(self, taskids):
        return self._call("barrier", taskids)

    def remote_spin(self):
        return self._call("spin")

    def remote_queue_status(self, verbose=False):
        return self._call("queue_status", verbose)

    def remote_clear(self, taskids=None):
        return self._call("clear", taskids)

    def remote_db_query(self, query, keys=None):
        return self._call("db_query", query, keys)

    def remote_resubmit(self, taskids):
        return self._call("resubmit", taskids)

    def remote_get_client_name(self):
        return CLIENT_NAME


# -- client half ---------------------------------------------------------------


@implementer(ITaskController, IBlockingClientAdaptor)
class FCTaskClient(MapperMixin):
    """Client class for Foolscap exposed TaskController.

    This class is an adapter that makes a RemoteReference to a TaskController
    look like an actual ITaskController on the client side: every method
    returns a Deferred. It also implements IBlockingClientAdaptor so that
    clients can automatically get a blocking version of this class.

    :param remote_reference: a RemoteReference to an :class:`IFCTaskController`
        (what ``task.furl`` names).
    """

    def __init__(self, remote_reference: Any):
        self.remote_reference = remote_reference

    def __repr__(self) -> str:
        return f"<FCTaskClient {self.remote_reference!r}>"

    def unpackage(self, r: Any) -> Any:
        """Open a reply from the controller: its value, or raise its failure
        (as the original exception type, with the remote traceback)."""
        return fcutil.unpackage(r)

    def _call(self, method: str, *args: Any) -> defer.Deferred:
        try:
            # text Foolscap cannot encode would drop the whole connection
            check_sendable(args, method)
            d = self.remote_reference.callRemote(method, *args)
        except Exception:
            d = defer.fail()
        d.addErrback(fcutil.translate_transport_failure, method)
        d.addCallback(self.unpackage)
        return d

    # -- ITaskController ---------------------------------------------------

    def run(self, task: Any) -> defer.Deferred:
        """Run a task on the TaskController.

        :param task: an :class:`~kernel.interfaces.ITask` (e.g.
            :class:`~kernel.task.MapTask`, :class:`~kernel.task.StringTask`);
            it is serialized here.
        :returns: Deferred firing the int taskid; pass it to
            :meth:`get_task_result`.
        """
        try:
            flags, payload = task.to_spec()
        except Exception:
            return defer.fail()
        return self._call("run", (flags, payload))

    def get_task_result(self, taskid: int, block: bool = False) -> defer.Deferred:
        """Get a task result by taskid.

        :param block: wait until the task is done?
        :returns: Deferred firing the :class:`~kernel.task.TaskResult`, or
            None if the task is not done and ``block`` is false.
        """
        return self._call("get_task_result", taskid, bool(block))

    def abort(self, taskid: int) -> defer.Deferred:
        """Abort a task by taskid. Fires None."""
        return self._call("abort", taskid)

    def barrier(self, taskids: Any) -> defer.Deferred:
        """Fire None once every task in the sequence ``taskids`` is done."""
        if not isinstance(taskids, int):
            taskids = list(taskids)
        return self._call("barrier", taskids)

    def spin(self) -> defer.Deferred:
        """Touch the scheduler, to resume scheduling without submitting a task."""
        return self._call("spin")

    def queue_status(self, verbose: bool = False) -> defer.Deferred:
        """Fire a dict with the current state of the task queue: counts per
        status, or lists of taskids when ``verbose``."""
        return self._call("queue_status", bool(verbose))

    def clear(self, taskids: Any = None) -> defer.Deferred:
        """Clear finished tasks (all of them when ``taskids`` is None) from the
        task controller; call it periodically when running many tasks."""
        if taskids is not None and not isinstance(taskids, int):
            taskids = list(taskids)
        return self._call("clear", taskids)

    # -- the task database ----------------------------------------------------

    def db_query(self, query: dict[str, Any], keys: Any = None) -> defer.Deferred:
        """Fire the task records matching ``query``, a MongoDB-style dict
        (``{'status': 'failed'}``, ``{'completed': {'$gt': t}}``, …); ``keys``
        limits the fields returned. Blob fields (payload, result) stay bytes."""
        if keys is not None and not isinstance(keys, str):
            keys = list(keys)
        return self._call("db_query", query, keys)

    def resubmit(self, taskids: Any) -> defer.Deferred:
        """Run finished tasks again as new tasks; fires the new taskids in order."""
        if not isinstance(taskids, int):
            taskids = list(taskids)
        return self._call("resubmit", taskids)

    # -- IBlockingClientAdaptor ------------------------------------------------

    def adapt_to_blocking_client(self) -> Any:
        """Wrap self in a blocking version (``kernel.taskclient.BlockingTaskClient``)
        that drives this client through the reactor thread."""
        from kernel.taskclient import BlockingTaskClient

        return BlockingTaskClient(self)
