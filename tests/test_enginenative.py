"""Engines over the native transport: registration, the controller-side engine,
the cluster key, pipelining, reconnection."""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from kernel import enginenative, nativeproto
from kernel.error import QueueCleared, RemoteError, SecurityError
from kernel.interfaces import (
    IEngineBase,
    IEngineInterrupt,
    IEngineQueued,
    IEngineTaskQueue,
    IEngineTasks,
)
from kernel.serialized import deserialize, serialize
from tests.harness_native import NativeLoopback


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await NativeLoopback.start(n_engines=1, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def _remote(loop: NativeLoopback, engine_id: int):
    queued = loop.controller.engines[engine_id]
    assert isinstance(queued, enginenative.PipelinedEngine)
    return queued, queued.engine


@pytest_twisted.ensureDeferred
async def test_engine_registers_and_the_controller_side_engine_has_the_engine_interfaces(loop):
    (engine_id,) = loop.controller.engines
    _, remote = _remote(loop, engine_id)
    assert isinstance(remote, enginenative.NativeEngineFromReference)
    assert isinstance(remote.reference, nativeproto.NativeRemote)
    verifyObject(IEngineBase, remote)
    verifyObject(IEngineInterrupt, remote)
    verifyObject(IEngineTasks, remote)
    verifyObject(IEngineTaskQueue, remote)
    assert remote.id == engine_id == loop.engines[engine_id].id
    queued, _ = _remote(loop, engine_id)
    verifyObject(IEngineQueued, queued)
    verifyObject(IEngineTaskQueue, queued)


def _gate_code(gate) -> str:
    return f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"


@pytest_twisted.ensureDeferred
async def test_tasks_go_ahead_to_the_engine_and_commands_overtake_them_there(loop, tmp_path):
    from kernel.task import StringTask

    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    gate = tmp_path / "gate"
    _, first = StringTask(_gate_code(gate) + "order = ['task1']").to_spec()
    _, second = StringTask("order.append('task2')").to_spec()
    t1 = queued.run_task(first, key="1")
    t2 = queued.run_task(second, key="2")
    cmd = queued.execute("order.append('execute')")
    assert len(queued._in_flight) == 3  # all on the engine, not here
    status = await queued.queue_status()  # the engine's own view
    assert status["pending"].startswith("run_task(")
    assert [q.split("(")[0] for q in status["queue"]] == ["execute", "run_task"]
    gate.write_text("")
    await t1, await cmd, await t2
    assert deserialize(await queued.pull_serialized("order")) == ["task1", "execute", "task2"]


@pytest_twisted.ensureDeferred
async def test_a_task_sent_ahead_is_withdrawn_on_the_engine_and_never_runs(loop, tmp_path):
    from kernel.task import StringTask

    (engine_id,) = loop.controller.engines
    queued, remote = _remote(loop, engine_id)
    gate = tmp_path / "gate"
    _, first = StringTask(_gate_code(gate) + "first = 1").to_spec()
    _, second = StringTask("second = 1").to_spec()
    t1 = queued.run_task(first, key="1")
    t2 = queued.run_task(second, key="2")
    assert len(queued._in_flight) == 2  # the second is on the engine, not here
    assert await queued.abort_task("2") == "withdrawn"
    with pytest.raises(RemoteError) as info:
        await t2
    assert info.value.ename == "TaskWithdrawn"
    assert await remote.abort_task("2") == "finished"  # nothing left to abort
    gate.write_text("")
    await t1
    keys = await queued.keys()
    assert "first" in keys and "second" not in keys


@pytest_twisted.ensureDeferred
async def test_abort_task_interrupts_the_task_running_on_the_engine(loop, tmp_path):
    from kernel.task import StringTask

    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    started = tmp_path / "started"
    _, body = StringTask(
        f"open({str(started)!r}, 'w').close()\n" + _gate_code(tmp_path / "never")
    ).to_spec()
    task = queued.run_task(body, key="1")
    from kernel.testing.processes import wait_for_async

    await wait_for_async(started.exists, 30, "the task to start")
    assert await queued.abort_task("1", interrupt=False) == "running"  # only taken back if waiting
    assert await queued.abort_task("1") == "interrupted"
    with pytest.raises(RemoteError) as info:
        await task.addTimeout(30, reactor)
    assert info.value.ename == "KeyboardInterrupt"
    assert (await queued.execute("x = 1"))["input"] == "x = 1"  # the engine goes on


@pytest_twisted.ensureDeferred
async def test_execute_runs_on_the_engine_and_its_errors_arrive_as_plain_data(loop):
    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    result = await queued.execute("x = 6 * 7\nprint(x)")
    assert result["stdout"] == "42\n" and result["id"] == engine_id
    with pytest.raises(RemoteError) as info:
        await queued.execute("1 / 0")
    # the controller side never unpickles the engine's exception: plain data only
    assert info.value.ename == "ZeroDivisionError"
    assert "1 / 0" in info.value.traceback


@pytest_twisted.ensureDeferred
async def test_serialized_blobs_cross_unopened_both_ways(loop):
    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    payload = os.urandom(3 * nativeproto.WRITE_SLICE + 1)
    await queued.push_serialized({"blob": serialize(payload)})
    await queued.execute("n = len(blob)")
    assert deserialize(await queued.pull_serialized("n")) == len(payload)
    back = await queued.pull_serialized("blob")
    # (handed on as it arrives: a reader in the controller waits for it)
    back = await nativeproto.arrived(back)
    assert deserialize(back) == payload


@pytest_twisted.ensureDeferred
async def test_a_pulled_value_is_a_snapshot_even_when_the_next_command_changes_it(loop):
    """Pipelined: the next command may run while the reply is written; the
    reply still holds the value as it was when pulled."""
    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    await queued.execute("import numpy as np; a = np.zeros(2_000_000)")
    pulled = queued.pull_serialized("a")
    changed = queued.execute("a[:] = 1")
    back, _ = await pulled, await changed
    assert not deserialize(back).any()


@pytest_twisted.ensureDeferred
async def test_tasks_run_through_the_controller_side_engine(loop):
    from kernel.task import MapTask

    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    _, payload = MapTask(pow, args=(2, 10)).to_spec()
    result = await queued.run_task(payload)
    assert deserialize(result["result"]) == 1024


@pytest_twisted.ensureDeferred
async def test_commands_sent_ahead_are_cleared_on_the_engine_and_the_running_one_is_spared(
    loop, tmp_path
):
    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    gate = tmp_path / "gate"
    running = queued.execute(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\nran = 1"
    )
    ahead = [queued.execute(f"never{i} = 1") for i in range(3)]
    status = await queued.queue_status()
    assert status["pending"] is not None and len(status["queue"]) == 3
    assert len(queued._in_flight) == 4  # all sent ahead to the engine
    await queued.clear_queue()
    for d in ahead:
        with pytest.raises(RemoteError) as info:
            await d
        assert info.value.ename == "QueueCleared"
        assert isinstance(info.value.original(), QueueCleared)
    gate.write_text("")
    await running
    assert "ran" in await queued.keys() and "never0" not in await queued.keys()


@pytest_twisted.ensureDeferred
async def test_a_wrong_cluster_key_is_refused_and_nothing_registers(loop):
    before = set(loop.controller.engines)
    bad = dict(loop.info, key=nativeproto.generate_key())
    fatal = []
    with pytest.raises(SecurityError, match="do not share a cluster key"):
        await loop.add_engine(info=bad, on_fatal=fatal.append)
    assert fatal and fatal[0].check(SecurityError)
    assert set(loop.controller.engines) == before


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_unregisters_the_engine_which_registers_again_with_its_id(loop):
    (engine_id,) = loop.controller.engines
    connector = loop.connectors[engine_id]
    first = loop.controller.engines[engine_id]
    connector.controller.disconnect()
    await loop.wait_unregistered(engine_id)
    assert await connector.when_registered().addTimeout(30, reactor) == engine_id
    assert loop.controller.engines[engine_id] is not first
    assert connector.registrations == 2
    result = await loop.controller.engines[engine_id].execute("y = 1")
    assert result["id"] == engine_id


@pytest_twisted.ensureDeferred
async def test_connection_file_is_private_and_keeps_its_key_and_port_across_restarts(tmp_path):
    from kernel.clusterdir import ClusterDir
    from kernel.controllerservice import ControllerService

    cd = ClusterDir(tmp_path / "c").create()
    registrar = enginenative.NativeEngineRegistrar(ControllerService())
    first = nativeproto.serve_controller(cd, registrar)
    first.startService()
    try:
        info = nativeproto.read_connection_info(cd)
    finally:
        await first.stopService()
    assert stat.S_IMODE(os.stat(cd.file(nativeproto.NATIVE_FILE)).st_mode) == 0o600
    assert len(bytes.fromhex(info["key"])) == 32
    second = nativeproto.serve_controller(cd, registrar)
    second.startService()
    try:
        again = nativeproto.read_connection_info(cd)
    finally:
        await second.stopService()
    assert again == info


def test_a_connection_file_others_can_read_is_refused(tmp_path):
    from kernel.clusterdir import ClusterDir

    cd = ClusterDir(tmp_path / "c").create()
    cd.write_json(nativeproto.NATIVE_FILE, {"host": "127.0.0.1", "port": 1, "key": "00"})
    os.chmod(cd.file(nativeproto.NATIVE_FILE), 0o644)
    with pytest.raises(SecurityError, match="chmod"):
        nativeproto.read_connection_info(cd)


# -- real processes ---------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def processes():
    """A controller process and one engine process, both ``--adapter native``."""
    from kernel.testing.processes import LocalCluster

    cluster = LocalCluster(
        heartbeat=0.5, controller_args=["--adapter=native"], engine_args=["--adapter=native"]
    )
    try:
        await cluster.start_async(1)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_engine_process_with_a_wrong_key_gives_up_and_never_registers(processes, tmp_path):
    from kernel.clusterdir import ClusterDir
    from kernel.testing.processes import Process, subprocess_env, twist_argv, wait_for_async

    real = nativeproto.read_connection_info(processes.cluster_dir)
    bad_dir = ClusterDir(tmp_path / "bad").create()
    bad_dir.write_json(nativeproto.NATIVE_FILE, dict(real, key=nativeproto.generate_key()))
    log_path = bad_dir.log_file("engine")
    argv = twist_argv(
        "txkernel-engine", [f"--cluster-dir={bad_dir.path}", "--adapter=native"], log_path
    )
    proc = Process("bad-engine", argv, log_path, subprocess_env())
    try:
        await wait_for_async(lambda: not proc.alive(), 30, lambda: proc.log())
    finally:
        proc.stop()
    assert proc.returncode == 1
    assert "do not share a cluster key" in proc.log(200)
    assert len(processes.registered()) == 1
    assert "SecurityError" in processes.controller.log(200)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_engines_register_again_with_their_ids_after_a_controller_restart(processes):
    before = processes.registered()
    info = nativeproto.read_connection_info(processes.cluster_dir)
    processes.stop_controller()
    await processes.start_controller_async()
    assert await processes.wait_for_engines_async(1) == before
    assert nativeproto.read_connection_info(processes.cluster_dir) == info


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_paused_engine_is_declared_dead_and_registers_again_when_resumed(processes):
    ((engine_id, pid),) = processes.registered().items()
    proc = processes.pause_engine(engine_id)
    try:
        # heartbeat 0.5 s, 3 missed: dead long before this bound
        await processes.wait_until_unregistered_async(engine_id, timeout=30)
    finally:
        proc.resume()
    # the controller dropped the connection; the resumed engine notices and comes back
    assert await processes.wait_for_engines_async(1) == {engine_id: pid}


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_controller_process_with_tls_serves_engines_and_clients():
    from kernel import multienginenative
    from kernel.testing.processes import LocalCluster

    cluster = LocalCluster(controller_args=["--adapter=native", "--tls"])
    try:
        await cluster.start_async(1)
        assert "certificate" in nativeproto.read_connection_info(cluster.cluster_dir)
        mec = await multienginenative.get_multiengine_client(cluster.cluster_dir.path)
        try:
            assert [r["stdout"] for r in await mec.execute("print(2)")] == ["2\n"]
        finally:
            mec.disconnect()
    finally:
        cluster.stop()


@pytest_twisted.ensureDeferred
async def test_a_large_pulled_value_is_sent_from_its_memory_and_the_next_command_waits():
    """No snapshot copy of a large pull: the reply views the array, and the
    engine starts nothing else until the reply has been written."""
    import numpy as np

    from kernel.engineservice import EngineService

    engine = EngineService()
    try:
        ref = enginenative.NativeEngineReferenceFromService(engine)
        await ref.remote_execute("import numpy as np; a = np.ones(2 * 2**20 // 8)")
        reply = await ref.remote_pull_serialized("a")
        assert isinstance(reply, nativeproto.AfterWritten)
        _, blob = reply.value
        (buf,) = blob.buffers
        assert np.shares_memory(np.asarray(buf), engine._namespace["a"])  # no copy
        changed = ref.remote_execute("a[:] = 0")
        status = await ref.engine.queue_status()
        assert status == {"queue": ["execute('a[:] = 0')"], "pending": None}  # held, not started
        reply.callback()  # the reply has been written
        await changed
        assert not engine._namespace["a"].any()
        small = await ref.remote_pull_serialized("id")  # small values: copied, nothing held
        assert not isinstance(small, nativeproto.AfterWritten)
    finally:
        await engine.kill()


def test_an_engine_started_before_its_controller_looks_for_it_often_then_backs_off():
    from twisted.internet.task import Clock

    from kernel.error import ConnectionError

    clock = Clock()
    attempts = []

    def get_info():
        attempts.append(clock.seconds())
        raise ConnectionError("no native.json yet")

    connector = enginenative.NativeEngineConnector(get_info, object(), clock=clock, max_delay=2.0)
    connector.startService()
    try:
        while clock.seconds() < enginenative.STARTUP_WINDOW + 10:
            clock.advance(enginenative.STARTUP_POLL)
        gaps = [round(b - a, 6) for a, b in zip(attempts, attempts[1:], strict=False)]
        in_window = [
            g for a, g in zip(attempts, gaps, strict=False) if a < enginenative.STARTUP_WINDOW
        ]
        after = [
            g for a, g in zip(attempts, gaps, strict=False) if a >= enginenative.STARTUP_WINDOW
        ]
        assert set(in_window) == {enginenative.STARTUP_POLL}
        # backing off (seen in steps of STARTUP_POLL: a call can fire one step late)
        assert after[0] < after[1] < after[2]
        assert max(after) <= 2.0 + enginenative.STARTUP_POLL + 1e-6
    finally:
        connector.stopService()


def test_an_engine_that_reaches_a_controller_refusing_it_does_not_poll_fast():
    from twisted.internet.task import Clock

    clock = Clock()
    attempts = []

    def get_info():
        attempts.append(clock.seconds())
        raise ValueError("a malformed native.json")  # not "no controller yet"

    connector = enginenative.NativeEngineConnector(get_info, object(), clock=clock, max_delay=2.0)
    connector.startService()
    try:
        for _ in range(40):
            clock.advance(enginenative.STARTUP_POLL)
        assert len(attempts) <= 4  # 0.2, 0.4, 0.8 s apart, not every 0.05 s
    finally:
        connector.stopService()
