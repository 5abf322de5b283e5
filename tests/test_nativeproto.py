"""The native transport's wire: frames, signatures, limits, calls (no real sockets)."""

from __future__ import annotations

import os

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from kernel import nativeproto
from kernel.error import ProtocolError, SecurityError
from kernel.nativeproto import (
    FrameReader,
    FrameWriter,
    NativeProtocol,
    NativeRemote,
    decode,
    encode,
    session_keys,
)
from kernel.serialized import Serialized

KEY = bytes(range(32))
TAG = nativeproto.TAG_BYTES


def frames_of(writer: FrameWriter, header: bytes, buffers: list) -> bytes:
    return b"".join(bytes(s) for s in writer.frame(header, buffers).segments())


# -- frames --------------------------------------------------------------------


def test_a_frame_round_trips_with_its_buffers():
    data = frames_of(FrameWriter(KEY), b'{"x":1}', [b"abc", bytearray(b"\x00" * 70_000)])
    ((header, buffers),) = FrameReader(KEY).feed(data)
    assert header == b'{"x":1}'
    assert buffers == [bytearray(b"abc"), bytearray(70_000)]
    assert all(type(b) is bytearray for b in buffers)


def test_frames_arriving_a_byte_at_a_time_are_rebuilt():
    w = FrameWriter(KEY)
    data = frames_of(w, b"[1]", [b"xy", b"", b"z" * 300]) + frames_of(w, b"[2]", [])
    reader = FrameReader(KEY)
    got = []
    for i in range(len(data)):
        got += reader.feed(data[i : i + 1])
    assert [(h, [bytes(b) for b in bs]) for h, bs in got] == [
        (b"[1]", [b"xy", b"", b"z" * 300]),
        (b"[2]", []),
    ]


def test_several_frames_in_one_read_are_all_delivered():
    w = FrameWriter(KEY)
    data = b"".join(frames_of(w, f"[{i}]".encode(), [bytes([i]) * 5]) for i in range(10))
    got = FrameReader(KEY).feed(data)
    assert [h for h, _ in got] == [f"[{i}]".encode() for i in range(10)]


def test_a_wrong_key_fails_at_the_header_tag():
    data = frames_of(FrameWriter(b"\x01" * 32), b"[]", [b"payload"])
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(data)


def test_a_tampered_buffer_fails_at_the_closing_tag():
    data = bytearray(frames_of(FrameWriter(KEY), b"[]", [b"payload"]))
    data[-40] ^= 1  # inside the buffer
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(bytes(data))


def test_a_replayed_frame_does_not_verify():
    """Tags cover a sequence number: the same frame sent twice is refused."""
    frame = frames_of(FrameWriter(KEY), b"[]", [])
    reader = FrameReader(KEY)
    assert len(reader.feed(frame)) == 1
    with pytest.raises(SecurityError):
        reader.feed(frame)


def test_an_oversized_header_is_refused_before_it_is_read(monkeypatch):
    monkeypatch.setattr(nativeproto, "MAX_HEADER_BYTES", 100)
    prefix = nativeproto._PREFIX.pack(nativeproto.MAGIC, 101, 0)
    with pytest.raises(ProtocolError, match="refusing a frame"):
        FrameReader(KEY).feed(prefix)


def test_an_oversized_frame_is_refused_before_room_is_allocated(monkeypatch):
    """The buffer sizes are checked once the header's tag verifies, before
    any room for the buffers is allocated."""
    frame = FrameWriter(KEY).frame(b"[]", [b"y" * 2000])
    monkeypatch.setattr(nativeproto, "MAX_FRAME_BYTES", 1000)
    reader = FrameReader(KEY)
    with pytest.raises(ProtocolError, match="refusing a frame of 2000 bytes"):
        reader.feed(frame.head)
    assert reader._buffers == []


def test_the_writer_refuses_a_frame_over_the_limit(monkeypatch):
    monkeypatch.setattr(nativeproto, "MAX_FRAME_BYTES", 1000)
    with pytest.raises(ProtocolError, match="exceeds the native transport's limits"):
        FrameWriter(KEY).frame(b"[]", [b"x" * 2000])


