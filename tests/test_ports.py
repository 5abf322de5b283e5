"""Tests for kernel.ports: ports held from the moment they are chosen."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface.verify import verifyObject

from kernel import ports
from kernel.clusterdir import ClusterDir

TIMEOUT = 10


@pytest.fixture
def cd(tmp_path):
    return ClusterDir(tmp_path / "c").create()


def _bind_fails(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_a_chosen_port_is_held_until_released_and_remembered(cd):
    reservation = ports.reserve(cd, "native", "127.0.0.1", 0)
    try:
        assert reservation.held
        assert _bind_fails(reservation.port)  # nobody else can take it meanwhile
        assert cd.get_port("native") == reservation.port
    finally:
        reservation.release()
    assert not reservation.held
    assert not _bind_fails(reservation.port)


def test_the_remembered_port_is_taken_again_when_free(cd):
    first = ports.reserve(cd, "engine", "127.0.0.1", 0)
    first.release()
    again = ports.reserve(cd, "engine", "127.0.0.1", 0)
    try:
        assert again.port == first.port and again.held
    finally:
        again.release()


def test_a_remembered_port_in_use_gives_way_to_another_held_one(cd):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        cd.set_port("engine", taken)
        reservation = ports.reserve(cd, "engine", "127.0.0.1", 0)
        try:
            assert reservation.port != taken and reservation.held
            assert cd.get_port("engine") == reservation.port
        finally:
            reservation.release()


def test_a_named_port_is_not_bound_until_listening(cd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        named = s.getsockname()[1]
    reservation = ports.reserve(cd, "native", "127.0.0.1", named)
    assert reservation.port == named and not reservation.held
    assert not _bind_fails(named)
    assert cd.get_port("native") == named


def test_an_interface_of_no_machine_names_the_option_to_fix(cd):
    with pytest.raises(OSError, match="--interface"):
        ports.reserve(cd, "native", "192.0.2.1", 0)  # TEST-NET-1: never local


class _Greeter(protocol.Protocol):
    def connectionMade(self):  # noqa: N802
        self.transport.write(b"hello")
        self.transport.loseConnection()


def _read_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        chunks = []
        while chunk := s.recv(100):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_the_service_adopts_the_held_socket_and_answers_a_connection_made_before(cd):
    from twisted.internet import threads

    reservation = ports.reserve(cd, "native", "127.0.0.1", 0)
    early = socket.create_connection(("127.0.0.1", reservation.port), timeout=TIMEOUT)
    svc = ports.listening_service(reservation, protocol.Factory.forProtocol(_Greeter))
    svc.startService()
    try:
        assert not reservation.held  # the reactor has it now
        with early:
            early_reply = await threads.deferToThread(lambda: early.recv(100))
        assert early_reply == b"hello"  # waited in the backlog, then served
        assert await threads.deferToThread(_read_greeting, reservation.port) == b"hello"
    finally:
        await svc.stopService()
    assert not _bind_fails(reservation.port)  # stopping frees the port


@pytest_twisted.ensureDeferred
async def test_a_named_port_in_use_fails_the_start_with_the_reason(cd):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        reservation = ports.reserve(cd, "native", "127.0.0.1", taken)
        svc = ports.listening_service(reservation, protocol.Factory.forProtocol(_Greeter))
        with pytest.raises(CannotListenError, match="in use"):
            svc.startService()


@pytest_twisted.ensureDeferred
async def test_an_endpoint_keeping_its_failure_fires_no_port_and_says_why(cd):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        endpoint = ports.PortEndpoint(
            ports.reserve(cd, "engine", "127.0.0.1", taken), keep_failure=True
        )
        verifyObject(IStreamServerEndpoint, endpoint)
        port = await endpoint.listen(protocol.Factory.forProtocol(_Greeter))
    assert port is None
    assert endpoint.failure.check(CannotListenError)


@pytest_twisted.ensureDeferred
async def test_the_endpoint_speaks_tls_when_given_options(cd):
    from twisted.internet import endpoints, ssl

    from kernel import pbutil

    cert = pbutil.controller_certificate(cd)
    reservation = ports.reserve(cd, "native", "127.0.0.1", 0)
    got = defer.Deferred()

    class Reader(protocol.Protocol):
        def dataReceived(self, data):  # noqa: N802
            got.callback(data)
            self.transport.loseConnection()

    listening = await ports.PortEndpoint(reservation, tls=cert.options()).listen(
        protocol.Factory.forProtocol(_Greeter)
    )
    try:
        trust = ssl.CertificateOptions(trustRoot=ssl.trustRootFromCertificates([cert]))
        client = endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", reservation.port, trust)
        await client.connect(protocol.Factory.forProtocol(Reader))
        assert await got.addTimeout(TIMEOUT, reactor) == b"hello"
    finally:
        await listening.stopListening()
