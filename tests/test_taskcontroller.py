"""TaskController unit tests: scripted fake engines and a task.Clock.

Each fake engine records the ``run_task`` calls it gets and lets the test
decide when and how each finishes, so scheduling decisions, timeouts and
failure handling are checked deterministically without threads or real time.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python import log
from zope.interface.verify import verifyObject

from kernel import serialized
from kernel.controllerservice import ControllerService
from kernel.dependency import Dependency
from kernel.error import (
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidTaskID,
    TaskAborted,
    TaskWithdrawn,
    UnmetDependency,
)
from kernel.interfaces import IMapper, ITaskController
from kernel.serialized import Serialized
from kernel.taskcontroller import (
    DEFAULT_PIPELINE,
    DEFAULT_SHORT_PIPELINE,
    SHORT_TASK,
    TaskController,
    normalize_flags,
)
from kernel.taskdb.memory import DictDB


class Call:
    def __init__(self, engine, payload, clear_before, clear_after, key=None):
        self.engine = engine
        self.payload = payload
        self.clear_before = clear_before
        self.clear_after = clear_after
        self.key = key
        self.deferred = Deferred()

    def succeed(self, value="ok", started=100.0, completed=101.0):
        self.engine.calls.remove(self)
        self.deferred.callback(
            {
                "result": serialized.serialize(value),
                "stdout": "out",
                "stderr": "",
                "started": started,
                "completed": completed,
            }
        )

    def fail(self, exc):
        self.engine.calls.remove(self)
        self.deferred.errback(exc)


class FakeEngine:
    """An engine whose ``run_task`` calls wait for the test to finish them."""

    def __init__(self, queued=()):
        self.id = None
        self.properties = {}
        self.calls: list[Call] = []
        self.interrupts = 0
        self.queued = list(queued)  # descriptions queue_status reports as waiting

    def run_task(self, payload, clear_before=False, clear_after=False):
        call = Call(self, payload, clear_before, clear_after)
        self.calls.append(call)
        return call.deferred

    def interrupt(self):
        self.interrupts += 1
        return succeed(True)

    def queue_status(self):
        pending = "run_task(...)" if self.calls else None
        return succeed({"queue": list(self.queued), "pending": pending})


class QueueingFakeEngine(FakeEngine):
    """A fake engine with a task queue (``IEngineTaskQueue``): ``run_task``
    takes a key; the oldest unfinished call is the running one, and
    ``abort_task`` withdraws any other (as an engine's task queue does)."""

    def __init__(self):
        super().__init__()
        self.aborts: list[str] = []
        self.withdrawals: list[str] = []  # abort_task(key, interrupt=False)

    def run_task(self, payload, clear_before=False, clear_after=False, key=None):
        call = Call(self, payload, clear_before, clear_after, key)
        self.calls.append(call)
        return call.deferred

    def abort_task(self, key, interrupt=True):
        (self.aborts if interrupt else self.withdrawals).append(key)
        found = [c for c in self.calls if c.key == key]
        if not found:
            return succeed("finished")
        if found[0] is self.calls[0]:
            return succeed("interrupted" if interrupt else "running")
        found[0].fail(TaskWithdrawn(f"task {key} withdrawn"))
        return succeed("withdrawn")


def spec(value="v", **flags):
    """A (flags, payload) pair; the payload is opaque to the controller."""
    return normalize_flags(flags), serialized.serialize(value)


def make(n_engines=2, **kwargs):
    controller = ControllerService()
    clock = Clock()
    tc = TaskController(controller, clock=clock, **kwargs)
    engines = [FakeEngine() for _ in range(n_engines)]
    for e in engines:
        controller.register_engine(e)
    return controller, tc, engines, clock


def submit(tc, value="v", **flags):
    d = tc.run_spec(*spec(value, **flags))
    return d.result


def outcome(tc, taskid):
    d = tc.get_task_result(taskid)
    assert d.called
    return d.result


def all_calls(engines):
    return [c for e in engines for c in e.calls]


# -- interfaces and opacity ---------------------------------------------------


def test_provides_interfaces():
    _, tc, _, _ = make()
    assert verifyObject(ITaskController, tc)
    assert verifyObject(IMapper, tc)


def test_payload_and_result_blobs_pass_through_unopened():
    _, tc, engines, _ = make(1)
    payload = Serialized(b"not a pickle at all")
    taskid = tc.run_spec({}, payload).result
    (call,) = engines[0].calls
    assert call.payload is payload
    blob = Serialized(b"not a pickle either")
    engines[0].calls.remove(call)
    call.deferred.callback(
        {"result": blob, "stdout": "", "stderr": "", "started": 1, "completed": 2}
    )
    tr = outcome(tc, taskid)
    assert tr.status == "succeeded" and tr.serialized_result == blob


def test_result_is_read_back_from_the_task_db():
    db = DictDB()
    _, tc, engines, _ = make(1, db=db)
    taskid = submit(tc)
    engines[0].calls[0].succeed("original")
    db._records[taskid]["stdout"] = "from the db"
    assert outcome(tc, taskid).stdout == "from the db"


class SlowDB(DictDB):
    """A DictDB whose writes finish only when the test says so."""

    def __init__(self):
        super().__init__()
        self.held: list[tuple[Deferred, str, tuple]] = []

    def add_record(self, *args):
        return self._hold("add_record", args)

    def update_record(self, *args):
        return self._hold("update_record", args)

    def _hold(self, method, args):
        d = Deferred()
        self.held.append((d, method, args))
        return d

    def release(self):
        while self.held:
            d, method, args = self.held.pop(0)
            getattr(DictDB, method)(self, *args)
            d.callback(None)


def test_reads_wait_for_earlier_writes_of_an_asynchronous_db():
    db = SlowDB()
    _, tc, engines, _ = make(1, db=db)
    taskid = submit(tc)
    engines[0].calls[0].succeed("done")
    read = tc.get_task_result(taskid)
    assert not read.called  # its record is still being written
    db.release()
    assert read.result.status == "succeeded" and read.result.results == "done"
    again = tc.get_task_result(taskid)  # nothing outstanding: read at once
    assert again.called and again.result.results == "done"


class FailingWritesDB(DictDB):
    """A DictDB whose ``update_record`` fails in the way the test chooses:
    raising, a failed Deferred, or a Deferred failed later."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.later: list[Deferred] = []

    def update_record(self, *args):
        if self.how == "raise":
            raise OSError("disk gone")
        if self.how == "failed":
            return fail(OSError("disk gone"))
        d = Deferred()
        self.later.append(d)
        return d


@pytest.mark.parametrize("how", ["raise", "failed", "later"])
def test_failed_db_writes_are_logged_and_tasks_go_on(how):
    logged = []
    observer = logged.append
    log.addObserver(observer)
    try:
        db = FailingWritesDB(how)
        _, tc, engines, _ = make(1, db=db)
        first = submit(tc)
        engines[0].calls[0].succeed("one")
        for d in db.later:
            d.errback(OSError("disk gone"))
        second = submit(tc)  # the controller still takes and sends tasks
        assert len(engines[0].calls) == 1
        engines[0].calls[0].succeed("two")
        for d in db.later:
            if not d.called:
                d.errback(OSError("disk gone"))
    finally:
        log.removeObserver(observer)
    errors = [e for e in logged if e.get("isError")]
    # two updates per task (running, then finished), each failing
    assert len(errors) == 4
    assert all("task DB update_record failed" in e["why"] for e in errors)
    assert all(e["failure"].check(OSError) for e in errors)
    assert first != second
    assert db._records[first]["status"] == "pending"  # the updates never landed


def test_engine_run_task_raising_fails_the_attempt_and_is_retried():
    class RaisingEngine(FakeEngine):
        def run_task(self, payload, clear_before=False, clear_after=False):
            self.raised = getattr(self, "raised", 0) + 1
            raise RuntimeError("cannot take it")

    controller = ControllerService()
    tc = TaskController(controller, clock=Clock())
    bad = RaisingEngine()
    controller.register_engine(bad)
    taskid = submit(tc, retries=1)
    result = outcome(tc, taskid)
    assert bad.raised == 2  # the first attempt and its retry
    assert result.status == "failed"
    assert "cannot take it" in str(result.failure.value)


def test_run_spec_refuses_bad_flags_and_payloads():
    _, tc, _, _ = make()
    failures = []
    tc.run_spec({"retries": -1}, serialized.serialize(1)).addErrback(failures.append)
    tc.run_spec({}, b"raw bytes").addErrback(failures.append)
    assert [f.type for f in failures] == [ValueError, TypeError]


def test_run_spec_unknown_flag_fails_the_deferred():
    _, tc, _, _ = make()
    failures = []
    tc.run_spec({"colour": "red"}, serialized.serialize(1)).addErrback(failures.append)
    assert failures[0].check(ValueError)


def test_clear_flags_reach_the_engine():
    _, tc, engines, _ = make(1)
    submit(tc, clear_before=True, clear_after=True)
    call = engines[0].calls[0]
    assert (call.clear_before, call.clear_after) == (True, True)


# -- scheduling ---------------------------------------------------------------


def test_leastload_sends_to_the_least_loaded_engine():
    _, tc, engines, _ = make(3, hwm=0)
    for _ in range(3):
        submit(tc)
    assert [len(e.calls) for e in engines] == [1, 1, 1]
    engines[1].calls[0].succeed()
    submit(tc)
    assert [len(e.calls) for e in engines] == [1, 1, 1]  # went to engine 1, now idle


def test_lru_rotates_whatever_the_loads():
    _, tc, engines, _ = make(3, scheme="lru", hwm=0)
    engines_used = []
    for _ in range(4):
        taskid = submit(tc)
        engines_used.append(next(e for e in engines if tc._tasks[taskid].worker.engine is e))
    assert engines_used == [engines[0], engines[1], engines[2], engines[0]]


def test_custom_scheme_callable_is_used():
    seen = []

    def last(loads):
        seen.append(list(loads))
        return len(loads) - 1

    _, tc, engines, _ = make(3, scheme=last, hwm=0)
    submit(tc)
    assert len(engines[2].calls) == 1
    assert seen == [[0, 0, 0]]


@pytest.mark.parametrize("scheme", ["plainrandom", "twobin", "weighted", "leastload", "lru"])
def test_every_named_scheme_places_tasks(scheme):
    _, tc, engines, _ = make(3, scheme=scheme)
    for _ in range(3):
        submit(tc)
    assert sorted(len(e.calls) for e in engines) == [1, 1, 1]  # hwm=1: one per engine


def test_unknown_scheme_name_is_refused():
    with pytest.raises(ValueError, match="leastload"):
        TaskController(ControllerService(), scheme="fastest", clock=Clock())


def test_hwm_limits_outstanding_tasks_per_engine():
    _, tc, engines, _ = make(1, hwm=2)
    ids = [submit(tc) for _ in range(5)]
    status = tc.queue_status(verbose=True).result
    # two are outstanding on the engine, only one at a time in its queue
    assert len(engines[0].calls) == 1
    assert status["running"] == ids[:1] and status["pending"] == ids[1:]
    assert tc._table.load(tc._by_id[0].serial) == 2
    engines[0].calls[0].succeed()
    assert len(engines[0].calls) == 1
    assert tc._table.load(tc._by_id[0].serial) == 2


def test_hwm_one_keeps_tasks_in_the_controller_until_an_engine_is_free():
    _, tc, engines, _ = make(2)
    submit(tc), submit(tc)
    c = submit(tc)
    assert len(all_calls(engines)) == 2
    assert tc.queue_status(verbose=True).result["pending"] == [c]
    engines[0].calls[0].succeed()
    assert len(engines[0].calls) == 1


def test_tasks_wait_for_the_first_engine():
    controller, tc, _, _ = make(0)
    taskid = submit(tc)
    assert tc.queue_status(verbose=True).result["pending"] == [taskid]
    engine = FakeEngine()
    controller.register_engine(engine)
    assert len(engine.calls) == 1


# -- retries, recovery, failures ----------------------------------------------


def test_retry_prefers_an_engine_the_task_has_not_failed_on():
    def most_recent(loads):
        return len(loads) - 1

    _, tc, engines, _ = make(2, scheme=most_recent, hwm=0)
    taskid = submit(tc, retries=1)
    first = all_calls(engines)[0]
    first.fail(ValueError("flaky"))
    (second,) = all_calls(engines)
    assert second.engine is not first.engine
    second.succeed("fine")
    assert outcome(tc, taskid).results == "fine"


def test_retries_exhausted_fail_with_the_last_error_and_engine():
    _, tc, engines, _ = make(1)
    taskid = submit(tc, retries=1)
    engines[0].calls[0].fail(ValueError("first"))
    engines[0].calls[0].fail(KeyError("second"))
    tr = outcome(tc, taskid)
    assert tr.status == "failed" and tr.engine_id == 0
    with pytest.raises(KeyError):
        tr.raise_exception()


def test_recovery_task_payload_runs_under_the_same_taskid():
    _, tc, engines, _ = make(1)
    rflags, rpayload = spec("recovery body", retries=0)
    taskid = submit(tc, recovery_task={"flags": rflags, "payload": rpayload.to_bytes()})
    engines[0].calls[0].fail(ValueError("x"))
    (call,) = engines[0].calls
    assert serialized.deserialize(call.payload) == "recovery body"
    call.succeed("recovered")
    tr = outcome(tc, taskid)
    assert tr.taskid == taskid and tr.results == "recovered"


def test_attempts_and_resubmission_are_recorded():
    db = DictDB()
    _, tc, engines, clock = make(1, db=db)
    clock.advance(10)
    taskid = submit(tc, retries=1)
    clock.advance(5)
    engines[0].calls[0].fail(ValueError("x"))
    engines[0].calls[0].succeed("ok", started=20.0, completed=21.0)
    rec = db.get_record(taskid).result
    assert rec["status"] == "succeeded"
    assert rec["attempts"] == 2
    assert rec["submitted"] == 10 and rec["resubmitted"] == 15
    assert (rec["started"], rec["completed"], rec["engine_id"]) == (20.0, 21.0, 0)
    assert serialized.deserialize(Serialized.from_bytes(rec["result"])) == "ok"
    assert rec["stdout"] == "out"
    found = db.find_records({"status": "succeeded"}, keys=["engine_id"]).result
    assert found == [{"taskid": taskid, "engine_id": 0}]


# -- functional dependencies ----------------------------------------------------


def test_unmet_dependency_moves_the_task_and_never_repeats_an_engine():
    _, tc, engines, _ = make(3, hwm=0)
    taskid = submit(tc)
    tried = []
    for _ in range(2):
        (call,) = all_calls(engines)
        tried.append(call.engine)
        call.fail(UnmetDependency("not here"))
    (call,) = all_calls(engines)
    assert call.engine not in tried
    call.fail(UnmetDependency("not here either"))
    tr = outcome(tc, taskid)
    with pytest.raises(ImpossibleDependency, match="functional dependency"):
        tr.raise_exception()


def test_unmet_dependency_does_not_use_up_retries():
    _, tc, engines, _ = make(2)
    taskid = submit(tc, retries=0)
    all_calls(engines)[0].fail(UnmetDependency("no"))
    all_calls(engines)[0].succeed("yes")
    assert outcome(tc, taskid).results == "yes"


def test_with_a_timeout_a_rejected_task_waits_for_a_new_engine():
    controller, tc, engines, clock = make(1)
    taskid = submit(tc, timeout=30)
    engines[0].calls[0].fail(UnmetDependency("no"))
    assert tc.get_task_result(taskid).result is None
    newcomer = FakeEngine()
    controller.register_engine(newcomer)
    newcomer.calls[0].succeed("on the newcomer")
    assert outcome(tc, taskid).results == "on the newcomer"


def test_with_a_timeout_a_rejected_task_fails_when_it_expires():
    _, tc, engines, clock = make(1)
    taskid = submit(tc, timeout=30)
    engines[0].calls[0].fail(UnmetDependency("no"))
    clock.advance(31)
    with pytest.raises(DependencyTimeout):
        outcome(tc, taskid).raise_exception()


def test_a_reused_engine_id_is_a_new_engine_for_dependencies():
    controller, tc, engines, clock = make(1)
    taskid = submit(tc, timeout=30)
    engines[0].calls[0].fail(UnmetDependency("no"))
    controller.unregister_engine(0)
    fresh = FakeEngine()
    assert controller.register_engine(fresh)["id"] == 0
    fresh.calls[0].succeed("ran")
    assert outcome(tc, taskid).results == "ran"


# -- graph dependencies ---------------------------------------------------------


def test_dependency_timeout_on_the_injected_clock():
    _, tc, engines, clock = make(1)
    blocker = submit(tc)
    waiting = submit(tc, after=Dependency([blocker]).as_dict(), timeout=5)
    clock.advance(4.9)
    assert tc.get_task_result(waiting).result is None
    clock.advance(0.2)
    with pytest.raises(DependencyTimeout, match="timeout of 5"):
        outcome(tc, waiting).raise_exception()
    engines[0].calls[0].succeed()
    assert outcome(tc, blocker).status == "succeeded"


def test_timeout_does_not_touch_a_task_that_started():
    _, tc, engines, clock = make(1)
    taskid = submit(tc, timeout=1)
    clock.advance(10)
    engines[0].calls[0].succeed("late but fine")
    assert outcome(tc, taskid).results == "late but fine"


def test_finishing_a_task_rejudges_only_its_own_dependents():
    _, tc, engines, _ = make(1, hwm=0)
    deps = [submit(tc) for _ in range(50)]
    for d in deps:
        submit(tc, after=Dependency([d]).as_dict())
    judged = []
    real = tc._judge
    tc._judge = lambda state: judged.append(state.taskid) or real(state)
    engines[0].calls[0].succeed()
    assert len(judged) == 1


def test_follow_waits_and_goes_where_its_dependency_ran():
    _, tc, engines, _ = make(3, hwm=0)
    a = submit(tc)
    ran_on = all_calls(engines)[0].engine
    b = submit(tc, follow=Dependency([a]).as_dict())
    assert len(all_calls(engines)) == 1  # b waits for a
    ran_on.calls[0].succeed()
    (call,) = all_calls(engines)
    assert call.engine is ran_on
    call.succeed()
    assert outcome(tc, b).status == "succeeded"


def test_follow_of_a_lost_engine_is_impossible():
    controller, tc, engines, _ = make(2)
    a = submit(tc)
    call = all_calls(engines)[0]
    lost_id = engines.index(call.engine)
    call.succeed()
    controller.unregister_engine(lost_id)
    b = submit(tc, follow=Dependency([a]).as_dict())
    with pytest.raises(ImpossibleDependency, match="gone"):
        outcome(tc, b).raise_exception()


def test_dependency_on_a_cleared_task_is_unknown():
    _, tc, engines, _ = make(1)
    a = submit(tc)
    engines[0].calls[0].succeed()
    tc.clear([a])
    b = submit(tc, after=Dependency([a]).as_dict())
    with pytest.raises(ImpossibleDependency, match="unknown"):
        outcome(tc, b).raise_exception()


def test_clearing_a_finished_dependency_does_not_strand_its_dependents():
    _, tc, engines, _ = make(1, hwm=0)
    a, b = submit(tc), submit(tc)
    c = submit(tc, after=Dependency([a, b]).as_dict())
    engines[0].calls[0].succeed()
    tc.clear([a])
    engines[0].calls[0].succeed()
    engines[0].calls[0].succeed("c ran")
    assert outcome(tc, c).results == "c ran"


def test_long_failure_cascade_does_not_recurse():
    _, tc, engines, _ = make(1)
    head = submit(tc)
    prev = head
    for _ in range(1500):  # deeper than the recursion limit
        prev = submit(tc, after=Dependency([prev]).as_dict())
    engines[0].calls[0].fail(ValueError("head failed"))
    assert tc.queue_status().result["failed"] == 1501


# -- abort ------------------------------------------------------------------------


def test_abort_of_an_assigned_task_never_sends_it():
    _, tc, engines, _ = make(1, hwm=0)
    submit(tc)
    second = submit(tc)
    tc.abort(second)
    engines[0].calls[0].succeed()
    assert engines[0].calls == []
    assert outcome(tc, second).status == "aborted"


def test_abort_of_a_running_task_interrupts_and_frees_the_engine_later():
    _, tc, engines, _ = make(1)
    running = submit(tc)
    queued = submit(tc)
    tc.abort(running)
    assert engines[0].interrupts == 1
    tr = outcome(tc, running)
    with pytest.raises(TaskAborted):
        tr.raise_exception()
    assert len(engines[0].calls) == 1  # the engine is busy until the interrupt lands
    engines[0].calls[0].fail(KeyboardInterrupt())
    assert outcome(tc, running).status == "aborted"
    engines[0].calls[0].succeed("next")
    assert outcome(tc, queued).results == "next"


def test_abort_of_a_task_still_queued_on_the_engine_interrupts_it_once_it_starts():
    _, tc, engines, clock = make(1)
    engines[0].queued = ["run_task(<Serialized 10 bytes>)"]
    taskid = submit(tc)
    tc.abort(taskid)
    assert outcome(tc, taskid).status == "aborted"
    assert engines[0].interrupts == 0  # not running yet: interrupting would hit another command
    clock.advance(tc.abort_poll_interval)
    assert engines[0].interrupts == 0
    engines[0].queued = []  # now it is the one running
    clock.advance(tc.abort_poll_interval)
    assert engines[0].interrupts == 1
    engines[0].calls[0].fail(KeyboardInterrupt())
    clock.advance(10 * tc.abort_poll_interval)
    assert engines[0].interrupts == 1
    assert outcome(tc, taskid).status == "aborted"


def make_pipelined(pipeline=4, n_engines=1, **kwargs):
    """A task controller and engines with a task queue."""
    controller = ControllerService()
    clock = Clock()
    tc = TaskController(controller, clock=clock, pipeline=pipeline, **kwargs)
    engines = [QueueingFakeEngine() for _ in range(n_engines)]
    for e in engines:
        controller.register_engine(e)
    return tc, engines, clock


def test_an_engine_with_a_task_queue_is_sent_several_tasks_at_once():
    tc, (engine,), _ = make_pipelined(pipeline=4)
    assert tc.hwm is None and tc.pipeline == 4
    ids = [submit(tc) for _ in range(6)]
    assert len(engine.calls) == 4  # the pipeline depth
    assert len({c.key for c in engine.calls}) == 4  # each named for abort_task
    status = tc.queue_status(verbose=True).result
    # the engine runs the oldest; the rest wait in its task queue or here
    assert status["running"] == ids[:1] and status["pending"] == ids[1:]
    engine.calls[0].succeed()
    assert len(engine.calls) == 4  # the next one went out at once
    assert tc.queue_status().result["succeeded"] == 1


def test_pipeline_depth_is_capped_by_hwm():
    tc, (engine,), _ = make_pipelined(pipeline=4, hwm=1)
    [submit(tc) for _ in range(5)]
    assert len(engine.calls) == 1


def test_an_engine_without_a_task_queue_is_sent_one_task_at_a_time():
    controller, tc, engines, _ = make(0, pipeline=4)
    engine = FakeEngine()
    controller.register_engine(engine)
    [submit(tc) for _ in range(3)]
    assert len(engine.calls) == 1


def test_by_default_an_engine_with_a_task_queue_is_sent_several_tasks():
    controller, tc, _, _ = make(0)
    engine = QueueingFakeEngine()
    controller.register_engine(engine)
    [submit(tc) for _ in range(5)]
    assert (tc.pipeline, tc.hwm) == (DEFAULT_PIPELINE, None)
    assert DEFAULT_PIPELINE > 1
    assert len(engine.calls) == DEFAULT_PIPELINE


def test_pipeline_one_sends_one_task_at_a_time():
    tc, (engine,), _ = make_pipelined(pipeline=1)
    [submit(tc) for _ in range(3)]
    assert len(engine.calls) == 1


def test_bad_pipeline_is_refused():
    with pytest.raises(ValueError, match="pipeline"):
        make(1, pipeline=0)


def short(call):
    """Finish ``call`` as a task that ran for less than SHORT_TASK."""
    call.succeed(started=100.0, completed=100.0 + SHORT_TASK / 2)


def test_an_engine_running_short_tasks_is_sent_up_to_short_pipeline():
    tc, (engine,), _ = make_pipelined(pipeline=2, short_pipeline=5)
    ids = [submit(tc) for _ in range(10)]
    assert len(engine.calls) == 2  # length unknown yet: the pipeline depth
    short(engine.calls[0])
    assert len(engine.calls) == 5  # short tasks: deeper
    assert len({c.key for c in engine.calls}) == 5
    status = tc.queue_status(verbose=True).result
    assert status["running"] == ids[1:2] and status["pending"] == ids[2:]


def test_a_long_task_brings_the_depth_back_to_pipeline():
    tc, (engine,), _ = make_pipelined(pipeline=2, short_pipeline=5)
    [submit(tc) for _ in range(10)]
    short(engine.calls[0])
    assert len(engine.calls) == 5
    engine.calls[0].succeed(started=100.0, completed=100.0 + 2 * SHORT_TASK)
    # four still out, above the depth of 2: nothing more is sent ...
    assert len(engine.calls) == 4
    engine.calls[0].succeed(started=100.0, completed=101.0)
    engine.calls[0].succeed(started=100.0, completed=101.0)
    assert len(engine.calls) == 2
    engine.calls[0].succeed(started=100.0, completed=101.0)
    assert len(engine.calls) == 2  # ... until it is below: then one for one


def test_a_result_without_times_counts_as_long():
    tc, (engine,), _ = make_pipelined(pipeline=2, short_pipeline=5)
    [submit(tc) for _ in range(10)]
    engine.calls[0].succeed(started=None, completed=None)
    assert len(engine.calls) == 2


def test_short_pipeline_is_capped_by_hwm_and_unused_with_pipeline_one():
    tc, (engine,), _ = make_pipelined(pipeline=2, short_pipeline=5, hwm=3)
    [submit(tc) for _ in range(10)]
    short(engine.calls[0])
    assert len(engine.calls) == 3
    tc, (engine,), _ = make_pipelined(pipeline=1, short_pipeline=5)
    [submit(tc) for _ in range(10)]
    short(engine.calls[0])
    assert len(engine.calls) == 1


def test_an_engine_without_a_task_queue_gets_one_short_task_at_a_time():
    controller, tc, engines, _ = make(0)
    engine = FakeEngine()
    controller.register_engine(engine)
    [submit(tc) for _ in range(5)]
    short(engine.calls[0])
    assert len(engine.calls) == 1


def test_short_pipeline_defaults_deeper_than_pipeline_and_bad_values_are_refused():
    assert DEFAULT_SHORT_PIPELINE > DEFAULT_PIPELINE
    with pytest.raises(ValueError, match="short_pipeline"):
        make(1, short_pipeline=0)


def test_abort_of_a_task_sent_ahead_withdraws_it_and_frees_its_slot():
    tc, (engine,), clock = make_pipelined(pipeline=2)
    first, second, third = submit(tc), submit(tc), submit(tc)
    second_key = engine.calls[1].key
    tc.abort(second)
    assert engine.aborts == [second_key]
    assert engine.interrupts == 0 and clock.getDelayedCalls() == []  # no polling
    assert outcome(tc, second).status == "aborted"
    # the withdrawn task's slot went to the third task
    assert len(engine.calls) == 2 and engine.calls[1].key != second_key
    engine.calls[0].succeed("first")
    engine.calls[0].succeed("third")
    assert outcome(tc, first).results == "first"
    assert outcome(tc, third).results == "third"
    assert outcome(tc, second).status == "aborted"


def test_abort_of_a_started_task_leaves_the_interrupt_to_the_engine():
    tc, (engine,), clock = make_pipelined(pipeline=2)
    running = submit(tc)
    tc.abort(running)
    assert engine.aborts == [engine.calls[0].key]
    assert engine.interrupts == 0 and clock.getDelayedCalls() == []
    engine.calls[0].fail(KeyboardInterrupt())  # what the interrupt does
    assert outcome(tc, running).status == "aborted"
    follow = submit(tc)
    engine.calls[0].succeed("next")
    assert outcome(tc, follow).results == "next"


def test_abort_keys_name_the_attempt():
    tc, (engine,), _ = make_pipelined(pipeline=2)
    taskid = submit(tc, retries=1)
    first_key = engine.calls[0].key
    engine.calls[0].fail(ValueError("try again"))
    (call,) = engine.calls
    assert call.key != first_key  # a retry is a new attempt, with its own key
    tc.abort(taskid)
    assert engine.aborts == [call.key]


def test_an_engine_that_runs_out_of_tasks_takes_one_waiting_on_a_busy_engine():
    tc, (a, b), _ = make_pipelined(pipeline=2, n_engines=2)
    ids = [submit(tc, f"t{i}") for i in range(4)]
    assert len(a.calls) == len(b.calls) == 2
    waiting_on_a = a.calls[1].key
    b.calls[0].succeed()
    b.calls[0].succeed()  # b is idle, a still runs its first and holds its second
    assert a.withdrawals == [waiting_on_a] and a.aborts == []
    assert len(a.calls) == 1 and len(b.calls) == 1  # moved to b
    moved = b.calls[0]
    assert moved.key != waiting_on_a  # a new attempt
    moved.succeed("moved")
    a.calls[0].succeed()
    statuses = {outcome(tc, t).status for t in ids}
    assert statuses == {"succeeded"}
    moved_id = [t for t in ids if outcome(tc, t).results == "moved"][0]
    record = tc.db.get_record(moved_id).result
    assert record["engine_id"] == b.id and record["attempts"] == 1


def test_a_task_that_started_is_not_taken_back():
    tc, (a, b), _ = make_pipelined(pipeline=2, n_engines=2)
    [submit(tc) for _ in range(4)]
    second_on_a = a.calls[1]
    a.calls.remove(a.calls[0])  # a finished its first, and its reply is on the way:
    b.calls[0].succeed()  # the second runs there when b runs out of tasks
    b.calls[0].succeed()
    assert a.withdrawals == [second_on_a.key]
    assert a.calls == [second_on_a] and b.calls == []  # it stays where it runs
    assert a.interrupts == 0 and a.aborts == []


def test_a_task_is_not_taken_back_to_an_engine_it_may_not_run_on():
    tc, (a, b), _ = make_pipelined(pipeline=2, n_engines=2)
    first = submit(tc)
    a.calls[0].succeed()  # ran on a
    [
        submit(tc, follow=Dependency([first]).as_dict()) for _ in range(2)
    ]  # both must run where it ran
    assert len(a.calls) == 2 and b.calls == []
    assert a.withdrawals == []


def test_a_new_engine_takes_a_task_waiting_on_a_busy_one():
    tc, (a,), _ = make_pipelined(pipeline=2)
    [submit(tc) for _ in range(2)]
    waiting = a.calls[1].key
    b = QueueingFakeEngine()
    tc.controller.register_engine(b)
    assert a.withdrawals == [waiting]
    assert len(a.calls) == 1 and len(b.calls) == 1


def test_engine_lost_with_several_tasks_in_flight_retries_each_once():
    controller = ControllerService()
    tc = TaskController(controller, clock=Clock(), pipeline=2)
    engines = [QueueingFakeEngine(), QueueingFakeEngine()]
    for e in engines:
        controller.register_engine(e)
    ids = [submit(tc, retries=1) for _ in range(6)]
    assert [len(e.calls) for e in engines] == [2, 2]
    controller.unregister_engine(0)
    # the survivor gets its own two, then the lost engine's two and the rest
    for _ in range(4):
        assert len(engines[1].calls) == 2
        engines[1].calls[0].succeed()
    for call in list(engines[1].calls):
        call.succeed()
    assert {outcome(tc, t).status for t in ids} == {"succeeded"}
    assert all(outcome(tc, t).engine_id == 1 for t in ids)


def test_engine_lost_with_a_short_task_pipeline_in_flight_retries_each_task_once():
    controller = ControllerService()
    tc = TaskController(controller, clock=Clock(), pipeline=2, short_pipeline=5)
    engines = [QueueingFakeEngine(), QueueingFakeEngine()]
    for e in engines:
        controller.register_engine(e)
    first = [submit(tc, retries=1) for _ in range(4)]
    short(engines[0].calls[0])  # engine 0 now takes up to 5
    ids = [submit(tc, retries=1) for _ in range(8)]
    in_flight = {int(c.key.split(".")[0]) for c in engines[0].calls}
    assert len(in_flight) == 5
    controller.unregister_engine(0)
    while engines[1].calls:
        engines[1].calls[0].succeed()
    for taskid in in_flight:
        record = tc.db.get_record(taskid).result
        assert record["attempts"] == 2  # sent twice: once to each engine
        assert record["status"] == "succeeded" and record["engine_id"] == 1
    assert {outcome(tc, t).status for t in first + ids} == {"succeeded"}


def test_abort_of_one_task_in_a_short_task_pipeline_withdraws_only_that_one():
    tc, (engine,), _ = make_pipelined(pipeline=2, short_pipeline=5)
    ids = [submit(tc) for _ in range(8)]
    short(engine.calls[0])
    keys = [c.key for c in engine.calls]
    assert len(keys) == 5
    victim = ids[3]
    tc.abort(victim)
    assert engine.aborts == [keys[2]]  # ids[1] runs; ids[3] is the third out
    assert outcome(tc, victim).status == "aborted"
    while engine.calls:
        short(engine.calls[0])
    statuses = {t: outcome(tc, t).status for t in ids}
    assert statuses.pop(victim) == "aborted"
    assert set(statuses.values()) == {"succeeded"}


def test_abort_polling_stops_when_the_task_finishes_anyway():
    _, tc, engines, clock = make(1)
    engines[0].queued = ["run_task(<Serialized 10 bytes>)"]
    taskid = submit(tc)
    tc.abort(taskid)
    engines[0].calls[0].succeed("finished before it could be interrupted")
    engines[0].queued = []
    clock.advance(10 * tc.abort_poll_interval)
    assert engines[0].interrupts == 0
    assert clock.getDelayedCalls() == []
    assert outcome(tc, taskid).status == "aborted"


# -- engine loss ------------------------------------------------------------------


def test_engine_unregistered_mid_task_retries_elsewhere():
    controller, tc, engines, _ = make(2, hwm=0)
    taskid = submit(tc, retries=1)
    call = all_calls(engines)[0]
    controller.unregister_engine(engines.index(call.engine))
    (again,) = [c for c in all_calls(engines) if c is not call]
    assert again.engine is not call.engine
    again.succeed("elsewhere")
    call.succeed("too late")  # the lost engine answering late is ignored
    assert outcome(tc, taskid).results == "elsewhere"


def test_engine_unregistered_mid_task_without_retries_fails_with_engine_error():
    controller, tc, engines, _ = make(1)
    taskid = submit(tc)
    controller.unregister_engine(0)
    tr = outcome(tc, taskid)
    assert tr.engine_id == 0
    with pytest.raises(EngineError, match="engine 0 was lost"):
        tr.raise_exception()


def test_tasks_assigned_to_a_lost_engine_move_without_using_retries():
    controller, tc, engines, _ = make(1, hwm=0)
    running, waiting = submit(tc), submit(tc)
    controller.unregister_engine(0)
    newcomer = FakeEngine()
    controller.register_engine(newcomer)
    newcomer.calls[0].succeed("moved")
    assert outcome(tc, waiting).results == "moved"
    assert outcome(tc, running).status == "failed"


def test_engine_error_from_the_engine_retires_it():
    _, tc, engines, _ = make(2)
    taskid = submit(tc, retries=1)
    call = all_calls(engines)[0]
    call.fail(EngineError("engine killed"))
    (again,) = all_calls(engines)
    assert again.engine is not call.engine
    again.succeed()
    for _ in range(3):
        submit(tc)
    assert call.engine.calls == []
    assert outcome(tc, taskid).status == "succeeded"


# -- results, barrier, clear --------------------------------------------------------


def test_blocking_get_task_result_fires_when_done():
    _, tc, engines, _ = make(1)
    taskid = submit(tc)
    d = tc.get_task_result(taskid, block=True)
    assert not d.called
    engines[0].calls[0].succeed(3)
    assert d.result.results == 3


def test_cancelled_blocking_wait_leaves_no_waiter():
    _, tc, engines, _ = make(1)
    taskid = submit(tc)
    d = tc.get_task_result(taskid, block=True)
    d.cancel()
    d.addErrback(lambda f: None)
    assert tc._tasks[taskid].waiters == []


def test_clear_drops_records_from_the_db():
    db = DictDB()
    _, tc, engines, _ = make(1, db=db)
    taskid = submit(tc)
    engines[0].calls[0].succeed()
    tc.clear()
    assert db.find_records({}).result == []
    failures = []
    tc.get_task_result(taskid).addErrback(failures.append)
    assert failures[0].check(InvalidTaskID)


def test_stop_service_ends_unfinished_tasks_and_refuses_new_ones():
    controller, tc, engines, _ = make(1)
    running, waiting = submit(tc), submit(tc)
    d = tc.get_task_result(waiting, block=True)
    tc.startService()
    tc.stopService()
    assert d.called and d.result.status == "aborted"
    assert outcome(tc, running).status == "aborted"
    failures = []
    tc.run_spec(*spec()).addErrback(failures.append)
    assert "stopped" in str(failures[0].value)
    engine = FakeEngine()
    controller.register_engine(engine)
    assert engine.calls == []  # no longer watching registrations


# -- the task database ------------------------------------------------------------


def test_db_query_finds_records_by_status():
    _, tc, engines, _ = make(1, hwm=0)
    a, b = submit(tc), submit(tc)
    engines[0].calls[0].succeed()
    engines[0].calls[0].fail(ValueError("x"))
    found = tc.db_query({"status": {"$in": ["failed"]}}, keys=["status", "engine_id"]).result
    assert found == [{"taskid": b, "status": "failed", "engine_id": 0}]
    assert [r["taskid"] for r in tc.db_query({}).result] == [a, b]


def test_resubmit_runs_a_finished_task_again_as_a_new_task():
    _, tc, engines, _ = make(1)
    first = submit(tc, "body", retries=1, after=None)
    engines[0].calls[0].succeed("once")
    (second,) = tc.resubmit([first]).result
    assert second != first
    (call,) = engines[0].calls
    assert serialized.deserialize(call.payload) == "body"
    call.succeed("twice")
    assert outcome(tc, second).results == "twice"
    assert outcome(tc, first).results == "once"


def test_resubmit_refuses_unfinished_and_unknown_tasks():
    _, tc, engines, _ = make(1)
    running = submit(tc)
    failures = []
    tc.resubmit([running]).addErrback(failures.append)
    tc.resubmit([10**6]).addErrback(failures.append)
    assert failures[0].check(ValueError) and failures[1].check(InvalidTaskID)


# -- load-balanced map --------------------------------------------------------------


def test_mapper_and_parallel_function_provide_their_interfaces():
    from kernel.interfaces import IParallelFunction
    from kernel.taskmapper import TaskMapper

    _, tc, _, _ = make()
    assert verifyObject(IMapper, tc.mapper())
    assert isinstance(tc.mapper(), TaskMapper)
    assert verifyObject(IParallelFunction, tc.parallel()(abs))


def test_mapper_chunks_elements_and_keeps_order():
    _, tc, engines, _ = make(3)
    d = tc.mapper(chunksize=4).map(lambda x, y: x + y, range(10), range(10, 20))
    calls = all_calls(engines)
    bodies = [serialized.deserialize(c.payload) for c in calls]
    assert sorted(len(b.args[1]) for b in bodies) == [2, 4, 4]
    for call, body in reversed(list(zip(calls, bodies, strict=True))):  # finish out of order
        call.succeed([body.args[0](*args) for args in body.args[1]])
    assert d.result == [x + y for x, y in zip(range(10), range(10, 20), strict=True)]


def test_default_chunksize_splits_long_maps_into_a_bounded_number_of_tasks():
    from kernel.taskmapper import DEFAULT_MAP_TASKS, MAX_CHUNKSIZE, default_chunksize

    assert [default_chunksize(n) for n in (0, 1, DEFAULT_MAP_TASKS)] == [1, 1, 1]
    assert default_chunksize(DEFAULT_MAP_TASKS + 1) == 2
    assert -(-10_000 // default_chunksize(10_000)) == DEFAULT_MAP_TASKS
    assert default_chunksize(10**9) == MAX_CHUNKSIZE


def test_default_map_runs_one_task_per_chunk_and_keeps_order():
    from kernel.taskmapper import DEFAULT_MAP_TASKS

    _, tc, engines, _ = make(2)
    tc.mapper(block=False).map(abs, range(3)).addCallback(lambda ids: None)
    assert [len(serialized.deserialize(c.payload).args[1]) for c in all_calls(engines)] == [1, 1]
    for call in all_calls(engines):
        call.succeed([0])
    _, tc, engines, _ = make(2)
    n = 1000
    d = tc.map(lambda x: -x, range(n))
    done = 0
    while calls := all_calls(engines):
        for call in calls:
            body = serialized.deserialize(call.payload)
            call.succeed([body.args[0](*args) for args in body.args[1]])
            done += 1
    assert done == DEFAULT_MAP_TASKS
    assert d.result == [-x for x in range(n)]


def test_mapper_rejects_bad_chunksize():
    _, tc, _, _ = make()
    with pytest.raises(ValueError, match="chunksize"):
        tc.mapper(chunksize=0)


def test_a_task_raising_impossible_dependency_is_not_retried():
    _, tc, engines, _ = make(2)
    taskid = submit(tc, retries=3)
    all_calls(engines)[0].fail(ImpossibleDependency("this can never run"))
    assert all_calls(engines) == []
    with pytest.raises(ImpossibleDependency, match="never run"):
        outcome(tc, taskid).raise_exception()
