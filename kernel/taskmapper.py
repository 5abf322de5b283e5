"""Load-balanced ``map`` over any task controller.

:class:`TaskMapper` uses only :class:`~kernel.interfaces.ITaskController`
methods (``run``, ``barrier``, ``get_task_result``), so it works the same on
the in-process :class:`~kernel.taskcontroller.TaskController` and on a
network client's implementation of the interface. Results are deserialized
here, on the caller's side.

:class:`MapperMixin` gives a task client its ``map``, ``mapper`` and
``parallel`` methods, building whichever mapper class the client names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, FirstError, fail, gatherResults
from zope.interface import implementer

from kernel import parallelfunction
from kernel.interfaces import IMapper
from kernel.task import MapTask, apply_chunk

__all__ = ["MapperMixin", "TaskMapper", "default_chunksize", "DEFAULT_MAP_TASKS", "MAX_CHUNKSIZE"]

#: With the default ``chunksize=None``, a map is split into about this many
#: tasks: enough for several per engine on a cluster of up to 8 engines, so
#: the load still balances, while each task's fixed cost (a round trip
#: through the controller) is shared by many elements.
DEFAULT_MAP_TASKS = 32

#: The most elements the default chunking puts in one task.
MAX_CHUNKSIZE = 1000


def default_chunksize(n: int) -> int:
    """The chunk size ``chunksize=None`` picks for ``n`` elements: one element
    per task up to :data:`DEFAULT_MAP_TASKS` elements, then about
    :data:`DEFAULT_MAP_TASKS` tasks, at most :data:`MAX_CHUNKSIZE` elements each.
    """
    return max(1, min(MAX_CHUNKSIZE, -(-n // DEFAULT_MAP_TASKS)))


@implementer(IMapper)
class TaskMapper:
    """Map a function over sequences as load-balanced tasks.

    :param task_controller: an :class:`~kernel.interfaces.ITaskController`.
    :param clear_before: as for :class:`~kernel.task.BaseTask`, per task.
    :param clear_after: likewise.
    :param retries: likewise.
    :param recovery_task: likewise.
    :param depend: likewise (judged on the engine).
    :param block: True: ``map`` fires the list of results; False: it fires the
        list of taskids (one per chunk), to be collected later.
    :param chunksize: how many elements each task computes (>= 1), or None
        (the default) to choose from the number of elements
        (:func:`default_chunksize`); pass 1 for a few long-running elements.
    """

    def __init__(
        self,
        task_controller: Any,
        clear_before: bool = False,
        clear_after: bool = False,
        retries: int = 0,
        recovery_task: Any = None,
        depend: Callable | None = None,
        block: bool = True,
        chunksize: int | None = None,
    ):
        if chunksize is not None and (
            not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1
        ):
            raise ValueError(f"chunksize must be an int >= 1 or None, got {chunksize!r}")
        self.task_controller = task_controller
        self.flags = {
            "clear_before": clear_before,
            "clear_after": clear_after,
            "retries": retries,
            "recovery_task": recovery_task,
            "depend": depend,
        }
        self.block = block
        self.chunksize = chunksize

    def tasks(self, func: Callable, *sequences: Any) -> list[MapTask]:
        """The tasks :meth:`map` submits: one per chunk of argument tuples."""
        if not callable(func):
            raise TypeError(f"map() needs a callable, got {func!r}")
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        arglists = list(zip(*sequences, strict=False))
        name = getattr(func, "__name__", "function")
        n = self.chunksize or default_chunksize(len(arglists))
        return [
            MapTask(
                apply_chunk,
                args=(func, arglists[i : i + n]),
                description=f"map({name}) elements {i}..{min(i + n, len(arglists)) - 1}",
                **self.flags,
            )
            for i in range(0, len(arglists), n)
        ]

    def map(self, func: Callable, *sequences: Any) -> Deferred:
        """Load-balanced ``map(func, *sequences)`` (stopping at the shortest
        sequence, as the builtin does).

        :returns: a Deferred firing the list of results in order (or the list
            of taskids when not blocking).
        :raises: (errback) the exception of the first element (in order) whose
            task failed, as its original type when it can be unpickled here.
        """
        try:
            tasks = self.tasks(func, *sequences)
        except Exception as e:
            return fail(e)
        tc = self.task_controller
        d = gatherResults([tc.run(t) for t in tasks], consumeErrors=True)
        d.addErrback(_first_error)
        if self.block:
            d.addCallback(self._collect)
        return d

    def _collect(self, taskids: list[int]) -> Deferred:
        tc = self.task_controller
        d = tc.barrier(taskids)
        d.addCallback(
            lambda _: DeferredList(
                [tc.get_task_result(t, block=True) for t in taskids],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
        )
        d.addCallback(lambda pairs: _flatten([tr for _, tr in pairs]))
        d.addErrback(_first_error)
        return d

    def __repr__(self) -> str:
        return f"<TaskMapper chunksize={self.chunksize} block={self.block}>"


def _flatten(results: list) -> list:
    out: list = []
    for tr in results:
        out.extend(tr.results)  # raises the task's exception if it failed
    return out


def _first_error(f):
    if f.check(FirstError):
        return f.value.subFailure
    return f


class MapperMixin:
    """``map``, ``mapper`` and ``parallel`` for a task client.

    The mapper is ``mapper_class(self, clear_before=..., ..., chunksize=...)``:
    :class:`TaskMapper` by default, for a client whose ``run`` returns
    Deferreds; a blocking client names its own blocking mapper.
    """

    mapper_class: type = TaskMapper

    def map(self, func: Callable, *sequences: Any) -> Any:
        """Load-balanced ``map(func, *sequences)`` with the default flags.

        :returns: the list of results in order (a Deferred firing it, for
            a client that returns Deferreds).
        """
        return self.mapper().map(func, *sequences)

    def mapper(
        self,
        clear_before: bool = False,
        clear_after: bool = False,
        retries: int = 0,
        recovery_task: Any = None,
        depend: Callable | None = None,
        block: bool = True,
        chunksize: int | None = None,
    ) -> Any:
        """An :class:`~kernel.interfaces.IMapper` whose ``map`` runs each
        ``chunksize`` elements as one :class:`~kernel.task.MapTask` with these
        flags (see :class:`~kernel.task.BaseTask`). ``chunksize=None`` splits
        a long sequence into about :data:`DEFAULT_MAP_TASKS` tasks
        (:func:`default_chunksize`).

        :param block: ``map`` gives the results; if false it gives the list
            of taskids (one per chunk), to be collected later.
        :returns: an instance of :attr:`mapper_class`.
        """
        return self.mapper_class(
            self,
            clear_before=clear_before,
            clear_after=clear_after,
            retries=retries,
            recovery_task=recovery_task,
            depend=depend,
            block=block,
            chunksize=chunksize,
        )

    def parallel(
        self,
        clear_before: bool = False,
        clear_after: bool = False,
        retries: int = 0,
        recovery_task: Any = None,
        depend: Callable | None = None,
        block: bool = True,
        chunksize: int | None = None,
    ) -> Callable[[Callable], parallelfunction.ParallelFunction]:
        """A decorator making a function a load-balanced parallel function
        (calling it maps it over its argument sequences; options as
        :meth:`mapper`)."""
        return parallelfunction.parallel(
            self.mapper(clear_before, clear_after, retries, recovery_task, depend, block, chunksize)
        )
