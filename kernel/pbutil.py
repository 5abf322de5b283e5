"""Perspective Broker plumbing shared by the PB adapters.

The PB adapters carry the *same* remote protocol as the Foolscap adapters:
the same ``remote_*`` methods, the same plain-data envelopes
(:mod:`kernel.envelope`)
and the same client halves. This module is the bridge that lets those pieces
run over :mod:`twisted.spread.pb` instead of Foolscap:

- :class:`Exposed` (server side) wraps an object with ``remote_*`` methods in a
  :class:`pb.Referenceable`. It checks each call against the object's Foolscap
  ``RemoteInterface`` when it declares one (the method must exist there and its
  arguments must meet the schema's limits), receives chunked arguments before
  the call, and sends the reply in wire form.
- :class:`PBRemote` (caller side) wraps a :class:`pb.RemoteReference` with the
  Foolscap reference API the client halves use: ``callRemote`` (arguments and
  reply converted to and from wire form), ``notifyOnDisconnect(cb, *args)``,
  ``getPeer`` and ``disconnect``. PB's own connection failures become
  :class:`twisted.internet.error.ConnectionLost`, which every client half
  already turns into its own error (:class:`~kernel.error.ConnectionError`,
  :class:`~kernel.error.EngineError`).

Wire form and chunking
----------------------
PB refuses any byte string or list longer than 640 KiB
(:data:`twisted.spread.banana.SIZE_LIMIT`) in either direction. :func:`to_wire`
replaces every byte string or text larger than :data:`INLINE_LIMIT` by a
:class:`WireChunked` marker holding a :class:`ChunkSource` reference, splits
lists, tuples and dicts longer than :data:`MAX_ITEMS` into :class:`WireParts`,
and sends a :class:`~kernel.serialized.Serialized` frame by frame as
:class:`WireSerialized` (never opened: the controller routes user data it does
not unpickle). :func:`from_wire` fetches each chunked value from its source in
:data:`CHUNK_SIZE` pieces, :data:`WINDOW` requests in flight, and rebuilds the
value. So a 100 MB push works whichever way it travels.

Authentication
--------------
Every PB listener sits behind a :class:`twisted.cred.portal.Portal`: a
:class:`SecretChecker` accepts one username per role (:data:`ENGINE_USER` on
the engine port, :data:`CLIENT_USER` on the client port) with a secret
generated per cluster (:func:`generate_secret`) and kept in the cluster
directory's ``pb.json`` (mode 0600, written atomically, read only if private).
PB's login is a challenge–response: the secret itself never crosses the wire.
A wrong secret fails :func:`login` with :class:`~kernel.error.SecurityError`
and the peer gets no object to call, so nothing runs.

The controller's listeners speak TLS with a self-signed certificate kept in
the cluster directory (:data:`CERT_FILE`, :func:`controller_certificate`);
``pb.json`` carries its public half and clients and engines accept only a
peer holding its key (certificate pinning, as a FURL pins a Tub's key). So
traffic is encrypted and nobody can stand in for the controller to collect
logins or payloads.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from foolscap.api import Violation
from foolscap.remoteinterface import RemoteInterfaceConstraint, getRemoteInterface
from twisted.application import service
from twisted.cred import credentials as cred_credentials
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, error
from twisted.python import log
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from kernel.clusterdir import ClusterDir
from kernel.error import ConnectionError, ProtocolError, SecurityError
from kernel.serialized import Serialized

__all__ = [
    "CHUNK_SIZE",
    "INLINE_LIMIT",
    "MAX_ITEMS",
    "MAX_CHUNKED_BYTES",
    "WINDOW",
    "ENGINE_USER",
    "CLIENT_USER",
    "PB_FILE",
    "WireError",
    "ChunkSource",
    "WireChunked",
    "WireSerialized",
    "WireParts",
    "WireCopy",
    "register_copyable",
    "to_wire",
    "from_wire",
    "Exposed",
    "PBRemote",
    "Broker",
    "server_factory",
    "generate_secret",
    "SecretChecker",
    "GatewayAvatar",
    "GatewayRealm",
    "make_portal",
    "login",
    "login_with",
    "controller_certificate",
    "public_pem",
    "CERT_FILE",
    "read_connection_info",
    "connect_client",
    "serve_controller",
]

#: Size of one chunk of a large value on the wire (under banana's 640 KiB).
CHUNK_SIZE = 512 * 1024
#: Byte strings and texts (UTF-8) larger than this travel chunked.
INLINE_LIMIT = CHUNK_SIZE
#: Lists, tuples and dicts longer than this travel in parts.
MAX_ITEMS = 100_000
#: Largest chunked value accepted from a peer, in bytes.
MAX_CHUNKED_BYTES = 2**31
#: Chunk requests in flight per value.
WINDOW = 4

#: The username engines log in with (engine port).
ENGINE_USER = "engine"
#: The username clients log in with (client port).
CLIENT_USER = "client"
#: The connection file a PB controller writes in its cluster directory.
PB_FILE = "pb.json"
#: The controller's TLS key and certificate (PEM), kept in its cluster directory.
CERT_FILE = "pb.pem"


class WireError(pb.Error):
    """A peer sent a call or a value this side cannot accept.

    A :class:`pb.Error`: an expected error, sent to the peer without a logged
    traceback.
    """


class LoginRefused(cred_error.UnauthorizedLogin, pb.Error):
    """Wrong username or secret (a :class:`pb.Error`: refused without a logged
    traceback)."""


# ---------------------------------------------------------------------------
# Wire forms
# ---------------------------------------------------------------------------


class ChunkSource(pb.Referenceable):
    """Serves the large values of one message to the peer, a chunk at a time.

    One source per message (not per value) keeps a message with many large
    values far from PB's limit on live references per connection.
    """

    def __init__(self) -> None:
        self.views: list[memoryview] = []

    def add(self, data: bytes | bytearray | memoryview) -> int:
        """Serve ``data`` (kept as a view: no copy is made here); returns its index."""
        self.views.append(memoryview(data).cast("B"))
        return len(self.views) - 1

    def remote_read(self, value: int, index: int) -> bytes:
        """Chunk ``index`` of value ``value`` (``CHUNK_SIZE`` bytes, the last
        one shorter)."""
        if not isinstance(value, int) or not 0 <= value < len(self.views):
            raise WireError(f"no value {value!r} in this message")
        view = self.views[value]
        if not isinstance(index, int) or index < 0 or index * CHUNK_SIZE >= len(view):
            raise WireError(f"no chunk {index!r} in a value of {len(view)} bytes")
        return bytes(view[index * CHUNK_SIZE : (index + 1) * CHUNK_SIZE])


class _Marker(pb.Copyable, pb.RemoteCopy):
    """A wire form: sent as its ``__dict__``, rebuilt as the same class."""

    def getStateToCopy(self) -> dict:
        return dict(self.__dict__)

    def setCopyableState(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise WireError(f"malformed {type(self).__name__} on the wire")
        self.__dict__.update(state)


class WireChunked(_Marker):
    """A byte string (``kind='bytes'``) or text (``kind='str'``, UTF-8) of
    ``size`` bytes: value ``index`` of ``source`` (a :class:`ChunkSource`)."""

    def __init__(
        self, kind: str = "bytes", size: int = 0, source: Any = None, index: int = 0
    ) -> None:
        self.kind = kind
        self.size = size
        self.source = source
        self.index = index

    async def fetch(self) -> bytearray:
        """Read the whole value from the peer (``WINDOW`` chunk reads in flight)."""
        size, source = getattr(self, "size", None), getattr(self, "source", None)
        value = getattr(self, "index", None)
        if not isinstance(size, int) or not 0 <= size <= MAX_CHUNKED_BYTES:
            raise WireError(f"refusing a chunked value of {size!r} bytes")
        if (
            getattr(self, "kind", None) not in ("bytes", "str")
            or not isinstance(source, pb.RemoteReference)
            or not isinstance(value, int)
        ):
            raise WireError("malformed chunked value on the wire")
        out = bytearray(size)
        count = -(-size // CHUNK_SIZE)
        indices = iter(range(count))

        async def reader() -> None:
            for i in indices:
                chunk = await source.callRemote("read", value, i)
                expected = min(CHUNK_SIZE, size - i * CHUNK_SIZE)
                if not isinstance(chunk, bytes) or len(chunk) != expected:
                    raise WireError(f"chunk {i} of a chunked value has the wrong size")
                out[i * CHUNK_SIZE : i * CHUNK_SIZE + expected] = chunk

        readers = [defer.ensureDeferred(reader()) for _ in range(min(WINDOW, count))]
        await defer.gatherResults(readers, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure
        )
        del self.source  # release the peer's copy
        return out


class WireSerialized(_Marker):
    """A :class:`~kernel.serialized.Serialized`, frame by frame (unopened)."""

    def __init__(self, frames: list | None = None):
        self.frames = frames


class WireParts(_Marker):
    """A list, tuple or dict (``kind``) too long for one banana list, in parts."""

    def __init__(self, kind: str = "list", parts: list | None = None):
        self.kind = kind
        self.parts = parts


class WireCopy(_Marker):
    """An object of a registered class (:func:`register_copyable`), as its
    type ``name`` and its plain-data ``state``."""

    def __init__(self, name: str = "", state: Any = None):
        self.name = name
        self.state = state


for _cls in (WireChunked, WireSerialized, WireParts, WireCopy):
    pb.setUnjellyableForClass(_cls, _cls)

_copiers: dict[type, tuple[str, Callable[[Any], Any]]] = {}
_builders: dict[str, Callable[[Any], Any]] = {}


def register_copyable(
    cls: type, name: str, to_state: Callable[[Any], Any], from_state: Callable[[Any], Any]
) -> None:
    """Send instances of ``cls`` by value as ``to_state(obj)`` (plain data,
    Serialized blobs allowed) and rebuild them with ``from_state(state)``.
    Both sides must register the same ``name``. Idempotent.
    """
    _copiers[cls] = (name, to_state)
    _builders[name] = from_state


def _split(items: list, kind: str) -> WireParts:
    return WireParts(kind, [items[i : i + MAX_ITEMS] for i in range(0, len(items), MAX_ITEMS)])


class _Sender:
    """Converts one message to wire form; its large values share one source."""

    def __init__(self) -> None:
        self.source: ChunkSource | None = None

    def chunked(self, data: bytes | bytearray | memoryview, kind: str) -> WireChunked:
        if self.source is None:
            self.source = ChunkSource()
        return WireChunked(kind, memoryview(data).nbytes, self.source, self.source.add(data))

    def blob(self, b: bytes | bytearray | memoryview) -> Any:
        if memoryview(b).nbytes > INLINE_LIMIT:
            return self.chunked(b, "bytes")
        return b if type(b) is bytes else bytes(b)

    def convert(self, obj: Any) -> Any:
        t = type(obj)
        if t in (int, float, bool) or obj is None:
            return obj
        if t is str:
            if len(obj) * 4 > INLINE_LIMIT:
                raw = obj.encode("utf-8")
                if len(raw) > INLINE_LIMIT:
                    return self.chunked(raw, "str")
            return obj
        if t in (bytes, bytearray, memoryview):
            return self.blob(obj)
        if t is list or t is tuple:
            items = [self.convert(x) for x in obj]
            if len(items) > MAX_ITEMS:
                return _split(items, "list" if t is list else "tuple")
            return items if t is list else tuple(items)
        if t is dict:
            if len(obj) > MAX_ITEMS:
                pairs = [(self.convert(k), self.convert(v)) for k, v in obj.items()]
                return _split(pairs, "dict")
            return {self.convert(k): self.convert(v) for k, v in obj.items()}
        if isinstance(obj, Serialized):
            return WireSerialized([self.blob(f) for f in obj.frames()])
        if t in _copiers:
            name, to_state = _copiers[t]
            return WireCopy(name, self.convert(to_state(obj)))
        if isinstance(obj, PBRemote):
            return obj.reference
        if isinstance(obj, (pb.Referenceable, _Marker)):
            return obj
        if _exposable(obj):
            return Exposed(obj)
        return obj


def to_wire(obj: Any) -> Any:
    """Convert ``obj`` to a form PB sends whatever its size (see the module
    docstring). Objects with ``remote_*`` methods that are not PB
    Referenceables (the Foolscap server halves) are wrapped in :class:`Exposed`.
    """
    return _Sender().convert(obj)


def _exposable(obj: Any) -> bool:
    return any(name.startswith("remote_") for name in dir(type(obj)))


def _find_chunked(obj: Any, found: list[WireChunked]) -> None:
    t = type(obj)
    if t is list or t is tuple:
        for x in obj:
            _find_chunked(x, found)
    elif t is dict:
        for k, v in obj.items():
            _find_chunked(k, found)
            _find_chunked(v, found)
    elif t is WireChunked:
        found.append(obj)
    elif t is WireSerialized:
        _find_chunked(getattr(obj, "frames", None), found)
    elif t is WireParts:
        _find_chunked(getattr(obj, "parts", None), found)
    elif t is WireCopy:
        _find_chunked(getattr(obj, "state", None), found)


def _convert_in(obj: Any, fetched: dict[int, bytearray]) -> Any:
    t = type(obj)
    if t in (int, float, bool, str, bytes) or obj is None:
        return obj
    if t is list:
        return [_convert_in(x, fetched) for x in obj]
    if t is tuple:
        return tuple(_convert_in(x, fetched) for x in obj)
    if t is dict:
        return {_convert_in(k, fetched): _convert_in(v, fetched) for k, v in obj.items()}
    if t is WireChunked:
        data = fetched[id(obj)]
        if obj.kind == "str":
            return data.decode("utf-8")
        return bytes(data)
    if t is WireSerialized:
        frames = getattr(obj, "frames", None)
        if not isinstance(frames, list) or not frames:
            raise WireError("a Serialized blob arrived without frames")
        # Out-of-band buffers stay bytearrays: no copy, and writable arrays.
        out = [
            fetched[id(f)] if type(f) is WireChunked else _convert_in(f, fetched) for f in frames
        ]
        if not all(isinstance(f, (bytes, bytearray)) for f in out):
            raise WireError("a Serialized blob arrived with a frame that is not bytes")
        return Serialized(bytes(out[0]), out[1:])
    if t is WireParts:
        parts = getattr(obj, "parts", None)
        if not isinstance(parts, list) or not all(type(p) is list for p in parts):
            raise WireError("malformed parts on the wire")
        items = [_convert_in(x, fetched) for p in parts for x in p]
        if obj.kind == "list":
            return items
        if obj.kind == "tuple":
            return tuple(items)
        if obj.kind == "dict":
            return dict(items)
        raise WireError(f"unknown kind of parts {obj.kind!r}")
    if t is WireCopy:
        builder = _builders.get(getattr(obj, "name", None))
        if builder is None:
            raise WireError(f"unknown copyable type {getattr(obj, 'name', None)!r} on the wire")
        return builder(_convert_in(obj.state, fetched))
    if isinstance(obj, pb.RemoteReference):
        return PBRemote(obj)
    return obj


async def _receive(obj: Any) -> Any:
    found: list[WireChunked] = []
    _find_chunked(obj, found)
    fetched = {}
    for chunked in found:
        fetched[id(chunked)] = await chunked.fetch()
    return _convert_in(obj, fetched)


def from_wire(obj: Any) -> defer.Deferred:
    """Inverse of :func:`to_wire`, on the receiving side.

    :returns: Deferred firing the value, once every chunked part is fetched;
        PB references come back wrapped in :class:`PBRemote`.
    :raises: (errback) :class:`WireError` for a malformed or oversized value.
    """
    return defer.ensureDeferred(_receive(obj))


# ---------------------------------------------------------------------------
# Calls in both directions
# ---------------------------------------------------------------------------


def _schema(target: Any, method: str) -> Any:
    """The Foolscap method schema of ``target.remote_<method>``, or None if
    the target declares no RemoteInterface.

    :raises WireError: the RemoteInterface has no such method.
    """
    iface = getRemoteInterface(target)
    if iface is None:
        return None
    if method not in iface.names():
        raise WireError(f"no remote method {method!r} on {iface.__remote_name__}")
    return iface[method]


def _check_args(schema: Any, args: tuple, kwargs: dict) -> None:
    """Apply a Foolscap method schema's argument constraints (its size limits
    and types). Reference arguments must be PB references."""
    names = schema.argumentNames
    if len(args) > len(names):
        raise WireError(f"too many arguments ({len(args)} given, {len(names)} accepted)")
    given = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name in given:
            raise WireError(f"got multiple values for argument {name!r}")
        given[name] = value
    for name, value in given.items():
        accept, constraint = schema.getKeywordArgConstraint(name)
        if not accept:
            raise WireError(f"unknown argument {name!r}")
        if isinstance(constraint, RemoteInterfaceConstraint):
            if not isinstance(value, PBRemote):
                raise WireError(f"argument {name!r} must be a remote reference")
            continue
        try:
            constraint.checkObject(value, True)
        except Violation as v:
            raise WireError(f"argument {name!r} refused: {v}") from None
    missing = [n for n in schema.required if n not in given]
    if missing:
        raise WireError(f"missing argument {missing[0]!r}")


class Exposed(pb.Referenceable):
    """Expose an object's ``remote_*`` methods over PB.

    Arguments are received (chunked values fetched) and, if the object
    declares a Foolscap ``RemoteInterface``, checked against it before the
    method runs; the reply (a value or a Deferred) is sent in wire form.
    Calls that cannot be made fail with :class:`WireError` (not logged).

    :param target: the object, e.g. a Foolscap server half.
    """

    def __init__(self, target: Any):
        self.target = target

    def __repr__(self) -> str:
        return f"<Exposed {self.target!r}>"

    def remoteMessageReceived(self, broker: pb.Broker, message: Any, args: Any, kw: Any):
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        args = broker.unserialize(args)
        kw = broker.unserialize(kw)
        kw = {k.decode("utf-8") if isinstance(k, bytes) else k: v for k, v in kw.items()}
        schema = _schema(self.target, message)
        method = getattr(self.target, f"remote_{message}", None)
        if method is None or message.startswith("_"):
            raise WireError(f"no remote method {message!r}")
        d = from_wire((args, kw))

        def call(received: tuple) -> Any:
            rargs, rkw = received
            if schema is not None:
                _check_args(schema, rargs, rkw)
            return defer.maybeDeferred(method, *rargs, **rkw)

        d.addCallback(call)
        d.addCallback(to_wire)
        d.addErrback(_as_wire_error, message)
        return broker.serialize(d, self.perspective)


def _as_wire_error(f: Failure, method: str) -> Failure:
    """Send unexpected failures as a :class:`WireError`: one log line here,
    and the peer gets the exception's type and message but no traceback."""
    if f.check(pb.Error):
        return f
    log.msg(f"PB call {method} failed: {f.getErrorMessage()}")
    return Failure(WireError(f"{method} failed on the far side: {f.type.__name__}: {f.value}"))


