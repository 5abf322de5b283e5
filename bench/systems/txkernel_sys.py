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

The load-balanced workloads (apply_lb, tasks_one_by_one, map_default,
chain_after, scale_memory) need the task interface over the network, and are
measured once a remote task client can be made (see :meth:`_task_client`).
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

_TASK_WORKLOADS = ("apply_lb", "tasks_one_by_one", "map_default", "chain_after", "scale_memory")
_START_TIMEOUT = 120.0


class TxkernelSystem(System):
    """txkernel over one network adapter."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.name, self._modules = ADAPTERS[adapter]
        self._cluster = None
        self._mec = None
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
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        from kernel import reactorthread

        self._mec = None
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


def systems() -> list[System]:
    """:returns: one system per transport adapter."""
    return [TxkernelSystem(adapter) for adapter in ADAPTERS]
