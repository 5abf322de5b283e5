"""A controller's listening ports: chosen once, and held from the moment they
are chosen until the controller listens on them.

A port found free by binding to port 0 and closing the socket again can be
taken before the controller listens on it: the kernel hands out the same range
as source ports of outgoing connections. So :func:`reserve` keeps the socket it
chose the port with, bound and listening, and the controller's listener adopts
that very socket when it starts (:func:`listening_service`, :class:`PortEndpoint`).

A port the user names is only bound when the controller starts, as before: if
it is taken, the start fails with the reason. A port remembered from the last
run is reused when it is still free (engines and clients of that run find the
controller again), else any free one is taken.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

#: The backlog of a held socket: connections that arrive before the reactor
#: adopts it wait there.
BACKLOG = 128


class Reservation:
    """A TCP port on ``interface``: held by a bound, listening socket when
    txkernel chose it, else only named (the user's choice).

    :ivar port: the port number.
    :ivar interface: the address it is on.
    """

    def __init__(self, interface: str, port: int, sock: socket.socket | None = None):
        self.interface = interface
        self.port = port
        self._sock = sock

    def __repr__(self) -> str:
        return f"<Reservation {self.interface}:{self.port}{' held' if self._sock else ''}>"

    @property
    def held(self) -> bool:
        """Whether a socket holds the port until a listener takes it."""
        return self._sock is not None

    def take(self) -> socket.socket | None:
        """The held socket, once (the caller closes it); None if not held."""
        sock, self._sock = self._sock, None
        return sock

    def release(self) -> None:
        """Close the held socket, if any (the port is free again)."""
        sock = self.take()
        if sock is not None:
            sock.close()


def _bound(interface: str, port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # as the reactor's own listening ports: a port in TIME_WAIT is reusable
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((interface, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        return None
    return sock


def reserve(cd: Any, name: str, interface: str, port: int) -> Reservation:
    """The port a listener called ``name`` uses, remembered in the cluster
    directory for the next run.

    :param cd: the :class:`~kernel.clusterdir.ClusterDir`.
    :param name: the listener's name in ``ports.json`` (``native``, ``engine``...).
    :param interface: the address to listen on.
    :param port: the user's port, or 0 for the remembered one if still free,
        else any free one (both held until the listener starts).
    :raises OSError: no port at all could be bound on ``interface``.
    """
    if port:
        reservation = Reservation(interface, port)
    else:
        remembered = cd.get_port(name)
        sock = _bound(interface, remembered) if remembered else None
        if sock is None:
            sock = _bound(interface, 0)
            if sock is None:
                raise OSError(
                    f"cannot listen on {interface!r}: it is not an address of this "
                    "machine; choose one with --interface (127.0.0.1 for this machine only)"
                )
        reservation = Reservation(interface, sock.getsockname()[1], sock)
    cd.set_port(name, reservation.port)
    return reservation


@implementer(IStreamServerEndpoint)
class PortEndpoint:
    """A server endpoint on a :class:`Reservation`: it adopts the held socket,
    or listens on the named port; with ``tls`` (Twisted TLS options) it speaks
    TLS.

    A listening failure fires the Deferred :meth:`listen` returns, and is also
    kept in :attr:`failure` (Foolscap's listener adds no errback to it).
    """

    def __init__(self, reservation: Reservation, tls: Any = None, keep_failure: bool = False):
        self.reservation = reservation
        self.tls = tls
        self.keep_failure = keep_failure
        self.failure: Any = None

    def listen(self, factory: Any) -> Any:
        """Listen with ``factory``; fires the listening port."""
        from twisted.internet import defer, reactor

        if self.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        sock = self.reservation.take()
        if sock is None:
            from twisted.internet.endpoints import TCP4ServerEndpoint

            d = TCP4ServerEndpoint(
                reactor, self.reservation.port, interface=self.reservation.interface
            ).listen(factory)
        else:
            # The reactor listens on its own duplicate of the descriptor, which
            # must not block: it accepts until no connection is left waiting.
            sock.setblocking(False)
            with sock:
                d = defer.maybeDeferred(
                    reactor.adoptStreamPort, sock.fileno(), sock.family, factory
                )
        if self.keep_failure:
            d.addErrback(self._keep)
        return d

    def _keep(self, failure: Any) -> None:
        self.failure = failure
        return None  # the caller sees no port (see :class:`kernel.tap.ListeningCheck`)


def listening_service(reservation: Reservation, factory: Any, tls: Any = None) -> Any:
    """A service that listens on ``reservation`` with ``factory`` while it runs
    (TLS with ``tls``); a port that cannot be listened on fails its start.

    :returns: a :class:`twisted.application.internet.StreamServerEndpointService`.
    """
    from twisted.application import internet

    svc = internet.StreamServerEndpointService(PortEndpoint(reservation, tls), factory)
    svc._raiseSynchronously = True  # as TCPServer: a start that cannot listen raises
    return svc
