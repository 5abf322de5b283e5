"""The multiengine contract over Foolscap, and the adapter's own behaviour."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import pytest_twisted
from foolscap.api import Violation
from zope.interface.verify import verifyObject

from kernel import fcutil
from kernel.error import CompositeError, ConnectionError, InvalidDeferredID
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngine,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from kernel.multienginefc import (
    FCFullSynchronousMultiEngineClient,
    FCMultiEngine,
    FCSynchronousMultiEngineFromMultiEngine,
    RIMultiEngine,
    make_client_referenceable,
)
from tests.contract.multiengine import MultiEngineContract
from tests.harness import OnModuleProcesses, module_processes
from tests.harness_fc import FoolscapHarness, FoolscapLoopbackHarness

#: One controller process and four engine processes for this module.
processes = module_processes(FoolscapHarness)


@pytest.mark.slow
class TestMultiEngineFoolscap(OnModuleProcesses, MultiEngineContract):
    """Every multiengine contract test over Foolscap, engines in their own processes."""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_controller_process_streams_engine_output_to_clients(processes):
    """A real controller relays each engine's output to subscribed clients."""
    await processes.reset()
    me = processes.multiengine
    ids = await me.get_ids()
    seen = []

    def observer(*args):
        seen.append(args)

    assert await me.add_output_observer(observer) is True
    try:
        await me.execute("print('streamed', id)", targets=ids[:2])
    finally:
        await me.remove_output_observer(observer)
    text: dict = {}
    for engine_id, stream_name, piece in seen:
        text[engine_id, stream_name] = text.get((engine_id, stream_name), "") + piece
    assert text == {(i, "stdout"): f"streamed {i}\n" for i in ids[:2]}


# -- the adapter itself ----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def fc_cluster():
    harness = await FoolscapLoopbackHarness.start(n_engines=2)
    try:
        yield harness
    finally:
        await harness.stop()


def test_client_half_provides_the_multiengine_interfaces():
    client = FCFullSynchronousMultiEngineClient(remote_reference=None)
    verifyObject(ISynchronousMultiEngine, client)
    verifyObject(IMultiEngineCoordinator, client)
    verifyObject(IMultiEngineExtras, client)
    verifyObject(IBlockingClientAdaptor, client)
    core = FCMultiEngine(remote_reference=None)
    verifyObject(IMultiEngine, core)
    verifyObject(IMultiEngineCoordinator, core)
    verifyObject(IMultiEngineExtras, core)


def test_adapts_to_the_blocking_multiengine_client():
    from kernel.multiengineclient import FullBlockingMultiEngineClient

    client = FCFullSynchronousMultiEngineClient(remote_reference=None)
    blocking = client.adapt_to_blocking_client()
    assert isinstance(blocking, FullBlockingMultiEngineClient)
    assert blocking.smultiengine is client


def test_server_half_provides_its_remote_interface():
    """(verifyObject does not apply: Foolscap serves RI methods as remote_*.)"""
    server = make_client_referenceable(multiengine=None)
    assert RIMultiEngine.providedBy(server)
    for name in RIMultiEngine.names():
        assert callable(getattr(server, f"remote_{name}")), name


@pytest_twisted.ensureDeferred
async def test_get_client_name_names_an_importable_client_class(fc_cluster):
    ref = fc_cluster.multiengine.remote_reference
    name = await ref.callRemote("get_client_name")
    module, _, cls = name.rpartition(".")
    assert getattr(importlib.import_module(module), cls) is FCFullSynchronousMultiEngineClient


@pytest_twisted.ensureDeferred
async def test_server_sessions_keep_pending_results_apart(fc_cluster):
    """block=False on the wire: each connected session redeems only its own ids."""
    root = fc_cluster.multiengine.remote_reference
    mine = await root.callRemote("connect")
    theirs = await root.callRemote("connect")
    pid = await fcutil.call_remote(mine, "execute", "x = 1", "all", block=False)
    assert isinstance(pid, int)
    other = await fcutil.call_remote(theirs, "execute", "y = 2", "all", block=False)
    await fcutil.call_remote(theirs, "clear_pending_deferreds")
    results = await fcutil.call_remote(mine, "get_pending_deferred", pid, block=True)
    assert [r["input"] for r in results] == ["x = 1"] * 2
    with pytest.raises(InvalidDeferredID):
        await fcutil.call_remote(theirs, "get_pending_deferred", other, block=True)


