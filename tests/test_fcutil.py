"""Foolscap packaging: Serialized blobs on the wire, outcome envelopes, limits."""

import pytest
import pytest_twisted
from foolscap.api import Referenceable, RemoteInterface
from zope.interface import implementer

from kernel import fcutil, serialized
from kernel.error import (
    CompositeError,
    ConnectionError,
    InvalidEngineID,
    ProtocolError,
    RemoteError,
    engine_failure_info,
)
from kernel.serialized import Serialized
from tests.fcloopback import Loopback


class RIEcho(RemoteInterface):
    __remote_name__ = "RIEcho.tests.test_fcutil.txkernel"

    def echo(namespace=fcutil.SerializedNamespace, extra=fcutil.Anything):
        return fcutil.Anything

    def fail(kind=str):
        return fcutil.Anything


class CustomError(Exception):
    """A user-defined exception type, importable here."""


@implementer(RIEcho)
class Echo(Referenceable):
    def __init__(self):
        self.received = None

    def remote_echo(self, namespace, extra):
        self.received = namespace
        return fcutil.package_success([namespace, extra])

    def remote_fail(self, kind):
        try:
            if kind == "custom":
                raise CustomError("custom message")
            if kind == "kernel":
                raise InvalidEngineID("no engine 99")
            if kind == "composite":
                raise CompositeError(
                    "one or more exceptions from call to method: execute",
                    [engine_failure_info(ZeroDivisionError("division by zero"))],
                )
        except Exception as e:
            return fcutil.package_failure(e)
        return fcutil.package_success(None)


@pytest_twisted.async_yield_fixture
async def echo():
    loop = Loopback()
    obj = Echo()
    ref = await loop.reference(obj)
    yield obj, ref
    await loop.stop()


@pytest_twisted.ensureDeferred
async def test_serialized_crosses_the_wire_unopened(echo):
    """The server receives Serialized blobs (not objects); the client gets them back intact."""
    import numpy as np

    obj, ref = echo
    ns = serialized.serialize_namespace({"a": np.arange(50_000), "b": {"x": [1, 2]}})
    reply = fcutil.unpackage(await ref.callRemote("echo", ns, [ns["b"], (1, ns["a"])]))
    assert all(isinstance(v, Serialized) for v in obj.received.values())
    assert obj.received["a"].buffers, "the array should travel out of band"
    back_ns, extra = reply
    assert back_ns == ns
    assert serialized.deserialize(extra[0]) == {"x": [1, 2]}
    assert (serialized.deserialize(extra[1][1]) == np.arange(50_000)).all()


@pytest_twisted.ensureDeferred
async def test_too_many_frames_are_refused(echo):
    """A blob with more than MAX_FRAMES frames violates the copyable's schema."""
    _, ref = echo
    blob = Serialized(b"x", [b"y"] * fcutil.MAX_FRAMES)
    with pytest.raises(ProtocolError, match="refused"):
        await fcutil.call_remote(ref, "echo", {"a": blob}, None)


@pytest_twisted.ensureDeferred
async def test_locally_refused_argument_raises_protocol_error(echo):
    """An argument the schema refuses before sending is a ProtocolError too."""
    _, ref = echo
    with pytest.raises(ProtocolError, match="not sent"):
        await fcutil.call_remote(ref, "echo", {"a": "not a blob", 1: 2}, None)


@pytest_twisted.ensureDeferred
async def test_lost_connection_raises_connection_error():
    loop = Loopback()
    ref = await loop.reference(Echo())
    await loop.server.stopService()
    try:
        with pytest.raises(ConnectionError, match="lost the connection"):
            await fcutil.call_remote(ref, "fail", "custom")
    finally:
        await loop.client.stopService()


@pytest_twisted.ensureDeferred
async def test_user_exception_is_reraised_with_its_type_and_remote_traceback(echo):
    _, ref = echo
    with pytest.raises(CustomError, match="custom message") as info:
        fcutil.unpackage(await ref.callRemote("fail", "custom"))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes
    assert "remote_fail" in notes  # the frame where it was raised on the far side


@pytest_twisted.ensureDeferred
async def test_kernel_error_is_reraised_with_its_type(echo):
    _, ref = echo
    with pytest.raises(InvalidEngineID, match="no engine 99"):
        fcutil.unpackage(await ref.callRemote("fail", "kernel"))


@pytest_twisted.ensureDeferred
async def test_composite_error_keeps_each_engines_error(echo):
    _, ref = echo
    with pytest.raises(CompositeError) as info:
        fcutil.unpackage(await ref.callRemote("fail", "composite"))
    (e,) = info.value.elist
    assert isinstance(e, RemoteError)
    assert e.ename == "ZeroDivisionError"
    with pytest.raises(ZeroDivisionError):
        info.value.raise_exception()


def test_success_envelope_round_trips_none():
    assert fcutil.unpackage(fcutil.package_success(None)) is None


def test_failure_whose_type_cannot_be_rebuilt_stays_a_remote_error():
    env = ("error", {"kind": "remote", **RemoteError("Gone", "no such class here").to_dict()})
    with pytest.raises(RemoteError, match="Gone: no such class here"):
        fcutil.unpackage(env)


@pytest.mark.parametrize("reply", [None, ("maybe", 1), ["ok", 1], ("error", "not a dict")])
def test_malformed_replies_raise_protocol_error(reply):
    with pytest.raises(ProtocolError):
        fcutil.unpackage(reply)
