"""A controller forwards sealed buffers socket to pipe to socket (``splice``).

A controller cutting a large frame through (see "Cut-through forwarding" in
:mod:`kernel.nativeproto`) never needs the bytes of a buffer sealed end to
end: the seal travels with the buffer and the final receiver checks it. On
Linux, over plain TCP on both sides, such a buffer's bytes need not enter
the controller's memory at all: :func:`splice_read` moves them from the
sender's socket into a pipe and :func:`splice_write` from the pipe into the
receiver's socket, both with ``os.splice``, so the kernel hands the pages on
instead of copying them into the process and out again.

One :class:`SpliceRelay` per forwarded stream, used only while it is safe:

- exactly one outgoing frame forwards the stream, its segment for the
  buffer being received is at the head of its connection's queue (so
  nothing else is written to that socket until the buffer is through), it
  passes the buffer on with its seal (:class:`~kernel.nativeproto._ForwardedSeal`:
  the writer needs none of its bytes), and both connections are plain TCP;
- the pipe's bytes are exactly the next ones the receiver sends: a read is
  spliced only when the receiver has sent everything received before it
  (else it is received into memory as without a relay, and the receiver
  sends the pipe's bytes first, then memory).

Backpressure: the pipe is bounded (:data:`PIPE_BYTES`). When it is full the
sender's connection is not read until the receiver has taken half of it; the
receiver's socket being full makes the outbox wait for its transport to say
it is writable (its own readiness, through the reactor). An engine's reply
(a pull) must not stall the engine's connection behind a slow client (its
heartbeats ride on it): if the pipe stays full for :data:`STALL_SECONDS`
the engine is read again, into memory, as without a relay.

A buffer any part of which went through a pipe is marked ``spliced``: its
memory has holes, so nothing in the controller may read it or forward it
again (the relay only runs for a stream with one forwarding frame).

Faults: the receiver's connection dropping mid-buffer (:func:`consumer_gone`)
discards the pipe and lets the sender be read on into memory (the frame
completes or fails as without a relay; the call to the lost engine fails);
the sender dropping mid-buffer fails the stream, and the receiver sends the
pipe's bytes, then the rest, and closes its frame with the abort tag, as
without a relay.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import sys
from typing import Any

__all__ = [
    "AVAILABLE",
    "PIPE_BYTES",
    "PIPES",
    "STALL_SECONDS",
    "SpliceRelay",
    "splice_read",
    "splice_write",
    "consumer_gone",
    "stream_ended",
]

#: ``os.splice`` exists and moves socket bytes through pipes (Linux).
AVAILABLE = hasattr(os, "splice") and sys.platform.startswith("linux")
#: The size of each of the relay's pipes (the kernel may round it; the
#: unprivileged limit is ``/proc/sys/fs/pipe-max-size``, 1 MiB by default).
PIPE_BYTES = 1 << 20
#: Pipes one relay may fill before it stops reading the sender: a few
#: MiB in flight keep both sockets busy while the other side is scheduled.
PIPES = 4
#: How long a pull's engine connection may wait for a slow client before it
#: is read into memory instead (a stalled client must not stall heartbeats).
STALL_SECONDS = 0.25

_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)
#: False once splicing failed for a reason other than a full pipe or socket
#: (a kernel refusing it): no relay is made again in this process.
_enabled = AVAILABLE


class _Pipe:
    """One pipe of a relay: its two ends and the bytes in it."""

    __slots__ = ("r", "w", "n", "cap", "full")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # (the default size: smaller, still correct)
        self.cap = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)
        self.n = 0
        #: It took no more although under :attr:`cap` (its slots are used up).
        self.full = False

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:  # pragma: no cover - already closed
                pass


class SpliceRelay:
    """One stream's pipes and the bookkeeping between its two sockets.

    Bytes go into the last pipe until it is full, then into a new one (up
    to :data:`PIPES`), and come out of the first; so the pipes together are
    one queue, in order.

    :param stream: the :class:`~kernel.nativeproto._Stream` being forwarded.
    :param pause: stops reading the sender's connection.
    :param resume: reads it again.
    :param timed: the sender is an engine replying: full pipes hold it
        back for at most :data:`STALL_SECONDS` (see the module docstring).
    :raises OSError: no pipe could be made.
    """

    __slots__ = (
        "stream",
        "pipes",
        "spare",
        "capacity",
        "pending",
        "consumer",
        "paused",
        "stalled",
        "pause",
        "resume",
        "timed",
        "timer",
        "closed",
    )

    def __init__(self, stream: Any, pause: Any, resume: Any, timed: bool):
        self.stream = stream
        first = _Pipe()
        self.pipes: collections.deque[_Pipe] = collections.deque([first])
        self.spare: list[_Pipe] = []
        #: Bytes the pipes hold at most.
        self.capacity = first.cap * PIPES
        #: Bytes in the pipes: the next ones :attr:`consumer` sends.
        self.pending = 0
        #: The outbox segment (:class:`~kernel.nativeproto._Growing`) the
        #: pipes' bytes belong to.
        self.consumer: Any = None
        self.paused = False
        self.stalled = False
        self.pause = pause
        self.resume = resume
        self.timed = timed
        self.timer: Any = None
        self.closed = False

    def close(self) -> None:
        """Drop the pipes (and whatever is left in them); read the sender again."""
        if self.closed:
            return
        self.closed = True
        # (nothing here may keep the buffer alive: the pool reuses it once free)
        self.consumer = None
        self.pending = 0
        self._unpause()
        for pipe in (*self.pipes, *self.spare):
            pipe.close()
        self.pipes.clear()
        self.spare.clear()

    def fill(self, fd: int, want: int) -> int | None:
        """Splice up to ``want`` bytes from ``fd`` into the pipes.

        :returns: bytes moved (0: end of file), or None if nothing could
            move now (the pipes are full, or ``fd`` had nothing after all).
        :raises OSError: as ``os.splice`` does, except for a full pipe.
        """
        for _ in range(2):
            tail = self.pipes[-1]
            if tail.full or tail.n >= tail.cap:
                if len(self.pipes) >= PIPES:
                    return None
                tail = self.spare.pop() if self.spare else _Pipe()
                self.pipes.append(tail)
            try:
                n = os.splice(fd, tail.w, min(want, tail.cap - tail.n), flags=_FLAGS)
            except BlockingIOError:
                if not tail.n:
                    return None  # (an empty pipe: the socket had nothing)
                tail.full = True  # (or the socket had nothing: then so will the next)
                continue
            tail.n += n
            self.pending += n
            return n
        return None

    def full(self) -> bool:
        """Can the pipes take no more?"""
        tail = self.pipes[-1]
        return len(self.pipes) >= PIPES and (tail.full or tail.n >= tail.cap)

    def head(self) -> _Pipe:
        """The pipe the next bytes come out of."""
        return self.pipes[0]

    def _pause(self) -> None:
        if self.paused or self.pause is None:
            return
        self.paused = True
        self.pause()
        if self.timed:
            from twisted.internet import reactor

            self.timer = reactor.callLater(STALL_SECONDS, self._stall)

    def _unpause(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        if self.paused:
            self.paused = False
            try:
                self.resume()
            except Exception:  # pragma: no cover - a transport already gone
                pass

    def _stall(self) -> None:
        # The receiver took nothing for a while: read the sender into memory.
        self.timer = None
        self.stalled = True
        self._unpause()

    def took(self, n: int) -> None:
        """The receiver sent ``n`` bytes out of the first pipe."""
        head = self.pipes[0]
        head.n -= n
        self.pending -= n
        if not head.n and len(self.pipes) > 1:
            head.full = False
            self.spare.append(self.pipes.popleft())
        elif not head.n:
            head.full = False
        self.stalled = False
        if self.paused and self.pending <= self.capacity // 2:
            self._unpause()
        if not self.pending:
            self.consumer = None
            if self.stream.state != "open":
                self.close()


def _eligible(reader: Any, buf: Any) -> Any:
    """The outbox segment a read of ``reader``'s current buffer may be
    spliced to, else None (see the module docstring)."""
    st = reader._stream
    if st is None or not st.lazy or st.state != "open" or st.frames != 1:
        return None
    if len(st.active) != 1 or reader._checks[reader._index] is None:
        return None
    (seg,) = st.active
    if not seg.forwarded or seg.outbox.sock is None or seg.view.obj is not buf:
        return None
    relay = st.relay
    pending = relay.pending if relay is not None else 0
    if seg.start + seg.offset + pending != st.received:
        return None  # (memory bytes wait before where the pipe would go)
    return seg


def splice_read(proto: Any, sock: Any) -> Any:
    """Move the next bytes of the buffer ``proto`` is receiving from ``sock``
    into its stream's pipe, if that is safe now (``do_read`` of a plain TCP
    connection: see :func:`kernel.nativeproto._receive_into_buffers`).

    :returns: ``NotImplemented`` to read the ordinary way; else what
        ``doRead`` returns (None, or a connection-lost marker).
    """
    global _enabled
    reader = proto._reader
    if not _enabled or reader is None or reader._state != "buffers" or reader._stream is None:
        return NotImplemented
    buf = reader._buffers[reader._index]
    seg = _eligible(reader, buf)
    st = reader._stream
    if seg is None:
        return NotImplemented
    relay = st.relay
    if relay is None:
        from kernel.nativeproto import _reading_switch

        pause, resume = _reading_switch(proto.transport)
        try:
            relay = st.relay = SpliceRelay(st, pause, resume, timed=st.pause is None)
        except OSError:
            return NotImplemented
    if relay.closed or relay.stalled:
        return NotImplemented
    room = min(len(buf) - reader._filled, 4 << 20)
    try:
        n = relay.fill(sock.fileno(), room)
    except InterruptedError:
        return None
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) and not relay.pending:
            _enabled = False
            return NotImplemented
        from twisted.internet import main

        return main.CONNECTION_LOST
    if n is None:
        if relay.full():
            relay._pause()  # until the receiver has taken half
        return None
    if not n:
        from twisted.internet import main

        return main.CONNECTION_DONE
    relay.consumer = seg
    st.spliced = True
    buf.spliced = True
    items = reader.received_into(n)  # (advances the stream: wakes the receiver)
    if items:
        proto._frames_guarded(items)
    return None


def splice_write(relay: SpliceRelay, seg: Any, sock: Any) -> int:
    """Send what the socket takes of the pipe's bytes for ``seg``.

    :returns: bytes sent; 0 if the socket is full (or broken: the
        transport's own write notices that).
    """
    head = relay.pipes[0]
    want = min(head.n, len(seg.view) - seg.offset)
    try:
        n = os.splice(head.r, sock.fileno(), want, flags=_FLAGS)
    except OSError:
        return 0
    if n:
        seg.offset += n
        relay.took(n)
    return n


def consumer_gone(relay: SpliceRelay) -> None:
    """The receiver's connection is gone: drop the pipe, read the sender on."""
    relay.close()


def stream_ended(relay: SpliceRelay) -> None:
    """The stream's frame ended (verified or not): the pipe goes once the
    receiver has sent what is in it."""
    relay._unpause()
    if not relay.pending:
        relay.close()
