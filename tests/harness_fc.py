"""Clusters whose clients talk to the controller over Foolscap.

:class:`FoolscapLoopbackHarness` keeps the controller and engines in the test
process (an :class:`~tests.harness.InProcessHarness`) and puts only the client
adapters on the wire: quick, and it isolates the client halves.
"""

from __future__ import annotations

from foolscap.api import Tub
from twisted.internet import reactor

from kernel import multienginefc
from tests.fcloopback import Loopback
from tests.harness import InProcessHarness


class FoolscapLoopbackHarness(InProcessHarness):
    """In-process controller and engines; clients over Foolscap on loopback.

    Engines killed with the multiengine ``kill`` leave the controller as an
    engine process does when its connection drops.
    """

    def __init__(self, n_engines: int = 4):
        super().__init__(n_engines)
        self.loopback: Loopback | None = None

    async def add_engine(self) -> int:
        engine_id = await super().add_engine()
        engine = self.engine_services[engine_id]
        engine.on_kill(reactor.callLater, 0, self._forget, engine_id, engine)
        return engine_id

    def _forget(self, engine_id: int, engine) -> None:
        queued = self.controller.engines.get(engine_id)
        if queued is not None and queued.engine is engine:
            self.controller.unregister_engine(engine_id)

    @classmethod
    async def start(cls, n_engines: int = 4) -> FoolscapLoopbackHarness:
        harness = await super().start(n_engines)
        await harness._connect_clients()
        return harness

    async def _connect_clients(self) -> None:
        self.loopback = Loopback()
        ref = await self.loopback.reference(
            multienginefc.make_client_referenceable(self.multiengine_core)
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

    async def stop(self) -> None:
        try:
            await self._other_tub.stopService()
            if self.loopback is not None:
                await self.loopback.stop()
        finally:
            await super().stop()
