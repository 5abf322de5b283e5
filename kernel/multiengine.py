"""The multiengine interface: a controller's engines addressed by id.

:class:`MultiEngine` multiplexes every engine method over a ``targets``
argument (an int, a list of ints, or ``'all'``), fires one result per target
in target order, and collects the failures of every failing engine into one
:class:`~kernel.error.CompositeError` (the other engines' work completes
first). It also coordinates work over engines (``scatter``, ``gather``,
``raw_map``, ``map``, ``mapper``, ``parallel``) and offers ``zip_pull`` and
``run``.

:class:`SynchronousMultiEngine` is one client's view of a MultiEngine: every
method takes a keyword-only ``block``; with ``block=False`` it fires a pending
id at once, redeemed later with ``get_pending_deferred``. Each client has its
own, so its pending results are its own.

Where user data is opened. ``push``, ``push_function`` and ``scatter``
serialize each value once, here, and send the same blobs to every target with
``push_serialized``; ``pull``, ``pull_function``, ``gather`` and ``zip_pull``
fetch blobs with ``pull_serialized`` and deserialize them here; ``apply`` serializes a
function call once and sends it with ``apply_serialized``, and opens the
returned values here. Partitioning and joining also happen here. That code
is :class:`MultiEngineCallerMixin`, built only on ``get_ids``, ``execute``,
``push_serialized``, ``pull_serialized`` and ``apply_serialized``: it is the
*caller's* side. In process it runs in the
client; a network adapter's client half reuses it in the client process while
its server half calls only the ``*_serialized`` methods, so the controller
routes opaque :class:`~kernel.serialized.Serialized` blobs and never unpickles
user data.
"""

from __future__ import annotations

import functools
import numbers
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from zope.interface import implementer

from kernel import map as kmap
from kernel import parallelfunction
from kernel.error import (
    CompositeError,
    InvalidEngineID,
    NoEnginesRegistered,
    collect_exceptions,
    engine_failure_info,
)
from kernel.interfaces import (
    IMultiEngine,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
)
from kernel.mapper import MultiEngineMapper
from kernel.pendingdeferred import PendingDeferredManager
from kernel.serialized import Serialized, deserialize_private, serialize, serialize_namespace
from kernel.task import MapTask

__all__ = [
    "MultiEngine",
    "MultiEngineCallerMixin",
    "SynchronousMultiEngine",
    "open_blob",
    "resolve_targets",
]

#: Prefix of the temporary names ``raw_map`` binds on engines (removed afterwards).
MAP_NAME_PREFIX = "_txkernel_map_"


def _deferred(f: Callable) -> Callable[..., defer.Deferred]:
    """Run the coroutine function ``f`` as a Deferred-returning method.

    Anything ``f`` raises, even before its first await, becomes the
    Deferred's failure.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.ensureDeferred(f(*args, **kwargs))

    return wrapper


def _stop_reactor() -> None:
    """Stop the process's reactor shortly, so replies in flight can be sent."""
    from twisted.internet import reactor

    reactor.callLater(0.5, reactor.stop)


def _is_id(t: Any) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def resolve_targets(targets: Any, registered: Iterable[int]) -> list[int]:
    """Resolve ``targets`` against the ``registered`` engine ids.

    :returns: the ids in the order given (all registered ids, sorted, for ``'all'``).
    :raises NoEnginesRegistered: ``'all'`` while no engine is registered.
    :raises InvalidEngineID: for anything but an int, a non-empty list/tuple
        of ints or ``'all'``, for an id listed twice, or for an id that is not
        registered.
    """
    registered = set(registered)
    if isinstance(targets, str) and targets == "all":
        if not registered:
            raise NoEnginesRegistered()
        return sorted(registered)
    if _is_id(targets):
        ids = [int(targets)]
    elif isinstance(targets, (list, tuple)) and targets and all(_is_id(t) for t in targets):
        ids = [int(t) for t in targets]
    else:
        raise InvalidEngineID(
            f"invalid targets {targets!r:.200}: use an engine id (int), a non-empty list "
            "of ids, or 'all'"
        )
    missing = [t for t in ids if t not in registered]
    if missing:
        which = ", ".join(str(t) for t in missing[:10])
        if len(missing) > 10:
            which += f", ... ({len(missing)} unknown ids in all)"
        hint = (
            f"registered engines: {sorted(registered)}"
            if registered
            else "no engines are registered (start some with `txkernel cluster start -n 4`)"
        )
        raise InvalidEngineID(f"no engine with id {which}: {hint}")
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        twice = sorted({t for t in ids if t in seen or seen.add(t)})
        raise InvalidEngineID(
            f"targets name engine(s) {', '.join(map(str, twice[:10]))} more than once: "
            "list each engine once"
        )
    return ids


