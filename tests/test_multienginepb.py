"""The multiengine contract over PB, and the adapter's own behaviour."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kernel import multienginepb, pbutil
from kernel.error import CompositeError, ConnectionError, InvalidResultNumber, SecurityError
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from tests.contract.multiengine import MultiEngineContract
from tests.harness import OnModuleProcesses, module_processes
from tests.harness_pb import PBHarness, PBLoopback

#: One controller process and four engine processes (``--adapter pb``).
processes = module_processes(PBHarness)


@pytest.mark.slow
class TestMultiEnginePB(OnModuleProcesses, MultiEngineContract):
    """Every multiengine contract test over PB, engines in their own processes."""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_wrong_client_secret_is_refused_by_a_controller_process(processes):
    info = pbutil.read_connection_info(processes.cluster.cluster_dir)
    bad = dict(info, client_secret=pbutil.generate_secret())
    with pytest.raises(SecurityError, match="refused the PB credentials"):
        await multienginepb.get_multiengine_client(info=bad)


# -- the adapter itself, in process --------------------------------------------


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await PBLoopback.start(n_engines=2, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def test_client_half_provides_the_multiengine_interfaces():
    client = multienginepb.PBFullSynchronousMultiEngineClient(remote_reference=None)
    verifyObject(ISynchronousMultiEngine, client)
    verifyObject(IMultiEngineCoordinator, client)
    verifyObject(IMultiEngineExtras, client)
    verifyObject(IBlockingClientAdaptor, client)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_100_mb_push_and_pull_work_over_pb(loop):
    """Far over banana's 640 KiB limit, through the controller and back."""
    mec = await loop.multiengine()
    target = [sorted(loop.controller.engines)[0]]
    data = np.random.default_rng(0).integers(0, 255, size=100 * 2**20, dtype=np.uint8)
    await mec.push({"big": data}, targets=target)
    await mec.execute("import hashlib; h = hashlib.sha256(big.tobytes()).hexdigest()", target)
    assert await mec.pull("h", targets=target) == [hashlib.sha256(data.tobytes()).hexdigest()]
    (back,) = await mec.pull("big", targets=target)
    np.testing.assert_array_equal(back, data)


@pytest_twisted.ensureDeferred
async def test_large_text_output_and_source_cross_pb(loop):
    mec = await loop.multiengine()
    source = "s = 'x' * 3_000_000\nprint(s)\n" + "#" * 800_000
    results = await mec.execute(source, targets=[sorted(loop.controller.engines)[0]])
    assert len(results[0]["stdout"]) == 3_000_001
    assert results[0]["input"] == source


@pytest_twisted.ensureDeferred
async def test_engine_errors_are_a_composite_error_with_the_original_type(loop):
    mec = await loop.multiengine()
    with pytest.raises(CompositeError) as info:
        await mec.execute("1 / 0")
    assert len(info.value.elist) == 2
    with pytest.raises(ZeroDivisionError):
        info.value.raise_exception()


@pytest_twisted.ensureDeferred
async def test_wrong_client_secret_is_refused_and_nothing_runs(loop):
    bad = dict(loop.info, client_secret=pbutil.generate_secret())
    before = [await engine.keys() for engine in loop.engines.values()]
    with pytest.raises(SecurityError, match="refused the PB credentials"):
        await multienginepb.get_multiengine_client(info=bad)
    assert [await engine.keys() for engine in loop.engines.values()] == before
    for engine in loop.engines.values():
        with pytest.raises(InvalidResultNumber):
            await engine.get_result()


@pytest_twisted.ensureDeferred
async def test_pending_results_belong_to_the_client_that_asked(loop):
    from kernel.error import InvalidDeferredID

    a = await loop.multiengine()
    b = await loop.multiengine()
    pending = await a.execute("z = 1", block=False)
    with pytest.raises(InvalidDeferredID):
        await b.get_pending_deferred(pending, block=True)
    results = await a.get_pending_deferred(pending, block=True)
    assert [r["input"] for r in results] == ["z = 1", "z = 1"]


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_calls_with_connection_error(loop):
    mec = await loop.multiengine()
    await mec.get_ids()
    mec.disconnect()
    from twisted.internet import reactor, task

    await task.deferLater(reactor, 0.05, lambda: None)
    with pytest.raises(ConnectionError):
        await mec.get_ids()


@pytest_twisted.ensureDeferred
async def test_a_missing_connection_file_says_how_to_start_a_pb_cluster(tmp_path):
    with pytest.raises(ConnectionError, match="--adapter pb"):
        await multienginepb.get_multiengine_client(str(tmp_path / "nothing-here"))


# -- the controller never unpickles user data, over PB ---------------------------

from tests import test_no_unpickle as no_unpickle  # noqa: E402
from tests.test_no_unpickle import marker_dir, private, private_dir  # noqa: E402, F401


@pytest_twisted.async_yield_fixture(scope="module")
async def private_types_cluster(private_dir):  # noqa: F811
    """A controller process without the private module; two engines with it."""
    harness = await PBHarness.start(n_engines=2, engine_path=[private_dir])
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.mark.slow
class TestNoUnpickleOverPB:
    """The proofs of :mod:`tests.test_no_unpickle`, with engines and clients on
    PB: a type only the client and the engines can import round-trips through
    the controller, and tripwire pickles never go off in the controller."""

    @pytest.fixture
    def cluster(self, private_types_cluster):
        return private_types_cluster

    test_the_controller_cannot_import_the_private_module = staticmethod(
        no_unpickle.test_the_controller_cannot_import_the_private_module
    )
    test_push_and_pull_of_a_private_type_round_trip = staticmethod(
        no_unpickle.test_push_and_pull_of_a_private_type_round_trip
    )
    test_scatter_and_gather_of_private_types = staticmethod(
        no_unpickle.test_scatter_and_gather_of_private_types
    )
    test_tasks_take_and_return_private_types = staticmethod(
        no_unpickle.test_tasks_take_and_return_private_types
    )
    test_tripwire_pickles_cross_the_controller_unopened = staticmethod(
        no_unpickle.test_tripwire_pickles_cross_the_controller_unopened
    )