class Broker(pb.Broker):
    """A PB broker with Nagle's algorithm off: request/response calls and
    chunk reads do not wait for delayed acknowledgements."""

    def connectionMade(self) -> None:  # noqa: N802
        super().connectionMade()
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)


def server_factory(portal: Portal) -> pb.PBServerFactory:
    """A PB server factory for ``portal`` using :class:`Broker`."""
    factory = pb.PBServerFactory(portal)
    factory.protocol = Broker
    return factory


_LOST = (pb.PBConnectionLost, pb.DeadReferenceError, error.ConnectionLost, error.ConnectionDone)


def _translate(f: Failure, method: str) -> Failure:
    """PB's failures in the terms the client halves understand."""
    if f.check(*_LOST):
        return Failure(error.ConnectionLost(f"{method}: {f.getErrorMessage()}"))
    if f.check(WireError):
        if isinstance(f, pb.CopiedFailure):
            # raised on the far side: it refused the call (bad arguments)
            return Failure(
                ProtocolError(f"the peer refused the call {method}: {f.getErrorMessage()}")
            )
        return Failure(ProtocolError(f"malformed reply to {method}: {f.getErrorMessage()}"))
    kind = _remote_type(f)
    if kind:
        return Failure(
            ProtocolError(f"the peer refused or failed the call {method}: {kind}: {f.value}")
        )
    return f


