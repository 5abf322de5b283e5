"""txkernel: a controller process and 2 engine processes, one system per adapter.

The cluster is what ``txkernel cluster start -n 2 --adapter A`` starts (the
same :class:`kernel.testing.processes.LocalCluster` with the command's
defaults: 3 s heartbeat, 3 missed beats allowed), in a private cluster
directory, driven by the blocking clients of :mod:`kernel.client` over the
adapter's transport.

Only what txkernel already provides is measured; a workload the client API
cannot do yet is reported as n/a with the reason, never estimated.

- execute: ``mec.execute('pass', targets=e0, block=True)``;
- apply_direct: ``mec.apply(noop, targets=e0, block=True)`` -- one command
  on one engine;
- push/pull: ``mec.push({'a': array}, targets=e0)`` then ``mec.pull('a', targets=e0)``;
- scatter/gather: ``mec.scatter('a', array)`` then ``mec.gather('a')`` over both engines;
- startup: ``txkernel cluster start -n 2 --daemon`` run as a command, from
  launch until it returns (it returns once both engines are registered);
  then ``txkernel cluster stop``, untimed.

The load-balanced workloads use the blocking ``TaskClient``:

- apply_lb: ``tc.get_task_result(tc.run(MapTask(noop)), block=True)``;
- tasks_one_by_one: ``tc.run(MapTask(noop, (i,)))`` per task (each returns its
  taskid), then ``tc.get_task_results(taskids)``;
- map_default: ``tc.map(noop, range(n))``;
- chain_after: ``tc.run(MapTask(noop, after=previous_taskid))``, then the last
  result;
- scale_memory: resident memory of the controller process (and any children)
  after the tasks, submitted with ``tc.run_many`` in batches of 10,000
  single-item ``MapTask``s and their results fetched.
"""

from __future__ import annotations

import importlib
import time

from bench.systems import System
from bench.tasks import noop

#: adapter key -> (system name, modules the adapter needs).
ADAPTERS = {
    "fc": ("txkernel-foolscap", ("kernel.multienginefc", "kernel.taskfc")),
    "pb": ("txkernel-pb", ("kernel.multienginepb", "kernel.taskpb")),
    "native": ("txkernel-native", ("kernel.multienginenative", "kernel.tasknative")),
}

_SCALE_BATCH = 10_000
_START_TIMEOUT = 120.0
#: ``txkernel cluster start``'s default heartbeat period, seconds.
_HEARTBEAT = 3.0


