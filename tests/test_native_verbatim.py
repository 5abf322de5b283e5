"""A controller passing engines' replies on to clients unread (Verbatim)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from kernel import multiengineremote, nativeproto
from kernel.envelope import package_engine_failure, package_success
from kernel.error import CompositeError
from kernel.nativeproto import PASSING_ON, Verbatim, decode, encode
from kernel.serialized import deserialize, serialize
from kernel.task import MapTask
from tests.harness_native import NativeLoopback
from tests.test_native_fastpath import KEY

WAIT = 20

VALUES = [
    {"id": 3, "number": 0, "input": "x = 1", "stdout": "", "stderr": ""},
    {"result": serialize(None), "stdout": "", "stderr": "", "started": 1.25, "completed": 2.5},
    {"result": serialize(b"\0" * 70_000), "started": 1.0, "t": (1, [b"ab", bytearray(b"c")])},
    {"text": "é" * (nativeproto.LONG_TEXT + 1), "keys": {1: "non-str key", "\0x": 2}},
    [None, True, -1, 1e300, "\0v not the mark", {"\0s": "looks tagged"}],
]


def _received(value):
    """``value`` as an engine's reply carries it: ``(text, buffers)`` of its envelope's value."""
    header, buffers = encode(["r", 9, package_success(value)])
    m = nativeproto._REPLY_HEAD.match(header)
    start = m.end() + len(nativeproto._OK_HEAD)
    return header[start : -len(nativeproto._OK_TAIL)], [bytearray(b) for b in buffers]


def _same_frame(a, b):
    (ha, ba), (hb, bb) = a, b
    assert ha == hb
    assert [bytes(x) for x in ba] == [bytes(x) for x in bb]


@pytest.mark.parametrize("value", VALUES)
def test_a_value_passed_on_unread_is_sent_as_the_same_bytes_as_the_decoded_value(value):
    text, buffers = _received(value)
    decoded = decode(text, buffers)
    relayed = encode(["r", 4, package_success([Verbatim(text, buffers)])])
    _same_frame(relayed, encode(["r", 4, package_success([decoded])]))
    assert relayed[0].count(text) == 1  # (its text went in as it came)


@pytest.mark.parametrize("value", VALUES)
def test_a_value_after_other_buffers_is_decoded_and_renumbered(value):
    text, buffers = _received(value)
    decoded = decode(text, buffers)
    first, second = Verbatim(*_received(VALUES[2])), Verbatim(text, buffers)
    both = encode(["r", 4, package_success([first, second])])
    _same_frame(both, encode(["r", 4, package_success([first.value(), decoded])]))


def test_a_message_holding_the_mark_elsewhere_is_encoded_by_decoding():
    text, buffers = _received(VALUES[1])
    message = ["r", 4, package_success([Verbatim(text, buffers), nativeproto._VERBATIM_MARK])]
    header, out = encode(message)
    value = decode(header, [bytearray(b) for b in out])
    assert value[2][1][1] == nativeproto._VERBATIM_MARK
    assert deserialize(value[2][1][0]["result"]) is None


# -- over a connection -----------------------------------------------------------------


class Engineish:
    def remote_ok(self, value):
        return package_success(value)

    def remote_fail(self):
        return package_engine_failure(ZeroDivisionError("no"))


@pytest.fixture
def connection():
    factory = nativeproto.NativeServerFactory(KEY, {"svc": Engineish()})
    state = {}

    async def start():
        state["port"] = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = state["port"].getHost().port
        return await nativeproto.connect("127.0.0.1", port, KEY, "svc", timeout=10)

    remote = pytest_twisted.blockon(defer.ensureDeferred(start()))
    yield remote
    remote.disconnect()
    pytest_twisted.blockon(defer.maybeDeferred(state["port"].stopListening))


@pytest_twisted.ensureDeferred
async def test_a_successful_reply_to_a_verbatim_call_comes_unread(connection):
    value = {"result": serialize([1, 2]), "stdout": ""}
    tag, got = await connection.callRemoteVerbatim("ok", value).addTimeout(WAIT, reactor)
    assert tag == "ok" and type(got) is Verbatim
    assert deserialize(got.value()["result"]) == [1, 2]
    assert not connection.proto._verbatim_calls
    # an ordinary call still decodes
    assert await connection.callRemote("ok", 5) == ("ok", 5)


@pytest_twisted.ensureDeferred
async def test_a_failure_reply_to_a_verbatim_call_is_decoded(connection):
    tag, failure = await connection.callRemoteVerbatim("fail").addTimeout(WAIT, reactor)
    assert tag == "error" and failure["ename"] == "ZeroDivisionError"
    assert not connection.proto._verbatim_calls


# -- the controller -------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await NativeLoopback.start(n_engines=2, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_client_calls_pass_engine_replies_on_unread_and_get_the_same_results(
    loop, monkeypatch
):
    relayed = []
    original = nativeproto.NativeProtocol._verbatim_reply

    def spy(self, header, buffers):
        ok = original(self, header, buffers)
        relayed.append(ok)
        return ok

    monkeypatch.setattr(nativeproto.NativeProtocol, "_verbatim_reply", spy)
    mec = await loop.multiengine()
    (e0, e1) = sorted(loop.controller.engines)
    (result,) = await mec.execute("x = 6 * 7", targets=e0)
    assert result["id"] == e0 and result["input"] == "x = 6 * 7" and result["stdout"] == ""
    assert await mec.apply(divmod, 7, 2, targets=e0) == [(3, 1)]
    assert await mec.apply(pow, 2, 3, targets=[e0, e1]) == [8, 8]
    assert relayed.count(True) >= 4
    pending = await mec.execute("y = 1", targets=e1, block=False)
    (later,) = await mec.get_pending_deferred(pending, block=True)
    assert later["input"] == "y = 1"
    with pytest.raises(CompositeError) as info:
        await mec.apply(divmod, 1, 0, targets=e0)
    assert [e.ename for e in info.value.elist] == ["ZeroDivisionError"]


@pytest_twisted.ensureDeferred
async def test_the_controllers_own_callers_and_tasks_get_decoded_results(loop):
    (e0, _) = sorted(loop.controller.engines)
    queued = loop.controller.engines[e0]
    assert not PASSING_ON.get()
    result = await queued.execute("z = 1")
    assert type(result) is dict and result["input"] == "z = 1"
    _, payload = MapTask(pow, args=(2, 4)).to_spec()
    assert deserialize((await queued.run_task(payload))["result"]) == 16
    # a task (it has a key) is decoded even while a client call is being handled
    token = PASSING_ON.set(True)
    try:
        d = queued.run_task(payload, key="task-1")
    finally:
        PASSING_ON.reset(token)
    assert deserialize((await d.addTimeout(WAIT, reactor))["result"]) == 16


def test_the_native_multiengine_front_end_passes_execute_and_apply_on_unread():
    methods = nativeproto._verbatim_methods[multiengineremote.SynchronousMultiEngineFromMultiEngine]
    assert methods == {"execute", "apply_serialized"}


# -- the shared decoder ----------------------------------------------------------------


class _Nested:
    def __init__(self, inner):
        self.inner = inner


def test_decoding_inside_a_decode_leaves_the_outer_message_intact():
    """One JSON decoder serves every message: a value rebuilt while a message
    is decoded may decode a message of its own."""
    inner_header, inner_buffers = encode({"b": b"inner"})
    nativeproto.register_copyable(
        _Nested,
        "test.nested",
        lambda o: o.inner,
        lambda state: _Nested(decode(inner_header, [bytearray(b) for b in inner_buffers])),
    )
    header, buffers = encode([b"outer", _Nested(None), {"x": b"after"}])
    out = decode(header, [bytearray(b) for b in buffers])
    assert out[0] == b"outer" and out[2] == {"x": b"after"}
    assert out[1].inner == {"b": b"inner"}


def test_threads_decode_at_once_each_with_its_own_buffers():
    import threading

    results, errors = {}, []

    def work(i):
        try:
            for j in range(300):
                header, buffers = encode([i, j, bytes([i]) * (j % 7 + 1)])
                got = decode(header, [bytearray(b) for b in buffers])
                assert got == [i, j, bytes([i]) * (j % 7 + 1)]
            results[i] = True
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors and len(results) == 4


def test_several_values_without_buffers_are_each_passed_on_unread(monkeypatch):
    replies = [{"id": i, "input": "x = 1", "stdout": "", "stderr": ""} for i in range(12)]
    relayed = [Verbatim(*_received(r)) for r in replies]
    expected = encode(["r", 4, package_success(replies)])
    monkeypatch.setattr(Verbatim, "value", lambda self: pytest.fail("decoded"))
    header, buffers = encode(["r", 4, package_success(relayed)])
    _same_frame((header, buffers), expected)
    assert all(header.count(v.text) == 1 for v in relayed) and not buffers
