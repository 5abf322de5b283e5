"""Task records in an embedded SQLite database (the default store).

One table, one column per record key. Dict fields (``flags``, ``error``) are
stored as JSON (bytes inside them as base64), blob fields as BLOBs: nothing
is pickled, so reading the database never runs code from it.

Queries are translated to SQL for the columns that hold plain values, then
every row is checked with :func:`kernel.taskdb.match`, so the results are
exactly those of the in-memory :class:`~kernel.taskdb.memory.DictDB`.

Calls run on the caller's thread (the reactor): SQLite on a local file in WAL
mode answers these small statements in microseconds.

Writes are group-committed: the first write opens a transaction, which is
committed :attr:`SQLiteDB.commit_delay` seconds later, after
:attr:`SQLiteDB.commit_every` writes, by :meth:`SQLiteDB.commit`, on
:meth:`SQLiteDB.close`, or when the reactor shuts down -- so a busy
controller pays for one commit per batch of task records, not three per
task. Reads go through the same connection and see every write at once; a
process killed outright loses at most the last ``commit_delay`` seconds.

Writes also wait in memory until the next read or commit (or
:attr:`SQLiteDB.commit_every` writes, or :attr:`SQLiteDB.flush_bytes` of
blobs): a new record as the row it will be, with the updates it gets
meanwhile merged into it, and the updates of a row this object wrote merged
per row. So a task that starts and finishes within one commit window
costs one INSERT, one that waited longer an INSERT and one UPDATE, and the
rows go in with one ``executemany`` per set of columns. Values are checked
and encoded by the call that gives them, so every error a write can meet
(an unknown key, a value SQLite cannot store, no such record) is still
reported by that call.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.python import log
from zope.interface import implementer

from kernel.interfaces import ITaskDB
from kernel.taskdb import BLOB_KEYS, RECORD_KEYS, check_query, match

_COLUMNS: dict[str, str] = {
    "taskid": "INTEGER PRIMARY KEY",
    "status": "TEXT",
    "description": "TEXT",
    "flags": "TEXT",
    "payload": "BLOB",
    "submitted": "REAL",
    "started": "REAL",
    "completed": "REAL",
    "resubmitted": "REAL",
    "engine_id": "INTEGER",
    "attempts": "INTEGER",
    "result": "BLOB",
    "error": "TEXT",
    "stdout": "TEXT",
    "stderr": "TEXT",
}
assert set(_COLUMNS) == set(RECORD_KEYS)

_JSON_KEYS = frozenset({"flags", "error"})
_SCALAR_TYPES = (str, int, float, bool, type(None), bytes)

_COMPARISONS = {"$gt": ">", "$ge": ">", "$gte": ">=", "$lt": "<", "$le": "<", "$lte": "<="}


def _bytes_to_json(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(o)).decode("ascii")}
    raise TypeError(f"a task record field holds a {type(o).__name__}, which is not plain data")


def _json_to_bytes(d: dict) -> Any:
    if set(d) == {"__bytes__"}:
        return base64.b64decode(d["__bytes__"])
    return d


# one encoder and decoder for every record (json.dumps/loads with a hook
# build a new one per call)
_ENCODER = json.JSONEncoder(default=_bytes_to_json)
_DECODER = json.JSONDecoder(object_hook=_json_to_bytes)


_FLAT_TYPES = frozenset({str, int, float, bool, type(None)})


class _LastJSON:
    """The JSON text of the flat dict encoded last: most tasks carry the
    same flags, so most records skip the encoding. Keys, order, values and
    value types must all match (``1``, ``1.0`` and ``True`` differ in JSON)."""

    __slots__ = ("key", "text")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.text: str | None = None

    def encode(self, value: Any) -> str | None:
        if value is None:
            return None
        if type(value) is not dict or not all(type(v) in _FLAT_TYPES for v in value.values()):
            return _ENCODER.encode(value)
        key = tuple((k, type(v), v) for k, v in value.items())
        if key != self.key:
            self.key, self.text = key, _ENCODER.encode(value)
        return self.text


_LAST_FLAGS = _LastJSON()


class _LastDecoded:
    """The flat dict decoded last from JSON text: the same text again gets
    a copy of it (a fresh dict: callers may change what they read)."""

    __slots__ = ("text", "value")

    def __init__(self) -> None:
        self.text: str | None = None
        self.value: dict | None = None

    def decode(self, text: str | None) -> Any:
        if text is None:
            return None
        if text == self.text:
            return dict(self.value)
        value = _DECODER.decode(text)
        if type(value) is dict and all(type(v) in _FLAT_TYPES for v in value.values()):
            self.text, self.value = text, dict(value)
        return value


_LAST_FLAGS_READ = _LastDecoded()


def _to_json(value: Any) -> str | None:
    if value is None:
        return None
    return _ENCODER.encode(value)


def _from_json(text: str | None) -> Any:
    if text is None:
        return None
    return _DECODER.decode(text)


def _encode(key: str, value: Any) -> Any:
    if key == "flags":
        return _LAST_FLAGS.encode(value)
    if key in _JSON_KEYS:
        return _to_json(value)
    if key in BLOB_KEYS and value is not None:
        return bytes(value)
    return value


# what the sqlite3 module binds as it is (exact types), and its integer range
_BINDABLE_TYPES = frozenset({str, int, float, bool, bytes, type(None)})
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _bindable(taskid: Any, encoded: Mapping[str, Any]) -> bool:
    """Would an INSERT of this row succeed (so it may wait to be written)?"""
    if type(taskid) is not int or not _INT_MIN <= taskid <= _INT_MAX:
        return False
    for v in encoded.values():
        t = type(v)
        if t not in _BINDABLE_TYPES or (t is int and not _INT_MIN <= v <= _INT_MAX):
            return False
    return True


_RECORD_KEY_SET = frozenset(RECORD_KEYS)

# the Python type SQLite returns for a value stored in each column
_STORED_TYPES: dict[str, type] = {
    k: {"INTEGER": int, "REAL": float, "TEXT": str, "BLOB": bytes}[t.split()[0]]
    for k, t in _COLUMNS.items()
}


def _as_stored(row: Mapping[str, Any]) -> bool:
    """Would SQLite give these encoded values back as they are (no column
    affinity conversion, no NaN read back as NULL)?"""
    for k, v in row.items():
        if v is not None and (type(v) is not _STORED_TYPES[k] or v != v):
            return False
    return True


def _blob_bytes(row: Mapping[str, Any], keys: Iterable[str] | None = None) -> int:
    """The size of the blob values of ``row`` (only those named in ``keys``)."""
    return sum(
        len(row[k]) for k in (row if keys is None else keys) if k in BLOB_KEYS and row.get(k)
    )


def _decode(key: str, value: Any) -> Any:
    if key == "flags":
        return _LAST_FLAGS_READ.decode(value)
    if key in _JSON_KEYS:
        return _from_json(value)
    return value


@implementer(ITaskDB)
class SQLiteDB:
    """Task records in a SQLite file.

    :param path: the database file (created if missing), or ``":memory:"``.
    :param table: the table name (letters, digits and underscores).
    :param clock: an ``IReactorTime`` that schedules the group commits
        (default: the reactor, which also commits before it shuts down).
    """

    #: Seconds a transaction of writes stays open before it is committed.
    commit_delay = 0.05

    #: Writes after which an open transaction is committed at once.
    commit_every = 2000

    #: Bytes of blobs (payloads, results) in the new records waiting in
    #: memory after which they are written at once.
    flush_bytes = 16 * 2**20

    #: How many taskids of rows it wrote this object remembers (their
    #: updates may wait in memory: the row is known to exist).
    known_rows = 2**16

    def __init__(self, path: str = ":memory:", table: str = "tasks", clock: Any = None):
        if not table.replace("_", "").isalnum():
            raise ValueError(f"table name must be letters, digits and underscores: {table!r}")
        self.path = str(path)
        self.table = table
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        if self.path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        columns = ", ".join(f"{k} {t}" for k, t in _COLUMNS.items())
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
        # taskids granted to clients in blocks, not all of them used yet
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table}_reserved (id INTEGER PRIMARY KEY, below INTEGER)"
        )
        self._writes = 0  # in the open transaction
        # new records not written yet: taskid -> {column: encoded value}
        self._pending: dict[int, dict[str, Any]] = {}
        # changes to rows known to exist: taskid -> {column: encoded value}
        self._updates: dict[int, dict[str, Any]] = {}
        self._pending_bytes = 0
        self._known: set[int] = set()  # taskids of rows this object wrote
        self._statements: dict[tuple, str] = {}  # (kind, keys) -> SQL
        self._commit_call: Any = None
        self._shutdown_trigger: Any = None
        if clock is None:
            from twisted.internet import reactor as clock

            self._shutdown_trigger = clock.addSystemEventTrigger("before", "shutdown", self.commit)
        self._clock = clock

    def __repr__(self) -> str:
        return f"<SQLiteDB {self.path!r} table={self.table!r}>"

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is closed")
        return self._conn

    def _write(self) -> sqlite3.Connection:
        """The connection, inside a transaction that a commit will close."""
        conn = self._db()
        if not conn.in_transaction:
            conn.execute("BEGIN")
            self._writes = 0
            if self._commit_call is None or not self._commit_call.active():
                self._commit_call = self._clock.callLater(self.commit_delay, self.commit)
        self._writes += 1
        return conn

    def _wrote(self) -> None:
        if self._writes >= self.commit_every:
            self.commit()

    def _pend(self, blob_bytes: int) -> None:
        """Count a write kept in memory (holding ``blob_bytes`` more)."""
        self._write()  # opens the transaction and schedules its commit
        self._pending_bytes += blob_bytes
        if self._pending_bytes >= self.flush_bytes:
            self.flush()
        self._wrote()

    def flush(self) -> None:
        """Write the new records waiting in memory (into the open
        transaction; :meth:`commit` makes them durable)."""
        pending, self._pending = self._pending, {}
        updates, self._updates = self._updates, {}
        self._pending_bytes = 0
        if not (pending or updates):
            return
        conn = self._db()
        inserts: dict[tuple, list[list[Any]]] = {}
        for taskid, row in pending.items():
            inserts.setdefault(tuple(row), []).append([taskid, *row.values()])
        for keys, rows in inserts.items():
            try:
                conn.executemany(self._insert_sql(keys), rows)
            except Exception:
                log.err(
                    None, f"{self!r}: could not add the records of tasks {[r[0] for r in rows]}"
                )
        self._remember(pending)
        changes: dict[tuple, list[list[Any]]] = {}
        for taskid, row in updates.items():
            changes.setdefault(tuple(row), []).append([*row.values(), taskid])
        for keys, rows in changes.items():
            try:
                cursor = conn.executemany(self._update_sql(keys), rows)
                if cursor.rowcount != len(rows):
                    raise KeyError(f"{len(rows) - cursor.rowcount} of these records are gone")
            except Exception:
                log.err(
                    None, f"{self!r}: could not update the records of tasks {[r[-1] for r in rows]}"
                )

    def _remember(self, taskids: Iterable[int]) -> None:
        """Note rows this object wrote (forgetting them all when too many)."""
        self._known.update(taskids)
        if len(self._known) > self.known_rows:
            self._known.clear()  # their updates are written at once again

    def _update_sql(self, keys: tuple) -> str:
        sql = self._statements.get(("update", keys))
        if sql is None:
            assignments = ", ".join(f"{k} = ?" for k in keys)
            sql = self._statements["update", keys] = (
                f"UPDATE {self.table} SET {assignments} WHERE taskid = ?"
            )
        return sql

    def _insert_sql(self, keys: tuple) -> str:
        sql = self._statements.get(("insert", keys))
        if sql is None:
            columns = ("taskid", *keys)
            sql = self._statements["insert", keys] = (
                f"INSERT OR REPLACE INTO {self.table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})"
            )
        return sql

    def commit(self) -> None:
        """Commit the writes made so far (they are already visible to reads
        through this object; this makes them durable and visible to others)."""
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        if (self._pending or self._updates) and self._conn is not None:
            self.flush()
        if self._conn is not None and self._conn.in_transaction:
            self._conn.commit()
        self._writes = 0

    def _row_to_record(self, keys: list[str], row: tuple) -> dict[str, Any]:
        return {k: _decode(k, v) for k, v in zip(keys, row, strict=True)}

    def _fetch(self, taskid: int) -> dict[str, Any] | None:
        """The record of ``taskid`` (None if there is none), as SQLite would
        return it: one waiting in memory is read from there when its values
        already have the types SQLite gives back, else written first."""
        waiting = changes = None
        if type(taskid) is int:
            waiting = self._pending.get(taskid)
            changes = self._updates.get(taskid) if waiting is None else None
        if waiting is not None or changes is not None:
            if not _as_stored(waiting if waiting is not None else changes):
                self.flush()
                waiting = changes = None
        if waiting is not None:
            self._db()  # a closed database refuses at once
            record: dict[str, Any] | None = dict.fromkeys(_COLUMNS)
            record["taskid"] = taskid
        else:
            keys = list(_COLUMNS)
            row = (
                self._db()
                .execute(f"SELECT {', '.join(keys)} FROM {self.table} WHERE taskid = ?", (taskid,))
                .fetchone()
            )
            record = None if row is None else self._row_to_record(keys, row)
        overlay = waiting if waiting is not None else changes
        if record is not None and overlay is not None:
            for k, v in overlay.items():
                record[k] = _decode(k, v)
        return record

    def next_taskid(self) -> int:
        """The first taskid no stored record uses (0 for an empty table).

        Synchronous (the file is local): a restarted controller starts its
        task ids here, so new tasks never overwrite the records of old ones.
        """
        if self._pending or self._updates:
            self.flush()
        (highest,) = self._db().execute(f"SELECT MAX(taskid) FROM {self.table}").fetchone()
        (reserved,) = self._db().execute(
            f"SELECT below FROM {self.table}_reserved WHERE id = 0"
        ).fetchone() or (0,)
        return max(0 if highest is None else highest + 1, reserved)

    def reserve_taskids_below(self, stop: int) -> defer.Deferred:
        """Remember that every taskid below ``stop`` has been handed out, so
        :meth:`next_taskid` never answers less, even for ids no record uses.
        Committed at once (a block of ids is granted only after this). Fires None.
        """
        try:
            self._write().execute(
                f"INSERT INTO {self.table}_reserved (id, below) VALUES (0, ?) "
                "ON CONFLICT(id) DO UPDATE SET below = MAX(below, excluded.below)",
                (int(stop),),
            )
            self.commit()
        except Exception:
            return defer.fail()
        return defer.succeed(None)

    # -- ITaskDB -------------------------------------------------------------

    def add_record(self, taskid: int, record: Mapping[str, Any]) -> defer.Deferred:
        """Store a new record (missing keys are None); replaces any record with
        the same taskid. Fires None.

        :raises: (errback) KeyError for an unknown record key.
        """
        try:
            fields = {k: v for k, v in record.items() if k != "taskid"}
            unknown = fields.keys() - RECORD_KEYS.keys()
            if unknown:
                raise KeyError(f"not task record keys: {sorted(unknown)}")
            # the columns left out are NULL: the row is replaced as a whole
            row = {k: _encode(k, v) for k, v in fields.items()}
            if _bindable(taskid, row):
                self._db()  # a closed database refuses at once
                self._pending[taskid] = row
                self._updates.pop(taskid, None)  # the row is replaced as a whole
                self._pend(_blob_bytes(row))
            else:
                # let SQLite say what is wrong, after the writes before it
                self.flush()
                self._write().execute(self._insert_sql(tuple(row)), [taskid, *row.values()])
                self._wrote()
        except Exception:
            return defer.fail()
        return defer.succeed(None)

    def update_record(self, taskid: int, changes: Mapping[str, Any]) -> defer.Deferred:
        """Merge ``changes`` into the record. Fires None.

        :raises: (errback) KeyError if there is no such record or a key is unknown.
        """
        try:
            if not _RECORD_KEY_SET.issuperset(changes):
                unknown = changes.keys() - RECORD_KEYS.keys()
                raise KeyError(f"not task record keys: {sorted(unknown)}")
            if "taskid" in changes:
                changes = {k: v for k, v in changes.items() if k != "taskid"}
            if (
                changes
                and type(taskid) is int
                and (taskid in self._pending or taskid in self._known)
            ):
                encoded = {k: _encode(k, v) for k, v in changes.items()}
                if _bindable(taskid, encoded):
                    # merge into the new row, or the changes to the row, not written yet
                    row = self._pending.get(taskid)
                    if row is None:
                        row = self._updates.setdefault(taskid, {})
                    blob_bytes = 0
                    if "result" in encoded or "payload" in encoded:
                        blob_bytes = _blob_bytes(encoded) - _blob_bytes(row, encoded)
                    row.update(encoded)
                    self._pend(max(blob_bytes, 0))
                    return defer.succeed(None)
                self.flush()
            if not changes:
                if self._fetch(taskid) is None:
                    raise KeyError(f"no task record with taskid {taskid!r}")
                return defer.succeed(None)
            cursor = self._write().execute(
                self._update_sql(tuple(changes)),
                [*(_encode(k, v) for k, v in changes.items()), taskid],
            )
            self._wrote()
            if cursor.rowcount == 0:
                raise KeyError(f"no task record with taskid {taskid!r}")
            if type(taskid) is int:
                self._remember((taskid,))
        except Exception:
            return defer.fail()
        return defer.succeed(None)

    def get_record(self, taskid: int) -> defer.Deferred:
        """Fire the record dict; KeyError if none."""
        try:
            record = self._fetch(taskid)
            if record is None:
                raise KeyError(f"no task record with taskid {taskid!r}")
        except Exception:
            return defer.fail()
        return defer.succeed(record)

    def drop_records(self, taskids: Iterable[int]) -> defer.Deferred:
        """Delete the records (unknown taskids are ignored). Fires None."""
        try:
            if self._pending or self._updates:
                self.flush()
            taskids = list(taskids)
            self._write().executemany(
                f"DELETE FROM {self.table} WHERE taskid = ?", [(t,) for t in taskids]
            )
            self._known.difference_update(t for t in taskids if type(t) is int)
            self._wrote()
        except Exception:
            return defer.fail()
        return defer.succeed(None)

    def find_records(
        self, query: Mapping[str, Any], keys: Iterable[str] | str | None = None
    ) -> defer.Deferred:
        """Fire the records matching ``query`` in taskid order; ``keys`` limits
        the fields (see :meth:`kernel.interfaces.ITaskDB.find_records`)."""
        try:
            check_query(query)
            if keys is None:
                wanted = [k for k in _COLUMNS if k not in BLOB_KEYS]
            else:
                if isinstance(keys, str):
                    keys = [keys]
                wanted = ["taskid"]
                for k in keys:
                    if k not in RECORD_KEYS:
                        raise KeyError(
                            f"{k!r} is not a task record key; use one of {sorted(RECORD_KEYS)}"
                        )
                    if k not in wanted:
                        wanted.append(k)
            where, params = _where(query)
            if self._pending or self._updates:
                self.flush()
            # fetch the queried columns too, to check every row with match()
            columns = wanted + [k for k in query if k not in wanted]
            sql = f"SELECT {', '.join(columns)} FROM {self.table}"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY taskid"
            found = []
            for row in self._db().execute(sql, params):
                record = self._row_to_record(columns, row)
                if match(record, query):
                    found.append({k: record[k] for k in wanted})
        except Exception:
            return defer.fail()
        return defer.succeed(found)

    def close(self) -> defer.Deferred:
        """Commit and close the database file. Fires None."""
        if self._conn is not None:
            self.commit()
            if self._shutdown_trigger is not None:
                self._clock.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
            self._conn.close()
            self._conn = None
        return defer.succeed(None)


def _where(query: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """SQL conditions selecting (at least) the rows that match ``query``.

    Conditions on JSON columns and on non-scalar values are left to
    :func:`kernel.taskdb.match`.
    """
    where: list[str] = []
    params: list[Any] = []
    for key, test in query.items():
        if key in _JSON_KEYS:
            continue
        if not (isinstance(test, Mapping) and test and all(str(k).startswith("$") for k in test)):
            if isinstance(test, _SCALAR_TYPES):
                where.append(f"{key} IS ?")
                params.append(test)
            continue
        for op, arg in test.items():
            if op in ("$eq", "$ne") and isinstance(arg, _SCALAR_TYPES):
                where.append(f"{key} {'IS' if op == '$eq' else 'IS NOT'} ?")
                params.append(arg)
            elif op in _COMPARISONS and isinstance(arg, (int, float, str)):
                where.append(f"{key} IS NOT NULL AND {key} {_COMPARISONS[op]} ?")
                params.append(arg)
            elif op in ("$in", "$nin") and isinstance(arg, (list, tuple, set, frozenset)):
                values = list(arg)
                if not all(isinstance(v, _SCALAR_TYPES) for v in values):
                    continue
                present = [v for v in values if v is not None]
                has_null = len(present) != len(values)
                marks = ", ".join("?" for _ in present)
                if op == "$in":
                    parts = [f"{key} IN ({marks})"] if present else []
                    if has_null:
                        parts.append(f"{key} IS NULL")
                    where.append("(" + " OR ".join(parts) + ")" if parts else "0")
                else:
                    if present:
                        null_part = f"{key} IS NOT NULL" if has_null else f"{key} IS NULL"
                        joiner = "AND" if has_null else "OR"
                        where.append(f"({null_part} {joiner} {key} NOT IN ({marks}))")
                    elif has_null:
                        where.append(f"{key} IS NOT NULL")
                params.extend(present)
    return where, params
