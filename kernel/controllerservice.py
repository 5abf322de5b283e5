"""The controller core: the registry of engines.

:class:`ControllerService` knows which engines are registered, gives each an
id, and tells observers (the multiengine and task front ends, adapters) when
engines come and go. It knows nothing of transports: a network adapter
registers the client half of a remote engine like any in-process engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.python import log
from zope.interface import implementer

from kernel.error import InvalidEngineID
from kernel.interfaces import IControllerCore


@implementer(IControllerCore)
class ControllerService(service.MultiService):
    """The engine registry, as a Twisted service.

    Front ends and adapters are attached as child services.

    :ivar engines: dict mapping engine id to the registered engine object.
    :ivar engine_info: dict mapping engine id to ``{'ip', 'port', 'pid'}`` as
        given at registration.
    """

    def __init__(self):
        super().__init__()
        self.engines: dict[int, Any] = {}
        self.engine_info: dict[int, dict[str, Any]] = {}
        self._register_observers: list[tuple[Callable, bool, tuple, dict]] = []
        self._unregister_observers: list[tuple[Callable, bool, tuple, dict]] = []
        self._n_waiters: list[tuple[int, Callable, tuple, dict]] = []

    def _free_id(self, requested: int | None) -> int:
        if (
            isinstance(requested, int)
            and not isinstance(requested, bool)
            and requested >= 0
            and requested not in self.engines
        ):
            return requested
        i = 0
        while i in self.engines:
            i += 1
        return i

    def register_engine(
        self,
        remote_engine: Any,
        id: int | None = None,
        ip: str | None = None,
        port: int | None = None,
        pid: int | None = None,
    ) -> dict[str, int]:
        """Register ``remote_engine`` and set its ``id`` attribute.

        :param id: the id asked for; honoured if free, else the lowest free
            id is given. There is no limit on the number of engines.
        :returns: ``{'id': engine_id}``.
        """
        engine_id = self._free_id(id)
        self.engines[engine_id] = remote_engine
        self.engine_info[engine_id] = {"ip": ip, "port": port, "pid": pid}
        try:
            remote_engine.id = engine_id
        except AttributeError:
            pass  # an engine reference that cannot hold attributes
        log.msg(f"engine {engine_id} registered (ip={ip}, port={port}, pid={pid})")
        self._notify(self._register_observers, engine_id)
        self._check_n_waiters()
        return {"id": engine_id}

    def unregister_engine(self, id: int) -> None:
        """Forget engine ``id``.

        Its queued and running work fails with
        :class:`~kernel.error.EngineError` (when the engine object has a
        ``lost(reason)`` method, as :class:`~kernel.engineservice.QueuedEngine`
        does), then the unregistration observers are called.

        :raises InvalidEngineID: if no engine has this id.
        """
        try:
            engine = self.engines.pop(id)
        except (KeyError, TypeError):
            raise InvalidEngineID(
                f"no engine with id {id!r} is registered; registered ids: {sorted(self.engines)}"
            ) from None
        self.engine_info.pop(id, None)
        log.msg(f"engine {id} unregistered")
        lost = getattr(engine, "lost", None)
        if callable(lost):
            lost("it was unregistered from the controller")
        self._notify(self._unregister_observers, id)

    def _notify(self, observers: list, engine_id: int) -> None:
        for f, include_id, args, kwargs in list(observers):
            if include_id:
                kwargs = dict(kwargs, id=engine_id)
            try:
                f(*args, **kwargs)
            except Exception:
                log.err(None, f"engine observer {f!r} failed for engine {engine_id}")

    def _check_n_waiters(self) -> None:
        ready = [w for w in self._n_waiters if len(self.engines) >= w[0]]
        for w in ready:
            self._n_waiters.remove(w)
        for _, f, args, kwargs in ready:
            try:
                f(*args, **kwargs)
            except Exception:
                log.err(None, f"on_n_engines_registered_do callback {f!r} failed")

    def on_register_engine_do(self, f: Callable, include_id: bool, *args: Any, **kwargs: Any):
        """Call ``f(*args, **kwargs)`` each time an engine registers, with
        ``id=engine_id`` added to the keyword arguments when ``include_id``."""
        self._register_observers.append((f, include_id, args, kwargs))

    def on_unregister_engine_do(self, f: Callable, include_id: bool, *args: Any, **kwargs: Any):
        """As :meth:`on_register_engine_do`, each time an engine unregisters."""
        self._unregister_observers.append((f, include_id, args, kwargs))

    def on_register_engine_do_not(self, f: Callable) -> None:
        """Stop calling ``f`` on registration."""
        self._register_observers[:] = [o for o in self._register_observers if o[0] != f]

    def on_unregister_engine_do_not(self, f: Callable) -> None:
        """Stop calling ``f`` on unregistration."""
        self._unregister_observers[:] = [o for o in self._unregister_observers if o[0] != f]

    def on_n_engines_registered_do(self, n: int, f: Callable, *args: Any, **kwargs: Any) -> None:
        """Call ``f(*args, **kwargs)`` once, as soon as ``n`` engines are
        registered (at once if they already are)."""
        self._n_waiters.append((n, f, args, kwargs))
        self._check_n_waiters()
