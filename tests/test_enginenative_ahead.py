"""The engine side of the native transport: tasks sent ahead wait on the
engine thread, commands and aborts take back those that have not started,
and a large result pauses the engine thread until its reply is written."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from kernel import enginenative, nativeproto
from kernel.engineservice import EngineService
from kernel.error import TaskWithdrawn
from kernel.serialized import deserialize
from kernel.task import StringTask
from tests.contract.engine import WAIT, failure_of
from tests.test_engineservice import wait_for


def body(code: str):
    return StringTask(code).to_spec()[1]


def gated(gate) -> str:
    return f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.005)\n"


@pytest_twisted.async_yield_fixture
async def side():
    engine = EngineService()
    queue = enginenative._EngineSideQueue(engine)
    try:
        yield queue
    finally:
        await engine.kill()


@pytest_twisted.ensureDeferred
async def test_tasks_go_ahead_to_the_engine_thread_and_each_gets_its_own_outcome(side):
    first = side.run_task(body("order = ['one']"), key="1")
    failing = side.run_task(body("order.append('two'); 1/0"), key="2")
    third = side.run_task(body("order.append('three')"), key="3")
    assert len(side._in_flight) == 3 and not side._tasks  # all on the engine thread
    assert (await first.addTimeout(WAIT, reactor))["stdout"] == ""
    f = await failure_of(failing)
    assert f.check(ZeroDivisionError)
    await third.addTimeout(WAIT, reactor)
    assert deserialize(await side.pull_serialized("order")) == ["one", "two", "three"]


@pytest_twisted.ensureDeferred
async def test_a_command_takes_back_the_tasks_behind_the_running_one(side, tmp_path):
    gate = tmp_path / "gate"
    t1 = side.run_task(body(gated(gate) + "order = ['task1']"), key="1")
    t2 = side.run_task(body("order.append('task2')"), key="2")
    t3 = side.run_task(body("order.append('task3')"), key="3")
    await wait_for(lambda: side.engine._executor.is_running(side._in_flight[0].sent))
    cmd = side.execute("order.append('execute')")
    assert [c.key for c in side._in_flight] == ["1"]  # the others wait here again
    assert [c.key for c in side._tasks] == ["2", "3"]
    status = await side.queue_status()
    assert status["pending"].startswith("run_task(")
    assert [q.split("(")[0] for q in status["queue"]] == ["execute", "run_task", "run_task"]
    gate.write_text("")
    for d in (t1, cmd, t2, t3):
        await d.addTimeout(WAIT, reactor)
    order = deserialize(await side.pull_serialized("order"))
    assert order == ["task1", "execute", "task2", "task3"]


@pytest_twisted.ensureDeferred
async def test_abort_withdraws_a_task_on_the_engine_thread_and_interrupts_only_the_running_one(
    side, tmp_path
):
    gate = tmp_path / "gate"
    t1 = side.run_task(body(gated(gate) + "first = 1"), key="1")
    t2 = side.run_task(body("second = 1"), key="2")
    t3 = side.run_task(body("third = 1"), key="3")
    await wait_for(lambda: side.engine._executor.is_running(side._in_flight[0].sent))
    assert len(side._in_flight) == 3
    assert await side.abort_task("2") == "withdrawn"
    f = await failure_of(t2)
    assert f.check(TaskWithdrawn)
    assert await side.abort_task("3", interrupt=False) == "withdrawn"
    assert (await failure_of(t3)).check(TaskWithdrawn)
    assert await side.abort_task("1", interrupt=False) == "running"
    assert await side.abort_task("1") == "interrupted"
    f = await failure_of(t1)
    assert f.check(KeyboardInterrupt)
    keys = await side.keys()
    assert "second" not in keys and "third" not in keys
    assert await side.abort_task("1") == "finished"


@pytest_twisted.ensureDeferred
async def test_a_large_task_result_holds_the_engine_thread_until_its_reply_is_written():
    import numpy as np

    engine = EngineService()
    try:
        ref = enginenative.NativeEngineReferenceFromService(engine)
        await ref.remote_execute("import numpy as np; a = np.ones(2 * 2**20 // 8)")
        _, big = StringTask("pass", pull=["a"]).to_spec()
        first = ref.remote_run_task(big, key="1")
        changed = ref.remote_run_task(body("a[:] = 0"), key="2")
        reply = await first.addTimeout(WAIT, reactor)
        assert isinstance(reply, nativeproto.AfterWritten)
        (buf,) = reply.value[1]["result"].buffers  # the dict {'a': a}
        assert np.shares_memory(np.asarray(buf), engine._namespace["a"])  # no copy
        # the engine thread has taken the next task, and waits before it
        await wait_for(lambda: engine._executor._queue.empty())
        assert not engine._executor.busy
        assert not changed.called and engine._namespace["a"].all()
        reply.callback()  # written
        await changed.addTimeout(WAIT, reactor)
        assert not engine._namespace["a"].any()
        small = await ref.remote_run_task(body("x = 1"), key="3").addTimeout(WAIT, reactor)
        assert not isinstance(small, nativeproto.AfterWritten)  # copied, nothing held
    finally:
        await engine.kill()


def test_without_run_task_ahead_the_engine_side_queue_runs_one_task_at_a_time():
    class Plain:
        def __init__(self):
            self.calls = []

        def run_task(self, payload, clear_before=False, clear_after=False):
            from twisted.internet.defer import Deferred

            self.calls.append(payload)
            return Deferred()

    plain = Plain()
    queue = enginenative._EngineSideQueue(plain)
    queue.run_task("a", key="1")
    queue.run_task("b", key="2")
    assert plain.calls == ["a"]
