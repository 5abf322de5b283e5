"""The multiengine interface over the native transport.

The same two halves as :mod:`kernel.multienginefc`, carried over
:mod:`kernel.nativeproto` (the adapters only translate; one copy of the logic):

Server half (controller process)
    The controller offers :func:`make_client_referenceable` (the Foolscap
    server half) as its ``multiengine`` service. Each client opens its own
    session with ``connect``, so pending results and
    ``clear_pending_deferreds`` belong to that client (one
    :class:`~kernel.multiengine.SynchronousMultiEngine` per session). Only the
    ``*_serialized`` data methods exist there: the controller routes
    :class:`~kernel.serialized.Serialized` blobs frame by frame and never
    unpickles them; a pushed blob is received once and the same frames are
    written to every target engine.

Client half (client process)
    :class:`NativeFullSynchronousMultiEngineClient` implements
    :class:`~kernel.interfaces.ISynchronousMultiEngine`,
    :class:`~kernel.interfaces.IMultiEngineCoordinator` and
    :class:`~kernel.interfaces.IMultiEngineExtras` over a
    :class:`~kernel.nativeproto.NativeRemote`: ``push`` serializes once here,
    ``pull`` and ``gather`` open blobs here (in the buffers they were received
    in), ``scatter``/``raw_map``/``map`` partition here; failures come back as
    their original types. Get one with :func:`get_multiengine_client`.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kernel import nativeproto
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
    "NativeFullSynchronousMultiEngineClient",
    "get_multiengine_client",
]

#: The service name of the multiengine on a native controller.
MULTIENGINE = "multiengine"


@implementer(
    ISynchronousMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras, IBlockingClientAdaptor
)
class NativeFullSynchronousMultiEngineClient(FCFullSynchronousMultiEngineClient):
    """The multiengine of a remote controller over the native transport, for
    Twisted code.

    Every method returns a Deferred; ``block=False`` fires a pending id kept
    in this client. A lost connection fails calls with
    :class:`~kernel.error.ConnectionError`.

    :param remote_reference: the controller's multiengine service, a
        :class:`~kernel.nativeproto.NativeRemote` (see :func:`get_multiengine_client`).
    """

    def __repr__(self) -> str:
        return f"<NativeFullSynchronousMultiEngineClient {self.remote_reference!r}>"

    def disconnect(self) -> None:
        """Close this client's connection to the controller."""
        self.remote_reference.disconnect()


def get_multiengine_client(
    cluster_dir: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Connect to a native controller's multiengine interface.

    :param cluster_dir: where the controller wrote ``native.json`` (None: the
        default cluster directory).
    :param info: the connection info itself, instead of ``cluster_dir``.
    :param timeout: bound on connecting and the handshake, seconds.
    :returns: Deferred firing a :class:`NativeFullSynchronousMultiEngineClient`.
    :raises: (errback) :class:`~kernel.error.SecurityError` for a wrong key
        or a connection file others can read;
        :class:`~kernel.error.ConnectionError` if no controller answers.
    """
    return nativeproto.connect_client(
        NativeFullSynchronousMultiEngineClient, MULTIENGINE, cluster_dir, info, timeout
    )
