"""The blocking task client: the load-balanced task queue for people and scripts.

:class:`BlockingTaskClient` wraps any :class:`~kernel.interfaces.ITaskController`
(the in-process :class:`~kernel.taskcontroller.TaskController`, or a network
client half such as :class:`kernel.taskfc.FCTaskClient`, whose
``adapt_to_blocking_client()`` returns one of these) and calls it through the
reactor thread, so each method returns its result::

    tc = client.TaskClient()
    tid = tc.run(client.MapTask(pow, (2, 10)))
    tc.get_task_result(tid, block=True).results   # 1024
    tc.map(lambda x: x * x, range(10))              # load-balanced map
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from zope.interface import Interface, implementer

from kernel import progress, reactorthread
from kernel.interfaces import IMapper
from kernel.taskmapper import MapperMixin, TaskMapper

__all__ = ["BlockingTaskClient", "BlockingTaskMapper", "IBlockingTaskClient"]


class IBlockingTaskClient(Interface):
    """The methods of :class:`~kernel.interfaces.ITaskController`, returning
    results instead of Deferreds, plus ``map``, ``mapper`` and ``parallel``."""

    def run(task, block=False):
        """Submit a task; its taskid (or its TaskResult when ``block``)."""

    def get_task_result(taskid, block=False):
        """The TaskResult of ``taskid`` (None if not done and not ``block``)."""

    def abort(taskid):
        """Abort a queued or running task."""

    def barrier(taskids):
        """Wait until every task in ``taskids`` is done."""

    def spin():
        """Run the scheduler once."""

    def queue_status(verbose=False):
        """Counts (or taskids) of tasks per status."""

    def clear(taskids=None):
        """Forget finished tasks."""

    def map(func, *sequences):
        """Load-balanced ``map``."""


async def _gather_in_order(calls: list[defer.Deferred]) -> list[Any]:
    """Wait for every Deferred; raise the first failure (in order) after all
    have finished, else return the results in order."""
    results = await defer.DeferredList(calls, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


@implementer(IMapper)
class BlockingTaskMapper:
    """Maps a function as load-balanced tasks through a :class:`BlockingTaskClient`.

    The tasks are those of :class:`kernel.taskmapper.TaskMapper` (one per
    chunk of elements); waiting shows a progress bar over them when
    interactive.

    :param client: the task client.
    :param block: wait for the results (else ``map`` returns the taskids).
    :param options: ``clear_before``, ``clear_after``, ``retries``,
        ``recovery_task``, ``depend`` (see :class:`~kernel.task.BaseTask`)
        and ``chunksize``.
    """

    def __init__(self, client: BlockingTaskClient, block: bool = True, **options: Any):
        if not isinstance(block, bool):
            raise TypeError(f"block must be True or False, not {block!r}")
        self.client = client
        self.block = block
        self._tasks = TaskMapper(None, block=block, **options)

    def __repr__(self) -> str:
        return f"<BlockingTaskMapper block={self.block!r} chunksize={self._tasks.chunksize}>"

    def map(self, func: Callable, *sequences: Any) -> list[Any]:
        """``map(func, *sequences)`` as load-balanced tasks (stopping at the
        shortest sequence, as the builtin does).

        :returns: the results in order (``block``), or the taskids.
        :raises Exception: the exception of the first element (in order)
            whose task failed, after every task is done.
        """
        taskids = self.client.run_many(self._tasks.tasks(func, *sequences))
        if not self.block:
            return taskids
        self.client.barrier(taskids)
        out: list[Any] = []
        for tr in self.client.get_task_results(taskids, block=True):
            out.extend(tr.results)  # raises the task's exception if it failed
        return out


@implementer(IBlockingTaskClient)
class BlockingTaskClient(MapperMixin):
    """A blocking client to a task controller.

    :param task_controller: an :class:`~kernel.interfaces.ITaskController`
        whose methods return Deferreds; it is only ever called in the reactor
        thread.
    """

    mapper_class = BlockingTaskMapper

    def __init__(self, task_controller: Any):
        self.task_controller = task_controller

    def __repr__(self) -> str:
        return f"<BlockingTaskClient of {self.task_controller!r}>"

    def _block(self, f: Callable, *args: Any, **kwargs: Any) -> Any:
        return reactorthread.blocking_call(f, *args, **kwargs)

    # -- ITaskController ---------------------------------------------------

    def run(self, task: Any, block: bool = False) -> Any:
        """Submit ``task`` (a :class:`~kernel.task.MapTask` or
        :class:`~kernel.task.StringTask`) to the load-balanced queue.

        The task is serialized here; over the network it is numbered and
        queued at once (sent with others in one message), so ``run``
        returns without waiting for the controller.

        :param block: wait for the task to finish and return its TaskResult.
        :returns: the int taskid (pass it to :meth:`get_task_result`), or the
            :class:`~kernel.task.TaskResult` when ``block``.
        :raises kernel.error.SerializationError: the task cannot be serialized.
        """
        batcher = getattr(self.task_controller, "batcher", None)
        if batcher is None or reactorthread.in_reactor_thread():
            taskid = self._block(self.task_controller.run, task)
        else:
            flags, payload = self.task_controller.check_task(task)
            taskid = batcher.try_submit(flags, payload)
            if taskid is None:  # no reserved taskid left: wait for a block
                taskid = self._block(batcher.submit, flags, payload)
        if block:
            return self.get_task_result(taskid, block=True)
        return taskid

    def get_task_result(self, taskid: int, block: bool = False) -> Any:
        """The :class:`~kernel.task.TaskResult` of ``taskid``.

        Read its ``results`` (raises the task's exception if it failed),
        ``status``, ``engine_id``, ``stdout``, ...

        :param block: wait until the task is done.
        :returns: the TaskResult, or None if it is not done and ``block`` is false.
        :raises kernel.error.InvalidTaskID: no such task.
        """
        return self._block(self.task_controller.get_task_result, taskid, block)

    def abort(self, taskid: int) -> None:
        """Abort a task: removed if queued, interrupted if running.

        :raises kernel.error.TaskAlreadyCompleted: it had already finished.
        :raises kernel.error.InvalidTaskID: no such task.
        """
        return self._block(self.task_controller.abort, taskid)

    def barrier(self, taskids: Sequence[int]) -> None:
        """Wait until every task in ``taskids`` is done, whatever its outcome.

        Shows a progress bar over the tasks when interactive.
        """
        taskids = list(taskids)
        with progress.bar(len(taskids), "tasks", unit="task") as bar:
            if bar.shown and taskids:
                self._block(self._barrier_counting, taskids, bar)
            else:
                self._block(self.task_controller.barrier, taskids)

    async def _barrier_counting(self, taskids: list[int], bar: progress.Progress) -> None:
        def done(result: Any) -> None:
            bar.update()
            return None

        waits = [
            defer.maybeDeferred(self.task_controller.get_task_result, t, True).addBoth(done)
            for t in taskids
        ]
        await defer.DeferredList(waits)
        await self.task_controller.barrier(taskids)

    def spin(self) -> None:
        """Run the scheduler once without submitting a task (rarely needed)."""
        return self._block(self.task_controller.spin)

    def queue_status(self, verbose: bool = False) -> dict[str, Any]:
        """A dict keyed ``pending``, ``running``, ``succeeded``, ``failed``,
        ``aborted``: the number of tasks in each state (their taskids when
        ``verbose``)."""
        return self._block(self.task_controller.queue_status, verbose)

    def clear(self, taskids: Sequence[int] | None = None) -> None:
        """Forget finished tasks (all of them when ``taskids`` is None).

        Call this now and then in long sessions so results do not pile up.
        """
        if taskids is None:
            return self._block(self.task_controller.clear)
        return self._block(self.task_controller.clear, list(taskids))

    # -- several tasks at once ---------------------------------------------

    def run_many(self, tasks: Sequence[Any]) -> list[int]:
        """Submit several tasks in one round trip to the reactor; their taskids."""
        tasks = list(tasks)
        return self._block(
            lambda: defer.ensureDeferred(
                _gather_in_order([defer.maybeDeferred(self.task_controller.run, t) for t in tasks])
            )
        )

    def get_task_results(self, taskids: Sequence[int], block: bool = True) -> list[Any]:
        """The TaskResults of several tasks (None for each not yet done when
        ``block`` is false)."""
        taskids = list(taskids)
        if hasattr(self.task_controller, "get_task_results"):
            return self._block(self.task_controller.get_task_results, taskids, block)
        return self._block(
            lambda: defer.ensureDeferred(
                _gather_in_order(
                    [
                        defer.maybeDeferred(self.task_controller.get_task_result, t, block)
                        for t in taskids
                    ]
                )
            )
        )
