"""The task interface's server and client halves, shared by every transport.

Nothing here imports Foolscap: a controller or client on the native
transport uses these classes as they are, and :mod:`kernel.taskfc` makes them
Foolscap Referenceables with a RemoteInterface (see that module for how the
halves work).

- :class:`TaskControllerFromTaskController` (server half, in the
  controller): a TaskController's methods as ``remote_*`` methods that
  answer with envelopes (:mod:`kernel.envelope`);
- :class:`TaskClient` (client half): makes a reference to it look like an
  actual :class:`~kernel.interfaces.ITaskController`, and adapts itself to a
  blocking client (:class:`~kernel.interfaces.IBlockingClientAdaptor`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import envelope, remotecall
from kernel.envelope import unpackage_failure
from kernel.interfaces import IBlockingClientAdaptor, ITaskController, ITaskSubmission
from kernel.serialized import Serialized
from kernel.taskbatch import TaskBatcher
from kernel.taskmapper import MapperMixin
from kernel.wiretext import check_sendable

__all__ = ["CLIENT_NAME", "TaskControllerFromTaskController", "TaskClient"]

#: What ``get_client_name`` answers: the class a client builds over the reference.
CLIENT_NAME = "kernel.taskfc.FCTaskClient"


# -- server half ---------------------------------------------------------------


class TaskControllerFromTaskController:
    """Adapt a TaskController to the task interface's remote methods.

    This class is used to expose a TaskController over the wire (every
    transport exposes its ``remote_*`` methods). It only translates: payloads stay
    :class:`~kernel.serialized.Serialized`, so nothing a user sent is
    unpickled here.

    :param taskController: the controller's
        :class:`~kernel.interfaces.ITaskController` (with ``run_spec``).
    """

    def __init__(self, taskController: Any):  # noqa: N803 - the seed's name
        self.taskController = taskController

    def packageFailure(self, f: Failure) -> tuple:  # noqa: N802 - the seed's name
        """The wire form of a failure (:func:`kernel.envelope.package_failure`)."""
        return envelope.package_failure(f)

    def packageSuccess(self, obj: Any) -> tuple:  # noqa: N802 - the seed's name
        """The wire form of a result (:func:`kernel.envelope.package_success`)."""
        return envelope.package_success(obj)

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

    def remote_get_task_results(self, taskids, block=False):
        return self._call("get_task_results", taskids, block)

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

    def remote_reserve_taskids(self, count):
        return self._call("reserve_taskids", count)

    def remote_run_batch(self, specs):
        d = defer.maybeDeferred(self.taskController.run_batch, specs)
        d.addCallback(lambda refused: [[tid, envelope.package_failure(e)[1]] for tid, e in refused])
        d.addCallbacks(self.packageSuccess, self.packageFailure)
        return d

    def remote_get_client_name(self):
        return CLIENT_NAME


# -- client half ---------------------------------------------------------------


@implementer(ITaskController, ITaskSubmission, IBlockingClientAdaptor)
class TaskClient(MapperMixin):
    """Client class for an exposed TaskController.

    This class is an adapter that makes a RemoteReference to a TaskController
    look like an actual ITaskController on the client side: every method
    returns a Deferred. It also implements IBlockingClientAdaptor so that
    clients can automatically get a blocking version of this class.

    Tasks are numbered here from reserved blocks and sent in batches (see
    :mod:`kernel.taskbatch`): :meth:`run` fires the taskid at once, and every
    other method is called after the tasks submitted before it have reached
    the controller.

    :param remote_reference: a reference to the controller's
        :class:`TaskControllerFromTaskController`.
    """

    def __init__(self, remote_reference: Any):
        self.remote_reference = remote_reference
        #: numbers tasks and sends them in batches
        self.batcher = TaskBatcher(self.reserve_taskids, self.run_batch)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.remote_reference!r}>"

    def unpackage(self, r: Any) -> Any:
        """Open a reply from the controller: its value, or raise its failure
        (as the original exception type, with the remote traceback)."""
        return envelope.unpackage(r)

    def _call(self, method: str, *args: Any) -> defer.Deferred:
        try:
            # text Foolscap cannot encode would drop the whole connection
            check_sendable(args, method)
            d = self.remote_reference.callRemote(method, *args)
        except Exception:
            d = defer.fail()
        d.addErrback(remotecall.translate_transport_failure, method)
        d.addCallback(self.unpackage)
        return d

    def _ordered_call(self, method: str, *args: Any) -> defer.Deferred:
        """:meth:`_call` once the tasks submitted so far have been taken."""
        settled = self.batcher.settle()
        if settled.called:
            return self._call(method, *args)
        return settled.addCallback(lambda _: self._call(method, *args))

    # -- ITaskController ---------------------------------------------------

    def run(self, task: Any) -> defer.Deferred:
        """Run a task on the TaskController.

        :param task: an :class:`~kernel.interfaces.ITask` (e.g.
            :class:`~kernel.task.MapTask`, :class:`~kernel.task.StringTask`);
            it is serialized here.
        :returns: Deferred firing the int taskid (at once, unless a new
            block of taskids must be reserved first); pass it to
            :meth:`get_task_result`.
        :raises: (errback) what serializing the task raises, e.g.
            :class:`~kernel.error.SerializationError`.
        """
        try:
            flags, payload = self.check_task(task)
        except Exception:
            return defer.fail()
        return self.batcher.submit(flags, payload)

    def check_task(self, task: Any) -> tuple[dict[str, Any], Serialized]:
        """Serialize ``task`` into its ``(flags, payload)`` spec and check that it
        can be sent (safe in any thread).

        :raises kernel.error.SerializationError: the task cannot be serialized.
        :raises ValueError: text in the flags that cannot be sent.
        """
        flags, payload = task.to_spec()
        check_sendable(flags, "run")
        return flags, payload

    def get_task_result(self, taskid: int, block: bool = False) -> defer.Deferred:
        """Get a task result by taskid.

        :param block: wait until the task is done?
        :returns: Deferred firing the :class:`~kernel.task.TaskResult`, or
            None if the task is not done and ``block`` is false.
        :raises: (errback) :class:`~kernel.error.InvalidTaskID` for an unknown
            task; the error of a task that never reached the controller.
        """

        def ask(_: Any) -> defer.Deferred:
            error = self.batcher.failure(taskid)
            if error is not None:
                return defer.fail(error)
            return self._call("get_task_result", taskid, bool(block))

        settled = self.batcher.settle()
        if settled.called:
            return ask(None)
        return settled.addCallback(ask)

    #: Most taskids asked for in one ``get_task_results`` call.
    results_per_call = 256

    def get_task_results(self, taskids: Any, block: bool = False) -> defer.Deferred:
        """The TaskResults of several tasks, in order (None for each one not
        done unless ``block``), asked for in a few calls instead of one each.

        :raises: (errback) after every call has answered, the first error in
            order: :class:`~kernel.error.InvalidTaskID`, or the error of a task
            that never reached the controller.
        """
        taskids = [taskids] if isinstance(taskids, int) else list(taskids)

        async def collect() -> list[Any]:
            await self.batcher.settle()
            step = self.results_per_call
            calls = [
                self._call("get_task_results", taskids[i : i + step], bool(block))
                for i in range(0, len(taskids), step)
            ]
            replies = await defer.DeferredList(calls, consumeErrors=True)
            for tid in taskids:
                error = self.batcher.failure(tid)
                if error is not None:
                    raise error
            out: list[Any] = []
            for ok, value in replies:
                if not ok:
                    value.raiseException()
                out.extend(value)
            return out

        return defer.ensureDeferred(collect())

    def abort(self, taskid: int) -> defer.Deferred:
        """Abort a task by taskid. Fires None."""
        return self._ordered_call("abort", taskid)

    def barrier(self, taskids: Any) -> defer.Deferred:
        """Fire None once every task in the sequence ``taskids`` is done."""
        if not isinstance(taskids, int):
            taskids = list(taskids)
        return self._ordered_call("barrier", taskids)

    def spin(self) -> defer.Deferred:
        """Touch the scheduler, to resume scheduling without submitting a task."""
        return self._ordered_call("spin")

    def queue_status(self, verbose: bool = False) -> defer.Deferred:
        """Fire a dict with the current state of the task queue: counts per
        status, or lists of taskids when ``verbose``."""
        return self._ordered_call("queue_status", bool(verbose))

    def clear(self, taskids: Any = None) -> defer.Deferred:
        """Clear finished tasks (all of them when ``taskids`` is None) from the
        task controller; call it periodically when running many tasks."""
        if taskids is not None and not isinstance(taskids, int):
            taskids = list(taskids)
        self.batcher.forget([taskids] if isinstance(taskids, int) else taskids)
        return self._ordered_call("clear", taskids)

    # -- the task database ----------------------------------------------------

    def db_query(self, query: dict[str, Any], keys: Any = None) -> defer.Deferred:
        """Fire the task records matching ``query``, a MongoDB-style dict
        (``{'status': 'failed'}``, ``{'completed': {'$gt': t}}``, …); ``keys``
        limits the fields returned. Blob fields (payload, result) stay bytes."""
        if keys is not None and not isinstance(keys, str):
            keys = list(keys)
        return self._ordered_call("db_query", query, keys)

    def resubmit(self, taskids: Any) -> defer.Deferred:
        """Run finished tasks again as new tasks; fires the new taskids in order."""
        if not isinstance(taskids, int):
            taskids = list(taskids)
        return self._ordered_call("resubmit", taskids)

    # -- ITaskSubmission --------------------------------------------------------

    def reserve_taskids(self, count: int) -> defer.Deferred:
        """Have the controller grant ``count`` fresh taskids; fires ``[start, stop]``
        (:meth:`run` does this as needed)."""
        return self._call("reserve_taskids", count)

    def run_batch(self, specs: Any) -> defer.Deferred:
        """Send ``[taskid, flags, payload]`` specs numbered from reserved blocks
        in one call (:meth:`run` does this as needed); fires ``[[taskid,
        exception], ...]`` for the specs refused outright."""

        def opened(refused: Any) -> list[list[Any]]:
            return [[tid, unpackage_failure(d)] for tid, d in refused]

        return self._call("run_batch", [list(spec) for spec in specs]).addCallback(opened)

    # -- IBlockingClientAdaptor ------------------------------------------------

    def adapt_to_blocking_client(self) -> Any:
        """Wrap self in a blocking version (``kernel.taskclient.BlockingTaskClient``)
        that drives this client through the reactor thread."""
        from kernel.taskclient import BlockingTaskClient

        return BlockingTaskClient(self)
