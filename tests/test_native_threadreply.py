"""Replies sent from another thread than the reactor's (an engine's executor
thread, as a command ends), and results that reach the reactor thread late."""

from __future__ import annotations

import textwrap
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from kernel import enginenative, executor, nativeproto
from kernel.envelope import package_success
from kernel.error import RemoteError
from kernel.nativeproto import FrameWriter, NativeProtocol, ThreadReply
from kernel.serialized import deserialize, serialize
from kernel.testing.processes import python_output
from tests.harness_native import NativeLoopback
from tests.test_native_fastpath import KEY, FakeSocket, RecordingReactor, frames, outbox_on

#: Bound on every wait for another thread, seconds.
WAIT = 20


def _proto_on(sock):
    """A connected, authenticated protocol writing to ``sock`` (no reactor)."""
    proto = NativeProtocol(KEY, is_client=False)
    proto._outbox, transport = outbox_on(sock)
    proto._writer = FrameWriter(KEY)
    proto.connected_ = True
    proto._auth_done = True
    return proto, transport


REPLY = package_success({"result": serialize(None), "stdout": "", "started": 1.5, "done": True})


def test_a_reply_sent_from_a_thread_is_byte_identical_to_the_reactors():
    by_thread, by_reactor = FakeSocket(), FakeSocket()
    proto, _ = _proto_on(by_thread)
    assert ThreadReply(proto, 7).send(REPLY, RecordingReactor())
    other, _ = _proto_on(by_reactor)
    other._reply(REPLY, 7)
    assert by_thread.sends == by_reactor.sends and len(by_thread.sends) == 1
    ((header, buffers),) = frames(by_thread.sends[0])
    assert nativeproto.decode(header, [bytearray(b) for b in buffers])[:2] == ["r", 7]


def test_once_the_reactor_thread_takes_a_reply_over_no_thread_sends_it():
    sock = FakeSocket()
    proto, _ = _proto_on(sock)
    reply = ThreadReply(proto, 3)
    proto._reply(REPLY, 3, reply)
    assert reply.closed and not reply.send(REPLY, RecordingReactor()) and not reply.sent
    assert len(sock.sends) == 1


def test_once_a_thread_sent_the_reply_the_reactor_thread_sends_nothing_for_the_call():
    sock = FakeSocket()
    proto, _ = _proto_on(sock)
    reply = ThreadReply(proto, 3)
    assert reply.send(REPLY, RecordingReactor()) and reply.sent
    proto._reply(REPLY, 3, reply)
    proto._reply_failure(defer.fail(ValueError("late")).result, 3, "m", reply)
    assert len(sock.sends) == 1
    assert not reply.send(REPLY, RecordingReactor())  # and only once


def test_a_reply_that_is_not_small_plain_data_is_left_to_the_reactor_thread():
    sock = FakeSocket()
    proto, _ = _proto_on(sock)
    big = ThreadReply(proto, 1)
    assert not big.send(b"x" * nativeproto.SMALL_FRAME, RecordingReactor()) and not big.sent
    remote = ThreadReply(proto, 2)
    assert not remote.send(nativeproto.NativeRemote(proto, 5), RecordingReactor())
    assert sock.sends == [] and not remote.sent


def test_a_thread_does_not_overtake_a_frame_the_reactor_thread_holds():
    sock = FakeSocket()
    proto, transport = _proto_on(sock)
    with nativeproto._cork:  # the reactor thread is handling a read
        proto._send(["o", 0, "first", [], {}])
        reply = ThreadReply(proto, 4)
        assert not reply.send(REPLY, RecordingReactor()) and not reply.sent
    proto._reply(REPLY, 4, reply)
    got = frames(b"".join(sock.sends) + transport.drained())
    kinds = [nativeproto.decode(h, [bytearray(b) for b in bs])[0] for h, bs in got]
    assert kinds == ["o", "r"]


# -- over a real connection ----------------------------------------------------------


class Worker:
    """Answers from a thread of its own, then (later) on the reactor thread too."""

    def __init__(self):
        self.seen: list = []

    def remote_work(self, value, thread_reply=None):
        self.seen.append(thread_reply)
        done = defer.Deferred()

        def run():
            if thread_reply is not None:
                thread_reply.send(value)
            reactor.callFromThread(done.callback, value)

        threading.Thread(target=run).start()
        return done

    def remote_fail_after(self, value, thread_reply=None):
        thread_reply.send(value)
        raise ValueError("after the reply")

    def remote_echo(self, value):
        return value


nativeproto.allow_thread_reply(Worker, ("work", "fail_after"))


