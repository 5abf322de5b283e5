"""Engines in other processes, whatever the transport: the pieces every adapter shares.

The transport-independent halves of the engine adapters (no Foolscap, no PB,
no sockets here): :mod:`kernel.enginefc` makes them Foolscap ``Referenceable``
objects with ``RemoteInterface`` schemas, :mod:`kernel.enginenative` carries
them over :mod:`kernel.nativeproto`. A process that uses only the native
transport never imports Foolscap.

- :class:`EngineReferenceFromService` (engine process): the ``remote_*``
  methods exposing an :class:`~kernel.interfaces.IEngineBase` engine. Data
  moves only as serialized blobs; every reply is an envelope of
  :mod:`kernel.envelope`. Streams the engine's output to a sink, coalesced
  every :data:`OUTPUT_DELAY` seconds.
- :class:`EngineFromReference` (controller): implements ``IEngineBase``,
  ``IEngineInterrupt`` and ``IEngineTasks`` over the engine's remote
  reference; payloads stay :class:`~kernel.serialized.Serialized`, so the
  controller never unpickles user data; a lost connection fails the call
  with :class:`~kernel.error.EngineError`.
- :class:`EngineRegistrar` (controller) and :class:`EngineConnector` (engine):
  the engine connects, registers (asking for its previous id on
  re-registration) and reconnects with exponential backoff; the controller
  unregisters it on connection loss or missed heartbeats.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import serialized
from kernel.envelope import open_plain, package_engine_failure, package_success
from kernel.error import ConnectionError, EngineError, SecurityError
from kernel.interfaces import IEngineBase, IEngineInterrupt, IEngineTasks
from kernel.serialized import Serialized

__all__ = [
    "CONNECTION_LOST",
    "OUTPUT_DELAY",
    "EngineConnector",
    "EngineFromReference",
    "EngineReferenceFromService",
    "EngineRegistrar",
    "OutputSink",
    "is_refused_furl",
]

#: Seconds an engine gathers output before streaming it to the controller.
OUTPUT_DELAY = 0.05


# ---------------------------------------------------------------------------
# Envelopes
# ---------------------------------------------------------------------------


def _malformed(reply: Any) -> EngineError:
    return EngineError(f"malformed reply from an engine: {reply!r:.200}")


def _open(reply: Any) -> Any:
    """Unwrap an envelope: the value, or raise the engine's :class:`RemoteError`
    (never unpickled here)."""
    return open_plain(reply, _malformed)


def _blob(s: Serialized) -> bytes:
    return s.to_bytes()


def _unblob(b: bytes) -> Serialized:
    return Serialized.from_bytes(b)


# ---------------------------------------------------------------------------
# Server half: in the engine process
# ---------------------------------------------------------------------------


class EngineReferenceFromService:
    """Expose an engine (``IEngineBase`` + ``IEngineInterrupt`` + ``IEngineTasks``)
    to a controller: the ``remote_*`` methods a transport calls.

    Only delegates: each ``remote_*`` method calls the engine and wraps the
    outcome in an envelope.

    :param engine: the engine service.
    :param on_kill: called (with no arguments) after the engine has been
        killed remotely; an engine process uses it to stop its reactor.
    """

    def __init__(self, engine: Any, on_kill: Callable[[], Any] | None = None):
        self.engine = engine
        self.on_kill = on_kill
        self._sink: Any = None
        self._observing = False
        self._chunks: list[tuple[str, str]] = []
        self._flush_call: Any = None

    def _call(self, method: str, *args: Any, convert: Callable | None = None, **kwargs: Any):
        d = defer.maybeDeferred(getattr(self.engine, method), *args, **kwargs)
        if convert is not None:
            d.addCallback(convert)
        d.addCallbacks(package_success, package_engine_failure)
        d.addCallback(self._flush_before_reply)
        return d

    def _flush_before_reply(self, reply: Any) -> Any:
        """Send the output still being coalesced ahead of ``reply``."""
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush()
        return reply

    def remote_execute(self, lines):
        return self._call("execute", lines)

    def remote_push_serialized(self, namespace):
        try:
            ns = {k: _unblob(v) for k, v in namespace.items()}
        except Exception:
            return package_engine_failure(Failure())
        return self._call("push_serialized", ns)

    def remote_pull_serialized(self, keys):
        def convert(result):
            if isinstance(keys, str):
                return _blob(result)
            return [_blob(s) for s in result]

        return self._call("pull_serialized", keys, convert=convert)

    def remote_get_result(self, i=None):
        return self._call("get_result", i)

    def remote_reset(self):
        return self._call("reset")

    def remote_keys(self):
        return self._call("keys")

    def remote_kill(self):
        d = self._call("kill")
        if self.on_kill is not None:
            # Answer first, then go away.
            from twisted.internet import reactor

            d.addBoth(lambda r: (reactor.callLater(0.05, self.on_kill), r)[1])
        return d

    def remote_interrupt(self):
        return self._call("interrupt")

    def remote_set_properties(self, properties):
        return self._call("set_properties", properties)

    def remote_get_properties(self, keys=None):
        return self._call("get_properties", keys)

    def remote_del_properties(self, keys):
        return self._call("del_properties", keys)

    def remote_has_properties(self, keys):
        return self._call("has_properties", keys)

    def remote_clear_properties(self):
        return self._call("clear_properties")

    def remote_run_task(self, payload, clear_before=False, clear_after=False):
        def convert(result):
            result = dict(result)
            result["result"] = _blob(result["result"])
            return result

        try:
            body = _unblob(payload)
        except Exception:
            return package_engine_failure(Failure())
        return self._call(
            "run_task", body, clear_before=clear_before, clear_after=clear_after, convert=convert
        )

    def remote_ping(self):
        return package_success("pong")

    # -- streaming output ----------------------------------------------------

    def remote_set_output_sink(self, sink):
        add = getattr(self.engine, "add_output_observer", None)
        if add is None:
            return package_success(False)
        self._sink = sink
        if not self._observing:
            add(self._output)
            self._observing = True
        return package_success(True)

    def _output(self, stream_name: str, text: str) -> None:
        if self._sink is None:
            return
        if self._chunks and self._chunks[-1][0] == stream_name:
            self._chunks[-1] = (stream_name, self._chunks[-1][1] + text)
        else:
            self._chunks.append((stream_name, text))
        if self._flush_call is None:
            from twisted.internet import reactor

            # Coalesce what is written in a burst into one message.
            self._flush_call = reactor.callLater(OUTPUT_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        chunks, self._chunks = self._chunks, []
        sink = self._sink
        if not chunks or sink is None:
            return
        d = defer.maybeDeferred(sink.callRemote, "write", chunks)
        d.addErrback(self._sink_failed, sink)

    def _sink_failed(self, f: Failure, sink: Any) -> None:
        # The controller went away; a new registration brings a new sink.
        if self._sink is sink:
            self._sink = None


# ---------------------------------------------------------------------------
# Client half: in the controller
# ---------------------------------------------------------------------------

#: Failures that mean the engine's connection is gone.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    error.ConnectionLost,
    error.ConnectionDone,
    error.ConnectionRefusedError,
)


@implementer(IEngineBase, IEngineInterrupt, IEngineTasks)
class EngineFromReference:
    """An engine in another process, used through a remote reference.

    Implements the engine interfaces over the remote methods of
    :class:`EngineReferenceFromService` (``reference.callRemote``). Data methods move
    :class:`~kernel.serialized.Serialized` blobs and never open them, so the
    controller can route user data it cannot import. Plain :meth:`push` and
    :meth:`pull` exist for completeness (they serialize on *this* side);
    the controller uses only the serialized forms.

    :param reference: the engine's remote reference.
    :param properties: the properties the engine advertised when it registered.
    """

    def __init__(self, reference: Any, properties: dict | None = None):
        self.reference = reference
        self.id: int | None = None
        self.properties: dict = dict(properties or {})
        self._streaming = False

    def __repr__(self) -> str:
        return f"<EngineFromReference id={self.id}>"

    #: Failures that mean the engine's connection is gone (a transport adds its own).
    connection_lost: tuple[type[BaseException], ...] = CONNECTION_LOST

    def _call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        d = defer.maybeDeferred(self.reference.callRemote, method, *args, **kwargs)
        if self._streaming:
            # Output the engine wrote before replying is relayed first.
            d.addBoth(self._after_output)
        d.addCallbacks(_open, self._translate)
        return d

    def _after_output(self, result: Any) -> Any:
        """Pass ``result`` on once output received with it has been relayed
        (here: at once; a transport that delivers inbound calls later
        overrides this)."""
        return result

    def _translate(self, f: Failure):
        if f.check(*self.connection_lost):
            raise EngineError(
                f"engine {self.id} disconnected ({f.getErrorMessage()}); "
                "its work was lost — resubmit it to another engine"
            )
        return f

    # IEngineCore
    def execute(self, lines: str) -> defer.Deferred:
        """Run ``lines`` on the engine; fires the result dict."""
        return self._call("execute", lines)

    def push(self, namespace: dict) -> defer.Deferred:
        """Serialize ``namespace`` here and push it (see :meth:`push_serialized`)."""
        try:
            ns = serialized.serialize_namespace(namespace)
        except Exception:
            return defer.fail()
        return self.push_serialized(ns)

    def pull(self, keys: str | list[str]) -> defer.Deferred:
        """Pull and deserialize here (see :meth:`pull_serialized`)."""
        d = self.pull_serialized(keys)
        if isinstance(keys, str):
            d.addCallback(serialized.deserialize)
        else:
            d.addCallback(lambda ss: [serialized.deserialize(s) for s in ss])
        return d

    push_function = push
    pull_function = pull

    def get_result(self, i: int | None = None) -> defer.Deferred:
        """Fire the engine's result dict of command ``i``."""
        return self._call("get_result", i)

    def reset(self) -> defer.Deferred:
        """Clear the engine's namespace."""
        return self._call("reset")

    def keys(self) -> defer.Deferred:
        """Fire the sorted names in the engine's namespace."""
        return self._call("keys")

    def kill(self) -> defer.Deferred:
        """Stop the engine process. Fires None (a connection lost while it
        stops counts as success)."""
        d = self._call("kill")
        d.addErrback(lambda f: f.trap(EngineError) and None)
        return d

    # IEngineSerialized
    def push_serialized(self, namespace: dict[str, Serialized]) -> defer.Deferred:
        """Push ``name: Serialized`` pairs, unopened."""
        try:
            wire = {k: _blob(v) for k, v in namespace.items()}
        except Exception:
            return defer.fail()
        return self._call("push_serialized", wire)

    def pull_serialized(self, keys: str | list[str]) -> defer.Deferred:
        """Fire a Serialized (``keys`` a str) or a list of them, unopened."""
        d = self._call("pull_serialized", keys if isinstance(keys, str) else list(keys))
        if isinstance(keys, str):
            d.addCallback(_unblob)
        else:
            d.addCallback(lambda bs: [_unblob(b) for b in bs])
        return d

    # IEngineProperties
    def set_properties(self, properties: dict) -> defer.Deferred:
        """Update the engine's properties (plain data)."""
        d = self._call("set_properties", properties)
        d.addCallback(lambda r: (self.properties.update(properties), r)[1])
        return d

    def get_properties(self, keys: list[str] | None = None) -> defer.Deferred:
        """Fire a dict of the named properties (all when ``keys`` is None)."""
        return self._call("get_properties", None if keys is None else _names(keys))

    def del_properties(self, keys: list[str]) -> defer.Deferred:
        """Remove the named properties."""
        d = self._call("del_properties", _names(keys))

        def forget(r):
            for k in [keys] if isinstance(keys, str) else keys:
                self.properties.pop(k, None)
            return r

        d.addCallback(forget)
        return d

    def has_properties(self, keys: list[str]) -> defer.Deferred:
        """Fire a list of bools, one per key."""
        return self._call("has_properties", _names(keys))

    def clear_properties(self) -> defer.Deferred:
        """Remove every property."""
        d = self._call("clear_properties")
        d.addCallback(lambda r: (self.properties.clear(), r)[1])
        return d

    # IEngineInterrupt
    def interrupt(self) -> defer.Deferred:
        """Interrupt the engine's running command; fires True if there was one."""
        return self._call("interrupt")

    # IEngineTasks
    def run_task(
        self, payload: Serialized, clear_before: bool = False, clear_after: bool = False
    ) -> defer.Deferred:
        """Run a task body on the engine; fires its result dict with
        ``result`` a Serialized (unopened)."""

        def convert(result):
            result = dict(result)
            result["result"] = _unblob(result["result"])
            return result

        try:
            wire = _blob(payload)
        except Exception:
            return defer.fail()
        d = self._call(
            "run_task", wire, clear_before=bool(clear_before), clear_after=bool(clear_after)
        )
        d.addCallback(convert)
        return d

    # liveness
    def ping(self) -> defer.Deferred:
        """Fire when the engine answers (used by the heartbeat monitor)."""
        return self._call("ping")

    def set_output_sink(self, sink: Any) -> defer.Deferred:
        """Have the engine stream its stdout/stderr to ``sink`` (a
        object with ``remote_write(chunks)``). Fires True if the engine
        can stream its output."""
        self._streaming = True
        return self._call("set_output_sink", sink)

    def disconnect(self) -> None:
        """Drop the connection to the engine (after it was declared dead), so
        that a merely paused engine notices and registers again."""
        try:
            transport = self.reference.tracker.broker.transport
        except AttributeError:
            return
        abort = getattr(transport, "abortConnection", None)
        (abort or transport.loseConnection)()


