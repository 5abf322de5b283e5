"""End-to-end seals on the native wire: a controller forwards a large buffer
with the seal its sender made, without reading it, and only the final
receiver checks it (no real sockets: three parties over iosim)."""

from __future__ import annotations

import os

import pytest
from twisted.test import iosim

from kernel import nativeproto
from kernel.error import EngineError, ProtocolError, SecurityError
from kernel.nativeproto import FrameReader, FrameWriter, RoutedBuffer
from kernel.serialized import Serialized
from tests.test_nativecut import BIG, KEY, MB, Cluster, outgoing, result_of

E2E_TAG = nativeproto.E2E_TAG_BYTES
TAG = nativeproto.TAG_BYTES


@pytest.fixture
def poly_bytes(monkeypatch):
    """Counts every byte any Poly1305 of the native wire is fed (the seam
    every one of them is made through)."""
    count = [0]
    make = nativeproto._poly1305

    class Counting:
        def __init__(self, key):
            self.poly = make(key)

        def update(self, data):
            count[0] += memoryview(data).nbytes
            self.poly.update(data)

        def finalize(self):
            return self.poly.finalize()

    monkeypatch.setattr(nativeproto, "_poly1305", Counting)
    return count


def start_of_last_buffer(data, size):
    """Where the last buffer (``size`` bytes, sealed) of a frame begins."""
    return len(data) - size - TAG - E2E_TAG


def settle(c, rounds=10):
    """Run every connection until nothing moves (a pull producer is resumed
    only once its transport has been emptied, one flush at a time)."""
    for _ in range(rounds):
        c.flush_engines()
        c.client_pump.flush()


def push_in_two_parts(c, blob, n=1, tamper=None):
    """The client's push reaches the controller in two reads, the second
    from the first byte of its large buffer on (so it is cut through:
    forwarded while it arrives, as when received straight into place);
    ``tamper`` flips a byte, counted from the end."""
    d = c.remote.callRemote("push", blob, n=n)
    data = bytearray(c.client_bytes())
    half = start_of_last_buffer(data, BIG)
    if tamper is not None:
        data[-tamper] ^= 1
    c.ctrl.dataReceived(bytes(data[:half]))
    c.flush_engines()
    c.ctrl.dataReceived(bytes(data[half:]))
    settle(c)
    return d


def controller_received(c):
    """The controller's RoutedBuffers of the last client frame it read."""
    return [b for b in c.ctrl._reader._buffers if type(b) is RoutedBuffer]


# -- push: client -> controller -> engine ----------------------------------------


def test_a_forwarded_push_lands_byte_exact_and_the_controller_makes_no_mac_pass(poly_bytes):
    c = Cluster()
    blob = Serialized(b"stream", [os.urandom(BIG)])
    poly_bytes[0] = 0
    d = push_in_two_parts(c, blob)
    assert result_of(d) == [BIG]
    (got,) = c.stores[0].stored
    assert bytes(got.buffers[0]) == bytes(blob.buffers[0])
    # the client seals the buffer once, the engine checks it once: nothing
    # in between (a controller pass would add BIG, a re-seal BIG more)
    assert 2 * BIG <= poly_bytes[0] < 2 * BIG + 1024


def test_a_push_to_three_engines_is_checked_by_each_engine_and_never_by_the_controller(
    poly_bytes,
):
    c = Cluster(n_engines=3)
    blob = Serialized(b"stream", [os.urandom(BIG)])
    poly_bytes[0] = 0
    assert result_of(push_in_two_parts(c, blob, n=3)) == [BIG] * 3
    for store in c.stores:
        assert bytes(store.stored[0].buffers[0]) == bytes(blob.buffers[0])
    assert 4 * BIG <= poly_bytes[0] < 4 * BIG + 1024  # one seal, three checks


