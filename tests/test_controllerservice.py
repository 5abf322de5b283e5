"""ControllerService: the controller contract in process, and the harness."""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.application.service import IService
from twisted.internet.defer import DeferredList
from zope.interface.verify import verifyObject

from kernel.controllerservice import ControllerService
from kernel.engineservice import EngineService, QueuedEngine
from kernel.error import EngineError
from kernel.interfaces import IControllerCore
from tests.contract.controller import ControllerContract
from tests.contract.engine import WAIT, failure_of
from tests.harness import InProcessHarness, inprocess_cluster  # noqa: F401 - fixture


class TestControllerService(ControllerContract):
    @pytest_twisted.async_yield_fixture
    async def controller(self):
        controller = ControllerService()
        controller.startService()
        yield controller
        for engine_id in list(controller.engines):
            controller.unregister_engine(engine_id)
        await controller.stopService()

    @pytest_twisted.async_yield_fixture
    async def make_engine(self):
        made = []

        def make():
            engine = EngineService()
            made.append(engine)
            return QueuedEngine(engine)

        yield make
        from twisted.internet import reactor

        for engine in made:
            await engine.kill()
            await engine.when_stopped().addTimeout(WAIT, reactor)


def test_controller_service_provides_its_interfaces():
    controller = ControllerService()
    assert verifyObject(IControllerCore, controller)
    assert verifyObject(IService, controller)


def test_register_keeps_connection_info():
    controller = ControllerService()

    class Stub:
        id = None

    controller.register_engine(Stub(), ip="10.0.0.1", port=5, pid=42)
    assert controller.engine_info[0] == {"ip": "10.0.0.1", "port": 5, "pid": 42}
    controller.unregister_engine(0)
    assert controller.engine_info == {}


def test_engine_objects_without_lost_unregister_quietly():
    controller = ControllerService()
    seen = []
    controller.on_unregister_engine_do(seen.append, False, "gone")

    class Stub:
        id = None

    controller.register_engine(Stub())
    controller.unregister_engine(0)
    assert seen == ["gone"]


# -- the in-process harness ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_harness_starts_n_engines_that_run_code(inprocess_cluster):  # noqa: F811
    cluster = inprocess_cluster
    assert sorted(cluster.controller.engines) == [0, 1, 2, 3]
    results = await DeferredList(
        [e.execute("x = id * 10") for e in cluster.controller.engines.values()],
        fireOnOneErrback=True,
    )
    assert all(ok for ok, _ in results)
    pulled = [await cluster.controller.engines[i].pull("x") for i in range(4)]
    assert pulled == [0, 10, 20, 30]


@pytest_twisted.ensureDeferred
async def test_harness_kill_engine_fails_its_work_and_reset_restores(inprocess_cluster):  # noqa: F811
    cluster = inprocess_cluster
    engine = cluster.controller.engines[1]
    ev = threading.Event()
    await engine.push({"ev": ev})
    running = engine.execute("ev.wait(20)")
    queued = engine.execute("y = 1")
    await cluster.kill_engine(1)
    ev.set()
    for d in (running, queued):
        f = await failure_of(d)
        assert f.check(EngineError)
        assert "engine 1" in str(f.value)
    assert sorted(cluster.controller.engines) == [0, 2, 3]
    await cluster.reset()
    assert len(cluster.controller.engines) == 4


@pytest_twisted.ensureDeferred
async def test_harness_add_engine_and_reset_clear_state(inprocess_cluster):  # noqa: F811
    cluster = inprocess_cluster
    new_id = await cluster.add_engine()
    assert new_id == 4
    engine = cluster.controller.engines[0]
    await engine.push({"leftover": 1})
    await engine.set_properties({"p": 1})
    await cluster.reset()
    assert await engine.keys() == ["id"]
    assert await engine.get_properties() == {}


@pytest_twisted.ensureDeferred
async def test_harness_stop_stops_every_engine_thread():
    cluster = await InProcessHarness.start(n_engines=2)
    for engine in cluster.controller.engines.values():
        await engine.execute("pass")
    threads = [e.thread for e in cluster.engine_services.values()]
    await cluster.stop()
    assert cluster.controller.engines == {}
    assert not any(t.is_alive() for t in threads)
    assert not cluster.controller.running


@pytest_twisted.ensureDeferred
async def test_harness_engine_killed_through_its_interface_leaves_the_controller(
    inprocess_cluster,  # noqa: F811
):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    cluster = inprocess_cluster
    await cluster.controller.engines[2].kill()
    await deferLater(reactor, 0.01, lambda: None)
    assert sorted(cluster.controller.engines) == [0, 1, 3]
    await cluster.reset()
    assert sorted(cluster.controller.engines) == [0, 1, 2, 3]
