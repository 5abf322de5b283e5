"""TaskController unit tests of reserved taskid blocks and batched submission
(scripted fake engines and a task.Clock, as in :mod:`tests.test_taskcontroller`),
and of the task DBs remembering reservations across a restart."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from kernel import serialized
from kernel.dependency import Dependency
from kernel.error import InvalidTaskID, TaskError
from kernel.interfaces import ITaskSubmission
from kernel.serialized import Serialized
from kernel.taskcontroller import MAX_RESERVED_TASKIDS, TaskController
from kernel.taskdb.memory import DictDB
from kernel.taskdb.sqlite import SQLiteDB
from tests.test_taskcontroller import all_calls, make, outcome


def raise_from(d):
    """Raise what the already-failed Deferred ``d`` failed with, consuming the failure."""
    failures = []
    d.addErrback(failures.append)
    assert failures, f"{d!r} has not failed"
    failures[0].raiseException()


def blob(value="v") -> Serialized:
    return serialized.serialize(value)


def reserve(tc, count):
    start, stop = tc.reserve_taskids(count).result
    return start, stop


def test_provides_the_submission_interface():
    _, tc, _, _ = make()
    assert verifyObject(ITaskSubmission, tc)


def test_blocks_are_disjoint_and_follow_every_other_taskid():
    _, tc, _, _ = make(first_taskid=7)
    single = tc.run_spec({}, blob()).result
    a = reserve(tc, 10)
    b = reserve(tc, 3)
    after = tc.run_spec({}, blob()).result
    assert single == 7
    assert a == (8, 18) and b == (18, 21)
    assert after == 21


@pytest.mark.parametrize("count", [0, -1, MAX_RESERVED_TASKIDS + 1, True, 2.0, "5"])
def test_reserve_refuses_a_bad_count(count):
    _, tc, _, _ = make()
    with pytest.raises(ValueError, match="from 1 to"):
        raise_from(tc.reserve_taskids(count))


def test_batch_runs_its_specs_in_order_under_their_taskids():
    _, tc, engines, _ = make(1)
    start, _ = reserve(tc, 5)
    assert tc.run_batch([[start + i, {}, blob(i)] for i in range(3)]).result == []
    (call,) = all_calls(engines)  # one engine, one task at a time, in order
    assert serialized.deserialize(call.payload) == 0
    call.succeed("first")
    assert outcome(tc, start).results == "first"
    statuses = tc.queue_status(verbose=True).result
    assert statuses["running"] == [start + 1] and statuses["pending"] == [start + 2]


def test_a_spec_later_in_the_batch_may_depend_on_an_earlier_one():
    _, tc, engines, _ = make(1)
    start, _ = reserve(tc, 2)
    specs = [[start, {}, blob()], [start + 1, {"after": Dependency([start]).as_dict()}, blob()]]
    assert tc.run_batch(specs).result == []
    all_calls(engines)[0].succeed()
    all_calls(engines)[0].succeed()
    assert outcome(tc, start + 1).status == "succeeded"


def test_a_rejected_spec_is_recorded_as_a_failed_task_and_the_rest_run():
    db = DictDB()
    _, tc, engines, _ = make(2, db=db)
    start, _ = reserve(tc, 4)
    specs = [
        [start, {}, blob()],
        [start + 1, {"retries": -1, "description": "bad"}, blob()],
        [start + 2, {"colour": "red"}, blob()],
        [start + 3, {}, b"not a Serialized"],
    ]
    assert tc.run_batch(specs).result == []
    assert len(all_calls(engines)) == 1
    for tid, exc, words in [
        (start + 1, ValueError, "retries must be an int >= 0"),
        (start + 2, ValueError, "unknown task flags"),
        (start + 3, TypeError, "must be a Serialized"),
    ]:
        tr = outcome(tc, tid)
        assert tr.status == "failed"
        with pytest.raises(exc, match=words):
            tr.raise_exception()
    assert db._records[start + 1]["description"] == "bad"
    assert tc.queue_status().result["failed"] == 3


def test_a_task_after_a_rejected_one_can_never_run():
    _, tc, engines, _ = make(1)
    start, _ = reserve(tc, 2)
    specs = [
        [start, {"retries": -1}, blob()],
        [start + 1, {"after": Dependency([start]).as_dict()}, blob()],
    ]
    tc.run_batch(specs)
    assert all_calls(engines) == []
    assert outcome(tc, start + 1).status == "failed"


def test_a_taskid_sent_again_is_taken_once():
    _, tc, engines, _ = make(2)
    start, _ = reserve(tc, 2)
    specs = [[start, {}, blob()], [start + 1, {}, blob()]]
    tc.run_batch(specs)
    assert tc.run_batch(specs).result == []  # while running
    assert len(all_calls(engines)) == 2
    for call in all_calls(engines):
        call.succeed()
    assert tc.run_batch(specs).result == []  # once finished
    tc.clear()
    assert tc.run_batch(specs).result == []  # even once cleared: its block remembers
    assert all_calls(engines) == []


def test_a_skipped_taskid_cannot_be_used_later():
    _, tc, engines, _ = make(2)
    start, _ = reserve(tc, 3)
    tc.run_batch([[start + 1, {}, blob()]])
    assert tc.run_batch([[start, {}, blob()]]).result == []  # behind the block's mark: ignored
    assert len(all_calls(engines)) == 1
    with pytest.raises(InvalidTaskID):
        raise_from(tc.get_task_result(start))


def test_taskids_outside_every_granted_block_are_refused():
    _, tc, engines, _ = make(1)
    start, stop = reserve(tc, 1)
    single = tc.run_spec({}, blob()).result
    refused = tc.run_batch(
        [
            [stop + 10, {}, blob()],
            [single + 100, {}, blob()],
            ["7", {}, blob()],
            [start, {}, blob()],
        ]
    ).result
    assert [tid for tid, _ in refused] == [stop + 10, single + 100, "7"]
    assert all(isinstance(e, InvalidTaskID) for _, e in refused)
    assert "submit the task again with run()" in str(refused[0][1])
    assert outcome(tc, start) is None  # the granted one was taken


def test_a_fully_used_block_is_forgotten_and_its_ids_stay_taken():
    _, tc, _, _ = make(1)
    start, stop = reserve(tc, 2)
    tc.run_batch([[start, {}, blob()], [start + 1, {}, blob()]])
    assert tc._grants == {}
    assert tc.run_batch([[start + 1, {}, blob()]]).result == []


def test_run_batch_refuses_what_is_not_a_list_of_specs():
    _, tc, _, _ = make()
    for bad in ({}, [[1, {}]], ["spec"]):
        with pytest.raises(TypeError, match="list of"):
            raise_from(tc.run_batch(bad))


def test_a_stopped_controller_grants_and_takes_nothing():
    _, tc, _, _ = make()
    start, _ = reserve(tc, 2)
    tc.stopService()
    for d in (tc.reserve_taskids(2), tc.run_batch([[start, {}, blob()]])):
        with pytest.raises(TaskError, match="stopped"):
            raise_from(d)


def test_get_task_results_in_order_and_unknown_ids_fail_before_waiting():
    _, tc, engines, _ = make(2)
    a = tc.run_spec({}, blob()).result
    b = tc.run_spec({}, blob()).result
    pending = tc.get_task_results([a, b])
    assert pending.result == [None, None]
    with pytest.raises(InvalidTaskID):
        raise_from(tc.get_task_results([a, 999], block=True))
    waiting = tc.get_task_results([b, a], block=True)
    calls = all_calls(engines)
    calls[0].succeed("A")
    assert not waiting.called
    calls[1].succeed("B")
    assert [tr.results for tr in waiting.result] == ["B", "A"]


# -- reservations survive a restart -------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_db_next_taskid_covers_reserved_ids(tmp_path, backend):
    db = SQLiteDB(str(tmp_path / "tasks.db")) if backend == "sqlite" else DictDB()
    assert db.next_taskid() == 0
    db.reserve_taskids_below(50)
    db.add_record(10, {"status": "succeeded"})
    assert db.next_taskid() == 50
    db.reserve_taskids_below(20)  # never goes back
    assert db.next_taskid() == 50
    db.add_record(60, {"status": "succeeded"})
    assert db.next_taskid() == 61


def test_sqlite_reservation_is_committed_at_once(tmp_path):
    path = str(tmp_path / "tasks.db")
    db = SQLiteDB(path)
    db.reserve_taskids_below(1000)
    # another connection (a restarted controller) sees it without a close or commit
    assert SQLiteDB(path).next_taskid() == 1000
    db.close()


def test_a_controller_restarted_on_its_sqlite_db_never_reuses_a_granted_block(tmp_path):
    path = str(tmp_path / "tasks.db")
    controller, tc, engines, clock = make(1, db=SQLiteDB(path, clock=None))
    used = tc.run_spec({}, blob()).result
    start, stop = reserve(tc, 100)
    tc.run_batch([[start, {}, blob()]])  # most of the block unused
    tc.stopService()
    tc.db.close()

    db = SQLiteDB(path)
    tc2 = TaskController(controller, clock=clock, db=db, first_taskid=db.next_taskid())
    fresh = tc2.run_spec({}, blob()).result
    block = reserve(tc2, 10)
    assert fresh >= stop and block[0] >= stop
    assert used < start
    refused = tc2.run_batch([[start + 1, {}, blob()]]).result  # a batch resent after the restart
    assert [tid for tid, _ in refused] == [start + 1]
    assert "restarted" in str(refused[0][1])
    tc2.stopService()
    db.close()
