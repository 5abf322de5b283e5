"""The SQLite task database: the ITaskDB contract plus persistence."""

import sqlite3

import pytest
import pytest_twisted

from kernel.taskdb.sqlite import SQLiteDB
from tests.contract.taskdb import TaskDBContract


class TestSQLiteDBFile(TaskDBContract):
    @pytest.fixture
    def db(self, tmp_path):
        db = SQLiteDB(str(tmp_path / "tasks.db"))
        yield db
        db.close()


class TestSQLiteDBMemory(TaskDBContract):
    @pytest.fixture
    def db(self):
        db = SQLiteDB(":memory:")
        yield db
        db.close()


@pytest_twisted.ensureDeferred
async def test_records_survive_reopening(tmp_path):
    path = str(tmp_path / "tasks.db")
    db = SQLiteDB(path)
    await db.add_record(
        4,
        {
            "status": "failed",
            "flags": {"retries": 1, "recovery_task": {"flags": {}, "payload": b"\x00\xff"}},
            "error": {"ename": "E", "evalue": "v", "pickled": b"\x80\x05"},
            "result": b"\x01" * 10,
        },
    )
    await db.close()
    again = SQLiteDB(path)
    rec = await again.get_record(4)
    assert rec["flags"]["recovery_task"]["payload"] == b"\x00\xff"
    assert rec["error"]["pickled"] == b"\x80\x05"
    assert rec["result"] == b"\x01" * 10
    await again.close()


@pytest_twisted.ensureDeferred
async def test_dict_fields_are_stored_as_json_not_pickles(tmp_path):
    path = str(tmp_path / "tasks.db")
    db = SQLiteDB(path)
    await db.add_record(1, {"flags": {"retries": 2, "description": "x"}})
    await db.close()
    (text,) = sqlite3.connect(path).execute("SELECT flags FROM tasks").fetchone()
    assert text == '{"retries": 2, "description": "x"}'


@pytest_twisted.ensureDeferred
async def test_query_on_dict_field_is_checked_exactly(tmp_path):
    db = SQLiteDB(str(tmp_path / "t.db"))
    await db.add_record(1, {"error": {"ename": "A"}})
    await db.add_record(2, {"error": {"ename": "B"}})
    found = await db.find_records({"error": {"ename": "B"}}, keys=["status"])
    assert found == [{"taskid": 2, "status": None}]
    await db.close()


@pytest_twisted.ensureDeferred
async def test_closed_database_fails_calls(tmp_path):
    db = SQLiteDB(str(tmp_path / "t.db"))
    await db.close()
    with pytest.raises(RuntimeError, match="closed"):
        await db.get_record(1)


def test_bad_table_name_is_refused(tmp_path):
    with pytest.raises(ValueError):
        SQLiteDB(str(tmp_path / "t.db"), table="x; DROP TABLE y")


def _rows_seen_by_another_connection(path):
    other = sqlite3.connect(path)
    try:
        return [t for (t,) in other.execute("SELECT taskid FROM tasks ORDER BY taskid")]
    finally:
        other.close()


def test_writes_are_group_committed_after_the_commit_delay(tmp_path):
    from twisted.internet.task import Clock

    path, clock = str(tmp_path / "t.db"), Clock()
    db = SQLiteDB(path, clock=clock)
    db.add_record(1, {"status": "pending"})
    db.update_record(1, {"status": "running"})
    db.add_record(2, {"status": "pending"})
    assert db.get_record(1).result["status"] == "running"  # visible here at once
    assert _rows_seen_by_another_connection(path) == []  # not committed yet
    assert len(clock.getDelayedCalls()) == 1  # one commit for the whole batch
    clock.advance(db.commit_delay)
    assert _rows_seen_by_another_connection(path) == [1, 2]
    assert clock.getDelayedCalls() == []
    db.close()


