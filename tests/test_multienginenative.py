"""The multiengine contract over the native transport, and the adapter's own behaviour."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kernel import multienginenative, nativeproto
from kernel.enginenative import PipelinedEngine
from kernel.error import CompositeError, ConnectionError, InvalidResultNumber, SecurityError
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from tests.contract.multiengine import MultiEngineContract
from tests.harness_native import NativeHarness, NativeLoopback


@pytest_twisted.async_yield_fixture(scope="module")
async def processes():
    """One controller process and four engine processes (``--adapter native``)."""
    harness = await NativeHarness.start(n_engines=4)
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.mark.slow
class TestMultiEngineNative(MultiEngineContract):
    """Every multiengine contract test over the native transport, engines in
    their own processes."""

    @pytest_twisted.async_yield_fixture
    async def cluster(self, processes):
        await processes.reset()
        yield processes


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_wrong_key_is_refused_by_a_controller_process(processes):
    info = nativeproto.read_connection_info(processes.cluster.cluster_dir)
    bad = dict(info, key=nativeproto.generate_key())
    with pytest.raises(SecurityError, match="do not share a cluster key"):
        await multienginenative.get_multiengine_client(info=bad)


# -- the adapter itself, in process --------------------------------------------


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await NativeLoopback.start(n_engines=2, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def test_client_half_provides_the_multiengine_interfaces():
    client = multienginenative.NativeFullSynchronousMultiEngineClient(remote_reference=None)
    verifyObject(ISynchronousMultiEngine, client)
    verifyObject(IMultiEngineCoordinator, client)
    verifyObject(IMultiEngineExtras, client)
    verifyObject(IBlockingClientAdaptor, client)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_100_mb_push_and_pull_work_over_the_native_transport(loop):
    """Through the controller and back, as raw buffers."""
    mec = await loop.multiengine()
    target = [sorted(loop.controller.engines)[0]]
    data = np.random.default_rng(0).integers(0, 255, size=100 * 2**20, dtype=np.uint8)
    await mec.push({"big": data}, targets=target)
    await mec.execute("import hashlib; h = hashlib.sha256(big.tobytes()).hexdigest()", target)
    assert await mec.pull("h", targets=target) == [hashlib.sha256(data.tobytes()).hexdigest()]
    (back,) = await mec.pull("big", targets=target)
    np.testing.assert_array_equal(back, data)
    assert back.flags.writeable


def _owner(array: np.ndarray) -> object:
    """The object that owns an array's memory (through views and memoryviews)."""
    base = array
    while True:
        nxt = getattr(base, "base", None)
        if nxt is None:
            nxt = getattr(base, "obj", None)  # a memoryview's exporter
        if nxt is None:
            return base
        base = nxt


@pytest_twisted.ensureDeferred
async def test_a_pushed_array_lands_in_the_engine_in_the_buffer_it_was_received_in(loop):
    """No copy between the receiving buffer and the engine's namespace: the
    array's memory belongs to a bytearray the frame reader allocated."""
    mec = await loop.multiengine()
    engine_id = sorted(loop.engines)[0]
    await mec.push({"a": np.arange(100_000, dtype=np.float64)}, targets=[engine_id])
    a = loop.engines[engine_id]._namespace["a"]
    assert type(_owner(a)) is bytearray
    assert a.flags.writeable
    np.testing.assert_array_equal(a, np.arange(100_000, dtype=np.float64))


