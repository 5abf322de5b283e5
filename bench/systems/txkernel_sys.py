"""txkernel: a controller process and 2 engine processes, one system per adapter.

The cluster is started with :class:`kernel.testing.processes.LocalCluster`
(``twistd``-style controller and engine processes on ephemeral loopback
ports, in a private cluster directory) and driven by the blocking
multiengine client over the adapter's network transport.

Only what txkernel already provides is measured; everything else is reported
as not implemented, never estimated. Today (Foolscap adapter):

- execute: ``mec.execute('pass', targets=e0, block=True)``;
- apply_direct: ``mec.raw_map(noop, [[None]], targets=e0, block=True)`` -- the
  multiengine has no single-command function call yet, so this is a one-item
  map on one engine (push, execute, pull, clean-up: four commands);
- push/pull: ``mec.push({'a': array}, targets=e0)`` then ``mec.pull('a', targets=e0)``;
- scatter/gather: ``mec.scatter('a', array)`` then ``mec.gather('a')`` over both engines;
- startup: ``LocalCluster().start(2)`` (controller up, then 2 engines
  registered), the programmatic form of ``txkernel cluster start -n 2``.

The load-balanced workloads need the task interface over the network; they
are measured once a remote task client can be made (``kernel.asyncclient``
and the adapter's task module exist), with the blocking ``TaskClient``:

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
    "fc": ("txkernel-foolscap", ("kernel.multienginefc",)),
    "pb": ("txkernel-pb", ("kernel.multienginepb",)),
    "native": ("txkernel-native", ("kernel.multienginenative",)),
}

_SCALE_BATCH = 10_000
_TASK_WORKLOADS = ("apply_lb", "tasks_one_by_one", "map_default", "chain_after", "scale_memory")
_START_TIMEOUT = 120.0


class TxkernelSystem(System):
    """txkernel over one network adapter."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.name, self._modules = ADAPTERS[adapter]
        self._cluster = None
        self._mec = None
        self._tc = None
        self._tub = None
        self._array = None
        # No chunksize knob to compare with ipyparallel's: txkernel's own
        # default map is the map_default row.
        self.not_applicable = {
            "map_chunk100": "the comparison is txkernel's default map against ipyparallel's "
            "chunksize=100 (see the targets)",
        }
        if self._task_client_missing():
            reason = self._task_client_missing()
            for name in _TASK_WORKLOADS:
                self.not_applicable[name] = f"not measurable yet: {reason}"

    def _task_client_missing(self) -> str | None:
        """Why no remote task client can be made yet, or ``None``."""
        for module in ("kernel.asyncclient", f"kernel.task{self.adapter}"):
            try:
                importlib.import_module(module)
            except ImportError as e:
                return f"no remote task client ({module}: {e})"
        return None

    def unavailable(self) -> str | None:
        for module in ("kernel.testing.processes", "kernel.multiengineclient", *self._modules):
            try:
                importlib.import_module(module)
            except ImportError as e:
                return f"{module} cannot be imported ({e}); adapter {self.adapter!r} not built yet"
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

    @staticmethod
    def _launch():
        from kernel.testing.processes import LocalCluster

        cluster = LocalCluster(timeout=_START_TIMEOUT)
        try:
            cluster.start(2)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _connect(self):
        """A blocking multiengine client of the running cluster."""
        from kernel import clusterdir, reactorthread
        from kernel.multiengineclient import FullBlockingMultiEngineClient

        try:
            from kernel import client

            return client.get_multiengine_client(
                cluster_dir=str(self._cluster.cluster_dir.path), adapter=self.adapter
            )
        except ImportError:
            pass
        # Until kernel.asyncclient lands: the same pieces, put together here.
        if self.adapter != "fc":
            raise RuntimeError(f"no client construction known for adapter {self.adapter!r}")
        furl = self._cluster.cluster_dir.read_furl(clusterdir.MULTIENGINE_FURL)

        async def connect():
            from foolscap.api import Tub
            from twisted.internet import reactor

            from kernel.multienginefc import FCFullSynchronousMultiEngineClient

            tub = Tub()
            tub.startService()
            self._tub = tub
            ref = await tub.getReference(furl).addTimeout(_START_TIMEOUT, reactor)
            return FCFullSynchronousMultiEngineClient(ref)

        return FullBlockingMultiEngineClient(reactorthread.blocking_call(connect))

    def start(self) -> None:
        self._cluster = self._launch()
        try:
            self._mec = self._connect()
            self._e0 = sorted(self._mec.get_ids())[0]
            if not self._task_client_missing():
                from kernel import client

                self._tc = client.get_task_client(
                    cluster_dir=str(self._cluster.cluster_dir.path), adapter=self.adapter
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        from kernel import reactorthread

        self._mec = self._tc = None
        if self._tub is not None:
            tub, self._tub = self._tub, None
            try:
                reactorthread.blocking_call(tub.stopService)
            except Exception:  # noqa: BLE001 -- the processes are stopped regardless
                pass
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
            mec.raw_map(noop, [[None]], targets=e0, block=True)
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
        t0 = time.perf_counter()
        cluster = self._launch()
        elapsed = time.perf_counter() - t0
        cluster.stop()
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
