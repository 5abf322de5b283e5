"""Results of non-blocking calls, kept until their client asks for them.

A :class:`PendingDeferredManager` belongs to one client (see
:class:`kernel.multiengine.SynchronousMultiEngine`): a call made with
``block=False`` saves its Deferred here under a new int id, and the client
redeems the id later, exactly once.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from kernel.error import InvalidDeferredID, ResultNotCompleted

__all__ = ["PendingDeferredManager"]


class _Waiting:
    """Marker for an entry whose Deferred has not fired yet."""

    __slots__ = ()


_WAITING = _Waiting()


class PendingDeferredManager:
    """Pending results of one client, by int id.

    Each saved Deferred's outcome (value or failure) is taken into the manager
    as soon as it fires, so a failure is never reported as an "Unhandled error
    in Deferred": it is delivered once, to whoever redeems the id, or dropped
    silently by :meth:`clear_pending_deferreds`.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        # id -> result (a value or a Failure), or _WAITING until it fires.
        self._results: dict[int, Any] = {}
        # id -> Deferreds handed out by blocking gets, fired when the result comes.
        self._waiters: dict[int, defer.Deferred] = {}

    def __len__(self) -> int:
        """Number of ids not yet redeemed."""
        return len(self._results)

    def save_pending_deferred(self, d: defer.Deferred) -> int:
        """Keep the outcome of ``d`` and return the new id to redeem it with."""
        deferred_id = next(self._ids)
        self._results[deferred_id] = _WAITING
        d.addBoth(self._fired, deferred_id)
        return deferred_id

    def quick_has_id(self, deferred_id: int) -> bool:
        """Is ``deferred_id`` saved and not yet redeemed?"""
        return deferred_id in self._results

    def get_pending_deferred(self, deferred_id: int, block: bool) -> defer.Deferred:
        """Redeem ``deferred_id``.

        :param block: if true, the Deferred fires when the result is ready;
            if false, it fails at once with ResultNotCompleted when it is not.
        :returns: Deferred firing the saved call's result, or failing with its
            failure. After that the id is gone.
        :raises: (errback) :class:`InvalidDeferredID` if the id is unknown or
            already redeemed; :class:`ResultNotCompleted` (``block`` false).
        """
        try:
            result = self._results[deferred_id]
        except (KeyError, TypeError):
            return defer.fail(
                InvalidDeferredID(
                    f"no pending result with id {deferred_id!r}: it was never issued to "
                    "this client, was already fetched, or was cleared"
                )
            )
        if result is _WAITING:
            if not block:
                return defer.fail(
                    ResultNotCompleted(
                        f"the result of pending id {deferred_id} is not ready yet: "
                        "ask again later, or pass block=True to wait for it"
                    )
                )
            del self._results[deferred_id]
            waiter: defer.Deferred = defer.Deferred()
            self._waiters[deferred_id] = waiter
            return waiter
        del self._results[deferred_id]
        if isinstance(result, Failure):
            return defer.fail(result)
        return defer.succeed(result)

    def delete_pending_deferred(self, deferred_id: int) -> None:
        """Forget one id; its result, when it comes, is dropped."""
        self._results.pop(deferred_id, None)

    def clear_pending_deferreds(self) -> None:
        """Forget every id not yet redeemed; their results are dropped when they come.

        A blocking get already in progress still receives its result.
        """
        self._results.clear()

    def _fired(self, result: Any, deferred_id: int) -> None:
        waiter = self._waiters.pop(deferred_id, None)
        if waiter is not None:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        elif deferred_id in self._results:
            self._results[deferred_id] = result
        # else: cleared or deleted; the result (even a failure) is dropped.
        return None
