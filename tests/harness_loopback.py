"""The in-process loopback harness shared by the PB and native transports.

A controller core with its listeners in the test process, and in-process
engines that register over the transport on loopback: the whole wire path
without process start-up. A subclass names its transport's pieces.
"""

from __future__ import annotations

import tempfile
from typing import Any

from twisted.internet import defer, reactor, task

from kernel.clusterdir import ClusterDir
from kernel.controllerservice import ControllerService
from kernel.engineservice import EngineService
from kernel.multiengine import MultiEngine
from kernel.taskcontroller import TaskController

#: Bound on each wait in these harnesses, seconds.
TIMEOUT = 30


class AdapterLoopback:
    """A controller core with a transport's listeners, and in-process engines.

    Subclasses set :attr:`registrar_class`, :attr:`connector_class`,
    :attr:`multiengine_module` and :attr:`task_module` (each with a
    ``get_*_client(cluster_dir)``), and implement :meth:`listen` and
    :meth:`read_info`.

    :ivar cd: the (temporary) cluster directory holding the connection file.
    :ivar controller: the :class:`ControllerService`.
    :ivar registrar: the engine registrar the engines reach over the wire.
    :ivar connectors: ``{engine id: connector}`` of the engines started here.
    """

    registrar_class: Any
    connector_class: Any
    multiengine_module: Any
    task_module: Any
    prefix = "txkernel-loopback-"

    def __init__(self, cluster_dir: str | None = None, **options: Any):
        self.cd = ClusterDir(cluster_dir or tempfile.mkdtemp(prefix=self.prefix)).create()
        self.controller = ControllerService()
        self.multiengine_core = MultiEngine(self.controller, stop_controller=lambda: None)
        self.task_core = TaskController(self.controller)
        self.registrar = self.registrar_class(self.controller)
        self.listeners = self.listen(**options)
        self.connectors: dict[int, Any] = {}
        self.engines: dict[int, EngineService] = {}
        self.clients: list = []

    def listen(self, **options: Any) -> Any:
        """The controller's listeners (a service, not yet started)."""
        raise NotImplementedError

    def read_info(self) -> dict:
        """The content of the cluster directory's connection file."""
        raise NotImplementedError

    @classmethod
    async def start(cls, n_engines: int = 2, cluster_dir: str | None = None, **options: Any):
        """Start the listeners and ``n_engines`` engines (registered on return)."""
        loop = cls(cluster_dir, **options)
        loop.controller.startService()
        loop.task_core.startService()
        loop.listeners.startService()
        for _ in range(n_engines):
            await loop.add_engine()
        return loop

    @property
    def info(self) -> dict:
        """The content of the connection file."""
        return self.read_info()

    async def add_engine(self, info: dict | None = None, on_fatal=None) -> int:
        """Start an in-process engine that registers over the wire; fire its id."""
        engine = EngineService()
        connector = self.connector_class(
            (lambda: info) if info is not None else (lambda: self.info),
            engine,
            on_fatal=on_fatal,
            initial_delay=0.05,
            max_delay=0.5,
        )
        connector.startService()
        try:
            engine_id = await connector.when_registered().addTimeout(TIMEOUT, reactor)
        except BaseException:
            connector.stopService()
            await engine.kill()
            raise
        self.connectors[engine_id] = connector
        self.engines[engine_id] = engine
        return engine_id

    async def multiengine(self) -> Any:
        """A new multiengine client (its own connection and session)."""
        client = await self.multiengine_module.get_multiengine_client(self.cd.path)
        self.clients.append(client)
        return client

    async def task_client(self) -> Any:
        """A new task client (its own connection)."""
        client = await self.task_module.get_task_client(self.cd.path)
        self.clients.append(client)
        return client

    async def wait_unregistered(self, engine_id: int) -> None:
        """Wait (bounded) until the controller no longer has ``engine_id``."""
        from kernel.testing.processes import wait_for_async

        await wait_for_async(
            lambda: engine_id not in self.controller.engines,
            TIMEOUT,
            f"engine {engine_id} to be unregistered",
        )

    async def stop(self) -> None:
        """Disconnect everything and stop the engines and the listeners."""
        for client in self.clients:
            client.disconnect()
        for engine_id, connector in self.connectors.items():
            connector.stopService()
            if connector.controller is not None:
                connector.controller.disconnect()
            await self.engines[engine_id].kill()
        await defer.maybeDeferred(self.listeners.stopService)
        await defer.maybeDeferred(self.task_core.stopService)
        await defer.maybeDeferred(self.controller.stopService)
        # let the closed connections' callbacks run before the next test
        await task.deferLater(reactor, 0.05, lambda: None)
