"""Clusters whose engines and clients talk to the controller over the native transport.

:class:`NativeHarness` is the real thing: a controller process and engine
processes started with ``--adapter native`` by :mod:`kernel.testing.processes`,
clients connecting with the cluster key of the cluster directory's
``native.json``. The contract suites run on it, one cluster per test module.

:class:`NativeLoopback` keeps the controller's core and its native listener in
the test process, with in-process engines that register over the native
transport on loopback: the whole wire path (handshake, frames, both adapter
halves) without process start-up, for the adapters' own tests.
"""

from __future__ import annotations

import tempfile

from twisted.internet import defer, reactor

from kernel import multienginenative, nativeproto, tasknative
from kernel.clusterdir import ClusterDir
from kernel.controllerservice import ControllerService
from kernel.enginenative import NativeEngineConnector, NativeEngineRegistrar
from kernel.engineservice import EngineService
from kernel.multiengine import MultiEngine
from kernel.taskcontroller import TaskController
from tests.harness_fc import FoolscapHarness

#: Bound on each wait in these harnesses, seconds.
TIMEOUT = 30


class NativeLoopback:
    """A controller core with a native listener, and in-process engines over it.

    :ivar cd: the (temporary) cluster directory holding ``native.json``.
    :ivar controller: the :class:`ControllerService`.
    :ivar registrar: the engine registrar the engines reach over the wire.
    :ivar connectors: ``{engine id: NativeEngineConnector}`` of the engines started here.
    """

    def __init__(self, cluster_dir: str | None = None, tls: bool = False):
        self.cd = ClusterDir(cluster_dir or tempfile.mkdtemp(prefix="txkernel-native-")).create()
        self.controller = ControllerService()
        self.multiengine_core = MultiEngine(self.controller, stop_controller=lambda: None)
        self.task_core = TaskController(self.controller)
        self.registrar = NativeEngineRegistrar(self.controller)
        self.listeners = nativeproto.serve_controller(
            self.cd, self.registrar, self.multiengine_core, self.task_core, tls=tls
        )
        self.connectors: dict[int, NativeEngineConnector] = {}
        self.engines: dict[int, EngineService] = {}
        self.clients: list = []

    @classmethod
    async def start(
        cls, n_engines: int = 2, cluster_dir: str | None = None, tls: bool = False
    ) -> NativeLoopback:
        """Start the listener (TLS with ``tls``) and ``n_engines`` engines
        (registered on return)."""
        loop = cls(cluster_dir, tls)
        loop.controller.startService()
        loop.task_core.startService()
        loop.listeners.startService()
        for _ in range(n_engines):
            await loop.add_engine()
        return loop

    @property
    def info(self) -> dict:
        """The content of ``native.json``."""
        return nativeproto.read_connection_info(self.cd)

    async def add_engine(self, info: dict | None = None, on_fatal=None) -> int:
        """Start an in-process engine that registers over the wire; fire its id."""
        engine = EngineService()
        connector = NativeEngineConnector(
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

    async def multiengine(self) -> multienginenative.NativeFullSynchronousMultiEngineClient:
        """A new multiengine client (its own connection and session)."""
        client = await multienginenative.get_multiengine_client(self.cd.path)
        self.clients.append(client)
        return client

    async def task_client(self) -> tasknative.NativeTaskClient:
        """A new task client (its own connection)."""
        client = await tasknative.get_task_client(self.cd.path)
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
        """Disconnect everything and stop the engines and the listener."""
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
        from twisted.internet import task

        await task.deferLater(reactor, 0.05, lambda: None)


class NativeHarness(FoolscapHarness):
    """A controller process and engine processes over the native transport.

    Follows :class:`tests.contract.ClusterHarness` (the process handling,
    ``add_engine``, ``kill_engine`` and ``reset`` are
    :class:`~tests.harness_fc.FoolscapHarness`'s). Every process runs with
    ``--adapter native``; each client has its own connection.

    :ivar multiengine: one client's NativeFullSynchronousMultiEngineClient.
    :ivar other_multiengine: a second client's (another connection and session).
    :ivar task_controller: a NativeTaskClient.
    """

    def __init__(self, n_engines: int = 4, **cluster_kwargs):
        cluster_kwargs.setdefault("controller_args", [])
        cluster_kwargs.setdefault("engine_args", [])
        cluster_kwargs["controller_args"] = [
            "--adapter=native",
            *cluster_kwargs["controller_args"],
        ]
        cluster_kwargs["engine_args"] = ["--adapter=native", *cluster_kwargs["engine_args"]]
        super().__init__(n_engines, **cluster_kwargs)
        self.clients: list = []

    async def connect(self, kind: str):
        """A new client (``multiengine`` or ``task``) on a new connection."""
        factory = {
            "multiengine": multienginenative.get_multiengine_client,
            "task": tasknative.get_task_client,
        }[kind]
        client = await factory(self.cluster.cluster_dir.path, timeout=TIMEOUT)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        """Disconnect the clients and stop every process by pid."""
        for client in self.clients:
            client.disconnect()
        self.clients.clear()
        await super().stop()
