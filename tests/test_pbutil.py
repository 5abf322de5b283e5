"""PB plumbing: chunking both ways, schema checks, references, and cred."""

from __future__ import annotations

import os

import numpy as np
import pytest
import pytest_twisted
from foolscap.api import Any, RemoteInterface
from foolscap.constraint import ByteStringConstraint
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm
from twisted.internet import defer, error, reactor
from twisted.spread import banana, pb
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kernel import pbutil
from kernel.clusterdir import ClusterDir
from kernel.error import ConnectionError, ProtocolError, SecurityError
from kernel.serialized import Serialized, deserialize, serialize

SECRET = pbutil.generate_secret()


class RIEcho(RemoteInterface):
    __remote_name__ = "RIEcho.test_pbutil"

    def echo(value=Any()):  # noqa: B008 - Foolscap schema syntax
        return Any()

    def small(data=ByteStringConstraint(maxLength=10)):  # noqa: B008
        return int


class Echo:
    """A target with ``remote_*`` methods, as the Foolscap server halves are."""

    def __init__(self):
        self.calls: list[str] = []

    def remote_echo(self, value):
        self.calls.append("echo")
        return value

    def remote_sizes(self, value):
        self.calls.append("sizes")
        return [len(value), type(value).__name__]

    def remote_child(self):
        return Echo()

    def remote_fail(self):
        raise ValueError("boom")


@implementer(RIEcho)
class CheckedEcho(Echo):
    def remote_small(self, data):
        self.calls.append("small")
        return len(data)


class Server:
    """A PB listener on an ephemeral loopback port behind a cred portal."""

    def __init__(self, services: dict, secret: str = SECRET, username: str = pbutil.CLIENT_USER):
        portal = pbutil.make_portal(username, secret, services)
        self.factory = pbutil.server_factory(portal)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.address = self.port.getHost()

    async def connect(self, name: str, secret: str = SECRET, username: str = pbutil.CLIENT_USER):
        return await pbutil.login("127.0.0.1", self.address.port, username, secret, name)

    async def stop(self) -> None:
        await self.port.stopListening()


async def _close(remote: pbutil.PBRemote) -> None:
    lost = defer.Deferred()
    remote.notifyOnDisconnect(lost.callback, None)
    remote.disconnect()
    await lost.addTimeout(10, reactor)


async def _serve(target):
    server = Server({"echo": target})
    remote = await server.connect("echo")
    return server, remote


@pytest_twisted.async_yield_fixture
async def echo():
    target = Echo()
    server, remote = await _serve(target)
    yield target, remote
    await _close(remote)
    await server.stop()


@pytest_twisted.async_yield_fixture
async def checked():
    target = CheckedEcho()
    server, remote = await _serve(target)
    yield target, remote
    await _close(remote)
    await server.stop()


def test_banana_refuses_large_strings_so_chunking_is_needed():
    """The limit this module works around: banana will not send 640 KiB + 1."""
    b = banana.Banana()
    b.currentDialect = b"none"
    b.outgoingSymbols = {}
    with pytest.raises(banana.BananaError):
        b.sendEncoded(b"x" * (banana.SIZE_LIMIT + 1))


@pytest_twisted.ensureDeferred
async def test_large_bytes_travel_chunked_both_ways(echo):
    _, remote = echo
    data = os.urandom(3 * pbutil.CHUNK_SIZE + 12345)
    assert await remote.callRemote("echo", data) == data


@pytest_twisted.ensureDeferred
async def test_the_large_values_of_one_message_share_one_chunk_source(echo):
    _, remote = echo
    values = [os.urandom(pbutil.INLINE_LIMIT + 1 + i) for i in range(3)]
    wire = pbutil.to_wire({"a": values[0], "b": [values[1], serialize(values[2])]})
    sources = {id(wire["a"].source), id(wire["b"][0].source)}
    assert len(sources) == 1  # one PB reference per message, however many values
    assert await remote.callRemote("echo", values) == values


@pytest_twisted.ensureDeferred
async def test_large_text_travels_chunked_both_ways(echo):
    _, remote = echo
    text = "é☃x" * 400_000  # about 2.4 MB of UTF-8
    back = await remote.callRemote("echo", text)
    assert type(back) is str and back == text


@pytest_twisted.ensureDeferred
async def test_serialized_with_large_buffers_round_trips_unopened(echo):
    _, remote = echo
    array = np.arange(2_000_000, dtype=np.float64)  # 16 MB out of band
    blob = serialize({"a": array, "small": [1, 2]})
    assert blob.buffers, "the array should travel out of band"
    back = await remote.callRemote("echo", {"x": blob})
    assert isinstance(back["x"], Serialized)
    assert back["x"] == blob
    value = deserialize(back["x"])
    np.testing.assert_array_equal(value["a"], array)
    assert value["a"].flags.writeable


