"""The task contract over the native transport, and the task adapter's own behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kernel import nativeproto, tasknative
from kernel.error import InvalidTaskID, SecurityError
from kernel.interfaces import IBlockingClientAdaptor, ITaskController
from kernel.serialized import Serialized
from kernel.task import MapTask, StringTask, TaskResult
from tests.contract.task import TaskControllerContract
from tests.harness_native import NativeHarness, NativeLoopback


class Boom(Exception):
    """A user exception raised by a task."""


def boom(x):
    raise Boom(f"bad input {x}")


@pytest_twisted.async_yield_fixture(scope="module")
async def processes():
    """One controller process and four engine processes (``--adapter native``)."""
    harness = await NativeHarness.start(n_engines=4)
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.mark.slow
class TestTaskControllerNative(TaskControllerContract):
    """Every ITaskController contract test over the native transport, engines
    in their own processes."""

    @pytest_twisted.async_yield_fixture
    async def cluster(self, processes):
        await processes.reset()
        yield processes


# -- the adapter itself, in process --------------------------------------------


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await NativeLoopback.start(n_engines=2, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def test_client_half_provides_the_task_interfaces():
    client = tasknative.NativeTaskClient(remote_reference=None)
    verifyObject(ITaskController, client)
    verifyObject(IBlockingClientAdaptor, client)


def test_task_results_cross_by_value_with_their_blob_unopened():
    tr = TaskResult(3, "succeeded", Serialized(b"not a pickle"), engine_id=1, stdout="out")
    header, buffers = nativeproto.encode(tr)
    # the receiving side rebuilds it without opening the blob (it is no pickle)
    back = nativeproto.decode(header, [bytearray(b) for b in buffers])
    assert isinstance(back, TaskResult)
    assert (back.taskid, back.status, back.engine_id, back.stdout) == (3, "succeeded", 1, "out")
    assert back.serialized_result == tr.serialized_result
    assert b"not a pickle" not in header  # the blob travels as a buffer


@pytest_twisted.ensureDeferred
async def test_map_and_string_tasks_run_and_their_results_come_back(loop):
    tc = await loop.task_client()
    tid = await tc.run(MapTask(pow, args=(3, 4)))
    tr = await tc.get_task_result(tid, block=True)
    assert isinstance(tr, TaskResult) and tr.status == "succeeded"
    assert tr.results == 81
    tid = await tc.run(StringTask("b = a * 2", push={"a": 21}, pull="b"))
    assert (await tc.get_task_result(tid, block=True)).ns.b == 42


@pytest_twisted.ensureDeferred
async def test_large_task_payloads_and_results_cross_as_buffers(loop):
    tc = await loop.task_client()
    array = np.arange(1_000_000, dtype=np.float64)  # 8 MB each way

    def double(a):
        return a * 2

    tid = await tc.run(MapTask(double, args=(array,)))
    tr = await tc.get_task_result(tid, block=True)
    np.testing.assert_array_equal(tr.results, array * 2)
    assert tr.results.flags.writeable


@pytest_twisted.ensureDeferred
async def test_many_tasks_in_flight_all_complete(loop):
    tc = await loop.task_client()
    tids = [await tc.run(MapTask(abs, args=(-i,))) for i in range(200)]
    await tc.barrier(tids)
    results = [(await tc.get_task_result(t)).results for t in tids]
    assert results == list(range(200))


@pytest_twisted.ensureDeferred
async def test_a_failed_task_raises_its_original_exception_on_the_client(loop):
    tc = await loop.task_client()
    tid = await tc.run(MapTask(boom, args=(7,)))
    tr = await tc.get_task_result(tid, block=True)
    assert tr.status == "failed"
    with pytest.raises(Boom, match="bad input 7"):
        tr.raise_exception()


@pytest_twisted.ensureDeferred
async def test_controller_errors_arrive_with_their_own_type(loop):
    tc = await loop.task_client()
    with pytest.raises(InvalidTaskID):
        await tc.get_task_result(10_000)


@pytest_twisted.ensureDeferred
async def test_load_balanced_map_runs_over_the_native_transport(loop):
    tc = await loop.task_client()
    assert await tc.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_refused_and_no_task_runs(loop):
    bad = dict(loop.info, key=nativeproto.generate_key())
    with pytest.raises(SecurityError, match="do not share a cluster key"):
        await tasknative.get_task_client(info=bad)
    tc = await loop.task_client()
    status = await tc.queue_status()
    assert sum(status.values()) == 0


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_engine_killed_with_a_short_task_pipeline_in_flight_reruns_each_task_once(
    processes, tmp_path
):
    """After short tasks every engine is sent several tasks at once (they
    wait on its engine thread); when one dies, each of its tasks, running
    or waiting, runs again elsewhere exactly once."""
    from twisted.internet import reactor

    from tests.contract.task import (
        WAIT,
        gate_code,
        kill_then_check_each_task_ran_once_elsewhere,
        read_lines,
        until,
    )

    cluster = processes
    await cluster.reset()
    tc, me = cluster.task_controller, cluster.multiengine
    warm = [await tc.run(StringTask("pass")) for _ in range(20 * cluster.n_engines)]
    await tc.barrier(warm).addTimeout(WAIT, reactor)
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")
    n = cluster.n_engines
    taskids = []
    for i in range(5 * n):
        code = f"open({log!r}, 'a').write(f'{i} {{id}}\\n')\n" + gate_code(gate)
        taskids.append(await tc.run(StringTask(code, retries=1)))

    async def started():
        return len(read_lines(log)) == n

    await until(started, "a task to start on every engine")
    victim = int(read_lines(log)[0].split()[1])

    async def several_waiting_on_victim():
        statuses = dict(await me.queue_status())
        waiting = [q for q in statuses[victim]["queue"] if str(q).startswith("run_task(")]
        return len(waiting) >= 2  # deeper than the pipeline of 2 for long tasks

    await until(several_waiting_on_victim, "several tasks waiting on one engine")
    await kill_then_check_each_task_ran_once_elsewhere(cluster, taskids, victim, gate, log)
