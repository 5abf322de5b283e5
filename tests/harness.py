"""The in-process cluster: a ControllerService and engines in this process.

:class:`InProcessHarness` follows :class:`tests.contract.ClusterHarness`: the
contract mixins run against it unchanged. Front ends are built in
:meth:`InProcessHarness._build_frontends` (one place each front end's
engineer extends); :func:`inprocess_cluster` is a ready-made pytest fixture.

Modules that run a contract on a cluster of real processes share one per
module: :func:`module_processes` makes the ``processes`` fixture and
:class:`OnModuleProcesses` gives the contract class its ``cluster`` from it.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import DeferredList, maybeDeferred

from kernel.controllerservice import ControllerService
from kernel.engineservice import EngineService, QueuedEngine

#: How long stop() waits for engine threads to exit (seconds).
STOP_TIMEOUT = 10


class InProcessHarness:
    """A controller and ``n_engines`` in-process engines.

    Each engine is a ``QueuedEngine(EngineService())`` registered with the
    controller, as a network adapter would register a remote engine.

    :ivar controller: the :class:`ControllerService`.
    :ivar multiengine: one client's ISynchronousMultiEngine (None until
        kernel/multiengine.py lands; built in :meth:`_build_frontends`).
    :ivar other_multiengine: a second, independent client's (likewise).
    :ivar task_controller: the ITaskController (None until kernel/task.py
        lands; built in :meth:`_build_frontends`).
    """

    def __init__(self, n_engines: int = 4):
        self.n_engines = n_engines
        self.controller = ControllerService()
        #: every EngineService this harness started, by engine id
        self.engine_services: dict[int, EngineService] = {}
        self.multiengine = None
        self.other_multiengine = None
        self.task_controller = None

    @classmethod
    async def start(cls, n_engines: int = 4) -> InProcessHarness:
        """Build and start a cluster of ``n_engines`` engines."""
        harness = cls(n_engines)
        harness.controller.startService()
        for _ in range(n_engines):
            await harness.add_engine()
        harness._build_frontends()
        return harness

    def _build_frontends(self) -> None:
        """Construct the front ends over ``self.controller``.

        The multiengine and task front ends add their construction here, e.g.
        ``self.multiengine = SynchronousMultiEngine(MultiEngine(self.controller))``.
        """
        from kernel.multiengine import MultiEngine, SynchronousMultiEngine

        # kill(controller=True) stops the controller service, not the reactor.
        self.multiengine_core = MultiEngine(
            self.controller, stop_controller=self.controller.stopService
        )
        # One SynchronousMultiEngine per client: each keeps its own pending results.
        self.multiengine = SynchronousMultiEngine(self.multiengine_core)
        self.other_multiengine = SynchronousMultiEngine(self.multiengine_core)
        from kernel.taskcontroller import TaskController

        self.task_controller = TaskController(self.controller)

    async def _reset_frontends(self) -> None:
        """Clear front-end state between tests (pending results, tasks);
        extended by the front ends as they land."""
        for me in (self.multiengine, self.other_multiengine):
            if me is not None:
                await me.clear_pending_deferreds()
        if self.task_controller is not None:
            from tests.contract.task import forget_all_tasks

            await forget_all_tasks(self.task_controller)

    async def add_engine(self) -> int:
        """Start one more engine; return its id once it is registered."""
        engine = EngineService()
        queued = QueuedEngine(engine)
        engine_id = self.controller.register_engine(queued)["id"]
        self.engine_services[engine_id] = engine
        # A killed engine leaves the controller, as an engine process does
        # when it exits and its connection drops.
        from twisted.internet import reactor

        engine.on_kill(reactor.callLater, 0, self._forget_killed, engine_id, queued)
        return engine_id

    def _forget_killed(self, engine_id: int, queued: QueuedEngine) -> None:
        if self.controller.engines.get(engine_id) is queued:
            self.controller.unregister_engine(engine_id)

    async def kill_engine(self, engine_id: int) -> None:
        """Make engine ``engine_id`` fail like a lost connection: the
        controller unregisters it (its queued work fails with EngineError)
        and its thread is stopped."""
        self.controller.unregister_engine(engine_id)
        engine = self.engine_services.pop(engine_id, None)
        if engine is not None:
            await engine.kill()

    async def reset(self) -> None:
        """Restore ``n_engines`` engines with empty namespaces, queues and
        properties, and reset the front ends."""
        await self._reset_frontends()
        while len(self.controller.engines) < self.n_engines:
            await self.add_engine()
        work = []
        for engine in list(self.controller.engines.values()):
            await engine.clear_queue()
            work.append(engine.reset())
            work.append(engine.clear_properties())
        await DeferredList(work, fireOnOneErrback=True, consumeErrors=True)

    async def stop(self) -> None:
        """Unregister and stop every engine, wait for their threads, stop
        the controller."""
        for engine_id in list(self.controller.engines):
            self.controller.unregister_engine(engine_id)
        waits = []
        for engine in self.engine_services.values():
            await engine.kill()
            waits.append(engine.when_stopped())
        self.engine_services.clear()
        from twisted.internet import reactor

        await DeferredList(waits).addTimeout(STOP_TIMEOUT, reactor)
        await maybeDeferred(self.controller.stopService)


@pytest_twisted.async_yield_fixture
async def inprocess_cluster():
    """A fresh 4-engine :class:`InProcessHarness`, stopped after the test.

    Use it in a test module with ``from tests.harness import inprocess_cluster``
    (pytest picks up the imported fixture), or wrap it in a ``cluster``
    fixture for a contract mixin.
    """
    harness = await InProcessHarness.start(n_engines=4)
    try:
        await harness.reset()
        yield harness
    finally:
        await harness.stop()


def module_processes(harness_class: Any, n_engines: int = 4) -> Any:
    """A module-scoped pytest fixture: one ``harness_class`` cluster (a
    controller process and ``n_engines`` engine processes, started with
    ``await harness_class.start(n_engines=...)``) shared by the module's
    tests and stopped after the last. Assign it to ``processes`` in a test
    module."""

    @pytest_twisted.async_yield_fixture(scope="module")
    async def processes() -> Any:
        harness = await harness_class.start(n_engines=n_engines)
        try:
            yield harness
        finally:
            await harness.stop()

    return processes


class OnModuleProcesses:
    """Mixed into a contract class: each test's ``cluster`` is the module's
    ``processes`` fixture (see :func:`module_processes`), reset first."""

    @pytest_twisted.async_yield_fixture
    async def cluster(self, processes: Any) -> Any:
        await processes.reset()
        yield processes
