"""Parallel functions: a function wrapped so that calling it maps it in parallel.

Shared by the multiengine and task interfaces: the parallelism comes from an
:class:`~kernel.interfaces.IMapper` (for example
:class:`kernel.mapper.MultiEngineMapper`), so the same wrapper serves any
mapper::

    @parallel(multiengine.mapper(targets=[0, 1]))
    def f(x, y):
        return x + y

    f(range(10), range(10))   # f(0, 0), f(1, 1), ... spread over engines 0 and 1
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from kernel.interfaces import IMapper, IParallelFunction

__all__ = ["ParallelFunction", "parallel"]


@implementer(IParallelFunction)
class ParallelFunction:
    """``func`` mapped in parallel over its argument sequences by ``mapper``.

    :ivar func: the wrapped function (its name and docstring are copied).
    :ivar mapper: the :class:`~kernel.interfaces.IMapper` doing the work.
    """

    def __init__(self, func: Callable, mapper: IMapper):
        if not callable(func):
            raise TypeError(f"parallel() wraps functions, not {type(func).__name__} objects")
        self.func = func
        self.mapper = mapper
        functools.update_wrapper(self, func)

    def __call__(self, *sequences: Any) -> Any:
        """Map the function over ``sequences`` (as the builtin ``map``).

        :returns: whatever the mapper's ``map`` returns: the list of results,
            a Deferred firing it, or a pending id.
        """
        return self.mapper.map(self.func, *sequences)

    def __repr__(self) -> str:
        return (
            f"<ParallelFunction {getattr(self.func, '__name__', self.func)!r} via {self.mapper!r}>"
        )


def parallel(mapper: IMapper) -> Callable[[Callable], ParallelFunction]:
    """A decorator turning a function into a :class:`ParallelFunction` on ``mapper``."""

    def decorator(func: Callable) -> ParallelFunction:
        return ParallelFunction(func, mapper)

    return decorator
