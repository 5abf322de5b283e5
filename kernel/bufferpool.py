"""Receive buffers that are reused once nothing else holds them.

A fresh ``bytearray(n)`` of 100 MB costs more than receiving 100 MB into
it: the memory is zero-filled, and every page of it is faulted in and
cleared by the kernel first. Profiling a 100 MB push and pull over the
native transport showed that allocation as the largest single cost in the
controller, and a large one in engines and clients.

:class:`BufferPool` hands out large receive buffers and keeps track of them.
When a buffer of the same type and size is needed again, one that nothing
outside the pool refers to any more is handed out again, as it is (its old
bytes are overwritten by the receive). "Nothing refers to it" is exact in
CPython: every holder of the buffer's memory (a ``memoryview``, a NumPy
array built on it, a ``Serialized`` blob, an outbox slice being written)
holds a reference to the buffer object, so a buffer whose reference count is
the pool's own is unreachable from anywhere else and cannot be reached again.

A new buffer is not zero-filled either (:func:`allocate`): a receive
overwrites it, as it does a reused one, and a large allocation then costs
nothing until its pages are written. That matters most in a controller,
which may forward a buffer socket to socket without ever writing it (see
:mod:`kernel.splicerelay`): its pages are never faulted in at all.

Free buffers are not kept forever: :meth:`BufferPool.trim` drops those idle
for :data:`IDLE_SECONDS`, and the pool never tracks more than
:data:`LIMIT_BYTES` in all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MIN_BYTES", "LIMIT_BYTES", "IDLE_SECONDS", "BufferPool", "POOL", "allocate"]

#: Buffers smaller than this are allocated fresh each time (cheap enough).
MIN_BYTES = 1 << 20
#: Most bytes the pool tracks at once (in use or free).
LIMIT_BYTES = 512 << 20
#: A free buffer unused this long is released by :meth:`BufferPool.trim`.
IDLE_SECONDS = 10.0


def _refs(entry: list) -> int:
    """The reference count of the buffer in ``entry``, as seen from here."""
    return sys.getrefcount(entry[0])


#: CPython's ``PyByteArray_Resize`` once looked up; False where unavailable.
_resize: Any = None


def _resizer() -> Any:
    global _resize
    if _resize is None:
        _resize = False
        try:
            import ctypes
            import platform

            if platform.python_implementation() == "CPython":
                resize = ctypes.pythonapi.PyByteArray_Resize
                resize.argtypes = [ctypes.py_object, ctypes.c_ssize_t]
                resize.restype = ctypes.c_int
                _resize = resize
        except Exception:  # pragma: no cover - no C API to call
            _resize = False
    return _resize


def allocate(kind: type, size: int) -> Any:
    """A new ``kind(size)`` whose bytes are not zero-filled (undefined, like
    a reused buffer's), for a receive to overwrite: a large one then costs
    nothing until its pages are written. Where that is not possible, a
    plain (zero-filled) ``kind(size)``.

    :param kind: ``bytearray`` or a subclass of it.
    """
    resize = _resizer() if size >= MIN_BYTES else False
    if not resize:
        return kind(size)
    buf = kind()
    try:
        resize(buf, size)
    except Exception:  # pragma: no cover - out of memory: as kind(size) would
        return kind(size)
    return buf


# What _refs sees for a buffer held by its entry alone (measured, not assumed:
# how many references the call itself adds depends on the interpreter).
_FREE = _refs([bytearray()])


class BufferPool:
    """Large receive buffers, reused once only the pool refers to them.

    :param limit: most bytes tracked at once.
    :param idle: seconds after which a free buffer is released by :meth:`trim`.
    :param clock: returns the time in seconds (for tests).
    """

    def __init__(
        self,
        limit: int = LIMIT_BYTES,
        idle: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limit = limit
        self.idle = idle
        self.clock = clock
        # [buffer, time last handed out]
        self._entries: list[list[Any]] = []
        self._bytes = 0
        self._timer: Any = None
        # take/trim from any thread (a gather joins in a pooled buffer on
        # whichever thread calls it): a free buffer is handed out once.
        self._lock = threading.Lock()

    @property
    def tracked_bytes(self) -> int:
        """Bytes of the buffers tracked now (in use or free)."""
        return self._bytes

    def take(self, kind: type, size: int) -> Any:
        """A buffer ``kind(size)``: a free tracked one of that type and size
        if there is one (its content is left as it was), else a new one
        (:func:`allocate`: its content is undefined).

        :param kind: ``bytearray`` or a subclass of it.
        """
        if size < MIN_BYTES:
            return kind(size)
        with self._lock:
            now = self.clock()
            for entry in self._entries:
                if type(entry[0]) is kind and len(entry[0]) == size and _refs(entry) == _FREE:
                    entry[1] = now
                    return entry[0]
            self._trim(now, size)
        buf = allocate(kind, size)  # (outside the lock: it may take a while)
        with self._lock:
            if self._bytes + size <= self.limit:
                self._entries.append([buf, now])
                self._bytes += size
        return buf

    def trim(self, now: float | None = None, need: int = 0) -> int:
        """Release free buffers idle for longer than ``idle`` seconds, and
        more (oldest first) if ``need`` more bytes would exceed the limit.

        :returns: the bytes still tracked.
        """
        with self._lock:
            return self._trim(self.clock() if now is None else now, need)

    def _trim(self, now: float, need: int) -> int:
        keep = []
        free = []
        for entry in sorted(self._entries, key=lambda e: e[1]):
            if _refs(entry) == _FREE:
                if now - entry[1] > self.idle:
                    continue
                free.append(entry)
            keep.append(entry)
        total = sum(len(e[0]) for e in keep)
        for entry in free:
            if total + need <= self.limit:
                break
            keep.remove(entry)
            total -= len(entry[0])
        self._entries = keep
        self._bytes = total
        return total

    def keep_trimmed(self, reactor: Any) -> None:
        """While buffers are tracked, :meth:`trim` every ``idle`` seconds on
        ``reactor`` (so free buffers are released without further receives)."""
        if self._bytes and (self._timer is None or not self._timer.active()):
            self._timer = reactor.callLater(self.idle, self._timed_trim, reactor)

    def _timed_trim(self, reactor: Any) -> None:
        self._timer = None
        if self.trim():
            self.keep_trimmed(reactor)

    def has_free(self) -> bool:
        """Whether any tracked buffer is free now (a :meth:`trim` may release it)."""
        with self._lock:
            return any(_refs(e) == _FREE for e in self._entries)


#: The process's pool, shared by every native connection.
POOL = BufferPool()