class TxkernelSystem(System):
    """txkernel over one network adapter."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.name, self._modules = ADAPTERS[adapter]
        self._cluster = None
        self._mec = None
        self._tc = None
        self._array = None
        # No chunksize knob to compare with ipyparallel's: txkernel's own
        # default map is the map_default row.
        self.not_applicable = {
            "map_chunk100": "the comparison is txkernel's default map against ipyparallel's "
            "chunksize=100 (see the targets)",
        }

    def unavailable(self) -> str | None:
        modules = ("kernel.testing.processes", "kernel.client", "kernel.asyncclient")
        for module in (*modules, *self._modules):
            try:
                importlib.import_module(module)
            except ImportError as e:
                return f"{module} cannot be imported ({e}); adapter {self.adapter!r} not built yet"
        from kernel import client

        if self.adapter not in client.ADAPTERS:
            return f"kernel.client does not offer adapter {self.adapter!r} yet"
        return None

    def versions(self) -> dict[str, str]:
        import foolscap

        import kernel
        import twisted

        return {
            "txkernel": getattr(kernel, "__version__", "checkout"),
            "twisted": twisted.__version__,
            "foolscap": foolscap.__version__,
            "adapter": self.adapter,
        }

    # -- lifecycle -----------------------------------------------------------

    def _launch(self):
        from kernel.testing.processes import LocalCluster

        cluster = LocalCluster(
            heartbeat=_HEARTBEAT,
            controller_args=[f"--adapter={self.adapter}"],
            timeout=_START_TIMEOUT,
        )
        try:
            cluster.start(2)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def start(self) -> None:
        from kernel import client

        self._cluster = self._launch()
        try:
            where = str(self._cluster.cluster_dir.path)
            self._mec = client.get_multiengine_client(cluster_dir=where, adapter=self.adapter)
            self._tc = client.get_task_client(cluster_dir=where, adapter=self.adapter)
            self._e0 = sorted(self._mec.get_ids())[0]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._mec = self._tc = None
        if self._cluster is not None:
            cluster, self._cluster = self._cluster, None
            cluster.stop()

    # -- probes --------------------------------------------------------------

    def probe_execute(self, size: int) -> dict[str, float]:
        mec, e0 = self._mec, self._e0
        t0 = time.perf_counter()
        for _ in range(size):
            mec.execute("pass", targets=e0, block=True)
        return {"execute": time.perf_counter() - t0}

    def probe_apply_direct(self, size: int) -> dict[str, float]:
        mec, e0 = self._mec, self._e0
        t0 = time.perf_counter()
        for _ in range(size):
            mec.apply(noop, targets=e0, block=True)
        return {"apply_direct": time.perf_counter() - t0}

    def probe_apply_lb(self, size: int) -> dict[str, float]:
        from kernel.task import MapTask

        tc = self._tc
        t0 = time.perf_counter()
        for _ in range(size):
            tc.get_task_result(tc.run(MapTask(noop)), block=True)
        return {"apply_lb": time.perf_counter() - t0}

    def probe_tasks_one_by_one(self, size: int) -> dict[str, float]:
        from kernel.task import MapTask

        tc = self._tc
        t0 = time.perf_counter()
        taskids = [tc.run(MapTask(noop, (i,))) for i in range(size)]
        results = tc.get_task_results(taskids, block=True)
        elapsed = time.perf_counter() - t0
        _check_results(results, size)
        return {"tasks_one_by_one": elapsed}

    def probe_map_default(self, size: int) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self._tc.map(noop, range(size))
        elapsed = time.perf_counter() - t0
        if len(out) != size:
            raise AssertionError(f"map returned {len(out)} results for {size} items")
        return {"map_default": elapsed}

    def probe_chain_after(self, size: int) -> dict[str, float]:
        from kernel.task import MapTask

        tc = self._tc
        t0 = time.perf_counter()
        previous = tc.run(MapTask(noop))
        for _ in range(size - 1):
            previous = tc.run(MapTask(noop, after=previous))
        result = tc.get_task_result(previous, block=True)
        elapsed = time.perf_counter() - t0
        _check_results([result], 1)
        return {"chain_after": elapsed}

    def probe_scale_memory(self, size: int) -> dict[str, float]:
        from kernel.task import MapTask

        pid = self._cluster.controller.pid
        baseline = _process_tree_rss(pid)
        tc, done = self._tc, 0
        t0 = time.perf_counter()
        while done < size:
            batch = min(_SCALE_BATCH, size - done)
            taskids = tc.run_many([MapTask(noop, (i,)) for i in range(batch)])
            _check_results(tc.get_task_results(taskids, block=True), batch)
            done += batch
        elapsed = time.perf_counter() - t0
        return {
            "scale_memory": _process_tree_rss(pid),
            "_baseline_rss": baseline,
            "_tasks": done,
            "_tasks_per_s": done / elapsed,
        }

    def _array_of(self, nbytes: int):
        import numpy as np

        if self._array is None or self._array.nbytes != nbytes:
            self._array = np.random.default_rng(0).random(nbytes // 8)
        return self._array

    def probe_push_pull(self, size: int) -> dict[str, float]:
        mec, e0, array = self._mec, self._e0, self._array_of(size)
        t0 = time.perf_counter()
        mec.push({"a": array}, targets=e0, block=True)
        t1 = time.perf_counter()
        back = mec.pull("a", targets=e0, block=True)
        t2 = time.perf_counter()
        if isinstance(back, list):
            (back,) = back
        if back.nbytes != array.nbytes or back[-1] != array[-1]:
            raise AssertionError("pulled array differs from the pushed one")
        mec.execute("del a", targets=e0, block=True)
        return {"push": t1 - t0, "pull": t2 - t1}

    def probe_scatter_gather(self, size: int) -> dict[str, float]:
        mec, array = self._mec, self._array_of(size)
        ids = mec.get_ids()
        if len(ids) != 2:
            raise AssertionError(f"scatter needs both engines; registered now: {ids}")
        t0 = time.perf_counter()
        mec.scatter("a", array, targets="all", block=True)
        t1 = time.perf_counter()
        back = mec.gather("a", targets="all", block=True)
        t2 = time.perf_counter()
        if len(back) != len(array) or back[-1] != array[-1]:
            raise AssertionError("gathered array differs from the scattered one")
        mec.execute("del a", targets="all", block=True)
        return {"scatter": t1 - t0, "gather": t2 - t1}

    def probe_startup(self, size: int) -> dict[str, float]:
        import shutil
        import subprocess
        import sys
        import tempfile

        from kernel.testing.processes import subprocess_env

        where = tempfile.mkdtemp(prefix="txkernel-bench-start-")
        txkernel = [sys.executable, "-m", "kernel.cli", "cluster"]
        env = subprocess_env()
        t0 = time.perf_counter()
        started = subprocess.run(
            [*txkernel, "start", f"-n{size}", "--daemon", f"--adapter={self.adapter}",
             f"--cluster-dir={where}", f"--timeout={_START_TIMEOUT}"],
            env=env, capture_output=True, text=True, timeout=_START_TIMEOUT + 30,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        stopped = subprocess.run(
            [*txkernel, "stop", f"--cluster-dir={where}"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(where, ignore_errors=True)
        if started.returncode != 0:
            raise RuntimeError(f"txkernel cluster start failed: {started.stderr.strip()}")
        if stopped.returncode != 0:
            raise RuntimeError(f"txkernel cluster stop failed: {stopped.stderr.strip()}")
        return {"startup": elapsed}


def _check_results(results: list, expected: int) -> None:
    """Every task must have succeeded: a failed task is no measurement."""
    if len(results) != expected:
        raise AssertionError(f"{len(results)} results for {expected} tasks")
    for result in results:
        if getattr(result, "status", None) != "succeeded":
            raise AssertionError(f"a task did not succeed: {result!r}")


def _process_tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def systems() -> list[System]:
    """:returns: one system per transport adapter."""
    return [TxkernelSystem(adapter) for adapter in ADAPTERS]
