"""ipyparallel: a local ``ipp.Cluster(n=2)`` (controller plus 2 engines).

Mapping of the workloads (all blocking unless said otherwise):

- execute: ``rc[0].execute('pass', block=True)``;
- apply_direct: ``rc[0].apply_sync(noop)``; apply_lb: ``lview.apply_sync(noop)``;
- tasks_one_by_one: ``lview.apply_async(noop)`` per task, then every ``get()``;
- map_default: ``lview.map_sync(noop, range(n))`` (ipyparallel's default
  chunksize is 1); map_chunk100: the same with ``chunksize=100``;
- chain_after: ``lview.apply_async`` under ``temp_flags(after=[previous])``;
- push/pull: ``rc[0].push({'a': array}, block=True)``, ``rc[0].pull('a', block=True)``;
- scatter/gather: ``dview.scatter('a', array, block=True)``, ``dview.gather('a', block=True)``;
- startup: ``ipp.Cluster(n=2).start_and_connect_sync()`` until 2 engines are
  registered (then the cluster is stopped, untimed);
- scale_memory: resident memory of the controller process and its children
  (ipyparallel's schedulers run as controller subprocesses) after the tasks,
  submitted in load-balanced maps of 10,000 single-item tasks (``chunksize=1``).
"""

from __future__ import annotations

import logging
import time

from bench.systems import System
from bench.tasks import noop

_SCALE_BATCH = 10_000


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


