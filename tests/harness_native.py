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

from kernel import multienginenative, nativeproto, tasknative
from kernel.enginenative import NativeEngineConnector, NativeEngineRegistrar
from tests.harness_fc import FoolscapHarness
from tests.harness_loopback import TIMEOUT, AdapterLoopback


class NativeLoopback(AdapterLoopback):
    """A controller core with a native listener (TLS with ``tls=True``), and
    in-process engines over it (see :class:`AdapterLoopback`)."""

    registrar_class = NativeEngineRegistrar
    connector_class = NativeEngineConnector
    multiengine_module = multienginenative
    task_module = tasknative
    prefix = "txkernel-native-"

    def listen(self, tls: bool = False):
        return nativeproto.serve_controller(
            self.cd, self.registrar, self.multiengine_core, self.task_core, tls=tls
        )

    def read_info(self) -> dict:
        return nativeproto.read_connection_info(self.cd)


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
