"""The multiengine interface over the native transport.

The same two halves as :mod:`kernel.multienginefc` (from
:mod:`kernel.multiengineremote`, with no Foolscap), carried over
:mod:`kernel.nativeproto` (the adapters only translate; one copy of the logic):

Server half (controller process)
    The controller offers :func:`make_client_referenceable` (the server
    half) as its ``multiengine`` service. Each client opens its own
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
    A blocking client over it makes small blocking ``execute``, ``apply``,
    ``push`` and ``pull`` calls from its own thread
    (:meth:`NativeFullSynchronousMultiEngineClient.call_blocking`): the
    request leaves from the caller's thread and the reply wakes it directly,
    with no hop through the reactor thread on the way out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kernel import nativeproto, reactorthread
from kernel.envelope import unpackage
from kernel.error import CompositeError
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from kernel.multiengine import open_blob
from kernel.multiengineremote import (
    FullSynchronousMultiEngineClient,
    SynchronousMultiEngineFromMultiEngine,
    make_client_referenceable,
)
from kernel.remotecall import translate_transport_failure
from kernel.serialized import serialize, serialize_namespace
from kernel.task import MapTaskBody
from kernel.wiretext import check_sendable

__all__ = [
    "MULTIENGINE",
    "make_client_referenceable",
    "NativeFullSynchronousMultiEngineClient",
    "get_multiengine_client",
]

#: The service name of the multiengine on a native controller.
MULTIENGINE = "multiengine"

# A push's blob only travels on to engines, unopened: a controller forwards
# its large buffers as they arrive (kernel.nativeproto, "Cut-through forwarding").
nativeproto.allow_cut_through(SynchronousMultiEngineFromMultiEngine, ("push_serialized",))
# What engines reply to execute and apply goes back to the client as it came,
# never decoded and encoded again here (kernel.nativeproto.allow_verbatim).
nativeproto.allow_verbatim(SynchronousMultiEngineFromMultiEngine, ("execute", "apply_serialized"))


@implementer(
    ISynchronousMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras, IBlockingClientAdaptor
)
class NativeFullSynchronousMultiEngineClient(FullSynchronousMultiEngineClient):
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

    def call_blocking(self, method: str, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """Make the blocking call ``method(*args, **kwargs, block=True)``
        from the calling thread, if it can go that way.

        A blocking client (:class:`~kernel.multiengineclient.FullBlockingMultiEngineClient`)
        tries this first, from its own thread (never the reactor's). For
        ``execute``, ``apply``, ``push`` and ``pull`` with small arguments,
        once this client's session is open, the request is serialized and
        sent from the calling thread, which then waits for the reply: the
        reactor thread only receives it (see
        :meth:`kernel.nativeproto.NativeProtocol.call_from_thread`). Results
        and errors are those of the Deferred-returning methods.

        :returns: ``(True, result)``, or ``(False, None)`` when the call did
            not go (nothing was sent): make it through the reactor thread.
        :raises Exception: what the call fails with.
        """
        session = self.multiengine._session
        if session is None or kwargs.keys() - {"targets"}:
            return False, None
        if method == "execute" and len(args) == 2 and type(args[0]) is str and not kwargs:
            return self._send_blocking(session, "execute", "execute", args, None)
        if method == "apply" and args and callable(args[0]) and "targets" in kwargs:
            # (the payload MapTask(f, args).to_spec() makes, without its flags)
            payload = serialize(MapTaskBody(args[0], args[1:], {}))
            return self._send_blocking(
                session, "apply", "apply_serialized", (payload, kwargs["targets"]), _open_results
            )
        if method == "push" and len(args) == 2 and type(args[0]) is dict and not kwargs:
            namespace = serialize_namespace(args[0])
            return self._send_blocking(
                session, "push", "push_serialized", (namespace, args[1]), None
            )
        if method == "pull" and len(args) == 2 and not kwargs:
            keys = args[0]
            if isinstance(keys, str):
                return self._send_blocking(session, "pull", "pull_serialized", args, _open_each)
            if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
                return self._send_blocking(session, "pull", "pull_serialized", args, _open_lists)
        return False, None

    def _send_blocking(
        self,
        session: Any,
        name: str,
        remote_method: str,
        args: tuple,
        opener: Callable[[Any], Any] | None,
    ) -> tuple[bool, Any]:
        check_sendable(args, remote_method)
        waiter = session.proto.call_from_thread(session.oid, remote_method, args, {"block": True})
        try:
            if waiter is None:
                # Not small, or the connection is busy: through the reactor
                # thread, with what is already serialized.
                value = reactorthread.blocking_call(self.multiengine._mux, remote_method, *args)
            else:
                waiter.wait()
                if waiter.failed:
                    translate_transport_failure(waiter.value, remote_method).raiseException()
                value = unpackage(waiter.value)
        except CompositeError as e:
            e.message = f"one or more exceptions from call to method: {name}"
            raise
        return True, (value if opener is None else opener(value))


def _open_each(blobs: list) -> list:
    return [open_blob(b) for b in blobs]


def _open_lists(blobs: list) -> list:
    return [[open_blob(b) for b in per_engine] for per_engine in blobs]


def _open_results(results: list) -> list:
    return [open_blob(r["result"]) for r in results]


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