class IpyparallelSystem(System):
    """ipyparallel's local cluster, driven by its blocking ``Client``."""

    name = "ipyparallel"
    not_applicable = {}

    def __init__(self) -> None:
        self._cluster = None
        self._rc = None
        self._array = None

    def unavailable(self) -> str | None:
        try:
            import ipyparallel  # noqa: F401
            import numpy  # noqa: F401
            import psutil  # noqa: F401
        except ImportError as e:
            return f"{e}; run bench/setup_env.sh (or bench/run.sh) to install the peers"
        return None

    def versions(self) -> dict[str, str]:
        import ipyparallel
        import numpy
        import zmq

        return {
            "ipyparallel": ipyparallel.__version__,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "numpy": numpy.__version__,
        }

    # -- lifecycle -----------------------------------------------------------

    @staticmethod
    def _launch():
        import ipyparallel as ipp

        cluster = ipp.Cluster(n=2, log_level=logging.WARNING)
        try:
            rc = cluster.start_and_connect_sync()
            rc.wait_for_engines(2, timeout=120)
        except BaseException:
            cluster.stop_cluster_sync()
            raise
        return cluster, rc

    @staticmethod
    def _shutdown(cluster, rc) -> None:
        import psutil

        # Engines start nanny processes that outlive stop_cluster_sync() by a
        # few seconds: note every process now, wait for all of them to exit.
        procs = []
        launchers = [cluster.controller] if cluster.controller else []
        for engine_set in cluster.engines.values():
            launchers.extend(engine_set.launchers.values())
        for launcher in launchers:
            try:
                proc = psutil.Process(launcher.pid)
                procs += [proc, *proc.children(recursive=True)]
            except (psutil.NoSuchProcess, AttributeError, TypeError):
                pass
        try:
            if rc is not None:
                rc.close()
        finally:
            cluster.stop_cluster_sync()
            _, alive = psutil.wait_procs(procs, timeout=15)
            for proc in alive:
                proc.kill()
            psutil.wait_procs(alive, timeout=5)

    def start(self) -> None:
        self._cluster, self._rc = self._launch()
        self._e0 = self._rc[self._rc.ids[0]]
        self._lview = self._rc.load_balanced_view()
        self._dview = self._rc[:]

    def stop(self) -> None:
        if self._cluster is not None:
            cluster, rc = self._cluster, self._rc
            self._cluster = self._rc = None
            self._shutdown(cluster, rc)

    def _forget(self) -> None:
        """Drop results the client cached, so its memory does not grow run to run."""
        self._rc.results.clear()
        self._rc.metadata.clear()
        self._rc.history.clear()

    # -- probes --------------------------------------------------------------

    def probe_execute(self, size: int) -> dict[str, float]:
        e0 = self._e0
        t0 = time.perf_counter()
        for _ in range(size):
            e0.execute("pass", block=True)
        elapsed = time.perf_counter() - t0
        self._forget()
        return {"execute": elapsed}

    def probe_apply_direct(self, size: int) -> dict[str, float]:
        e0 = self._e0
        t0 = time.perf_counter()
        for _ in range(size):
            e0.apply_sync(noop)
        elapsed = time.perf_counter() - t0
        self._forget()
        return {"apply_direct": elapsed}

    def probe_apply_lb(self, size: int) -> dict[str, float]:
        lview = self._lview
        t0 = time.perf_counter()
        for _ in range(size):
            lview.apply_sync(noop)
        elapsed = time.perf_counter() - t0
        self._forget()
        return {"apply_lb": elapsed}

    def probe_tasks_one_by_one(self, size: int) -> dict[str, float]:
        lview = self._lview
        t0 = time.perf_counter()
        pending = [lview.apply_async(noop) for _ in range(size)]
        for ar in pending:
            ar.get()
        elapsed = time.perf_counter() - t0
        self._forget()
        return {"tasks_one_by_one": elapsed}

    def probe_map_default(self, size: int) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self._lview.map_sync(noop, range(size))
        elapsed = time.perf_counter() - t0
        assert len(out) == size
        self._forget()
        return {"map_default": elapsed}

    def probe_map_chunk100(self, size: int) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self._lview.map(noop, range(size), chunksize=100, block=True)
        elapsed = time.perf_counter() - t0
        assert len(out) == size
        self._forget()
        return {"map_chunk100": elapsed}

    def probe_chain_after(self, size: int) -> dict[str, float]:
        lview = self._lview
        t0 = time.perf_counter()
        previous = lview.apply_async(noop)
        for _ in range(size - 1):
            with lview.temp_flags(after=[previous]):
                previous = lview.apply_async(noop)
        previous.get()
        elapsed = time.perf_counter() - t0
        self._forget()
        return {"chain_after": elapsed}

    def _array_of(self, nbytes: int):
        import numpy as np

        if self._array is None or self._array.nbytes != nbytes:
            self._array = np.random.default_rng(0).random(nbytes // 8)
        return self._array

    def probe_push_pull(self, size: int) -> dict[str, float]:
        array, e0 = self._array_of(size), self._e0
        t0 = time.perf_counter()
        e0.push({"a": array}, block=True)
        t1 = time.perf_counter()
        back = e0.pull("a", block=True)
        t2 = time.perf_counter()
        if back.nbytes != array.nbytes or back[-1] != array[-1]:
            raise AssertionError("pulled array differs from the pushed one")
        e0.execute("del a", block=True)
        del back
        self._forget()
        return {"push": t1 - t0, "pull": t2 - t1}

    def probe_scatter_gather(self, size: int) -> dict[str, float]:
        array, dview = self._array_of(size), self._dview
        t0 = time.perf_counter()
        dview.scatter("a", array, block=True)
        t1 = time.perf_counter()
        back = dview.gather("a", block=True)
        t2 = time.perf_counter()
        if back.nbytes != array.nbytes or back[-1] != array[-1]:
            raise AssertionError("gathered array differs from the scattered one")
        dview.execute("del a", block=True)
        del back
        self._forget()
        return {"scatter": t1 - t0, "gather": t2 - t1}

    def probe_startup(self, size: int) -> dict[str, float]:
        t0 = time.perf_counter()
        cluster, rc = self._launch()
        elapsed = time.perf_counter() - t0
        self._shutdown(cluster, rc)
        return {"startup": elapsed}

    def probe_scale_memory(self, size: int) -> dict[str, float]:
        pid = self._cluster.controller.process.pid
        baseline = _process_tree_rss(pid)
        done = 0
        t0 = time.perf_counter()
        while done < size:
            batch = min(_SCALE_BATCH, size - done)
            self._lview.map(noop, range(batch), chunksize=1, block=True)
            self._forget()
            done += batch
        elapsed = time.perf_counter() - t0
        return {
            "scale_memory": _process_tree_rss(pid),
            "_baseline_rss": baseline,
            "_tasks": done,
            "_tasks_per_s": done / elapsed,
        }


def systems() -> list[System]:
    """:returns: the systems this module provides."""
    return [IpyparallelSystem()]
