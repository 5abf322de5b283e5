"""Engines over Perspective Broker: registration and remote use.

The engine side of the PB adapter is the Foolscap adapter's, carried over PB
by :mod:`kernel.pbutil` (see its docstring): the same pieces, the same
envelopes, no second copy of their logic.

- Engine process: :class:`PBEngineConnector` keeps the engine registered. It
  is :class:`kernel.enginefc.EngineConnector` (register, ask for the previous
  id again after a reconnection, exponential backoff, give up on a
  :class:`~kernel.error.SecurityError`) reaching the controller through a
  :class:`PBControllerLocator`: connect to the controller's PB engine port
  over TLS (pinning the certificate in ``pb.json``), log in with the engine
  secret and ask for the registrar. The
  engine is exposed by :class:`kernel.enginefc.FCEngineReferenceFromService`
  (wrapped in :class:`kernel.pbutil.Exposed` as it crosses the wire, its
  ``RIEngine`` schema still enforced).
- Controller process: :func:`engine_portal` admits engines (username
  :data:`~kernel.pbutil.ENGINE_USER`) to the controller's
  :class:`kernel.enginefc.FCEngineRegistrar`, which wraps each registering
  engine as ``QueuedEngine(EngineFromReference(reference))``: the reference is
  a :class:`~kernel.pbutil.PBRemote`, so the controller-side engine
  implements ``IEngineBase``, ``IEngineInterrupt`` and ``IEngineTasks`` over PB
  with payloads that stay :class:`~kernel.serialized.Serialized`. Lost
  connections and missed heartbeats unregister the engine as with Foolscap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet import defer

from kernel import pbutil
from kernel.enginefc import EngineConnector, EngineFromReference

__all__ = [
    "REGISTRAR",
    "PBControllerLocator",
    "PBEngineConnector",
    "PBEngineFromReference",
    "engine_portal",
]

#: The service name of the engine registrar behind the engine login.
REGISTRAR = "registrar"

#: The controller-side engine over PB: the Foolscap adapter's client half,
#: used with a :class:`~kernel.pbutil.PBRemote` as its reference.
PBEngineFromReference = EngineFromReference


def engine_portal(registrar: Any, secret: str) -> Portal:
    """The portal of the controller's PB engine port.

    :param registrar: a :class:`kernel.enginefc.FCEngineRegistrar`.
    :param secret: the cluster's engine secret.
    """
    return pbutil.make_portal(pbutil.ENGINE_USER, secret, {REGISTRAR: registrar})


class PBControllerLocator:
    """Finds a controller's engine registrar over PB.

    Plays the part of the Foolscap ``Tub`` for
    :class:`~kernel.enginefc.EngineConnector`: :meth:`getReference` takes the
    connection info (``pb.json``'s content) where the Tub takes a FURL.

    :param timeout: bound on each connection and login, seconds.
    """

    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout

    def getReference(self, info: dict[str, Any]) -> defer.Deferred:  # noqa: N802
        """Log in as an engine and fire the registrar (a
        :class:`~kernel.pbutil.PBRemote`).

        :raises: (errback) :class:`~kernel.error.SecurityError` if the
            controller refuses the secret or is not the one ``info`` names
            (TLS certificate); :class:`~kernel.error.ConnectionError` if it
            cannot be reached.
        """
        return pbutil.login_with(info, pbutil.ENGINE_USER, REGISTRAR, self.timeout)


class PBEngineConnector(EngineConnector):
    """Keep an engine registered with a controller over PB.

    :param get_info: returns the controller's connection info (e.g.
        ``lambda: pbutil.read_connection_info(cluster_dir)``); called before
        each attempt, so a rewritten ``pb.json`` is picked up.
    :param engine: the engine service to expose.
    :param kwargs: the other arguments of
        :class:`~kernel.enginefc.EngineConnector` (``on_fatal``, ``on_kill``,
        ``initial_delay``, ``max_delay``, ``clock``).
    """

    def __init__(self, get_info: Callable[[], dict], engine: Any, **kwargs: Any):
        super().__init__(PBControllerLocator(), get_info, engine, **kwargs)
