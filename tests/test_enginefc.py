"""Engine registration and remote engines over Foolscap, in one process (two Tubs)."""

import numpy as np
import pytest
import pytest_twisted
from foolscap.api import Tub
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from kernel import clusterdir, serialized
from kernel.clusterdir import ClusterDir
from kernel.controllerservice import ControllerService
from kernel.enginefc import (
    EngineConnector,
    EngineFromReference,
    FCEngineReferenceFromService,
    FCEngineRegistrar,
)
from kernel.engineservice import EngineService, QueuedEngine
from kernel.error import ConnectionError, EngineError, RemoteError
from kernel.heartbeat import HeartMonitor
from kernel.interfaces import IEngineBase, IEngineInterrupt, IEngineTasks
from kernel.tap import make_tub, register_furl
from tests.contract.engine import interrupt_when_running

TIMEOUT = 20


async def wait_until(predicate, timeout=TIMEOUT, interval=0.02):
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


class Controller:
    """A controller Tub with a registrar, restartable on the same cert and port."""

    def __init__(self, cd, monitor=None):
        self.cd = cd
        self.monitor = monitor
        self.controller = ControllerService()
        self.registrar = FCEngineRegistrar(self.controller, monitor)
        self.tub = make_tub(cd, "engine")
        self.tub.startService()
        if monitor is not None:
            monitor.startService()
        self.furl = register_furl(self.tub, self.registrar, cd, clusterdir.ENGINE_FURL)

    async def stop(self):
        if self.monitor is not None and self.monitor.running:
            self.monitor.stopService()
        if self.tub.running:
            await self.tub.stopService()


class Engine:
    """An engine Tub with an EngineService and an EngineConnector."""

    def __init__(self, get_furl, on_fatal=None, reference_class=None):
        self.tub = Tub()
        self.tub.startService()
        self.service = EngineService()
        self.fatal = []
        self.connector = EngineConnector(
            self.tub,
            get_furl,
            self.service,
            on_fatal=on_fatal or self.fatal.append,
            initial_delay=0.05,
            max_delay=0.2,
        )
        if reference_class is not None:
            self.connector.reference = reference_class(self.service)
        self.connector.startService()

    async def stop(self):
        if self.connector.running:
            self.connector.stopService()
        self.service.kill()
        if self.tub.running:
            await self.tub.stopService()


@pytest.fixture
def cd(tmp_path):
    return ClusterDir(tmp_path / "cluster").create()


@pytest_twisted.async_yield_fixture
async def pair(cd):
    """A controller and one registered engine."""
    c = Controller(cd)
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL))
    await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
    yield c, e
    await e.stop()
    await c.stop()


def remote(c):
    (engine,) = c.controller.engines.values()
    return engine


@pytest_twisted.ensureDeferred
async def test_engine_registers_and_gets_an_id(pair):
    c, e = pair
    assert list(c.controller.engines) == [0]
    assert e.connector.engine_id == 0
    assert e.service.id == 0
    assert isinstance(remote(c), QueuedEngine)
    assert isinstance(remote(c).engine, EngineFromReference)


@pytest_twisted.ensureDeferred
async def test_remote_engine_provides_engine_interfaces(pair):
    c, _ = pair
    engine = remote(c).engine
    assert verifyObject(IEngineBase, engine)
    assert verifyObject(IEngineInterrupt, engine)
    assert verifyObject(IEngineTasks, engine)


@pytest_twisted.ensureDeferred
async def test_execute_over_the_wire_returns_result_with_output(pair):
    c, _ = pair
    result = await remote(c).execute("a = 6 * 7\nprint(a)")
    assert result["id"] == 0
    assert result["input"] == "a = 6 * 7\nprint(a)"
    assert result["stdout"] == "42\n"
    again = await remote(c).get_result()
    assert again["number"] == result["number"]


@pytest_twisted.ensureDeferred
async def test_serialized_push_pull_stays_opaque(pair):
    c, _ = pair
    engine = remote(c)
    await engine.push_serialized({"x": serialized.serialize({"k": [1, 2]})})
    pulled = await engine.pull_serialized("x")
    assert isinstance(pulled, serialized.Serialized)
    assert serialized.deserialize(pulled) == {"k": [1, 2]}
    both = await engine.pull_serialized(["x", "x"])
    assert [serialized.deserialize(s) for s in both] == [{"k": [1, 2]}] * 2
    assert "x" in await engine.keys()


