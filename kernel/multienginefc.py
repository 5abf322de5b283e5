"""The multiengine interface over Foolscap.

The halves themselves live in :mod:`kernel.multiengineremote` (no Foolscap,
shared with the native and PB adapters); this module adds Foolscap's
``Referenceable`` and ``RemoteInterface`` layer on top of them.

Server half (controller process)
    :class:`FCSynchronousMultiEngineFromMultiEngine` is a Foolscap
    ``Referenceable`` exposing one client's
    :class:`~kernel.multiengine.SynchronousMultiEngine` as
    :class:`RIMultiEngine`. The controller publishes one (build it with
    :func:`make_client_referenceable` and register it as ``multiengine.furl``);
    each client calls its ``connect`` method to get a session of its own, so
    pending results and ``clear_pending_deferreds`` are per client. Only the
    ``*_serialized`` data methods (``apply_serialized`` for function calls)
    are exposed: the controller routes
    :class:`~kernel.serialized.Serialized` blobs and never unpickles user data.

Client half (client process)
    :class:`FCFullSynchronousMultiEngineClient` implements
    :class:`~kernel.interfaces.ISynchronousMultiEngine`,
    :class:`~kernel.interfaces.IMultiEngineCoordinator` and
    :class:`~kernel.interfaces.IMultiEngineExtras` over a RemoteReference to
    the published object. It is the core's own caller-side code running in the
    client: :class:`FCMultiEngine` is the core's
    :class:`~kernel.multiengine.MultiEngineCallerMixin` over engine methods
    that cross the wire, so ``push`` serializes once here, ``pull`` and
    ``gather`` deserialize here (on writable copies of the buffers), and
    ``scatter``/``raw_map``/``map`` partition here with :mod:`kernel.map`
    exactly as in process. Failures come back as the original exception types
    (a :class:`~kernel.error.CompositeError` holding each engine's
    :class:`~kernel.error.RemoteError`, whose ``raise_exception`` re-raises the
    engine's own exception type). Engines' output can be streamed to the
    client as it is written (``add_output_observer``).

Pending results (``block=False``) of this client are kept in the client, by
the same :class:`~kernel.pendingdeferred.PendingDeferredManager` the core uses:
they belong to the client that asked and cost the controller nothing. The
server half also honours ``block=False`` and ``get_pending_deferred`` for
clients that prefer to leave results on the controller.
"""

from __future__ import annotations

from typing import Any

from foolscap.api import (
    DeadReferenceError,
    Referenceable,
    RemoteInterface,
    flushEventualQueue,
)
from zope.interface import implementer

from kernel.fcutil import Anything, Flag, Name, SerializedNamespace, Source, Text
from kernel.multiengineremote import (
    CLIENT_NAME,
    FullSynchronousMultiEngineClient,
    OutputReceiver,
    RemoteMultiEngine,
    SynchronousMultiEngineFromMultiEngine,
)

__all__ = [
    "CLIENT_NAME",
    "RIMultiEngine",
    "RIOutputObserver",
    "FCSynchronousMultiEngineFromMultiEngine",
    "make_client_referenceable",
    "FCMultiEngine",
    "FCFullSynchronousMultiEngineClient",
]


class RIOutputObserver(RemoteInterface):
    """A client's receiver of engines' streamed stdout/stderr."""

    __remote_name__ = "RIOutputObserver.txkernel"

    def output(engine_id=int, stream_name=Name, text=Text):
        return None


