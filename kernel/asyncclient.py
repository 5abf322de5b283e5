"""Asynchronous clients: the adapters' client halves, for Twisted code.

Each factory finds the controller (a FURL, a connection file, or a cluster
directory), connects over the transport it serves, and fires the client
half, whose methods return Deferreds::

    mec = await get_multiengine_client()           # the default cluster directory
    await mec.execute("a = 5")
    tc = await get_task_client(cluster_dir="/tmp/my-cluster")
    taskid = await tc.run(MapTask(abs, args=(-1,)))

With no ``adapter`` the factories speak whatever the controller serves, by
the connection files in its cluster directory (``native.json``: the native
transport, the default on loopback; ``*.furl``: Foolscap; ``pb.json``: PB);
a FURL or a ``.furl`` file means Foolscap. Foolscap (``adapter='fc'``)
clients made by these factories share one client Tub (started on first use)
unless given one. With ``adapter='pb'`` they log in over Perspective Broker
with the credentials in the cluster directory's ``pb.json``
(:mod:`kernel.multienginepb`, :mod:`kernel.taskpb`). The blocking clients
of :mod:`kernel.client` are built on these.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from kernel import clusterdir, fcutil
from kernel.clusterdir import ClusterDir
from kernel.error import ConnectionError

__all__ = ["get_multiengine_client", "get_task_client", "connect", "client_tub", "find_furl"]

#: Seconds a factory waits to reach the controller.
CONNECT_TIMEOUT = 30.0
#: The network adapters the factories speak.
ADAPTERS = ("fc", "pb", "native")

_tub: Any = None


def client_tub() -> Any:
    """The Foolscap Tub this process's clients connect from (started once)."""
    global _tub
    if _tub is None:
        from foolscap.api import Tub

        _tub = Tub()
        _tub.startService()
    return _tub


def find_furl(
    furl_or_file: str | None, cluster_dir: str | os.PathLike | None, default_file: str
) -> str:
    """Resolve where to connect.

    :param furl_or_file: a FURL (``pb://…``), or the path of a connection
        file holding one, or None to use ``cluster_dir``.
    :param cluster_dir: the cluster directory (None: ``$TXKERNEL_CLUSTER_DIR``
        or ``~/.txkernel/default``).
    :param default_file: the connection file to read from the cluster
        directory (e.g. ``multiengine.furl``).
    :raises ConnectionError: no such connection file (with how to start a cluster).
    :raises SecurityError: the connection file or directory is not private.
    """
    if furl_or_file is not None:
        text = os.fspath(furl_or_file)
        if text.startswith("pb://"):
            return text
        path = os.path.abspath(os.path.expanduser(text))
        if os.path.isdir(path):
            return ClusterDir(path).read_furl(default_file)
        if not os.path.exists(path):
            raise ConnectionError(
                f"{text!r} is neither a FURL (pb://...) nor an existing connection file"
            )
        folder, name = os.path.split(path)
        return ClusterDir(folder).read_furl(name)
    return ClusterDir(cluster_dir).read_furl(default_file)


async def connect(furl: str, tub: Any = None, timeout: float = CONNECT_TIMEOUT) -> Any:
    """A RemoteReference to ``furl`` from ``tub`` (default: :func:`client_tub`).

    :param timeout: seconds to wait for the connection.
    :raises ConnectionError: naming the FURL's location when it cannot be
        reached, or when the controller there does not know the FURL.
    """
    from twisted.internet import reactor

    d = (tub or client_tub()).getReference(furl).addTimeout(timeout, reactor)
    # Translate before awaiting: a failure Foolscap copied from the far side
    # (an unknown swissnum) cannot be thrown into a coroutine.
    d.addErrback(_unreachable, furl)
    return await d


def _unreachable(f: Failure, furl: str) -> Failure:
    where = furl.split("@", 1)[-1].split("/", 1)[0] if "@" in furl else furl[:40]
    if f.check(defer.TimeoutError, CancelledError):
        why = "no answer"
    else:
        why = f.getErrorMessage()
    return Failure(
        ConnectionError(
            f"cannot reach the controller at {where} ({why}). Is it running, and is the "
            "FURL current? Start a cluster with `txkernel cluster start -n 4`."
        )
    )