def _check_keys(keys: Any) -> None:
    """Refuse ``keys`` that are not a name or a list/tuple of names."""
    if isinstance(keys, str):
        return
    if isinstance(keys, (list, tuple)) and all(isinstance(k, str) for k in keys):
        return
    raise TypeError(f"keys must be a name (str) or a list of names, got {keys!r:.200}")


def _merge_failures(method: str, ids: list[int], outcomes: list) -> list:
    """As :func:`collect_exceptions`, for per-engine chains of multiengine
    calls: a CompositeError from one of them contributes its entries."""
    elist = []
    for engine_id, r in zip(ids, outcomes, strict=True):
        if not isinstance(r, Failure):
            continue
        if r.check(CompositeError):
            elist.extend(r.value.elist)
        else:
            info = engine_failure_info(r)
            if info.engine_id is None:
                info.engine_id = engine_id
            elist.append(info)
    if elist:
        raise CompositeError(f"one or more exceptions from call to method: {method}", elist)
    return outcomes


def open_blob(blob: Serialized) -> Any:
    """Deserialize ``blob`` into an object of the caller's own (see
    :func:`kernel.serialized.deserialize_private`)."""
    return deserialize_private(blob)


async def _as(method: str, d: defer.Deferred) -> Any:
    """Await ``d``; a CompositeError it raises is labelled with ``method``
    (the user's call, not the primitive that carried it)."""
    try:
        return await d
    except CompositeError as e:
        e.message = f"one or more exceptions from call to method: {method}"
        raise


def _one_result(result: Any) -> list:
    return [result]


def _one_failure(f: Failure, method: str, ids: list[int]) -> list:
    return collect_exceptions([f], method, engine_ids=ids)


def _all_results(results: list, method: str, ids: list[int]) -> list:
    return collect_exceptions([r for _, r in results], method, engine_ids=ids)


async def _per_engine(method: str, ids: list[int], calls: list[defer.Deferred]) -> list:
    results = await defer.DeferredList(calls, consumeErrors=True)
    return _merge_failures(method, ids, [r for _, r in results])