@pytest.fixture
def worker():
    service = Worker()
    factory = nativeproto.NativeServerFactory(KEY, {"svc": service})
    state = {}

    async def start():
        state["port"] = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = state["port"].getHost().port
        return await nativeproto.connect("127.0.0.1", port, KEY, "svc", timeout=10)

    remote = pytest_twisted.blockon(defer.ensureDeferred(start()))
    yield remote, service
    remote.disconnect()
    pytest_twisted.blockon(defer.maybeDeferred(state["port"].stopListening))


@pytest_twisted.ensureDeferred
async def test_replies_from_threads_and_the_reactor_interleave_and_each_call_gets_its_own(worker):
    remote, service = worker
    calls = []
    for i in range(60):
        calls.append(remote.callRemote("work", [i, "w"]))
        calls.append(remote.callRemote("echo", [i, "e"]))
    results = await defer.gatherResults(calls).addTimeout(WAIT, reactor)
    assert results == [[i, k] for i in range(60) for k in ("w", "e")]
    assert all(isinstance(r, ThreadReply) for r in service.seen)
    assert any(r.sent for r in service.seen)  # (some may have found the connection busy)
    # the connection is intact (sequence numbers in order both ways)
    assert await remote.callRemote("echo", "after") == "after"


@pytest_twisted.ensureDeferred
async def test_a_peer_cannot_pass_its_own_thread_reply_argument(worker):
    remote, service = worker
    assert await remote.callRemote("work", 1, thread_reply=5).addTimeout(WAIT, reactor) == 1
    assert isinstance(service.seen[-1], ThreadReply)


@pytest_twisted.ensureDeferred
async def test_a_failure_after_a_thread_sent_the_reply_sends_no_second_reply(worker):
    remote, _ = worker
    assert await remote.callRemote("fail_after", "ok").addTimeout(WAIT, reactor) == "ok"
    assert await remote.callRemote("echo", 2) == 2


# -- the executor: results that may reach the reactor thread late --------------------


def _wait_for(predicate):
    done = threading.Event()
    for _ in range(WAIT * 100):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not met in time")


def test_a_result_whose_reply_left_fires_only_when_delivered():
    fake = RecordingReactor()
    ex = executor.ThreadExecutor(reactor=fake)
    fired = []
    d = ex.submit(lambda: 41, on_done=lambda v: True)
    d.addCallback(fired.append)
    _wait_for(lambda: ex._waiting)
    assert fake.calls == [] and fired == []  # the reactor thread was not woken
    ex.deliver_waiting()
    assert fired == [41]
    ex.stop()


def test_results_that_waited_fire_before_a_later_one_and_urgent_ones_wake_the_reactor():
    fake = RecordingReactor()
    ex = executor.ThreadExecutor(reactor=fake)
    fired = []
    ex.submit(lambda: 1, on_done=lambda v: True).addCallback(fired.append)
    _wait_for(lambda: ex._waiting)
    ex.submit(lambda: 2, on_done=lambda v: False).addCallback(fired.append)
    _wait_for(lambda: fake.calls)
    fake.run_calls()
    assert fired == [1, 2]
    ex.set_urgent(True)
    ex.submit(lambda: 3, on_done=lambda v: True).addCallback(fired.append)
    _wait_for(lambda: fake.calls)
    assert not ex._waiting
    fake.run_calls()
    assert fired == [1, 2, 3]
    ex.stop()


def test_setting_urgent_fires_the_results_that_waited():
    fake = RecordingReactor()
    ex = executor.ThreadExecutor(reactor=fake)
    fired = []
    ex.submit(lambda: "a", on_done=lambda v: True).addCallback(fired.append)
    _wait_for(lambda: ex._waiting)
    ex.set_urgent(True)
    assert fired == ["a"]
    ex.stop()


def test_a_failing_on_done_hook_leaves_the_result_to_the_reactor_thread():
    fake = RecordingReactor()
    ex = executor.ThreadExecutor(reactor=fake)
    fired = []

    def broken(value):
        raise RuntimeError("hook")

    ex.submit(lambda: 5, on_done=broken).addCallback(fired.append)
    _wait_for(lambda: fake.calls)
    fake.run_calls()
    assert fired == [5]
    ex.stop()


# -- engines ---------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await NativeLoopback.start(n_engines=1, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def _engine(loop):
    (engine_id,) = loop.controller.engines
    return engine_id, loop.controller.engines[engine_id], loop.engines[engine_id]


