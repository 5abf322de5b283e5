"""Unit tests of client-side batched submission: :class:`kernel.taskbatch.TaskBatcher`
(fake controller calls, a :class:`~twisted.internet.task.Clock` as reactor) and
the Foolscap client half over a fake remote reference."""

from __future__ import annotations

import threading

import pytest
from foolscap.api import DeadReferenceError
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kernel import fcutil
from kernel.error import ConnectionError, InvalidTaskID, TaskError
from kernel.interfaces import ITaskController, ITaskSubmission
from kernel.serialized import Serialized
from kernel.task import MapTask, TaskResult
from kernel.taskbatch import TaskBatcher
from kernel.taskfc import FCTaskClient


def raise_from(d):
    """Raise what the already-failed Deferred ``d`` failed with, consuming the failure."""
    failures = []
    d.addErrback(failures.append)
    assert failures, f"{d!r} has not failed"
    failures[0].raiseException()


class ThreadClock(Clock):
    """A Clock that also takes calls from other threads (run at the next advance)."""

    def __init__(self):
        super().__init__()
        self.from_threads = 0
        self.triggers: dict = {}

    def callFromThread(self, f, *args):  # noqa: N802 - the reactor's name
        self.from_threads += 1
        self.callLater(0, f, *args)

    def addSystemEventTrigger(self, phase, event, f):  # noqa: N802 - the reactor's name
        handle = object()
        self.triggers[handle] = (phase, event, f)
        return handle

    def removeSystemEventTrigger(self, handle):  # noqa: N802 - the reactor's name
        del self.triggers[handle]


class FakeController:
    """Records reserve and send calls; each answers when the test says so."""

    def __init__(self, start: int = 100):
        self.next = start
        self.reserves: list[tuple[int, defer.Deferred]] = []
        self.batches: list[tuple[list, defer.Deferred]] = []

    def reserve(self, count):
        d = defer.Deferred()
        self.reserves.append((count, d))
        return d

    def grant(self, index: int = -1) -> None:
        count, d = self.reserves[index]
        start, self.next = self.next, self.next + count
        d.callback([start, self.next])

    def send(self, specs):
        d = defer.Deferred()
        self.batches.append((list(specs), d))
        return d

    def ack_all(self, refused=()) -> None:
        for _, d in self.batches:
            if not d.called:
                d.callback(list(refused))


def spec(n: int = 10):
    return {"description": "t"}, Serialized(b"x" * n)


def make(block_size=8, batch_size=4, start=100):
    clock = ThreadClock()
    ctl = FakeController(start)
    batcher = TaskBatcher(ctl.reserve, ctl.send, reactor=clock)
    batcher.block_size = block_size
    batcher.batch_size = batch_size
    return batcher, ctl, clock


def taskids(batch):
    return [s[0] for s in batch]


def test_first_submit_reserves_a_block_then_numbers_from_it():
    batcher, ctl, clock = make()
    d = batcher.submit(*spec())
    assert not d.called and [c for c, _ in ctl.reserves] == [8]
    ctl.grant()
    assert d.result == 100
    assert batcher.try_submit(*spec()) == 101


def test_submits_waiting_for_ids_share_one_reservation_and_keep_their_order():
    batcher, ctl, clock = make()
    waiting = [batcher.submit(*spec()) for _ in range(3)]
    assert len(ctl.reserves) == 1
    ctl.grant()
    assert [d.result for d in waiting] == [100, 101, 102]


def test_specs_go_out_at_the_end_of_the_reactor_turn_in_one_batch():
    batcher, ctl, clock = make(batch_size=100)
    batcher.submit(*spec())
    ctl.grant()
    for _ in range(3):
        batcher.try_submit(*spec())
    assert ctl.batches == []  # nothing sent within the turn
    clock.advance(0)
    assert [taskids(b) for b, _ in ctl.batches] == [[100, 101, 102, 103]]


def test_a_full_batch_is_closed_at_the_size_cap():
    batcher, ctl, clock = make(block_size=20, batch_size=4)
    batcher.submit(*spec())
    ctl.grant()
    for _ in range(9):
        batcher.try_submit(*spec())
    clock.advance(0)
    assert [taskids(b) for b, _ in ctl.batches] == [
        [100, 101, 102, 103],
        [104, 105, 106, 107],
        [108, 109],
    ]


def test_a_batch_is_closed_at_the_payload_byte_cap():
    batcher, ctl, clock = make(batch_size=100)
    batcher.batch_bytes = 25
    batcher.submit(*spec(10))
    ctl.grant()
    batcher.try_submit(*spec(10))
    batcher.try_submit(*spec(10))
    clock.advance(0)
    assert [taskids(b) for b, _ in ctl.batches] == [[100, 101, 102]]
    batcher.try_submit(*spec(30))
    batcher.try_submit(*spec(1))
    clock.advance(0)
    assert [taskids(b) for b, _ in ctl.batches[1:]] == [[103], [104]]