def test_the_writer_hands_buffers_over_without_copying_them():
    big = os.urandom(100_000)
    view = memoryview(bytearray(50_000))
    frame = FrameWriter(KEY).frame(b"[]", [big, view])
    assert frame.buffers[0] is big
    assert isinstance(frame.buffers[1], memoryview) and frame.buffers[1].obj is view.obj


def test_session_keys_differ_by_direction_and_by_connection():
    c2s, s2c = session_keys(KEY, b"a" * 32, b"b" * 32)
    assert c2s != s2c
    assert session_keys(KEY, b"a" * 32, b"c" * 32)[0] != c2s
    # the same nonce on both sides (a reflected hello) still gives two keys
    c, s = session_keys(KEY, b"a" * 32, b"a" * 32)
    assert c != s


# -- values --------------------------------------------------------------------


def test_values_round_trip_through_json_headers_and_buffers():
    value = {
        "plain": [1, 2.5, "three", None, True],
        "tuple": (1, (2, 3)),
        "int keys": {1: "a", 2: "b"},
        "\0tricky": "a key that looks like a tag",
        "bytes": b"\x00\x01",
        "long text": "é" * 100_000,
        "blob": Serialized(b"stream", [bytearray(b"buf")]),
    }
    header, buffers = encode(value)
    back = decode(header, [bytearray(bytes(b)) for b in buffers])
    assert back == value
    assert type(back["blob"].buffers[0]) is bytearray


def test_headers_are_json_and_never_pickle():
    header, buffers = encode({"blob": Serialized(b"\x80\x05pickled", [])})
    import json

    json.loads(header)  # plain JSON
    assert b"\x80\x05pickled" not in header and buffers[0] == b"\x80\x05pickled"


def test_an_object_that_is_neither_data_nor_remote_is_not_sent():
    with pytest.raises(ProtocolError, match="cannot send a set"):
        encode({1, 2})


def test_a_value_pointing_at_a_missing_buffer_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="missing buffer"):
        decode(b'{"\\u0000b": 3}', [])


# -- connections ---------------------------------------------------------------