class RIMultiEngine(RemoteInterface):
    """One client's synchronous multiengine, as seen over Foolscap.

    Every method but ``connect`` and ``get_client_name`` answers with an
    envelope (:func:`kernel.fcutil.package_success` /
    :func:`~kernel.fcutil.package_failure`). ``targets`` and ``keys`` vary in
    type and are validated by the core.
    """

    __remote_name__ = "RIMultiEngine.txkernel"

    def connect():
        """A new session (an RIMultiEngine) with pending results of its own."""
        return Anything

    def get_client_name():
        """The fully qualified name of the client class to use."""
        return str

    def execute(lines=Source, targets=Anything, block=Flag):
        return Anything

    def push_serialized(namespace=SerializedNamespace, targets=Anything, block=Flag):
        return Anything

    def pull_serialized(keys=Anything, targets=Anything, block=Flag):
        return Anything

    def apply_serialized(payload=Anything, targets=Anything, block=Flag):
        """``payload`` is a Serialized copyable (its frames checked by its
        own state schema); the core refuses anything else."""
        return Anything

    def get_result(i=Anything, targets=Anything, block=Flag):
        return Anything

    def reset(targets=Anything, block=Flag):
        return Anything

    def keys(targets=Anything, block=Flag):
        return Anything

    def kill(controller=Flag, targets=Anything, block=Flag):
        return Anything

    def clear_queue(targets=Anything, block=Flag):
        return Anything

    def queue_status(targets=Anything, block=Flag):
        return Anything

    def set_properties(properties=Anything, targets=Anything, block=Flag):
        return Anything

    def get_properties(keys=Anything, targets=Anything, block=Flag):
        return Anything

    def del_properties(keys=Anything, targets=Anything, block=Flag):
        return Anything

    def has_properties(keys=Anything, targets=Anything, block=Flag):
        return Anything

    def clear_properties(targets=Anything, block=Flag):
        return Anything

    def get_ids(block=Flag):
        return Anything

    def get_pending_deferred(deferred_id=Anything, block=Flag):
        return Anything

    def clear_pending_deferreds():
        return Anything

    def add_output_observer(observer=RIOutputObserver):
        """Stream engines' output to ``observer``; fires whether the
        controller can (an envelope around a bool)."""
        return Anything

    def remove_output_observer(observer=RIOutputObserver):
        return Anything


# ---------------------------------------------------------------------------
# Server half
# ---------------------------------------------------------------------------


@implementer(RIMultiEngine)
class FCSynchronousMultiEngineFromMultiEngine(SynchronousMultiEngineFromMultiEngine, Referenceable):
    """Expose a multiengine to one Foolscap client (server half): a
    :class:`~kernel.multiengineremote.SynchronousMultiEngineFromMultiEngine`
    as an :class:`RIMultiEngine` Referenceable.

    :param multiengine: the controller's core
        :class:`~kernel.multiengine.MultiEngine` (shared by every session).
    :param output: where engines' streamed output comes from (the
        controller's :class:`~kernel.enginefc.FCEngineRegistrar`), or None.
    """

    _lost = (DeadReferenceError,)


def make_client_referenceable(
    multiengine: Any, output: Any = None
) -> FCSynchronousMultiEngineFromMultiEngine:
    """The object a controller publishes as ``multiengine.furl``.

    :param multiengine: the controller's :class:`~kernel.multiengine.MultiEngine`.
    :param output: the source of engines' streamed output (the controller's
        :class:`~kernel.enginefc.FCEngineRegistrar`), or None.
    :returns: a Referenceable; clients connect to it and open their own sessions.
    """
    return FCSynchronousMultiEngineFromMultiEngine(multiengine, output)


# ---------------------------------------------------------------------------
# Client half
# ---------------------------------------------------------------------------


@implementer(RIOutputObserver)
class _OutputReceiver(OutputReceiver, Referenceable):
    """Receives streamed output in the client and hands it to local observers."""


class FCMultiEngine(RemoteMultiEngine):
    """A remote controller's multiengine over Foolscap, as a
    Deferred-returning IMultiEngine (see
    :class:`~kernel.multiengineremote.RemoteMultiEngine`).

    :param remote_reference: a RemoteReference to an :class:`RIMultiEngine`
        (what ``multiengine.furl`` names); a private session is opened on it
        at the first call.
    """

    receiver_class = _OutputReceiver

    async def _settle_inbound(self) -> None:
        # Foolscap delivers inbound calls (streamed output) a reactor turn
        # after they arrive but replies at once: let the output that came
        # before this reply reach the observers first.
        await flushEventualQueue()


class FCFullSynchronousMultiEngineClient(FullSynchronousMultiEngineClient):
    """The multiengine of a remote controller over Foolscap, for Twisted code
    (client half; see
    :class:`~kernel.multiengineremote.FullSynchronousMultiEngineClient`).

    :param remote_reference: a RemoteReference to the controller's
        :class:`RIMultiEngine` (from ``multiengine.furl``).
    """

    caller_class = FCMultiEngine