@pytest_twisted.ensureDeferred
async def test_large_text_output_and_source_cross_the_native_transport(loop):
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
async def test_wrong_key_is_refused_and_nothing_runs(loop):
    bad = dict(loop.info, key=nativeproto.generate_key())
    before = [await engine.keys() for engine in loop.engines.values()]
    with pytest.raises(SecurityError, match="do not share a cluster key"):
        await multienginenative.get_multiengine_client(info=bad)
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
async def test_engines_are_pipelined_and_commands_keep_their_order(loop):
    """Several commands are in flight per engine, and run in the order sent."""
    engine = loop.controller.engines[sorted(loop.controller.engines)[0]]
    assert isinstance(engine, PipelinedEngine) and engine.max_in_flight > 1
    mec = await loop.multiengine()
    target = [engine.id]
    await mec.execute("seen = []", target)
    pending = [await mec.execute(f"seen.append({i})", target, block=False) for i in range(50)]
    for p in pending:
        await mec.get_pending_deferred(p, block=True)
    assert await mec.pull("seen", targets=target) == [list(range(50))]


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
async def test_a_missing_connection_file_says_how_to_start_a_native_cluster(tmp_path):
    with pytest.raises(ConnectionError, match="--adapter native"):
        await multienginenative.get_multiengine_client(str(tmp_path / "nothing-here"))


@pytest_twisted.ensureDeferred
async def test_streamed_output_reaches_a_native_client_before_the_result(loop):
    mec = await loop.multiengine()
    seen = []
    assert await mec.add_output_observer(lambda *a: seen.append(a))
    engine_id = sorted(loop.engines)[0]
    await mec.execute("print('hello')", targets=[engine_id])
    assert seen == [(engine_id, "stdout", "hello\n")]


# -- the controller never unpickles user data, over the native transport ----------

from tests import test_no_unpickle as no_unpickle  # noqa: E402
from tests.test_no_unpickle import marker_dir, private, private_dir  # noqa: E402, F401


@pytest_twisted.async_yield_fixture(scope="module")
async def private_types_cluster(private_dir):  # noqa: F811
    """A controller process without the private module; two engines with it."""
    harness = await NativeHarness.start(n_engines=2, engine_path=[private_dir])
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.mark.slow
class TestNoUnpickleOverNative:
    """The proofs of :mod:`tests.test_no_unpickle`, with engines and clients on
    the native transport."""

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


@pytest_twisted.ensureDeferred
async def test_over_tls_engines_and_clients_work_and_only_the_pinned_controller_is_accepted(
    tmp_path,
):
    from twisted.internet.interfaces import ISSLTransport

    from kernel import pbutil
    from kernel.clusterdir import ClusterDir

    loop = await NativeLoopback.start(n_engines=1, cluster_dir=str(tmp_path / "c"), tls=True)
    try:
        info = loop.info
        assert "BEGIN CERTIFICATE" in info["certificate"]
        assert "PRIVATE" not in info["certificate"]
        ((engine_id, (_, remote)),) = loop.registrar._connected.items()
        assert ISSLTransport.providedBy(remote.reference.proto.transport)
        mec = await loop.multiengine()
        assert [r["stdout"] for r in await mec.execute("print(1)")] == ["1\n"]
        # a controller holding another certificate's key is refused
        other = ClusterDir(tmp_path / "other").create()
        stranger = pbutil.public_pem(pbutil.controller_certificate(other))
        with pytest.raises(SecurityError, match="TLS certificate does not match"):
            await multienginenative.get_multiengine_client(info=dict(info, certificate=stranger))
        # plain TCP gets nothing from a TLS port
        plain = {k: v for k, v in info.items() if k != "certificate"}
        with pytest.raises(ConnectionError):
            await multienginenative.get_multiengine_client(info=plain, timeout=1)
    finally:
        await loop.stop()


# -- blocking calls sent from the caller's thread -----------------------------------


async def _blocking_client_with_spy(loop, monkeypatch):
    """A blocking client over a native client half whose session is open, and
    the list of ``(method, sent from the thread)`` of its connection's
    ``call_from_thread``."""
    from kernel.multiengineclient import FullBlockingMultiEngineClient

    mec = await loop.multiengine()
    await mec.get_ids()  # opens the session
    proto = mec.multiengine._session.proto
    sent = []
    original = proto.call_from_thread

    def spy(*args, **kwargs):
        waiter = original(*args, **kwargs)
        sent.append((args[1], waiter is not None))
        return waiter

    monkeypatch.setattr(proto, "call_from_thread", spy)
    return mec, FullBlockingMultiEngineClient(mec), sent