def test_many_writes_commit_without_waiting_for_the_delay(tmp_path):
    from twisted.internet.task import Clock

    path = str(tmp_path / "t.db")
    db = SQLiteDB(path, clock=Clock())
    db.commit_every = 3
    for taskid in range(3):
        db.add_record(taskid, {})
    assert _rows_seen_by_another_connection(path) == [0, 1, 2]
    db.add_record(3, {})
    db.close()
    assert _rows_seen_by_another_connection(path) == [0, 1, 2, 3]  # close commits


@pytest_twisted.ensureDeferred
async def test_flags_equal_in_value_but_not_in_type_are_stored_as_given():
    # the encoder reuses the text of the flags it encoded last: 1, 1.0 and
    # True compare equal in Python but must come back as they went in
    db = SQLiteDB(":memory:")
    given = [
        {"retries": 1, "timeout": 1.0, "clear_before": True},
        {"retries": 1, "timeout": 1.0, "clear_before": True},
        {"retries": True, "timeout": 1, "clear_before": 1},
        {"timeout": 1.0, "retries": 1, "clear_before": True},
        {"retries": 1, "timeout": 1.0, "clear_before": True},
    ]
    for taskid, flags in enumerate(given):
        await db.add_record(taskid, {"status": "pending", "flags": flags})
    for taskid, flags in enumerate(given):
        stored = (await db.get_record(taskid))["flags"]
        assert stored == flags
        assert list(stored) == list(flags)
        assert [type(v) for v in stored.values()] == [type(v) for v in flags.values()]
    db.close()


@pytest_twisted.ensureDeferred
async def test_flags_changed_after_a_write_are_encoded_again():
    db = SQLiteDB(":memory:")
    flags = {"retries": 0, "description": "a"}
    await db.add_record(0, {"flags": flags})
    flags["description"] = "b"
    await db.add_record(1, {"flags": flags})
    assert (await db.get_record(0))["flags"]["description"] == "a"
    assert (await db.get_record(1))["flags"]["description"] == "b"
    db.close()


def _statements(db):
    """Record the SQL statements ``db`` runs from now on."""
    seen = []
    db._conn.set_trace_callback(seen.append)
    return seen


def _kinds(statements):
    return [s.split()[0] for s in statements if s.split()[0] in ("INSERT", "UPDATE", "DELETE")]


def test_a_new_records_updates_are_merged_into_one_insert(tmp_path):
    from twisted.internet.task import Clock

    path, clock = str(tmp_path / "t.db"), Clock()
    db = SQLiteDB(path, clock=clock)
    seen = _statements(db)
    db.add_record(1, {"status": "pending", "payload": b"p", "attempts": 0})
    db.update_record(1, {"status": "running", "engine_id": 3, "attempts": 1})
    db.update_record(1, {"status": "succeeded", "result": b"r"})
    assert _kinds(seen) == []  # nothing written before the commit
    clock.advance(db.commit_delay)
    assert _kinds(seen) == ["INSERT"]
    assert _rows_seen_by_another_connection(path) == [1]
    record = db.get_record(1).result
    assert record["status"] == "succeeded" and record["engine_id"] == 3
    assert record["attempts"] == 1 and record["payload"] == b"p" and record["result"] == b"r"
    assert record["error"] is None and record["started"] is None
    db.close()


def test_new_records_are_written_with_one_statement_per_set_of_columns():
    db = SQLiteDB(":memory:")
    seen = _statements(db)
    for taskid in range(5):
        db.add_record(taskid, {"status": "pending", "attempts": 0})
    db.add_record(5, {"status": "failed"})
    db.commit()
    # executemany is traced once per row; the rows of one shape share one SQL text
    inserts = [s for s in seen if s.startswith("INSERT")]
    assert len(inserts) == 6 and len(set(s.split(" VALUES")[0] for s in inserts)) == 2
    db.close()


