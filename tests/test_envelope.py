"""Reply envelopes shared by every transport (kernel.envelope)."""

import pytest

from kernel import envelope
from kernel.error import CompositeError, EngineError, ProtocolError, RemoteError


def _malformed(reply):
    return EngineError(f"bad reply {reply!r}")


def test_open_plain_returns_the_value_of_a_success():
    assert envelope.open_plain(envelope.package_success([1, 2]), _malformed) == [1, 2]


def test_open_plain_raises_a_remote_error_not_the_original_exception():
    env = envelope.package_engine_failure(ZeroDivisionError("division by zero"))
    with pytest.raises(RemoteError) as info:
        envelope.open_plain(env, _malformed)
    assert not isinstance(info.value, ZeroDivisionError)
    assert info.value.ename == "ZeroDivisionError"


def test_unpackage_rebuilds_the_original_exception():
    env = envelope.package_engine_failure(ZeroDivisionError("division by zero"))
    with pytest.raises(ZeroDivisionError):
        envelope.unpackage(env)


def test_a_composite_error_stays_composite_when_opened_plainly():
    one = envelope.package_engine_failure(KeyError("a"))[1]
    env = ("error", {"kind": "composite", "message": "2 engines failed", "elist": [one, one]})
    with pytest.raises(CompositeError) as info:
        envelope.open_plain(env, _malformed)
    assert [e.ename for e in info.value.elist] == ["KeyError", "KeyError"]


def test_an_engine_failure_is_always_one_remote_error():
    composite = CompositeError("inner", [RemoteError("KeyError", "'a'")])
    tag, body = envelope.package_engine_failure(composite)
    assert (tag, body["kind"], body["ename"]) == ("error", "remote", "CompositeError")


@pytest.mark.parametrize("reply", [None, ("maybe", 1), ["ok", 1], ("error", "not a dict")])
def test_open_plain_raises_what_the_caller_builds_for_a_malformed_reply(reply):
    with pytest.raises(EngineError, match="bad reply"):
        envelope.open_plain(reply, _malformed)


def test_unpackage_of_a_malformed_reply_names_a_version_mismatch():
    with pytest.raises(ProtocolError, match="same txkernel version"):
        envelope.unpackage(("maybe", 1))
