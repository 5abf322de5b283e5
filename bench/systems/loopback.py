"""The physical reference: plain TCP sockets between two processes on loopback.

An echo/sink server runs in a second process (``python -m
bench.systems.loopback --serve``). The client measures a 1-byte round trip
(``TCP_NODELAY`` on both ends) and one-way bandwidth: it sends from one
preallocated buffer, the server receives into another with ``recv_into`` and
acknowledges the last byte, so no time goes to allocation or copying in
Python. That is the most any Python transport on this machine can reach.
"""

from __future__ import annotations

import platform
import socket
import struct
import subprocess
import sys
import time

from bench.systems import System

_HEADER = struct.Struct("!cQ")  # op, count
_CHUNK = 4 * 1024 * 1024


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("peer closed the connection")
        data += more
    return bytes(data)


def serve(listener: socket.socket) -> None:
    """Serve one client: ``r`` n = echo n single bytes; ``b`` n = sink n bytes, ack."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(_CHUNK))
    with conn:
        while True:
            header = conn.recv(_HEADER.size, socket.MSG_WAITALL)
            if len(header) < _HEADER.size:
                return
            op, count = _HEADER.unpack(header)
            if op == b"r":
                for _ in range(count):
                    byte = conn.recv(1)
                    if not byte:
                        return
                    conn.sendall(byte)
            elif op == b"b":
                left = count
                while left:
                    got = conn.recv_into(buf, min(left, _CHUNK))
                    if not got:
                        return
                    left -= got
                conn.sendall(b"k")
            else:
                return


class LoopbackSystem(System):
    """Plain sockets: the limit any transport on this machine works against."""

    name = "loopback"
    not_applicable = {}

    def __init__(self) -> None:
        self._server: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._payload = memoryview(bytearray(_CHUNK))

    def versions(self) -> dict[str, str]:
        return {"python": platform.python_version(), "kernel": platform.release()}

    def start(self) -> None:
        self._server = subprocess.Popen(
            [sys.executable, "-m", "bench.systems.loopback", "--serve"],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = int(self._server.stdout.readline())
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._server is not None:
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    def probe_tcp_rtt(self, size: int) -> dict[str, float]:
        sock = self._sock
        sock.sendall(_HEADER.pack(b"r", size))
        t0 = time.perf_counter()
        for _ in range(size):
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionError("loopback server went away")
        return {"tcp_rtt": time.perf_counter() - t0}

    def probe_tcp_bandwidth(self, size: int) -> dict[str, float]:
        sock = self._sock
        t0 = time.perf_counter()
        sock.sendall(_HEADER.pack(b"b", size))
        left = size
        while left:
            n = min(left, _CHUNK)
            sock.sendall(self._payload[:n])
            left -= n
        if _recv_exactly(sock, 1) != b"k":
            raise ConnectionError("loopback server sent a bad acknowledgement")
        return {"tcp_bandwidth": time.perf_counter() - t0}


def systems() -> list[System]:
    """:returns: the systems this module provides."""
    return [LoopbackSystem()]


def _serve_main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    with listener:
        serve(listener)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve_main()
