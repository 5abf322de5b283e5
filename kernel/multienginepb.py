"""The multiengine interface over Perspective Broker.

The same two halves as :mod:`kernel.multienginefc`, carried over PB by
:mod:`kernel.pbutil` (the adapters only translate; one copy of the logic):

Server half (controller process)
    The object published as the client login's ``multiengine`` service is
    :func:`make_client_referenceable` — the Foolscap server half, exposed
    with :class:`kernel.pbutil.Exposed` (its ``RIMultiEngine`` schema and
    size limits still checked). Each client opens its own session with
    ``connect``, so pending results and ``clear_pending_deferreds`` belong to
    that client. Only the ``*_serialized`` data methods exist there: the
    controller routes :class:`~kernel.serialized.Serialized` blobs, chunked
    over PB when large, and never unpickles them.

Client half (client process)
    :class:`PBFullSynchronousMultiEngineClient` implements
    :class:`~kernel.interfaces.ISynchronousMultiEngine`,
    :class:`~kernel.interfaces.IMultiEngineCoordinator` and
    :class:`~kernel.interfaces.IMultiEngineExtras` over a
    :class:`~kernel.pbutil.PBRemote`: ``push`` serializes once here, ``pull``
    and ``gather`` open blobs here, ``scatter``/``raw_map``/``map`` partition
    here; failures come back as their original types. Get one with
    :func:`get_multiengine_client`, which logs in with the client secret of
    the cluster's ``pb.json``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kernel import pbutil
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from kernel.multienginefc import FCFullSynchronousMultiEngineClient, make_client_referenceable

__all__ = [
    "MULTIENGINE",
    "make_client_referenceable",
    "PBFullSynchronousMultiEngineClient",
    "get_multiengine_client",
]

#: The service name of the multiengine behind the client login.
MULTIENGINE = "multiengine"


@implementer(
    ISynchronousMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras, IBlockingClientAdaptor
)
class PBFullSynchronousMultiEngineClient(FCFullSynchronousMultiEngineClient):
    """The multiengine of a remote controller over PB, for Twisted code.

    Every method returns a Deferred; ``block=False`` fires a pending id kept
    in this client. A lost connection fails calls with
    :class:`~kernel.error.ConnectionError`.

    :param remote_reference: the controller's multiengine service, a
        :class:`~kernel.pbutil.PBRemote` (see :func:`get_multiengine_client`).
    """

    def __repr__(self) -> str:
        return f"<PBFullSynchronousMultiEngineClient {self.remote_reference!r}>"

    def disconnect(self) -> None:
        """Close this client's connection to the controller."""
        self.remote_reference.disconnect()


def get_multiengine_client(
    cluster_dir: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Connect to a PB controller's multiengine interface.

    :param cluster_dir: where the controller wrote ``pb.json`` (None: the
        default cluster directory).
    :param info: the connection info itself, instead of ``cluster_dir``.
    :param timeout: bound on connecting and logging in, seconds.
    :returns: Deferred firing a :class:`PBFullSynchronousMultiEngineClient`.
    :raises: (errback) :class:`~kernel.error.SecurityError` for wrong
        credentials or a connection file others can read;
        :class:`~kernel.error.ConnectionError` if no controller answers.
    """
    return pbutil.connect_client(
        PBFullSynchronousMultiEngineClient, MULTIENGINE, cluster_dir, info, timeout
    )
