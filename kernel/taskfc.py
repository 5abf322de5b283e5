"""A Foolscap interface to a TaskController.

The halves themselves live in :mod:`kernel.taskremote` (no Foolscap, shared
with the native and PB adapters); this module adds Foolscap's
``Referenceable`` and ``RemoteInterface`` layer and the TaskResult copyable.

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
which only an engine opens. The client half numbers tasks itself from blocks
of taskids the controller grants (``reserve_taskids``) and sends their specs
in batches (``run_batch``, see :mod:`kernel.taskbatch`): ``run`` fires the
taskid without a round trip, and every other call is made once the batches
before it have been taken. A :class:`~kernel.task.TaskResult` comes back as
plain fields plus its Serialized result blob (a Foolscap copyable, see
:func:`register_task_result_copyable`); the client deserializes the result
only when ``results`` is read.
"""

from __future__ import annotations

from typing import Any

from foolscap.api import Referenceable, RemoteInterface, registerCopier, registerRemoteCopyFactory
from foolscap.constraint import Optional
from foolscap.copyable import AttributeDictConstraint
from zope.interface import implementer

from kernel.error import RemoteError
from kernel.fcutil import Anything, Flag
from kernel.serialized import Serialized
from kernel.task import TaskResult
from kernel.taskremote import CLIENT_NAME, TaskClient, TaskControllerFromTaskController

__all__ = [
    "CLIENT_NAME",
    "IFCTaskController",
    "FCTaskControllerFromTaskController",
    "FCTaskClient",
    "TASK_RESULT_TYPE",
    "register_task_result_copyable",
]

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

    def get_task_results(taskids=Anything, block=Flag):
        """The TaskResults of several tasks, in order."""
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

    def reserve_taskids(count=Anything):
        """Grant a block of fresh taskids; fires ``[start, stop]``."""
        return Anything

    def run_batch(specs=Anything):
        """Submit ``[taskid, flags, payload]`` specs; fires ``[[taskid,
        failure dict], ...]`` for those refused outright."""
        return Anything

    def get_client_name():
        return str


# -- server half ---------------------------------------------------------------


@implementer(IFCTaskController)
class FCTaskControllerFromTaskController(TaskControllerFromTaskController, Referenceable):
    """Adapt a TaskController to an IFCTaskController: a
    :class:`~kernel.taskremote.TaskControllerFromTaskController` as a
    Foolscap Referenceable (what the controller publishes as ``task.furl``).
    """


# -- client half ---------------------------------------------------------------


class FCTaskClient(TaskClient):
    """Client class for Foolscap exposed TaskController (see
    :class:`~kernel.taskremote.TaskClient`).

    :param remote_reference: a RemoteReference to an :class:`IFCTaskController`
        (what ``task.furl`` names).
    """
