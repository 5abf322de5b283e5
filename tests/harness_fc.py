"""Clusters whose clients talk to the controller over Foolscap.

:class:`FoolscapHarness` is the real thing: a controller process and engine
processes started with :mod:`kernel.testing.processes`, clients connected
through the cluster directory's connection files. The contract suites run on
it, one cluster per test module.

:class:`FoolscapLoopbackHarness` keeps the controller and engines in the test
process (an :class:`~tests.harness.InProcessHarness`) and puts only the client
adapters on the wire: quick, and it isolates the client halves for the
adapters' own tests.
"""

from __future__ import annotations

from foolscap.api import Tub

from kernel import multienginefc, taskfc
from tests.fcloopback import Loopback
from tests.harness import InProcessHarness


class _InProcessOutput:
    """Streamed output of a harness's in-process engines, as the controller's
    engine registrar offers it: ``observer(engine_id, stream_name, text)``."""

    def __init__(self, harness: InProcessHarness):
        self.harness = harness
        self._adapters: dict = {}

    def add_output_observer(self, observer) -> None:
        pairs = []
        for engine_id, engine in self.harness.engine_services.items():

            def adapter(stream_name, text, engine_id=engine_id):
                observer(engine_id, stream_name, text)

            engine.add_output_observer(adapter)
            pairs.append((engine, adapter))
        self._adapters[observer] = pairs

    def remove_output_observer(self, observer) -> None:
        for engine, adapter in self._adapters.pop(observer, []):
            engine.remove_output_observer(adapter)


class FoolscapLoopbackHarness(InProcessHarness):
    """In-process controller and engines; clients over Foolscap on loopback."""

    def __init__(self, n_engines: int = 4):
        super().__init__(n_engines)
        self.loopback: Loopback | None = None

    @classmethod
    async def start(cls, n_engines: int = 4) -> FoolscapLoopbackHarness:
        harness = await super().start(n_engines)
        await harness._connect_clients()
        return harness

    async def _connect_clients(self) -> None:
        self.loopback = Loopback()
        self.output = _InProcessOutput(self)
        ref = await self.loopback.reference(
            multienginefc.make_client_referenceable(self.multiengine_core, output=self.output)
        )
        self.multiengine = multienginefc.FCFullSynchronousMultiEngineClient(ref)
        # A second client: its own Tub, as another process would have.
        other_tub = Tub()
        other_tub.startService()
        self._other_tub = other_tub
        furl = self.loopback.server.registerReference(
            multienginefc.make_client_referenceable(self.multiengine_core)
        )
        self.other_multiengine = multienginefc.FCFullSynchronousMultiEngineClient(
            await other_tub.getReference(furl)
        )

        self.task_core = self.task_controller
        if self.task_core is None:
            from kernel.taskcontroller import TaskController

            self.task_core = TaskController(self.controller)
        self.task_controller = taskfc.FCTaskClient(
            await self.loopback.reference(taskfc.FCTaskControllerFromTaskController(self.task_core))
        )

    async def stop(self) -> None:
        try:
            await self._other_tub.stopService()
            if self.loopback is not None:
                await self.loopback.stop()
        finally:
            await super().stop()


class FoolscapHarness:
    """A controller process and engine processes; clients over Foolscap.

    Follows :class:`tests.contract.ClusterHarness`. The processes are a
    :class:`~kernel.testing.processes.LocalCluster` (temp cluster directory,
    ephemeral loopback ports, every process stopped by pid); the clients find
    it through the connection files, as users' clients do, each from its own
    Tub.

    :ivar cluster: the LocalCluster.
    :ivar multiengine: one client's FCFullSynchronousMultiEngineClient.
    :ivar other_multiengine: a second client's (another Tub, another session).
    :ivar task_controller: an FCTaskClient.
    """

    def __init__(self, n_engines: int = 4, **cluster_kwargs):
        from kernel.testing.processes import LocalCluster

        self.n_engines = n_engines
        # Killed engines are noticed by their lost connections, not by missed
        # heartbeats; a long period keeps a large transfer (whose bytes hold up
        # the heartbeat on the same connection) from passing for a dead engine.
        cluster_kwargs.setdefault("heartbeat", 5.0)
        # Foolscap is not the default on loopback: ask for it.
        cluster_kwargs.setdefault("controller_args", ["--adapter=fc"])
        self.cluster = LocalCluster(**cluster_kwargs)
        self.tubs: list[Tub] = []
        self.multiengine = None
        self.other_multiengine = None
        self.task_controller = None

    @classmethod
    async def start(cls, n_engines: int = 4, **cluster_kwargs) -> FoolscapHarness:
        """Start the processes and connect the clients."""
        harness = cls(n_engines, **cluster_kwargs)
        try:
            await harness.cluster.start_async(n_engines)
            harness.multiengine = await harness.connect("multiengine")
            harness.other_multiengine = await harness.connect("multiengine")
            harness.task_controller = await harness.connect("task")
        except BaseException:
            await harness.stop()
            raise
        return harness

    async def connect(self, kind: str):
        """A new client (``multiengine`` or ``task``) from a new Tub."""
        from kernel import asyncclient

        tub = Tub()
        tub.startService()
        self.tubs.append(tub)
        factory = {
            "multiengine": asyncclient.get_multiengine_client,
            "task": asyncclient.get_task_client,
        }[kind]
        return await factory(cluster_dir=self.cluster.cluster_dir.path, tub=tub)

    def engine_pids(self) -> dict[int, int]:
        """``{engine id: pid}`` of the registered engines."""
        return self.cluster.registered()

    async def add_engine(self) -> int:
        """Start one more engine process; return its id once it is registered."""
        from kernel.testing.processes import wait_for_async

        before = set(self.cluster.registered())
        self.cluster.start_engine()

        def new_id():
            fresh = set(self.cluster.registered()) - before
            return min(fresh) + 1 if fresh else None  # +1: id 0 is a valid answer

        found = await wait_for_async(
            new_id,
            self.cluster.timeout,
            lambda: f"a new engine to register:\n{self.cluster.logs()}",
        )
        return found - 1

    async def kill_engine(self, engine_id: int) -> None:
        """SIGKILL the engine's process; return once the controller unregistered it."""
        self.cluster.kill_engine(engine_id)
        await self.cluster.wait_until_unregistered_async(engine_id)

    async def reset(self) -> None:
        """Restore ``n_engines`` engines with empty namespaces, queues and
        properties; no pending results and no tasks."""
        from tests.contract.task import forget_all_tasks

        for me in (self.multiengine, self.other_multiengine):
            await me.clear_pending_deferreds()
        await forget_all_tasks(self.task_controller)
        while len(self.cluster.registered()) < self.n_engines:
            await self.add_engine()
        await self.multiengine.clear_queue()
        await self.multiengine.reset()
        await self.multiengine.clear_properties()

    async def stop(self) -> None:
        """Disconnect the clients and stop every process by pid."""
        for tub in self.tubs:
            if tub.running:
                await tub.stopService()
        self.tubs.clear()
        self.cluster.stop()
