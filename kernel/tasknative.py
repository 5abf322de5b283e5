"""The task interface over the native transport.

The same halves as :mod:`kernel.taskfc` (from :mod:`kernel.taskremote`, with
no Foolscap), carried over :mod:`kernel.nativeproto`:

- :data:`NativeTaskControllerFromTaskController` (server half, in the
  controller) is the shared server half, offered as the ``task`` service. A
  task arrives as its ``(flags, payload)`` spec: plain-data flags in the
  frame's JSON header, the payload a :class:`~kernel.serialized.Serialized`
  in the frame's buffers, which only an engine opens.
- :class:`NativeTaskClient` (client half) implements
  :class:`~kernel.interfaces.ITaskController` and
  :class:`~kernel.interfaces.IBlockingClientAdaptor` over a
  :class:`~kernel.nativeproto.NativeRemote`, with the load-balanced ``map``,
  ``mapper`` and ``parallel``. Get one with :func:`get_task_client`.

A :class:`~kernel.task.TaskResult` crosses by value (registered with
:func:`kernel.nativeproto.register_copyable`): plain fields plus its result
blob, opened by the client only when ``results`` is read.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kernel import nativeproto
from kernel.error import ProtocolError
from kernel.interfaces import IBlockingClientAdaptor, ITaskController
from kernel.serialized import Serialized
from kernel.task import TaskResult
from kernel.taskremote import TaskClient, TaskControllerFromTaskController

__all__ = [
    "TASK",
    "TASK_RESULT_TYPE",
    "NativeTaskControllerFromTaskController",
    "NativeTaskClient",
    "get_task_client",
]

#: The service name of the task controller on a native controller.
TASK = "task"

#: The server half over the native transport: the shared one (no Foolscap).
NativeTaskControllerFromTaskController = TaskControllerFromTaskController

#: The wire name of a TaskResult.
TASK_RESULT_TYPE = "txkernel.TaskResult.v1"


def _task_result_state(tr: TaskResult) -> dict[str, Any]:
    # TaskResult.to_dict's fields, except that the result stays a blob (its
    # frames travel as buffers, unjoined and unopened).
    blob, tr.serialized_result = tr.serialized_result, None
    try:
        state = tr.to_dict()
    finally:
        tr.serialized_result = blob
    state["result"] = blob
    return state


def _task_result(state: Any) -> TaskResult:
    if not isinstance(state, dict):
        raise ProtocolError("malformed TaskResult on the wire")
    blob = state.get("result")
    if blob is not None and not isinstance(blob, Serialized):
        raise ProtocolError("a TaskResult's result must be a Serialized blob")
    tr = TaskResult.from_dict(dict(state, result=None))
    tr.serialized_result = blob
    return tr


nativeproto.register_copyable(TaskResult, TASK_RESULT_TYPE, _task_result_state, _task_result)


@implementer(ITaskController, IBlockingClientAdaptor)
class NativeTaskClient(TaskClient):
    """A remote task controller over the native transport, for Twisted code
    (client half).

    Every method returns a Deferred; a lost connection fails calls with
    :class:`~kernel.error.ConnectionError`.

    :param remote_reference: the controller's task service, a
        :class:`~kernel.nativeproto.NativeRemote` (see :func:`get_task_client`).
    """

    def __repr__(self) -> str:
        return f"<NativeTaskClient {self.remote_reference!r}>"

    def disconnect(self) -> None:
        """Close this client's connection to the controller."""
        self.remote_reference.disconnect()


def get_task_client(
    cluster_dir: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Connect to a native controller's task interface.

    :param cluster_dir: where the controller wrote ``native.json`` (None: the
        default cluster directory).
    :param info: the connection info itself, instead of ``cluster_dir``.
    :param timeout: bound on connecting and the handshake, seconds.
    :returns: Deferred firing a :class:`NativeTaskClient`.
    :raises: (errback) :class:`~kernel.error.SecurityError` for a wrong key
        or a connection file others can read;
        :class:`~kernel.error.ConnectionError` if no controller answers.
    """
    return nativeproto.connect_client(NativeTaskClient, TASK, cluster_dir, info, timeout)