@pytest_twisted.ensureDeferred
async def test_plain_push_pull_serialize_on_the_calling_side(pair):
    c, _ = pair
    engine = remote(c).engine
    await engine.push({"f": lambda y: y + 1, "v": 3})
    await remote(c).execute("w = f(v)")
    assert await engine.pull("w") == 4
    assert await engine.pull(["v", "w"]) == [3, 4]


@pytest_twisted.ensureDeferred
async def test_large_push_and_pull_of_100_mb(pair):
    c, _ = pair
    engine = remote(c)
    a = np.arange(100 * 2**20 // 8, dtype=np.float64)
    await engine.push_serialized({"a": serialized.serialize(a)})
    await engine.execute("s = float(a.sum())")
    assert serialized.deserialize(await engine.pull_serialized("s")) == float(a.sum())
    back = serialized.deserialize(await engine.pull_serialized("a"))
    assert np.array_equal(back, a)


@pytest_twisted.ensureDeferred
async def test_user_exception_arrives_as_remote_error_with_original(pair):
    c, _ = pair
    with pytest.raises(RemoteError) as info:
        await remote(c).execute("1/0")
    err = info.value
    assert err.ename == "ZeroDivisionError"
    assert err.engine_id == 0
    assert "ZeroDivisionError" in err.traceback
    assert isinstance(err.original(), ZeroDivisionError)


@pytest_twisted.ensureDeferred
async def test_missing_name_on_pull_is_name_error(pair):
    c, _ = pair
    with pytest.raises(RemoteError) as info:
        await remote(c).pull_serialized("nope")
    assert info.value.ename == "NameError"


@pytest_twisted.ensureDeferred
async def test_properties_advertised_and_updated_over_the_wire(cd):
    c = Controller(cd)
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL))
    e.service.properties.update({"gpu": False, "mem": 4})
    await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
    try:
        engine = remote(c)
        assert engine.properties == {"gpu": False, "mem": 4}
        await engine.set_properties({"gpu": True})
        assert await engine.get_properties(["gpu"]) == {"gpu": True}
        assert await engine.has_properties(["gpu", "disk"]) == [True, False]
        assert engine.properties["gpu"] is True
        await engine.del_properties(["mem"])
        assert "mem" not in engine.properties
        await engine.clear_properties()
        assert await engine.get_properties() == {}
    finally:
        await e.stop()
        await c.stop()


class DoubleBody:
    """A task body: doubles ``x`` from the namespace."""

    def run(self, namespace, properties):
        print("running")
        return namespace["x"] * 2


@pytest_twisted.ensureDeferred
async def test_run_task_returns_serialized_result(pair):
    c, _ = pair
    engine = remote(c)
    await engine.push_serialized({"x": serialized.serialize(21)})
    out = await engine.run_task(serialized.serialize(DoubleBody()))
    assert isinstance(out["result"], serialized.Serialized)
    assert serialized.deserialize(out["result"]) == 42
    assert out["stdout"] == "running\n"
    assert out["started"] <= out["completed"]


@pytest_twisted.ensureDeferred
async def test_interrupt_idle_engine_is_false(pair):
    c, _ = pair
    assert await remote(c).interrupt() is False


@pytest_twisted.ensureDeferred
async def test_interrupt_running_command(pair):
    c, _ = pair
    d = remote(c).execute("while True:\n    pass")
    assert await interrupt_when_running(remote(c))
    with pytest.raises(RemoteError) as info:
        await d
    assert info.value.ename == "KeyboardInterrupt"


@pytest_twisted.ensureDeferred
async def test_engine_disconnect_fails_work_with_engine_error(pair):
    c, e = pair
    engine = remote(c)
    running = engine.execute("import time; time.sleep(1)")
    queued = engine.execute("b = 1")
    await task.deferLater(reactor, 0.1, lambda: None)
    await e.tub.stopService()
    for d in (running, queued):
        with pytest.raises(EngineError):
            await d
    assert c.controller.engines == {}
    assert c.registrar.connected_engines() == []


