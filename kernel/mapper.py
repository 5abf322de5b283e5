"""Mappers: objects with a parallel ``map`` (:class:`~kernel.interfaces.IMapper`).

:class:`MultiEngineMapper` maps over engines addressed by id, through any
object with the multiengine ``raw_map`` (the core
:class:`~kernel.multiengine.MultiEngine`, a
:class:`~kernel.multiengine.SynchronousMultiEngine`, or a client built on one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from kernel import map as kmap
from kernel.interfaces import IMapper

__all__ = ["MultiEngineMapper"]


@implementer(IMapper)
class MultiEngineMapper:
    """Map a function in parallel over a fixed set of engines.

    :param multiengine: provides ``raw_map(func, seqs, dist=, targets=)``
        (and ``block=`` when ``block`` is given).
    :param dist: the distribution (only ``'b'``, blocks).
    :param targets: the engines to use: an int, a list of ints or ``'all'``.
    :param block: passed on as ``raw_map``'s ``block`` when not None; the core
        multiengine has no ``block`` and always returns a Deferred.
    """

    def __init__(
        self,
        multiengine: Any,
        dist: str = "b",
        targets: Any = "all",
        block: bool | None = None,
    ):
        kmap.distribution(dist)  # refuse an unknown distribution now, not at map time
        self.multiengine = multiengine
        self.dist = dist
        self.targets = targets
        self.block = block

    def map(self, func: Callable, *seqs: Any) -> Any:
        """``map(func, *seqs)`` in parallel.

        :returns: what ``raw_map`` returns: a Deferred firing the list of
            results in order (or a pending id when ``block`` is false).
        """
        kwargs: dict[str, Any] = {"dist": self.dist, "targets": self.targets}
        if self.block is not None:
            kwargs["block"] = self.block
        return self.multiengine.raw_map(func, seqs, **kwargs)

    def __repr__(self) -> str:
        return (
            f"<MultiEngineMapper dist={self.dist!r} targets={self.targets!r} block={self.block!r}>"
        )
