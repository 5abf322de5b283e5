"""The task interface over Foolscap: FCTaskClient and FCTaskControllerFromTaskController."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from kernel import fcutil
from kernel.error import InvalidTaskID, TaskAlreadyCompleted
from kernel.interfaces import IBlockingClientAdaptor, IMapper, ITaskController
from kernel.serialized import Serialized
from kernel.task import MapTask, StringTask, TaskResult
from kernel.taskfc import (
    FCTaskClient,
    FCTaskControllerFromTaskController,
    IFCTaskController,
)
from tests.contract.task import TaskControllerContract
from tests.harness import OnModuleProcesses, module_processes
from tests.harness_fc import FoolscapHarness, FoolscapLoopbackHarness

WAIT = 30


class Boom(Exception):
    """A user exception raised by a task."""


def boom(x):
    raise Boom(f"bad input {x}")


#: One controller process and four engine processes for this module.
processes = module_processes(FoolscapHarness)


@pytest.mark.slow
class TestTaskControllerFoolscap(OnModuleProcesses, TaskControllerContract):
    """Every ITaskController contract test over Foolscap, engines in their own processes."""


# -- the adapter itself (controller and engines in process) ------------------------


@pytest_twisted.async_yield_fixture
async def fc_cluster():
    harness = await FoolscapLoopbackHarness.start(n_engines=2)
    try:
        yield harness
    finally:
        await harness.stop()


def test_client_half_provides_itask_controller_and_blocking_adaptor():
    client = FCTaskClient(remote_reference=None)
    verifyObject(ITaskController, client)
    verifyObject(IBlockingClientAdaptor, client)
    verifyObject(IMapper, client.mapper())


def test_adapts_to_the_blocking_task_client():
    from kernel.taskclient import BlockingTaskClient

    client = FCTaskClient(remote_reference=None)
    blocking = client.adapt_to_blocking_client()
    assert isinstance(blocking, BlockingTaskClient)
    assert blocking.task_controller is client


def test_server_half_provides_its_remote_interface():
    """(verifyObject does not apply: Foolscap serves RI methods as remote_*.)"""
    server = FCTaskControllerFromTaskController(taskController=None)
    assert IFCTaskController.providedBy(server)
    for name in IFCTaskController.names():
        assert callable(getattr(server, f"remote_{name}")), name


def test_server_packages_successes_and_failures_as_plain_envelopes():
    server = FCTaskControllerFromTaskController(taskController=None)
    client = FCTaskClient(remote_reference=None)
    assert client.unpackage(server.packageSuccess(7)) == 7
    with pytest.raises(InvalidTaskID, match="no task 9"):
        client.unpackage(server.packageFailure(InvalidTaskID("no task 9")))


@pytest_twisted.ensureDeferred
async def test_get_client_name_names_the_client_class(fc_cluster):
    name = await fc_cluster.task_controller.remote_reference.callRemote("get_client_name")
    module, _, cls = name.rpartition(".")
    assert getattr(importlib.import_module(module), cls) is FCTaskClient


@pytest_twisted.ensureDeferred
async def test_map_task_result_comes_back_as_a_task_result(fc_cluster):
    tc = fc_cluster.task_controller
    taskid = await tc.run(MapTask(lambda x, y: x * y, args=(6, 7)))
    assert isinstance(taskid, int)
    tr = await tc.get_task_result(taskid, block=True)
    assert isinstance(tr, TaskResult)
    assert (tr.taskid, tr.status, tr.results) == (taskid, "succeeded", 42)
    assert tr.engine_id in await fc_cluster.multiengine.get_ids()
    assert tr.duration is not None and tr.duration >= 0


@pytest_twisted.ensureDeferred
async def test_string_task_pushes_runs_and_pulls(fc_cluster):
    tc = fc_cluster.task_controller
    taskid = await tc.run(StringTask("c = a + b\nprint('hi')", push={"a": 1, "b": 2}, pull=["c"]))
    tr = await tc.get_task_result(taskid, block=True)
    assert tr.ns.c == 3
    assert tr.stdout == "hi\n"


@pytest_twisted.ensureDeferred
async def test_result_blob_stays_serialized_until_read(fc_cluster):
    tc = fc_cluster.task_controller
    taskid = await tc.run(MapTask(np.arange, args=(100_000,)))
    tr = await tc.get_task_result(taskid, block=True)
    assert isinstance(tr.serialized_result, Serialized)
    arr = tr.results
    assert np.array_equal(arr, np.arange(100_000))
    arr[0] = 5  # writable, as in process


@pytest_twisted.ensureDeferred
async def test_not_done_without_blocking_fires_none(fc_cluster, tmp_path):
    tc = fc_cluster.task_controller
    gate = tmp_path / "gate"
    code = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)\n"
    taskid = await tc.run(StringTask(code))
    assert await tc.get_task_result(taskid) is None
    gate.touch()
    await tc.barrier([taskid])
    assert (await tc.get_task_result(taskid)).status == "succeeded"


@pytest_twisted.ensureDeferred
async def test_task_failure_reraises_the_original_type_with_remote_traceback(fc_cluster):
    tc = fc_cluster.task_controller
    taskid = await tc.run(MapTask(boom, args=(3,)))
    tr = await tc.get_task_result(taskid, block=True)
    assert tr.status == "failed"
    with pytest.raises(Boom, match="bad input 3"):
        tr.raise_exception()
    assert "in boom" in tr.error.traceback


@pytest_twisted.ensureDeferred
async def test_controller_errors_reraise_with_their_types(fc_cluster):
    tc = fc_cluster.task_controller
    with pytest.raises(InvalidTaskID):
        await tc.get_task_result(10**6)
    with pytest.raises(InvalidTaskID):
        await tc.abort(10**6)
    taskid = await tc.run(MapTask(abs, args=(-1,)))
    await tc.barrier([taskid])
    with pytest.raises(TaskAlreadyCompleted):
        await tc.abort(taskid)


@pytest_twisted.ensureDeferred
async def test_queue_status_clear_and_spin(fc_cluster):
    tc = fc_cluster.task_controller
    ids = [await tc.run(MapTask(abs, args=(-i,))) for i in range(3)]
    await tc.barrier(ids)
    assert await tc.spin() is None
    status = await tc.queue_status(verbose=True)
    assert set(ids) <= set(status["succeeded"])
    counts = await tc.queue_status()
    assert counts["succeeded"] >= 3 and counts["pending"] == 0
    await tc.clear(ids[:1])
    with pytest.raises(InvalidTaskID):
        await tc.get_task_result(ids[0])
    await tc.clear()
    assert (await tc.queue_status())["succeeded"] == 0


@pytest_twisted.ensureDeferred
async def test_map_mapper_and_parallel_are_load_balanced_and_ordered(fc_cluster):
    tc = fc_cluster.task_controller
    assert await tc.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert await tc.mapper(chunksize=3).map(pow, [2, 3, 4], [2, 2, 2]) == [4, 9, 16]

    @tc.parallel()
    def add(x, y):
        return x + y

    assert await add([1, 2], [10, 20]) == [11, 22]


@pytest_twisted.ensureDeferred
async def test_db_query_and_resubmit(fc_cluster):
    tc = fc_cluster.task_controller
    ok = await tc.run(MapTask(abs, args=(-5,)))
    bad = await tc.run(MapTask(boom, args=(1,)))
    await tc.barrier([ok, bad])
    failed = await tc.db_query({"status": "failed"}, keys=["status"])
    assert [(r["taskid"], r["status"]) for r in failed] == [(bad, "failed")]
    (again,) = await tc.resubmit([ok])
    assert again not in (ok, bad)
    assert (await tc.get_task_result(again, block=True)).results == 5
    with pytest.raises(InvalidTaskID):
        await tc.resubmit([10**6])


@pytest_twisted.ensureDeferred
async def test_a_malformed_task_spec_is_refused(fc_cluster):
    ref = fc_cluster.task_controller.remote_reference
    with pytest.raises(TypeError, match="flags, payload"):
        await fcutil.call_remote(ref, "run", "not a spec")
    with pytest.raises(TypeError, match="Serialized"):
        await fcutil.call_remote(ref, "run", ({}, "not a payload"))


@pytest_twisted.ensureDeferred
async def test_an_unserializable_task_fails_on_the_client(fc_cluster):
    import threading

    tc = fc_cluster.task_controller
    with pytest.raises(Exception, match="serialize|pickle"):
        await tc.run(MapTask(abs, args=(threading.Lock(),)))
    assert sum((await tc.queue_status()).values()) == 0  # nothing was submitted
