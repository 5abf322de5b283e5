"""The native transport's small-message path: frames sent straight to an idle
socket, held while a read is handled and written together, and calls sent
from a thread other than the reactor's."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor, task, threads

from kernel import nativeproto
from kernel.error import ProtocolError
from kernel.nativeproto import FrameReader, FrameWriter, NativeProtocol

KEY = bytes(range(32))


class FakeTCPTransport:
    """What :class:`nativeproto._Outbox` reads of a Twisted TCP transport."""

    def __init__(self):
        self.connected = True
        self.disconnecting = False
        self._tempDataLen = 0
        self.offset = 0
        self.dataBuffer = b""
        self.written = bytearray()
        self.producer = None

    def registerProducer(self, producer, streaming):  # noqa: N802
        self.producer = producer

    def unregisterProducer(self):  # noqa: N802
        self.producer = None

    def write(self, data):
        self.written += data
        self._tempDataLen += len(data)  # held until the reactor writes it

    def drained(self):
        """The reactor wrote what the transport held."""
        data, self.written = bytes(self.written), bytearray()
        self._tempDataLen = 0
        return data


class FakeSocket:
    """Takes ``room`` bytes (None: everything), then is full."""

    def __init__(self, room=None):
        self.room = room
        self.sends: list[bytes] = []

    def send(self, data):
        data = bytes(data)
        if self.room is not None:
            if not self.room:
                raise BlockingIOError
            data = data[: self.room]
            self.room -= len(data)
        self.sends.append(data)
        return len(data)


def outbox_on(sock):
    transport = FakeTCPTransport()
    outbox = nativeproto._Outbox(transport)
    outbox.sock = sock
    return outbox, transport


def frames(data: bytes, key=KEY):
    return [(h, [bytes(b) for b in bs]) for h, bs in FrameReader(key).feed(data)]


def test_a_small_frame_on_an_idle_connection_goes_straight_to_the_socket():
    sock = FakeSocket()
    outbox, transport = outbox_on(sock)
    writer = FrameWriter(KEY)
    outbox.send(writer.frame(b"[1]", []))
    outbox.send(writer.frame(b"[2]", [b"buffer", b""]))
    assert transport.written == b""  # the transport never saw them
    assert len(sock.sends) == 2  # each frame in one send, buffers joined in
    assert frames(b"".join(sock.sends)) == [(b"[1]", []), (b"[2]", [b"buffer", b""])]


def test_a_frame_waits_behind_what_the_transport_holds():
    sock = FakeSocket()
    outbox, transport = outbox_on(sock)
    writer = FrameWriter(KEY)
    transport.write(writer.frame(b"[1]", []).head)  # not yet written by the reactor
    outbox.send(writer.frame(b"[2]", []))
    assert sock.sends == []
    assert frames(transport.drained()) == [(b"[1]", []), (b"[2]", [])]


def test_what_a_full_socket_does_not_take_goes_through_the_transport_in_order():
    sock = FakeSocket(room=10)
    outbox, transport = outbox_on(sock)
    writer = FrameWriter(KEY)
    outbox.send(writer.frame(b"[1]", [b"x" * 100]))
    outbox.send(writer.frame(b"[2]", []))  # the transport is busy now: behind it
    assert len(sock.sends[0]) == 10
    assert frames(sock.sends[0] + transport.drained()) == [(b"[1]", [b"x" * 100]), (b"[2]", [])]


def test_frames_sent_while_a_read_is_handled_leave_together_afterwards():
    sock = FakeSocket()
    a, _ = outbox_on(sock)
    other = FakeSocket()
    b, _ = outbox_on(other)
    wa, wb = FrameWriter(KEY), FrameWriter(KEY)
    with nativeproto._cork:
        a.send(wa.frame(b"[1]", []))
        b.send(wb.frame(b"[9]", []))
        a.send(wa.frame(b"[2]", [b"buf"]))
        assert sock.sends == [] and other.sends == []
    assert len(sock.sends) == 1 and len(other.sends) == 1  # one send per connection
    assert frames(sock.sends[0]) == [(b"[1]", []), (b"[2]", [b"buf"])]
    assert frames(other.sends[0]) == [(b"[9]", [])]


def test_a_large_frame_after_held_frames_goes_out_after_them():
    sock = FakeSocket()
    outbox, transport = outbox_on(sock)
    writer = FrameWriter(KEY)
    big = bytes(nativeproto.SMALL_FRAME + 1)
    with nativeproto._cork:
        outbox.send(writer.frame(b"[1]", []))
        outbox.send(writer.frame(b"[2]", [big]))
    wire = transport.drained()
    while outbox.queue:
        outbox.resumeProducing()
        wire += transport.drained()
    assert frames(b"".join(sock.sends) + wire) == [(b"[1]", []), (b"[2]", [big])]


class RecordingReactor:
    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):  # noqa: N802
        self.calls.append((f, args))

    def run_calls(self):
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def test_a_thread_sends_on_an_idle_connection_and_leaves_the_rest_to_the_reactor():
    sock = FakeSocket(room=7)
    outbox, transport = outbox_on(sock)
    writer = FrameWriter(KEY)
    fake_reactor = RecordingReactor()
    assert outbox.send_from_thread(lambda: writer.frame(b"[1]", []), fake_reactor)
    assert len(sock.sends[0]) == 7 and outbox.held  # the socket took 7 bytes
    # Busy now: another thread may not send, and signs nothing.
    signed = []
    assert not outbox.send_from_thread(lambda: signed.append(1), fake_reactor)
    assert signed == []
    # The reactor thread's own frame waits behind the rest of the first one.
    outbox.send(writer.frame(b"[2]", []))
    fake_reactor.run_calls()
    assert frames(sock.sends[0] + transport.drained()) == [(b"[1]", []), (b"[2]", [])]


def test_a_thread_does_not_send_while_a_large_frame_is_being_written():
    sock = FakeSocket(room=0)
    outbox, _ = outbox_on(sock)
    writer = FrameWriter(KEY)
    outbox.send(writer.frame(b"[1]", [bytearray(3 * nativeproto.WRITE_SLICE)]))
    assert outbox.queue
    assert not outbox.send_from_thread(lambda: writer.frame(b"[2]", []), RecordingReactor())


# -- over a real connection ----------------------------------------------------------


class Service:
    def __init__(self):
        self.gate: defer.Deferred | None = None

    def remote_echo(self, value):
        return value

    def remote_wait(self):
        self.gate = defer.Deferred()
        return self.gate

    def remote_take(self, remote):  # pragma: no cover - only its refusal is checked
        return None


@pytest.fixture
def connection():
    """A native server on a loopback port and a client connected to it."""
    service = Service()
    factory = nativeproto.NativeServerFactory(KEY, {"svc": service})
    state = {}

    async def start():
        state["port"] = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = state["port"].getHost().port
        remote = await nativeproto.connect("127.0.0.1", port, KEY, "svc", timeout=10)
        state["remote"] = remote
        return remote

    remote = pytest_twisted.blockon(defer.ensureDeferred(start()))
    yield remote, service
    remote.disconnect()
    pytest_twisted.blockon(defer.maybeDeferred(state["port"].stopListening))


def in_thread(f, *args):
    return threads.deferToThread(f, *args).addTimeout(30, reactor)


def call_and_wait(remote, method, args, kwargs=None):
    """From a worker thread: send a call with call_from_thread and wait."""
    waiter = remote.proto.call_from_thread(remote.oid, method, args, kwargs or {})
    if waiter is None:
        return None
    assert waiter.wait(20), "no reply"
    return (threading.current_thread() is not threading.main_thread(), waiter)


@pytest_twisted.ensureDeferred
async def test_a_call_sent_from_a_thread_gets_its_reply_in_that_thread(connection):
    remote, _ = connection
    sent_from_worker, waiter = await in_thread(call_and_wait, remote, "echo", ({"a": [1, 2]},))
    assert sent_from_worker
    assert not waiter.failed and waiter.value == {"a": [1, 2]}
    # The reactor's own calls keep working after it, on the same signed sequence.
    assert await remote.callRemote("echo", "after") == "after"


@pytest_twisted.ensureDeferred
async def test_many_threads_and_the_reactor_call_at_once_and_every_reply_matches(connection):
    remote, _ = connection

    def many(i):
        out = []
        for j in range(30):
            waiter = remote.proto.call_from_thread(remote.oid, "echo", ([i, j],), {})
            if waiter is None:  # busy: what the blocking client would send another way
                out.append([i, j])
                continue
            assert waiter.wait(20)
            out.append(waiter.value)
        return out

    reactor_calls = [remote.callRemote("echo", ["r", j]) for j in range(30)]
    results = await defer.gatherResults([in_thread(many, i) for i in range(4)])
    assert results == [[[i, j] for j in range(30)] for i in range(4)]
    assert await defer.gatherResults(reactor_calls) == [["r", j] for j in range(30)]


@pytest_twisted.ensureDeferred
async def test_a_thread_cannot_send_between_the_reactor_signing_a_frame_and_writing_it(
    connection, monkeypatch
):
    """Frames leave in the order they are signed: a thread trying to send
    while the reactor thread holds a signed frame waits for it to be written
    (otherwise the peer would see sequence numbers out of order and drop
    the connection)."""
    remote, _ = connection
    proto = remote.proto
    original = proto._writer.frame
    box = {}

    def send_from_other_thread():
        box["waiter"] = proto.call_from_thread(remote.oid, "echo", ("thread",), {})

    def frame(header, buffers):
        signed = original(header, buffers)
        if "thread" not in box:
            box["thread"] = threading.Thread(target=send_from_other_thread)
            box["thread"].start()
            box["thread"].join(0.3)  # it tries to send now, before this frame is written
        return signed

    monkeypatch.setattr(proto._writer, "frame", frame)
    reply = remote.callRemote("echo", "reactor")
    await in_thread(box["thread"].join, 20)
    assert await reply == "reactor"
    waiter = box["waiter"]
    if waiter is not None:  # (None: it found the connection busy and sent nothing)
        assert await in_thread(waiter.wait, 20)
        assert waiter.value == "thread"
    assert await remote.callRemote("echo", "still connected") == "still connected"


@pytest_twisted.ensureDeferred
async def test_a_failed_remote_call_fails_the_waiting_thread(connection):
    remote, _ = connection
    _, waiter = await in_thread(call_and_wait, remote, "no_such_method", ())
    assert waiter.failed and waiter.value.check(ProtocolError)


@pytest_twisted.ensureDeferred
async def test_calls_with_references_or_large_arguments_are_not_sent_from_a_thread(connection):
    remote, service = connection
    assert await in_thread(call_and_wait, remote, "take", (service,)) is None
    big = b"x" * nativeproto.SMALL_FRAME
    assert await in_thread(call_and_wait, remote, "echo", (big,)) is None
    # nothing half-sent: the connection still works
    assert await remote.callRemote("echo", 5) == 5


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_a_waiting_thread(connection):
    remote, service = connection
    waiter = await in_thread(remote.proto.call_from_thread, remote.oid, "wait", (), {})
    for _ in range(2000):
        if service.gate is not None:
            break
        await task.deferLater(reactor, 0.005, lambda: None)  # let the call arrive
    assert service.gate is not None
    remote.disconnect()
    assert await in_thread(waiter.wait, 20)
    assert waiter.failed and waiter.value.check(error.ConnectionLost)
    # and a closed connection sends nothing from a thread
    assert await in_thread(call_and_wait, remote, "echo", (1,)) is None


def test_a_connection_that_is_not_plain_tcp_sends_nothing_from_a_thread():
    proto = NativeProtocol(KEY, is_client=True)
    assert proto.call_from_thread(1, "echo", (1,), {}) is None


# -- headers ------------------------------------------------------------------------


def test_nested_tagged_values_are_rebuilt_inside_out():
    """The decoder rebuilds tags from already-rebuilt contents: tuples in
    tuples, tuple keys of non-str-keyed dicts, bytes inside tuples inside
    lists, dicts whose single key looks like a tag."""
    value = [
        ((1, (2, (3,))), {(1, 2): [b"x", (b"y",)]}),
        {"\0t": "not a tuple"},
        {"a": {"b": {"c": ({"d": (None,)},)}}},
    ]
    header, buffers = nativeproto.encode(value)
    assert nativeproto.decode(header, [bytearray(bytes(b)) for b in buffers]) == value


@pytest.mark.parametrize(
    "header",
    [
        b'{"\\u0000p": [[[1], 2]]}',  # a list as a dict key
        b'{"\\u0000p": [[1]]}',  # a pair of one
        b'{"\\u0000t": 5}',  # a tuple that is not a list
        b'{"\\u0000c": ["no such type", {}]}',
        b'{"\\u0000q": 1}',  # no such tag
        b"[1, 2",  # not JSON
        b"\xff[]",  # not UTF-8
    ],
)
def test_malformed_headers_are_protocol_errors(header):
    with pytest.raises(ProtocolError):
        nativeproto.decode(header, [])


# -- frames -------------------------------------------------------------------------


def test_frames_with_and_without_buffers_read_together_keep_their_order():
    writer = FrameWriter(KEY)
    wire = b"".join(
        writer.frame(h, bs).small() for h, bs in [(b"[1]", []), (b"[2]", [b"b"]), (b"[3]", [])]
    )
    assert frames(wire) == [(b"[1]", []), (b"[2]", [b"b"]), (b"[3]", [])]
    reader = FrameReader(KEY)
    got = reader.feed(wire[:7]) + reader.feed(wire[7:])  # a frame split across reads
    assert [h for h, _ in got] == [b"[1]", b"[2]", b"[3]"]


@pytest.mark.parametrize("where", ["header", "tag", "sequence"])
def test_a_whole_frame_without_buffers_is_checked_as_any_other(where):
    from kernel.error import SecurityError

    writer = FrameWriter(KEY)
    first = writer.frame(b'["x"]', []).small()
    second = writer.frame(b'["y"]', []).small()
    if where == "header":
        wire = first.replace(b'"x"', b'"z"')
    elif where == "tag":
        wire = first[:-1] + bytes([first[-1] ^ 1])
    else:
        wire = second  # out of sequence
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(wire)


@pytest.mark.parametrize("where", ["buffer", "closing tag", "first tag"])
def test_a_whole_small_frame_with_buffers_is_checked_as_any_other(where):
    from kernel.error import SecurityError

    wire = bytearray(FrameWriter(KEY).frame(b"[1]", [b"payload", b""]).small())
    at = {"buffer": wire.index(b"payload"), "closing tag": len(wire) - 1}.get(where)
    if at is None:  # the first tag ends where the buffers start
        at = wire.index(b"payload") - 1
    wire[at] ^= 1
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(bytes(wire))


def test_a_controller_reading_a_whole_small_frame_keeps_each_buffers_digest():
    import hashlib

    wire = FrameWriter(KEY).frame(b"[1]", [b"abc", b""]).small()
    ((header, buffers),) = FrameReader(KEY, routing=True).feed(wire)
    assert [bytes(b) for b in buffers] == [b"abc", b""]
    assert all(type(b) is nativeproto.RoutedBuffer and b.stream is None for b in buffers)
    assert [b.sha256 for b in buffers] == [
        hashlib.sha256(b"abc").digest(),
        hashlib.sha256().digest(),
    ]
    # a frame forwarding them, signed with those digests, verifies on the next hop
    forwarded = FrameWriter(b"k" * 32).frame(header, buffers).small()
    assert frames(forwarded, key=b"k" * 32) == [(b"[1]", [b"abc", b""])]


def test_a_small_frame_with_buffers_is_signed_to_the_same_bytes_as_any_frame(monkeypatch):
    import hashlib

    import numpy as np

    routed = nativeproto.RoutedBuffer(b"routed")
    routed.sha256 = hashlib.sha256(b"routed").digest()
    buffers = [b"bytes", bytearray(b"array"), memoryview(np.arange(3.0)), routed, b""]
    fast = FrameWriter(KEY).frame(b'["h"]', buffers)
    assert fast.mac is None  # signed and joined at once
    monkeypatch.setattr(nativeproto, "SMALL_FRAME", 0)  # the general path
    general = FrameWriter(KEY).frame(b'["h"]', buffers)
    assert general.mac is not None
    assert fast.small() == b"".join(general.segments())
    ((_, got),) = FrameReader(KEY).feed(fast.small())
    assert [bytes(b) for b in got] == [bytes(memoryview(b).cast("B")) for b in buffers]
