"""Cut-through forwarding on the native wire: a controller passes a large
frame on while it arrives (no real sockets: three parties over iosim)."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.test import iosim

from kernel import nativeproto
from kernel.error import CompositeError, EngineError, ProtocolError, SecurityError
from kernel.nativeproto import FrameReader, FrameWriter, NativeProtocol
from kernel.serialized import Serialized
from kernel.testing.processes import wait_for_async

KEY = bytes(range(32))
MB = 2**20
BIG = 3 * MB + 12345


class Store:
    """The engine's side: keeps what it is sent, sends back what it holds."""

    def __init__(self):
        self.stored: list[Serialized] = []
        self.payload = os.urandom(BIG)

    def remote_store(self, blob):
        self.stored.append(blob)
        return len(blob.buffers[0])

    def remote_fetch(self):
        return Serialized(b"stream", [self.payload])


class Relay:
    """The controller's side: passes pushes on to engines, pulls back."""

    def __init__(self):
        self.engines: list = []
        self.kept: list = []

    def remote_register(self, engine):
        self.engines.append(engine)
        return len(self.engines)

    def remote_push(self, blob, n=1):
        return defer.gatherResults([e.callRemote("store", blob) for e in self.engines[:n]])

    def remote_keep(self, blob):  # not cut through: only ever sees whole frames
        self.kept.append(bytes(blob.buffers[0]))
        return True

    def remote_pull(self):
        return self.engines[0].callRemoteStreamed("fetch")


nativeproto.allow_cut_through(Relay, ("push",))


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


class Cluster:
    """A controller (routing server) with engines and one client, each
    connection on its own iosim pump."""

    def __init__(self, n_engines=1):
        self.relay = Relay()
        gateway = nativeproto.Gateway({"relay": self.relay})
        self.stores = []
        self.engine_links = []  # (engine-side proto, controller-side proto, pump)
        for _ in range(n_engines):
            engine, ctrl, pump = self._connect(gateway)
            store = Store()
            relay = self._get(engine, pump)
            registered = relay.callRemote("register", store)
            pump.flush()
            result_of(registered)
            self.stores.append(store)
            self.engine_links.append((engine, ctrl, pump))
        self.client, self.ctrl, self.client_pump = self._connect(gateway)
        self.remote = self._get(self.client, self.client_pump)

    @staticmethod
    def _connect(gateway):
        client, server, pump = iosim.connectedServerAndClient(
            lambda: NativeProtocol(KEY, is_client=False, root=gateway, routing=True),
            lambda: NativeProtocol(KEY, is_client=True),
        )
        pump.flush()
        return client, server, pump

    @staticmethod
    def _get(proto, pump):
        d = proto.call(0, "get", ("relay",), {})
        pump.flush()
        return result_of(d)

    def client_bytes(self) -> bytes:
        """Everything the client has to send now."""
        return outgoing(self.client)

    def flush_engines(self):
        for _, _, pump in self.engine_links:
            pump.flush()


def outgoing(proto) -> bytes:
    """Everything ``proto`` has to send now (its producer run to the end)."""
    transport = proto.transport
    out = b""
    while True:
        transport._checkProducer()
        more = transport.getOutBuffer()
        if not more:
            return out
        out += more


def engine_received(link) -> int:
    """Bytes of buffers the engine's reader has taken in for its current frame."""
    reader = link[0]._reader
    if reader._state != "buffers":
        return 0
    return sum(len(b) for b in reader._buffers[: reader._index]) + reader._filled


# -- frames --------------------------------------------------------------------


def test_an_abort_tag_makes_a_large_frame_aborted_not_a_security_error():
    frame = FrameWriter(KEY).frame(b'["c",7]', [os.urandom(2 * MB)])
    abort = nativeproto._abort_tag(frame.mac.mac)
    data = bytearray(b"".join(bytes(s) for s in frame.segments()))
    data[-nativeproto.TAG_BYTES :] = abort
    (item,) = FrameReader(KEY).feed(bytes(data))
    assert type(item) is nativeproto.Aborted
    assert item.header == b'["c",7]'


