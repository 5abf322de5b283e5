"""The splice relay: a controller forwards a sealed buffer socket to pipe to
socket (:mod:`kernel.splicerelay`), over real loopback TCP connections in
this process (a routing server, engines and a client), and through real
controller and engine processes."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from kernel import nativeproto, splicerelay
from kernel.error import CompositeError, EngineError, InvalidEngineID
from kernel.nativeproto import NativeServerFactory
from kernel.serialized import Serialized
from kernel.testing.processes import wait_for_async

pytestmark = pytest.mark.skipif(not splicerelay.AVAILABLE, reason="os.splice is Linux-only")

KEY = bytes(range(32))
MB = 2**20
WAIT = 30


class Store:
    """An engine's side: keeps what it is sent, in order, and sends back a payload."""

    def __init__(self, payload_size: int = 6 * MB + 7):
        self.events: list = []
        self.payload = os.urandom(payload_size)

    def remote_store(self, blob):
        self.events.append(("store", hashlib.sha256(blob.buffers[0]).hexdigest()))
        return len(blob.buffers[0])

    def remote_note(self, text):
        self.events.append(("note", text))
        return text

    def remote_fetch(self):
        return Serialized(b"stream", [self.payload])


class Relay:
    """The controller's side: passes a push on to engines, a pull back."""

    def __init__(self):
        self.engines: list = []

    def remote_register(self, engine):
        self.engines.append(engine)
        return len(self.engines)

    def remote_push(self, blob, to=(0,)):
        return defer.gatherResults([self.engines[i].callRemote("store", blob) for i in to])

    def remote_pull(self, i=0):
        return self.engines[i].callRemoteStreamed("fetch")


nativeproto.allow_cut_through(Relay, ("push",))


class _Factory(NativeServerFactory):
    """Keeps the controller side of every connection, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.protos: list = []

    def buildProtocol(self, addr):  # noqa: N802
        p = super().buildProtocol(addr)
        self.protos.append(p)
        return p


class Loop:
    """A routing server on loopback TCP with ``n`` engines and one client."""

    @classmethod
    async def start(cls, n: int = 1, tls: bool = False) -> Loop:
        self = cls()
        self.relay = Relay()
        self.factory = _Factory(KEY, {"relay": self.relay})
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        where = ("127.0.0.1", self.port.getHost().port)
        self.stores, self.engines = [], []
        for _ in range(n):
            remote = await nativeproto.connect(*where, KEY, "relay")
            store = Store()
            await remote.callRemote("register", store)
            self.stores.append(store)
            self.engines.append(remote.proto)
        self.client = await nativeproto.connect(*where, KEY, "relay")
        return self

    def controller_side(self, proto):
        """The controller's protocol for the connection whose far end is ``proto``."""
        here = proto.transport.getHost()
        for p in self.factory.protos:
            if p.transport.getPeer() == here:
                return p
        raise KeyError(here)

    async def stop(self):
        for p in [*self.engines, self.client.proto]:
            p.transport.abortConnection()
        for p in self.factory.protos:
            p.transport.abortConnection()
        await self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def loop():
    lp = await Loop.start(n=2)
    try:
        yield lp
    finally:
        await lp.stop()


@pytest.fixture
def spliced(monkeypatch):
    """Counts the bytes the relay sends from its pipes; a test may add a hook
    run before each pipe write (``hooks``)."""
    counts = {"bytes": 0, "relays": 0}
    hooks: list = []
    write, made = splicerelay.splice_write, splicerelay.SpliceRelay.__init__

    def counting_write(relay, seg, sock):
        for hook in hooks:
            n = hook(relay, seg, sock)
            if n is not None:
                return n
        n = write(relay, seg, sock)
        counts["bytes"] += n
        return n

    def counting_init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        counts["relays"] += 1

    monkeypatch.setattr(splicerelay, "splice_write", counting_write)
    monkeypatch.setattr(splicerelay.SpliceRelay, "__init__", counting_init)
    counts["hooks"] = hooks
    return counts


def _digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_push_and_a_pull_go_socket_to_socket_and_arrive_byte_exact(loop, spliced):
    fds = len(os.listdir("/proc/self/fd"))
    data = os.urandom(8 * MB + 3)
    assert await loop.client.callRemote("push", Serialized(b"s", [data])) == [len(data)]
    assert loop.stores[0].events == [("store", _digest(data))]
    pushed = spliced["bytes"]
    assert 0 < pushed <= len(data)
    back = await loop.client.callRemote("pull")
    assert bytes(back.buffers[0]) == loop.stores[0].payload
    assert spliced["bytes"] > pushed  # the reply went through a pipe too
    assert spliced["relays"] == 2
    assert len(os.listdir("/proc/self/fd")) == fds  # and every pipe is closed again


