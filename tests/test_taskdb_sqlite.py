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
