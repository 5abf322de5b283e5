"""The front door: blocking clients for a running cluster.

::

    from kernel import client

    mec = client.MultiEngineClient()   # engines addressed by id
    tc = client.TaskClient()           # the load-balanced task queue

With no arguments the clients find the cluster through the cluster directory
(``$TXKERNEL_CLUSTER_DIR`` or ``~/.txkernel/default``, where
``txkernel cluster start`` writes its connection files), and speak whatever
transport the controller serves there (the native one on loopback, by
default). Pass a connection file or a FURL, or another cluster directory, to
connect elsewhere, and ``adapter=`` to insist on a transport.

The network runs in Twisted's reactor, in a daemon thread started on the
first call (importing this module starts nothing). Every client method is
thread-safe and returns its result; the clients work in scripts, IPython and
Jupyter. Twisted programs use :mod:`kernel.asyncclient` instead, whose
clients return Deferreds.

:class:`LocalCluster` runs a controller and engines inside this process, for
trying things out and for tests (engines are threads here, so CPU-bound
Python code does not run in parallel).

The names users need are re-exported here: :class:`MapTask`,
:class:`StringTask`, :class:`TaskResult`, :class:`CompositeError`,
:class:`PendingResult`, ...
"""

from __future__ import annotations

from typing import Any

from kernel import reactorthread
from kernel.error import (
    ClientError,
    CompositeError,
    ConnectionError,
    EngineError,
    InvalidEngineID,
    KernelError,
    NoEnginesRegistered,
    RemoteError,
    ResultNotCompleted,
    TaskAborted,
    TaskError,
    TaskTimeout,
)
from kernel.interfaces import IBlockingClientAdaptor
from kernel.multiengine import SynchronousMultiEngine
from kernel.multiengineclient import (
    FullBlockingMultiEngineClient,
    PendingResult,
    QueueStatusList,
    ResultList,
    remote,
)
from kernel.taskclient import BlockingTaskClient

__all__ = [
    "ADAPTERS",
    "BlockingTaskClient",
    "ClientError",
    "CompositeError",
    "ConnectionError",
    "EngineError",
    "FullBlockingMultiEngineClient",
    "InvalidEngineID",
    "KernelError",
    "LocalCluster",
    "MapTask",  # noqa: F822 - loaded lazily by __getattr__
    "MultiEngineClient",
    "NoEnginesRegistered",
    "PendingResult",
    "QueueStatusList",
    "RemoteError",
    "ResultList",
    "ResultNotCompleted",
    "StringTask",  # noqa: F822 - loaded lazily by __getattr__
    "TaskAborted",
    "TaskClient",
    "TaskError",
    "TaskResult",  # noqa: F822 - loaded lazily by __getattr__
    "TaskTimeout",
    "get_multiengine_client",
    "get_task_client",
    "remote",
]

#: The network adapters a client can connect with: Foolscap, Perspective
#: Broker, the native transport.
ADAPTERS = ("fc", "pb", "native")


