"""The multiengine's server and client halves, shared by every transport.

Nothing here imports Foolscap: a controller or client on the native
transport uses these classes as they are, and :mod:`kernel.multienginefc`
makes them Foolscap Referenceables with RemoteInterfaces (see that module for
how the halves work). An object with ``remote_*`` methods is what every
transport exposes.

Server half (controller process)
    :class:`SynchronousMultiEngineFromMultiEngine`, one client's session over
    the controller's core multiengine (build the published object with
    :func:`make_client_referenceable`).

Client half (client process)
    :class:`FullSynchronousMultiEngineClient` over
    :class:`RemoteMultiEngine`, the core's caller-side code over a reference
    to the server half.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import remotecall
from kernel.engineservice import plain_properties
from kernel.envelope import package_failure, package_success
from kernel.error import InvalidProperty
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngine,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from kernel.multiengine import MultiEngineCallerMixin, SynchronousMultiEngine
from kernel.wiretext import check_sendable

__all__ = [
    "CLIENT_NAME",
    "SynchronousMultiEngineFromMultiEngine",
    "make_client_referenceable",
    "OutputReceiver",
    "RemoteMultiEngine",
    "FullSynchronousMultiEngineClient",
]

#: What ``get_client_name`` answers: the class a client builds over the reference.
CLIENT_NAME = "kernel.multienginefc.FCFullSynchronousMultiEngineClient"


# ---------------------------------------------------------------------------
# Server half
# ---------------------------------------------------------------------------


class SynchronousMultiEngineFromMultiEngine:
    """Expose a multiengine to one client (server half).

    :param multiengine: the controller's core
        :class:`~kernel.multiengine.MultiEngine` (shared by every session).
    :param output: where engines' streamed output comes from: an object with
        ``add_output_observer(f)``/``remove_output_observer(f)`` calling
        ``f(engine_id, stream_name, text)`` (the controller's
        engine registrar), or None when the
        controller cannot stream output.
    :ivar smultiengine: this session's
        :class:`~kernel.multiengine.SynchronousMultiEngine` (its own pending results).
    """

    def __init__(self, multiengine: Any, output: Any = None):
        self.multiengine = multiengine
        self.output = output
        self.smultiengine = SynchronousMultiEngine(multiengine)
        self._forwarders: dict[Any, Any] = {}

    #: What an observer's ``callRemoteOnly`` raises once its connection is
    #: gone (the Foolscap server half adds Foolscap's error).
    _lost: tuple[type[BaseException], ...] = ()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        d = defer.maybeDeferred(getattr(self.smultiengine, method), *args, **kwargs)
        d.addCallbacks(package_success, package_failure)
        return d

    def remote_connect(self) -> SynchronousMultiEngineFromMultiEngine:
        return type(self)(self.multiengine, self.output)

    def remote_get_client_name(self) -> str:
        return CLIENT_NAME

    def remote_execute(self, lines, targets="all", block=True):
        return self._call("execute", lines, targets, block=block)

    def remote_push_serialized(self, namespace, targets="all", block=True):
        return self._call("push_serialized", namespace, targets, block=block)

    def remote_pull_serialized(self, keys, targets="all", block=True):
        return self._call("pull_serialized", keys, targets, block=block)

    def remote_apply_serialized(self, payload, targets="all", block=True):
        return self._call("apply_serialized", payload, targets, block=block)

    def remote_get_result(self, i=None, targets="all", block=True):
        return self._call("get_result", i, targets, block=block)

    def remote_reset(self, targets="all", block=True):
        return self._call("reset", targets, block=block)

    def remote_keys(self, targets="all", block=True):
        return self._call("keys", targets, block=block)

    def remote_kill(self, controller=False, targets="all", block=True):
        return self._call("kill", controller, targets, block=block)

    def remote_clear_queue(self, targets="all", block=True):
        return self._call("clear_queue", targets, block=block)

    def remote_queue_status(self, targets="all", block=True):
        return self._call("queue_status", targets, block=block)

    def remote_set_properties(self, properties, targets="all", block=True):
        return self._call("set_properties", properties, targets, block=block)

    def remote_get_properties(self, keys=None, targets="all", block=True):
        return self._call("get_properties", keys, targets, block=block)

    def remote_del_properties(self, keys, targets="all", block=True):
        return self._call("del_properties", keys, targets, block=block)

    def remote_has_properties(self, keys, targets="all", block=True):
        return self._call("has_properties", keys, targets, block=block)

    def remote_clear_properties(self, targets="all", block=True):
        return self._call("clear_properties", targets, block=block)

    def remote_get_ids(self, block=True):
        return self._call("get_ids", block=block)

    def remote_get_pending_deferred(self, deferred_id, block=True):
        return self._call("get_pending_deferred", deferred_id, block)

    def remote_clear_pending_deferreds(self):
        return self._call("clear_pending_deferreds")

    def remote_add_output_observer(self, observer):
        if self.output is None:
            return package_success(False)
        if observer not in self._forwarders:

            def forward(engine_id: int, stream_name: str, text: str) -> None:
                try:
                    observer.callRemoteOnly("output", engine_id, stream_name, text)
                except self._lost:
                    self._drop_observer(observer)

            self._forwarders[observer] = forward
            self.output.add_output_observer(forward)
            observer.notifyOnDisconnect(self._drop_observer, observer)
        return package_success(True)

    def remote_remove_output_observer(self, observer):
        self._drop_observer(observer)
        return package_success(None)

    def _drop_observer(self, observer: Any) -> None:
        forward = self._forwarders.pop(observer, None)
        if forward is not None and self.output is not None:
            try:
                self.output.remove_output_observer(forward)
            except ValueError:
                pass


def make_client_referenceable(
    multiengine: Any, output: Any = None
) -> SynchronousMultiEngineFromMultiEngine:
    """The object a controller publishes as ``multiengine.furl``.

    :param multiengine: the controller's :class:`~kernel.multiengine.MultiEngine`.
    :param output: the source of engines' streamed output (the controller's
        engine registrar), or None.
    :returns: an object with ``remote_*`` methods; clients connect to it and
        open their own sessions.
    """
    return SynchronousMultiEngineFromMultiEngine(multiengine, output)


# ---------------------------------------------------------------------------
# Client half
# ---------------------------------------------------------------------------


class OutputReceiver:
    """Receives streamed output in the client and hands it to local observers."""

    def __init__(self) -> None:
        self.observers: list[Callable[[int, str, str], Any]] = []

    def remote_output(self, engine_id, stream_name, text):
        for observer in list(self.observers):
            try:
                observer(engine_id, stream_name, text)
            except Exception:
                log.err(None, f"output observer {observer!r} failed")


@implementer(IMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras)
class RemoteMultiEngine(MultiEngineCallerMixin):
    """A remote controller's multiengine, as a Deferred-returning IMultiEngine.

    The engine methods are one multiplexed remote call each (the controller
    fans it out). ``push``/``pull``, the coordinator and the extras are the
    core's :class:`~kernel.multiengine.MultiEngineCallerMixin`, running here
    over those calls: values are serialized and opened in this process, and
    ``scatter``/``raw_map`` send each engine its own block with ``targets=id``.

    :param remote_reference: a reference to the controller's server half (a
        :class:`SynchronousMultiEngineFromMultiEngine`); a private session is
        opened on it at the first call.
    """

    #: The class of this client's receiver of streamed output.
    receiver_class: type = OutputReceiver

    def __init__(self, remote_reference: Any):
        self.remote_reference = remote_reference
        self._session: Any = None
        self._session_waiters: list[defer.Deferred] = []
        self._receiver = self.receiver_class()

    # -- the wire ----------------------------------------------------------

    async def _get_session(self) -> Any:
        """This client's session reference (opened by ``connect`` on first use)."""
        if self._session is not None:
            return self._session
        waiter: defer.Deferred = defer.Deferred()
        self._session_waiters.append(waiter)
        if len(self._session_waiters) == 1:
            d = defer.maybeDeferred(self.remote_reference.callRemote, "connect")
            d.addErrback(remotecall.translate_transport_failure, "connect")
            d.addBoth(self._connected)
        return await waiter

    def _connected(self, result: Any) -> None:
        waiters, self._session_waiters = self._session_waiters, []
        if not isinstance(result, Failure):
            self._session = result
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)

    async def _remote(self, method: str, *args: Any) -> Any:
        # Foolscap drops the connection (and every call on it) on text it
        # cannot encode: refuse such a call alone, before it is sent.
        check_sendable(args, method)
        session = await self._get_session()
        try:
            return await remotecall.call_remote(session, method, *args, block=True)
        finally:
            if self._receiver.observers:
                await self._settle_inbound()

    async def _settle_inbound(self) -> None:
        """Let inbound calls (streamed output) that arrived before a reply
        reach the observers first. Nothing to wait for here; a transport
        that delivers them later overrides this."""

    # -- one multiplexed call each ---------------------------------------

    def _mux(self, method: str, *args: Any) -> defer.Deferred:
        return defer.ensureDeferred(self._remote(method, *args))

    def execute(self, lines: str, targets: Any = "all") -> defer.Deferred:
        """Run ``lines`` on each target; fire the result dicts."""
        if not isinstance(lines, str):
            return defer.fail(
                TypeError(f"execute takes Python source as a str, not {type(lines).__name__}")
            )
        return self._mux("execute", lines, targets)

    def push_serialized(self, namespace: dict[str, Any], targets: Any = "all") -> defer.Deferred:
        """Send ``name: Serialized`` pairs to each target, unopened."""
        return self._mux("push_serialized", namespace, targets)

    def pull_serialized(self, keys: Any, targets: Any = "all") -> defer.Deferred:
        """Fire one Serialized (or list of them) per target, unopened."""
        return self._mux("pull_serialized", keys, targets)

    def apply_serialized(self, payload: Any, targets: Any = "all") -> defer.Deferred:
        """Run the Serialized task body ``payload`` on each target; fire the
        ``run_task`` result dicts (``result`` unopened)."""
        return self._mux("apply_serialized", payload, targets)

    def get_result(self, i: int | None = None, targets: Any = "all") -> defer.Deferred:
        """Fire each target's result dict of command ``i`` (None: the latest)."""
        return self._mux("get_result", i, targets)

    def reset(self, targets: Any = "all") -> defer.Deferred:
        """Clear each target's namespace."""
        return self._mux("reset", targets)

    def keys(self, targets: Any = "all") -> defer.Deferred:
        """Fire each target's sorted list of names."""
        return self._mux("keys", targets)

    def kill(self, controller: bool = False, targets: Any = "all") -> defer.Deferred:
        """Kill the targets (and then the controller, when ``controller``)."""
        return self._mux("kill", controller, targets)

    def clear_queue(self, targets: Any = "all") -> defer.Deferred:
        """Drop the commands waiting in each target's queue."""
        return self._mux("clear_queue", targets)

    def queue_status(self, targets: Any = "all") -> defer.Deferred:
        """Fire ``(engine_id, status)`` pairs."""
        return self._mux("queue_status", targets)

    def set_properties(self, properties: dict[str, Any], targets: Any = "all") -> defer.Deferred:
        """Update each target's properties (plain data only)."""
        try:
            # refused here with the engine's own message, before the transport
            plain_properties(properties)
        except InvalidProperty as e:
            return defer.fail(e)
        return self._mux("set_properties", properties, targets)

    def get_properties(self, keys: Any = None, targets: Any = "all") -> defer.Deferred:
        """Fire each target's properties dict."""
        return self._mux("get_properties", keys, targets)

    def del_properties(self, keys: Any, targets: Any = "all") -> defer.Deferred:
        """Remove the named properties on each target."""
        return self._mux("del_properties", keys, targets)

    def has_properties(self, keys: Any, targets: Any = "all") -> defer.Deferred:
        """Fire, per target, one bool per key."""
        return self._mux("has_properties", keys, targets)

    def clear_properties(self, targets: Any = "all") -> defer.Deferred:
        """Remove every property on each target."""
        return self._mux("clear_properties", targets)

    def get_ids(self) -> defer.Deferred:
        """Fire the sorted list of registered engine ids."""
        return self._mux("get_ids")

    # -- streamed output ---------------------------------------------------

    def add_output_observer(self, observer: Callable[[int, str, str], Any]) -> defer.Deferred:
        """Call ``observer(engine_id, stream_name, text)`` with the engines'
        stdout and stderr as they are written (before the command's result
        arrives).

        :returns: Deferred firing True, or False if this controller (or the
            transport) cannot stream output; the output still comes in each
            result dict.
        """

        async def go() -> bool:
            receiver = self._receiver
            first = not receiver.observers
            receiver.observers.append(observer)
            if not first:
                return True
            try:
                session = await self._get_session()
                ok = await remotecall.call_remote(session, "add_output_observer", receiver)
            except Exception as e:
                # A transport that cannot carry the receiver: no streaming,
                # the output still comes in each result dict.
                log.msg(f"engine output cannot be streamed here: {e}")
                ok = False
            if not ok:
                receiver.observers.remove(observer)
            return bool(ok)

        return defer.ensureDeferred(go())

    def remove_output_observer(self, observer: Callable[[int, str, str], Any]) -> defer.Deferred:
        """Stop calling ``observer``. Fires None."""

        async def go() -> None:
            receiver = self._receiver
            if observer in receiver.observers:
                receiver.observers.remove(observer)
            if not receiver.observers and self._session is not None:
                await remotecall.call_remote(self._session, "remove_output_observer", receiver)

        return defer.ensureDeferred(go())