def _adapter(adapter: str | None, furl_or_file: Any, cluster_dir: Any) -> str:
    """The adapter to connect with: ``adapter`` if given (checked against
    what the cluster directory's controller serves), ``fc`` for a FURL or a
    connection file, else what the cluster directory's controller serves."""
    if adapter is not None and adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}: use one of {', '.join(ADAPTERS)}")
    if furl_or_file is not None and not os.path.isdir(os.fspath(furl_or_file)):
        return adapter or "fc"  # a FURL or a .furl file (other adapters refuse it)
    cd = ClusterDir(cluster_dir if furl_or_file is None else furl_or_file)
    if adapter is not None:
        cd.check_adapter(adapter)
        return adapter
    served = cd.served_adapter()
    if served is None:
        raise ConnectionError(
            f"no controller connection files in {cd.path}: is a controller running "
            "with this cluster directory? Start one with "
            f"`txkernel cluster start -n 4 --cluster-dir {cd.path}`."
        )
    return served


def _pb_dir(furl_or_file: Any, cluster_dir: Any) -> Any:
    """The cluster directory a PB or native client reads its connection file from."""
    if furl_or_file is None:
        return cluster_dir
    if os.path.isdir(os.fspath(furl_or_file)):
        return furl_or_file
    raise ValueError(
        "the pb and native adapters connect through a cluster directory (its pb.json "
        "or native.json): pass cluster_dir=..., not a FURL or connection file"
    )


async def _client(reference: Any) -> Any:
    """Build the client class the server names (only classes under ``kernel.``)."""
    name = await reference.callRemote("get_client_name").addErrback(
        fcutil.translate_transport_failure, "get_client_name"
    )
    module, _, cls = str(name).rpartition(".")
    if not module.startswith("kernel."):
        raise ConnectionError(f"the controller asked for an unknown client class {name!r}")
    return getattr(importlib.import_module(module), cls)(reference)


async def _get_client(
    kind: str,
    furl_name: str,
    furl_or_file: Any,
    cluster_dir: Any,
    adapter: str,
    tub: Any,
    timeout: float,
) -> Any:
    """Connect to the controller's ``kind`` interface (``'multiengine'`` or
    ``'task'``) over ``adapter``."""
    adapter = _adapter(adapter, furl_or_file, cluster_dir)
    if adapter != "fc":
        # kernel.multienginepb, kernel.tasknative, ...: imported only when used.
        module = importlib.import_module(f"kernel.{kind}{adapter}")
        get = getattr(module, f"get_{kind}_client")
        return await get(_pb_dir(furl_or_file, cluster_dir), timeout=timeout)
    furl = find_furl(furl_or_file, cluster_dir, furl_name)
    return await _client(await connect(furl, tub, timeout))


def get_multiengine_client(
    furl_or_file: str | None = None,
    cluster_dir: str | os.PathLike | None = None,
    adapter: str | None = None,
    *,
    tub: Any = None,
    timeout: float = CONNECT_TIMEOUT,
) -> defer.Deferred:
    """Connect to a controller's multiengine interface.

    :param furl_or_file: a FURL, a ``multiengine.furl`` file, or None.
    :param cluster_dir: where to find ``multiengine.furl`` when
        ``furl_or_file`` is None.
    :param adapter: None (what the controller serves, see above), ``'native'``
        (:mod:`kernel.nativeproto`), ``'fc'`` (Foolscap) or ``'pb'``
        (Perspective Broker); native and PB connect through a cluster directory.
    :param tub: the Foolscap Tub to connect from (default: :func:`client_tub`).
    :param timeout: seconds to wait for the controller.
    :returns: Deferred firing a
        :class:`~kernel.multienginefc.FCFullSynchronousMultiEngineClient`.
    """
    return defer.ensureDeferred(
        _get_client(
            "multiengine",
            clusterdir.MULTIENGINE_FURL,
            furl_or_file,
            cluster_dir,
            adapter,
            tub,
            timeout,
        )
    )


def get_task_client(
    furl_or_file: str | None = None,
    cluster_dir: str | os.PathLike | None = None,
    adapter: str | None = None,
    *,
    tub: Any = None,
    timeout: float = CONNECT_TIMEOUT,
) -> defer.Deferred:
    """Connect to a controller's task interface.

    :param furl_or_file: a FURL, a ``task.furl`` file, or None.
    :param cluster_dir: where to find ``task.furl`` when ``furl_or_file`` is None.
    :param adapter: as for :func:`get_multiengine_client`.
    :param tub: the Foolscap Tub to connect from (default: :func:`client_tub`).
    :param timeout: seconds to wait for the controller.
    :returns: Deferred firing a :class:`~kernel.taskfc.FCTaskClient`.
    """
    return defer.ensureDeferred(
        _get_client("task", clusterdir.TASK_FURL, furl_or_file, cluster_dir, adapter, tub, timeout)
    )