def __getattr__(name: str) -> Any:
    # The task classes load lazily: importing this module stays light.
    if name in ("MapTask", "StringTask", "TaskResult"):
        from kernel import task

        return getattr(task, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_adapter(adapter: str | None) -> None:
    if adapter is not None and adapter not in ADAPTERS:
        raise ValueError(
            f"unknown adapter {adapter!r}: this installation supports {', '.join(ADAPTERS)}"
        )


def _connect(kind: str, furl_or_file: Any, cluster_dir: Any, adapter: str | None) -> Any:
    """Connect an asynchronous client in the reactor thread and return it."""
    _check_adapter(adapter)
    from kernel import asyncclient

    factory = getattr(asyncclient, f"get_{kind}_client")
    return reactorthread.blocking_call(
        factory, furl_or_file=furl_or_file, cluster_dir=cluster_dir, adapter=adapter
    )


def get_multiengine_client(
    furl_or_file: str | None = None, cluster_dir: str | None = None, adapter: str | None = None
) -> FullBlockingMultiEngineClient:
    """A blocking multiengine client connected to a running controller.

    :param furl_or_file: a FURL or connection file; None for
        ``multiengine.furl`` in the cluster directory.
    :param cluster_dir: the cluster directory (None: ``$TXKERNEL_CLUSTER_DIR``
        or ``~/.txkernel/default``).
    :param adapter: the network adapter: None for the one the controller
        serves (by its connection files; ``'fc'`` for a FURL), or ``'native'``,
        ``'fc'`` (Foolscap) or ``'pb'`` (Perspective Broker); native and PB
        connect through ``cluster_dir``.
    :raises kernel.error.ConnectionError: no cluster found, the controller
        cannot be reached, or it serves another adapter than the one asked
        for (naming it and the fixes).
    """
    async_client = _connect("multiengine", furl_or_file, cluster_dir, adapter)
    if IBlockingClientAdaptor.providedBy(async_client):
        return async_client.adapt_to_blocking_client()
    return FullBlockingMultiEngineClient(async_client)


def get_task_client(
    furl_or_file: str | None = None, cluster_dir: str | None = None, adapter: str | None = None
) -> BlockingTaskClient:
    """A blocking task client connected to a running controller (arguments as
    :func:`get_multiengine_client`; the default file is ``task.furl``)."""
    async_client = _connect("task", furl_or_file, cluster_dir, adapter)
    if IBlockingClientAdaptor.providedBy(async_client):
        return async_client.adapt_to_blocking_client()
    return BlockingTaskClient(async_client)


def MultiEngineClient(  # noqa: N802 - reads as a class, as in the seeds
    furl_or_file: str | None = None, cluster_dir: str | None = None, adapter: str | None = None
) -> FullBlockingMultiEngineClient:
    """``client.MultiEngineClient()``: :func:`get_multiengine_client`."""
    return get_multiengine_client(furl_or_file, cluster_dir, adapter)


def TaskClient(  # noqa: N802 - reads as a class, as in the seeds
    furl_or_file: str | None = None, cluster_dir: str | None = None, adapter: str | None = None
) -> BlockingTaskClient:
    """``client.TaskClient()``: :func:`get_task_client`."""
    return get_task_client(furl_or_file, cluster_dir, adapter)


# ---------------------------------------------------------------------------
# An in-process cluster
# ---------------------------------------------------------------------------


class _StreamingMultiEngine(SynchronousMultiEngine):
    """A SynchronousMultiEngine over in-process engines that also streams
    their output to observers (called in the reactor thread only)."""

    def __init__(self, multiengine: Any, engines: list[Any]):
        super().__init__(multiengine)
        self._engines = engines
        self._adapters: dict[Any, list[tuple[Any, Any]]] = {}

    def add_output_observer(self, observer: Any) -> None:
        """Call ``observer(engine_id, stream_name, text)`` with output as written."""
        pairs = []
        for engine in self._engines:

            def adapter(stream_name: str, text: str, engine: Any = engine) -> None:
                observer(engine.id, stream_name, text)

            engine.add_output_observer(adapter)
            pairs.append((engine, adapter))
        self._adapters.setdefault(observer, []).extend(pairs)

    def remove_output_observer(self, observer: Any) -> None:
        """Stop calling ``observer``."""
        for engine, adapter in self._adapters.pop(observer, []):
            try:
                engine.remove_output_observer(adapter)
            except ValueError:
                pass


class LocalCluster:
    """A controller with ``n_engines`` engines running inside this process.

    For trying the API without starting processes, and for tests. Engines
    are threads, so they share this process's GIL. Use as a context manager,
    or call :meth:`stop`::

        with client.LocalCluster(4) as cluster:
            mec = cluster.multiengine_client()
            tc = cluster.task_client()

    :param n_engines: how many engines to start.
    """

    def __init__(self, n_engines: int = 4):
        if not isinstance(n_engines, int) or n_engines < 1:
            raise ValueError(f"n_engines must be an int >= 1, got {n_engines!r}")
        self.n_engines = n_engines
        self.controller: Any = None
        self.multiengine: Any = None
        self.task_controller: Any = None
        self._engines: list[Any] = []
        reactorthread.blocking_call(self._start)

    def _start(self) -> None:
        from kernel.controllerservice import ControllerService
        from kernel.engineservice import EngineService, QueuedEngine
        from kernel.multiengine import MultiEngine

        self.controller = ControllerService()
        self.controller.startService()
        for _ in range(self.n_engines):
            engine = EngineService()
            self.controller.register_engine(QueuedEngine(engine))
            self._engines.append(engine)
        self.multiengine = MultiEngine(self.controller, stop_controller=self._stop_soon)

    def _stop_soon(self) -> None:
        from twisted.internet import reactor

        reactor.callLater(0, self.controller.stopService)

    def _ensure_task_controller(self) -> Any:
        if self.task_controller is None:
            from kernel.task import TaskController

            self.task_controller = TaskController(self.controller)
            startService = getattr(self.task_controller, "startService", None)  # noqa: N806
            if startService is not None:
                startService()
        return self.task_controller

    def multiengine_client(self) -> FullBlockingMultiEngineClient:
        """A new blocking multiengine client (with its own pending results);
        it streams the engines' output (see
        :meth:`~kernel.multiengineclient.FullBlockingMultiEngineClient.add_output_observer`)."""
        return FullBlockingMultiEngineClient(_StreamingMultiEngine(self.multiengine, self._engines))

    def task_client(self) -> BlockingTaskClient:
        """A blocking task client (all share one task controller)."""
        return BlockingTaskClient(reactorthread.blocking_call(self._ensure_task_controller))

    def stop(self) -> None:
        """Stop the engines and the controller; waits for engine threads."""
        if self.controller is None:
            return
        reactorthread.blocking_call(self._stop)
        self.controller = None

    async def _stop(self) -> None:
        from twisted.internet import defer, reactor

        if self.task_controller is not None:
            stop = getattr(self.task_controller, "stopService", None)
            if stop is not None:
                await defer.maybeDeferred(stop)
        for engine_id in list(self.controller.engines):
            self.controller.unregister_engine(engine_id)
        waits = []
        for engine in self._engines:
            await defer.maybeDeferred(engine.kill)
            waits.append(engine.when_stopped())
        await defer.DeferredList(waits).addTimeout(10, reactor)
        if self.controller.running:
            await defer.maybeDeferred(self.controller.stopService)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