@pytest_twisted.ensureDeferred
async def test_a_push_to_two_engines_is_not_spliced_and_each_gets_it_exact(loop, spliced):
    data = os.urandom(4 * MB)
    assert (
        await loop.client.callRemote("push", Serialized(b"s", [data]), to=(0, 1)) == [len(data)] * 2
    )
    for store in loop.stores:
        assert store.events == [("store", _digest(data))]
    assert spliced["bytes"] == 0  # two receivers share the bytes: through memory


@pytest_twisted.ensureDeferred
async def test_a_buffer_altered_in_the_pipe_is_refused_by_the_engine_and_nothing_is_stored(
    loop, spliced
):
    altered = []

    def alter(relay, seg, sock):
        if altered:
            return None
        data = bytearray(os.read(relay.head().r, min(relay.head().n, 4096)))
        data[100] ^= 1
        assert sock.send(data) == len(data)  # (an empty socket takes 4 KiB)
        seg.offset += len(data)
        relay.took(len(data))
        altered.append(len(data))
        return len(data)

    spliced["hooks"].append(alter)
    with pytest.raises(Exception, match="aborted this message in transit"):
        await loop.client.callRemote("push", Serialized(b"s", [os.urandom(4 * MB)]))
    assert altered and loop.stores[0].events == []
    # Every connection is still up, and the next push goes through.
    data = os.urandom(4 * MB)
    assert await loop.client.callRemote("push", Serialized(b"s", [data])) == [len(data)]
    assert loop.stores[0].events == [("store", _digest(data))]


@pytest_twisted.ensureDeferred
async def test_a_slow_engine_holds_the_sender_back_and_the_pipe_bounds_what_waits(loop, spliced):
    engine = loop.engines[0]
    engine.transport.pauseProducing()  # the engine reads nothing for now
    sender = loop.controller_side(loop.client.proto)
    data = os.urandom(48 * MB)
    push = loop.client.callRemote("push", Serialized(b"s", [data]))

    def relay_paused():
        st = sender._reader._stream
        return st is not None and st.relay is not None and st.relay.paused

    await wait_for_async(relay_paused, WAIT, "the controller to stop reading the sender")
    st = sender._reader._stream
    relay = st.relay
    assert sender.transport not in reactor.getReaders()  # not read while the pipe is full
    assert 0 < relay.pending <= relay.capacity
    (seg,) = st.active
    # nothing waits in the controller's memory: what arrived is sent or in the pipe
    assert st.received == seg.start + seg.offset + relay.pending
    assert not push.called
    engine.transport.resumeProducing()
    assert await push.addTimeout(WAIT, reactor) == [len(data)]
    assert loop.stores[0].events == [("store", _digest(data))]
    assert spliced["bytes"] > 0


@pytest_twisted.ensureDeferred
async def test_a_small_frame_to_the_engine_waits_behind_a_spliced_body(loop, spliced):
    notes = []
    engine = loop.relay.engines[0]

    def note_mid_body(relay, seg, sock):
        if not notes and seg.offset > MB:
            # a small call to the same engine while the body is in flight
            notes.append(engine.callRemote("note", "after the push"))
        return None

    spliced["hooks"].append(note_mid_body)
    data = os.urandom(8 * MB)
    assert await loop.client.callRemote("push", Serialized(b"s", [data])) == [len(data)]
    assert notes and await notes[0].addTimeout(WAIT, reactor) == "after the push"
    assert loop.stores[0].events == [("store", _digest(data)), ("note", "after the push")]


@pytest_twisted.ensureDeferred
async def test_an_engine_lost_mid_body_fails_the_push_and_the_controller_serves_on(loop, spliced):
    engine = loop.engines[0]
    lost = []

    def drop_engine(relay, seg, sock):
        if not lost and seg.offset > MB:
            lost.append(relay)
            engine.transport.abortConnection()
        return None

    spliced["hooks"].append(drop_engine)
    with pytest.raises(Exception, match="(?i)connection"):
        await loop.client.callRemote("push", Serialized(b"s", [os.urandom(16 * MB)]))
    assert lost and lost[0].closed  # its pipe was dropped
    assert loop.stores[0].events == []
    data = os.urandom(4 * MB)
    assert await loop.client.callRemote("push", Serialized(b"s", [data]), to=(1,)) == [len(data)]
    assert loop.stores[1].events == [("store", _digest(data))]


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_does_not_stall_the_engines_reply(
    loop, spliced, monkeypatch
):
    monkeypatch.setattr(splicerelay, "STALL_SECONDS", 0.05)
    loop.stores[0].payload = os.urandom(24 * MB + 1)
    client = loop.client.proto
    from_engine = loop.controller_side(loop.engines[0])
    pull = loop.client.callRemote("pull")
    await wait_for_async(
        lambda: from_engine._reader._state == "buffers", WAIT, "the reply to start arriving"
    )
    client.transport.pauseProducing()  # the client reads nothing for now
    # The controller reads the whole reply from the engine all the same
    # (the part the pipe cannot hold into memory), so the engine's
    # connection is free again...
    await wait_for_async(
        lambda: from_engine._reader._state == "prefix", WAIT, "the reply to be read in full"
    )
    assert await loop.relay.engines[0].callRemote("note", "still answering") == "still answering"
    assert not pull.called
    client.transport.resumeProducing()
    back = await pull.addTimeout(WAIT, reactor)
    # ...and the client gets it exact: pipe bytes first, then memory.
    assert bytes(back.buffers[0]) == loop.stores[0].payload
    assert spliced["bytes"] > 0