@pytest_twisted.ensureDeferred
async def test_a_command_answered_from_the_engine_thread_is_over_for_the_next_call(
    loop, monkeypatch
):
    engine_id, queued, service = _engine(loop)
    replies = []
    original = enginenative.NativeEngineReferenceFromService._reply_from_thread

    def spy(self, thread_reply):
        replies.append(thread_reply)
        return original(self, thread_reply)

    monkeypatch.setattr(enginenative.NativeEngineReferenceFromService, "_reply_from_thread", spy)
    result = await queued.execute("x = 1")
    # (sent is set before the reply is written, so before it could arrive)
    assert [r.sent for r in replies] == [True] and result["id"] == engine_id
    # The engine's own queue (asked over the wire) has it ended, not running.
    status = await queued.engine.queue_status()
    assert status == {"queue": [], "pending": None}
    assert service._executor._waiting == []


@pytest_twisted.ensureDeferred
async def test_output_still_reaches_the_controller_before_the_reply(loop):
    engine_id, queued, _ = _engine(loop)
    seen = []

    def observer(eid, name, text):
        seen.append((eid, name, text))

    loop.registrar.add_output_observer(observer)
    try:
        result = await queued.execute("print('first')")
        seen_at_reply = list(seen)
        quiet = await queued.execute("y = 2")  # no output: may answer from the thread
        again = await queued.execute("print('second')")
        seen_at_second = list(seen)
    finally:
        loop.registrar.remove_output_observer(observer)
    assert result["stdout"] == "first\n" and seen_at_reply == [(engine_id, "stdout", "first\n")]
    assert quiet["stdout"] == "" and again["stdout"] == "second\n"
    assert seen_at_second[-1] == (engine_id, "stdout", "second\n")


@pytest_twisted.ensureDeferred
async def test_calls_pipelined_to_one_engine_all_end_in_order(loop):
    _, queued, _ = _engine(loop)
    from kernel.task import MapTask

    _, payload = MapTask(pow, args=(2, 5)).to_spec()
    calls = []
    for i in range(40):
        calls.append(queued.execute(f"n = {i}"))
        calls.append(queued.run_task(payload))
    results = await defer.gatherResults(calls).addTimeout(WAIT, reactor)
    assert [r["input"] for r in results[::2]] == [f"n = {i}" for i in range(40)]
    assert all(deserialize(r["result"]) == 32 for r in results[1::2])
    with pytest.raises(RemoteError):
        await queued.execute("1 / 0")
    assert deserialize(await queued.pull_serialized("n")) == 39


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_engine_killed_mid_call_fails_the_blocking_apply_and_the_rest_goes_on():
    """The blocking client's apply (answered from the engine thread when it
    ends) fails cleanly when its engine dies while running it; the other
    engine and the controller go on."""
    code = textwrap.dedent(
        """
        import os, signal, tempfile, threading, time
        from kernel import client
        from kernel.error import CompositeError
        from kernel.testing.processes import LocalCluster

        cluster = LocalCluster(heartbeat=0.5, max_missed=2, controller_args=["--adapter=native"])
        scratch = tempfile.TemporaryDirectory()
        try:
            pids = cluster.start(2)
            mec = client.get_multiengine_client(
                cluster_dir=str(cluster.cluster_dir.path), adapter="native"
            )
            victim, survivor = sorted(pids)
            print(mec.apply(os.getpid, targets=survivor, block=True) == [pids[survivor]])
            mec.execute("import time", targets=victim, block=True)
            mec.execute("started = True", targets=victim, block=True)
            running = os.path.join(scratch.name, "running")

            def run_then_sleep(path):
                import time

                open(path, "w").close()
                time.sleep(600)

            def kill_once_running():
                # (the call has reached the engine: kill it mid-call)
                deadline = time.monotonic() + 100
                while not os.path.exists(running) and time.monotonic() < deadline:
                    time.sleep(0.02)
                os.kill(pids[victim], signal.SIGKILL)

            threading.Thread(target=kill_once_running, daemon=True).start()
            try:
                mec.apply(run_then_sleep, running, targets=victim, block=True)
                print("no error")
            except CompositeError as e:
                print([x.ename for x in e.elist])
            print(mec.apply(divmod, 7, 2, targets=survivor, block=True))
        finally:
            cluster.stop()
            scratch.cleanup()
        """
    )
    out = await threads.deferToThread(python_output, code, 120)
    assert out.split("\n")[:3] == ["True", "['EngineError']", "[(3, 1)]"]


def test_the_engine_reference_lets_execute_and_run_task_answer_from_a_thread():
    assert nativeproto._thread_reply_methods[enginenative.NativeEngineReferenceFromService] == {
        "execute",
        "run_task",
    }