class MultiEngineCallerMixin:
    """The multiengine methods that open user data, for the caller's side.

    Built only on the primitives the class provides, each firing as in
    :class:`~kernel.interfaces.IMultiEngine`: ``get_ids()``,
    ``push_serialized(namespace, targets)``, ``pull_serialized(keys, targets)``,
    ``execute(lines, targets)`` and ``apply_serialized(payload, targets)``.
    :class:`MultiEngine` provides them over a controller's engines; a network
    client half provides them over the wire and gets ``push``/``pull``,
    ``apply``, the coordinator and the extras from here, so
    serialization, partitioning and joining stay in the client.
    """

    async def _target_list(self, targets: Any) -> list[int]:
        """Resolve ``targets`` against the engines registered now."""
        return resolve_targets(targets, await self.get_ids())

    async def _pull_serialized(self, method: str, keys: Any, targets: Any) -> list:
        """Pull ``keys`` as blobs and open them here: one value (``keys`` a
        str) or list of values per target. (Subclasses may override how
        blobs that came over a wire are opened.)"""
        blobs = await _as(method, self.pull_serialized(keys, targets))
        if isinstance(keys, str):
            return [open_blob(b) for b in blobs]
        return [[open_blob(b) for b in per_engine] for per_engine in blobs]

    # -- data --------------------------------------------------------------

    @_deferred
    async def push(self, namespace: dict[str, Any], targets: Any = "all") -> list[None]:
        """Bind ``namespace``'s items on each target; each value is serialized
        once and the same blob goes to every target. Fires a list of None."""
        return await _as("push", self.push_serialized(serialize_namespace(namespace), targets))

    @_deferred
    async def pull(self, keys: str | list[str], targets: Any = "all") -> list:
        """Fire one value (``keys`` a str) or list of values per target."""
        return await self._pull_serialized("pull", keys, targets)

    @_deferred
    async def push_function(self, namespace: dict[str, Callable], targets: Any = "all") -> list:
        """As :meth:`push`, for functions only (closures and lambdas included)."""
        for name, value in namespace.items():
            if not callable(value):
                raise TypeError(
                    f"push_function: {name!r} is a {type(value).__name__}, not a function; "
                    "use push for other objects"
                )
        return await _as(
            "push_function", self.push_serialized(serialize_namespace(namespace), targets)
        )

    @_deferred
    async def pull_function(self, keys: str | list[str], targets: Any = "all") -> list:
        """As :meth:`pull`, refusing values that are not functions."""
        results = await self._pull_serialized("pull_function", keys, targets)
        names = [keys] if isinstance(keys, str) else list(keys)
        for per_engine in results:
            values = [per_engine] if isinstance(keys, str) else per_engine
            for name, value in zip(names, values, strict=True):
                if not callable(value):
                    raise TypeError(
                        f"pull_function: {name!r} is a {type(value).__name__}, not a "
                        "function; use pull for other objects"
                    )
        return results

    @_deferred
    async def apply(self, func: Callable, *args: Any, targets: Any = "all", **kwargs: Any) -> list:
        """Call ``func(*args, **kwargs)`` on each target, in one command per
        engine; fire the list of return values in target order.

        The call (function, arguments) is serialized once, here, as the body
        of a :class:`~kernel.task.MapTask`, and the same blob goes to every
        target; the return values are opened here. ``func`` runs with its own
        globals, as a task does, not in the engine's namespace: to read or
        bind names there, use :meth:`execute`, :meth:`push` and :meth:`pull`.
        (``targets`` is this method's own keyword, so it cannot be passed on
        to ``func``.)

        :raises TypeError: ``func`` is not callable.
        :raises kernel.error.CompositeError: (errback) naming ``apply``, with
            the exception of each engine where ``func`` raised.
        """
        if not callable(func):
            raise TypeError(f"apply needs a function, not a {type(func).__name__}")
        _, payload = MapTask(func, args, kwargs).to_spec()
        results = await _as("apply", self.apply_serialized(payload, targets))
        return [open_blob(r["result"]) for r in results]

    # -- IMultiEngineCoordinator -------------------------------------------

    @_deferred
    async def scatter(
        self, key: str, seq: Any, dist: str = "b", flatten: bool = False, targets: Any = "all"
    ) -> None:
        """Bind block ``i`` of ``seq`` to ``key`` on target ``i``.

        With ``flatten`` a block of one item is bound as that item. Fires None.
        """
        distribution = kmap.distribution(dist)
        ids = await self._target_list(targets)
        blocks = distribution.partition(seq, len(ids))
        calls = []
        for engine_id, block in zip(ids, blocks, strict=True):
            value = block[0] if flatten and len(block) == 1 else block
            calls.append(self.push_serialized({key: serialize(value)}, engine_id))
        await _per_engine("scatter", ids, calls)
        return None

    @_deferred
    async def gather(self, key: str, dist: str = "b", targets: Any = "all") -> Any:
        """Pull ``key`` from each target and join the blocks in target order."""
        distribution = kmap.distribution(dist)
        return distribution.join_partitions(await self._pull_serialized("gather", key, targets))

    @_deferred
    async def raw_map(
        self, func: Callable, seqs: list | tuple, dist: str = "b", targets: Any = "all"
    ) -> list:
        """``map(func, *seqs)`` spread over the targets; fire the results in order.

        Each target gets one block of every sequence (sequences are cut to the
        shortest, as the builtin ``map`` does). ``func`` and the blocks are
        bound under unique temporary names, mapped with one ``execute``, the
        result pulled, and the names deleted again; so each engine's
        ``get_result`` history gains two commands.
        """
        if not callable(func):
            raise TypeError(f"raw_map needs a function, not a {type(func).__name__}")
        if not isinstance(seqs, (list, tuple)) or not seqs:
            raise TypeError(
                "raw_map takes its sequences as a non-empty list or tuple: seqs=[s1, s2]"
            )
        distribution = kmap.distribution(dist)
        ids = await self._target_list(targets)
        seqs = [kmap.as_sliceable(s) for s in seqs]
        n = min(len(s) for s in seqs)
        blocks = [distribution.partition(s[:n], len(ids)) for s in seqs]
        func_blob = serialize(func)
        work_ids = []
        calls = []
        for j, engine_id in enumerate(ids):
            args = [b[j] for b in blocks]
            if len(args[0]) == 0:
                continue  # more engines than items: this one has nothing to do
            work_ids.append(engine_id)
            calls.append(defer.ensureDeferred(self._map_on(engine_id, func_blob, args)))
        results = await _per_engine("raw_map", work_ids, calls)
        return [x for r in results for x in r]

    async def _map_on(self, engine_id: int, func_blob: Serialized, args: list) -> list:
        """Map on one engine: push, execute, pull, clean up."""
        tag = MAP_NAME_PREFIX + uuid.uuid4().hex
        fname, rname = f"{tag}_f", f"{tag}_r"
        argnames = [f"{tag}_a{k}" for k in range(len(args))]
        namespace = {fname: func_blob}
        namespace.update((a, serialize(b)) for a, b in zip(argnames, args, strict=True))
        await self.push_serialized(namespace, engine_id)
        bound = ", ".join([fname, *argnames])
        await self.execute(
            f"try:\n    {rname} = list(map({bound}))\nfinally:\n    del {bound}\n", engine_id
        )
        try:
            (blob,) = await self.pull_serialized(rname, engine_id)
        finally:
            await self.execute(f"del {rname}", engine_id)
        return open_blob(blob)

    def map(self, func: Callable, *seqs: Any) -> defer.Deferred:
        """``map(func, *seqs)`` over every engine; fire the results in order."""
        return self.mapper().map(func, *seqs)

    def mapper(self, dist: str = "b", targets: Any = "all") -> MultiEngineMapper:
        """An :class:`~kernel.interfaces.IMapper` over ``targets`` (its ``map``
        returns a Deferred)."""
        return MultiEngineMapper(self, dist, targets)

    def parallel(self, dist: str = "b", targets: Any = "all") -> Callable:
        """A decorator making a function map itself over ``targets``."""
        return parallelfunction.parallel(self.mapper(dist, targets))

    # -- IMultiEngineExtras ------------------------------------------------

    @_deferred
    async def zip_pull(self, keys: str | list[str], targets: Any = "all") -> list[tuple]:
        """Pull ``keys`` and fire one tuple per key of its value on each target."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        per_engine = await self._pull_serialized("zip_pull", keys, targets)
        return list(zip(*per_engine, strict=True))

    @_deferred
    async def run(self, filename: str, targets: Any = "all") -> list[dict]:
        """Execute the source of the local file ``filename`` on each target."""
        try:
            with open(filename, encoding="utf-8") as f:
                source = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"run: no file {filename!r} on this machine (run reads the file here "
                "and sends its source to the engines; check the path)"
            ) from None
        return await _as("run", self.execute(source, targets))


@implementer(IMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras)
class MultiEngine(MultiEngineCallerMixin):
    """The engines of a controller, addressed by id.

    The engine methods are multiplexed here over the controller's engines;
    the methods that open user data come from :class:`MultiEngineCallerMixin`.

    :param controller: an :class:`~kernel.interfaces.IControllerCore`; its
        ``engines`` dict (id → queued engine) is read at each call.
    :param stop_controller: called by ``kill(controller=True)`` after the
        engines are killed; the default stops the reactor half a second later.
    """

    def __init__(self, controller: Any, stop_controller: Callable[[], Any] | None = None):
        self.controller = controller
        self._stop_controller = stop_controller or _stop_reactor

    def engine_ids(self, targets: Any = "all") -> list[int]:
        """Resolve ``targets`` to registered engine ids (see :func:`resolve_targets`)."""
        return resolve_targets(targets, self.controller.engines)

    async def _target_list(self, targets: Any) -> list[int]:
        return self.engine_ids(targets)

    def _each(self, method: str, ids: list[int], *args: Any) -> defer.Deferred:
        """Call the engine method ``method(*args)`` on each engine in ``ids``;
        fire the results in order, or one CompositeError for every failure.

        (Plain Deferreds, no coroutine: this is the relay path of every
        multiengine call, and one engine needs no DeferredList.)"""
        engines = self.controller.engines
        if len(ids) == 1:
            d = defer.maybeDeferred(getattr(engines[ids[0]], method), *args)
            return d.addCallbacks(_one_result, _one_failure, errbackArgs=(method, ids))
        calls = [defer.maybeDeferred(getattr(engines[i], method), *args) for i in ids]
        d = defer.DeferredList(calls, consumeErrors=True)
        return d.addCallback(_all_results, method, ids)

    def _each_target(self, method: str, targets: Any, *args: Any) -> defer.Deferred:
        """:meth:`_each` over ``targets`` resolved now (a failure if they do
        not resolve)."""
        try:
            ids = self.engine_ids(targets)
        except Exception:
            return defer.fail()
        return self._each(method, ids, *args)

    # -- IEngineMultiplexer ------------------------------------------------

    def execute(self, lines: str, targets: Any = "all") -> defer.Deferred:
        """Run ``lines`` on each target; fire the result dicts."""
        if not isinstance(lines, str):
            return defer.fail(
                TypeError(f"execute takes Python source as a str, not {type(lines).__name__}")
            )
        return self._each_target("execute", targets, lines)

    def push_serialized(self, namespace: dict[str, Any], targets: Any = "all") -> defer.Deferred:
        """Send ``name: Serialized`` pairs to each target, unopened."""
        return self._each_target("push_serialized", targets, namespace)

    def pull_serialized(self, keys: str | list[str], targets: Any = "all") -> defer.Deferred:
        """Fire one Serialized (or list of them) per target, unopened."""
        try:
            _check_keys(keys)
        except TypeError:
            return defer.fail()
        return self._each_target("pull_serialized", targets, keys)

    def apply_serialized(self, payload: Serialized, targets: Any = "all") -> defer.Deferred:
        """Run the serialized task body ``payload`` on each target with the
        engine's ``run_task``, in its queue with the other commands.

        :returns: Deferred firing one dict per target: ``result`` (a
            Serialized, unopened), ``stdout``, ``stderr``, ``started`` and
            ``completed`` (see :meth:`~kernel.interfaces.IEngineTasks.run_task`).
        :raises TypeError: ``payload`` is not a Serialized blob.
        """
        if not isinstance(payload, Serialized):
            return defer.fail(
                TypeError(
                    f"apply_serialized takes a Serialized task body, not "
                    f"{type(payload).__name__}: use apply(func, *args) to call a function"
                )
            )
        return self._each_target("run_task", targets, payload)

    @_deferred
    async def get_result(self, i: int | None = None, targets: Any = "all") -> list[dict]:
        """Fire each target's result dict of command ``i`` (None: the latest)."""
        if i is not None and not _is_id(i):
            raise TypeError(f"get_result takes a command number (int) or None, got {i!r:.100}")
        return await self._each("get_result", self.engine_ids(targets), i)

    @_deferred
    async def reset(self, targets: Any = "all") -> list[None]:
        """Clear each target's namespace."""
        return await self._each("reset", self.engine_ids(targets))

    @_deferred
    async def keys(self, targets: Any = "all") -> list[list[str]]:
        """Fire each target's sorted list of names."""
        return await self._each("keys", self.engine_ids(targets))

    @_deferred
    async def kill(self, controller: bool = False, targets: Any = "all") -> list[None]:
        """Kill the targets; with ``controller``, kill every engine and then the controller."""
        ids = self.engine_ids("all" if controller else targets)
        results = await self._each("kill", ids)
        if controller:
            self._stop_controller()
        return results

    @_deferred
    async def clear_queue(self, targets: Any = "all") -> list[None]:
        """Drop the commands waiting in each target's queue."""
        return await self._each("clear_queue", self.engine_ids(targets))

    @_deferred
    async def queue_status(self, targets: Any = "all") -> list[tuple[int, dict]]:
        """Fire ``(engine_id, status)`` pairs, ``status`` a dict with ``queue``
        (waiting commands) and ``pending`` (the running one, or None)."""
        ids = self.engine_ids(targets)
        statuses = await self._each("queue_status", ids)
        return list(zip(ids, statuses, strict=True))

    @_deferred
    async def set_properties(self, properties: dict[str, Any], targets: Any = "all") -> list:
        """Update each target's properties with the plain-data dict ``properties``."""
        return await self._each("set_properties", self.engine_ids(targets), properties)

    @_deferred
    async def get_properties(self, keys: list[str] | None = None, targets: Any = "all") -> list:
        """Fire each target's properties dict (only ``keys`` when given)."""
        return await self._each("get_properties", self.engine_ids(targets), keys)

    @_deferred
    async def del_properties(self, keys: list[str], targets: Any = "all") -> list:
        """Remove the named properties on each target."""
        return await self._each("del_properties", self.engine_ids(targets), keys)

    @_deferred
    async def has_properties(self, keys: list[str], targets: Any = "all") -> list[list[bool]]:
        """Fire, per target, one bool per key: is it set?"""
        return await self._each("has_properties", self.engine_ids(targets), keys)

    @_deferred
    async def clear_properties(self, targets: Any = "all") -> list:
        """Remove every property on each target."""
        return await self._each("clear_properties", self.engine_ids(targets))

    def get_ids(self) -> defer.Deferred:
        """Fire the sorted list of registered engine ids."""
        return defer.succeed(sorted(self.controller.engines))


