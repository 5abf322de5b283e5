"""The task contract over PB, and the task adapter's own behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kernel import pbutil, taskpb
from kernel.error import InvalidTaskID, SecurityError
from kernel.interfaces import IBlockingClientAdaptor, ITaskController
from kernel.serialized import Serialized
from kernel.task import MapTask, StringTask, TaskResult
from tests.contract.task import TaskControllerContract
from tests.harness import OnModuleProcesses, module_processes
from tests.harness_pb import PBHarness, PBLoopback

WAIT = 30


class Boom(Exception):
    """A user exception raised by a task."""


def boom(x):
    raise Boom(f"bad input {x}")


#: One controller process and four engine processes (``--adapter pb``).
processes = module_processes(PBHarness)


@pytest.mark.slow
class TestTaskControllerPB(OnModuleProcesses, TaskControllerContract):
    """Every ITaskController contract test over PB, engines in their own processes."""


# -- the adapter itself, in process --------------------------------------------


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await PBLoopback.start(n_engines=2, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def test_client_half_provides_the_task_interfaces():
    client = taskpb.PBTaskClient(remote_reference=None)
    verifyObject(ITaskController, client)
    verifyObject(IBlockingClientAdaptor, client)


def test_task_results_cross_pb_by_value_with_their_blob_unopened():
    tr = TaskResult(3, "succeeded", Serialized(b"not a pickle"), engine_id=1, stdout="out")
    wire = pbutil.to_wire(tr)
    assert isinstance(wire, pbutil.WireCopy) and wire.name == taskpb.TASK_RESULT_TYPE
    # the receiving side rebuilds it without opening the blob (it is no pickle)
    back = pbutil._convert_in(wire, {})
    assert isinstance(back, TaskResult)
    assert (back.taskid, back.status, back.engine_id, back.stdout) == (3, "succeeded", 1, "out")
    assert back.serialized_result == tr.serialized_result


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
async def test_large_task_payloads_and_results_are_chunked(loop):
    tc = await loop.task_client()
    array = np.arange(1_000_000, dtype=np.float64)  # 8 MB each way

    def double(a):
        return a * 2

    tid = await tc.run(MapTask(double, args=(array,)))
    tr = await tc.get_task_result(tid, block=True)
    np.testing.assert_array_equal(tr.results, array * 2)
    assert tr.results.flags.writeable


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
async def test_load_balanced_map_runs_over_pb(loop):
    tc = await loop.task_client()
    assert await tc.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]


@pytest_twisted.ensureDeferred
async def test_wrong_client_secret_is_refused_and_no_task_runs(loop):
    bad = dict(loop.info, client_secret=pbutil.generate_secret())
    with pytest.raises(SecurityError, match="refused the PB credentials"):
        await taskpb.get_task_client(info=bad)
    tc = await loop.task_client()
    status = await tc.queue_status()
    assert sum(status.values()) == 0