@implementer(
    ISynchronousMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras, IBlockingClientAdaptor
)
class FullSynchronousMultiEngineClient(SynchronousMultiEngine):
    """The multiengine of a remote controller, for Twisted code (client half).

    Every method of :class:`~kernel.interfaces.ISynchronousMultiEngine`, the
    coordinator (``scatter``, ``gather``, ``raw_map``, ``map``, ``mapper``,
    ``parallel``) and the extras (``zip_pull``, ``run``), each returning a
    Deferred; ``block=False`` fires a pending id kept in this client.

    :param remote_reference: a reference to the controller's server half.
    """

    #: The caller-side multiengine this client drives.
    caller_class: type = RemoteMultiEngine

    def __init__(self, remote_reference: Any):
        super().__init__(self.caller_class(remote_reference))
        self.remote_reference = remote_reference

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.remote_reference!r}>"

    def add_output_observer(self, observer: Callable[[int, str, str], Any]) -> defer.Deferred:
        """See :meth:`RemoteMultiEngine.add_output_observer`."""
        return self.multiengine.add_output_observer(observer)

    def remove_output_observer(self, observer: Callable[[int, str, str], Any]) -> defer.Deferred:
        """See :meth:`RemoteMultiEngine.remove_output_observer`."""
        return self.multiengine.remove_output_observer(observer)

    def adapt_to_blocking_client(self) -> Any:
        """Wrap self in a blocking client
        (:class:`kernel.multiengineclient.FullBlockingMultiEngineClient`) that
        drives this one through the reactor thread."""
        from kernel.multiengineclient import FullBlockingMultiEngineClient

        return FullBlockingMultiEngineClient(self)