class PBRemote:
    """A :class:`pb.RemoteReference` with the Foolscap reference API.

    :param reference: the PB reference.
    """

    def __init__(self, reference: pb.RemoteReference):
        self.reference = reference

    def __repr__(self) -> str:
        return f"<PBRemote luid={self.reference.luid}>"

    def callRemote(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:  # noqa: N802
        """Call ``remote_<method>`` on the far object.

        :returns: Deferred firing the reply, received with :func:`from_wire`.
        :raises: (errback) ``ConnectionLost`` if the connection is gone;
            :class:`~kernel.error.ProtocolError` if the far side refused the call.
        """
        try:
            wire_args = to_wire(list(args))
            wire_kwargs = to_wire(kwargs)
            d = self.reference.callRemote(method, *wire_args, **wire_kwargs)
        except Exception:
            d = defer.fail()
        d.addCallback(from_wire)
        d.addErrback(_translate, method)
        return d

    def notifyOnDisconnect(self, callback: Callable, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        """Call ``callback(*args, **kwargs)`` once the connection is lost.

        :returns: a marker for :meth:`dontNotifyOnDisconnect`.
        """

        def fire(_reference: Any = None) -> None:
            callback(*args, **kwargs)

        if self.reference.broker.disconnected:
            from twisted.internet import reactor

            reactor.callLater(0, fire)
        else:
            self.reference.notifyOnDisconnect(fire)
        return fire

    def dontNotifyOnDisconnect(self, marker: Any) -> None:  # noqa: N802
        """Cancel a :meth:`notifyOnDisconnect`."""
        try:
            self.reference.dontNotifyOnDisconnect(marker)
        except (ValueError, AttributeError, TypeError):
            pass

    def getPeer(self) -> Any:  # noqa: N802
        """The address of the far end."""
        return self.reference.broker.transport.getPeer()

    @property
    def tracker(self) -> Any:
        """Mirrors Foolscap's ``reference.tracker.broker`` (the connection), so
        code that drops a connection through it works unchanged."""
        return _Tracker(self.reference.broker)

    def disconnect(self) -> None:
        """Drop the connection at once (no-op if it is already gone)."""
        broker = self.reference.broker
        if broker.disconnected:
            return
        transport = broker.transport
        abort = getattr(transport, "abortConnection", None)
        (abort or transport.loseConnection)()


class _Tracker:
    __slots__ = ("broker",)

    def __init__(self, broker: pb.Broker):
        self.broker = broker


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


def generate_secret() -> str:
    """A new random secret (256 bits, hex)."""
    return secrets.token_hex(32)


@implementer(ICredentialsChecker)
class SecretChecker:
    """Accepts known usernames with their secret.

    Works with PB's challenge–response (``IUsernameHashedPassword``) and with
    plain ``IUsernamePassword`` credentials.

    :param users: ``{username: secret}`` (str).
    """

    credentialInterfaces = (
        cred_credentials.IUsernamePassword,
        cred_credentials.IUsernameHashedPassword,
    )

    def __init__(self, users: dict[str, str]):
        self.users = {u.encode(): s.encode() for u, s in users.items()}

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:  # noqa: N802
        username = credentials.username
        if isinstance(username, str):
            username = username.encode()
        secret = self.users.get(username)
        if secret is None:
            return defer.fail(LoginRefused("unknown user"))
        d = defer.maybeDeferred(credentials.checkPassword, secret)

        def checked(ok: bool) -> Any:
            if not ok:
                raise LoginRefused("wrong secret")
            return username.decode()

        d.addCallback(checked)
        return d


class GatewayAvatar(pb.Avatar):
    """What a peer gets after logging in: named services to ask for.

    :param services: ``{name: object}``; each object has ``remote_*``
        methods and is sent wrapped in :class:`Exposed`.
    """

    def __init__(self, services: dict[str, Any]):
        self.services = services
        self._exposed: dict[str, Exposed] = {}

    def perspective_get(self, name: str) -> Exposed:
        """The service called ``name``."""
        if name not in self.services:
            raise WireError(f"no service {name!r}: this login offers {sorted(self.services)}")
        if name not in self._exposed:
            self._exposed[name] = Exposed(self.services[name])
        return self._exposed[name]


@implementer(IRealm)
class GatewayRealm:
    """Gives each login a :class:`GatewayAvatar` of its own.

    :param services: ``{username: {name: object}}``.
    """

    def __init__(self, services: dict[str, dict[str, Any]]):
        self.services = services

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any):  # noqa: N802
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only PB perspectives are offered")
        if isinstance(avatar_id, bytes):
            avatar_id = avatar_id.decode()
        avatar = GatewayAvatar(self.services[avatar_id])
        return pb.IPerspective, avatar, lambda: None


@implementer(ICredentialsChecker)
class _NoAnonymous:
    """Refuses anonymous logins as expected errors (no logged traceback)."""

    credentialInterfaces = (cred_credentials.IAnonymous,)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:  # noqa: N802
        return defer.fail(LoginRefused("anonymous login is not allowed: log in with a secret"))


def make_portal(username: str, secret: str, services: dict[str, Any]) -> Portal:
    """A portal admitting ``username`` with ``secret`` to ``services`` (and
    nobody anonymously)."""
    return Portal(
        GatewayRealm({username: services}), [SecretChecker({username: secret}), _NoAnonymous()]
    )


def _remote_type(f: Failure) -> str:
    """The name of the exception type a PB peer sent, or ''."""
    if isinstance(f, pb.CopiedFailure):
        kind = f.type
    elif f.check(pb.RemoteError):
        kind = f.value.remoteType
    else:
        return ""
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def controller_certificate(cd: Any) -> Any:
    """The controller's TLS certificate (a ``twisted.internet.ssl.PrivateCertificate``).

    Made on first use (a 2048-bit RSA key, self-signed) and kept in the cluster
    directory as :data:`CERT_FILE` (mode 0600), so a restarted controller
    keeps it and clients' pinned copies stay valid.

    :raises SecurityError: the stored file is not private.
    """
    from twisted.internet import ssl

    try:
        return ssl.PrivateCertificate.loadPEM(cd.read_file(CERT_FILE))
    except FileNotFoundError:
        pass
    key = ssl.KeyPair.generate(size=2048)
    cert = key.selfSignedCert(secrets.randbits(63) + 1, commonName="txkernel controller")
    cd.write_file(CERT_FILE, cert.dumpPEM())
    return cert


def public_pem(cert: Any) -> str:
    """The public half of a certificate, as PEM text (what ``pb.json`` pins)."""
    from twisted.internet import ssl

    return ssl.Certificate(cert.original).dumpPEM().decode("ascii")


def _pinned_tls(certificate: str) -> Any:
    """Client TLS options trusting exactly ``certificate`` (PEM): the peer must
    hold its private key. Remembers whether verification rejected the peer."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    class Pinned(ssl.CertificateOptions):
        rejected = False

        def getContext(self):  # noqa: N802
            ctx = super().getContext()

            def verify(conn, x509, errno, depth, ok):
                if not ok:
                    Pinned.rejected = True
                return ok

            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
            return ctx

    try:
        pinned = ssl.Certificate.loadPEM(certificate.encode("ascii"))
    except Exception:
        raise SecurityError(
            f"the certificate in {PB_FILE} is unreadable: use the {PB_FILE} written by "
            "the running controller"
        ) from None
    return Pinned(trustRoot=ssl.trustRootFromCertificates([pinned]))


def _refused(f: Failure) -> bool:
    if f.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
        return True
    kind = _remote_type(f)
    return "UnauthorizedLogin" in kind or "LoginRefused" in kind


async def login(
    host: str,
    port: int,
    username: str,
    secret: str,
    service_name: str,
    timeout: float = 30.0,
    certificate: str | None = None,
    reactor: Any = None,
) -> PBRemote:
    """Connect to a PB listener, log in, and get the service ``service_name``.

    :param certificate: the controller's certificate (PEM, from ``pb.json``):
        connect over TLS and accept only a peer holding its key. None connects
        over plain TCP (for listeners without TLS, such as in-process tests).
    :returns: the service as a :class:`PBRemote`.
    :raises SecurityError: the controller refused the credentials, or the peer
        is not the controller ``certificate`` names.
    :raises ConnectionError: nothing answers at ``host:port``, or the login
        did not finish within ``timeout`` seconds.
    """
    if reactor is None:
        from twisted.internet import reactor
    factory = pb.PBClientFactory()
    factory.protocol = Broker
    tls = None
    if certificate is None:
        connector = reactor.connectTCP(host, port, factory, timeout=timeout)
    else:
        tls = _pinned_tls(certificate)
        connector = reactor.connectSSL(host, port, factory, tls, timeout=timeout)
    where = f"{host}:{port}"
    try:
        d = factory.login(cred_credentials.UsernamePassword(username.encode(), secret.encode()))
        d.addCallback(lambda avatar: avatar.callRemote("get", service_name))
        d.addTimeout(timeout, reactor)
        service = await d
    except Exception:
        f = Failure()
        connector.disconnect()
        if tls is not None and tls.rejected:
            raise SecurityError(
                f"the server at {where} is not the controller that wrote this {PB_FILE}: "
                "its TLS certificate does not match. Use the connection file of the "
                "running controller (a restarted cluster writes a new one)."
            ) from None
        if _refused(f):
            raise SecurityError(
                f"the controller at {where} refused the PB credentials of {username!r}: "
                f"the secret does not match. Use the {PB_FILE} written by the running "
                "controller (its cluster directory), or restart the cluster."
            ) from None
        if f.check(defer.TimeoutError, defer.CancelledError):
            raise ConnectionError(
                f"no PB answer from {where} within {timeout:g} s: is a txkernel "
                "controller with --adapter pb listening there?"
            ) from None
        if f.check(error.ConnectError, *_LOST):
            raise ConnectionError(
                f"cannot reach a PB controller at {where} ({f.getErrorMessage()}): start "
                "one with `txkernel cluster start -n 4 --adapter pb`."
            ) from None
        f.raiseException()
    return PBRemote(service)


def login_with(info: dict[str, Any], role: str, service_name: str, timeout: float = 30.0):
    """:func:`login` with connection info read from ``pb.json``.

    :param role: ``'engine'`` or ``'client'`` (which port and secret to use).
    :returns: Deferred firing the service as a :class:`PBRemote`.
    :raises: (errback) :class:`ConnectionError` for incomplete info, and as
        :func:`login`.
    """
    try:
        host, port = info["host"], int(info[f"{role}_port"])
        secret, certificate = info[f"{role}_secret"], info["certificate"]
    except (KeyError, TypeError, ValueError) as e:
        return defer.fail(
            ConnectionError(
                f"the PB connection info lacks {e}: use the {PB_FILE} a running controller "
                "wrote (restart the cluster if it was written by an older version)"
            )
        )
    return defer.ensureDeferred(
        login(host, port, role, secret, service_name, timeout, certificate=certificate)
    )


def read_connection_info(cd: Any) -> dict[str, Any]:
    """Read ``pb.json`` from a cluster directory.

    :param cd: a :class:`~kernel.clusterdir.ClusterDir`.
    :returns: ``{'host', 'engine_port', 'client_port', 'engine_secret',
        'client_secret', 'certificate'}`` (the certificate as PEM text).
    :raises ConnectionError: there is no ``pb.json`` (no PB controller ran here).
    :raises SecurityError: the file or the directory is not private.
    """
    info = cd.read_json(PB_FILE)
    if info is None:
        raise ConnectionError(
            f"no PB connection file {cd.file(PB_FILE)}: is a controller running with "
            f"--adapter pb in this cluster directory? Start one with "
            f"`txkernel cluster start -n 4 --adapter pb --cluster-dir {cd.path}`."
        )
    return info


def connect_client(
    client_class: Callable[[PBRemote], Any],
    service_name: str,
    cluster_dir: Any = None,
    info: dict[str, Any] | None = None,
    timeout: float = 30.0,
) -> defer.Deferred:
    """Log in to a controller's client service and wrap it in a client half.

    :param client_class: called with the service's :class:`PBRemote`.
    :param service_name: the service behind the client login.
    :param cluster_dir: where the controller wrote ``pb.json`` (None: the
        default cluster directory).
    :param info: the connection info itself, instead of ``cluster_dir``.
    :param timeout: bound on connecting and logging in, seconds.
    :returns: Deferred firing ``client_class(remote)``.
    :raises: (errback) as :func:`read_connection_info` and :func:`login`.
    """

    async def go() -> Any:
        i = info if info is not None else read_connection_info(ClusterDir(cluster_dir))
        return client_class(await login_with(i, CLIENT_USER, service_name, timeout))

    return defer.ensureDeferred(go())


# ---------------------------------------------------------------------------
# The controller's listeners
# ---------------------------------------------------------------------------


class ConnectionFile(service.Service):
    """Writes ``pb.json`` (mode 0600, atomically) once the listeners are up.

    :param cd: the :class:`~kernel.clusterdir.ClusterDir`.
    :param info: the connection info to write.
    """

    def __init__(self, cd: Any, info: dict[str, Any]):
        self.cd = cd
        self.info = info

    def startService(self) -> None:  # noqa: N802
        service.Service.startService(self)
        self.cd.write_json(PB_FILE, self.info)


def serve_controller(
    cd: Any,
    registrar: Any,
    multiengine: Any = None,
    task_controller: Any = None,
    interface: str = "127.0.0.1",
    engine_port: int = 0,
    client_port: int = 0,
) -> service.MultiService:
    """The controller's PB side: an engine port and a client port (TLS), ``pb.json``.

    Engines log in on the engine port as :data:`ENGINE_USER` and get the
    registrar; clients log in on the client port as :data:`CLIENT_USER` and
    get ``multiengine`` (sessions of their own, see
    :mod:`kernel.multienginepb`) and ``task`` (see :mod:`kernel.taskpb`). The
    secrets of an earlier ``pb.json`` are kept, so engines and clients of a
    restarted controller log in again by themselves.

    :param cd: the :class:`~kernel.clusterdir.ClusterDir` (created).
    :param registrar: a :class:`kernel.enginefc.FCEngineRegistrar`.
    :param multiengine: the core :class:`~kernel.multiengine.MultiEngine`, or None.
    :param task_controller: the core task controller, or None.
    :param engine_port: 0 for the port of the last run if free, else any free one.
    :param client_port: likewise.
    :returns: a MultiService to add to the controller's service tree.
    :raises SecurityError: an existing ``pb.json`` is not private.
    """
    import socket

    from kernel import enginepb, ports

    old = cd.read_json(PB_FILE) or {}
    cert = controller_certificate(cd)
    engine_at = ports.reserve(cd, "pb-engine", interface, engine_port)
    client_at = ports.reserve(cd, "pb-client", interface, client_port)
    info = {
        "host": socket.getfqdn() if interface in ("", "0.0.0.0") else interface,
        "engine_port": engine_at.port,
        "client_port": client_at.port,
        "engine_secret": old.get("engine_secret") or generate_secret(),
        "client_secret": old.get("client_secret") or generate_secret(),
        "certificate": public_pem(cert),
    }
    services: dict[str, Any] = {}
    if multiengine is not None:
        from kernel import multienginepb

        services[multienginepb.MULTIENGINE] = multienginepb.make_client_referenceable(multiengine)
    if task_controller is not None:
        from kernel import taskpb

        services[taskpb.TASK] = taskpb.PBTaskControllerFromTaskController(task_controller)

    top = service.MultiService()
    engines = server_factory(enginepb.engine_portal(registrar, info["engine_secret"]))
    tls = cert.options()
    ports.listening_service(engine_at, engines, tls).setServiceParent(top)
    clients = server_factory(make_portal(CLIENT_USER, info["client_secret"], services))
    ports.listening_service(client_at, clients, tls).setServiceParent(top)
    ConnectionFile(cd, info).setServiceParent(top)
    return top
