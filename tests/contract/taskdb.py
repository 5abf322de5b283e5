"""Contract tests for :class:`kernel.interfaces.ITaskDB`.

A backend opts in by subclassing :class:`TaskDBContract` and providing a
``db`` fixture that yields a fresh, empty database.
"""

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kernel.interfaces import ITaskDB
from kernel.taskdb import RECORD_KEYS


async def _fill(db):
    """Five records with varied fields."""
    rows = [
        dict(
            status="succeeded",
            engine_id=0,
            submitted=10.0,
            started=11.0,
            completed=12.0,
            result=b"\x00r1",
            stdout="one\n",
            flags={"retries": 0},
        ),
        dict(
            status="failed",
            engine_id=1,
            submitted=20.0,
            started=21.0,
            completed=22.0,
            error={"ename": "ValueError", "evalue": "bad"},
        ),
        dict(status="running", engine_id=0, submitted=30.0, started=31.0),
        dict(status="pending", submitted=40.0),
        dict(status="aborted", engine_id=2, submitted=50.0, completed=55.0),
    ]
    for i, row in enumerate(rows):
        await db.add_record(i, row)


class TaskDBContract:
    """Behaviour every ITaskDB backend shares."""

    def test_provides_interface(self, db):
        assert verifyObject(ITaskDB, db)

    @pytest_twisted.ensureDeferred
    async def test_record_roundtrip_has_every_key(self, db):
        await db.add_record(7, {"status": "pending", "submitted": 1.5, "payload": b"\x01\x02"})
        rec = await db.get_record(7)
        assert set(rec) == set(RECORD_KEYS)
        assert rec["taskid"] == 7
        assert rec["status"] == "pending"
        assert rec["submitted"] == 1.5
        assert rec["payload"] == b"\x01\x02"
        assert rec["result"] is None

    @pytest_twisted.ensureDeferred
    async def test_update_merges_changes(self, db):
        await db.add_record(1, {"status": "pending", "submitted": 1.0})
        await db.update_record(
            1, {"status": "succeeded", "engine_id": 3, "error": {"ename": "X", "evalue": "y"}}
        )
        rec = await db.get_record(1)
        assert (rec["status"], rec["engine_id"], rec["submitted"]) == ("succeeded", 3, 1.0)
        assert rec["error"] == {"ename": "X", "evalue": "y"}

    @pytest_twisted.ensureDeferred
    async def test_update_of_missing_record_fails_with_key_error(self, db):
        with pytest.raises(KeyError):
            await db.update_record(99, {"status": "failed"})

    @pytest_twisted.ensureDeferred
    async def test_get_missing_record_fails_with_key_error(self, db):
        with pytest.raises(KeyError):
            await db.get_record(99)

    @pytest_twisted.ensureDeferred
    async def test_unknown_record_key_is_refused(self, db):
        with pytest.raises(KeyError):
            await db.add_record(1, {"colour": "red"})

    @pytest_twisted.ensureDeferred
    async def test_drop_records(self, db):
        await _fill(db)
        await db.drop_records([1, 3, 42])
        found = await db.find_records({})
        assert [r["taskid"] for r in found] == [0, 2, 4]

    @pytest_twisted.ensureDeferred
    async def test_stored_record_is_not_changed_by_caller_mutation(self, db):
        flags = {"retries": 1}
        await db.add_record(1, {"flags": flags})
        flags["retries"] = 5
        rec = await db.get_record(1)
        rec["flags"]["retries"] = 9
        assert (await db.get_record(1))["flags"] == {"retries": 1}

    @pytest_twisted.ensureDeferred
    async def test_find_exact_value_and_none(self, db):
        await _fill(db)
        assert [r["taskid"] for r in await db.find_records({"engine_id": 0})] == [0, 2]
        assert [r["taskid"] for r in await db.find_records({"completed": None})] == [2, 3]

    @pytest.mark.parametrize(
        "query, expected",
        [
            ({"engine_id": {"$in": [1, 2]}}, [1, 4]),
            ({"engine_id": {"$nin": [0, None]}}, [1, 4]),
            ({"status": {"$eq": "failed"}}, [1]),
            ({"status": {"$ne": "failed"}}, [0, 2, 3, 4]),
            ({"submitted": {"$gt": 30.0}}, [3, 4]),
            ({"submitted": {"$gte": 30.0}}, [2, 3, 4]),
            ({"submitted": {"$lt": 30.0}}, [0, 1]),
            ({"submitted": {"$lte": 30.0}}, [0, 1, 2]),
            ({"submitted": {"$ge": 30.0}}, [3, 4]),
            ({"submitted": {"$le": 30.0}}, [0, 1]),
            ({"submitted": {"$gte": 20.0, "$lt": 50.0}}, [1, 2, 3]),
            ({"completed": {"$gt": 0}}, [0, 1, 4]),
            ({"engine_id": 0, "status": "running"}, [2]),
            ({}, [0, 1, 2, 3, 4]),
        ],
    )
    @pytest_twisted.ensureDeferred
    async def test_find_with_operators(self, db, query, expected):
        await _fill(db)
        found = await db.find_records(query)
        assert [r["taskid"] for r in found] == expected

    @pytest_twisted.ensureDeferred
    async def test_find_leaves_out_blobs_unless_asked(self, db):
        await _fill(db)
        (rec,) = await db.find_records({"taskid": 0})
        assert "result" not in rec and "payload" not in rec
        assert rec["stdout"] == "one\n"
        (rec,) = await db.find_records({"taskid": 0}, keys=["result"])
        assert rec == {"taskid": 0, "result": b"\x00r1"}

    @pytest_twisted.ensureDeferred
    async def test_find_keys_always_include_taskid(self, db):
        await _fill(db)
        found = await db.find_records({"status": "failed"}, keys=["status", "error"])
        assert found == [
            {"taskid": 1, "status": "failed", "error": {"ename": "ValueError", "evalue": "bad"}}
        ]

    @pytest_twisted.ensureDeferred
    async def test_find_with_unknown_operator_fails(self, db):
        await _fill(db)
        with pytest.raises(ValueError, match=r"\$regex"):
            await db.find_records({"status": {"$regex": "f.*"}})

    @pytest_twisted.ensureDeferred
    async def test_find_with_unknown_key_fails(self, db):
        with pytest.raises(KeyError, match="colour"):
            await db.find_records({"colour": "red"})
