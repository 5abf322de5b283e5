"""An in-memory task database."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kernel.interfaces import ITaskDB
from kernel.taskdb import RECORD_KEYS, check_query, match, new_record, project

_IMMUTABLE = (str, bytes, int, float, bool, type(None))


def _copy(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy sharing only immutable values with ``record``."""
    return {k: v if isinstance(v, _IMMUTABLE) else copy.deepcopy(v) for k, v in record.items()}


@implementer(ITaskDB)
class DictDB:
    """Task records in a dict, for tests and short-lived controllers.

    Records are copied in and out, so callers cannot change stored records by
    mutating what they passed or got back.
    """

    def __init__(self) -> None:
        self._records: dict[int, dict[str, Any]] = {}
        self._reserved = 0

    def next_taskid(self) -> int:
        """The first taskid that no record uses and no reservation covers."""
        highest = max(self._records, default=-1)
        return max(highest + 1, self._reserved)

    def reserve_taskids_below(self, stop: int) -> defer.Deferred:
        """Remember that every taskid below ``stop`` has been handed out. Fires None."""
        self._reserved = max(self._reserved, int(stop))
        return defer.succeed(None)

    def add_record(self, taskid: int, record: Mapping[str, Any]) -> defer.Deferred:
        """Store a new record (missing keys are None). Fires None.

        :raises: (errback) KeyError for an unknown record key.
        """
        try:
            self._records[taskid] = new_record(taskid, **_without_taskid(record))
        except KeyError as e:
            return defer.fail(e)
        return defer.succeed(None)

    def update_record(self, taskid: int, changes: Mapping[str, Any]) -> defer.Deferred:
        """Merge ``changes`` into the record. Fires None.

        :raises: (errback) KeyError if there is no such record or a key is unknown.
        """
        record = self._records.get(taskid)
        if record is None:
            return defer.fail(KeyError(f"no task record with taskid {taskid!r}"))
        unknown = set(changes) - set(RECORD_KEYS)
        if unknown:
            return defer.fail(KeyError(f"not task record keys: {sorted(unknown)}"))
        record.update(_copy(changes))
        return defer.succeed(None)

    def get_record(self, taskid: int) -> defer.Deferred:
        """Fire a copy of the record; KeyError if none."""
        record = self._records.get(taskid)
        if record is None:
            return defer.fail(KeyError(f"no task record with taskid {taskid!r}"))
        return defer.succeed(_copy(record))

    def drop_records(self, taskids: Iterable[int]) -> defer.Deferred:
        """Delete the records (unknown taskids are ignored). Fires None."""
        for taskid in taskids:
            self._records.pop(taskid, None)
        return defer.succeed(None)

    def find_records(
        self, query: Mapping[str, Any], keys: Iterable[str] | str | None = None
    ) -> defer.Deferred:
        """Fire the records matching ``query`` in taskid order (see
        :func:`kernel.taskdb.match`); ``keys`` limits the fields."""
        try:
            check_query(query)
            found = [
                _copy(project(r, keys)) for _, r in sorted(self._records.items()) if match(r, query)
            ]
        except (KeyError, ValueError) as e:
            return defer.fail(e)
        return defer.succeed(found)

    def close(self) -> defer.Deferred:
        """Drop every record. Fires None."""
        self._records.clear()
        return defer.succeed(None)


def _without_taskid(record: Mapping[str, Any]) -> dict[str, Any]:
    fields = _copy(record)
    fields.pop("taskid", None)
    return fields