@pytest_twisted.ensureDeferred
async def test_engine_reconnects_to_restarted_controller_keeping_its_id(cd):
    c = Controller(cd)
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL))
    await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
    try:
        # a second engine takes id 1; the first one keeps 0 across the restart
        assert e.connector.engine_id == 0
        furl = c.furl
        await c.stop()
        await wait_until(lambda: e.connector.controller is None)
        c = Controller(cd)
        assert c.furl == furl  # same cert, port and swissnum
        await wait_until(lambda: list(c.controller.engines) == [0])
        # the controller lists the engine a moment before the engine has
        # heard back from its registration call
        await wait_until(lambda: e.connector.registrations == 2)
        result = await remote(c).execute("print(id)")
        assert result["stdout"] == "0\n"
    finally:
        await e.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_engine_retries_until_a_controller_appears(cd):
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL))
    try:
        await task.deferLater(reactor, 0.3, lambda: None)
        assert e.connector.controller is None
        c = Controller(cd)
        try:
            await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
            assert list(c.controller.engines) == [0]
        finally:
            await c.stop()
    finally:
        await e.stop()


class DeafReference(FCEngineReferenceFromService):
    """An engine that never answers heartbeats (like a SIGSTOPped process)."""

    def remote_ping(self):
        return defer.Deferred()


@pytest_twisted.ensureDeferred
async def test_engine_missing_heartbeats_is_unregistered_and_dropped(cd):
    monitor = HeartMonitor(0.1, on_dead=None, max_missed=2)
    c = Controller(cd, monitor)
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL), reference_class=DeafReference)
    try:
        await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
        engine = remote(c)
        d = engine.execute("import time; time.sleep(5)")
        with pytest.raises(EngineError):
            await d.addTimeout(TIMEOUT, reactor)
        # the connection was dropped, so the engine noticed and registered again
        await wait_until(lambda: e.connector.registrations >= 2)
    finally:
        await e.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_answering_engine_survives_heartbeats(cd):
    monitor = HeartMonitor(0.05, on_dead=None, max_missed=2)
    c = Controller(cd, monitor)
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL))
    try:
        await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
        # a command longer than the heartbeat timeout: pings still answer
        await remote(c).execute("import time; time.sleep(0.5)")
        assert list(c.controller.engines) == [0]
        assert e.connector.registrations == 1
    finally:
        await e.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_swissnum_is_refused_and_nothing_registers(cd):
    c = Controller(cd)
    good = c.furl
    bad = good[: good.rindex("/") + 1] + "x" * 32
    e = Engine(lambda: bad)
    try:
        with pytest.raises(ConnectionError, match="refused this engine's FURL"):
            await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
        assert len(e.fatal) == 1
        assert c.controller.engines == {}
    finally:
        await e.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_remote_kill_calls_on_kill(pair):
    c, e = pair
    killed = defer.Deferred()
    e.connector.reference.on_kill = lambda: killed.callback(True)
    await remote(c).engine.kill()
    assert await killed.addTimeout(TIMEOUT, reactor)


def test_engine_error_message_names_engine():
    class Dead:
        def callRemote(self, *a, **k):
            from foolscap.api import DeadReferenceError

            return defer.fail(DeadReferenceError("gone"))

    engine = EngineFromReference(Dead())
    engine.id = 5
    failures = []
    engine.execute("x").addErrback(failures.append)
    assert failures[0].check(EngineError)
    assert "engine 5 disconnected" in failures[0].getErrorMessage()


@pytest_twisted.ensureDeferred
async def test_output_streams_to_controller_while_command_runs(pair):
    c, e = pair
    seen = []
    c.registrar.add_output_observer(lambda *chunk: seen.append(chunk))
    # the first observer makes the controller hand the engine a sink
    await wait_until(lambda: e.connector.reference._sink is not None)
    d = remote(c).execute(
        "import sys, time\nprint('started')\nsys.stderr.write('warn')\ntime.sleep(2)\nprint('done')"
    )
    await wait_until(lambda: (0, "stdout", "started\n") in seen)
    assert (0, "stderr", "warn") in seen
    assert not d.called  # still running: the output was streamed, not returned
    result = await d
    assert result["stdout"] == "started\ndone\n"  # the result still carries all of it
    await wait_until(lambda: (0, "stdout", "done\n") in seen)


@pytest_twisted.ensureDeferred
async def test_output_observer_gets_output_of_engines_registering_later(cd):
    c = Controller(cd)
    seen = []
    c.registrar.add_output_observer(lambda *chunk: seen.append(chunk))
    e = Engine(lambda: cd.read_furl(clusterdir.ENGINE_FURL))
    try:
        await e.connector.when_registered().addTimeout(TIMEOUT, reactor)
        await remote(c).execute("print('hello')")
        await wait_until(lambda: (0, "stdout", "hello\n") in seen)
    finally:
        await e.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_no_output_is_streamed_without_observers(pair):
    c, e = pair
    await remote(c).execute("print('quiet')")
    assert e.connector.reference._sink is None