def _in_thread(f, *args):
    from twisted.internet import reactor, threads

    return threads.deferToThread(f, *args).addTimeout(60, reactor)


@pytest_twisted.ensureDeferred
async def test_a_blocking_client_sends_small_calls_from_its_own_thread(loop, monkeypatch):
    from kernel.multiengineclient import ResultList

    _, client, sent = await _blocking_client_with_spy(loop, monkeypatch)

    def work():
        ids = client.get_ids()
        executed = client.execute("x = 6 * 7", targets=ids[0])
        client.push({"y": [1, 2]}, targets=ids)
        return (
            ids,
            executed,
            client.pull(["x", "y"], targets=ids[0]),
            client.pull("y", targets=ids),
            client.apply(pow, 2, 10, targets=ids),
        )

    ids, executed, pulled, pulled_one, applied = await _in_thread(work)
    assert isinstance(executed, ResultList) and executed[0]["input"] == "x = 6 * 7"
    assert executed[0]["id"] == ids[0]
    assert pulled == [[42, [1, 2]]]
    assert pulled_one == [[1, 2], [1, 2]]
    assert applied == [1024, 1024]
    assert sent == [
        ("execute", True),
        ("push_serialized", True),
        ("pull_serialized", True),
        ("pull_serialized", True),
        ("apply_serialized", True),
    ]


@pytest_twisted.ensureDeferred
async def test_errors_of_calls_sent_from_the_thread_are_those_of_the_usual_path(loop, monkeypatch):
    from kernel.error import InvalidEngineID

    mec, client, sent = await _blocking_client_with_spy(loop, monkeypatch)
    with pytest.raises(CompositeError) as usual:
        await mec.apply(divmod, 1, 0)

    def work():
        out = {}
        for name, call in [
            ("apply", lambda: client.apply(divmod, 1, 0)),
            ("execute", lambda: client.execute("1 / 0")),
            ("target", lambda: client.execute("pass", targets=99)),
            ("pull", lambda: client.pull("nowhere")),
        ]:
            try:
                call()
            except Exception as e:
                out[name] = e
        return out

    errors = await _in_thread(work)
    assert str(errors["apply"]) == str(usual.value)
    assert "method: apply" in str(errors["apply"])
    with pytest.raises(ZeroDivisionError):
        errors["apply"].raise_exception()
    assert isinstance(errors["execute"], CompositeError)
    with pytest.raises(ZeroDivisionError):
        errors["execute"].raise_exception()
    assert isinstance(errors["target"], InvalidEngineID)
    assert isinstance(errors["pull"], CompositeError) and "method: pull" in str(errors["pull"])
    assert [s for _, s in sent] == [True] * 4


@pytest_twisted.ensureDeferred
async def test_large_or_keyword_calls_and_pending_results_go_through_the_reactor(loop, monkeypatch):
    _, client, sent = await _blocking_client_with_spy(loop, monkeypatch)
    big = b"z" * (2 * nativeproto.SMALL_FRAME)

    def work():
        client.push({"big": big})
        back = client.pull("big")
        by_keyword = client.apply(int, "ff", base=16)
        pending = client.execute("w = 1", block=False)
        return back, by_keyword, pending.get_result()

    back, by_keyword, pending_result = await _in_thread(work)
    assert back == [big, big]
    assert by_keyword == [255, 255]
    assert [r["input"] for r in pending_result] == ["w = 1", "w = 1"]
    # the push was tried from the thread (too large: sent by the reactor, the
    # blob serialized once); the small pull went from the thread
    assert sent == [("push_serialized", False), ("pull_serialized", True)]


@pytest_twisted.ensureDeferred
async def test_a_blocking_call_on_a_lost_connection_is_a_connection_error(loop, monkeypatch):
    mec, client, _ = await _blocking_client_with_spy(loop, monkeypatch)
    mec.disconnect()
    from twisted.internet import reactor, task

    await task.deferLater(reactor, 0.05, lambda: None)

    def work():
        try:
            client.execute("pass")
        except ConnectionError as e:
            return e

    assert isinstance(await _in_thread(work), ConnectionError)
