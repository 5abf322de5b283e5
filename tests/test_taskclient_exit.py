"""A script that submits tasks with the blocking client and exits at once
loses none of them: ``run()`` returns before its task is sent, and the exit
waits for the batches still on their way."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from kernel import asyncclient
from kernel.testing.processes import ROOT, LocalCluster, subprocess_env

WAIT = 60

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from kernel import client
    from kernel.task import MapTask

    cluster_dir, adapter, log = sys.argv[1:]

    def note(i):
        with open(log, "a") as f:
            f.write(f"{i}\\n")
        return i

    tc = client.TaskClient(cluster_dir=cluster_dir, adapter=adapter)
    print(json.dumps([tc.run(MapTask(note, (i,))) for i in range(300)]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["native", "fc", "pb"])
@pytest_twisted.ensureDeferred
async def test_tasks_run_by_a_script_that_exits_at_once_all_run(tmp_path, adapter):
    args = [f"--adapter={adapter}"]
    cluster = LocalCluster(str(tmp_path / "cluster"), controller_args=args, engine_args=args)
    try:
        await cluster.start_async(2)
        log = str(tmp_path / "log")
        done = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-c", SCRIPT, cluster.cluster_dir.path, adapter, log],
            env=subprocess_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert done.returncode == 0, done.stderr
        taskids = json.loads(done.stdout)
        assert len(set(taskids)) == 300
        tc = await asyncclient.get_task_client(
            cluster_dir=cluster.cluster_dir.path, adapter=adapter, timeout=WAIT
        )
        results = await tc.get_task_results(taskids, block=True).addTimeout(WAIT, reactor)
        assert [r.results for r in results] == list(range(300))
        with open(log) as f:
            assert sorted(int(line) for line in f) == list(range(300))
        disconnect = getattr(tc, "disconnect", None)
        if disconnect is not None:
            disconnect()
    finally:
        await threads.deferToThread(cluster.stop)