class Service:
    """An object offered to the peer."""

    def __init__(self):
        self.calls = []
        self.waiting: list[Deferred] = []

    def remote_echo(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return [list(args), kwargs]

    def remote_later(self):
        d = Deferred()
        self.waiting.append(d)
        return d

    def remote_fail(self):
        raise ValueError("nope")

    def remote_callback(self, remote, value):
        return remote.callRemote("echo", value)

    def _remote_hidden(self):  # pragma: no cover - must never be reachable
        raise AssertionError("called")


def pair(client_key=KEY, server_key=KEY):
    service = Service()
    gateway = nativeproto.Gateway({"svc": service})
    client, server, pump = iosim.connectedServerAndClient(
        lambda: NativeProtocol(server_key, is_client=False, root=gateway),
        lambda: NativeProtocol(client_key, is_client=True),
    )
    pump.flush()
    return client, server, pump, service


def get(client, pump, name="svc"):
    d = client.call(0, "get", (name,), {})
    pump.flush()
    return result_of(d)


def result_of(d: Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_handshake_authenticates_both_sides():
    client, server, pump, _ = pair()
    assert result_of(client.authenticated) is client
    assert result_of(server.authenticated) is server


def test_calls_reach_the_service_and_replies_come_back():
    client, _, pump, service = pair()
    svc = get(client, pump)
    assert isinstance(svc, NativeRemote)
    d = svc.callRemote("echo", 1, (2, 3), big=b"x" * 100)
    pump.flush()
    assert result_of(d) == [[1, (2, 3)], {"big": b"x" * 100}]


def test_pipelined_calls_are_answered_by_id_in_any_order():
    client, _, pump, service = pair()
    svc = get(client, pump)
    first = svc.callRemote("later")
    second = svc.callRemote("later")
    pump.flush()
    service.waiting[1].callback("second")
    pump.flush()
    assert result_of(second) == "second"
    assert not first.called
    service.waiting[0].callback("first")
    pump.flush()
    assert result_of(first) == "first"


def test_a_failing_method_fails_the_call_with_a_protocol_error():
    client, _, pump, _ = pair()
    svc = get(client, pump)
    d = svc.callRemote("fail")
    pump.flush()
    with pytest.raises(ProtocolError, match="ValueError: nope"):
        result_of(d)


def test_private_and_missing_methods_cannot_be_called():
    client, _, pump, _ = pair()
    svc = get(client, pump)
    hidden = svc.callRemote("_hidden")
    missing = svc.callRemote("nothing")
    pump.flush()
    with pytest.raises(ProtocolError, match="bad method name"):
        result_of(hidden)
    with pytest.raises(ProtocolError, match="no remote method"):
        result_of(missing)


def test_objects_with_remote_methods_travel_as_references_both_ways():
    client, _, pump, service = pair()
    svc = get(client, pump)
    mine = Service()
    d = svc.callRemote("callback", mine, "hi")
    pump.flush()
    assert result_of(d) == [["hi"], {}]
    assert mine.calls == [(("hi",), {})]


def test_one_way_calls_get_no_reply():
    client, server, pump, service = pair()
    svc = get(client, pump)
    svc.callRemoteOnly("echo", 5)
    pump.flush()
    assert service.calls == [((5,), {})]
    assert not client._calls


def test_a_lost_connection_fails_pending_calls_and_tells_watchers():
    client, server, pump, service = pair()
    svc = get(client, pump)
    told = []
    svc.notifyOnDisconnect(told.append, "gone")
    d = svc.callRemote("later")
    pump.flush()
    server.transport.loseConnection()
    pump.flush()
    with pytest.raises(error.ConnectionLost):
        result_of(d)
    assert told == ["gone"]


def test_a_wrong_key_drops_the_connection_with_a_logged_security_error(caplog):
    from twisted.python import log

    messages = []
    log.addObserver(messages.append)
    try:
        client, server, pump, service = pair(client_key=b"\x02" * 32)
    finally:
        log.removeObserver(messages.append)
    with pytest.raises(SecurityError, match="refused this connection's cluster key"):
        result_of(client.authenticated)
    with pytest.raises(SecurityError):
        result_of(server.authenticated)
    assert server.transport.disconnecting and client.transport.disconnecting
    assert any("SecurityError" in " ".join(map(str, m.get("message", ()))) for m in messages)
    assert service.calls == []
    # nothing can be called over it
    with pytest.raises(error.ConnectionLost):
        result_of(client.call(0, "get", ("svc",), {}))


def test_a_server_without_the_key_is_caught_by_the_client():
    """Mutual authentication: a server that cannot sign with the cluster key
    is refused by the client, whatever it answers."""
    client, server, pump, _ = pair(server_key=b"\x03" * 32)
    with pytest.raises(SecurityError):
        result_of(client.authenticated)
    with pytest.raises(SecurityError):  # and the server refused the client
        result_of(server.authenticated)


def test_a_peer_speaking_another_protocol_is_dropped():
    proto = NativeProtocol(KEY, is_client=False, root=nativeproto.Gateway({}))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.authenticated.addErrback(lambda f: None)
    proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40)
    assert transport.disconnecting


def test_large_buffers_are_written_whole_or_in_slices_never_joined():
    """A large ``bytes`` is handed to the transport as the very object; other
    large buffers go out in WRITE_SLICE pieces as the transport drains; the
    closing tag, computed as the pieces are written, verifies."""

    class Recording(StringTransport):
        def __init__(self):
            super().__init__()
            self.writes: list = []

        def write(self, data):
            self.writes.append(data)
            super().write(data)

        def writeSequence(self, seq):
            for data in seq:
                self.write(data)

    transport = Recording()
    outbox = nativeproto._Outbox(transport)
    big = os.urandom(3 * nativeproto.WRITE_SLICE)
    view = memoryview(bytearray(os.urandom(2 * nativeproto.WRITE_SLICE + 5000)))
    writer = FrameWriter(KEY)
    outbox.send(writer.frame(b"[1]", [b"small", big, view]))
    outbox.send(writer.frame(b"[2]", []))
    while outbox.queue:
        assert transport.producer is outbox
        outbox.resumeProducing()  # the transport drained
    assert any(w is big for w in transport.writes)
    pieces = [len(w) for w in transport.writes if w is not big and len(w) > 1000]
    assert pieces == [nativeproto.WRITE_SLICE, nativeproto.WRITE_SLICE, 5000]
    assert transport.producer is None  # unregistered once empty
    got = FrameReader(KEY).feed(transport.value())
    assert [(h, [bytes(b) for b in bs]) for h, bs in got] == [
        (b"[1]", [b"small", big, bytes(view)]),
        (b"[2]", []),
    ]


def test_buffers_can_be_received_straight_into_the_room_the_reader_allocated():
    """What the TCP fast path does: ``recv_into`` the reader's room."""
    payload = os.urandom(10_000)
    data = frames_of(FrameWriter(KEY), b"[]", [payload, b"tail"])
    reader = FrameReader(KEY)
    head_len = len(data) - len(payload) - 4 - nativeproto.TAG_BYTES
    assert reader.feed(data[:head_len]) == []
    pos = head_len
    while (room := reader.room()) is not None:
        n = min(len(room), 3000)  # a short read
        room[:n] = data[pos : pos + n]
        reader.received_into(n)
        pos += n
    ((header, buffers),) = reader.feed(data[pos:])
    assert buffers == [bytearray(payload), bytearray(b"tail")]


def test_large_buffers_go_straight_to_the_socket_while_it_takes_them():
    """On TCP the outbox sends large buffers from their own memory; when the
    socket is full only a small piece goes through the transport, which calls
    back once it has drained. The bytes arrive complete, in order, signed."""

    class FullingSocket:
        """Takes up to ``room`` bytes, then is full until drained."""

        def __init__(self):
            self.sent = bytearray()
            self.room = 300_000
            self.objects = []

        def send(self, view):
            if not self.room:
                raise BlockingIOError
            n = min(len(view), self.room)
            self.objects.append(view.obj)
            self.sent += view[:n]
            self.room -= n
            return n

    transport = StringTransport()
    sock = FullingSocket()
    outbox = nativeproto._Outbox(transport)
    outbox.sock = sock
    array = bytearray(os.urandom(5 * nativeproto.WRITE_SLICE + 123))
    writer = FrameWriter(KEY)
    outbox.send(writer.frame(b"[1]", [memoryview(array)]))
    wire = bytearray()
    while outbox.queue:
        # the transport sends what it holds, the socket drains, the transport calls back
        held = transport.value()
        transport.clear()
        assert len(held) <= nativeproto.WAKE_PIECE + 1000
        wire += held
        sock.room = 300_000
        outbox.resumeProducing()
        wire += sock.sent
        sock.sent = bytearray()
    wire += transport.value()
    assert all(obj is array for obj in sock.objects)  # no copies handed to the socket
    ((header, buffers),) = FrameReader(KEY).feed(bytes(wire))
    assert header == b"[1]" and buffers == [array]


def test_a_controller_forwards_received_buffers_without_hashing_them_again():
    """A routing reader keeps each buffer's SHA-256; a writer uses it instead
    of reading the buffer again, and the next hop still verifies the frame."""
    import hashlib

    payload = os.urandom(200_000)
    routed = FrameReader(KEY, routing=True).feed(frames_of(FrameWriter(KEY), b"[]", [payload, b""]))
    ((_, buffers),) = routed
    assert all(type(b) is nativeproto.RoutedBuffer for b in buffers)
    assert buffers[0].sha256 == hashlib.sha256(payload).digest()
    frame = FrameWriter(b"\x05" * 32).frame(b"[]", buffers)
    assert all(h.sha is None for h in frame.hashes)  # nothing to hash again
    data = b"".join(bytes(s) for s in frame.segments())
    ((_, again),) = FrameReader(b"\x05" * 32).feed(data)
    assert again == [bytearray(payload), bytearray()]
    assert all(type(b) is bytearray for b in again)  # not a routing reader


def test_a_forwarded_buffer_changed_after_it_was_received_does_not_verify():
    ((_, buffers),) = FrameReader(KEY, routing=True).feed(
        frames_of(FrameWriter(KEY), b"[]", [b"x" * 1000])
    )
    buffers[0][0] ^= 1
    data = b"".join(bytes(s) for s in FrameWriter(KEY).frame(b"[]", buffers).segments())
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(data)


def test_only_the_methods_of_a_targets_remote_interface_can_be_called():
    """A server half declaring a Foolscap RemoteInterface answers only the
    methods it lists (plus its ``native_remote_methods``)."""
    from zope.interface import implementer

    from kernel.enginefc import RIEngine
    from kernel.enginenative import NativeEngineReferenceFromService

    @implementer(RIEngine)
    class Leaky(NativeEngineReferenceFromService):
        def remote_secret(self):  # pragma: no cover - must never be reachable
            raise AssertionError("called")

    exposed = Leaky(object())  # no engine needed: only ping is answered
    gateway = nativeproto.Gateway({"engine": exposed})
    client, server, pump = iosim.connectedServerAndClient(
        lambda: NativeProtocol(KEY, is_client=False, root=gateway),
        lambda: NativeProtocol(KEY, is_client=True),
    )
    pump.flush()
    engine = get(client, pump, "engine")
    secret = engine.callRemote("secret")
    ping = engine.callRemote("ping")
    pump.flush()
    with pytest.raises(ProtocolError, match="no remote method 'secret' on RIEngine"):
        result_of(secret)
    assert result_of(ping) == ("ok", "pong")
    nativeproto._check_remote_interface(exposed, "clear_queue")  # a native extra


def test_a_peer_sending_an_oversized_frame_is_dropped_and_nothing_runs(monkeypatch):
    client, server, pump, service = pair()
    svc = get(client, pump)
    d = svc.callRemote("echo", b"x" * 5000)  # written now, under the sender's limit
    monkeypatch.setattr(nativeproto, "MAX_FRAME_BYTES", 1000)  # the receiver's limit
    pump.flush()
    assert service.calls == []
    assert server.transport.disconnecting
    with pytest.raises(error.ConnectionLost):
        result_of(d)


# -- receive buffers and lent replies ----------------------------------------------


def test_a_reader_with_a_pool_receives_into_a_free_buffer_again_never_a_held_one():
    from kernel.bufferpool import MIN_BYTES, BufferPool

    pool = BufferPool()
    payload = os.urandom(MIN_BYTES)
    writer, reader = FrameWriter(KEY), FrameReader(KEY, pool=pool)
    ((_, (first,)),) = reader.feed(frames_of(writer, b"[]", [payload]))
    first_id = id(first)
    held = first
    ((_, (second,)),) = reader.feed(frames_of(writer, b"[]", [payload[::-1]]))
    assert second is not held and held == payload  # the held one is untouched
    assert second == payload[::-1]
    del first, held, second
    ((_, (third,)),) = reader.feed(frames_of(writer, b"[]", [payload]))
    assert id(third) == first_id  # the first buffer, free again, is received into
    assert pool.tracked_bytes == 2 * MIN_BYTES
    assert third == payload and type(third) is bytearray


def _recording_outbox():
    transport = StringTransport()
    return nativeproto._Outbox(transport), transport


def test_a_written_notice_runs_once_a_large_buffer_has_left_its_memory():
    outbox, transport = _recording_outbox()
    big = bytearray(os.urandom(3 * nativeproto.WRITE_SLICE))
    told = []
    outbox.send(FrameWriter(KEY).frame(b"[]", [memoryview(big)]))
    outbox.notify(lambda: told.append(len(transport.value())))
    assert told == []  # the first slice is with the transport, the rest still in `big`
    while outbox.queue:
        outbox.resumeProducing()
    assert told == [len(transport.value())]
    ((_, (got,)),) = FrameReader(KEY).feed(transport.value())
    assert got == big


def test_a_written_notice_runs_at_once_with_nothing_queued_and_when_the_queue_is_dropped():
    outbox, _ = _recording_outbox()
    told = []
    outbox.notify(lambda: told.append("idle"))
    assert told == ["idle"]
    outbox.send(FrameWriter(KEY).frame(b"[]", [memoryview(bytearray(3 * nativeproto.WRITE_SLICE))]))
    outbox.notify(lambda: told.append("dropped"))
    outbox.stopProducing()  # the connection went away
    assert told == ["idle", "dropped"] and not outbox.queue


def test_a_reply_wrapped_in_after_written_is_sent_as_its_value_and_then_releases():
    client, _, pump, service = pair()
    told = []
    service.remote_lend = lambda: nativeproto.AfterWritten(
        {"blob": Serialized(b"s", [bytearray(b"lent")])}, lambda: told.append("released")
    )
    svc = get(client, pump)
    d = svc.callRemote("lend")
    pump.flush()
    reply = result_of(d)
    assert bytes(reply["blob"].buffers[0]) == b"lent"
    assert told == ["released"]


def test_a_reply_lent_on_a_closed_connection_releases_at_once():
    client, server, pump, service = pair()
    told = []
    gate = Deferred()
    service.remote_lend = lambda: gate
    svc = get(client, pump)
    svc.callRemote("lend").addErrback(lambda f: None)
    pump.flush()
    server.transport.loseConnection()
    pump.flush()
    gate.callback(nativeproto.AfterWritten("late", lambda: told.append("released")))
    assert told == ["released"]


# -- large frames: one Poly1305 over the buffers -------------------------------------


BIG = nativeproto.ONE_TIME_MAC_BYTES


def test_a_large_frame_round_trips_and_is_signed_with_a_one_time_mac():
    payload = os.urandom(BIG)
    frame = FrameWriter(KEY).frame(b"[]", [payload, b"", b"tail"])
    assert isinstance(frame.mac, nativeproto._OneTimeClosing)
    data = b"".join(bytes(s) for s in frame.segments())
    ((_, got),) = FrameReader(KEY).feed(data)
    assert got == [bytearray(payload), bytearray(), bytearray(b"tail")]


@pytest.mark.parametrize("where", ["first buffer", "last buffer", "closing tag"])
def test_a_large_frame_tampered_anywhere_after_its_header_does_not_verify(where):
    payload = os.urandom(BIG)
    data = bytearray(frames_of(FrameWriter(KEY), b"[]", [payload, b"tail"]))
    tags = TAG + nativeproto.E2E_TAG_BYTES  # (the closing part: the seal's tag, the frame's)
    pos = {"first buffer": -tags - 4 - 1000, "last buffer": -tags - 2, "closing tag": -1}[where]
    data[pos] ^= 1
    with pytest.raises(SecurityError):
        FrameReader(KEY).feed(bytes(data))


def test_a_large_frame_under_another_key_or_sequence_number_does_not_verify():
    payload = os.urandom(BIG)
    writer = FrameWriter(KEY)
    first = frames_of(writer, b"[]", [payload])
    second = frames_of(writer, b"[]", [payload])
    reader = FrameReader(KEY)
    reader.feed(first)
    with pytest.raises(SecurityError):
        reader.feed(first)  # replayed: the sequence number moved on
    with pytest.raises(SecurityError):
        FrameReader(bytes(32)).feed(second)


def test_large_buffers_a_controller_received_go_on_with_their_seal_to_the_next_hop():
    payload = os.urandom(BIG)
    ((_, buffers),) = FrameReader(KEY, routing=True).feed(
        frames_of(FrameWriter(KEY), b"[]", [payload])
    )
    other = b"\x05" * 32  # the next hop's session key; KEY stands for the cluster key
    frame = FrameWriter(other, cluster_key=KEY).frame(b"[]", buffers)
    assert type(frame.hashes[0]) is nativeproto._ForwardedSeal  # not read again
    data = b"".join(bytes(s) for s in frame.segments())
    ((_, again),) = FrameReader(other, cluster_key=KEY).feed(data)
    assert again == [bytearray(payload)]