def test_next_block_is_reserved_before_the_current_one_runs_out():
    batcher, ctl, clock = make(block_size=8, batch_size=100)
    batcher.submit(*spec())
    ctl.grant()
    got = [batcher.try_submit(*spec()) for _ in range(4)]  # 5 of 8 used
    clock.advance(0)
    assert len(ctl.reserves) == 2  # asked ahead, once
    ctl.grant()
    got += [batcher.try_submit(*spec()) for _ in range(8)]
    assert None not in got
    assert got == list(range(101, 105)) + [105, 106, 107] + list(range(108, 113))
    clock.advance(0)
    assert len(ctl.reserves) == 3


def test_try_submit_without_ids_returns_none():
    batcher, ctl, clock = make()
    assert batcher.try_submit(*spec()) is None
    assert ctl.batches == [] and ctl.reserves == []


def test_try_submit_from_another_thread_hands_the_flush_to_the_reactor():
    batcher, ctl, clock = make(block_size=64, batch_size=100)
    batcher.submit(*spec())
    ctl.grant()
    clock.advance(0)  # taskid 100 sent
    got = []
    thread = threading.Thread(
        target=lambda: got.extend(batcher.try_submit(*spec()) for _ in range(5))
    )
    thread.start()
    thread.join(10)
    assert got == [101, 102, 103, 104, 105]
    assert clock.from_threads >= 1
    clock.advance(0)
    assert [taskids(b) for b, _ in ctl.batches] == [[100], [101, 102, 103, 104, 105]]


def test_settle_acknowledged_waits_for_every_batch_sent_before_it():
    batcher, ctl, clock = make(batch_size=2)
    batcher.submit(*spec())
    ctl.grant()
    batcher.try_submit(*spec())
    batcher.try_submit(*spec())
    settled = batcher.settle(acknowledged=True)  # flushes now, without waiting for the turn
    assert len(ctl.batches) == 2 and not settled.called
    ctl.batches[0][1].callback([])
    assert not settled.called
    ctl.batches[1][1].callback([])
    assert settled.called


def test_shutdown_waits_for_unacknowledged_batches_only_while_there_are_some():
    batcher, ctl, clock = make()
    batcher.submit(*spec())
    ctl.grant()
    assert clock.triggers == {}
    clock.advance(0)  # sent, not yet acknowledged
    ((phase, event, at_shutdown),) = clock.triggers.values()
    assert (phase, event) == ("before", "shutdown")
    clock.triggers.clear()  # the reactor runs (and drops) it
    waiting = at_shutdown()
    assert not waiting.called
    ctl.ack_all()
    assert waiting.called
    batcher.try_submit(*spec())
    clock.advance(0)
    assert len(clock.triggers) == 1
    ctl.ack_all()
    assert clock.triggers == {}


def test_shutdown_wait_for_a_batch_is_bounded():
    batcher, ctl, clock = make()
    batcher.submit(*spec())
    ctl.grant()
    clock.advance(0)
    ((_, _, at_shutdown),) = clock.triggers.values()
    clock.triggers.clear()
    waiting = at_shutdown()
    clock.advance(batcher.shutdown_timeout)
    assert waiting.called and waiting.result is None


def test_settle_waits_only_for_batches_too_large_to_be_sure_of_their_order():
    batcher, ctl, clock = make(batch_size=1)
    batcher.ordered_bytes = 100
    batcher.submit(*spec(10))
    ctl.grant()
    small = batcher.settle()
    assert len(ctl.batches) == 1 and small.called  # flushed; in order with what follows
    batcher.try_submit(*spec(200))
    batcher.try_submit(*spec(10))
    large = batcher.settle()
    assert len(ctl.batches) == 3 and not large.called
    ctl.batches[2][1].callback([])
    ctl.batches[0][1].callback([])
    assert not large.called
    ctl.batches[1][1].callback([])
    assert large.called


def test_settle_with_nothing_sent_fires_at_once():
    batcher, _, _ = make()
    assert batcher.settle().called


def test_refused_specs_are_remembered_as_their_tasks_errors():
    batcher, ctl, clock = make()
    batcher.submit(*spec())
    ctl.grant()
    batcher.try_submit(*spec())
    clock.advance(0)
    error = InvalidTaskID("task id 101 was not reserved")
    ctl.batches[0][1].callback([[101, error]])
    assert batcher.failure(100) is None
    assert batcher.failure(101) is error
    batcher.forget([101])
    assert batcher.failure(101) is None


def test_a_lost_batch_fails_each_of_its_tasks_with_a_connection_error():
    batcher, ctl, clock = make()
    batcher.submit(*spec())
    ctl.grant()
    batcher.try_submit(*spec())
    clock.advance(0)
    ctl.batches[0][1].errback(ConnectionError("lost the connection to the controller"))
    for tid in (100, 101):
        error = batcher.failure(tid)
        assert isinstance(error, ConnectionError)
        assert f"task {tid} never reached the controller" in str(error)
        assert "Submit it again" in str(error)


def test_a_failed_reservation_fails_the_waiting_submits():
    batcher, ctl, clock = make()
    waiting = [batcher.submit(*spec()) for _ in range(2)]
    ctl.reserves[0][1].errback(ConnectionError("gone"))
    for d in waiting:
        with pytest.raises(ConnectionError):
            raise_from(d)
        d.addErrback(lambda _: None)


