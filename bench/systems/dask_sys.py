"""dask.distributed: a scheduler process and 2 single-threaded worker processes.

The main cluster is started from dask's own command-line entry points
(``dask scheduler`` and ``dask worker --nthreads 1 --no-nanny``), so that,
like the other systems, client, scheduler and each worker are separate
processes and the scheduler's memory can be measured on its own (a
``LocalCluster`` runs its scheduler inside the client's process). The startup
workload uses ``LocalCluster`` as users do.

Mapping of the workloads (``w0`` is the first worker's address):

- execute: n/a -- dask runs functions, it has no code-string execution;
- apply_direct: ``client.submit(noop, pure=False, workers=[w0]).result()``;
- apply_lb: ``client.submit(noop, pure=False).result()``;
- tasks_one_by_one: ``client.submit(noop, i, pure=False)`` per task, then
  ``client.gather`` of all futures;
- map_default: ``client.gather(client.map(noop, range(n), pure=False))``;
- map_chunk100: n/a -- ``client.map`` has no chunking of items into tasks;
- chain_after: ``client.submit(identity, previous_future, pure=False)``, each
  task taking the previous one's future as its argument;
- push/pull: ``client.scatter(array, workers=[w0])`` then ``future.result()``
  (dask's default routing);
- scatter/gather: ``client.scatter`` of the array split in 2 (views, no copy)
  onto both workers, then ``client.gather`` and ``np.concatenate``;
- startup: ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
  and a ``Client`` until 2 workers are connected (then closed, untimed);
- scale_memory: the scheduler process's resident memory after the tasks,
  submitted with ``client.map`` in batches of 10,000 and gathered, futures
  released.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.systems import System
from bench.tasks import identity, noop

_SCALE_BATCH = 10_000
_START_TIMEOUT = 120


class DaskSystem(System):
    """dask.distributed driven by its blocking ``Client``."""

    name = "dask"
    not_applicable = {
        "execute": "dask runs functions only; no equivalent of execute('pass')",
        "map_chunk100": "client.map has no chunksize (items are always one task each)",
    }

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []
        self._client = None
        self._dir: Path | None = None
        self._array = None

    def unavailable(self) -> str | None:
        try:
            import distributed  # noqa: F401
            import numpy  # noqa: F401
            import psutil  # noqa: F401
        except ImportError as e:
            return f"{e}; run bench/setup_env.sh (or bench/run.sh) to install the peers"
        return None

    def versions(self) -> dict[str, str]:
        import dask
        import distributed
        import msgpack
        import numpy
        import tornado

        return {
            "dask": dask.__version__,
            "distributed": distributed.__version__,
            "tornado": tornado.version,
            "msgpack": ".".join(map(str, msgpack.version)),
            "numpy": numpy.__version__,
        }

    # -- lifecycle -----------------------------------------------------------

    def _spawn(self, module: str, *args: str) -> subprocess.Popen:
        log = open(self._dir / f"{module.rsplit('.', 1)[-1]}-{len(self._procs)}.log", "wb")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._procs.append(proc)
        return proc

    def start(self) -> None:
        from distributed import Client

        self._dir = Path(tempfile.mkdtemp(prefix="dask-bench-"))
        sched_file = self._dir / "scheduler.json"
        try:
            self._scheduler = self._spawn(
                "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                "--no-dashboard", "--scheduler-file", str(sched_file),
            )  # fmt: skip
            deadline = time.monotonic() + _START_TIMEOUT
            while not sched_file.exists() or not sched_file.read_text().strip():
                if self._scheduler.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dask scheduler did not start; see {self._dir}")
                time.sleep(0.05)
            address = json.loads(sched_file.read_text())["address"]
            for _ in range(2):
                self._spawn(
                    "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
                    "--no-dashboard", "--host", "127.0.0.1",
                    "--local-directory", str(self._dir),
                )  # fmt: skip
            self._client = Client(address, timeout=_START_TIMEOUT)
            self._client.wait_for_workers(2, timeout=_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self._workers = sorted(self._client.scheduler_info()["workers"])

    def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.shutdown()  # stops scheduler and workers
            except Exception:  # noqa: BLE001 -- fall through to stopping by pid
                pass
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- probes --------------------------------------------------------------

    def probe_apply_direct(self, size: int) -> dict[str, float]:
        client, w0 = self._client, [self._workers[0]]
        t0 = time.perf_counter()
        for _ in range(size):
            client.submit(noop, pure=False, workers=w0).result()
        return {"apply_direct": time.perf_counter() - t0}

    def probe_apply_lb(self, size: int) -> dict[str, float]:
        client = self._client
        t0 = time.perf_counter()
        for _ in range(size):
            client.submit(noop, pure=False).result()
        return {"apply_lb": time.perf_counter() - t0}

    def probe_tasks_one_by_one(self, size: int) -> dict[str, float]:
        client = self._client
        t0 = time.perf_counter()
        futures = [client.submit(noop, i, pure=False) for i in range(size)]
        client.gather(futures)
        elapsed = time.perf_counter() - t0
        del futures
        return {"tasks_one_by_one": elapsed}

    def probe_map_default(self, size: int) -> dict[str, float]:
        client = self._client
        t0 = time.perf_counter()
        out = client.gather(client.map(noop, range(size), pure=False))
        elapsed = time.perf_counter() - t0
        assert len(out) == size
        return {"map_default": elapsed}

    def probe_chain_after(self, size: int) -> dict[str, float]:
        client = self._client
        t0 = time.perf_counter()
        future = client.submit(identity, 0, pure=False)
        for _ in range(size - 1):
            future = client.submit(identity, future, pure=False)
        future.result()
        elapsed = time.perf_counter() - t0
        del future
        return {"chain_after": elapsed}

    def _array_of(self, nbytes: int):
        import numpy as np

        if self._array is None or self._array.nbytes != nbytes:
            self._array = np.random.default_rng(0).random(nbytes // 8)
        return self._array

    def probe_push_pull(self, size: int) -> dict[str, float]:
        client, array = self._client, self._array_of(size)
        t0 = time.perf_counter()
        future = client.scatter(array, workers=[self._workers[0]])
        t1 = time.perf_counter()
        back = future.result()
        t2 = time.perf_counter()
        if back is array or back.nbytes != array.nbytes or back[-1] != array[-1]:
            raise AssertionError("pulled array is not a fresh copy of the pushed one")
        del future, back
        return {"push": t1 - t0, "pull": t2 - t1}

    def probe_scatter_gather(self, size: int) -> dict[str, float]:
        import numpy as np

        client, array = self._client, self._array_of(size)
        parts = np.array_split(array, 2)
        t0 = time.perf_counter()
        futures = client.scatter(parts, workers=self._workers)
        t1 = time.perf_counter()
        back = np.concatenate(client.gather(futures))
        t2 = time.perf_counter()
        if back.nbytes != array.nbytes or back[-1] != array[-1]:
            raise AssertionError("gathered array differs from the scattered one")
        holders = client.who_has(futures)
        if len({w for ws in holders.values() for w in ws}) != 2:
            raise AssertionError(f"scatter did not use both workers: {holders}")
        del futures, back
        return {"scatter": t1 - t0, "gather": t2 - t1}

    def probe_startup(self, size: int) -> dict[str, float]:
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        try:
            client = Client(cluster)
            try:
                client.wait_for_workers(2, timeout=_START_TIMEOUT)
                elapsed = time.perf_counter() - t0
            finally:
                client.close()
        finally:
            cluster.close()
        return {"startup": elapsed}

    def probe_scale_memory(self, size: int) -> dict[str, float]:
        import psutil

        client = self._client
        scheduler = psutil.Process(self._scheduler.pid)
        baseline = scheduler.memory_info().rss
        done = 0
        t0 = time.perf_counter()
        while done < size:
            batch = min(_SCALE_BATCH, size - done)
            futures = client.map(noop, range(done, done + batch), pure=False)
            client.gather(futures)
            del futures
            done += batch
        elapsed = time.perf_counter() - t0
        # Released futures are forgotten asynchronously: wait until the
        # scheduler holds no tasks (bounded), then measure.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if client.run_on_scheduler(_scheduler_task_count) == 0:
                break
            time.sleep(0.2)
        return {
            "scale_memory": scheduler.memory_info().rss,
            "_baseline_rss": baseline,
            "_tasks": done,
            "_tasks_per_s": done / elapsed,
        }


def _scheduler_task_count(dask_scheduler=None) -> int:
    return len(dask_scheduler.tasks)


def systems() -> list[System]:
    """:returns: the systems this module provides."""
    return [DaskSystem()]
