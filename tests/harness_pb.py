"""Clusters whose engines and clients talk to the controller over PB.

:class:`PBHarness` is the real thing: a controller process and engine
processes started with ``--adapter pb`` by :mod:`kernel.testing.processes`,
clients logging in with the secrets of the cluster directory's ``pb.json``.
The contract suites run on it, one cluster per test module.

:class:`PBLoopback` keeps the controller's core and its PB listeners in the
test process, with in-process engines that register over PB on loopback: the
whole PB path (cred, chunking, both adapters) without process start-up, for
the adapters' own tests.
"""

from __future__ import annotations

from kernel import multienginepb, pbutil, taskpb
from kernel.enginefc import FCEngineRegistrar
from kernel.enginepb import PBEngineConnector
from tests.harness_fc import FoolscapHarness
from tests.harness_loopback import TIMEOUT, AdapterLoopback


class PBLoopback(AdapterLoopback):
    """A controller core with PB listeners, and in-process engines over PB
    (see :class:`AdapterLoopback`)."""

    registrar_class = FCEngineRegistrar
    connector_class = PBEngineConnector
    multiengine_module = multienginepb
    task_module = taskpb
    prefix = "txkernel-pb-"

    def listen(self):
        return pbutil.serve_controller(
            self.cd, self.registrar, self.multiengine_core, self.task_core
        )

    def read_info(self) -> dict:
        return pbutil.read_connection_info(self.cd)


class PBHarness(FoolscapHarness):
    """A controller process and engine processes over PB; clients over PB.

    Follows :class:`tests.contract.ClusterHarness` (the process handling,
    ``add_engine``, ``kill_engine`` and ``reset`` are
    :class:`~tests.harness_fc.FoolscapHarness`'s). Every process runs with
    ``--adapter pb``; each client logs in on its own connection.

    :ivar multiengine: one client's PBFullSynchronousMultiEngineClient.
    :ivar other_multiengine: a second client's (another connection and session).
    :ivar task_controller: a PBTaskClient.
    """

    def __init__(self, n_engines: int = 4, **cluster_kwargs):
        cluster_kwargs.setdefault("controller_args", [])
        cluster_kwargs.setdefault("engine_args", [])
        cluster_kwargs["controller_args"] = ["--adapter=pb", *cluster_kwargs["controller_args"]]
        cluster_kwargs["engine_args"] = ["--adapter=pb", *cluster_kwargs["engine_args"]]
        super().__init__(n_engines, **cluster_kwargs)
        self.clients: list = []

    async def connect(self, kind: str):
        """A new client (``multiengine`` or ``task``) on a new PB connection."""
        factory = {
            "multiengine": multienginepb.get_multiengine_client,
            "task": taskpb.get_task_client,
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
