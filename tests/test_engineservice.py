"""EngineService: the engine contract, plus what only an in-process engine shows."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from kernel import capture, error, executor
from kernel.engineservice import (
    EngineService,
    QueuedEngine,
    describe_command,
    plain_property,
)
from kernel.error import EngineError, InvalidProperty
from kernel.interfaces import (
    IEngineCore,
    IEngineInterrupt,
    IEngineProperties,
    IEngineSerialized,
    IEngineTasks,
)
from tests.contract.engine import WAIT, EngineContract, failure_of, interrupt_when_running


async def wait_for(predicate, attempts: int = 2000) -> None:
    """Let the reactor run until ``predicate()`` is true (bounded)."""
    for _ in range(attempts):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    pytest.fail(f"{predicate} never became true")


async def stop(engine: EngineService) -> None:
    await engine.kill()
    await engine.when_stopped().addTimeout(WAIT, reactor)


class TestEngineService(EngineContract):
    @pytest_twisted.async_yield_fixture
    async def engine(self):
        engine = EngineService(id=7)
        yield engine
        await stop(engine)


class TestQueuedEngineService(EngineContract):
    """The same contract through a QueuedEngine, as the controller sees engines."""

    @pytest_twisted.async_yield_fixture
    async def engine(self):
        inner = EngineService()
        queued = QueuedEngine(inner)
        queued.id = 3
        yield queued
        await stop(inner)


@pytest_twisted.async_yield_fixture
async def engines():
    """Two in-process engines, stopped afterwards."""
    pair = [EngineService(id=0), EngineService(id=1)]
    yield pair
    for e in pair:
        await stop(e)


def test_engine_service_provides_its_interfaces():
    engine = EngineService()
    for iface in (
        IEngineCore,
        IEngineSerialized,
        IEngineProperties,
        IEngineInterrupt,
        IEngineTasks,
    ):
        assert verifyObject(iface, engine)


def test_setting_id_rebinds_it_in_the_namespace():
    engine = EngineService()
    engine.id = 12
    assert engine._namespace["id"] == 12


# -- threads --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_user_code_runs_on_one_dedicated_thread_per_engine(engines):
    names = []
    for e in engines:
        for _ in range(2):
            await e.execute("import threading; t = threading.current_thread()")
            names.append(await e.pull("t"))
    a1, a2, b1, b2 = names
    assert a1 is a2 and b1 is b2
    assert a1 is not b1
    assert threading.main_thread() not in (a1, b1)
    assert a1.name == "txkernel-engine-0" and b1.name == "txkernel-engine-1"


@pytest_twisted.ensureDeferred
async def test_reactor_keeps_running_while_a_command_computes(engines):
    engine = engines[0]
    ev = threading.Event()
    await engine.push({"ev": ev})
    running = engine.execute("was_set = ev.wait(20)")
    # Only the reactor thread sets the event: if the command blocked the
    # reactor, the wait would time out and was_set would be False.
    await deferLater(reactor, 0.05, ev.set)
    await running
    assert await engine.pull("was_set") is True


# -- output capture ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_output_is_captured_per_engine_when_engines_print_concurrently(engines):
    code = "for i in range(300):\n    print('engine', id, i)"
    results = await DeferredList([e.execute(code) for e in engines], fireOnOneErrback=True)
    for engine, (_, result) in zip(engines, results, strict=True):
        lines = result["stdout"].splitlines()
        assert lines == [f"engine {engine.id} {i}" for i in range(300)]


@pytest_twisted.ensureDeferred
async def test_output_of_other_threads_is_not_captured(engines, capsys):
    engine = engines[0]
    ev = threading.Event()
    await engine.push({"ev": ev})
    running = engine.execute("print('from engine'); ev.wait(20);")
    await deferLater(reactor, 0.05, lambda: None)
    print("from the reactor thread")
    ev.set()
    result = await running
    assert result["stdout"] == "from engine\n"
    assert "from the reactor thread" in capsys.readouterr().out


@pytest_twisted.ensureDeferred
async def test_output_observers_see_text_before_the_command_fires(engines):
    engine = engines[0]
    seen = []
    engine.add_output_observer(lambda name, text: seen.append((name, text)))
    d = engine.execute("import sys\nprint('a')\nsys.stderr.write('b');\nprint('c')")
    d.addCallback(lambda r: seen.append("done"))
    await d
    assert seen[-1] == "done"
    # Batching may join consecutive writes to one stream, never reorder them.
    joined = []
    for name, text in seen[:-1]:
        if joined and joined[-1][0] == name:
            joined[-1] = (name, joined[-1][1] + text)
        else:
            joined.append((name, text))
    assert joined == [("stdout", "a\n"), ("stderr", "b"), ("stdout", "c\n")]


@pytest_twisted.ensureDeferred
async def test_output_observers_get_batches_for_a_tight_print_loop(engines):
    engine = engines[0]
    seen = []
    engine.add_output_observer(lambda name, text: seen.append(text))
    result = await engine.execute("for i in range(20000):\n    print(i)")
    assert "".join(seen) == result["stdout"]
    assert len(seen) < 40000  # one call per write would be 40000


@pytest_twisted.ensureDeferred
async def test_removed_output_observer_is_not_called(engines):
    engine = engines[0]
    seen = []
    engine.add_output_observer(seen.append)
    engine.remove_output_observer(seen.append)
    await engine.execute("print('x')")
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_capture_proxies_are_removed_after_the_last_engine_stops():
    users_before = capture._users
    engine = EngineService(id=0)
    await engine.execute("pass")
    assert capture.installed()
    assert capture._users == users_before + 1
    await stop(engine)
    assert capture._users == users_before
    if users_before == 0:
        assert not capture.installed()


@pytest_twisted.ensureDeferred
async def test_capture_survives_stdout_being_replaced(engines, monkeypatch):
    import io
    import sys

    engine = engines[0]
    await engine.execute("pass")
    replacement = io.StringIO()
    monkeypatch.setattr(sys, "stdout", replacement)
    result = await engine.execute("print('still captured')")
    assert result["stdout"] == "still captured\n"
    assert replacement.getvalue() == ""


# -- failures ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_traceback_text_leaves_out_txkernel_frames(engines):
    f = await failure_of(engines[0].execute("def g():\n    raise KeyError('k')\ng()"))
    tb = error.engine_failure_info(f).traceback
    assert "engineservice.py" not in tb and "executor.py" not in tb
    assert "<engine 0 input" in tb and "raise KeyError('k')" in tb


@pytest_twisted.ensureDeferred
async def test_failures_from_several_engines_collect_into_composite_error(engines):
    ds = [e.execute(f"raise ValueError('bad on {e.id}')") for e in engines]
    results = await DeferredList(ds, consumeErrors=True)
    with pytest.raises(error.CompositeError) as info:
        error.collect_exceptions([r for _, r in results], "execute")
    assert [(e.engine_id, e.ename) for e in info.value.elist] == [
        (0, "ValueError"),
        (1, "ValueError"),
    ]
    assert "bad on 1" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_push_binds_the_object_itself(engines):
    obj = [1, 2]
    await engines[0].push({"obj": obj})
    assert await engines[0].pull("obj") is obj


# -- interrupt and kill -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_interrupt_leaves_commands_queued_behind_it_to_run(engines):
    engine = engines[0]
    running = engine.execute("while True:\n    pass")
    after = engine.execute("x = 'ran'")
    assert await interrupt_when_running(engine)
    assert isinstance((await failure_of(running)).value, KeyboardInterrupt)
    await after
    assert await engine.pull("x") == "ran"


@pytest_twisted.ensureDeferred
async def test_kill_calls_on_kill_callbacks_and_stops_the_thread():
    engine = EngineService(id=4)
    calls = []
    engine.on_kill(calls.append, "killed")
    await engine.execute("pass")
    thread = engine.thread
    await engine.kill()
    await engine.kill()  # a second kill does nothing more
    assert calls == ["killed"]
    await engine.when_stopped().addTimeout(WAIT, reactor)
    assert not thread.is_alive()


@pytest_twisted.ensureDeferred
async def test_kill_interrupts_the_running_command_and_fails_queued_ones():
    engine = EngineService(id=5)
    started = threading.Event()
    await engine.push({"started": started})
    running = engine.execute("started.set()\nwhile True:\n    pass")
    queued = engine.execute("never = 1")
    await wait_for(started.is_set)
    await engine.kill()
    assert isinstance((await failure_of(running)).value, KeyboardInterrupt)
    f = await failure_of(queued)
    assert isinstance(f.value, EngineError)
    assert "engine 5" in str(f.value)
    await engine.when_stopped().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_engine_never_started_stops_at_once():
    engine = EngineService()
    await engine.kill()
    await engine.when_stopped().addTimeout(1, reactor)
    assert engine.thread is None


# -- helpers ------------------------------------------------------------------


def test_plain_property_copies_and_turns_tuples_into_lists():
    value = {"a": (1, [2.5, None]), "b": True}
    copy = plain_property("k", value)
    assert copy == {"a": [1, [2.5, None]], "b": True}
    copy["a"].append(9)
    assert value["a"] == (1, [2.5, None])


@pytest.mark.parametrize("bad", [b"bytes", {1, 2}, object(), [1, object()], {"x": 1j}])
def test_plain_property_refuses_non_plain_data(bad):
    with pytest.raises(InvalidProperty, match="'k'"):
        plain_property("k", bad)


def test_describe_command_is_readable_and_short():
    assert describe_command("execute", ("a=5",)) == "execute('a=5')"
    assert describe_command("push", ({"b": 1, "a": 2},)) == "push(['a', 'b'])"
    long = describe_command("execute", ("x" * 500,))
    assert len(long) < 80 and long.endswith("...)")
    assert describe_command("run_task", ("p",), {"clear_after": True}) == (
        "run_task('p', clear_after=True)"
    )


@pytest_twisted.ensureDeferred
async def test_executor_interrupt_when_idle_is_false_and_stop_fails_queued_work():
    ex = executor.ThreadExecutor(name="t-exec")
    ev = threading.Event()
    assert ex.interrupt() is False
    first = ex.submit(lambda: ev.wait(20))
    await wait_for(lambda: ex.busy)
    second = ex.submit(lambda: "never")
    dropped = ex.stop()
    ev.set()
    assert await first.addTimeout(WAIT, reactor) is True
    assert dropped == [second]
    f = await failure_of(second)
    assert isinstance(f.value, executor.ExecutorStopped)
    await ex.when_stopped().addTimeout(WAIT, reactor)
    f = await failure_of(ex.submit(lambda: None))
    assert isinstance(f.value, executor.ExecutorStopped)


@pytest_twisted.ensureDeferred
async def test_interrupts_at_random_moments_never_lose_a_command_or_the_thread(engines):
    """Interrupts racing with short commands: every command resolves (done or
    KeyboardInterrupt), no interrupt leaks into a later command, and the
    engine keeps working."""
    import random

    engine = engines[0]
    await engine.push({"count": 0})
    rng = random.Random(1234)
    ds = [engine.execute("for _ in range(50_000):\n    count += 1") for _ in range(80)]
    outcomes = []
    for d in ds:
        d.addCallbacks(lambda r: outcomes.append("ok"), lambda f: outcomes.append(f.type))
    interrupted = 0
    while len(outcomes) < len(ds):
        interrupted += await engine.interrupt()
        await deferLater(reactor, rng.random() * 0.002, lambda: None)
    assert set(outcomes) <= {"ok", KeyboardInterrupt}
    # How many land depends on timing (an interrupt that arrives as a command
    # ends is withdrawn); none may land that was not reported as sent.
    assert outcomes.count(KeyboardInterrupt) <= interrupted
    # After the storm an interrupt still lands, and only on its own command.
    endless = engine.execute("while True:\n    count += 1")
    assert await interrupt_when_running(engine)
    assert (await failure_of(endless)).type is KeyboardInterrupt
    result = await engine.execute("after = count")
    assert result["input"] == "after = count"
    assert engine.thread.is_alive()
