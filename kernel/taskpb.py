"""The task interface over Perspective Broker.

The same halves as :mod:`kernel.taskfc`, carried over PB by
:mod:`kernel.pbutil`:

- :data:`PBTaskControllerFromTaskController` (server half, in the controller)
  is the Foolscap server half, published as the client login's ``task``
  service and exposed with :class:`kernel.pbutil.Exposed`. A task arrives as
  its ``(flags, payload)`` spec: the payload stays
  :class:`~kernel.serialized.Serialized` (chunked over PB when large) and only
  an engine opens it.
- :class:`PBTaskClient` (client half) implements
  :class:`~kernel.interfaces.ITaskController` and
  :class:`~kernel.interfaces.IBlockingClientAdaptor` over a
  :class:`~kernel.pbutil.PBRemote`, with the load-balanced ``map``,
  ``mapper`` and ``parallel``. Get one with :func:`get_task_client`.

A :class:`~kernel.task.TaskResult` crosses PB by value (registered with
:func:`kernel.pbutil.register_copyable`): plain fields plus its result blob,
opened by the client only when ``results`` is read.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kernel import pbutil
from kernel.interfaces import IBlockingClientAdaptor, ITaskController
from kernel.serialized import Serialized
from kernel.task import TaskResult
from kernel.taskfc import FCTaskControllerFromTaskController
from kernel.taskremote import TaskClient

__all__ = [
    "TASK",
    "TASK_RESULT_TYPE",
    "PBTaskControllerFromTaskController",
    "PBTaskClient",
    "get_task_client",
]

#: The service name of the task controller behind the client login.
TASK = "task"

#: The server half over PB: the Foolscap one, exposed by :class:`kernel.pbutil.Exposed`.
PBTaskControllerFromTaskController = FCTaskControllerFromTaskController

#: The PB copyable type name of a TaskResult.
TASK_RESULT_TYPE = "txkernel.TaskResult.v1"


def _task_result_state(tr: TaskResult) -> dict[str, Any]:
    state = tr.to_dict()
    state["result"] = tr.serialized_result  # travels as a blob, unopened
    return state


def _task_result(state: Any) -> TaskResult:
    if not isinstance(state, dict):
        raise pbutil.WireError("malformed TaskResult on the wire")
    blob = state.get("result")
    if blob is not None and not isinstance(blob, Serialized):
        raise pbutil.WireError("a TaskResult's result must be a Serialized blob")
    tr = TaskResult.from_dict(dict(state, result=None))
    tr.serialized_result = blob
    return tr


pbutil.register_copyable(TaskResult, TASK_RESULT_TYPE, _task_result_state, _task_result)


@implementer(ITaskController, IBlockingClientAdaptor)
class PBTaskClient(TaskClient):
    """A remote task controller over PB, for Twisted code (client half).

    Every method returns a Deferred; a lost connection fails calls with
    :class:`~kernel.error.ConnectionError`.

    :param remote_reference: the controller's task service, a
        :class:`~kernel.pbutil.PBRemote` (see :func:`get_task_client`).
    """

    def __repr__(self) -> str:
        return f"<PBTaskClient {self.remote_reference!r}>"

    def disconnect(self) -> None:
        """Close this client's connection to the controller."""
        self.remote_reference.disconnect()


def get_task_client(
    cluster_dir: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Connect to a PB controller's task interface.

    :param cluster_dir: where the controller wrote ``pb.json`` (None: the
        default cluster directory).
    :param info: the connection info itself, instead of ``cluster_dir``.
    :param timeout: bound on connecting and logging in, seconds.
    :returns: Deferred firing a :class:`PBTaskClient`.
    :raises: (errback) :class:`~kernel.error.SecurityError` for wrong
        credentials or a connection file others can read;
        :class:`~kernel.error.ConnectionError` if no controller answers.
    """
    return pbutil.connect_client(PBTaskClient, TASK, cluster_dir, info, timeout)