def test_every_read_sees_the_records_still_in_memory():
    db = SQLiteDB(":memory:")
    db.add_record(1, {"status": "pending", "description": "a"})
    db.add_record(2, {"status": "pending", "description": "b"})
    db.update_record(2, {"status": "running"})
    assert db.get_record(2).result["status"] == "running"
    db.add_record(3, {"status": "pending"})
    found = db.find_records({"status": "pending"}, keys=["description"]).result
    assert [r["taskid"] for r in found] == [1, 3]
    db.add_record(4, {"status": "pending"})
    assert db.next_taskid() == 5
    db.add_record(5, {"status": "pending"})
    db.drop_records([5, 1])
    assert db.find_records({}, keys="status").result == [
        {"taskid": 2, "status": "running"},
        {"taskid": 3, "status": "pending"},
        {"taskid": 4, "status": "pending"},
    ]
    db.close()


def test_adding_a_record_again_replaces_the_one_in_memory():
    db = SQLiteDB(":memory:")
    db.add_record(1, {"status": "pending", "description": "old", "stdout": "x"})
    db.update_record(1, {"status": "running"})
    db.add_record(1, {"status": "pending", "description": "new"})
    record = db.get_record(1).result
    assert record["description"] == "new" and record["stdout"] is None
    db.close()


def test_bad_values_still_fail_the_call_that_gives_them():
    db = SQLiteDB(":memory:")
    db.add_record(1, {"status": "pending"})
    bad_update = db.update_record(1, {"stdout": ["not", "text"]})
    assert isinstance(bad_update.result.value, sqlite3.Error)
    bad_update.addErrback(lambda _: None)
    bad_flags = db.add_record(2, {"flags": {"x": object()}})
    assert bad_flags.result.check(TypeError)
    bad_flags.addErrback(lambda _: None)
    bad_id = db.add_record("three", {"status": "pending"})
    assert isinstance(bad_id.result.value, sqlite3.Error)
    bad_id.addErrback(lambda _: None)
    huge = db.update_record(1, {"attempts": 2**70})
    assert huge.result.check(OverflowError)
    huge.addErrback(lambda _: None)
    # the good writes before them stand
    assert db.get_record(1).result["status"] == "pending"
    assert db.find_records({}, keys="status").result == [{"taskid": 1, "status": "pending"}]
    db.close()


def test_large_blobs_waiting_in_memory_are_written_early():
    db = SQLiteDB(":memory:")
    db.flush_bytes = 1000
    seen = _statements(db)
    db.add_record(1, {"status": "pending", "payload": b"x" * 600})
    assert _kinds(seen) == []
    db.update_record(1, {"status": "succeeded", "result": b"y" * 600})
    assert _kinds(seen) == ["INSERT"]
    assert db.get_record(1).result["result"] == b"y" * 600
    db.close()


def test_a_closed_database_refuses_writes_at_once():
    db = SQLiteDB(":memory:")
    db.close()
    d = db.add_record(1, {"status": "pending"})
    assert d.result.check(RuntimeError)
    d.addErrback(lambda _: None)


def test_updates_of_a_written_row_are_merged_into_one_update(tmp_path):
    from twisted.internet.task import Clock

    path, clock = str(tmp_path / "t.db"), Clock()
    db = SQLiteDB(path, clock=clock)
    db.add_record(1, {"status": "pending", "attempts": 0})
    clock.advance(db.commit_delay)  # the new row is written and committed
    seen = _statements(db)
    db.update_record(1, {"status": "running", "engine_id": 0, "attempts": 1})
    db.update_record(1, {"status": "succeeded", "stdout": "hi"})
    assert _kinds(seen) == []
    clock.advance(db.commit_delay)
    assert _kinds(seen) == ["UPDATE"]
    record = db.get_record(1).result
    assert (record["status"], record["engine_id"], record["attempts"], record["stdout"]) == (
        "succeeded",
        0,
        1,
        "hi",
    )
    db.close()


