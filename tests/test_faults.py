"""Fault injection with real controller and engine processes.

SIGKILL and SIGSTOP engines, stop and restart the controller, and check that
nothing hangs: stranded work fails with EngineError, dead engines are
unregistered within the heartbeat window, and engines come back by themselves.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from kernel import asyncclient, clusterdir
from kernel.error import CompositeError
from kernel.testing.processes import LocalCluster

pytestmark = pytest.mark.slow

HEARTBEAT = 0.5
MAX_MISSED = 2
#: Generous bound for "promptly": well under any test timeout, far above
#: what a healthy loopback needs.
PROMPT = 15


async def sleep(seconds):
    await task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.async_yield_fixture(params=["fc", "pb", "native"])
async def cluster(request):
    """A controller and two engine processes, over each adapter."""
    c = LocalCluster(
        heartbeat=HEARTBEAT, max_missed=MAX_MISSED, controller_args=[f"--adapter={request.param}"]
    )
    c.adapter = request.param
    try:
        await c.start_async(2)
        yield c
    finally:
        c.stop()


@pytest_twisted.async_yield_fixture
async def client(cluster):
    """A multiengine client of the cluster (blocking calls, Deferred results)."""
    yield await asyncclient.get_multiengine_client(
        cluster_dir=cluster.cluster_dir.path, adapter=cluster.adapter, timeout=PROMPT
    )


def assert_engine_error(err, engine_id):
    assert isinstance(err, CompositeError)
    assert [(e.ename, e.engine_id) for e in err.elist] == [("EngineError", engine_id)]


@pytest_twisted.ensureDeferred
async def test_sigkill_during_blocking_execute_fails_promptly_with_engine_error(cluster, client):
    victim, survivor = sorted(cluster.registered())
    d = client.execute("import time; time.sleep(600)", targets=victim)
    queued = client.execute("x = 1", targets=victim)
    await sleep(0.5)  # let the command start on the engine
    cluster.kill_engine(victim)
    for call in (d, queued):
        with pytest.raises(CompositeError) as info:
            await call.addTimeout(PROMPT, reactor)
        assert_engine_error(info.value, victim)
    await cluster.wait_until_unregistered_async(victim)
    assert await client.get_ids() == [survivor]
    # the other engine is unaffected
    (result,) = await client.execute("y = 2", targets=survivor)
    assert result["id"] == survivor


@pytest_twisted.ensureDeferred
async def test_sigstopped_engine_declared_dead_within_heartbeat_window(cluster, client):
    victim, _ = sorted(cluster.registered())
    proc = cluster.pause_engine(victim)
    try:
        d = client.execute("x = 1", targets=victim)
        # dead after period * max_missed of silence, noticed at the next beat
        window = HEARTBEAT * (MAX_MISSED + 1)
        await cluster.wait_until_unregistered_async(victim, timeout=window + PROMPT)
        with pytest.raises(CompositeError) as info:
            await d.addTimeout(PROMPT, reactor)
        assert_engine_error(info.value, victim)
    finally:
        proc.resume()
    # woken up, the engine finds its connection dropped and registers again
    reg = await cluster.wait_for_engines_async(2)
    assert proc.pid in reg.values()


@pytest_twisted.ensureDeferred
async def test_restarted_controller_gets_its_engines_back_with_their_ids(cluster):
    before = cluster.registered()
    connection_file = {
        "fc": clusterdir.ENGINE_FURL,
        "pb": clusterdir.PB_FILE,
        "native": "native.json",
    }[cluster.adapter]
    connection = cluster.cluster_dir.read_file(connection_file)
    cluster.stop_controller()
    await cluster.start_controller_async()
    after = await cluster.wait_for_engines_async(2)
    assert after == before
    # the same address and capability: engines found it again by themselves
    assert cluster.cluster_dir.read_file(connection_file) == connection


@pytest_twisted.ensureDeferred
async def test_killed_engine_leaves_the_others_and_new_engine_takes_lowest_free_id(cluster):
    victim, survivor = sorted(cluster.registered())
    cluster.kill_engine(victim)
    await cluster.wait_until_unregistered_async(victim)
    cluster.start_engine()
    reg = await cluster.wait_for_engines_async(2)
    assert sorted(reg) == sorted([victim, survivor])


@pytest_twisted.ensureDeferred
async def test_kill_through_the_multiengine_stops_the_engine_process(cluster, client):
    victim, survivor = sorted(cluster.registered())
    proc = cluster.engine_process(victim)
    await client.kill(targets=victim)
    await cluster.wait_until_unregistered_async(victim)
    await wait_for_exit(proc)
    assert proc.returncode == 0
    assert sorted(cluster.registered()) == [survivor]


@pytest_twisted.ensureDeferred
async def test_kill_with_controller_stops_every_process(cluster, client):
    procs = [cluster.controller, *cluster.engines]
    await client.kill(controller=True)
    for proc in procs:
        await wait_for_exit(proc)
    assert [p.returncode for p in procs] == [0] * len(procs)
    assert cluster.cluster_dir.pids() == {}


async def wait_for_exit(proc):
    from kernel.testing.processes import wait_for_async

    await wait_for_async(lambda: not proc.alive(), PROMPT, lambda: f"{proc} still runs")


@pytest_twisted.async_yield_fixture
async def task_client(cluster):
    """A task client of the cluster."""
    yield await asyncclient.get_task_client(
        cluster_dir=cluster.cluster_dir.path, adapter=cluster.adapter, timeout=PROMPT
    )


def hang_first_time(marker):
    """Source of a task that records its engine's pid, then hangs on its
    first attempt and returns the pid on any later one."""
    return (
        "import os, time\n"
        f"first = not os.path.exists({str(marker)!r})\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "if first:\n"
        "    time.sleep(600)\n"
        "pid = os.getpid()\n"
    )


async def sigkill_first_runner(cluster, marker):
    from kernel.testing.processes import wait_for_async

    def recorded():  # the file exists a moment before its first line is written
        return marker.exists() and marker.read_text().endswith("\n")

    await wait_for_async(recorded, PROMPT, "the task never started")
    pid = int(marker.read_text().split()[0])
    (proc,) = [p for p in cluster.engines if p.pid == pid]
    proc.kill()
    return pid


@pytest_twisted.ensureDeferred
async def test_sigkill_during_task_with_retries_completes_on_another_engine(
    cluster, task_client, tmp_path
):
    from kernel.task import StringTask

    marker = tmp_path / "attempts"
    taskid = await task_client.run(StringTask(hang_first_time(marker), pull="pid", retries=1))
    victim_pid = await sigkill_first_runner(cluster, marker)
    tr = await task_client.get_task_result(taskid, block=True).addTimeout(PROMPT, reactor)
    assert tr.status == "succeeded", tr.error
    assert tr.results["pid"] != victim_pid
    assert tr.results["pid"] in cluster.registered().values()


@pytest_twisted.ensureDeferred
async def test_sigkill_during_task_without_retries_fails_with_engine_error(
    cluster, task_client, tmp_path
):
    from kernel.task import StringTask

    marker = tmp_path / "attempts"
    taskid = await task_client.run(StringTask(hang_first_time(marker), pull="pid"))
    await sigkill_first_runner(cluster, marker)
    tr = await task_client.get_task_result(taskid, block=True).addTimeout(PROMPT, reactor)
    assert tr.status == "failed"
    assert tr.error.ename == "EngineError"
