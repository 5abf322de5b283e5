"""Asynchronous clients: the Foolscap client halves, for Twisted code.

Each factory finds the controller (a FURL, a connection file, or a cluster
directory), connects over Foolscap, and fires the client half, whose methods
return Deferreds::

    mec = await get_multiengine_client()           # the default cluster directory
    await mec.execute("a = 5")
    tc = await get_task_client(cluster_dir="/tmp/my-cluster")
    taskid = await tc.run(MapTask(abs, args=(-1,)))

All clients made by these factories share one client Tub (started on first
use). The blocking clients of :mod:`kernel.client` are built on these.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from twisted.internet import defer

from kernel import clusterdir, fcutil
from kernel.clusterdir import ClusterDir
from kernel.error import ConnectionError

__all__ = ["get_multiengine_client", "get_task_client", "connect", "client_tub", "find_furl"]

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


async def connect(furl: str, tub: Any = None) -> Any:
    """A RemoteReference to ``furl`` from ``tub`` (default: :func:`client_tub`).

    :raises ConnectionError: naming the FURL's location when it cannot be reached.
    """
    try:
        return await (tub or client_tub()).getReference(furl)
    except Exception as e:
        where = furl.split("@", 1)[-1].split("/", 1)[0] if "@" in furl else furl[:40]
        raise ConnectionError(
            f"cannot reach the controller at {where}: {e}. Is it running? "
            "Start a cluster with `txkernel cluster start -n 4`."
        ) from e


async def _client(reference: Any) -> Any:
    """Build the client class the server names (only classes under ``kernel.``)."""
    name = await reference.callRemote("get_client_name").addErrback(
        fcutil.translate_transport_failure, "get_client_name"
    )
    module, _, cls = str(name).rpartition(".")
    if not module.startswith("kernel."):
        raise ConnectionError(f"the controller asked for an unknown client class {name!r}")
    return getattr(importlib.import_module(module), cls)(reference)


def get_multiengine_client(
    furl_or_file: str | None = None,
    cluster_dir: str | os.PathLike | None = None,
    *,
    tub: Any = None,
) -> defer.Deferred:
    """Connect to a controller's multiengine interface.

    :param furl_or_file: a FURL, a ``multiengine.furl`` file, or None.
    :param cluster_dir: where to find ``multiengine.furl`` when
        ``furl_or_file`` is None.
    :param tub: the Foolscap Tub to connect from (default: :func:`client_tub`).
    :returns: Deferred firing a
        :class:`~kernel.multienginefc.FCFullSynchronousMultiEngineClient`.
    """

    async def go() -> Any:
        furl = find_furl(furl_or_file, cluster_dir, clusterdir.MULTIENGINE_FURL)
        return await _client(await connect(furl, tub))

    return defer.ensureDeferred(go())


def get_task_client(
    furl_or_file: str | None = None,
    cluster_dir: str | os.PathLike | None = None,
    *,
    tub: Any = None,
) -> defer.Deferred:
    """Connect to a controller's task interface.

    :param furl_or_file: a FURL, a ``task.furl`` file, or None.
    :param cluster_dir: where to find ``task.furl`` when ``furl_or_file`` is None.
    :param tub: the Foolscap Tub to connect from (default: :func:`client_tub`).
    :returns: Deferred firing a :class:`~kernel.taskfc.FCTaskClient`.
    """

    async def go() -> Any:
        furl = find_furl(furl_or_file, cluster_dir, clusterdir.TASK_FURL)
        return await _client(await connect(furl, tub))

    return defer.ensureDeferred(go())
