"""The native transport: signed, length-prefixed frames and calls over them.

The native adapters (:mod:`kernel.enginenative`, :mod:`kernel.multienginenative`,
:mod:`kernel.tasknative`) carry the *same* remote protocol as the Foolscap and
PB adapters — the same ``remote_*`` server halves, the same plain-data
envelopes, the same client halves — over a lean wire of their own. This
module is that wire:

- :class:`NativeProtocol` speaks it on one TCP (or TLS) connection, in both
  directions: calls, replies and one-way messages, many in flight at once
  (pipelined; replies are matched to calls by id).
- :class:`NativeRemote` is a far object with the Foolscap reference API the
  client halves use (``callRemote``, ``callRemoteOnly``,
  ``notifyOnDisconnect``, ``getPeer``, ``tracker``), like
  :class:`kernel.pbutil.PBRemote` for PB.
- :func:`connect` and :func:`serve_controller` are the two ends: a controller
  listens on one port and offers named services (``registrar`` to engines,
  ``multiengine`` and ``task`` to clients); the port and the cluster key are
  in the cluster directory's ``native.json`` (mode 0600).

Frames
------
Every message is one frame::

    prefix   magic "TXN1", header length (u32), buffer count (u32)
    sizes    one u64 per buffer
    origins  one per sealed buffer (see below): client nonce, server nonce,
             direction, sequence number (u64), buffer index (u32)
    header   UTF-8 JSON: the message, plain data only
    tag      HMAC-SHA256 of (sequence number, prefix, sizes, origins, header)
    buffers  the raw bytes of each buffer, back to back
    closing  (if there are buffers) each sealed buffer's end-to-end tag
             (16 bytes), then the frame's HMAC-SHA256 of all the above and,
             for a frame with under :data:`ONE_TIME_MAC_BYTES` of buffers,
             each buffer's SHA-256; for a larger frame, one Poly1305 tag of
             its small buffers' bytes (keyed from the frame's running HMAC,
             so once per frame) and the end-to-end tags

A buffer of :data:`E2E_BYTES` (1 MiB) or more is *sealed end to end*: its
Poly1305 tag is made by the side that first sent it (its *origin*) and
checked only by the side that finally uses it; a controller passing it on
sends the same origin and tag with it and never reads it (see "Keys").
Poly1305 (a one-time MAC, here about twice as fast as SHA-256) carries
large frames; small ones keep the SHA-256 digests, which are cheaper to set up
per frame and which a controller reuses when it forwards a small buffer.

The header is JSON, never pickle: the controller parses headers and routes
buffers, and never unpickles anything. Bytes, long texts and the pickle
stream and out-of-band buffers of a :class:`~kernel.serialized.Serialized`
travel as buffers. The first tag lets a receiver check a frame's header
*before* allocating room for its buffers, so a peer without the key cannot
make it allocate anything large; buffers are then received straight into
preallocated ``bytearray``\\ s (a pushed array reaches the engine's
namespace without another copy: see :func:`kernel.serialized.deserialize_private`).
Large buffers come from a :class:`kernel.bufferpool.BufferPool`: one that
nothing holds any more is received into again, so a repeated large transfer
does not pay for zero-filling and faulting in fresh memory each time.
Sizes are bounded (:data:`MAX_HEADER_BYTES`, :data:`MAX_BUFFERS`,
:data:`MAX_FRAME_BYTES`); an oversized frame is refused and the connection
dropped.

Keys and handshake
------------------
The cluster key (:func:`generate_key`, 256 random bits) never crosses the
wire. Each side first sends a hello holding a fresh random nonce; each
direction then signs with its own key, ``HMAC(cluster key, label, role,
client nonce, server nonce)``, and every frame's tag covers an implicit
per-direction sequence number, so frames cannot be replayed, reordered,
reflected or moved to another connection. The client's first frame proves it
holds the key; the server answers with a frame proving the same. A frame with
a wrong tag is a :class:`~kernel.error.SecurityError`: it is logged, the
server tells the peer it was refused, and the connection is dropped before
anything runs.

End-to-end seals. A sealed buffer's Poly1305 key is ``HMAC(cluster key,
label, origin)``, where the origin names the frame that first carried it:
that connection's two nonces, its direction, the frame's sequence number
and the buffer's index. Why this is sound:

- *A key seals one message.* Only the side writing a connection's
  direction makes origins naming it, each (sequence number, index) once, and
  the nonces make the connection new (each side picks its own at random).
  A controller forwarding a buffer with its seal (to one engine or to
  several) sends the same bytes under the same key: the same message, never
  a second one, as Poly1305 requires. A controller sends on a seal only with
  the whole buffer it arrived with, unchanged (a part of it, or anything it
  makes, it seals itself under an origin of its own connection, after
  checking the whole against its seal).
- *Only key holders make tags.* The key comes from the cluster key through
  HMAC, so a tag without the cluster key is a forgery, which Poly1305 makes
  fail except with negligible probability, whatever the origin says.
- *Seals are bound to the frame.* A frame's first tag covers its origins and
  its closing tag the end-to-end tags, under the session key of this
  connection and direction, with this frame's sequence number: someone on
  either link without the key can change buffer bytes (which the final
  receiver's Poly1305 catches) and nothing else (the session tags catch
  that). A recorded frame replayed later on the same connection, or on
  another one, fails its session tag; so an old (origin, tag, buffers)
  triple reaches a receiver only inside a frame its authenticated peer
  signed now, which is as much as that peer could vouch for by signing the
  bytes itself. Receivers also check the origins a peer names: a peer's own
  seal must name this very frame and buffer; an origin in the receiver's own
  direction of this connection must name a frame it sent; an origin of
  another connection is accepted only from a controller (a routing side
  accepts only its peer's own seals for the frame at hand). A replayed or
  made-up origin fails these checks (:class:`~kernel.error.SecurityError`)
  or its tag.
- *Nothing unchecked is used.* An engine or a client checks every sealed
  buffer before the frame is delivered: one sealed by its peer that does not
  match is a :class:`~kernel.error.SecurityError` (the link was tampered
  with: dropped); one its peer only forwarded is dropped like an aborted
  frame (:class:`Aborted`: the call fails, the connection goes on, since
  the alteration may have happened before the forwarder had it). A
  controller checks the buffers of every frame it acts on itself; it skips
  the check only for a frame it acted on early (see "Cut-through
  forwarding"), whose buffers it only forwards, and checks them (catching up
  on what it skipped) as soon as anything in its process reads them:
  :func:`arrived`, or a part of one being sent on.

Writing small frames at once
----------------------------
A frame of at most :data:`SMALL_FRAME` bytes is joined into one ``bytes``.
On a plain TCP connection whose transport holds nothing, it goes straight to
the socket with ``send``: no reactor turn waiting for the socket to be
writable, which is most of a small message's cost on loopback. While the
reactor thread handles what one read brought (:class:`_Cork`), small frames
are held per connection and written together afterwards, so replies to
calls that arrived together still leave in one ``send``. Anything the socket
does not take goes through the transport, after which frames queue behind it.

A thread other than the reactor's may send a *call* itself
(:meth:`NativeProtocol.call_from_thread`, used by the blocking clients): when
the connection is idle, it signs the frame and sends it under the
connection's write lock (the lock every frame is signed and written under,
so frames leave in sequence order whichever thread writes them), then waits
for the reply, which the reactor thread receives as usual. Every frame is
signed the same way whichever thread sends it.

A thread may also send a *reply* itself (:class:`ThreadReply`, for remote
methods registered with :func:`allow_thread_reply`): an engine's executor
thread answers a small command as it ends, without waking the reactor
thread, on the same terms (idle connection, small plain frame, write lock);
the reactor thread then sends nothing for that call. Whichever of the two
decides first under the lock sends the reply, exactly once.

Passing replies on unread
-------------------------
A controller relaying what engines reply to a client's ``execute`` or
``apply`` (methods registered with :func:`allow_verbatim`) asks for the
engines' successful replies unread: the JSON text of the value and its
buffers (:class:`Verbatim`), which it writes into its own reply as they
came. The client receives the very bytes it would have got had the
controller decoded and encoded the value again; the controller still
parses every header it acts on (a reply's call id and envelope), and still
decodes failures and any reply its own code reads.

Writing without joining
-----------------------
Twisted's transports accept only ``bytes`` (``write``/``writeSequence``
refuse memoryviews). A large buffer
that is not ``bytes`` (an array's memory, a received ``bytearray``) is never
joined into one big copy: it is fed to the transport in slices of
:data:`WRITE_SLICE` bytes by a pull producer, as the socket drains, so a
100 MB push holds at most a few slices of extra memory. A large ``bytes`` is
written on its own into an empty transport buffer, which Twisted sends
without copying. Each piece is hashed just before it is written. A reply
wrapped in :class:`AfterWritten` says when its buffers' memory is no longer
needed, so a side can lend a live object's memory instead of copying it.

Reading into place
------------------
On a plain TCP connection, the bytes of a frame's buffers are received with
``recv_into`` straight into their preallocated ``bytearray`` (see
:func:`_receive_into_buffers`); everything else, and every byte on other
transports (TLS, test transports), goes through ``dataReceived``.

Cut-through forwarding
----------------------
A controller does not wait for a large frame to arrive in full before it
forwards it. Once a frame's header has verified (its first tag) and the
buffers before its first large one (:data:`CUT_THROUGH_BYTES` or more) are
in, the reader offers the frame (:class:`Early`); if what the frame asks
for only passes its large buffers on — a call whose target lists the method
with :func:`allow_cut_through` (a multiengine push), or the reply to a call
made with ``stream_reply`` (an engine's reply to a pull) — the controller
acts on it at once. The buffers then share a stream: every frame that
carries them on (to one engine, to each of several, or back to a client)
starts right away, sends each received slice as it arrives (straight from
the receive buffer, signing it on the way), and waits for the incoming
frame's verdict before its own closing tag. If the incoming closing tag
verifies, the outgoing frames close with their real tags (carrying on each
sealed buffer's end-to-end tag: the controller does not check those bytes
itself, the final receiver does; see "Keys"); if it does not,
or the sender disconnects first, the controller drops the sender, sends the
rest of each outgoing frame as it is and closes it with the *abort tag*
(:func:`_abort_tag`: keyed, distinct from any real tag). A receiver drops an
aborted frame unread (:class:`Aborted`): an engine answers the call with an
error and runs nothing, a client fails the call with
:class:`~kernel.error.EngineError`. Nothing unauthenticated is acted on by
an engine or a client; the controller itself acts only on verified headers.

Memory stays bounded: the controller receives into one preallocated buffer
per large buffer (as without cut-through), and stops reading a client that
sends a push while a receiver that has started on the frame lags more than
:data:`CUT_THROUGH_WINDOW` bytes behind (so it reads no faster than the
slowest such receiver drains). An engine's reply is read on whatever the
client does: a slow client must not hold up the engine's connection (and
its heartbeats); the reply waits for the client in its buffer. A receiver
that has not started on the frame yet (its connection is busy with earlier
frames) does not hold the sender back: the frame waits for it in its
buffer, and no two forwardings can wait on each other.

On Linux, when a sealed buffer has one receiver and both connections are
plain TCP, its bytes do not even enter the controller's memory: they go
socket to pipe to socket with ``splice`` (:mod:`kernel.splicerelay`), the
receiver's frame queued behind nothing and nothing queued into it. Such a
buffer is never read or forwarded again in the controller.

Cut-through works the same over TLS (the buffers then go through the TLS
transport in slices rather than straight to the socket). In the controller
process, a blob pulled from an engine may still be arriving: code there
that reads it waits with :func:`arrived`.

TLS
---
Frames are signed whatever carries them. A controller can also serve TLS
(``serve_controller(tls=True)``, ``txkernel-controller --adapter native
--tls``): ``native.json`` then pins its self-signed certificate, and peers
accept only a controller holding that certificate's key.

Throughput
----------
Calls are pipelined: many may be in flight on one connection, in both
directions, each reply matched to its call by id. The engine adapter uses
that to send several commands ahead to each engine
(:class:`kernel.enginenative.PipelinedEngine`). A blob pushed to several
engines is received once by the controller and the same buffers are written
to each engine: nothing is serialized again.
"""

from __future__ import annotations

import collections
import contextvars
import errno
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IPullProducer
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import splicerelay
from kernel.bufferpool import POOL, BufferPool
from kernel.error import ConnectionError, ProtocolError, SecurityError
from kernel.serialized import Serialized

__all__ = [
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_BUFFERS",
    "MAX_FRAME_BYTES",
    "NATIVE_FILE",
    "AfterWritten",
    "Frame",
    "FrameWriter",
    "FrameReader",
    "session_keys",
    "origin_prefix",
    "E2E_BYTES",
    "generate_key",
    "register_copyable",
    "CUT_THROUGH_BYTES",
    "CUT_THROUGH_WINDOW",
    "Early",
    "Aborted",
    "allow_cut_through",
    "allow_thread_reply",
    "ThreadReply",
    "allow_verbatim",
    "PASSING_ON",
    "Verbatim",
    "arrived",
    "NativeProtocol",
    "NativeRemote",
    "NativeServerFactory",
    "Gateway",
    "connect",
    "read_connection_info",
    "serve_controller",
]

#: First bytes of every frame.
MAGIC = b"TXN1"
#: What a hello starts with (followed by a nonce).
HELLO = b"TXNH"
#: Sent (unsigned) by a side that refused the peer's key, just before it hangs up.
REFUSED = b"TXNR"
#: Bytes of a hello's nonce.
NONCE_BYTES = 32
#: Bytes of a tag (HMAC-SHA256).
TAG_BYTES = 32
#: Largest JSON header of one frame.
MAX_HEADER_BYTES = 16 * 2**20
#: Most buffers in one frame.
MAX_BUFFERS = 100_000
#: Largest frame (header and buffers), bytes.
MAX_FRAME_BYTES = 2**31 + MAX_HEADER_BYTES
#: A frame with at least this many bytes of buffers signs them with one
#: Poly1305 (a one-time MAC, keyed per frame) instead of a SHA-256 of each.
ONE_TIME_MAC_BYTES = 1 << 20
#: Texts longer than this travel as buffers, not inside the header.
LONG_TEXT = 64 * 1024
#: Bytes of a large buffer handed to the transport at a time.
WRITE_SLICE = 1024 * 1024
#: Bytes handed to the transport when the socket is full (see :class:`_Outbox`).
WAKE_PIECE = 64 * 1024
#: A frame with at most this many bytes in all is joined into one ``bytes``
#: and sent at once (see :class:`_Outbox`).
SMALL_FRAME = 64 * 1024
#: The connection file of a native controller (in its cluster directory).
NATIVE_FILE = "native.json"
#: A routing side (the controller) forwards a frame as it arrives, once the
#: buffers before its first buffer of at least this many bytes are in (see
#: "Cut-through forwarding" above).
CUT_THROUGH_BYTES = 1 << 20
#: Bytes a cut-through frame may be received ahead of the slowest peer it is
#: being forwarded to before the controller stops reading its sender.
CUT_THROUGH_WINDOW = 8 << 20