def test_a_malformed_block_is_an_error():
    batcher, ctl, clock = make()
    d = batcher.submit(*spec())
    ctl.reserves[0][1].callback([5, 5])
    with pytest.raises(TaskError, match="malformed block"):
        raise_from(d)
    d.addErrback(lambda _: None)


# -- the Foolscap client half over a fake remote reference ----------------------


class FakeReference:
    """Answers the task server half's calls like the controller would, in
    envelopes; ``lose`` makes every later call fail like a dead connection."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.known: set[int] = set()
        self.next = 0
        self.lost = False
        self.refuse: set[int] = set()

    def callRemote(self, method, *args):  # noqa: N802 - Foolscap's name
        self.calls.append((method, args))
        if self.lost:
            return defer.fail(DeadReferenceError("Connection was lost"))
        if method == "reserve_taskids":
            start, self.next = self.next, self.next + args[0]
            return defer.succeed(fcutil.package_success([start, self.next]))
        if method == "run_batch":
            refused = []
            for tid, _, _ in args[0]:
                if tid in self.refuse:
                    refused.append([tid, fcutil.package_failure(InvalidTaskID(f"no {tid}"))[1]])
                else:
                    self.known.add(tid)
            return defer.succeed(fcutil.package_success(refused))
        if method == "get_task_result":
            if args[0] not in self.known:
                return defer.succeed(fcutil.package_failure(InvalidTaskID(f"no {args[0]}")))
            return defer.succeed(fcutil.package_success(TaskResult(args[0], "succeeded")))
        if method == "get_task_results":
            return defer.succeed(
                fcutil.package_success([TaskResult(t, "succeeded") for t in args[0]])
            )
        return defer.succeed(fcutil.package_success(None))


def client():
    ref = FakeReference()
    tc = FCTaskClient(ref)
    tc.batcher = TaskBatcher(tc.reserve_taskids, tc.run_batch, reactor=ThreadClock())
    return tc, ref


def methods(ref):
    return [m for m, _ in ref.calls]


def test_client_half_provides_the_submission_interface():
    tc, _ = client()
    assert verifyObject(ITaskController, tc)
    assert verifyObject(ITaskSubmission, tc)


def test_run_fires_the_taskid_before_the_spec_is_sent():
    tc, ref = client()
    first = tc.run(MapTask(abs, (-1,)))
    second = tc.run(MapTask(abs, (-2,)))
    assert (first.result, second.result) == (0, 1)
    assert methods(ref) == ["reserve_taskids"]


def test_every_other_call_goes_after_the_pending_batch():
    tc, ref = client()
    for name, call in [
        ("get_task_result", lambda t: tc.get_task_result(t)),
        ("abort", lambda t: tc.abort(t)),
        ("barrier", lambda t: tc.barrier([t])),
        ("queue_status", lambda t: tc.queue_status()),
        ("clear", lambda t: tc.clear([t])),
        ("spin", lambda t: tc.spin()),
        ("get_task_results", lambda t: tc.get_task_results([t])),
        ("db_query", lambda t: tc.db_query({"taskid": t})),
        ("resubmit", lambda t: tc.resubmit([t])),
    ]:
        ref.calls.clear()
        taskid = tc.run(MapTask(abs, (-1,))).result
        d = call(taskid)
        assert methods(ref)[-2:] == ["run_batch", name], name
        assert ref.calls[-2][1][0][0][0] == taskid
        d.addErrback(lambda _: None)


def test_get_task_result_after_run_finds_the_task():
    tc, ref = client()
    taskid = tc.run(MapTask(abs, (-1,))).result
    assert tc.get_task_result(taskid).result.taskid == taskid


def test_get_task_result_of_a_refused_spec_raises_its_error():
    tc, ref = client()
    ref.refuse.add(1)
    tc.run(MapTask(abs, (-1,)))
    refused = tc.run(MapTask(abs, (-2,))).result
    assert refused == 1
    d = tc.get_task_result(refused)
    with pytest.raises(InvalidTaskID, match="no 1"):
        raise_from(d)
    d.addErrback(lambda _: None)
    assert tc.get_task_result(0).result.status == "succeeded"


def test_tasks_of_a_batch_lost_with_the_connection_raise_connection_error():
    tc, ref = client()
    tc.run(MapTask(abs, (-1,)))  # reserves while connected
    ref.lost = True
    taskid = tc.run(MapTask(abs, (-2,))).result
    for d in (tc.get_task_result(taskid), tc.get_task_results([taskid])):
        with pytest.raises(ConnectionError, match=f"task {taskid} never reached the controller"):
            raise_from(d)
        d.addErrback(lambda _: None)


def test_an_unserializable_task_fails_run_itself_and_takes_no_taskid():
    tc, ref = client()
    lock = threading.Lock()
    d = tc.run(MapTask(lambda: lock))
    with pytest.raises(Exception, match="lock"):
        raise_from(d)
    d.addErrback(lambda _: None)
    assert ref.calls == []
    assert tc.run(MapTask(abs, (-1,))).result == 0
