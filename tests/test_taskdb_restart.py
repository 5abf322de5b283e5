"""A controller restarted on its cluster directory keeps the task records it
wrote and never hands out their task ids again, nor those of the blocks it
granted to clients."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from kernel import asyncclient
from kernel.task import MapTask
from kernel.taskdb.sqlite import SQLiteDB
from kernel.testing.processes import LocalCluster

WAIT = 60


def test_next_taskid_starts_past_the_stored_records(tmp_path):
    db = SQLiteDB(str(tmp_path / "tasks.sqlite"))
    assert db.next_taskid() == 0
    db.add_record(0, {"status": "succeeded"})
    db.add_record(7, {"status": "failed"})
    assert db.next_taskid() == 8
    db.close()
    assert SQLiteDB(str(tmp_path / "tasks.sqlite")).next_taskid() == 8


async def run_one(cluster, value):
    tc = await asyncclient.get_task_client(
        cluster_dir=cluster.cluster_dir.path, adapter="fc", timeout=WAIT
    )
    taskid = await tc.run(MapTask(abs, (value,)))
    result = await tc.get_task_result(taskid, block=True).addTimeout(WAIT, reactor)
    return tc, taskid, result.results


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_restarted_controller_keeps_old_records_and_new_ids(tmp_path):
    cluster = LocalCluster(str(tmp_path / "cluster"), controller_args=["--adapter=fc"])
    try:
        await cluster.start_async(1)
        first_tc, first_id, first = await run_one(cluster, -3)
        assert first == 3
        # the client was granted a whole block of taskids and used only one
        block_end = first_id + first_tc.batcher.block_size
        cluster.stop_controller()
        await cluster.start_controller_async()
        await cluster.wait_for_engines_async(1)
        tc, second_id, second = await run_one(cluster, -4)
        assert second == 4
        assert second_id >= block_end  # no id of the granted block is handed out again
        records = await tc.db_query({"taskid": {"$in": [first_id, second_id]}}, keys=["status"])
        assert [(r["taskid"], r["status"]) for r in records] == [
            (first_id, "succeeded"),
            (second_id, "succeeded"),
        ]
    finally:
        cluster.stop()