_PREFIX = struct.Struct(">4sII")
#: Most buffers of a frame read in one step (:meth:`FrameReader._whole_small_frame`).
_SMALL_COUNT = 64
_SEQ = struct.Struct(">Q")
_LABEL = b"txkernel-native-v1"
_ONE_TIME_LABEL = b"txkernel-native-v1 one-time mac key"
_ABORT_LABEL = b"txkernel-native-v1 frame aborted by its sender"
_E2E_LABEL = b"txkernel-native-v1 end-to-end buffer key"
#: A buffer of at least this many bytes carries an end-to-end seal (see
#: "Frames"): the controller forwards it without reading it.
E2E_BYTES = CUT_THROUGH_BYTES
#: Bytes of an origin: two connection nonces, a direction, a sequence number
#: and a buffer index.
ORIGIN_BYTES = 2 * 32 + 1 + 8 + 4
#: Bytes of an end-to-end (Poly1305) tag.
E2E_TAG_BYTES = 16
_ORIGIN_TAIL = struct.Struct(">QI")
#: The origin prefix (nonces and direction) of a writer or reader made
#: without one (outside a connection: tests and tools).
_NO_ORIGIN = bytes(65)


def generate_key() -> str:
    """A new cluster key: 256 random bits, hex."""
    return secrets.token_hex(32)


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, bytes):
        return key
    try:
        return bytes.fromhex(key)
    except ValueError:
        return key.encode("utf-8")