def _names(keys: str | list[str]) -> str | list[str]:
    return keys if isinstance(keys, str) else list(keys)


# ---------------------------------------------------------------------------
# Registration: controller side
# ---------------------------------------------------------------------------


class OutputSink:
    """Receives one engine's streamed output on the controller.

    :param engine_id: the engine it belongs to (fixed: an engine cannot speak
        for another).
    :param observers: the list of ``observer(engine_id, stream_name, text)``
        callables to call (shared with the registrar, so later observers see
        the output too).
    """

    def __init__(self, engine_id: int, observers: list[Callable[[int, str, str], Any]]):
        self.engine_id = engine_id
        self.observers = observers

    def remote_write(self, chunks):
        for stream_name, text in chunks:
            for observer in list(self.observers):
                try:
                    observer(self.engine_id, str(stream_name), str(text))
                except Exception:
                    log.err(None, f"output observer {observer!r} failed")


class EngineRegistrar:
    """The controller's registration desk for engines (its ``remote_*`` method
    is what a transport exposes, e.g. behind ``engine.furl``).

    Each registering engine is wrapped as
    ``QueuedEngine(EngineFromReference(ref))`` and registered with the
    controller; it is unregistered (so its queued and running work fails with
    :class:`~kernel.error.EngineError`) when its connection drops or, if a
    ``monitor`` is given, when it misses heartbeats.

    :param controller: an :class:`~kernel.interfaces.IControllerCore`.
    :param monitor: a :class:`~kernel.heartbeat.HeartMonitor`, or None.
    :param wrap: turns an :class:`EngineFromReference` into what gets
        registered (default: :class:`kernel.engineservice.QueuedEngine`).
    :param on_change: an object told of each change, with methods
        ``engine_added(engine_id, info)`` (``info`` a plain dict: ``pid``,
        ``ip``, ``port``) and ``engine_removed(engine_id)``; or None.
    """

    def __init__(
        self,
        controller: Any,
        monitor: Any = None,
        wrap: Callable | None = None,
        on_change: Any = None,
    ):
        self.controller = controller
        self.monitor = monitor
        self.on_change = on_change
        self._output_observers: list[Callable[[int, str, str], Any]] = []
        if monitor is not None:
            monitor.on_dead = self._dead
        self._wrap = wrap
        # engine id -> (registered object, EngineFromReference)
        self._connected: dict[int, tuple[Any, EngineFromReference]] = {}

    def _wrapper(self) -> Callable:
        if self._wrap is None:
            from kernel.engineservice import QueuedEngine

            self._wrap = QueuedEngine
        return self._wrap

    #: The controller-side engine built over each registering engine's
    #: reference (a transport may use a subclass).
    engine_class: type = EngineFromReference
    #: What receives an engine's streamed output (a transport may use a subclass).
    sink_class: type = OutputSink

    def remote_register_engine(self, engine_reference, id=None, pid=None, properties=None):
        remote = self.engine_class(engine_reference, properties)
        engine = self._wrapper()(remote)
        try:
            peer = engine_reference.getPeer()
            ip, port = getattr(peer, "host", None), getattr(peer, "port", None)
        except Exception:
            ip = port = None
        engine_id = self.controller.register_engine(engine, id=id, ip=ip, port=port, pid=pid)["id"]
        remote.id = engine_id
        self._connected[engine_id] = (engine, remote)
        engine_reference.notifyOnDisconnect(self._disconnected, engine_id, engine)
        if self.monitor is not None:
            self.monitor.add(engine_id, remote.ping)
        if self.on_change is not None:
            self.on_change.engine_added(engine_id, {"pid": pid, "ip": ip, "port": port})
        if self._output_observers:
            self._stream_output(engine_id, remote)
        return engine_id

    def _disconnected(self, engine_id: int, engine: Any) -> None:
        self._forget(engine_id, engine, f"engine {engine_id} lost its connection")

    def _dead(self, engine_id: int, reason: Failure) -> None:
        entry = self._connected.get(engine_id)
        if entry is None:
            return
        engine, remote = entry
        self._forget(engine_id, engine, reason.getErrorMessage())
        remote.disconnect()

    def _forget(self, engine_id: int, engine: Any, why: str) -> None:
        if self._connected.get(engine_id, (None,))[0] is not engine:
            return  # already handled, or the id now belongs to a newer engine
        del self._connected[engine_id]
        if self.monitor is not None:
            self.monitor.remove(engine_id)
        log.msg(f"unregistering engine {engine_id}: {why}")
        if self.controller.engines.get(engine_id) is engine:
            self.controller.unregister_engine(engine_id)
        if self.on_change is not None:
            self.on_change.engine_removed(engine_id)

    def add_output_observer(self, observer: Callable[[int, str, str], Any]) -> None:
        """Call ``observer(engine_id, stream_name, text)`` with every engine's
        stdout/stderr as it is written (streaming starts with the first
        observer, so it costs nothing when nobody listens)."""
        first = not self._output_observers
        self._output_observers.append(observer)
        if first:
            for engine_id, (_, remote) in self._connected.items():
                self._stream_output(engine_id, remote)

    def remove_output_observer(self, observer: Callable[[int, str, str], Any]) -> None:
        """Stop calling ``observer``."""
        self._output_observers.remove(observer)

    def _stream_output(self, engine_id: int, remote: EngineFromReference) -> None:
        sink = self.sink_class(engine_id, self._output_observers)
        d = remote.set_output_sink(sink)
        d.addErrback(lambda f: log.msg(f"engine {engine_id} cannot stream output: {f.value}"))

    def connected_engines(self) -> list[int]:
        """The ids of the engines registered through this registrar, sorted."""
        return sorted(self._connected)