@implementer(ISynchronousMultiEngine)
class SynchronousMultiEngine:
    """One client's view of a multiengine, with ``block`` on every method.

    With ``block=True`` (the default) a method returns the multiengine's
    Deferred. With ``block=False`` it fires at once with an int pending id;
    the result is kept here until :meth:`get_pending_deferred` takes it. Make
    one per client: :meth:`clear_pending_deferreds` clears only this one's
    results. ``ISynchronousMultiEngine(multiengine)`` makes a new one.

    :param multiengine: an :class:`~kernel.interfaces.IMultiEngine` that also
        provides the coordinator and extras methods.
    """

    def __init__(self, multiengine: Any):
        self.multiengine = multiengine
        self.pending = PendingDeferredManager()

    def _two_phase(self, block: bool, call: Callable[[], defer.Deferred]) -> defer.Deferred:
        # ``block`` is checked before ``call`` starts any work
        if not isinstance(block, bool):
            return defer.fail(
                TypeError(f"block must be True or False, got {block!r:.100}: nothing was run")
            )
        d = call()
        if block:
            return d
        return defer.succeed(self.pending.save_pending_deferred(d))

    # -- pending results ---------------------------------------------------

    def get_pending_deferred(self, deferred_id: int, block: bool) -> defer.Deferred:
        """Fire the result of pending id ``deferred_id``, exactly once (see
        :meth:`PendingDeferredManager.get_pending_deferred`)."""
        return self.pending.get_pending_deferred(deferred_id, block)

    def clear_pending_deferreds(self) -> defer.Deferred:
        """Forget every result this client has not fetched. Fires None."""
        self.pending.clear_pending_deferreds()
        return defer.succeed(None)

    # -- multiplexed engine methods ---------------------------------------

    def execute(self, lines: str, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.execute` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.execute(lines, targets))

    def push(self, namespace: dict, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.push` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.push(namespace, targets))

    def pull(self, keys: Any, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.pull` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.pull(keys, targets))

    def push_function(
        self, namespace: dict, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.push_function` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.push_function(namespace, targets))

    def pull_function(
        self, keys: Any, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.pull_function` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.pull_function(keys, targets))

    def push_serialized(
        self, namespace: dict, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.push_serialized` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.push_serialized(namespace, targets))

    def pull_serialized(
        self, keys: Any, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.pull_serialized` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.pull_serialized(keys, targets))

    def apply(
        self, func: Callable, *args: Any, targets: Any = "all", block: bool = True, **kwargs: Any
    ) -> defer.Deferred:
        """:meth:`MultiEngine.apply` with ``block``."""
        return self._two_phase(
            block, lambda: self.multiengine.apply(func, *args, targets=targets, **kwargs)
        )

    def apply_serialized(
        self, payload: Serialized, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.apply_serialized` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.apply_serialized(payload, targets))

    def get_result(
        self, i: int | None = None, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.get_result` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.get_result(i, targets))

    def reset(self, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.reset` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.reset(targets))

    def keys(self, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.keys` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.keys(targets))

    def kill(
        self, controller: bool = False, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.kill` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.kill(controller, targets))

    def clear_queue(self, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.clear_queue` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.clear_queue(targets))

    def queue_status(self, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.queue_status` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.queue_status(targets))

    def set_properties(
        self, properties: dict, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.set_properties` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.set_properties(properties, targets))

    def get_properties(
        self, keys: Any = None, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.get_properties` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.get_properties(keys, targets))

    def del_properties(
        self, keys: Any, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.del_properties` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.del_properties(keys, targets))

    def has_properties(
        self, keys: Any, targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.has_properties` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.has_properties(keys, targets))

    def clear_properties(self, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.clear_properties` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.clear_properties(targets))

    def get_ids(self, *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.get_ids` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.get_ids())

    # -- coordinator -------------------------------------------------------

    def scatter(
        self,
        key: str,
        seq: Any,
        dist: str = "b",
        flatten: bool = False,
        targets: Any = "all",
        *,
        block: bool = True,
    ) -> defer.Deferred:
        """:meth:`MultiEngine.scatter` with ``block``."""
        return self._two_phase(
            block, lambda: self.multiengine.scatter(key, seq, dist, flatten, targets)
        )

    def gather(
        self, key: str, dist: str = "b", targets: Any = "all", *, block: bool = True
    ) -> defer.Deferred:
        """:meth:`MultiEngine.gather` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.gather(key, dist, targets))

    def raw_map(
        self,
        func: Callable,
        seqs: list | tuple,
        dist: str = "b",
        targets: Any = "all",
        *,
        block: bool = True,
    ) -> defer.Deferred:
        """:meth:`MultiEngine.raw_map` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.raw_map(func, seqs, dist, targets))

    def map(self, func: Callable, *seqs: Any, block: bool = True) -> defer.Deferred:
        """``map(func, *seqs)`` over every engine, with ``block``."""
        return self.mapper(block=block).map(func, *seqs)

    def mapper(
        self, dist: str = "b", targets: Any = "all", block: bool = True
    ) -> MultiEngineMapper:
        """An :class:`~kernel.interfaces.IMapper` whose ``map`` fires the
        results (``block`` true) or a pending id."""
        return MultiEngineMapper(self, dist, targets, block)

    def parallel(self, dist: str = "b", targets: Any = "all", block: bool = True) -> Callable:
        """A decorator making a function map itself over ``targets``."""
        return parallelfunction.parallel(self.mapper(dist, targets, block))

    # -- extras ------------------------------------------------------------

    def zip_pull(self, keys: Any, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.zip_pull` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.zip_pull(keys, targets))

    def run(self, filename: str, targets: Any = "all", *, block: bool = True) -> defer.Deferred:
        """:meth:`MultiEngine.run` with ``block``."""
        return self._two_phase(block, lambda: self.multiengine.run(filename, targets))


registerAdapter(SynchronousMultiEngine, IMultiEngine, ISynchronousMultiEngine)