def _hmac_sha256(key: bytes) -> Any:
    """An HMAC-SHA256 under ``key``: OpenSSL's own object when the ``hmac``
    module wraps one (its ``copy``/``update``/``digest`` are then C calls,
    not Python methods around them)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    inner = getattr(mac, "_hmac", None)
    return inner if inner is not None else mac


def session_keys(key: str | bytes, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    """The two directions' signing keys of one connection.

    :returns: ``(client_to_server, server_to_client)``.
    """
    k = _key_bytes(key)
    return tuple(
        hmac.new(k, _LABEL + role + client_nonce + server_nonce, hashlib.sha256).digest()
        for role in (b"c", b"s")
    )


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------


class FrameWriter:
    """Signs frames for one direction of one connection.

    :param key: this direction's session key.
    :param cluster_key: the cluster key, from which end-to-end buffer keys
        are derived (default: ``key``, for a writer outside a connection).
    :param origin: this direction's origin prefix: client nonce, server
        nonce, direction (``c`` or ``s``); see :func:`origin_prefix`.
    """

    def __init__(self, key: bytes, cluster_key: bytes | None = None, origin: bytes = _NO_ORIGIN):
        self._mac = _hmac_sha256(key)
        self._e2e_base = _hmac_sha256(cluster_key if cluster_key is not None else key)
        self.origin = origin
        self.seq = 0

    def frame(self, header: bytes, buffers: list[Any]) -> Frame:
        """Sign one frame's header now; its buffers are signed as they are
        written (see :class:`Frame`).

        :raises ProtocolError: the frame exceeds a size limit.
        """
        if not buffers and len(header) <= MAX_HEADER_BYTES:
            # (the common case, in short: the same bytes as below)
            head = _PREFIX.pack(MAGIC, len(header), 0)
            mac = self._mac.copy()
            mac.update(_SEQ.pack(self.seq))
            self.seq += 1
            mac.update(head)
            mac.update(header)
            return Frame(head + header + mac.digest(), [], None)
        if len(buffers) <= _SMALL_COUNT and len(header) <= MAX_HEADER_BYTES:
            small = self._small_frame(header, buffers)
            if small is not None:
                return small
        known = [getattr(b, "sha256", None) for b in buffers]
        views = [memoryview(b).cast("B") if type(b) is not bytes else b for b in buffers]
        sizes = [len(v) for v in views]
        if len(header) > MAX_HEADER_BYTES:
            raise ProtocolError(
                f"a message header of {len(header)} bytes exceeds the native "
                f"transport's limit of {MAX_HEADER_BYTES}"
            )
        if len(views) > MAX_BUFFERS or sum(sizes) + len(header) > MAX_FRAME_BYTES:
            raise ProtocolError(
                f"a message of {sum(sizes)} bytes in {len(views)} buffers exceeds the "
                f"native transport's limits ({MAX_FRAME_BYTES} bytes, {MAX_BUFFERS} buffers)"
            )
        seq = self.seq
        seals = None
        origins = b""
        if sum(sizes) >= ONE_TIME_MAC_BYTES:
            seals = self._seals(buffers, views, seq)
            origins = b"".join(o for o, _ in filter(None, seals))
        head = b"".join(
            (
                _PREFIX.pack(MAGIC, len(header), len(views)),
                struct.pack(f">{len(sizes)}Q", *sizes),
                origins,
            )
        )
        mac = self._mac.copy()
        mac.update(_SEQ.pack(seq))
        self.seq += 1
        mac.update(head)
        mac.update(header)
        if not views:
            return Frame(head + header + mac.digest(), [], None)
        first_tag = mac.copy().digest()
        if seals is not None:
            one_time = _one_time_mac(mac)
            piece = _OneTimePiece(one_time)
            pieces = [piece if s is None else s[1] for s in seals]
            streams = _open_streams(buffers)
            closing: Any = _OneTimeClosing(mac, one_time, [s[1] for s in filter(None, seals)])
            if streams is not None:
                closing = _StreamClosing(closing, streams, _abort_tag(mac))
            return Frame(head + header + first_tag, views, closing, pieces, streams)
        hashes = [_BufferHash(mac, k) for k in known]
        return Frame(head + header + first_tag, views, mac, hashes)

    def _small_frame(self, header: bytes, buffers: list[Any]) -> Frame | None:
        """A frame of at most :data:`SMALL_FRAME` bytes signed and joined at
        once (the same bytes as the general path), else None."""
        views = [b if type(b) is bytes else memoryview(b).cast("B") for b in buffers]
        sizes = [len(v) for v in views]
        n = len(views)
        total = sum(sizes)
        if _PREFIX.size + 8 * n + len(header) + 2 * TAG_BYTES + total > SMALL_FRAME:
            return None
        if total + len(header) > MAX_FRAME_BYTES:
            return None  # (refused below)
        head = _PREFIX.pack(MAGIC, len(header), n) + struct.pack(f">{n}Q", *sizes)
        mac = self._mac.copy()
        mac.update(_SEQ.pack(self.seq))
        self.seq += 1
        mac.update(head)
        mac.update(header)
        first_tag = mac.copy().digest()
        for b, v in zip(buffers, views, strict=True):
            known = getattr(b, "sha256", None)
            mac.update(known if known is not None else hashlib.sha256(v).digest())
        return Frame(b"".join((head, header, first_tag, *views, mac.digest())), [], None)

    def _seals(self, buffers: list[Any], views: list[Any], seq: int) -> list:
        """Per buffer, None (a small one: the frame's session MAC covers it)
        or ``(origin, source)`` for one of :data:`E2E_BYTES` or more: a whole
        sealed buffer this side received is passed on with its origin and
        tag (``source`` the buffer: its bytes are not read); any other is
        sealed here (``source`` a piece feeding a new Poly1305)."""
        seals: list = []
        for i, (b, v) in enumerate(zip(buffers, views, strict=True)):
            if len(v) < E2E_BYTES:
                seals.append(None)
                continue
            src = b.obj if type(b) is memoryview else b
            if type(src) is RoutedBuffer and src.spliced:
                raise ProtocolError(_SPLICED)
            if type(src) is RoutedBuffer and src.origin is not None:
                if src is b or (len(v) == len(src) and v.contiguous):
                    # (a view of all of it is the same bytes)
                    seals.append((src.origin, _ForwardedSeal(src)))
                    continue
                # Part of a sealed buffer: this side vouches for the part
                # only once the whole has verified against its own seal.
                _verify_sealed(src)
            origin = self.origin + _ORIGIN_TAIL.pack(seq, i)
            seals.append((origin, _OneTimePiece(_e2e_poly(self._e2e_base, origin))))
        return seals


def _abort_tag(mac: Any) -> bytes:
    """The closing tag that says "drop this frame": what a controller sends
    when the frame it was forwarding as it arrived turned out not to verify
    (or its sender went away). Keyed like every tag (only a holder of the
    session key can make it) and different from any real closing tag."""
    m = mac.copy()
    m.update(_ABORT_LABEL)
    return m.digest()


def _open_streams(buffers: list[Any]) -> list | None:
    """Per buffer, ``(stream, start)`` for a buffer still being received
    (cut through), else None; None when no buffer is.

    :raises ProtocolError: a buffer's frame failed to verify.
    """
    out = None
    for i, b in enumerate(buffers):
        src = b.obj if type(b) is memoryview else b
        if type(src) is RoutedBuffer and src.stream is not None:
            st = src.stream
            if st.spliced:
                raise ProtocolError(_SPLICED)
            if st.state is _FAILED:
                raise ProtocolError(
                    "the data of this message did not arrive intact (its sender's frame "
                    "failed to verify or its connection dropped): nothing was forwarded"
                )
            if st.state is _OPEN:
                if out is None:
                    out = [None] * len(buffers)
                # (A view of part of the buffer, wherever it lies: none of it
                # is sent before the bytes it could cover have arrived.)
                n = memoryview(b).nbytes
                out[i] = (st, src.start + len(src) - n)
    return out


_SPLICED = (
    "this data was already forwarded socket to socket without a copy in the "
    "controller: it cannot be read or forwarded again"
)


def _poly1305(key: bytes) -> Any:
    """A Poly1305 under ``key`` (every one this module makes comes from here)."""
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    return Poly1305(key)


def _one_time_mac(mac: Any) -> Any:
    """The Poly1305 of a large frame's small buffers, keyed by the frame's
    running HMAC (unique per frame: it covers the sequence number)."""
    key = mac.copy()
    key.update(_ONE_TIME_LABEL)
    return _poly1305(key.digest())


def origin_prefix(client_nonce: bytes, server_nonce: bytes, direction: bytes) -> bytes:
    """The first part of every origin a connection's direction names: its
    two nonces and ``direction`` (``b"c"``: client to server, ``b"s"``)."""
    return client_nonce + server_nonce + direction


def _e2e_poly(base: Any, origin: bytes) -> Any:
    """The Poly1305 sealing the buffer ``origin`` names: keyed by the
    HMAC of the cluster key (``base``) over a label and the origin."""
    key = base.copy()
    key.update(_E2E_LABEL)
    key.update(origin)
    return _poly1305(key.digest())


def _verify_sealed(buf: RoutedBuffer) -> None:
    """Check a received sealed buffer this side has not verified yet (one it
    only forwarded so far) against its seal, now that something reads it.

    :raises ProtocolError: it does not match (or its frame never completed).
    """
    if buf.spliced:
        raise ProtocolError(_SPLICED)
    if buf.verified or buf.origin is None:
        return
    st = buf.stream
    if st is not None and st.state is _OPEN:
        st.lazy = False  # still arriving: its reader verifies it at the closing tag
        return
    check, buf.check = buf.check, None
    if buf.tag is None or check is None:
        raise ProtocolError(
            "the data of this message did not arrive intact (its sender's frame "
            "failed to verify or its connection dropped): nothing was forwarded"
        )
    check.catch_up(buf)
    if not hmac.compare_digest(check.poly.finalize(), buf.tag):
        buf.origin = None  # never forwarded or read again
        raise ProtocolError(
            "a buffer this controller received does not match its sender's "
            "end-to-end tag (altered on the way): it is not used"
        )
    buf.verified = True


class _OneTimePiece:
    """Feeds a large frame's buffers to its one-time MAC (see :class:`Frame`)."""

    __slots__ = ("mac",)

    def __init__(self, mac: Any):
        self.mac = mac

    def update(self, piece: Any) -> None:
        self.mac.update(piece)

    def finish(self) -> None:
        pass

    def digest(self) -> None:  # the reader's per-buffer step: nothing to fold in
        return None


class _ForwardedSeal:
    """A sealed buffer passed on as received: no bytes to MAC; its tag is
    the one it arrived with."""

    __slots__ = ("buf",)

    def __init__(self, buf: RoutedBuffer):
        self.buf = buf

    def update(self, piece: Any) -> None:
        pass

    def finish(self) -> None:
        pass

    def tag(self) -> bytes | None:
        return self.buf.tag


class _OneTimeClosing:
    """A large frame's closing part: each sealed buffer's end-to-end tag,
    then the frame's HMAC over the small buffers' Poly1305 tag and those
    end-to-end tags.

    :param seals: per sealed buffer, an :class:`_OneTimePiece` (sealed
        here) or a :class:`_ForwardedSeal`.
    """

    __slots__ = ("mac", "one_time", "seals")

    def __init__(self, mac: Any, one_time: Any, seals: list | None = None):
        self.mac = mac
        self.one_time = one_time
        self.seals = seals or []

    @property
    def n_tags(self) -> int:
        return len(self.seals)

    def digest(self) -> bytes:
        tags = [s.mac.finalize() if type(s) is _OneTimePiece else s.tag() for s in self.seals]
        if None in tags:  # (a forwarded buffer whose frame did not verify)
            return bytes(E2E_TAG_BYTES * len(tags)) + _abort_tag(self.mac)
        self.mac.update(self.one_time.finalize())
        tags_bytes = b"".join(tags)
        self.mac.update(tags_bytes)
        return tags_bytes + self.mac.digest()


class _StreamClosing:
    """The closing tag of a frame forwarding buffers that are still arriving
    (see "Cut-through forwarding"): written once every such buffer's own
    frame has verified; the abort tag instead if one of them did not.

    :param closing: the frame's own closing (a :class:`_OneTimeClosing`).
    :param streams: per buffer, ``(stream, start)`` or None.
    :param abort: the frame's abort tag (:func:`_abort_tag`).
    """

    __slots__ = ("closing", "streams", "abort")

    def __init__(self, closing: Any, streams: list, abort: bytes):
        self.closing = closing
        self.streams = [s for s, _ in filter(None, streams)]
        self.abort = abort

    def open_stream(self) -> _Stream | None:
        """A stream still arriving (its verdict is not in yet), else None."""
        for st in self.streams:
            if st.state is _OPEN:
                return st
        return None

    def digest(self) -> bytes:
        if any(st.state is _FAILED for st in self.streams):
            return bytes(E2E_TAG_BYTES * self.closing.n_tags) + self.abort
        return self.closing.digest()


_OPEN, _OK, _FAILED = "open", "ok", "failed"


class _Stream:
    """The buffers of one frame a controller forwards while it receives them.

    The reader reports each received piece (:meth:`advance`) and the
    verdict of the frame's closing tag (:meth:`finish`); the outboxes
    forwarding the buffers (each a :class:`_Growing` segment) send what has
    arrived, park in :attr:`waiters` when they have caught up, and are woken
    by the next piece. While a forwarding outbox that has started on the
    frame lags more than :data:`CUT_THROUGH_WINDOW` bytes behind, the
    sender's connection is not read (``pause``/``resume``): the controller
    reads no faster than its slowest active receiver drains.

    :param buffers: the frame's buffers.
    """

    __slots__ = (
        "state",
        "received",
        "waiters",
        "active",
        "pause",
        "resume",
        "paused",
        "buffers",
        "ended",
        "lazy",
        "frames",
        "relay",
        "spliced",
    )

    def __init__(self, buffers: list[Any]):
        self.state = _OPEN
        #: The frame is only forwarded (so far): its reader does not verify
        #: its sealed buffers (see "Keys"); cleared by :func:`_verify_sealed`.
        self.lazy = False
        #: Bytes of the frame's buffers received so far (all of them, in order).
        self.received = 0
        self.waiters: set[_Outbox] = set()
        #: Segments being sent now (at the head of their outbox).
        self.active: set[_Growing] = set()
        self.pause: Callable[[], Any] | None = None
        self.resume: Callable[[], Any] | None = None
        self.paused = False
        self.buffers = buffers
        #: Deferreds fired with the verdict (see :func:`arrived`).
        self.ended: list[defer.Deferred] = []
        #: Outgoing frames forwarding these buffers.
        self.frames = 0
        #: The :class:`kernel.splicerelay.SpliceRelay` moving a sealed buffer
        #: socket to socket, if one was made.
        self.relay: Any = None
        #: Some bytes went through the relay's pipe, not memory.
        self.spliced = False

    def advance(self, n: int) -> None:
        """``n`` more bytes arrived."""
        self.received += n
        self._wake()
        if (
            self.pause is not None
            and not self.paused
            and self.active
            and self.lag() > CUT_THROUGH_WINDOW
        ):
            self.paused = True
            self.pause()

    def lag(self) -> int:
        """Bytes received beyond what the slowest active segment has sent."""
        return self.received - min(g.start + g.offset for g in self.active)

    def progressed(self) -> None:
        """An active segment sent more (or left): read again if it caught up."""
        if self.paused and (not self.active or self.lag() <= CUT_THROUGH_WINDOW // 2):
            self._unpause()

    def _unpause(self) -> None:
        self.paused = False
        if self.resume is not None:
            try:
                self.resume()
            except Exception:  # pragma: no cover - a transport already gone
                pass

    def finish(self, ok: bool) -> None:
        """The frame's closing tag verified (``ok``) or did not (or the sender
        went away): release the closing tags waiting on it."""
        if self.state is not _OPEN:
            return
        self.state = _OK if ok else _FAILED
        if ok:
            for b in self.buffers:
                if type(b) is RoutedBuffer:
                    b.stream = None
        # (A failed frame's buffers keep pointing here, so they are never
        # forwarded again; nothing here points back at them.)
        self.buffers = ()
        if self.paused:
            self._unpause()
        if self.relay is not None:
            splicerelay.stream_ended(self.relay)
        self._wake()
        ended, self.ended = self.ended, []
        for d in ended:
            d.callback(ok)

    def wait(self, outbox: _Outbox) -> None:
        self.waiters.add(outbox)

    def _wake(self) -> None:
        if self.waiters:
            waiters, self.waiters = self.waiters, set()
            for outbox in waiters:
                outbox.wake()


def arrived(value: Any) -> defer.Deferred:
    """Wait for the buffers of ``value`` that are still arriving.

    In a controller, a :class:`~kernel.serialized.Serialized` pulled from a
    native engine (:meth:`kernel.enginenative.NativeEngineFromReference.pull_serialized`)
    is handed on as soon as the reply's header has verified, its large
    buffers still arriving (cut through to the client that asked). Code in
    the controller process that reads such a blob's bytes itself must wait
    for them first.

    :param value: a Serialized, or lists, tuples and dicts of them.
    :returns: Deferred firing ``value`` once every buffer in it has arrived
        and verified.
    :raises: (errback) :class:`~kernel.error.EngineError` if one never will
        (its sender disconnected, or its frame did not verify).
    """
    streams = set()
    sealed = []

    def walk(o: Any) -> None:
        t = type(o)
        if t is Serialized:
            for b in o.buffers:
                if type(b) is RoutedBuffer:
                    if b.spliced or (b.stream is not None and b.stream.spliced):
                        sealed.append(b)  # (refused by _verify_sealed below)
                        continue
                    if b.stream is not None:
                        streams.add(b.stream)
                        b.stream.lazy = False  # read here: verify it as it arrives
                    if b.origin is not None and not b.verified:
                        sealed.append(b)
        elif t in (list, tuple):
            for x in o:
                walk(x)
        elif t is dict:
            for x in o.values():
                walk(x)

    walk(value)

    def verdicts(oks: list[bool]) -> Any:
        from kernel.error import EngineError

        if not all(oks):
            raise EngineError(ABORTED_REPLY)
        try:
            for b in sealed:  # (forwarded unread so far: checked now)
                _verify_sealed(b)
        except ProtocolError:
            raise EngineError(ABORTED_REPLY) from None
        return value

    waits = []
    for st in streams:
        if st.state is _OPEN:
            d: defer.Deferred = defer.Deferred()
            st.ended.append(d)
            waits.append(d)
        else:
            waits.append(defer.succeed(st.state is _OK))
    return defer.gatherResults(waits).addCallback(verdicts)


class _Growing:
    """An outbox segment forwarding a buffer that is still being received."""

    __slots__ = ("view", "stream", "start", "offset", "outbox", "forwarded")

    def __init__(self, view: memoryview, stream: _Stream, start: int, outbox: Any = None):
        self.view = view
        self.stream = stream
        self.start = start  # where the buffer begins in its stream
        self.offset = 0  # bytes of it sent
        self.outbox = outbox
        #: Passed on with its seal (its bytes need not be read here).
        self.forwarded = False

    def available(self) -> int:
        """Bytes received and not yet sent (all of the rest once the stream
        has ended, verified or not: a failed frame is sent out in full and
        closed with the abort tag)."""
        n = len(self.view)
        if self.stream.state is _OPEN:
            n = min(n, self.stream.received - self.start)
        return n - self.offset


class _BufferHash:
    """The SHA-256 of one buffer, fed to its frame's HMAC when complete.

    :param mac: the frame's running HMAC.
    :param known: the buffer's digest if already known (a buffer the
        controller received and now forwards), else None: computed from the
        pieces given to :meth:`update`.
    """

    __slots__ = ("mac", "known", "sha")

    def __init__(self, mac: Any, known: bytes | None):
        self.mac = mac
        self.known = known
        self.sha = None if known is not None else hashlib.sha256()

    def update(self, piece: Any) -> None:
        if self.sha is not None:
            self.sha.update(piece)

    def finish(self) -> None:
        self.mac.update(self.known if self.sha is None else self.sha.digest())


class Frame:
    """One signed frame: its head (prefix, sizes, header and first tag), its
    buffers, and the running HMAC that yields the closing tag once every
    buffer's SHA-256 has gone through it.

    The writer hashes each piece of a buffer just before writing it (while
    it is in the CPU's cache, and while the peer is already reading the
    pieces before it), so a large frame is never read twice in a row; a
    buffer whose digest is known (one the controller received and forwards
    to engines or clients) is not hashed again.
    """

    __slots__ = ("head", "buffers", "mac", "hashes", "streams")

    def __init__(
        self,
        head: bytes,
        buffers: list[Any],
        mac: Any,
        hashes: list | None = None,
        streams: list | None = None,
    ):
        self.head = head
        self.buffers = buffers
        self.mac = mac
        self.hashes = hashes or []
        #: None, or per buffer ``(stream, start)`` for one still arriving.
        self.streams = streams

    def small(self) -> bytes | None:
        """The whole frame as one ``bytes`` (hashing its buffers now) if it
        has at most :data:`SMALL_FRAME` bytes, else None."""
        if self.mac is None:
            return self.head
        size = len(self.head) + TAG_BYTES
        for b in self.buffers:
            size += len(b)
        if size > SMALL_FRAME:
            return None
        return b"".join(self.segments())

    def segments(self) -> list[Any]:
        """Every byte of the frame, in order (hashing the buffers now)."""
        if self.mac is None:
            return [self.head]
        for b, h in zip(self.buffers, self.hashes, strict=True):
            h.update(b)
            h.finish()
        return [self.head, *self.buffers, self.mac.digest()]


class RoutedBuffer(bytearray):
    """A received buffer that remembers its SHA-256 (:attr:`sha256`), so that
    a controller forwarding it signs it without reading it again. Only
    routing peers (the controller) receive these; engines and clients get
    plain ``bytearray``\\ s."""

    __slots__ = ("sha256", "stream", "start", "origin", "tag", "verified", "check", "spliced")

    def __init__(self, source: Any = 0):
        super().__init__(source)  # a size (zeros) or bytes to copy, as bytearray takes
        self.sha256: bytes | None = None
        #: The :class:`_Stream` of a buffer still arriving (cut through), else None.
        self.stream: _Stream | None = None
        self.start = 0
        self._unseal()

    def _unseal(self) -> None:
        #: A sealed buffer's origin and end-to-end tag (None: not sealed; the
        #: tag is known once its frame's closing part has verified).
        self.origin: bytes | None = None
        self.tag: bytes | None = None
        #: Its bytes were checked against :attr:`tag` (else only forwarded).
        self.verified = False
        #: The :class:`_SealCheck` that verifies it when first read.
        self.check: _SealCheck | None = None
        #: Some of it was spliced socket to socket (:mod:`kernel.splicerelay`):
        #: its memory has holes; it is never read or forwarded again.
        self.spliced = False


class _SealCheck:
    """A reader's Poly1305 over one sealed buffer, fed as the buffer arrives
    unless its frame is only being forwarded (:attr:`_Stream.lazy`); then it
    catches up on the bytes it skipped when something needs them checked.

    :param poly: the buffer's end-to-end Poly1305.
    :param buf: the buffer being received.
    :param stream: its stream (a routing reader's), or None.
    """

    __slots__ = ("poly", "buf", "stream", "seen", "hashed")

    def __init__(self, poly: Any, buf: Any, stream: _Stream | None):
        self.poly = poly
        self.buf = buf
        self.stream = stream
        self.seen = 0  # bytes received
        self.hashed = 0  # bytes fed to the Poly1305

    def update(self, piece: Any) -> None:
        n = len(piece)
        self.seen += n
        st = self.stream
        if st is not None and st.lazy:
            return
        if self.hashed < self.seen - n:
            self.poly.update(memoryview(self.buf)[self.hashed : self.seen - n])
        self.poly.update(piece)
        self.hashed = self.seen

    def catch_up(self, buf: Any) -> None:
        """Feed the bytes of ``buf`` received and not yet hashed."""
        if self.hashed < self.seen:
            self.poly.update(memoryview(buf)[self.hashed : self.seen])
            self.hashed = self.seen

    def digest(self) -> None:  # the reader's per-buffer step: nothing to fold in
        return None


_EMPTY_SHA256 = hashlib.sha256().digest()


class FrameReader:
    """Checks and unpacks the frames of one direction of one connection.

    Feed it bytes as they arrive with :meth:`feed`; it returns the complete
    frames, each as ``(header_bytes, [bytearray, ...])``.

    :param key: this direction's session key.
    :param routing: receive buffers as :class:`RoutedBuffer` (a controller).
    :param pool: where large buffers come from (reused once nothing else
        holds them: :class:`kernel.bufferpool.BufferPool`); None for fresh ones.
    :param cluster_key: the cluster key (end-to-end buffer keys are derived
        from it); default ``key``, for a reader outside a connection.
    :param peer_origin: the origin prefix of the direction read
        (:func:`origin_prefix`).
    :param own_origin: the origin prefix of the opposite direction (this
        side's own), or None.
    :param sent: returns how many frames this side has sent on the
        connection (its writer's sequence number).
    :raises SecurityError: (from :meth:`feed`) a tag does not verify.
    :raises ProtocolError: (from :meth:`feed`) a malformed or oversized frame.
    """

    def __init__(
        self,
        key: bytes,
        routing: bool = False,
        pool: BufferPool | None = None,
        cluster_key: bytes | None = None,
        peer_origin: bytes = _NO_ORIGIN,
        own_origin: bytes | None = None,
        sent: Callable[[], int] | None = None,
    ):
        self._key_mac = _hmac_sha256(key)
        self._e2e_base = _hmac_sha256(cluster_key if cluster_key is not None else key)
        self._peer_origin = peer_origin
        self._own_origin = own_origin
        self._sent = sent
        self._routing = routing
        self._origins: list[bytes | None] = []
        self._checks: list[_SealCheck | None] = []
        self._sizes_raw = b""
        self._buffer_type = RoutedBuffer if routing else bytearray
        self.pool = pool
        self._sha: Any = None
        self.seq = 0
        self._pending = bytearray()  # bytes of the current small part
        self._state = "prefix"
        self._need = _PREFIX.size
        self._header_len = 0
        self._count = 0
        self._sizes: tuple[int, ...] = ()
        self._header = b""
        self._buffers: list[bytearray] = []
        self._index = 0  # buffer being filled
        self._filled = 0  # bytes of it received
        self._mac: Any = None
        self._one_time: Any = None
        #: Offer frames for cut-through (see :class:`Early`); a routing side's choice.
        self.cut_through = False
        self._stream: _Stream | None = None
        self._cut = -1  # the buffer at which the current frame is offered early
        self._early: Early | None = None
        self._ready: list[Any] = []

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return the frames it completed (``(header,
        buffers)``), and, with :attr:`cut_through`, the frames it started
        (:class:`Early`) and those whose sender aborted them (:class:`Aborted`)."""
        view = memoryview(data)
        pos = 0
        end = len(view)
        while True:
            if self._state == "prefix" and not self._pending and end - pos >= _PREFIX.size:
                got = self._whole_small_frame(view, pos, end)
                if got is not None:
                    frame, pos = got
                    self._ready.append(frame)
                    continue
            if self._state == "buffers":
                buf = self._buffers[self._index]
                take = min(len(buf) - self._filled, end - pos)
                piece = view[pos : pos + take]
                buf[self._filled : self._filled + take] = piece
                self._sha.update(piece)
                self._filled += take
                pos += take
                if self._stream is not None:
                    self._stream.advance(take)
                if self._filled < len(buf):
                    break
                self._buffer_done()
                continue
            if self._state == "done":
                self._complete()
                continue
            take = min(self._need - len(self._pending), end - pos)
            self._pending += view[pos : pos + take]
            pos += take
            if len(self._pending) < self._need:
                break
            part, self._pending = bytes(self._pending), bytearray()
            self._advance(part)
        return self._take()

    def _take(self) -> list[Any]:
        out, self._ready = self._ready, []
        return out

    def _complete(self) -> None:
        early, stream = self._early, self._stream
        if stream is not None:
            stream.finish(True)
        if early is None or not early.dispatched:
            self._ready.append((self._header, self._buffers))
        self._reset()

    def abandon(self) -> None:
        """The connection is gone: a frame being cut through never completes."""
        self._release_checks()
        if self._stream is not None:
            self._stream.finish(False)

    def _whole_small_frame(self, view: memoryview, pos: int, end: int) -> Any:
        """The frame at ``pos`` read and checked in one step, if all of it is
        in ``view`` and its buffers are small (:data:`SMALL_FRAME` bytes in
        all): ``((header, buffers), end of the frame)``; else None (the
        state machine reads it). The same checks, in the same order."""
        magic, header_len, count = _PREFIX.unpack_from(view, pos)
        if magic != MAGIC or header_len > MAX_HEADER_BYTES or count > _SMALL_COUNT:
            return None
        header_start = pos + _PREFIX.size + 8 * count
        tag_start = header_start + header_len
        if tag_start + TAG_BYTES > end:
            return None
        sizes = struct.unpack_from(f">{count}Q", view, pos + _PREFIX.size) if count else ()
        total = sum(sizes)
        stop = tag_start + TAG_BYTES + total + (TAG_BYTES if count else 0)
        if total > SMALL_FRAME or stop > end or total + header_len > MAX_FRAME_BYTES:
            return None
        header = bytes(view[header_start:tag_start])
        mac = self._key_mac.copy()
        mac.update(_SEQ.pack(self.seq))
        self.seq += 1
        mac.update(view[pos:header_start])
        mac.update(header)
        first = mac.copy().digest() if count else mac.digest()
        if not hmac.compare_digest(first, view[tag_start : tag_start + TAG_BYTES]):
            raise SecurityError("a frame's tag does not verify: wrong cluster key or tampering")
        if not count:
            return (header, []), stop
        kind = self._buffer_type
        buffers = []
        at = tag_start + TAG_BYTES
        for n in sizes:
            piece = view[at : at + n]
            digest = hashlib.sha256(piece).digest()
            mac.update(digest)
            buf = kind(piece)
            if kind is RoutedBuffer:
                buf.sha256 = digest
            buffers.append(buf)
            at += n
        if not hmac.compare_digest(mac.digest(), view[at:stop]):
            raise SecurityError("a frame's tag does not verify: wrong cluster key or tampering")
        return (header, buffers), stop

    def room(self) -> memoryview | None:
        """Where the next bytes of the current buffer go, when a buffer is
        being received (None otherwise): a transport may receive straight
        into it and then call :meth:`received_into`."""
        if self._state != "buffers":
            return None
        return memoryview(self._buffers[self._index])[self._filled :]

    def received_into(self, n: int) -> list[Any]:
        """Account for ``n`` bytes put in :meth:`room`.

        :returns: what :meth:`feed` would (only :class:`Early` frames can
            result).
        """
        buf = self._buffers[self._index]
        self._sha.update(memoryview(buf)[self._filled : self._filled + n])
        self._filled += n
        if self._stream is not None:
            self._stream.advance(n)
        if self._filled == len(buf):
            self._buffer_done()
        return self._take() if self._ready else []

    def _buffer_done(self) -> None:
        digest = self._sha.digest()
        if digest is not None:  # (None: the frame's one-time MAC covers it)
            self._mac.update(digest)
        buf = self._buffers[self._index]
        if type(buf) is RoutedBuffer:
            buf.sha256 = digest
        self._index += 1
        self._filled = 0
        self._next_buffer()

    def _release_checks(self) -> None:
        # (a check kept on its buffer must not point back at it: a pooled
        # buffer is free again once nothing but the pool refers to it)
        for c in self._checks:
            if c is not None:
                c.buf = None

    def _reset(self) -> None:
        self._release_checks()
        self._state = "prefix"
        self._need = _PREFIX.size
        self._buffers = []
        self._origins = []
        self._checks = []
        self._header = b""
        self._stream = None
        self._early = None
        self._cut = -1

    def _advance(self, part: bytes) -> None:
        if self._state == "prefix":
            magic, self._header_len, self._count = _PREFIX.unpack(part)
            if magic == REFUSED:
                raise SecurityError(
                    "the peer refused this connection's cluster key: the key does not "
                    "match. Use the connection file (native.json) the running controller "
                    "wrote, or restart the cluster."
                )
            if magic != MAGIC:
                raise ProtocolError(f"not a txkernel native frame (starts with {magic!r})")
            if self._header_len > MAX_HEADER_BYTES or self._count > MAX_BUFFERS:
                raise ProtocolError(
                    f"refusing a frame with a {self._header_len}-byte header and "
                    f"{self._count} buffers (limits {MAX_HEADER_BYTES}, {MAX_BUFFERS})"
                )
            self._prefix = part
            if self._count:
                self._state = "sizes"
                self._need = 8 * self._count
            else:
                self._sizes, self._sizes_raw = (), b""
                self._state = "head"
                self._need = self._header_len + TAG_BYTES
        elif self._state == "sizes":
            self._sizes_raw = part
            self._sizes = sizes = struct.unpack(f">{self._count}Q", part)
            sealed = 0
            if sum(sizes) >= ONE_TIME_MAC_BYTES:
                sealed = sum(1 for n in sizes if n >= E2E_BYTES)
            self._state = "head"
            self._need = ORIGIN_BYTES * sealed + self._header_len + TAG_BYTES
        elif self._state == "head":
            sizes = self._sizes
            origins_end = len(part) - self._header_len - TAG_BYTES
            header = part[origins_end:-TAG_BYTES]
            mac = self._key_mac.copy()
            seq = self.seq
            mac.update(_SEQ.pack(seq))
            self.seq += 1
            mac.update(self._prefix)
            mac.update(self._sizes_raw)
            mac.update(part[:origins_end])
            mac.update(header)
            if not hmac.compare_digest(mac.copy().digest(), part[-TAG_BYTES:]):
                raise SecurityError("a frame's tag does not verify: wrong cluster key or tampering")
            if sum(sizes) + self._header_len > MAX_FRAME_BYTES:
                raise ProtocolError(
                    f"refusing a frame of {sum(sizes)} bytes (limit {MAX_FRAME_BYTES})"
                )
            self._header = header
            self._mac = mac
            self._one_time = _one_time_mac(mac) if sum(sizes) >= ONE_TIME_MAC_BYTES else None
            self._origins = self._check_origins(part[:origins_end], seq)
            # Room for the buffers, allocated only now that the header is known good.
            kind, pool = self._buffer_type, self.pool
            if pool is None:
                self._buffers = [kind(n) for n in sizes]
            else:
                self._buffers = [pool.take(kind, n) for n in sizes]
            if kind is RoutedBuffer:
                self._start_stream(sizes)
            self._checks = [
                None if o is None else _SealCheck(_e2e_poly(self._e2e_base, o), b, self._stream)
                for o, b in zip(self._origins, self._buffers, strict=True)
            ]
            if kind is RoutedBuffer:
                for b, o, c in zip(self._buffers, self._origins, self._checks, strict=True):
                    b.origin, b.check = o, c
            self._index = 0
            self._filled = 0
            self._state = "buffers"
            self._next_buffer()
        elif self._state == "tail":
            tags, part = part[:-TAG_BYTES], part[-TAG_BYTES:]
            if self._one_time is not None:
                abort = _abort_tag(self._mac)
                self._mac.update(self._one_time.finalize())
                if hmac.compare_digest(abort, part):
                    self._aborted()
                    return
                self._mac.update(tags)
            if not hmac.compare_digest(self._mac.digest(), part):
                if self._stream is not None:
                    self._stream.finish(False)
                self._release_checks()
                raise SecurityError("a frame's tag does not verify: wrong cluster key or tampering")
            if tags and not self._check_seals(tags):
                self._aborted()
                return
            self._state = "done"

    def _check_origins(self, raw: bytes, seq: int) -> list[bytes | None]:
        """Per buffer, the origin its seal names (None: not sealed), each
        one checked: a buffer the peer seals itself must name this very
        frame and buffer; one naming this side's own direction must name a
        frame this side has sent; a foreign one (another connection's) is
        accepted only from a peer that routes, never by a routing side
        (its peers send only what they seal themselves).

        :raises SecurityError: an origin the peer cannot vouch for.
        """
        out: list[bytes | None] = []
        at = 0
        for i, n in enumerate(self._sizes):
            if not raw or n < E2E_BYTES:
                out.append(None)
                continue
            origin = raw[at : at + ORIGIN_BYTES]
            at += ORIGIN_BYTES
            prefix = origin[:65]
            o_seq, o_index = _ORIGIN_TAIL.unpack_from(origin, 65)
            if prefix == self._peer_origin:
                ok = o_seq == seq and o_index == i
            elif prefix == self._own_origin:
                ok = self._sent is not None and o_seq < self._sent()
            else:
                ok = not self._routing and prefix[64:] in (b"c", b"s")
            if not ok:
                raise SecurityError(
                    "a frame names a buffer origin its sender cannot vouch for "
                    "(a replayed or forged end-to-end seal): refused"
                )
            out.append(origin)
        return out

    def _check_seals(self, tags: bytes) -> bool:
        """Check each sealed buffer against its end-to-end tag (unless the
        frame is only being forwarded: then each keeps its tag, checked if
        anything reads it). False: a buffer sealed elsewhere (forwarded by
        the peer) does not match: the frame is dropped like an aborted one.

        :raises SecurityError: one the peer sealed itself does not match.
        """
        st = self._stream
        lazy = st is not None and st.lazy
        k = 0
        for b, o, check in zip(self._buffers, self._origins, self._checks, strict=True):
            if o is None:
                continue
            tag = tags[k : k + E2E_TAG_BYTES]
            k += E2E_TAG_BYTES
            if type(b) is RoutedBuffer:
                b.tag = tag
            if lazy:
                continue
            check.catch_up(b)
            if not hmac.compare_digest(check.poly.finalize(), tag):
                if o[:65] != self._peer_origin:
                    return False
                if st is not None:
                    st.finish(False)
                self._release_checks()
                raise SecurityError(
                    "a buffer does not match its end-to-end tag: altered on the way"
                )
            if type(b) is RoutedBuffer:
                b.verified, b.check = True, None
        return True

    def _aborted(self) -> None:
        # The sender (a controller) could not vouch for the buffers it was
        # forwarding: drop them; the header (verified) says what was lost.
        if self._stream is not None:
            self._stream.finish(False)
        early = self._early
        self._ready.append(Aborted(self._header, early is not None and early.dispatched))
        self._reset()

    def _start_stream(self, sizes: tuple[int, ...]) -> None:
        # A routing reader forwards a large buffer as it arrives: every buffer
        # from the first large one on belongs to a stream; the frame is offered
        # (Early) once the buffers before it are in.
        bufs = self._buffers
        for b in bufs:
            b.stream = None
            b._unseal()  # (a pooled buffer may have been sealed before)
        if not self.cut_through or self._one_time is None:
            return
        cut = next((i for i, n in enumerate(sizes) if n >= CUT_THROUGH_BYTES), -1)
        if cut < 0:
            return
        stream = self._stream = _Stream(bufs)
        start = 0
        for i, (b, n) in enumerate(zip(bufs, sizes, strict=True)):
            if i >= cut:
                b.stream = stream
                b.start = start
            start += n
        self._cut = cut

    def _next_buffer(self) -> None:
        # skip empty buffers; after the last one, the closing tag (if any)
        while self._index < len(self._buffers) and not self._sizes[self._index]:
            if self._one_time is None:
                self._mac.update(_EMPTY_SHA256)
            buf = self._buffers[self._index]
            if type(buf) is RoutedBuffer:
                buf.sha256 = _EMPTY_SHA256
            self._index += 1
        if self._index < len(self._buffers):
            if self._one_time is None:
                self._sha = hashlib.sha256()
            elif self._checks[self._index] is not None:
                self._sha = self._checks[self._index]
            else:
                self._sha = _OneTimePiece(self._one_time)
            if self._index >= self._cut >= 0 and self._early is None:
                self._early = Early(self._header, self._buffers, self._stream)
                self._ready.append(self._early)
            return
        if self._count:
            self._state = "tail"
            self._need = TAG_BYTES + E2E_TAG_BYTES * sum(o is not None for o in self._origins)
        else:
            self._state = "done"


class Early:
    """A frame offered for cut-through: its header has verified and the
    buffers before its first large one are in; the rest are still arriving
    (their :class:`RoutedBuffer`\\ s share :attr:`stream`). The receiver
    either acts on it now (sets :attr:`dispatched`: the reader then does not
    deliver the frame again once it completes) or lets the reader deliver it
    complete as usual.
    """

    __slots__ = ("header", "buffers", "stream", "dispatched")

    def __init__(self, header: bytes, buffers: list[Any], stream: _Stream):
        self.header = header
        self.buffers = buffers
        self.stream = stream
        self.dispatched = False


class Aborted:
    """A frame its sender closed with the abort tag (its buffers were not
    what it meant to send): nothing of it may be used; its verified
    :attr:`header` says which call it was. :attr:`dispatched`: it had been
    acted on early (see :class:`Early`)."""

    __slots__ = ("header", "dispatched")

    def __init__(self, header: bytes, dispatched: bool):
        self.header = header
        self.dispatched = dispatched


# ---------------------------------------------------------------------------
# Values in headers
# ---------------------------------------------------------------------------

# Tags of the one-key JSON objects that stand for non-JSON values.
_BYTES, _BYTEARRAY, _TEXT, _TUPLE, _PAIRS = "\0b", "\0a", "\0u", "\0t", "\0p"
_SERIALIZED, _COPY, _REMOTE, _LOCAL = "\0s", "\0c", "\0r", "\0l"

_copiers: dict[type, tuple[str, Callable[[Any], Any]]] = {}
_builders: dict[str, Callable[[Any], Any]] = {}


def register_copyable(
    cls: type, name: str, to_state: Callable[[Any], Any], from_state: Callable[[Any], Any]
) -> None:
    """Send instances of ``cls`` by value as ``to_state(obj)`` (plain data,
    Serialized blobs allowed) and rebuild them with ``from_state(state)``.
    Both sides must register the same ``name``. Idempotent."""
    _copiers[cls] = (name, to_state)
    _builders[name] = from_state


def _exposable(obj: Any) -> bool:
    return any(name.startswith("remote_") for name in dir(type(obj)))


class Verbatim:
    """A value received as it was written (JSON text and its buffers) and
    passed on unread: a controller relaying an engine's reply to a client
    (see :func:`allow_verbatim`). Sent over a native connection, its text is
    written as it came, so the receiver gets the very bytes the first
    sender encoded; :meth:`value` decodes it for anyone who must read it.

    :ivar text: the value's JSON text (UTF-8).
    :ivar buffers: the buffers its text refers to, by index from 0.
    """

    __slots__ = ("text", "buffers")

    def __init__(self, text: bytes, buffers: list[Any]):
        self.text = text
        self.buffers = buffers

    def value(self) -> Any:
        """The value itself, decoded.

        :raises ProtocolError: the text is not well-formed.
        """
        return decode(self.text, list(self.buffers))

    def __repr__(self) -> str:
        return f"<Verbatim {len(self.text)} bytes, {len(self.buffers)} buffers>"


#: Stands in the header text for a :class:`Verbatim` value until its own
#: text replaces it (random: unknown to whoever made the rest of the message).
_VERBATIM_MARK = "\0v" + secrets.token_hex(8)


class _Encoder:
    """Turns one message's values into JSON-able data plus a list of buffers.

    A :class:`Verbatim` value met before any buffer is written as its own
    text (its buffers keep their indices: a multiengine's reply from one
    engine, or from several that replied without buffers); any other is
    decoded first.
    """

    def __init__(self, proto: NativeProtocol | None, open_verbatim: bool = False):
        self.proto = proto
        self.buffers: list[Any] = []
        self.open_verbatim = open_verbatim
        self.verbatim: list[Verbatim] = []

    def buffer(self, b: Any) -> int:
        self.buffers.append(b)
        return len(self.buffers) - 1

    def enc(self, o: Any) -> Any:
        t = type(o)
        if t is str:
            if len(o) > LONG_TEXT:
                return {_TEXT: self.buffer(o.encode("utf-8"))}
            return o
        if o is None or t is int or t is float or t is bool:
            return o
        if t is list:
            enc = self.enc
            return [enc(x) for x in o]
        if t is dict:
            enc = self.enc
            out = {}
            for k, v in o.items():
                if type(k) is not str or k[:1] == "\0":
                    return {_PAIRS: [[enc(k), enc(v)] for k, v in o.items()]}
                out[k] = enc(v)
            return out
        if t is tuple:
            enc = self.enc
            return {_TUPLE: [enc(x) for x in o]}
        if t is bytes:
            return {_BYTES: self.buffer(o)}
        if t is bytearray or t is memoryview:
            return {_BYTEARRAY: self.buffer(o)}
        if t is Serialized:
            return {_SERIALIZED: [self.buffer(f) for f in o.frames()]}
        if t is Verbatim:
            if self.buffers or self.open_verbatim:
                return self.enc(o.value())
            self.verbatim.append(o)
            self.buffers.extend(o.buffers)
            return f"{_VERBATIM_MARK}{len(self.verbatim)}"
        if t in _copiers:
            name, to_state = _copiers[t]
            return {_COPY: [name, self.enc(to_state(o))]}
        if isinstance(o, NativeRemote):
            if self.proto is None or o.proto is not self.proto:
                raise ProtocolError("a remote reference can only go back over its own connection")
            return {_LOCAL: o.oid}
        if isinstance(o, int):  # subclasses: IntEnum, ...
            return int(o)
        if isinstance(o, float):
            return float(o)
        if isinstance(o, str):
            return self.enc(str(o))
        if self.proto is not None and _exposable(o):
            return {_REMOTE: self.proto.export(o)}
        raise ProtocolError(
            f"cannot send a {t.__name__} over the native transport: only plain data, "
            "bytes, Serialized blobs and objects with remote_* methods travel"
        )


class _NotYet(Exception):
    """A message read a buffer that is still arriving: deliver it complete."""


class _Decoder:
    """Inverse of :class:`_Encoder` on the receiving side: the JSON parser
    calls :meth:`hook` on each object, innermost first, so a tagged value
    is rebuilt from contents already rebuilt, and plain lists and values
    are never walked in Python."""

    def __init__(self, proto: NativeProtocol | None, buffers: list[bytearray]):
        self.proto = proto
        self.buffers = buffers

    def buf(self, i: Any) -> bytearray:
        if type(i) is not int or not 0 <= i < len(self.buffers):
            raise ProtocolError(f"a value refers to a missing buffer {i!r}")
        return self.buffers[i]

    def content(self, i: Any) -> bytearray:
        """Buffer ``i``, to be read here: it must have arrived in full."""
        b = self.buf(i)
        if type(b) is RoutedBuffer and b.stream is not None:
            raise _NotYet
        return b

    def hook(self, o: dict) -> Any:
        if len(o) == 1:
            ((tag, v),) = o.items()
            if tag[:1] == "\0":
                return self.tagged(tag, v)
        return o

    def tagged(self, tag: str, v: Any) -> Any:
        if tag == _BYTES:
            return bytes(self.content(v))
        if tag == _BYTEARRAY:
            return self.buf(v)
        if tag == _TEXT:
            return self.content(v).decode("utf-8")
        if tag == _TUPLE and type(v) is list:
            return tuple(v)
        if tag == _PAIRS and type(v) is list:
            try:
                return {k: x for k, x in v}
            except (TypeError, ValueError):
                raise ProtocolError("malformed dict on the wire") from None
        if tag == _SERIALIZED and type(v) is list and v:
            frames = [self.buf(i) for i in v[1:]]
            # The pickle stream as bytes; buffers stay the receiver's own
            # bytearrays (writable, no copy).
            return Serialized(bytes(self.content(v[0])), frames)
        if tag == _COPY and type(v) is list and len(v) == 2 and type(v[0]) is str:
            builder = _builders.get(v[0])
            if builder is None:
                raise ProtocolError(f"unknown copyable type {v[0]!r} on the wire")
            return builder(v[1])
        if tag == _REMOTE and type(v) is int and self.proto is not None:
            return self.proto.remote(v)
        if tag == _LOCAL and type(v) is int and self.proto is not None:
            return self.proto.local(v)
        raise ProtocolError(f"malformed value on the wire (tag {tag!r})")


#: One JSON encoder for every header (``json.dumps`` with arguments builds a new one each call).
_JSON_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=True).encode


def _spliced(header: bytes, verbatim: list[Verbatim]) -> bytes | None:
    """``header`` with the text of each :class:`Verbatim` where its mark
    stands, or None if a mark is not there exactly once (the message holds
    text that looks like one)."""
    places = []
    for i, v in enumerate(verbatim, 1):
        mark = _JSON_ENCODE(f"{_VERBATIM_MARK}{i}").encode("utf-8")
        if header.count(mark) != 1:
            return None
        at = header.find(mark)
        places.append((at, at + len(mark), v.text))
    places.sort()
    parts, pos = [], 0
    for at, end, text in places:
        parts += (header[pos:at], text)
        pos = end
    parts.append(header[pos:])
    return b"".join(parts)


def encode(value: Any, proto: NativeProtocol | None = None) -> tuple[bytes, list[Any]]:
    """A message (any value the transport carries) as ``(header, buffers)``."""
    e = _Encoder(proto)
    header = _JSON_ENCODE(e.enc(value)).encode("utf-8")
    if e.verbatim:
        spliced = _spliced(header, e.verbatim)
        if spliced is not None:
            return spliced, e.buffers
        # (a mark also stands in some text of the message: decode instead)
        e = _Encoder(proto, open_verbatim=True)
        header = _JSON_ENCODE(e.enc(value)).encode("utf-8")
    return header, e.buffers


#: The message being decoded, per thread (see :func:`decode`).
_decoding = threading.local()


def _decoding_hook(o: dict) -> Any:
    return _decoding.current.hook(o)


#: One JSON decoder for every header (making one per message costs more
#: than the small messages it decodes); its hook reads this thread's message.
_JSON_DECODE = json.JSONDecoder(object_hook=_decoding_hook).decode


def decode(header: bytes, buffers: list[bytearray], proto: NativeProtocol | None = None) -> Any:
    """Inverse of :func:`encode`.

    :raises ProtocolError: the header is not well-formed.
    """
    previous = getattr(_decoding, "current", None)
    _decoding.current = _Decoder(proto, buffers)
    try:
        return _JSON_DECODE(header.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"a frame's header is not JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("a frame's header nests too deeply") from None
    finally:
        _decoding.current = previous


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class AfterWritten:
    """A reply whose value's memory is lent to the connection: ``callback``
    runs once every byte of the reply has left that memory (sent, or handed
    to the transport as a copy) or the connection is gone. A side that
    replies with a live object's memory (an engine replying to a pull) uses
    it to leave the object alone until then, instead of copying it.

    :param value: the reply.
    :param callback: called with no arguments, once.
    """

    __slots__ = ("value", "callback")

    def __init__(self, value: Any, callback: Callable[[], Any]):
        self.value = value
        self.callback = callback


#: An outbox entry that runs a callback once everything before it is written.
_NOTIFY = object()


def _run_notice(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except Exception:
        log.err(None, "native transport: a written-reply callback failed")


class _Cork:
    """While the reactor thread handles the frames it read (``depth`` > 0),
    small frames written to any connection are held in its outbox
    (``dirty``) and each outbox's are written together afterwards."""

    __slots__ = ("depth", "dirty")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: list[_Outbox] = []

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: Any) -> None:
        self.depth -= 1
        if not self.depth and self.dirty:
            dirty, self.dirty = self.dirty, []
            for outbox in dirty:
                outbox._flush_held()


_cork = _Cork()


@implementer(IPullProducer)
class _Outbox:
    """Feeds a connection's frames to its transport, in order.

    Small ``bytes`` segments are written at once (Twisted sends everything
    written in one reactor turn together). A large segment is written while
    the transport's buffer is empty, as its own pull-producer step: a large
    ``bytes`` whole (the transport then sends it without joining it to
    anything, so without a copy), any other buffer in :data:`WRITE_SLICE`
    slices (the transport takes only ``bytes``). On a plain TCP connection
    a large buffer is sent straight from its memory with ``socket.send``
    while the transport's buffer is empty and the socket takes it; only a
    piece of :data:`WAKE_PIECE` bytes goes through the transport when the
    socket is full, so that the transport calls back once it drains.
    """

    def __init__(self, transport: Any):
        self.transport = transport
        self.queue: collections.deque = collections.deque()
        self.registered = False
        self.pumping = False
        #: The TCP socket to send on directly (None: through the transport
        #: only); see :func:`_receive_into_buffers`.
        self.sock: Any = None
        #: Without a socket: nothing was written to the transport since it
        #: last said it had sent everything (see :meth:`_drained`).
        self.drained = False
        #: Held by whoever signs or writes a frame: the reactor thread, or a
        #: thread sending a call itself (:meth:`send_from_thread`). Re-entrant:
        #: a written-reply callback may send.
        self.lock = threading.RLock()
        #: Small frames, in order, to write before anything else: held while
        #: the reactor thread reads (see :class:`_Cork`), or what a thread
        #: could not send at once.
        self.held: list[bytes] = []

    def _send_direct(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except OSError:
            # Full (or broken: the transport's own write notices that).
            return 0

    def _transport_empty(self) -> bool:
        t = self.transport
        return not t._tempDataLen and t.offset == len(t.dataBuffer)

    def _idle(self) -> bool:
        """May a frame go straight to the socket now? (Nothing is waiting
        before it, here or in the transport.)"""
        t = self.transport
        return (
            self.sock is not None
            and not self.queue
            and not self.held
            and t.connected
            and not t.disconnecting
            and self._transport_empty()
        )

    def _drained(self) -> bool:
        """Has the transport sent everything written to it (so a large buffer
        may go out now, after it)?"""
        if self.sock is not None and hasattr(self.transport, "dataBuffer"):
            return self._transport_empty()  # (Twisted's TCP transport: exact)
        return self.drained

    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        self.drained = False

    def _write_small(self, data: bytes) -> None:
        # Reactor thread, lock held: straight to the socket when nothing waits
        # (no reactor turn, no poll for writability), else through the transport.
        if self._idle():
            n = self._send_direct(data)
            if n == len(data):
                return
            data = data[n:]
        self._write(data)

    def _flush_held(self) -> None:
        with self.lock:
            if self.held:
                data = b"".join(self.held)
                self.held.clear()
                self._write_small(data)
                if self.queue:
                    self._pump()

    def send(self, frame: Frame) -> None:
        """Write ``frame`` after everything sent before it (reactor thread).

        A small frame is written at once; while the reactor thread handles
        what it read (:class:`_Cork`), small frames are held and written
        together afterwards, so replies to calls read together leave in one
        ``send``.
        """
        with self.lock:
            q = self.queue
            if not q:
                data = frame.small()
                if data is not None:
                    if _cork.depth:
                        if not self.held:
                            _cork.dirty.append(self)
                        self.held.append(data)
                    elif self.held:
                        self.held.append(data)
                        self._flush_held()
                    else:
                        self._write_small(data)
                    return
            if self.held:
                data = b"".join(self.held)
                self.held.clear()
                self._write(data)
            q.append((frame.head, None))
            streams = frame.streams
            counted = None
            for i, (b, h) in enumerate(zip(frame.buffers, frame.hashes, strict=True)):
                if streams is not None and streams[i] is not None:
                    st, start = streams[i]
                    if st is not counted:  # (one stream per incoming frame)
                        st.frames += 1
                        counted = st
                    view = b if type(b) is memoryview else memoryview(b)
                    g = _Growing(view, st, start, self)
                    g.forwarded = type(h) is _ForwardedSeal
                    q.append((g, h))
                elif len(b):
                    q.append((b, h))
                else:
                    h.finish()  # nothing to write, but its digest counts
            if frame.mac is not None:
                q.append((None, frame.mac))
            self._pump()

    def send_from_thread(self, sign: Callable[[], Frame | None], reactor: Any) -> bool:
        """Sign and send a small frame from a thread other than the reactor's.

        Only when nothing is waiting to be written before it (so it cannot
        overtake anything): then ``sign()`` makes the frame (taking the
        direction's next sequence number) and it goes straight to the socket;
        what the socket does not take at once is left to the reactor thread.

        :param sign: returns the frame, or None to send nothing after all.
        :returns: False if nothing was signed (the caller should send through
            the reactor thread instead).
        """
        with self.lock:
            if not self._idle():
                return False
            frame = sign()
            if frame is None:
                return False
            data = frame.small()
            if data is None:
                raise ProtocolError("send_from_thread takes small frames only")
            n = self._send_direct(data)
            if n == len(data):
                return True
            self.held.append(data[n:])
        reactor.callFromThread(self._flush_held)
        return True

    def notify(self, callback: Callable[[], Any]) -> None:
        """Call ``callback`` once everything sent so far has left its buffers'
        memory (at once if nothing is waiting), or when the queue is cleared."""
        with self.lock:
            if not self.queue:
                _run_notice(callback)
            else:
                self.queue.append((_NOTIFY, callback))

    def clear(self) -> None:
        """Drop everything not yet written (the connection is gone); run the
        pending :meth:`notify` callbacks."""
        with self.lock:
            q, self.queue = self.queue, collections.deque()
            self.held.clear()
        for seg, callback in q:
            if seg is _NOTIFY:
                _run_notice(callback)
            elif type(seg) is _Growing:
                st = seg.stream
                st.active.discard(seg)
                if st.relay is not None:
                    splicerelay.consumer_gone(st.relay)
                st.progressed()

    def wake(self) -> None:
        """More of a buffer being forwarded arrived (or its frame ended)."""
        with self.lock:
            self._pump()

    def resumeProducing(self) -> None:  # noqa: N802
        # The transport calls this once it has written everything it held,
        # and (whatever it holds) when this registers as its producer: that
        # happens inside _pump, and is ignored.
        with self.lock:
            if self.pumping:
                return
            self.drained = True
            self._pump()

    def _send_large(self, view: memoryview, mac: Any) -> int:
        """Send what the transport and socket take now of a large buffer
        (only while :meth:`_drained`); returns the bytes consumed. The
        transport is left drained only if the socket took all of ``view``."""
        if self.sock is not None:
            # Straight from the buffer's memory while the socket takes it.
            pos, end = 0, len(view)
            while pos < end:
                chunk = view[pos : pos + WRITE_SLICE]
                try:
                    sent = self.sock.send(chunk)
                except OSError:
                    sent = 0  # full (or broken: the transport's own write notices)
                if sent and mac is not None:
                    mac.update(chunk[:sent])
                pos += sent
                if sent < len(chunk):
                    break
            if pos == end:
                return pos
            # The socket is full: hand the transport a small piece, so that
            # it calls back once the socket drains.
            n = min(end - pos, WAKE_PIECE)
        else:
            pos, n = 0, min(len(view), WRITE_SLICE)
        piece = bytes(view[pos : pos + n])
        if mac is not None:
            mac.update(piece)
        self._write(piece)
        return pos + n

    def _pump(self) -> None:
        if self.pumping:
            return
        self.pumping = True
        parked = False  # waiting for a forwarded buffer, not for the transport
        try:
            q = self.queue
            while q:
                seg, mac = q[0]
                # (seg, mac): a head (mac None), a piece of a buffer (mac its
                # _BufferHash), a buffer still arriving (a _Growing), or a
                # closing tag (seg None, mac what yields it)
                if seg is None:  # every buffer before it is hashed
                    if type(mac) is _StreamClosing:
                        st = mac.open_stream()
                        if st is not None:  # its verdict is not in yet
                            st.wait(self)
                            parked = True
                            break
                    q.popleft()
                    self._write(mac.digest())
                    continue
                if seg is _NOTIFY:  # everything before it left its memory
                    q.popleft()
                    _run_notice(mac)
                    continue
                if type(seg) is _Growing:
                    st = seg.stream
                    st.active.add(seg)
                    avail = seg.available()
                    if avail <= 0:
                        if seg.offset < len(seg.view):
                            st.wait(self)  # caught up: wait for more
                            parked = True
                            break
                        q.popleft()
                        st.active.discard(seg)
                        mac.finish()
                        st.progressed()
                        continue
                    if not self._drained():
                        break
                    relay = st.relay
                    if relay is not None and relay.pending and relay.consumer is seg:
                        # Its next bytes are in the relay's pipe: socket to socket.
                        if splicerelay.splice_write(relay, seg, self.sock):
                            st.progressed()
                            continue
                        # The socket is full: its transport calls back (as
                        # this outbox's producer) once it is writable.
                        self.transport.startWriting()
                        break
                    if (
                        self.sock is None
                        and st.state is _OPEN
                        and avail < min(WRITE_SLICE, len(seg.view) - seg.offset)
                    ):
                        # Through a transport (TLS): a slice per drain, as
                        # for any buffer, not each small piece as it comes.
                        st.wait(self)
                        parked = True
                        break
                    view = seg.view[seg.offset : seg.offset + avail]
                    seg.offset += self._send_large(view, mac)
                    st.progressed()
                    if self._drained():
                        continue
                    break  # one large step per drain
                if type(seg) is bytes and len(seg) <= WRITE_SLICE:
                    q.popleft()
                    if mac is not None:
                        mac.update(seg)
                        mac.finish()
                    self._write(seg)
                    continue
                if not self._drained():
                    break  # wait until the transport's buffer is empty
                if self.sock is None and type(seg) is bytes:
                    q.popleft()
                    if mac is not None:
                        mac.update(seg)
                        mac.finish()
                    self._write(seg)
                    break
                view = seg if type(seg) is memoryview else memoryview(seg)
                sent = self._send_large(view, mac)
                if sent == len(view):
                    q.popleft()
                    if mac is not None:
                        mac.finish()
                else:
                    q[0] = (view[sent:], mac)
                if self._drained():
                    continue
                break  # one large step per drain
            # Registered while something waits for the transport to drain;
            # not while parked (a TLS transport would poll it meanwhile).
            if q and not parked:
                if not self.registered:
                    self.registered = True
                    self.transport.registerProducer(self, False)
            elif self.registered:
                self.registered = False
                self.transport.unregisterProducer()
        finally:
            self.pumping = False

    def stopProducing(self) -> None:  # noqa: N802
        self.clear()


class Gateway:
    """The object a server offers as reference 0: named services.

    :param services: ``{name: object with remote_* methods}``.
    """

    def __init__(self, services: dict[str, Any]):
        self.services = services

    def remote_get(self, name: str) -> Any:
        """The service called ``name``."""
        if name not in self.services:
            raise ProtocolError(
                f"no service {name!r}: this controller offers {sorted(self.services)}"
            )
        return self.services[name]


class NativeProtocol(protocol.Protocol):
    """One native connection: handshake, signed frames, calls both ways.

    :param key: the cluster key.
    :param is_client: the connecting side (it proves the key first).
    :param root: the object the peer reaches as reference 0 (a
        :class:`Gateway` on a server), or None.
    :param routing: this side forwards what it receives (a controller): keep
        each received buffer's digest (see :class:`RoutedBuffer`).
    :ivar authenticated: Deferred firing once both sides proved the key
        (errback :class:`~kernel.error.SecurityError` or
        :class:`~kernel.error.ConnectionError`).
    """

    def __init__(self, key: str | bytes, is_client: bool, root: Any = None, routing: bool = False):
        self.key = key
        self.is_client = is_client
        self.routing = routing
        self.nonce = os.urandom(NONCE_BYTES)
        self.authenticated: defer.Deferred = defer.Deferred()
        self._auth_done = False
        self._hello = bytearray()
        self._reader: FrameReader | None = None
        self._writer: FrameWriter | None = None
        self._outbox: _Outbox | None = None
        self._exports: dict[int, Any] = {0: root} if root is not None else {}
        self._export_ids: dict[int, int] = {}
        self._next_oid = 1
        self._remotes: dict[int, NativeRemote] = {}
        self._calls: dict[int, defer.Deferred | ThreadWaiter] = {}
        self._call_ids = itertools.count(1)  # (next() is atomic: threads take ids too)
        self._disconnect_watchers: dict[int, tuple[Callable, tuple, dict]] = {}
        self._next_watcher = 1
        self.connected_ = False
        self.lost_reason: Failure | None = None
        #: Calls whose replies may be forwarded as they arrive.
        self._stream_replies: set[int] = set()
        #: Calls whose successful replies are delivered unread (:class:`Verbatim`).
        self._verbatim_calls: set[int] = set()

    #: A routing side forwards frames as they arrive (see "Cut-through
    #: forwarding"); off, it receives each frame whole first.
    cut_through = True

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        self.connected_ = True
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except Exception:  # pragma: no cover - a transport without TCP
                pass
        self._outbox = _Outbox(self.transport)
        _receive_into_buffers(self)
        self.transport.write(HELLO + self.nonce)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            if self._reader is None:
                data = self._read_hello(data)
                if self._reader is None:
                    return
            self._frames(self._reader.feed(data))
        except Exception as e:
            self._reject(e)

    def _frames_guarded(self, items: list[Any]) -> None:
        """:meth:`_frames`, dropping the connection on a bad one (for a
        transport's own read path)."""
        try:
            self._frames(items)
        except Exception as e:
            self._reject(e)

    def _reject(self, e: Exception) -> None:
        """Refuse a peer whose frame failed its tag; drop one that sent a bad frame."""
        if isinstance(e, SecurityError):
            self._refuse(e)
            return
        log.msg(f"native transport: dropping the connection from {self._peer()}: {e}")
        self._drop(e if isinstance(e, ProtocolError) else ProtocolError(str(e)))

    def _frames(self, items: list[Any]) -> None:
        if items:
            with _cork:
                for item in items:
                    t = type(item)
                    if t is Early:
                        self._early(item)
                    elif t is Aborted:
                        self._aborted(item)
                    elif not self._verbatim_calls or not self._verbatim_reply(*item):
                        self._message(decode(item[0], item[1], self))
        if POOL.tracked_bytes:
            from twisted.internet import reactor

            POOL.keep_trimmed(reactor)

    def _verbatim_reply(self, header: bytes, buffers: list[Any]) -> bool:
        """Deliver a success reply to a call made with ``verbatim`` unread:
        ``("ok", Verbatim(value text, buffers))``. False: decode it as usual."""
        m = _REPLY_HEAD.match(header)
        if m is None:
            return False
        call_id = int(m.group(1))
        if call_id not in self._verbatim_calls:
            return False
        start = m.end()
        if not header.startswith(_OK_HEAD, start) or not header.endswith(_OK_TAIL):
            return False  # (a failure: read as usual)
        d = self._pop_call(call_id)
        if d is not None:
            text = header[start + len(_OK_HEAD) : -len(_OK_TAIL)]
            d.callback(("ok", Verbatim(text, buffers)))
        return True

    def _early(self, item: Early) -> None:
        """Act on a frame still arriving, if what it asks for only forwards
        its large buffers (see "Cut-through forwarding"); else leave it to be
        delivered complete."""
        if not self._auth_done:
            return
        try:
            msg = decode(item.header, item.buffers, self)
        except _NotYet:
            return
        if type(msg) is not list or not msg:
            return
        kind = msg[0]
        if kind == "c" and len(msg) == 6:
            target = self._exports.get(msg[2])
            if msg[3] not in _cut_through_methods.get(type(target), ()):
                return
        elif kind == "r" and len(msg) == 3:
            if msg[1] not in self._stream_replies:
                return
        else:
            return
        item.dispatched = True
        # Only forwarded: its sealed buffers go on with their seals, unread
        # (checked here only if something in this process reads them).
        item.stream.lazy = True
        if kind == "c":
            # A caller (a client) is held back while its receivers lag; an
            # engine's reply is read on regardless (it arrives into its own
            # buffer), so that a slow client never stalls the engine's
            # connection and its heartbeats.
            item.stream.pause, item.stream.resume = _reading_switch(self.transport)
        self._message(msg)

    def _aborted(self, item: Aborted) -> None:
        """The peer (a controller) closed a frame with the abort tag: what it
        forwarded did not arrive intact. Nothing of it is used; a call fails."""
        if item.dispatched:  # (only a controller dispatches early; none sends it aborts)
            raise ProtocolError("a frame this side was forwarding was aborted by its sender")
        try:
            msg = json.loads(item.header)
            kind, call_id = msg[0], msg[1]
        except (ValueError, TypeError, IndexError, KeyError):
            raise ProtocolError("malformed header of an aborted frame") from None
        log.msg(f"native transport: {self._peer()} aborted a message ({kind!r}) in transit")
        if kind == "c":
            self._send(["e", call_id, ABORTED_CALL])
        elif kind in ("r", "e"):
            d = self._pop_call(call_id)
            if d is not None:
                from kernel.error import EngineError

                d.errback(Failure(EngineError(ABORTED_REPLY)))

    def _read_hello(self, data: bytes) -> bytes:
        self._hello += data
        size = len(HELLO) + NONCE_BYTES
        if len(self._hello) < size:
            if not HELLO.startswith(bytes(self._hello[: len(HELLO)])):
                raise ProtocolError("the peer does not speak the txkernel native protocol")
            return b""
        hello, rest = bytes(self._hello[:size]), bytes(self._hello[size:])
        self._hello = bytearray()
        if not hello.startswith(HELLO):
            raise ProtocolError("the peer does not speak the txkernel native protocol")
        peer_nonce = hello[len(HELLO) :]
        client_nonce, server_nonce = (
            (self.nonce, peer_nonce) if self.is_client else (peer_nonce, self.nonce)
        )
        c2s, s2c = session_keys(self.key, client_nonce, server_nonce)
        cluster_key = _key_bytes(self.key)
        mine, theirs = (b"c", b"s") if self.is_client else (b"s", b"c")
        own = origin_prefix(client_nonce, server_nonce, mine)
        writer = self._writer = FrameWriter(c2s if self.is_client else s2c, cluster_key, own)
        self._reader = FrameReader(
            s2c if self.is_client else c2s,
            routing=self.routing,
            pool=POOL,
            cluster_key=cluster_key,
            peer_origin=origin_prefix(client_nonce, server_nonce, theirs),
            own_origin=own,
            sent=lambda: writer.seq,
        )
        self._reader.cut_through = self.routing and self.cut_through
        if self.is_client:
            self._send(["a"])  # proves the key
        return rest

    def _refuse(self, e: SecurityError) -> None:
        log.msg(f"native transport: SecurityError from {self._peer()}: {e}")
        if not self.is_client and self.transport is not None:
            self.transport.write(_PREFIX.pack(REFUSED, 0, 0))
            self.transport.loseConnection()
        else:
            self._abort()
        self._fail_auth(e)

    def _drop(self, e: Exception) -> None:
        self._fail_auth(e)
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()

    def _fail_auth(self, e: Exception) -> None:
        if not self._auth_done:
            self._auth_done = True
            self.authenticated.errback(Failure(e))

    def _peer(self) -> str:
        try:
            p = self.transport.getPeer()
            return f"{p.host}:{p.port}"
        except Exception:
            return "a peer"

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        self.connected_ = False
        self.lost_reason = reason
        if _is_tls_failure(reason):
            self._fail_auth(_TLSRefused(str(reason.value)))
        self._fail_auth(
            ConnectionError(f"the connection closed before the handshake finished: {reason.value}")
        )
        with self._outbox_lock():
            # (a thread sending a call checks connected_ under this lock)
            calls, self._calls = self._calls, {}
        for d in calls.values():
            d.errback(Failure(error.ConnectionLost(f"the connection was lost: {reason.value}")))
        watchers, self._disconnect_watchers = self._disconnect_watchers, {}
        for cb, args, kwargs in watchers.values():
            try:
                cb(*args, **kwargs)
            except Exception:
                log.err(None, "a disconnect watcher failed")
        self._exports.clear()
        self._export_ids.clear()
        self._stream_replies.clear()
        self._verbatim_calls.clear()
        if self._reader is not None:
            self._reader.abandon()
        if self._outbox is not None:
            self._outbox.clear()

    # -- messages ------------------------------------------------------------

    def _send(self, message: Any) -> None:
        header, buffers = encode(message, self)
        outbox = self._outbox
        with outbox.lock:  # signed and queued in one step: sequence order is wire order
            outbox.send(self._writer.frame(header, buffers))

    def _message(self, msg: Any) -> None:
        if type(msg) is not list or not msg:
            raise ProtocolError(f"malformed message {msg!r:.100}")
        kind = msg[0]
        if not self._auth_done:
            # The first verified frame proves the peer holds the key.
            if self.is_client and kind == "w":
                self._auth_done = True
                self.authenticated.callback(self)
                return
            if not self.is_client and kind == "a":
                self._auth_done = True
                self._send(["w"])
                self.authenticated.callback(self)
                return
            raise ProtocolError(f"unexpected message {kind!r} before the handshake")
        if kind == "c":
            _, call_id, oid, method, args, kwargs = msg
            self._dispatch(call_id, oid, method, args, kwargs)
        elif kind == "o":
            _, oid, method, args, kwargs = msg
            self._dispatch(0, oid, method, args, kwargs)
        elif kind == "r":
            d = self._pop_call(msg[1])
            if d is not None:
                d.callback(msg[2])
        elif kind == "e":
            d = self._pop_call(msg[1])
            if d is not None:
                d.errback(Failure(ProtocolError(f"the peer failed the call: {msg[2]}")))
        else:
            raise ProtocolError(f"unknown message kind {kind!r}")

    def _pop_call(self, call_id: Any) -> Any:
        # The call's reply came (or it was never sent): forget it; its
        # Deferred (or thread waiter), if one still waits.
        if self._stream_replies:
            self._stream_replies.discard(call_id)
        if self._verbatim_calls:
            self._verbatim_calls.discard(call_id)
        return self._calls.pop(call_id, None)

    def _dispatch(self, call_id: int, oid: Any, method: Any, args: Any, kwargs: Any) -> None:
        thread_reply = None
        try:
            target = self._exports.get(oid)
            if target is None:
                raise ProtocolError(f"no object {oid!r} on this connection")
            if type(method) is not str or method.startswith("_"):
                raise ProtocolError(f"bad method name {method!r}")
            _check_remote_interface(target, method)
            func = getattr(target, f"remote_{method}", None)
            if func is None:
                raise ProtocolError(f"{type(target).__name__} has no remote method {method!r}")
            if type(args) is not list or type(kwargs) is not dict:
                raise ProtocolError("malformed call arguments")
            if method in _thread_reply_methods.get(type(target), ()):
                # (whatever the peer sent under that name is replaced)
                if call_id and self._outbox is not None and self._outbox.sock is not None:
                    thread_reply = ThreadReply(self, call_id)
                kwargs = dict(kwargs, thread_reply=thread_reply)
            if method in _verbatim_methods.get(type(target), ()):
                token = PASSING_ON.set(True)
                try:
                    d = defer.maybeDeferred(func, *args, **kwargs)
                finally:
                    PASSING_ON.reset(token)
            else:
                d = defer.maybeDeferred(func, *args, **kwargs)
        except Exception:
            d = defer.fail()
        if call_id:
            d.addCallbacks(
                self._reply,
                self._reply_failure,
                (call_id, thread_reply),
                None,
                (call_id, method, thread_reply),
            )
        else:
            d.addErrback(lambda f: log.msg(f"one-way call {method!r} failed: {f.value}"))

    def _reply(self, value: Any, call_id: int, thread_reply: ThreadReply | None = None) -> None:
        written = None
        if type(value) is AfterWritten:
            value, written = value.value, value.callback
        try:
            if not self.connected_:
                return
            if thread_reply is not None and not thread_reply.take_over():
                return  # (a thread sent it)
            try:
                self._send(["r", call_id, value])
            except Exception:
                self._reply_failure(Failure(), call_id, "?")
                return
            if written is not None:
                self._outbox.notify(written)
                written = None
        finally:
            if written is not None:
                _run_notice(written)

    def _reply_failure(
        self, f: Failure, call_id: int, method: Any, thread_reply: ThreadReply | None = None
    ) -> None:
        if not self.connected_:
            return
        if thread_reply is not None and not thread_reply.take_over():
            log.msg(f"native call {method!r} failed after its reply was sent: {f.value}")
            return
        if not f.check(ProtocolError, TypeError):
            log.msg(f"native call {method!r} failed: {f.type.__name__}: {f.value}")
        self._send(["e", call_id, f"{f.type.__name__}: {f.value}"])

    # -- references ----------------------------------------------------------

    def export(self, obj: Any) -> int:
        """The id the peer uses to call ``obj`` (kept until the connection closes)."""
        oid = self._export_ids.get(id(obj))
        if oid is None or self._exports.get(oid) is not obj:
            oid = self._next_oid
            self._next_oid += 1
            self._exports[oid] = obj
            self._export_ids[id(obj)] = oid
        return oid

    def remote(self, oid: int) -> NativeRemote:
        """The peer's object ``oid`` (one NativeRemote per object)."""
        r = self._remotes.get(oid)
        if r is None:
            r = self._remotes[oid] = NativeRemote(self, oid)
        return r

    def local(self, oid: int) -> Any:
        """This side's exported object ``oid``."""
        if oid not in self._exports:
            raise ProtocolError(f"no object {oid!r} on this connection")
        return self._exports[oid]

    def call(
        self,
        oid: int,
        method: str,
        args: tuple,
        kwargs: dict,
        reply: bool = True,
        stream_reply: bool = False,
        verbatim: bool = False,
    ):
        """Send a call; fire its (decoded) reply when ``reply``.

        :param stream_reply: a routing side may act on the reply before its
            large buffers have arrived (only forwarding them: see "Cut-through
            forwarding").
        :param verbatim: a reply that is a success envelope fires as
            ``("ok", Verbatim(...))``, its value unread (see :func:`allow_verbatim`).
        """
        if not self.connected_ or not self._auth_done:
            return defer.fail(error.ConnectionLost("the connection to the peer is closed"))
        try:
            if not reply:
                self._send(["o", oid, method, list(args), kwargs])
                return None
            call_id = next(self._call_ids)
            d = defer.Deferred()
            self._calls[call_id] = d
            if stream_reply:
                self._stream_replies.add(call_id)
            if verbatim:
                self._verbatim_calls.add(call_id)
            try:
                self._send(["c", call_id, oid, method, list(args), kwargs])
            except Exception:
                self._pop_call(call_id)
                raise
            return d
        except Exception:
            return defer.fail()

    def call_from_thread(
        self, oid: int, method: str, args: tuple, kwargs: dict, reactor: Any = None
    ) -> ThreadWaiter | None:
        """Send a call from a thread other than the reactor's, without waking
        the reactor thread (which still receives the reply).

        Only a small call carrying plain data (no references) on an idle
        plain TCP connection goes this way; anything else returns None
        before anything is sent, and the caller sends it through the reactor
        thread instead (:meth:`call`).

        :returns: a :class:`ThreadWaiter` for the reply, or None (not sent).
        """
        outbox, writer = self._outbox, self._writer
        if outbox is None or writer is None or outbox.sock is None:
            return None
        call_id = next(self._call_ids)
        try:
            header, buffers = encode(["c", call_id, oid, method, list(args), kwargs], None)
        except ProtocolError:
            return None  # references travel through the reactor thread
        if len(header) + sum(memoryview(b).nbytes for b in buffers) > SMALL_FRAME - 1024:
            return None
        waiter = ThreadWaiter()

        def sign() -> Frame | None:
            if not self.connected_ or not self._auth_done:
                return None
            frame = writer.frame(header, buffers)
            self._calls[call_id] = waiter
            return frame

        if reactor is None:
            from twisted.internet import reactor
        if not outbox.send_from_thread(sign, reactor):
            return None
        return waiter

    def _outbox_lock(self) -> Any:
        return self._outbox.lock if self._outbox is not None else _NO_LOCK

    def watch_disconnect(self, cb: Callable, args: tuple, kwargs: dict) -> int:
        marker = self._next_watcher
        self._next_watcher += 1
        self._disconnect_watchers[marker] = (cb, args, kwargs)
        return marker

    def unwatch_disconnect(self, marker: int) -> None:
        self._disconnect_watchers.pop(marker, None)


#: Largest single receive straight into a frame's buffer.
RECV_INTO_LIMIT = 4 * 2**20


def _receive_into_buffers(proto: NativeProtocol) -> None:
    """On a plain TCP transport, receive frame buffers straight into their
    preallocated bytearrays (``recv_into``), instead of into a new ``bytes``
    per read that is then copied; and send large buffers straight from their
    memory (see :class:`_Outbox`).

    Twisted's TCP transports read with ``socket.recv`` in ``doRead``; this
    gives the one connection a ``doRead`` that reads into the frame reader's
    room when a buffer is being received and otherwise does what Twisted's
    does. Other transports (TLS, test transports) keep the ordinary path.
    """
    from twisted.internet import main, tcp

    transport = proto.transport
    sock = getattr(transport, "socket", None)
    if not isinstance(transport, tcp.Connection) or sock is None or transport.TLS:
        return
    transport.SEND_LIMIT = WRITE_SLICE
    proto._outbox.sock = sock
    ordinary = transport.doRead

    def do_read() -> Any:
        if proto.routing:
            done = splicerelay.splice_read(proto, sock)
            if done is not NotImplemented:
                return done
        reader = proto._reader
        room = reader.room() if reader is not None else None
        if room is None:
            return ordinary()
        try:
            n = sock.recv_into(room, min(len(room), RECV_INTO_LIMIT))
        except OSError as e:
            if e.args[0] in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                return None
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        items = reader.received_into(n)
        if items:
            proto._frames_guarded(items)
        return None

    transport.doRead = do_read


def _is_tls_failure(reason: Failure) -> bool:
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - TLS needs pyOpenSSL anyway
        return False
    return reason.check(SSL.Error) is not None


def _check_remote_interface(target: Any, method: str) -> None:
    """Refuse a method the target's Foolscap RemoteInterface (if it declares
    one) does not list, unless the target names it in ``native_remote_methods``."""
    allowed = _allowed_methods.get(type(target))
    if allowed is None:
        allowed = _allowed_methods[type(target)] = _remote_methods(target)
    if allowed is not True and method not in allowed[1]:
        raise ProtocolError(f"no remote method {method!r} on {allowed[0]}")


#: type -> True (no RemoteInterface: any remote_* method), or
#: (interface name, allowed method names).
_allowed_methods: dict[type, Any] = {}


def _remote_methods(target: Any) -> Any:
    if "foolscap" not in sys.modules:
        # No class can declare a Foolscap RemoteInterface without Foolscap
        # loaded; a native-only process must not load it here either.
        return True
    try:
        from foolscap.remoteinterface import getRemoteInterface
    except ImportError:  # pragma: no cover - foolscap is a dependency
        return True
    iface = getRemoteInterface(target)
    if iface is None:
        return True
    names = frozenset(iface.names()) | frozenset(getattr(target, "native_remote_methods", ()))
    return (iface.__remote_name__, names)


class ThreadWaiter:
    """The reply to a call sent with :meth:`NativeProtocol.call_from_thread`:
    the calling thread waits with :meth:`wait`; the reactor thread fires it
    (the ``callback``/``errback`` of a Deferred, without the chain)."""

    __slots__ = ("_done", "value", "failed")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self.value: Any = None
        self.failed = False

    def callback(self, value: Any) -> None:
        self.value = value
        self._done.release()

    def errback(self, failure: Failure) -> None:
        self.value = failure
        self.failed = True
        self._done.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the reply (``timeout`` seconds at most; None: for ever).

        :returns: whether it came; then :attr:`value` holds it, or the
            Failure when :attr:`failed`.
        """
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._done.release()
        return True


class _NoLock:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: Any) -> None:
        pass


_NO_LOCK = _NoLock()


def _reading_switch(transport: Any) -> tuple[Any, Any]:
    """``(pause, resume)`` reading from ``transport``: its own producer
    methods (TCP), else those of the connection under it (TLS), else
    ``(None, None)``."""
    for t in (transport, getattr(transport, "transport", None)):
        pause = getattr(t, "pauseProducing", None)
        resume = getattr(t, "resumeProducing", None)
        if pause is not None and resume is not None:
            return pause, resume
    return None, None


#: What an engine answers to a call the controller aborted in transit.
ABORTED_CALL = (
    "ProtocolError: the controller aborted this message in transit (the data it was "
    "forwarding did not verify, or its sender disconnected): nothing of it was used"
)
#: The error of a call whose reply the controller aborted in transit.
ABORTED_REPLY = (
    "the reply was cut off in transit: the engine sending it disconnected (or its data "
    "did not verify) while the controller was forwarding it; nothing of it was used. "
    "Check the engine and ask again."
)

#: type -> names of its remote methods a routing side may call on a frame
#: still arriving (see :func:`allow_cut_through`).
_cut_through_methods: dict[type, frozenset[str]] = {}


def allow_cut_through(cls: type, methods: Any) -> None:
    """Let a controller call ``remote_<method>`` of ``cls`` instances, for
    each of ``methods``, as soon as a call's header has verified, with its
    large buffers still arriving.

    Only for methods that do nothing with those buffers but send them on
    over native connections (a push's blob to engines): the buffers are
    forwarded as they arrive, and the frames carrying them close with a valid
    tag only once the incoming frame's own closing tag has verified.
    """
    _cut_through_methods[cls] = frozenset(_cut_through_methods.get(cls, ())) | frozenset(methods)


#: True while a remote method registered with :func:`allow_verbatim` runs
#: (its synchronous part): engine replies it asks for may stay unread.
PASSING_ON: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "txkernel_native_passing_on", default=False
)

#: type -> names of its remote methods that pass engine replies on unread
#: (see :func:`allow_verbatim`).
_verbatim_methods: dict[type, frozenset[str]] = {}


def allow_verbatim(cls: type, methods: Any) -> None:
    """Say that ``remote_<method>`` of ``cls`` instances, for each of
    ``methods``, replies with what engines replied, unread (inside a
    success envelope and a list per engine, as a multiengine does).

    While such a method runs, :data:`PASSING_ON` is true: an engine call
    made then may ask for its reply as a :class:`Verbatim`
    (:meth:`NativeRemote.callRemoteVerbatim`), which the controller sends on
    without decoding and encoding it again.
    """
    _verbatim_methods[cls] = frozenset(_verbatim_methods.get(cls, ())) | frozenset(methods)


#: A reply frame's header up to its value: the call id.
_REPLY_HEAD = re.compile(rb'\["r",(\d+),')
#: How a success envelope's text starts and (with the message) ends.
_OK_HEAD = b'{"\\u0000t":["ok",'
_OK_TAIL = b"]}]"

#: type -> names of its remote methods that may answer from another thread
#: (see :func:`allow_thread_reply`).
_thread_reply_methods: dict[type, frozenset[str]] = {}


def allow_thread_reply(cls: type, methods: Any) -> None:
    """Let ``remote_<method>`` of ``cls`` instances, for each of ``methods``,
    answer a call from a thread other than the reactor's.

    Such a method is called with one more keyword argument, ``thread_reply``:
    a :class:`ThreadReply` for the call on a plain TCP connection, else None.
    The method still returns (a Deferred of) its reply as usual; if a thread
    sent it first with :meth:`ThreadReply.send`, that value is not sent again.
    """
    _thread_reply_methods[cls] = frozenset(_thread_reply_methods.get(cls, ())) | frozenset(methods)


class ThreadReply:
    """The reply to one call, which a thread other than the reactor's (an
    engine's executor thread, as a command ends) may send itself.

    The reply is signed and written under the connection's write lock, as a
    blocking client's call is (:meth:`NativeProtocol.call_from_thread`): only
    when nothing waits to be written before it (so it overtakes nothing),
    only if it is a small frame of plain data. Otherwise nothing is sent and
    the reply goes through the reactor thread as usual.

    The reactor thread may come to reply while a thread is about to: both
    decide under the write lock, so exactly one of them sends (see
    :meth:`take_over`).

    :ivar sent: True once :meth:`send` sent the reply.
    """

    __slots__ = ("proto", "call_id", "sent", "closed")

    def __init__(self, proto: NativeProtocol, call_id: int):
        self.proto = proto
        self.call_id = call_id
        self.sent = False
        self.closed = False  # the reactor thread replies: a thread may not

    def take_over(self) -> bool:
        """The reactor thread is about to reply: True if it should (no thread
        sent the reply, and none will now), False if a thread sent it."""
        with self.proto._outbox_lock():
            if self.sent:
                return False
            self.closed = True
            return True

    def send(self, value: Any, reactor: Any = None) -> bool:
        """Send ``value`` as the call's reply now, from the calling thread.

        :returns: True if it was sent (the reactor thread then sends nothing
            for this call), False if it must go through the reactor thread.
        """
        proto = self.proto
        outbox, writer = proto._outbox, proto._writer
        if self.sent or self.closed or outbox is None or writer is None or outbox.sock is None:
            return False
        try:
            header, buffers = encode(["r", self.call_id, value], None)
        except ProtocolError:
            return False  # references are exported by the reactor thread
        if len(header) + sum(memoryview(b).nbytes for b in buffers) > SMALL_FRAME - 1024:
            return False

        def sign() -> Frame | None:  # (under the write lock)
            if self.closed or not proto.connected_:
                return None
            frame = writer.frame(header, buffers)
            self.sent = True
            return frame

        if reactor is None:
            from twisted.internet import reactor
        return outbox.send_from_thread(sign, reactor)


class NativeRemote:
    """An object on the other side of a native connection, with the Foolscap
    reference API the client halves use.

    :param proto: the connection.
    :param oid: the object's id on the far side.
    """

    def __init__(self, proto: NativeProtocol, oid: int):
        self.proto = proto
        self.oid = oid

    def __repr__(self) -> str:
        return f"<NativeRemote {self.oid} on {self.proto._peer()}>"

    def callRemote(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:  # noqa: N802
        """Call ``remote_<method>`` on the far object.

        :returns: Deferred firing its reply.
        :raises: (errback) ``ConnectionLost`` when the connection is gone;
            :class:`~kernel.error.ProtocolError` when the far side refused or
            failed the call itself.
        """
        return self.proto.call(self.oid, method, args, kwargs)

    def callRemoteStreamed(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:  # noqa: N802
        """:meth:`callRemote`, letting a controller forward the reply's large
        buffers as they arrive (see :meth:`NativeProtocol.call`)."""
        return self.proto.call(self.oid, method, args, kwargs, stream_reply=True)

    def callRemoteVerbatim(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:  # noqa: N802
        """:meth:`callRemote`; a successful reply fires as ``("ok",
        Verbatim(...))``, its value unread (see :func:`allow_verbatim`)."""
        return self.proto.call(self.oid, method, args, kwargs, verbatim=True)

    def callRemoteOnly(self, method: str, *args: Any, **kwargs: Any) -> None:  # noqa: N802
        """Call without waiting for (or getting) a reply."""
        d = self.proto.call(self.oid, method, args, kwargs, reply=False)
        if d is not None:
            d.addErrback(lambda f: None)

    def notifyOnDisconnect(self, callback: Callable, *args: Any, **kwargs: Any) -> int:  # noqa: N802
        """Call ``callback(*args, **kwargs)`` once the connection is lost
        (soon, if it is already). Returns a marker for :meth:`dontNotifyOnDisconnect`."""
        if not self.proto.connected_:
            from twisted.internet import reactor

            reactor.callLater(0, callback, *args, **kwargs)
            return 0
        return self.proto.watch_disconnect(callback, args, kwargs)

    def dontNotifyOnDisconnect(self, marker: int) -> None:  # noqa: N802
        """Cancel a :meth:`notifyOnDisconnect`."""
        self.proto.unwatch_disconnect(marker)

    def getPeer(self) -> Any:  # noqa: N802
        """The address of the far end."""
        return self.proto.transport.getPeer()

    @property
    def tracker(self) -> Any:
        """Mirrors Foolscap's ``reference.tracker.broker.transport``, so code
        that drops a connection through it works unchanged."""
        return _Tracker(self.proto)

    def disconnect(self) -> None:
        """Drop the connection at once."""
        self.proto._abort()


class _Tracker:
    __slots__ = ("broker",)

    def __init__(self, broker: Any):
        self.broker = broker


# ---------------------------------------------------------------------------
# The two ends
# ---------------------------------------------------------------------------


class NativeServerFactory(protocol.Factory):
    """Accepts native connections proving ``key``; offers ``services``.

    :param key: the cluster key.
    :param services: ``{name: object}`` reachable with ``get(name)``.
    """

    def __init__(self, key: str | bytes, services: dict[str, Any]):
        self.key = key
        self.gateway = Gateway(services)

    def buildProtocol(self, addr: Any) -> NativeProtocol:  # noqa: N802
        p = NativeProtocol(self.key, is_client=False, root=self.gateway, routing=True)
        p.factory = self
        # A refused or failed handshake is logged where it happens.
        p.authenticated.addErrback(lambda f: None)
        return p


async def connect(
    host: str,
    port: int,
    key: str | bytes,
    service: str,
    timeout: float = 30.0,
    reactor: Any = None,
    certificate: str | None = None,
) -> NativeRemote:
    """Connect to a native controller, prove the key, get the service ``service``.

    :param certificate: None for plain TCP; for a controller serving TLS, its
        certificate (PEM, from ``native.json``): only a peer holding its key
        is accepted.
    :returns: the service as a :class:`NativeRemote`.
    :raises SecurityError: the controller refused the key, or did not prove it
        holds the same key, or does not hold the pinned certificate's key.
    :raises ConnectionError: nothing answers at ``host:port`` within ``timeout``.
    """
    from twisted.internet import endpoints

    if reactor is None:
        from twisted.internet import reactor
    where = f"{host}:{port}"
    if certificate is None:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        tls = _pinned_tls(certificate)
        endpoint = endpoints.SSL4ClientEndpoint(reactor, host, port, tls, timeout=timeout)
    proto = NativeProtocol(key, is_client=True)
    try:
        d = endpoints.connectProtocol(endpoint, proto)
        d.addCallback(lambda _: proto.authenticated)
        d.addCallback(lambda _: proto.call(0, "get", (service,), {}))
        d.addTimeout(timeout, reactor)
        remote = await d
    except SecurityError as e:
        if proto.transport is not None:
            proto._abort()
        if isinstance(e, _TLSRefused):
            raise SecurityError(
                f"the controller at {where} is not the one {NATIVE_FILE} names: its TLS "
                f"certificate does not match ({e}). Use the {NATIVE_FILE} written by the "
                "running controller."
            ) from None
        raise SecurityError(
            f"the controller at {where} and this side do not share a cluster key ({e}). "
            f"Use the {NATIVE_FILE} written by the running controller (its cluster "
            "directory), or restart the cluster."
        ) from None
    except Exception as e:
        if proto.transport is not None:
            proto._abort()
        if isinstance(e, ProtocolError):
            raise
        raise ConnectionError(
            f"cannot reach a native controller at {where} ({e or type(e).__name__}): start "
            "one with `txkernel cluster start -n 4 --adapter native`."
        ) from None
    if not isinstance(remote, NativeRemote):
        proto._abort()
        raise ProtocolError(f"the controller answered get({service!r}) with {remote!r:.100}")
    return remote


def read_connection_info(cd: Any) -> dict[str, Any]:
    """Read ``native.json`` from a cluster directory.

    :param cd: a :class:`~kernel.clusterdir.ClusterDir`.
    :returns: ``{'host', 'port', 'key'}``.
    :raises ConnectionError: there is no ``native.json``.
    :raises SecurityError: the file or the directory is not private.
    """
    info = cd.read_json(NATIVE_FILE)
    if info is None:
        raise ConnectionError(
            f"no native connection file {cd.file(NATIVE_FILE)}: is a controller running "
            "with --adapter native in this cluster directory? Start one with "
            f"`txkernel cluster start -n 4 --adapter native --cluster-dir {cd.path}`."
        )
    return info


def connect_client(
    client_class: Callable[[NativeRemote], Any],
    service: str,
    cluster_dir: Any = None,
    info: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Connect to a controller's client service and wrap it in a client half.

    :param client_class: called with the service's :class:`NativeRemote`.
    :param service: the service to open (the multiengine or task service).
    :param cluster_dir: where the controller wrote ``native.json`` (None: the
        default cluster directory).
    :param info: the connection info itself, instead of ``cluster_dir``.
    :param timeout: bound on connecting and the handshake, seconds.
    :returns: Deferred firing ``client_class(remote)``.
    :raises: (errback) :class:`~kernel.error.SecurityError` for a wrong key
        or a connection file others can read;
        :class:`~kernel.error.ConnectionError` if no controller answers.
    """

    async def go() -> Any:
        from kernel.clusterdir import ClusterDir

        i = info if info is not None else read_connection_info(ClusterDir(cluster_dir))
        return client_class(await connect_info(i, service, timeout))

    return defer.ensureDeferred(go())


async def connect_info(info: dict[str, Any], service: str, timeout: float = 30.0) -> NativeRemote:
    """:func:`connect` with the content of ``native.json``.

    :raises ProtocolError: the connection info is malformed.
    """
    try:
        host, port, key = info["host"], int(info["port"]), info["key"]
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"malformed {NATIVE_FILE}: it needs host, port and key") from None
    return await connect(host, port, key, service, timeout, certificate=info.get("certificate"))


class _TLSRefused(SecurityError):
    """The TLS handshake failed: the peer is not the pinned controller."""


def _pinned_tls(certificate: str) -> Any:
    """Client TLS options trusting exactly ``certificate`` (PEM)."""
    from twisted.internet import ssl

    try:
        pinned = ssl.Certificate.loadPEM(certificate.encode("ascii"))
    except Exception:
        raise SecurityError(
            f"the certificate in {NATIVE_FILE} is unreadable: use the {NATIVE_FILE} "
            "written by the running controller"
        ) from None
    return ssl.CertificateOptions(trustRoot=ssl.trustRootFromCertificates([pinned]))


def serve_controller(
    cd: Any,
    registrar: Any,
    multiengine: Any = None,
    task_controller: Any = None,
    interface: str = "127.0.0.1",
    port: int = 0,
    tls: bool = False,
) -> Any:
    """The controller's native side: one port for engines and clients, and
    ``native.json`` (host, port, cluster key; mode 0600, written atomically).

    With ``tls`` the port speaks TLS with the controller's self-signed
    certificate (kept in the cluster directory, shared with the PB adapter:
    :func:`kernel.pbutil.controller_certificate`), and ``native.json`` pins
    its public half: peers accept only a controller holding its key. Frames
    are signed either way.

    The key of an earlier ``native.json`` is kept, so the engines and clients
    of a restarted controller connect again by themselves.

    :param cd: the :class:`~kernel.clusterdir.ClusterDir` (created).
    :param registrar: a :class:`kernel.enginenative.NativeEngineRegistrar`.
    :param multiengine: the core :class:`~kernel.multiengine.MultiEngine`, or None.
    :param task_controller: the core task controller, or None.
    :param port: 0 for the port of the last run if free, else any free one.
    :param tls: serve TLS (see above).
    :returns: a MultiService to add to the controller's service tree.
    :raises SecurityError: an existing ``native.json`` is not private.
    """
    import socket

    from twisted.application import service

    from kernel import ports

    old = cd.read_json(NATIVE_FILE) or {}
    reservation = ports.reserve(cd, "native", interface, port)
    info = {
        "host": socket.getfqdn() if interface in ("", "0.0.0.0") else interface,
        "port": reservation.port,
        "key": old.get("key") or generate_key(),
    }
    services: dict[str, Any] = {"registrar": registrar}
    if multiengine is not None:
        from kernel import multienginenative

        services["multiengine"] = multienginenative.make_client_referenceable(
            multiengine, output=registrar
        )
    if task_controller is not None:
        from kernel import tasknative

        services["task"] = tasknative.NativeTaskControllerFromTaskController(task_controller)

    top = service.MultiService()
    factory = NativeServerFactory(info["key"], services)
    tls_options = None
    if tls:
        from kernel import pbutil

        cert = pbutil.controller_certificate(cd)
        info["certificate"] = pbutil.public_pem(cert)
        tls_options = cert.options()
    ports.listening_service(reservation, factory, tls_options).setServiceParent(top)
    ConnectionFile(cd, info).setServiceParent(top)
    top.info = info
    top.factory = factory
    return top


class ConnectionFile(Service):
    """Writes ``native.json`` (mode 0600, atomically) once the port listens.

    :param cd: the :class:`~kernel.clusterdir.ClusterDir`.
    :param info: the connection info to write.
    """

    def __init__(self, cd: Any, info: dict[str, Any]):
        self.cd = cd
        self.info = info

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        self.cd.write_json(NATIVE_FILE, self.info)