def test_an_abort_tag_under_another_key_is_a_security_error():
    frame = FrameWriter(KEY).frame(b"[]", [os.urandom(2 * MB)])
    data = bytearray(b"".join(bytes(s) for s in frame.segments()))
    forged = FrameWriter(bytes(32)).frame(b"[]", [b"x" * (2 * MB)])
    data[-nativeproto.TAG_BYTES :] = nativeproto._abort_tag(forged.mac.mac)
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(bytes(data))


def test_a_routing_reader_offers_a_large_frame_once_the_buffers_before_the_large_one_are_in():
    payload = os.urandom(2 * MB)
    data = b"".join(
        bytes(s) for s in FrameWriter(KEY).frame(b"[1]", [b"small", payload]).segments()
    )
    reader = FrameReader(KEY, routing=True)
    reader.cut_through = True
    # (the closing part: the payload's seal tag, then the frame's tag)
    closing = nativeproto.E2E_TAG_BYTES + nativeproto.TAG_BYTES
    head = len(data) - len(payload) - closing
    (early,) = reader.feed(data[: head + 1000])
    assert type(early) is nativeproto.Early
    assert early.header == b"[1]" and bytes(early.buffers[0]) == b"small"
    assert early.stream.received == len(b"small") + 1000
    early.dispatched = True
    assert reader.feed(data[head + 1000 :]) == []  # acted on already: not delivered again
    assert early.stream.state == "ok"
    assert early.buffers[1] == payload


def test_a_frame_not_acted_on_early_is_delivered_whole():
    payload = os.urandom(2 * MB)
    data = b"".join(bytes(s) for s in FrameWriter(KEY).frame(b"[1]", [b"s", payload]).segments())
    reader = FrameReader(KEY, routing=True)
    reader.cut_through = True
    items = reader.feed(data)
    assert type(items[0]) is nativeproto.Early
    assert items[1] == (b"[1]", [bytearray(b"s"), bytearray(payload)])


# -- forwarding ----------------------------------------------------------------


def test_a_large_push_is_forwarded_before_it_has_arrived_and_lands_byte_exact():
    c = Cluster()
    blob = Serialized(b"stream", [os.urandom(BIG)])
    d = c.remote.callRemote("push", blob)
    data = c.client_bytes()
    half = len(data) // 2
    c.ctrl.dataReceived(data[:half])
    c.flush_engines()
    link = c.engine_links[0]
    assert engine_received(link) > MB  # the engine is receiving already
    assert c.stores[0].stored == []  # and acts on nothing yet
    c.ctrl.dataReceived(data[half:])
    c.flush_engines()
    c.client_pump.flush()
    assert result_of(d) == [BIG]
    (got,) = c.stores[0].stored
    assert bytes(got.buffers[0]) == bytes(blob.buffers[0])