@pytest_twisted.ensureDeferred
async def test_a_sender_lost_mid_body_aborts_the_forwarded_frame(loop, spliced):
    sender = loop.client.proto
    dropped = []

    def drop_sender(relay, seg, sock):
        if not dropped and seg.offset > MB:
            dropped.append(relay)
            sender.transport.abortConnection()
        return None

    spliced["hooks"].append(drop_sender)
    push = loop.client.callRemote("push", Serialized(b"s", [os.urandom(16 * MB)]))
    push.addErrback(lambda f: None)
    engine = loop.engines[0]
    await wait_for_async(lambda: dropped and dropped[0].closed, WAIT, "the pipe to be dropped")
    # the engine reads the aborted frame to its end, stores nothing, stays up
    await wait_for_async(
        lambda: engine._reader._state == "prefix", WAIT, "the engine to finish the frame"
    )
    assert loop.stores[0].events == []
    assert await loop.relay.engines[0].callRemote("note", "up") == "up"


@pytest_twisted.ensureDeferred
async def test_over_multiengine_plain_tcp_uses_the_relay_and_tls_does_not(tmp_path, spliced):
    """Through the real adapters in this process: a push and pull over plain
    TCP go through a relay; over TLS they take the transport's path; both
    arrive byte-exact."""
    import numpy as np

    from tests.harness_native import NativeLoopback

    data = np.random.default_rng(3).integers(0, 255, size=12 * MB, dtype=np.uint8)
    for tls, relays in ((False, True), (True, False)):
        spliced["relays"] = 0
        lp = await NativeLoopback.start(n_engines=1, cluster_dir=str(tmp_path / f"c{tls}"), tls=tls)
        try:
            mec = await lp.multiengine()
            (engine_id,) = lp.engines
            await mec.push({"big": data}, targets=[engine_id])
            (back,) = await mec.pull("big", targets=[engine_id])
            np.testing.assert_array_equal(back, data)
            assert (spliced["relays"] > 0) is relays
        finally:
            await lp.stop()


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


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_real_processes_push_and_pull_one_engine_byte_exact_and_survive_a_killed_engine(
    two_engines,
):
    """Through a controller process: 64 MB pushed to one engine and pulled
    back are exact (checked on the engine too); then an engine stopped in the
    middle of a push to it alone and killed fails that push only, and the
    controller goes on serving the other engine."""
    import numpy as np

    mec = two_engines.multiengine
    first, second = sorted(await mec.get_ids())
    data = np.random.default_rng(4).integers(0, 255, size=64 * MB, dtype=np.uint8)
    await mec.push({"big": data}, targets=[first])
    await mec.execute(
        "import hashlib; h = hashlib.sha256(memoryview(big).cast('B')).hexdigest()",
        targets=[first],
    )
    assert await mec.pull("h", targets=[first]) == [hashlib.sha256(data).hexdigest()]
    (back,) = await mec.pull("big", targets=[first])
    np.testing.assert_array_equal(back, data)

    two_engines.cluster.pause_engine(first)
    push = mec.push({"big2": np.ones(200 * MB, np.uint8)}, targets=[first])
    outbox = mec.remote_reference.proto._outbox
    # held back: the controller stops reading this client while the engine
    # does not drain (so the push is in the middle of its body)
    await wait_for_async(lambda: outbox.queue and outbox.registered, WAIT, "the push to stall")
    await two_engines.kill_engine(first)
    # (the core reports a command whose engine went away as that engine's
    # failure, or, once it is unregistered, as an unknown engine)
    with pytest.raises((CompositeError, EngineError, InvalidEngineID), match=f"{first}"):
        await push.addTimeout(60, reactor)
    await mec.push({"x": np.arange(10)}, targets=[second])
    (x,) = await mec.pull("x", targets=[second])
    np.testing.assert_array_equal(x, np.arange(10))
