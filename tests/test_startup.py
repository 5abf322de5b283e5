"""Starting clusters with the defaults, real processes: the native transport
on loopback, engines that import no Foolscap, engines that find a controller
started after them."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from kernel import asyncclient
from kernel.testing.processes import LocalCluster

#: Bound on every wait, seconds.
WAIT = 60


@pytest_twisted.ensureDeferred
async def test_a_default_cluster_serves_native_and_its_engines_never_import_foolscap():
    cluster = LocalCluster()
    try:
        await cluster.start_async(2)
        assert cluster.cluster_dir.served_adapter() == "native"
        mec = await asyncclient.get_multiengine_client(
            cluster_dir=cluster.cluster_dir.path, timeout=WAIT
        )
        # Several kinds of inbound call first: commands, data, properties.
        await mec.push({"a": [1, 2]}, targets="all", block=True).addTimeout(WAIT, reactor)
        assert await mec.pull("a", targets="all", block=True).addTimeout(WAIT, reactor) == [
            [1, 2],
            [1, 2],
        ]
        await mec.execute(
            "import sys\nfc = sorted(m for m in sys.modules if m.split('.')[0] == 'foolscap')",
            targets="all",
            block=True,
        ).addTimeout(WAIT, reactor)
        loaded = await mec.pull("fc", targets="all", block=True).addTimeout(WAIT, reactor)
        assert loaded == [[], []]
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["native", "fc"])
def test_an_engine_started_before_its_controller_uses_the_adapter_it_then_serves(adapter):
    cluster = LocalCluster(controller_args=[f"--adapter={adapter}"])
    try:
        engine = cluster.start_engine()  # no --adapter, no connection files yet
        cluster.start_controller()
        registered = cluster.wait_for_engines(1)
        assert list(registered.values()) == [engine.pid]
        assert f"the controller serves {adapter}" in engine.log(200)
    finally:
        cluster.stop()