def test_a_push_to_several_engines_is_forwarded_to_each_as_it_arrives():
    c = Cluster(n_engines=3)
    blob = Serialized(b"stream", [os.urandom(BIG)])
    d = c.remote.callRemote("push", blob, n=3)
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    c.flush_engines()
    assert all(engine_received(link) > MB for link in c.engine_links)
    c.ctrl.dataReceived(data[len(data) // 2 :])
    c.flush_engines()
    c.client_pump.flush()
    assert result_of(d) == [BIG] * 3
    for store in c.stores:
        (got,) = store.stored
        assert bytes(got.buffers[0]) == bytes(blob.buffers[0])


def test_a_tampered_buffer_is_refused_by_the_controller_and_the_engine_and_nothing_is_stored():
    c = Cluster()
    d = c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = bytearray(c.client_bytes())
    data[len(data) // 2] ^= 1  # in flight, inside the buffer
    c.ctrl.dataReceived(bytes(data))
    c.flush_engines()
    assert c.ctrl.transport.disconnecting  # the controller dropped the sender
    assert c.stores[0].stored == []  # the engine stored nothing
    engine, ctrl_side, _ = c.engine_links[0]
    assert not engine.transport.disconnecting and not ctrl_side.transport.disconnecting
    c.client_pump.flush()
    assert isinstance(result_of(d).value, Exception)  # the client's call failed


def test_the_engine_answers_an_aborted_call_with_an_error_and_stays_usable():
    c = Cluster()
    engine_remote = c.relay.engines[0]
    sent = []

    def push(blob, n=1):
        d = engine_remote.callRemote("store", blob)
        d.addBoth(lambda r: sent.append(r) or r)
        return d

    c.relay.remote_push = push
    c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = bytearray(c.client_bytes())
    data[-3] ^= 1  # the closing tag
    c.ctrl.dataReceived(bytes(data[:-100]))  # forwarding starts
    c.flush_engines()
    c.ctrl.dataReceived(bytes(data[-100:]))  # and the tag fails
    c.flush_engines()
    assert c.ctrl.transport.disconnecting
    (f,) = sent
    assert f.check(ProtocolError) and "aborted this message in transit" in str(f.value)
    assert c.stores[0].stored == []
    again = engine_remote.callRemote("store", Serialized(b"s", [b"small"]))
    c.flush_engines()
    assert result_of(again) == 5
    assert [bytes(s.buffers[0]) for s in c.stores[0].stored] == [b"small"]


def test_a_sender_lost_mid_frame_aborts_the_forwarded_frame_and_nothing_is_stored():
    c = Cluster()
    c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    c.flush_engines()
    assert engine_received(c.engine_links[0]) > 0
    c.ctrl.connectionLost(iosim.Failure(ConnectionError("gone")))
    c.flush_engines()
    assert c.stores[0].stored == []
    engine, ctrl_side, _ = c.engine_links[0]
    assert engine._reader._state == "prefix"  # the aborted frame was read to its end
    assert not engine.transport.disconnecting


def test_a_method_not_allowed_to_cut_through_sees_only_whole_frames():
    c = Cluster()
    payload = os.urandom(BIG)
    d = c.remote.callRemote("keep", Serialized(b"stream", [payload]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[:-100])
    assert c.relay.kept == []
    c.ctrl.dataReceived(data[-100:])
    assert c.relay.kept == [payload]
    c.client_pump.flush()
    assert result_of(d) is True


def test_a_large_reply_is_forwarded_to_the_client_as_it_arrives():
    c = Cluster()
    d = c.remote.callRemote("pull")
    c.client_pump.flush()
    engine, ctrl_side, pump = c.engine_links[0]
    pump.pump()  # the call reaches the engine
    # the engine's reply, delivered to the controller in two halves
    out = outgoing(engine)
    ctrl_side.dataReceived(out[: len(out) // 2])
    c.client_pump.flush()
    reader = c.client._reader
    assert reader._state == "buffers" and reader._filled >= MB  # the client is receiving
    ctrl_side.dataReceived(out[len(out) // 2 :])
    c.client_pump.flush()
    got = result_of(d)
    assert bytes(got.buffers[0]) == c.stores[0].payload


def test_an_engine_lost_mid_reply_fails_the_clients_call_with_an_engine_error():
    c = Cluster()
    d = c.remote.callRemote("pull")
    c.client_pump.flush()
    engine, ctrl_side, pump = c.engine_links[0]
    pump.pump()  # the call reaches the engine
    out = outgoing(engine)
    ctrl_side.dataReceived(out[: len(out) // 2])
    ctrl_side.connectionLost(iosim.Failure(ConnectionError("engine died")))
    c.client_pump.flush()
    f = result_of(d)
    assert f.check(EngineError)
    assert "cut off in transit" in str(f.value)
    assert not c.client.transport.disconnecting  # the client's connection stays up
    # and the controller still answers it
    d2 = c.remote.callRemote("keep", Serialized(b"s", [b"ok"]))
    c.client_pump.flush()
    assert result_of(d2) is True


def test_the_controller_stops_reading_a_sender_while_an_engine_lags_behind():
    """Backpressure: with the engine not draining, the controller reads at
    most a window ahead of it, and holds at most a slice of it in the engine
    connection's transport."""
    c = Cluster()
    calls = []
    c.ctrl.transport.pauseProducing = lambda: calls.append("pause")
    c.ctrl.transport.resumeProducing = lambda: calls.append("resume")
    size = 6 * nativeproto.CUT_THROUGH_WINDOW
    d = c.remote.callRemote("push", Serialized(b"stream", [os.urandom(size)]))
    data = c.client_bytes()
    # a quarter of the data, while the engine's connection does not drain
    engine, ctrl_side, pump = c.engine_links[0]
    step = 256 * 1024
    pos = 0
    while pos < len(data) // 4 and "pause" not in calls:
        c.ctrl.dataReceived(data[pos : pos + step])
        pos += step
    assert calls == ["pause"]
    (growing,) = [seg for seg, _ in ctrl_side._outbox.queue if type(seg) is nativeproto._Growing]
    lag = growing.stream.lag()
    assert nativeproto.CUT_THROUGH_WINDOW < lag <= nativeproto.CUT_THROUGH_WINDOW + step
    held = sum(len(s) for s in ctrl_side.transport.stream)
    assert held <= 2 * nativeproto.WRITE_SLICE  # not the whole window copied out
    pump.flush()  # the engine drains: the controller reads again
    assert calls == ["pause", "resume"]
    c.ctrl.dataReceived(data[pos:])
    c.flush_engines()
    c.client_pump.flush()
    assert result_of(d) == [size]


def test_a_slow_client_never_stops_the_controller_reading_an_engines_reply():
    c = Cluster()
    engine, ctrl_side, pump = c.engine_links[0]
    calls = []
    ctrl_side.transport.pauseProducing = lambda: calls.append("pause")
    c.stores[0].payload = os.urandom(6 * nativeproto.CUT_THROUGH_WINDOW)
    d = c.remote.callRemote("pull")
    c.client_pump.flush()
    pump.pump()  # the call reaches the engine
    ctrl_side.dataReceived(outgoing(engine))  # the whole reply; the client reads nothing
    assert calls == []
    c.client_pump.flush()
    assert bytes(result_of(d).buffers[0]) == c.stores[0].payload


def test_arrived_waits_for_a_forwarded_reply_and_fails_if_it_never_completes():
    c = Cluster()
    engine, ctrl_side, pump = c.engine_links[0]
    d = c.relay.engines[0].callRemoteStreamed("fetch")
    pump.flush()
    # (already complete after a full flush)
    blob = result_of(d)
    assert result_of(nativeproto.arrived(blob)) is blob
    d = c.relay.engines[0].callRemoteStreamed("fetch")
    pump.pump()  # the call reaches the engine
    out = outgoing(engine)
    ctrl_side.dataReceived(out[: len(out) // 2])
    blob = result_of(d)  # fired early
    waiting = nativeproto.arrived([blob])
    assert not waiting.called
    ctrl_side.connectionLost(iosim.Failure(ConnectionError("engine died")))
    assert result_of(waiting).check(EngineError)


def test_a_view_of_a_buffer_still_arriving_is_sent_only_once_its_bytes_are_in():
    c = Cluster()
    engine_remote = c.relay.engines[0]
    sent = []

    def push(blob, n=1):  # forwards a slice of the blob, as a view
        view = memoryview(blob.buffers[0])[1000:-1000]
        sent.append(engine_remote.callRemote("store", Serialized(b"s", [view])))
        return sent[-1]

    c.relay.remote_push = push
    payload = os.urandom(BIG)
    c.remote.callRemote("push", Serialized(b"stream", [payload]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    c.flush_engines()
    assert c.stores[0].stored == []
    c.ctrl.dataReceived(data[len(data) // 2 :])
    c.flush_engines()
    (got,) = c.stores[0].stored
    assert bytes(got.buffers[0]) == payload[1000:-1000]


def test_a_blob_whose_frame_failed_is_not_forwarded_again():
    c = Cluster()
    c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    reader = c.ctrl._reader
    buf = reader._buffers[1]
    c.ctrl.connectionLost(iosim.Failure(ConnectionError("gone")))
    with pytest.raises(ProtocolError, match="did not arrive intact"):
        FrameWriter(KEY).frame(b"[]", [buf])


# -- real processes --------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def two_engines():
    """A native controller process and two engine processes."""
    from tests.harness_native import NativeHarness

    harness = await NativeHarness.start(n_engines=2)
    try:
        yield harness
    finally:
        await harness.stop()


def _digest_on(mec, name):
    return f"import hashlib; h = hashlib.sha256(memoryview({name}).cast('B')).hexdigest()"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_engine_killed_mid_push_fails_alone_and_the_other_engine_gets_it_all(two_engines):
    """One of two engines stops reading in the middle of a 200 MB push and is
    then killed: the push fails for that engine only, the other engine holds
    the exact array, and the controller keeps serving the client."""
    import hashlib

    import numpy as np

    mec = two_engines.multiengine
    stopped, alive = sorted(await mec.get_ids())
    data = np.random.default_rng(1).integers(0, 255, size=200 * MB, dtype=np.uint8)
    two_engines.cluster.pause_engine(stopped)
    push = mec.push({"big": data}, targets=[stopped, alive])
    await deferLater(reactor, 0.5, lambda: None)
    assert not push.called  # held up by the stopped engine
    await two_engines.kill_engine(stopped)
    with pytest.raises(CompositeError) as info:
        await push.addTimeout(60, reactor)
    assert [e.engine_id for e in info.value.elist] == [stopped]
    await mec.execute(_digest_on(mec, "big"), targets=[alive])
    assert await mec.pull("h", targets=[alive]) == [hashlib.sha256(data).hexdigest()]
    assert await mec.get_ids() == [alive]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_engine_killed_mid_reply_fails_the_pull_and_the_client_stays_connected(
    two_engines,
):
    """The engine answering a 300 MB pull dies while the controller is
    forwarding its reply: the client's pull fails with the reason, and the
    same connection goes on working with the other engine."""
    import numpy as np

    mec = two_engines.multiengine
    dying, alive = sorted(await mec.get_ids())
    # The engine stops itself right after the first slice of its reply has
    # gone out (fault injection inside the engine process).
    await mec.execute(STOP_AFTER_FIRST_SLICE, targets=[dying])
    pid = two_engines.cluster.registered()[dying]
    pull = mec.pull("big", targets=[dying])
    await wait_for_async(lambda: _stopped(pid), 60, "the engine to stop mid-reply")
    assert not pull.called
    await two_engines.kill_engine(dying)
    with pytest.raises(Exception, match="cut off in transit") as info:
        await pull.addTimeout(60, reactor)
    assert info.type in (EngineError, CompositeError)
    await mec.push({"x": np.arange(10)}, targets=[alive])
    (x,) = await mec.pull("x", targets=[alive])
    np.testing.assert_array_equal(x, np.arange(10))


STOP_AFTER_FIRST_SLICE = """
import os, signal, numpy
from kernel import nativeproto
big = numpy.ones(300 * 2**20, numpy.uint8)
_send_large = nativeproto._Outbox._send_large
def _stop_after(self, view, mac):
    n = _send_large(self, view, mac)
    if len(view) >= 100 * 2**20:
        os.kill(os.getpid(), signal.SIGSTOP)
    return n
nativeproto._Outbox._send_large = _stop_after
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest_twisted.ensureDeferred
async def test_over_tls_a_large_push_and_pull_are_cut_through_and_arrive_exact(
    tmp_path, monkeypatch
):
    """The same forwarding over TLS connections (buffers go through the TLS
    transport in slices): the controller acts on the push and on the pull's
    reply before they have arrived, and both arrive byte-exact."""
    import numpy as np

    from tests.harness_native import NativeLoopback

    early = []
    original = NativeProtocol._early

    def spy(self, item):
        original(self, item)
        early.append((item.dispatched, item.stream.pause is not None))

    monkeypatch.setattr(NativeProtocol, "_early", spy)
    loop = await NativeLoopback.start(n_engines=1, cluster_dir=str(tmp_path / "c"), tls=True)
    try:
        mec = await loop.multiengine()
        (engine_id,) = loop.engines
        data = np.random.default_rng(2).integers(0, 255, size=20 * MB, dtype=np.uint8)
        await mec.push({"big": data}, targets=[engine_id])
        (back,) = await mec.pull("big", targets=[engine_id])
        np.testing.assert_array_equal(back, data)
        # the push (from the client) and the reply (from the engine), both
        # acted on early; the client can be held back, the engine is not
        assert sorted(early) == [(True, False), (True, True)]
    finally:
        await loop.stop()
