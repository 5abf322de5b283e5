"""QueuedEngine: one FIFO per engine, failure isolation, clear_queue, loss.

Most tests drive a fake engine whose Deferreds the test fires by hand, so
the order of events is exact and no thread or real time is involved.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from kernel import error
from kernel.engineservice import EngineService, QueuedEngine
from kernel.error import EngineError, QueueCleared
from kernel.interfaces import (
    IEngineBase,
    IEngineInterrupt,
    IEngineQueued,
    IEngineTaskQueue,
    IEngineTasks,
)
from tests.contract.engine import WAIT


class FakeEngine:
    """Records each call and returns a Deferred the test fires."""

    def __init__(self):
        self.id = None
        self.properties = {"p": 1}
        self.calls: list[tuple[str, tuple]] = []
        self.deferreds: list[Deferred] = []
        self.interrupted = 0

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, args))
            d = Deferred()
            self.deferreds.append(d)
            return d

        return method

    def get_properties(self, keys=None):
        self.calls.append(("get_properties", (keys,)))
        return succeed(dict(self.properties))

    def has_properties(self, keys):
        self.calls.append(("has_properties", (keys,)))
        return succeed([k in self.properties for k in keys])

    def interrupt(self):
        self.interrupted += 1
        return succeed(True)


class Results:
    """Collects what each Deferred fired with, by label."""

    def __init__(self):
        self.fired: dict[str, object] = {}
        self.order: list[str] = []

    def track(self, d: Deferred, label: str) -> Deferred:
        def done(result):
            self.fired[label] = result
            self.order.append(label)

        d.addBoth(done)
        return d


@pytest.fixture
def fake():
    return FakeEngine()


@pytest.fixture
def queued(fake):
    q = QueuedEngine(fake)
    q.id = 2
    return q


def test_queued_engine_provides_its_interfaces(queued):
    for iface in (IEngineBase, IEngineQueued, IEngineInterrupt, IEngineTasks):
        assert verifyObject(iface, queued)


def test_id_and_properties_are_the_wrapped_engines(fake, queued):
    assert fake.id == 2
    assert queued.properties is fake.properties


def test_max_in_flight_must_be_positive(fake):
    with pytest.raises(ValueError):
        QueuedEngine(fake, max_in_flight=0)


def test_one_command_in_flight_and_fifo_order(fake, queued):
    res = Results()
    res.track(queued.execute("a=1"), "a")
    res.track(queued.push({"b": 2}), "b")
    res.track(queued.pull("b"), "c")
    assert fake.calls == [("execute", ("a=1",))]
    fake.deferreds[0].callback("ra")
    assert [c[0] for c in fake.calls] == ["execute", "push"]
    fake.deferreds[1].callback(None)
    fake.deferreds[2].callback(2)
    assert res.order == ["a", "b", "c"]
    assert res.fired == {"a": "ra", "b": None, "c": 2}


def test_commands_from_different_callers_share_one_fifo(fake, queued):
    # Two "clients" interleave their calls; the engine sees arrival order.
    queued.execute("client1 first")
    queued.execute("client2 first")
    queued.execute("client1 second")
    for i in range(3):
        assert len(fake.deferreds) == i + 1  # the next is sent only when one finishes
        fake.deferreds[i].callback(None)
    assert [c[1][0] for c in fake.calls] == ["client1 first", "client2 first", "client1 second"]


def test_a_failing_command_fails_only_itself(fake, queued):
    res = Results()
    res.track(queued.execute("bad"), "bad")
    res.track(queued.execute("good"), "good")
    fake.deferreds[0].errback(ZeroDivisionError("x"))
    assert isinstance(res.fired["bad"], Failure)
    assert res.fired["bad"].check(ZeroDivisionError)
    assert "good" not in res.fired
    fake.deferreds[1].callback("ok")
    assert res.fired["good"] == "ok"


def test_a_command_that_raises_synchronously_fails_only_itself():
    class Raising(FakeEngine):
        def execute(self, lines):
            raise RuntimeError("sync failure")

    fake = Raising()
    queued = QueuedEngine(fake)
    res = Results()
    res.track(queued.execute("x"), "x")
    res.track(queued.keys(), "k")
    assert res.fired["x"].check(RuntimeError)
    assert fake.calls == [("keys", ())]


def test_synchronous_engine_drains_a_long_queue_without_recursion():
    class Instant(FakeEngine):
        def execute(self, lines):
            return succeed(lines)

    queued = QueuedEngine(Instant())
    queued._pumping = True  # hold the queue while filling it
    ds = [queued.execute(str(i)) for i in range(5000)]
    queued._pumping = False
    res = []
    for d in ds:
        d.addCallback(res.append)
    queued._pump()
    assert res == [str(i) for i in range(5000)]


def test_queue_status_describes_waiting_and_running_commands(fake, queued):
    assert queued.queue_status().result == {"queue": [], "pending": None}
    queued.execute("a=5")
    queued.push({"x": 1, "w": 2})
    queued.pull(["x"])
    status = queued.queue_status().result
    assert status == {"pending": "execute('a=5')", "queue": ["push(['w', 'x'])", "pull(['x'])"]}


def test_clear_queue_fails_waiting_commands_and_leaves_the_running_one(fake, queued):
    res = Results()
    res.track(queued.execute("running"), "running")
    res.track(queued.execute("waiting1"), "w1")
    res.track(queued.keys(), "w2")
    assert queued.clear_queue().result is None
    for label in ("w1", "w2"):
        f = res.fired[label]
        assert f.check(QueueCleared)
        assert "engine 2" in str(f.value) and "clear_queue" in str(f.value)
    assert "execute('waiting1')" in str(res.fired["w1"].value)
    assert "running" not in res.fired
    fake.deferreds[0].callback("done")
    assert res.fired["running"] == "done"
    assert len(fake.calls) == 1  # the cleared commands never reached the engine


def test_max_in_flight_pipelines_and_keeps_order(fake):
    queued = QueuedEngine(fake, max_in_flight=2)
    res = Results()
    for label in "abc":
        res.track(queued.execute(label), label)
    assert [c[1][0] for c in fake.calls] == ["a", "b"]
    fake.deferreds[0].callback(1)
    assert [c[1][0] for c in fake.calls] == ["a", "b", "c"]
    fake.deferreds[1].callback(2)
    fake.deferreds[2].callback(3)
    assert res.order == ["a", "b", "c"]


def test_interrupt_and_property_reads_bypass_the_queue(fake, queued):
    queued.execute("long")
    queued.execute("behind")
    assert queued.interrupt().result is True
    assert fake.interrupted == 1
    assert queued.get_properties(["p"]).result == {"p": 1}
    assert queued.has_properties(["p", "q"]).result == [True, False]
    assert [c[0] for c in fake.calls] == ["execute", "get_properties", "has_properties"]


def test_property_writes_are_queued(fake, queued):
    queued.execute("long")
    queued.set_properties({"a": 1})
    queued.del_properties(["a"])
    queued.clear_properties()
    assert [c[0] for c in fake.calls] == ["execute"]
    assert len(queued.queue_status().result["queue"]) == 3


def test_interrupt_of_engine_without_interrupt_is_false():
    class NoInterrupt:
        id = 0
        properties = {}

    assert QueuedEngine(NoInterrupt()).interrupt().result is False


def test_lost_fails_running_and_queued_with_engine_error(fake, queued):
    res = Results()
    res.track(queued.execute("running"), "running")
    res.track(queued.execute("queued"), "queued")
    observed = []
    queued.register_failure_observer(observed.append)
    queued.lost("connection dropped")
    for label in ("running", "queued"):
        f = res.fired[label]
        assert f.check(EngineError)
        assert "engine 2" in str(f.value) and "connection dropped" in str(f.value)
        assert error.engine_failure_info(f).engine_id == 2
    assert "execute('queued')" in str(res.fired["queued"].value)
    assert len(observed) == 1 and observed[0].check(EngineError)
    assert queued.is_lost


def test_after_lost_every_call_fails_at_once(fake, queued):
    queued.lost("gone")
    for d in (queued.execute("x"), queued.keys(), queued.queue_status(), queued.interrupt()):
        f = Results()
        f.track(d, "r")
        assert f.fired["r"].check(EngineError)
    assert fake.calls == []


def test_late_result_from_lost_engine_is_ignored(fake, queued):
    res = Results()
    res.track(queued.execute("running"), "running")
    queued.lost("gone")
    fake.deferreds[0].callback("late")  # must not raise AlreadyCalledError
    fake.deferreds[0].addErrback(pytest.fail)
    assert res.fired["running"].check(EngineError)


def test_lost_twice_notifies_once(fake, queued):
    observed = []
    queued.register_failure_observer(observed.append)
    queued.lost("a")
    queued.lost("b")
    assert len(observed) == 1


def test_unregistered_failure_observer_is_not_called(fake, queued):
    observed = []
    queued.register_failure_observer(observed.append)
    queued.unregister_failure_observer(observed.append)
    queued.lost("gone")
    assert observed == []


def test_a_failing_failure_observer_does_not_stop_the_others(fake, queued):
    observed = []

    def broken(f):
        raise RuntimeError("observer bug")

    queued.register_failure_observer(broken)
    queued.register_failure_observer(observed.append)
    queued.lost("gone")
    assert len(observed) == 1


# -- with a real engine ----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def real():
    inner = EngineService()
    q = QueuedEngine(inner)
    q.id = 0
    yield q
    await inner.kill()
    from twisted.internet import reactor

    await inner.when_stopped().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_real_engine_runs_interleaved_callers_in_arrival_order(real):
    await real.push({"log": []})
    ds = []
    for i in range(20):
        caller = "A" if i % 2 else "B"
        ds.append(real.execute(f"log.append('{caller}{i}')"))
    ds.append(real.execute("raise ValueError('in the middle')"))
    ds.append(real.execute("log.append('last')"))
    results = await DeferredList(ds, consumeErrors=True)
    assert [ok for ok, _ in results] == [True] * 20 + [False, True]
    expected = [f"{'A' if i % 2 else 'B'}{i}" for i in range(20)] + ["last"]
    assert await real.pull("log") == expected


@pytest_twisted.ensureDeferred
async def test_real_engine_queue_status_while_a_command_runs(real):
    import threading

    ev = threading.Event()
    await real.push({"ev": ev})
    running = real.execute("ev.wait(20)")
    waiting = real.execute("a=5")
    status = await real.queue_status()
    assert status == {"pending": "execute('ev.wait(20)')", "queue": ["execute('a=5')"]}
    ev.set()
    await running
    await waiting


# -- the task queue (IEngineTaskQueue) --------------------------------------------


class TaskFake(FakeEngine):
    """A fake engine without a task queue of its own: it records keyword
    arguments too."""

    abort_task = None  # cannot withdraw a task

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            d = Deferred()
            self.deferreds.append(d)
            return d

        return method


class QueueingTaskFake(TaskFake):
    """A fake engine side with a task queue: ``abort_task`` is recorded and
    answers ``"withdrawn"``."""

    def abort_task(self, key, interrupt=True):
        self.calls.append(("abort_task", (key,), {"interrupt": interrupt}))
        return succeed("withdrawn")


def names(fake):
    return [c[0] for c in fake.calls]


@pytest.fixture
def tfake():
    return TaskFake()


@pytest.fixture
def tqueued(tfake):
    q = QueuedEngine(tfake)
    q.id = 3
    return q


def test_queued_engine_provides_the_task_queue_interface(tqueued):
    assert verifyObject(IEngineTaskQueue, tqueued)


def test_commands_overtake_waiting_tasks(tfake, tqueued):
    res = Results()
    res.track(tqueued.run_task("t1", key="1"), "t1")
    res.track(tqueued.run_task("t2", key="2"), "t2")
    res.track(tqueued.execute("cmd"), "cmd")
    status = tqueued.queue_status().result
    assert status["pending"].startswith("run_task(")
    assert status["queue"][0] == "execute('cmd')" and status["queue"][1].startswith("run_task(")
    tfake.deferreds[0].callback("r1")
    assert names(tfake) == ["run_task", "execute"]  # the command went before t2
    tfake.deferreds[1].callback("c")
    assert names(tfake) == ["run_task", "execute", "run_task"]
    tfake.deferreds[2].callback("r2")
    assert res.order == ["t1", "cmd", "t2"]


def test_a_task_waits_behind_the_commands_queued_before_it(tfake, tqueued):
    res = Results()
    res.track(tqueued.execute("a"), "a")
    res.track(tqueued.execute("b"), "b")
    res.track(tqueued.run_task("t", key="t"), "t")
    for i in range(3):
        tfake.deferreds[i].callback(i)
    assert res.order == ["a", "b", "t"]


def test_a_task_runs_alone_on_an_engine_that_cannot_withdraw_it(tfake):
    queued = QueuedEngine(tfake, max_in_flight=4)
    queued.run_task("t1", key="1")
    queued.run_task("t2", key="2")
    queued.execute("cmd")
    assert names(tfake) == ["run_task"]  # neither the next task nor the command
    tfake.deferreds[0].callback("r1")
    assert names(tfake) == ["run_task", "execute"]  # commands may pipeline, tasks wait
    queued.execute("cmd2")
    assert names(tfake) == ["run_task", "execute", "execute"]
    tfake.deferreds[1].callback(None)
    tfake.deferreds[2].callback(None)
    assert names(tfake) == ["run_task", "execute", "execute", "run_task"]
    assert "key" not in tfake.calls[-1][2]  # such an engine takes no key


def test_abort_task_withdraws_a_waiting_task(tfake, tqueued):
    res = Results()
    res.track(tqueued.run_task("t1", key="1"), "t1")
    res.track(tqueued.run_task("t2", key="2"), "t2")
    assert tqueued.abort_task("2").result == "withdrawn"
    assert isinstance(res.fired["t2"], Failure)
    assert res.fired["t2"].check(error.TaskWithdrawn)
    assert tqueued.queue_status().result["queue"] == []
    tfake.deferreds[0].callback("r1")
    assert names(tfake) == ["run_task"]  # t2 never reached the engine
    assert tfake.interrupted == 0


def test_abort_task_interrupts_the_running_task(tfake, tqueued):
    tqueued.run_task("t1", key="1")
    assert tqueued.abort_task("1").result == "interrupted"
    assert tfake.interrupted == 1


def test_abort_task_without_interrupt_leaves_the_running_task(tfake, tqueued):
    res = Results()
    res.track(tqueued.run_task("t1", key="1"), "t1")
    assert tqueued.abort_task("1", interrupt=False).result == "running"
    assert tfake.interrupted == 0 and "t1" not in res.fired


def test_abort_task_without_interrupt_is_passed_on_to_an_engine_with_a_task_queue():
    fake = QueueingTaskFake()
    queued = QueuedEngine(fake, max_in_flight=2)
    queued.run_task("t1", key="1")
    queued.abort_task("1", interrupt=False)
    assert fake.calls[-1] == ("abort_task", ("1",), {"interrupt": False})


def test_abort_task_of_an_unknown_or_finished_task_does_nothing(tfake, tqueued):
    tqueued.run_task("t1", key="1")
    tfake.deferreds[0].callback("r1")
    tqueued.execute("cmd")
    assert tqueued.abort_task("1").result == "finished"
    assert tqueued.abort_task("never sent").result == "finished"
    assert tfake.interrupted == 0


def test_an_engine_with_a_task_queue_is_sent_tasks_ahead_with_their_keys():
    fake = QueueingTaskFake()
    queued = QueuedEngine(fake, max_in_flight=3)  # two tasks and a command
    queued.run_task("t1", key="1")
    queued.run_task("t2", key="2")
    queued.run_task("t3", key="3")
    assert [c[2].get("key") for c in fake.calls] == ["1", "2"]
    # in flight: the engine's queue decides; still here: withdrawn here
    assert queued.abort_task("2").result == "withdrawn"
    assert fake.calls[-1] == ("abort_task", ("2",), {"interrupt": True})
    n = len(fake.calls)
    assert queued.abort_task("3").result == "withdrawn"
    assert len(fake.calls) == n  # decided here, the engine never saw it


def test_tasks_leave_a_slot_for_a_command_on_an_engine_with_a_task_queue():
    fake = QueueingTaskFake()
    queued = QueuedEngine(fake, max_in_flight=3)
    for i in range(5):
        queued.run_task(f"t{i}", key=str(i))
    assert [c[0] for c in fake.calls] == ["run_task", "run_task"]
    queued.execute("cmd")  # sent at once, not after a task returns
    assert [c[0] for c in fake.calls] == ["run_task", "run_task", "execute"]


def test_clear_queue_leaves_waiting_tasks(tfake, tqueued):
    res = Results()
    res.track(tqueued.run_task("t1", key="1"), "t1")
    res.track(tqueued.execute("cmd"), "cmd")
    res.track(tqueued.run_task("t2", key="2"), "t2")
    tqueued.clear_queue()
    assert res.fired["cmd"].check(QueueCleared)
    assert "t2" not in res.fired
    tfake.deferreds[0].callback("r1")
    assert names(tfake) == ["run_task", "run_task"]


def test_lost_fails_waiting_tasks_with_engine_error(tfake, tqueued):
    res = Results()
    res.track(tqueued.run_task("t1", key="1"), "t1")
    res.track(tqueued.run_task("t2", key="2"), "t2")
    tqueued.lost("gone")
    for label in ("t1", "t2"):
        assert res.fired[label].check(EngineError)
    assert tqueued.abort_task("2").called  # fails at once, does not hang


@pytest_twisted.ensureDeferred
async def test_a_withdrawn_task_never_runs_on_a_real_engine(tmp_path):
    from kernel.task import StringTask
    from tests.contract.task import gate_code, open_gate

    engine = EngineService()
    queued = QueuedEngine(engine)
    gate = str(tmp_path / "gate")
    _, first = StringTask(gate_code(gate) + "first = 1").to_spec()
    _, second = StringTask("second = 1").to_spec()
    d1 = queued.run_task(first, key="1")
    d2 = queued.run_task(second, key="2")
    assert await queued.abort_task("2") == "withdrawn"
    open_gate(gate)
    await d1.addTimeout(WAIT, reactor)
    with pytest.raises(error.TaskWithdrawn):
        await d2
    keys = await queued.keys()
    assert "first" in keys and "second" not in keys
    await engine.kill()
