"""Per-thread capture of ``sys.stdout`` and ``sys.stderr``.

Several engines may share one process (in-process clusters, tests), each
running user code on its own thread. While an engine runs a command, text
that its thread writes to ``sys.stdout``/``sys.stderr`` must go to that
command's buffers, and text from every other thread to the real streams.

This module puts a small proxy on ``sys.stdout`` and ``sys.stderr`` that looks
up the writing thread in a registry of *sinks*: a thread with a sink writes
there, any other thread writes to the stream the proxy replaced. Only Python
level writes are seen; output written straight to file descriptor 1 or 2 (by
C code or a subprocess) is not captured, nor is output from threads that user
code starts itself.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kernel.wiretext import safe_text

STREAMS = ("stdout", "stderr")

_lock = threading.RLock()
#: thread ident -> the sink receiving that thread's output
_sinks: dict[int, OutputSink] = {}
#: stream name -> our proxy (created once, reused)
_proxies: dict[str, _StreamProxy] = {}
_users = 0


class OutputSink:
    """Collects one command's output, and passes each write to a callback.

    :ivar stdout: a :class:`io.StringIO` holding the captured stdout text.
    :ivar stderr: likewise for stderr.
    """

    def __init__(self, on_write: Callable[[str, str], None] | None = None):
        """:param on_write: called as ``on_write(stream_name, text)`` for every
        write, on the writing thread."""
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self._on_write = on_write

    def write(self, stream_name: str, text: str) -> int:
        """Record ``text`` written to ``stream_name`` (``'stdout'``/``'stderr'``).

        Lone surrogates become backslash escapes (:func:`kernel.wiretext.safe_text`)
        so the output can be sent."""
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        written = len(text)
        text = safe_text(text)
        getattr(self, stream_name).write(text)
        if self._on_write is not None and text:
            self._on_write(stream_name, text)
        return written


class _StreamProxy(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``; routes writes by thread."""

    def __init__(self, name: str, real):
        self._name = name
        self.real = real

    def write(self, text: str) -> int:
        sink = _sinks.get(threading.get_ident())
        if sink is not None:
            return sink.write(self._name, text)
        if self.real is None:
            return len(text)
        return self.real.write(text)

    def flush(self) -> None:
        if threading.get_ident() not in _sinks and self.real is not None:
            self.real.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        if threading.get_ident() in _sinks or self.real is None:
            return False
        return self.real.isatty()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def fileno(self) -> int:
        if self.real is None:
            raise io.UnsupportedOperation("fileno")
        return self.real.fileno()

    def __getattr__(self, attr):
        # Anything else (buffer, errors, ...) comes from the real stream.
        return getattr(self.real, attr)


def _ensure_proxies() -> None:
    """Put our proxies on ``sys.stdout``/``sys.stderr`` if something else is there.

    Test runners and notebooks swap these streams freely; whatever stream is
    current becomes the one other threads write to.
    """
    for name in STREAMS:
        current = getattr(sys, name)
        proxy = _proxies.get(name)
        if proxy is not None and current is proxy:
            continue
        if proxy is None:
            proxy = _proxies[name] = _StreamProxy(name, current)
        else:
            proxy.real = current
        setattr(sys, name, proxy)


def acquire() -> None:
    """Declare one more user of capturing (an engine); installs the proxies."""
    global _users
    with _lock:
        _users += 1
        _ensure_proxies()


def release() -> None:
    """Declare one user fewer; the last one puts the real streams back."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return
        for name in STREAMS:
            proxy = _proxies.get(name)
            if proxy is not None and getattr(sys, name) is proxy:
                setattr(sys, name, proxy.real)


def installed() -> bool:
    """True if both proxies are currently on ``sys.stdout``/``sys.stderr``."""
    return all(getattr(sys, n) is _proxies.get(n) for n in STREAMS)


@contextmanager
def capturing(sink: OutputSink) -> Iterator[OutputSink]:
    """Send the current thread's ``sys.stdout``/``sys.stderr`` writes to ``sink``.

    Reinstalls the proxies first if something replaced them.
    """
    ident = threading.get_ident()
    with _lock:
        _ensure_proxies()
        _sinks[ident] = sink
    try:
        yield sink
    finally:
        with _lock:
            _sinks.pop(ident, None)
