"""Task records: what every task did, kept by a controller in an :class:`ITaskDB`.

A record is a dict of plain data with the keys of :data:`RECORD_KEYS`. Blob
fields (``payload``, ``result``) are bytes: the controller stores them
without opening them. Backends:

- :class:`kernel.taskdb.memory.DictDB` — in memory;
- :class:`kernel.taskdb.sqlite.SQLiteDB` — an embedded SQLite file (the default
  for a real controller).

:func:`match` implements the MongoDB-style queries of
:meth:`kernel.interfaces.ITaskDB.find_records` for every backend that has no
query language of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: Every key of a task record, with its meaning.
RECORD_KEYS: dict[str, str] = {
    "taskid": "int: the task's id",
    "status": "str: pending, running, succeeded, failed or aborted",
    "description": "str: a human description of the task (from its flags)",
    "flags": "dict: the plain-data flags the task was submitted with",
    "payload": "bytes: the serialized task body (opaque)",
    "submitted": "float: POSIX time the controller received the task",
    "started": "float: POSIX time the engine started the final attempt",
    "completed": "float: POSIX time the task finished (success or failure)",
    "resubmitted": "float: POSIX time of the latest resubmission (retry, move)",
    "engine_id": "int: the engine that ran the final attempt",
    "attempts": "int: how many times the task was sent to an engine",
    "result": "bytes: the serialized result (opaque), for a success",
    "error": "dict: RemoteError.to_dict() of the failure, for a failure",
    "stdout": "str: text the task wrote to stdout",
    "stderr": "str: text the task wrote to stderr",
}

#: Keys left out of :meth:`find_records` results unless asked for by name.
BLOB_KEYS = ("payload", "result")

#: Operator name -> test ``op(value, argument)``. ``$ge``/``$le`` are the
#: seed's spellings; as in its table they mean > and <.
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "$in": lambda v, a: v in a,
    "$nin": lambda v, a: v not in a,
    "$eq": lambda v, a: v == a,
    "$ne": lambda v, a: v != a,
    "$gt": lambda v, a: v is not None and v > a,
    "$ge": lambda v, a: v is not None and v > a,
    "$gte": lambda v, a: v is not None and v >= a,
    "$lt": lambda v, a: v is not None and v < a,
    "$le": lambda v, a: v is not None and v < a,
    "$lte": lambda v, a: v is not None and v <= a,
}


def new_record(taskid: int, **fields: Any) -> dict[str, Any]:
    """A record with every key of :data:`RECORD_KEYS` (None unless given)."""
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown:
        raise KeyError(f"not task record keys: {sorted(unknown)}")
    record = dict.fromkeys(RECORD_KEYS)
    record.update(fields)
    record["taskid"] = taskid
    return record


def check_query(query: Mapping[str, Any]) -> None:
    """Validate a query: known keys and operators.

    :raises KeyError: naming an unknown record key.
    :raises ValueError: naming an unknown operator.
    """
    for key, test in query.items():
        if key not in RECORD_KEYS:
            raise KeyError(f"{key!r} is not a task record key; use one of {sorted(RECORD_KEYS)}")
        # a dict with "$" keys is operators; any other dict is an exact value
        if isinstance(test, Mapping) and any(str(k).startswith("$") for k in test):
            for op in test:
                if op not in OPERATORS:
                    raise ValueError(
                        f"unknown query operator {op!r} for {key!r}; use one of "
                        f"{' '.join(OPERATORS)}"
                    )


def _is_operator_dict(test: Any) -> bool:
    return (
        isinstance(test, Mapping)
        and bool(test)
        and all(isinstance(k, str) and k.startswith("$") for k in test)
    )


def match(record: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    """Does ``record`` satisfy the MongoDB-style ``query``?

    Each query value is an exact value to compare with ``==`` or a dict of
    ``{operator: argument}`` that must all hold. A comparison against a
    missing (None) value is false, except ``$eq``/``$ne``/``$in``/``$nin``.
    """
    for key, test in query.items():
        value = record.get(key)
        if _is_operator_dict(test):
            for op, arg in test.items():
                try:
                    if not OPERATORS[op](value, arg):
                        return False
                except TypeError:
                    return False
        elif value != test:
            return False
    return True


def project(record: Mapping[str, Any], keys: Iterable[str] | str | None) -> dict[str, Any]:
    """The fields of ``record`` a query asked for (``taskid`` always included;
    without ``keys``, every field except the blobs)."""
    if keys is None:
        return {k: v for k, v in record.items() if k not in BLOB_KEYS}
    if isinstance(keys, str):
        keys = [keys]
    out = {"taskid": record["taskid"]}
    for k in keys:
        if k not in RECORD_KEYS:
            raise KeyError(f"{k!r} is not a task record key; use one of {sorted(RECORD_KEYS)}")
        out[k] = record.get(k)
    return out