# ---------------------------------------------------------------------------
# Registration: engine side
# ---------------------------------------------------------------------------


def is_refused_furl(f: Failure) -> bool:
    """Does this connection failure mean the controller refused the FURL
    itself (an unknown swissnum), so retrying cannot help?"""
    text = f"{f.getErrorMessage()} {f.type}"
    return "unable to find reference for name" in text or f.check(KeyError) is not None


class EngineConnector(service.Service):
    """Keep an engine registered with a controller.

    Connects to the controller, registers the engine
    (asking for its previous id after a reconnection), and when the
    connection drops or cannot be made, tries again after a delay that
    doubles from ``initial_delay`` up to ``max_delay``.

    :param tub: what finds the controller: anything with
        ``getReference(address)`` firing the registrar's remote reference (a
        Foolscap ``Tub``; a native or PB locator).
    :param get_furl: returns the controller's address (an engine FURL, or a
        transport's connection info); called before each
        attempt, so a rewritten connection file is picked up. If it raises,
        the attempt fails and is retried (a missing file: no controller yet),
        except for :class:`~kernel.error.SecurityError`, which is fatal.
    :param engine: the engine service to expose.
    :param on_fatal: called with a Failure when retrying cannot help: the
        controller refused the FURL (wrong or stale swissnum), or the
        connection file is not private (:class:`~kernel.error.SecurityError`).
    :param on_kill: passed to :attr:`reference_class`.
    """

    #: How the engine is exposed to the controller (a transport may use a subclass).
    reference_class: type = EngineReferenceFromService

    def __init__(
        self,
        tub: Any,
        get_furl: Callable[[], str],
        engine: Any,
        on_fatal: Callable[[Failure], Any] | None = None,
        on_kill: Callable[[], Any] | None = None,
        initial_delay: float = 0.2,
        max_delay: float = 5.0,
        clock: IReactorTime | None = None,
    ):
        if clock is None:
            from twisted.internet import reactor as clock
        self.tub = tub
        self.get_furl = get_furl
        self.engine = engine
        self.reference = self.reference_class(engine, on_kill=on_kill)
        self.on_fatal = on_fatal
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.clock = clock
        self.delay = initial_delay
        self.engine_id: int | None = None
        self.controller: Any = None
        self.registrations = 0
        self._call = None
        self._waiters: list[defer.Deferred] = []

    def startService(self) -> None:
        service.Service.startService(self)
        self._attempt()

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def when_registered(self) -> defer.Deferred:
        """Fire with the engine id once registered (at once if it is now)."""
        if self.controller is not None:
            return defer.succeed(self.engine_id)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _attempt(self) -> None:
        self._call = None
        if not self.running:
            return
        d = defer.maybeDeferred(self.get_furl)
        d.addCallback(self.tub.getReference)
        d.addCallback(self._register)
        d.addErrback(self._failed)

    def _register(self, controller):
        d = controller.callRemote(
            "register_engine",
            self.reference,
            id=self.engine_id,
            pid=os.getpid(),
            properties=_plain_properties(self.engine),
        )

        def registered(engine_id):
            if not self.running:
                return
            self.engine_id = engine_id
            self.engine.id = engine_id
            self.controller = controller
            self.registrations += 1
            self.delay = self.initial_delay
            controller.notifyOnDisconnect(self._lost)
            log.msg(f"registered with the controller as engine {engine_id}")
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(engine_id)

        d.addCallback(registered)
        return d

    def _failed(self, f: Failure) -> None:
        if not self.running:
            return
        if f.check(SecurityError):
            err = f
        elif is_refused_furl(f):
            err = Failure(
                ConnectionError(
                    "the controller refused this engine's FURL (unknown name): the FURL "
                    "is wrong or stale. Use the engine.furl the running controller wrote "
                    "(restart with `txkernel cluster start`)."
                )
            )
        else:
            err = None
        if err is not None:
            # Retrying cannot help: give up loudly.
            log.msg(f"cannot register with the controller: {err.getErrorMessage()}")
            if self.on_fatal is not None:
                self.on_fatal(err)
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.errback(err)
            return
        log.msg(
            f"cannot register with the controller ({f.getErrorMessage()}); "
            f"retrying in {self.delay:.1f} s"
        )
        self._schedule()

    def _lost(self) -> None:
        self.controller = None
        if not self.running:
            return
        log.msg("lost the controller; reconnecting")
        self.delay = self.initial_delay
        self._schedule()

    def _schedule(self) -> None:
        if self._call is not None and self._call.active():
            return
        self._call = self.clock.callLater(self.delay, self._attempt)
        self.delay = min(self.delay * 2, self.max_delay)


def _plain_properties(engine: Any) -> dict:
    props = getattr(engine, "properties", None)
    return dict(props) if isinstance(props, dict) else {}