def test_a_buffer_tampered_between_client_and_controller_is_refused_by_the_engine():
    c = Cluster()
    d = push_in_two_parts(c, Serialized(b"stream", [os.urandom(BIG)]), tamper=TAG + E2E_TAG + 1000)
    assert c.stores[0].stored == []  # nothing stored
    assert isinstance(result_of(d).value, Exception)  # the client's call failed
    assert not c.ctrl.transport.disconnecting  # (the controller never read the bytes)
    engine, ctrl_side, _ = c.engine_links[0]
    assert not engine.transport.disconnecting  # a bad forwarded buffer is dropped, not the link
    again = c.remote.callRemote("push", Serialized(b"s", [b"small"]))
    c.client_pump.flush()
    c.flush_engines()
    c.client_pump.flush()
    assert result_of(again) == [5]


def test_a_buffer_tampered_between_controller_and_engine_is_refused_and_nothing_is_stored():
    c = Cluster()
    engine, ctrl_side, pump = c.engine_links[0]
    d = c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    c.ctrl.dataReceived(data[len(data) // 2 :])
    wire = bytearray(outgoing(ctrl_side))  # what the controller sends the engine
    wire[-TAG - E2E_TAG - 5000] ^= 1
    engine.dataReceived(bytes(wire))
    assert c.stores[0].stored == []
    pump.flush()  # the engine's answer: an error
    c.client_pump.flush()
    assert isinstance(result_of(d).value, Exception)


def test_the_forwarded_seal_tag_itself_tampered_is_refused_by_the_engine():
    c = Cluster()
    engine, ctrl_side, _ = c.engine_links[0]
    c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    c.ctrl.dataReceived(data[len(data) // 2 :])
    wire = bytearray(outgoing(ctrl_side))
    wire[-TAG - 3] ^= 1  # in the seal's tag: the frame's session tag covers it
    with pytest.raises(SecurityError):
        engine._reader.feed(bytes(wire))
    assert c.stores[0].stored == []


# -- replays and forged origins --------------------------------------------------


def forwarded_wire(c, link=0):
    """A push forwarded to engine ``link``: the bytes the engine would get."""
    _, ctrl_side, _ = c.engine_links[link]
    c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = c.client_bytes()
    c.ctrl.dataReceived(data[: len(data) // 2])
    c.ctrl.dataReceived(data[len(data) // 2 :])
    return outgoing(ctrl_side)


def test_a_forwarded_frame_replayed_later_on_the_same_connection_is_refused():
    c = Cluster()
    engine = c.engine_links[0][0]
    wire = forwarded_wire(c)
    engine._reader.feed(wire)  # (read once: as sent)
    with pytest.raises(SecurityError):
        engine._reader.feed(wire)


def test_a_forwarded_frame_replayed_into_another_connection_is_refused():
    c = Cluster(n_engines=2)
    wire = forwarded_wire(c, link=0)
    other = c.engine_links[1][0]
    with pytest.raises(SecurityError):
        other._reader.feed(wire)
    assert c.stores[1].stored == []


def resend_seal(writer, header, buf, origin, tag):
    """A frame ``writer`` signs (as its connection's own) that passes on
    ``buf`` under the given seal."""
    rb = RoutedBuffer(buf)
    rb.origin, rb.tag = origin, tag
    return b"".join(bytes(s) for s in writer.frame(header, [rb]).segments())


def first_seal(wire):
    """(origin, tag) of the one sealed buffer of a frame on the wire."""
    count = int.from_bytes(wire[8:12], "big")
    at = 12 + 8 * count
    return wire[at : at + nativeproto.ORIGIN_BYTES], wire[-TAG - E2E_TAG : -TAG]


def test_a_client_cannot_pass_an_earlier_frames_seal_to_the_controller():
    c = Cluster()
    payload = os.urandom(BIG)
    d = push_in_two_parts(c, Serialized(b"stream", [payload]))
    assert result_of(d) == [BIG]
    # what the client sent: its origin and tag, replayed by the client itself
    # (it holds the session key) in a later frame, with the same bytes
    first = b"".join(bytes(s) for s in c.client._writer.frame(b"[]", [payload]).segments())
    c.ctrl._reader.feed(first)  # (read as sent)
    origin, tag = first_seal(first)
    replay = resend_seal(c.client._writer, b'["o", 1, "push", [], {}]', payload, origin, tag)
    with pytest.raises(SecurityError, match="origin"):
        c.ctrl._reader.feed(replay)


def test_an_engine_refuses_a_seal_naming_an_earlier_frame_of_its_controller():
    c = Cluster()
    engine, ctrl_side, _ = c.engine_links[0]
    wire = forwarded_wire(c)
    engine._reader.feed(wire)
    # the controller's own earlier frame on this connection, named again
    mine = ctrl_side._writer.frame(b"[]", [b"x" * BIG])
    segs = b"".join(bytes(s) for s in mine.segments())
    engine._reader.feed(segs)  # as sent: fine
    origin, tag = first_seal(segs)
    replay = resend_seal(ctrl_side._writer, b"[]", b"x" * BIG, origin, tag)
    with pytest.raises(SecurityError, match="origin"):
        engine._reader.feed(replay)


def test_a_controller_refuses_a_client_frame_naming_another_connections_origin():
    c = Cluster()
    foreign = os.urandom(64) + b"c" + bytes(12)
    replay = resend_seal(c.client._writer, b"[]", b"y" * BIG, foreign, bytes(16))
    with pytest.raises(SecurityError, match="origin"):
        c.ctrl._reader.feed(replay)


def test_an_engine_refuses_a_forged_origin_whose_tag_was_not_made_with_the_cluster_key():
    c = Cluster()
    engine, ctrl_side, _ = c.engine_links[0]
    forged = os.urandom(64) + b"c" + bytes(12)
    other = FrameWriter(KEY, cluster_key=b"\x07" * 32, origin=forged[:65])
    made = b"".join(bytes(s) for s in other.frame(b"[]", [b"z" * BIG]).segments())
    _, tag = first_seal(made)  # a real Poly1305 tag, under another cluster key
    wire = resend_seal(ctrl_side._writer, b'["c", 99, 1, "store", [], {}]', b"z" * BIG, forged, tag)
    (item,) = engine._reader.feed(wire)
    assert type(item) is nativeproto.Aborted  # dropped unread
    assert c.stores[0].stored == []


# -- pull: engine -> controller -> client ----------------------------------------


def pull_in_two_parts(c, tamper=None, to_client=None):
    d = c.remote.callRemote("pull")
    c.client_pump.flush()
    engine, ctrl_side, pump = c.engine_links[0]
    pump.pump()  # the call reaches the engine
    out = bytearray(outgoing(engine))
    if tamper is not None:
        out[-tamper] ^= 1
    half = start_of_last_buffer(out, BIG)
    ctrl_side.dataReceived(bytes(out[:half]))
    ctrl_side.dataReceived(bytes(out[half:]))
    wire = bytearray(outgoing(c.ctrl))
    if to_client is not None:
        wire[-to_client] ^= 1
    c.client.dataReceived(bytes(wire))
    return d


def test_a_forwarded_pull_reply_lands_byte_exact_and_the_controller_makes_no_mac_pass(poly_bytes):
    c = Cluster()
    poly_bytes[0] = 0
    got = result_of(pull_in_two_parts(c))
    assert bytes(got.buffers[0]) == c.stores[0].payload
    assert 2 * BIG <= poly_bytes[0] < 2 * BIG + 1024


def test_a_reply_tampered_between_engine_and_controller_fails_the_clients_pull():
    c = Cluster()
    f = result_of(pull_in_two_parts(c, tamper=TAG + E2E_TAG + 777))
    assert f.check(EngineError)
    assert not c.client.transport.disconnecting  # the client's connection goes on


def test_a_reply_tampered_between_controller_and_client_fails_the_clients_pull():
    c = Cluster()
    f = result_of(pull_in_two_parts(c, to_client=TAG + E2E_TAG + 4321))
    assert f.check(EngineError)


# -- what the controller reads itself, it checks ----------------------------------


def test_a_forwarded_reply_read_in_the_controller_is_checked_first():
    c = Cluster()
    engine, ctrl_side, pump = c.engine_links[0]
    d = c.relay.engines[0].callRemoteStreamed("fetch")
    pump.pump()
    out = bytearray(outgoing(engine))
    out[-TAG - E2E_TAG - 10] ^= 1
    ctrl_side.dataReceived(bytes(out[: len(out) // 2]))
    blob = result_of(d)  # fired early: only forwarded so far
    ctrl_side.dataReceived(bytes(out[len(out) // 2 :]))
    assert blob.buffers[0].verified is False
    assert result_of(nativeproto.arrived(blob)).check(EngineError)


def test_a_forwarded_reply_that_arrived_intact_passes_arrived_once_checked():
    c = Cluster()
    engine, ctrl_side, pump = c.engine_links[0]
    d = c.relay.engines[0].callRemoteStreamed("fetch")
    pump.pump()
    out = outgoing(engine)
    ctrl_side.dataReceived(out[: len(out) // 2])
    blob = result_of(d)
    ctrl_side.dataReceived(out[len(out) // 2 :])
    assert result_of(nativeproto.arrived(blob)) is blob
    assert blob.buffers[0].verified is True
    assert bytes(blob.buffers[0]) == c.stores[0].payload


def test_part_of_a_tampered_buffer_is_never_vouched_for_by_the_controller():
    """A slice of a buffer is not what its seal covers: the controller
    checks the whole before sealing the slice itself."""
    c = Cluster()
    engine_remote = c.relay.engines[0]
    sent = []

    def push(blob, n=1):
        view = memoryview(blob.buffers[0])[1000:-1000]
        d = engine_remote.callRemote("store", Serialized(b"s", [view]))
        d.addBoth(lambda r: sent.append(r) or r)
        return d

    c.relay.remote_push = push
    c.remote.callRemote("push", Serialized(b"stream", [os.urandom(BIG)]))
    data = bytearray(c.client_bytes())
    data[-TAG - E2E_TAG - 100] ^= 1  # in the part left out of the slice
    c.ctrl.dataReceived(bytes(data[: len(data) // 2]))
    c.flush_engines()
    c.ctrl.dataReceived(bytes(data[len(data) // 2 :]))
    c.flush_engines()
    assert c.ctrl.transport.disconnecting  # the controller checked it, and dropped the sender
    assert c.stores[0].stored == []
    (f,) = sent
    assert f.check(ProtocolError) and "aborted this message in transit" in str(f.value)


def test_a_pooled_buffer_received_again_carries_only_its_new_seal():
    from kernel.bufferpool import BufferPool

    pool = BufferPool()
    writer, reader = FrameWriter(KEY), FrameReader(KEY, routing=True, pool=pool)
    first = os.urandom(2 * MB)
    ((_, (a,)),) = reader.feed(b"".join(bytes(s) for s in writer.frame(b"[]", [first]).segments()))
    old, where = a.origin, id(a)
    del a
    second = os.urandom(2 * MB)
    ((_, (b,)),) = reader.feed(b"".join(bytes(s) for s in writer.frame(b"[]", [second]).segments()))
    assert id(b) == where  # the same memory, received into again
    assert b.origin != old and b.verified
    assert bytes(b) == second


def test_a_sealed_frame_round_trips_through_a_real_connection_pair():
    """Both ends derive the same buffer keys from the cluster key and the
    connection's nonces (not from the session keys)."""
    client, server, pump = iosim.connectedServerAndClient(
        lambda: nativeproto.NativeProtocol(KEY, is_client=False, root=None),
        lambda: nativeproto.NativeProtocol(KEY, is_client=True),
    )
    pump.flush()
    payload = os.urandom(BIG)
    wire = b"".join(bytes(s) for s in client._writer.frame(b"[]", [payload]).segments())
    ((_, (got,)),) = server._reader.feed(wire)
    assert bytes(got) == payload