@pytest_twisted.ensureDeferred
async def test_server_never_receives_plain_push_or_pull(fc_cluster):
    """Only the serialized data methods exist on the wire."""
    root = fc_cluster.multiengine.remote_reference
    for method in ("push", "pull", "push_function", "pull_function", "scatter", "gather"):
        assert not hasattr(FCSynchronousMultiEngineFromMultiEngine, f"remote_{method}")
        with pytest.raises(Violation):
            await root.callRemote(method, {"a": 1})


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_100_mb_push_and_pull_round_trip_through_the_processes(processes):
    """Client -> controller -> engine process and back, within the size limits."""
    me = processes.multiengine
    ids = await me.get_ids()
    big = np.arange(100 * 2**20 // 8, dtype=np.int64)
    await me.push({"big": big}, targets=ids[0])
    (back,) = await me.pull("big", targets=ids[0])
    await me.execute("del big", targets=ids[0])
    assert back.nbytes == 100 * 2**20
    assert np.array_equal(back, big)


@pytest_twisted.ensureDeferred
async def test_pulled_arrays_are_writable_like_in_process_ones(fc_cluster):
    me = fc_cluster.multiengine
    ids = await me.get_ids()
    await me.execute("import numpy; a = numpy.zeros(100_000)", targets=ids[0])
    (a,) = await me.pull("a", targets=ids[0])
    a[0] = 1.0  # would raise "assignment destination is read-only"
    assert a[0] == 1.0


@pytest_twisted.ensureDeferred
async def test_engine_exception_reraises_with_original_type_and_remote_traceback(fc_cluster):
    me = fc_cluster.multiengine
    ids = await me.get_ids()
    with pytest.raises(CompositeError) as info:
        await me.execute("def f():\n    1/0\nf()", targets=ids)
    ce = info.value
    assert [e.engine_id for e in ce.elist] == ids
    assert all(e.ename == "ZeroDivisionError" for e in ce.elist)
    assert "in f" in ce.elist[0].traceback
    with pytest.raises(ZeroDivisionError):
        ce.raise_exception()


@pytest_twisted.ensureDeferred
async def test_engine_output_streams_to_observers_before_the_result(fc_cluster):
    me = fc_cluster.multiengine
    ids = await me.get_ids()
    seen = []
    assert await me.add_output_observer(lambda *args: seen.append(args)) is True
    await me.execute("import sys\nprint('hello')\nsys.stderr.write('oops')", targets=ids[0])
    text: dict = {}
    for engine_id, stream_name, piece in seen:  # the engine may send a write in pieces
        text[engine_id, stream_name] = text.get((engine_id, stream_name), "") + piece
    assert text == {(ids[0], "stdout"): "hello\n", (ids[0], "stderr"): "oops"}


@pytest_twisted.ensureDeferred
async def test_removed_output_observer_hears_nothing_more(fc_cluster):
    me = fc_cluster.multiengine
    ids = await me.get_ids()
    seen = []

    def observer(*args):
        seen.append(args)

    await me.add_output_observer(observer)
    await me.remove_output_observer(observer)
    await me.execute("print('after')", targets=ids[0])
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_a_controller_without_output_cannot_stream(fc_cluster):
    furl = fc_cluster.loopback.server.registerReference(
        make_client_referenceable(fc_cluster.multiengine_core)
    )
    me = FCFullSynchronousMultiEngineClient(await fc_cluster.loopback.client.getReference(furl))
    assert await me.add_output_observer(print) is False


@pytest_twisted.ensureDeferred
async def test_lost_controller_connection_raises_connection_error(fc_cluster):
    me = fc_cluster.multiengine
    await me.get_ids()
    await fc_cluster.loopback.server.stopService()
    with pytest.raises(ConnectionError, match="lost the connection"):
        await me.execute("a = 1")