@pytest_twisted.ensureDeferred
async def test_long_lists_tuples_and_dicts_travel_in_parts(echo, monkeypatch):
    # A small part size keeps this quick: banana parses many small tokens slowly.
    monkeypatch.setattr(pbutil, "MAX_ITEMS", 1000)
    _, remote = echo
    n = 2 * pbutil.MAX_ITEMS + 7
    value = {"list": list(range(n)), "tuple": tuple(range(n)), "dict": {i: -i for i in range(n)}}
    wire = pbutil.to_wire(value)
    assert all(isinstance(wire[k], pbutil.WireParts) for k in value)
    back = await remote.callRemote("echo", value)
    assert back == value
    assert type(back["tuple"]) is tuple


@pytest_twisted.ensureDeferred
async def test_plain_data_keeps_its_types(echo):
    _, remote = echo
    value = {"n": None, "b": True, "f": 1.5, "s": "x", "by": b"y", "t": (1, [2, {"k": 3}])}
    assert await remote.callRemote("echo", value) == value


@pytest_twisted.ensureDeferred
async def test_arguments_are_received_whole_before_the_call(echo):
    target, remote = echo
    n = 5 * pbutil.CHUNK_SIZE
    assert await remote.callRemote("sizes", b"z" * n) == [n, "bytes"]
    assert target.calls == ["sizes"]


@pytest_twisted.ensureDeferred
async def test_schema_limits_refuse_the_call_before_it_runs(checked):
    target, remote = checked
    assert await remote.callRemote("small", b"0123456789") == 10
    with pytest.raises(ProtocolError, match="data"):
        await remote.callRemote("small", b"x" * 11)
    assert target.calls == ["small"]


@pytest_twisted.ensureDeferred
async def test_methods_outside_the_remote_interface_are_refused(checked):
    target, remote = checked
    with pytest.raises(ProtocolError, match="no remote method"):
        await remote.callRemote("sizes", b"x")
    assert target.calls == []


@pytest_twisted.ensureDeferred
async def test_unexpected_errors_reach_the_caller_as_protocol_errors():
    server = Server({"echo": Echo()})
    remote = await server.connect("echo")
    try:
        with pytest.raises(ProtocolError, match="boom"):
            await remote.callRemote("fail")
    finally:
        await _close(remote)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_returned_objects_become_callable_references():
    server = Server({"echo": Echo()})
    remote = await server.connect("echo")
    try:
        child = await remote.callRemote("child")
        assert isinstance(child, pbutil.PBRemote)
        assert await child.callRemote("echo", b"q" * (pbutil.INLINE_LIMIT + 1)) == b"q" * (
            pbutil.INLINE_LIMIT + 1
        )
    finally:
        await _close(remote)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_calls_with_connection_lost_and_notifies(echo):
    _, remote = echo
    notified = defer.Deferred()
    remote.notifyOnDisconnect(notified.callback, "gone")
    remote.disconnect()
    assert await notified.addTimeout(10, reactor) == "gone"
    with pytest.raises(error.ConnectionLost):
        await remote.callRemote("echo", 1)


# -- cred ---------------------------------------------------------------------


def test_checker_and_realm_provide_their_interfaces():
    verifyObject(ICredentialsChecker, pbutil.SecretChecker({"client": SECRET}))
    verifyObject(IRealm, pbutil.GatewayRealm({"client": {}}))


def test_generated_secrets_are_long_and_distinct():
    a, b = pbutil.generate_secret(), pbutil.generate_secret()
    assert a != b and len(a) >= 64


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_with_security_error_and_nothing_runs():
    target = Echo()
    server = Server({"echo": target})
    try:
        with pytest.raises(SecurityError, match="refused the PB credentials"):
            await server.connect("echo", secret=pbutil.generate_secret())
        assert target.calls == []
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_user_is_refused_with_security_error():
    server = Server({"echo": Echo()})
    try:
        with pytest.raises(SecurityError):
            await server.connect("echo", username=pbutil.ENGINE_USER)
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_anonymous_login_is_refused_and_nothing_runs():
    from twisted.cred.credentials import Anonymous

    target = Echo()
    server = Server({"echo": target})
    factory = pb.PBClientFactory()
    connector = reactor.connectTCP("127.0.0.1", server.address.port, factory)
    try:
        with pytest.raises(Exception, match="anonymous login is not allowed"):
            await factory.login(Anonymous()).addTimeout(10, reactor)
        assert target.calls == []
    finally:
        connector.disconnect()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_service_is_refused():
    server = Server({"echo": Echo()})
    try:
        with pytest.raises(Exception, match="no service"):
            await server.connect("nope")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_a_connection_error():
    server = Server({})
    port = server.address.port
    await server.stop()
    with pytest.raises(ConnectionError, match="cannot reach"):
        await pbutil.login("127.0.0.1", port, pbutil.CLIENT_USER, SECRET, "echo", timeout=5)


def test_missing_connection_file_says_how_to_start_a_controller(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    with pytest.raises(ConnectionError, match="--adapter pb"):
        pbutil.read_connection_info(cd)


def test_loose_connection_file_is_refused(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_json(pbutil.PB_FILE, {"client_secret": SECRET})
    os.chmod(cd.file(pbutil.PB_FILE), 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        pbutil.read_connection_info(cd)