def test_a_dropped_or_unknown_record_still_refuses_updates():
    db = SQLiteDB(":memory:")
    db.add_record(1, {"status": "pending"})
    db.commit()
    db.drop_records(iter([1]))
    gone = db.update_record(1, {"status": "running"})
    assert gone.result.check(KeyError)
    gone.addErrback(lambda _: None)
    empty = db.update_record(1, {})
    assert empty.result.check(KeyError)
    empty.addErrback(lambda _: None)
    db.add_record(2, {"status": "pending"})
    assert db.update_record(2, {}).result is None
    db.close()


def test_rows_forgotten_past_the_limit_are_updated_at_once():
    db = SQLiteDB(":memory:")
    db.known_rows = 2
    for taskid in range(3):
        db.add_record(taskid, {"status": "pending"})
    db.commit()  # three rows written: more than it remembers
    seen = _statements(db)
    db.update_record(0, {"status": "running"})
    assert _kinds(seen) == ["UPDATE"]  # written at once, its row checked
    missing = db.update_record(7, {"status": "running"})
    assert missing.result.check(KeyError)
    missing.addErrback(lambda _: None)
    assert db.get_record(0).result["status"] == "running"
    db.close()


def _typed(record):
    return {k: (type(v), v) for k, v in record.items()}


def test_a_record_read_from_memory_is_the_one_sqlite_returns(tmp_path):
    # a record still waiting in memory is read from there only when SQLite
    # would give its values back unchanged (here: 5 in a REAL column comes
    # back 5.0, 1.0 in an INTEGER one comes back 1, NaN comes back None)
    from twisted.internet.task import Clock

    path = str(tmp_path / "t.db")
    db = SQLiteDB(path, clock=Clock())
    seen = _statements(db)
    writes = {
        1: [{"status": "pending", "flags": {"retries": 1}, "payload": b"p", "submitted": 1.5}],
        2: [{"status": "pending", "submitted": 5}, {"attempts": 1.0}],
        3: [{"status": "pending"}, {"status": "done", "completed": float("nan")}],
        4: [{"status": "pending", "error": {"ename": "E", "pickled": b"\x00"}}],
        5: [{"status": "pending", "attempts": True}],
    }
    for taskid, (first, *more) in writes.items():
        db.add_record(taskid, first)
        for changes in more:
            db.update_record(taskid, changes)
    before = {taskid: db.get_record(taskid).result for taskid in writes}
    db.close()
    again = SQLiteDB(path, clock=Clock())
    for taskid in writes:
        assert _typed(before[taskid]) == _typed(again.get_record(taskid).result)
        assert list(before[taskid]) == list(again.get_record(taskid).result)
    again.close()
    assert _kinds(seen).count("INSERT") == 5


def test_reading_a_record_waiting_in_memory_writes_nothing(tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    db = SQLiteDB(str(tmp_path / "t.db"), clock=clock)
    db.add_record(1, {"status": "pending", "submitted": 1.0})
    db.add_record(2, {"status": "pending", "submitted": 2.0})
    clock.advance(db.commit_delay)
    db.update_record(2, {"status": "running", "engine_id": 1})
    db.add_record(3, {"status": "pending", "submitted": 3.0})
    seen = _statements(db)
    assert db.get_record(3).result["submitted"] == 3.0  # from memory
    record = db.get_record(2).result  # the written row, with its changes over it
    assert (record["status"], record["engine_id"], record["submitted"]) == ("running", 1, 2.0)
    assert db.get_record(1).result["status"] == "pending"
    assert _kinds(seen) == []
    missing = db.get_record(9)
    assert missing.result.check(KeyError)
    missing.addErrback(lambda _: None)
    db.close()


def test_flags_read_twice_are_separate_dicts():
    db = SQLiteDB(":memory:")
    db.add_record(1, {"flags": {"retries": 0, "description": "d"}})
    db.add_record(2, {"flags": {"retries": 0, "description": "d"}})
    db.commit()
    first = db.get_record(1).result["flags"]
    first["retries"] = 99  # a caller changing what it read
    second = db.get_record(2).result["flags"]
    assert second == {"retries": 0, "description": "d"}
    assert db.get_record(1).result["flags"]["retries"] == 0
    db.close()
