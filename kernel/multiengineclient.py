"""Blocking multiengine clients, for people and scripts.

:class:`FullBlockingMultiEngineClient` wraps any
:class:`~kernel.interfaces.ISynchronousMultiEngine` (the in-process
:class:`~kernel.multiengine.SynchronousMultiEngine`, or a network client half)
and calls it through the reactor thread (:mod:`kernel.reactorthread`), so
every method simply returns its result::

    mec.execute('a = 5')          # a ResultList, printed per engine
    mec['b'] = 10                 # push to the engines in mec.targets
    mec.pull('a', targets=[0, 1]) # [5, 5]

With ``block=False`` (per call, or ``mec.block = False``) a method returns a
:class:`PendingResult` at once; its ``get_result()`` (or ``.r``) waits for the
value later. Failures on engines raise one
:class:`~kernel.error.CompositeError` holding every engine's traceback.

The module also keeps the seed's helpers: :class:`ResultList` and
:class:`QueueStatusList` (lists that print readably), :func:`wrapResultList`,
and the ``with mec: remote(); ...`` block syntax (:func:`remote`,
:func:`strip_whitespace`, :class:`InteractiveMultiEngineClient`).
"""

from __future__ import annotations

import ast
import functools
import linecache
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from zope.interface import Interface, implementer

from kernel import parallelfunction, progress, reactorthread
from kernel.error import CompositeError, KernelError, ResultNotCompleted
from kernel.interfaces import IMapper, IPendingResult

__all__ = [
    "FullBlockingMultiEngineClient",
    "IFullBlockingMultiEngineClient",
    "IPendingResult",
    "InteractiveMultiEngineClient",
    "PendingResult",
    "QueueStatusList",
    "ResultList",
    "StopLocalExecution",
    "remote",
    "strip_whitespace",
    "wrapResultList",
]


# ---------------------------------------------------------------------------
# Printing results
# ---------------------------------------------------------------------------


def _engine_lines(prefix: str, label: str, text: str) -> list[str]:
    """``text`` split into lines, the first labelled, the rest indented under it."""
    lines = text.rstrip("\n").split("\n")
    head = f"{prefix} {label}"
    pad = " " * len(head)
    return [head + lines[0]] + [pad + line for line in lines[1:]]


class ResultList(list):
    """A list of execute/get_result result dicts that prints per engine.

    Each entry prints as the engine's id, the input it ran and what it wrote::

        [0] In [3]: print(id)
        [0] Out[3]: 0
    """

    def __repr__(self) -> str:
        out = ["<Results List>"]
        for r in self:
            if not isinstance(r, dict) or "id" not in r:
                out.append(repr(r))
                continue
            prefix = f"[{r.get('id')}]"
            number = r.get("number", "?")
            out.extend(_engine_lines(prefix, f"In [{number}]: ", r.get("input", "")))
            stdout = r.get("stdout") or ""
            if stdout:
                out.extend(_engine_lines(prefix, f"Out[{number}]: ", stdout))
            stderr = r.get("stderr") or ""
            if stderr:
                out.extend(_engine_lines(prefix, f"Err[{number}]: ", stderr))
        return "\n".join(out)

    __str__ = __repr__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def wrapResultList(result: Any) -> Any:  # noqa: N802 - the seed's name
    """Wrap the list output of execute/get_result in a :class:`ResultList`."""
    if isinstance(result, list):
        return ResultList(result)
    return result


class QueueStatusList(list):
    """The ``(engine_id, status)`` pairs of ``queue_status``, printed per engine."""

    def __repr__(self) -> str:
        out = ["<Queue Status List>"]
        for entry in self:
            try:
                engine_id, status = entry
            except (TypeError, ValueError):
                out.append(repr(entry))
                continue
            if not isinstance(status, dict):
                out.append(f"[{engine_id}] {status!r}")
                continue
            pending = status.get("pending")
            queue = status.get("queue") or []
            out.append(f"[{engine_id}]   running: {pending if pending else 'nothing'}")
            out.append(f"[{engine_id}]   waiting: {len(queue)} command(s)")
            for cmd in queue:
                out.append(f"[{engine_id}]     {cmd}")
        return "\n".join(out)

    __str__ = __repr__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


# ---------------------------------------------------------------------------
# Pending results
# ---------------------------------------------------------------------------


@implementer(IPendingResult)
class PendingResult:
    """A result that is not ready yet (the return value of a ``block=False`` call).

    Do not make these by hand: the client hands them out. ``client`` must
    provide ``_getPendingResult(result_id, block)``, which returns the result
    or raises (:class:`~kernel.error.ResultNotCompleted` when not ready and
    not blocking).

    :ivar result_id: the client's pending id.
    """

    def __init__(self, client: Any, result_id: int):
        self.client = client
        self.result_id = result_id
        self.called = False
        self.raised = False
        self.result: Any = None
        self.callbacks: list[tuple[Callable, tuple, dict]] = []
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "ready" if self.called else "pending"
        if self.raised:
            state = f"failed: {type(self.result).__name__}"
        return f"<PendingResult id={self.result_id} {state}>"

    def add_callback(self, f: Callable, *args: Any, **kwargs: Any) -> None:
        """Make :meth:`get_result` return ``f(result, *args, **kwargs)``.

        Callbacks chain in the order added. There is no errback chain: an
        exception (from the call or from a callback) is raised by
        :meth:`get_result`, then and on every later call.
        """
        with self._lock:
            if self.called and not self.raised:
                self._apply([(f, args, kwargs)])
            else:
                self.callbacks.append((f, args, kwargs))

    def _apply(self, callbacks: list[tuple[Callable, tuple, dict]]) -> None:
        try:
            for f, args, kwargs in callbacks:
                self.result = f(self.result, *args, **kwargs)
        except Exception as e:
            self.result = e
            self.raised = True

    def get_result(self, default: Any = None, block: bool = True) -> Any:
        """The result: wait for it (``block``), or ``default`` if it is not ready.

        Once fetched the result (or exception) is kept here: later calls
        return it (or raise it again) without asking the controller.

        :raises Exception: what the call (or a callback) raised.
        """
        with self._lock:
            if not self.called:
                try:
                    value = self.client._getPendingResult(self.result_id, block)
                except ResultNotCompleted:
                    return default
                except Exception as e:
                    self.result = e
                    self.raised = True
                    self.called = True
                else:
                    self.result = value
                    self.called = True
                    self._apply(self.callbacks)
            if self.raised:
                raise self.result
            return self.result

    @property
    def r(self) -> Any:
        """``get_result(block=True)``."""
        return self.get_result(block=True)


# ---------------------------------------------------------------------------
# The interactive mixin: activate() and ``with mec: remote(); ...``
# ---------------------------------------------------------------------------


class StopLocalExecution(KernelError):
    """Raised by :func:`remote` to skip the local run of a ``with mec:`` block."""


def remote() -> None:
    """Mark a ``with mec:`` block as code for the engines, not for here.

    Used as the first statement of the block::

        with mec:
            remote()
            a = compute_something()

    The client sends the rest of the block to the engines; :func:`remote`
    raises :class:`StopLocalExecution` so the block does not also run here
    (the ``with`` statement swallows it).

    :raises StopLocalExecution: always.
    """
    raise StopLocalExecution("remote() ends the local run of a `with mec:` block")


def strip_whitespace(source: Iterable[str] | str) -> str:
    """The code of a ``with mec:`` block body, dedented, without its ``remote()`` line.

    :param source: the lines of the block body (or one string), starting at
        the first line after ``with ...:``; lines after the block's end (the
        first non-blank, non-comment line indented less than the body) are
        ignored.
    :returns: the body's source after the leading ``remote()`` call.
    :raises ValueError: the body does not start with ``remote()``.
    """
    if isinstance(source, str):
        source = source.splitlines(True)
    lines = [line.expandtabs(4) for line in source]
    indent = None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            indent = len(line) - len(line.lstrip())
            break
    if indent is None:
        raise ValueError("the `with` block is empty: it must start with remote()")
    body = []
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and len(line) - len(line.lstrip()) < indent:
            break  # the block has ended
        body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
    for n, line in enumerate(body):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.replace(" ", "") in ("remote()", "remote();"):
            rest = body[n + 1 :]
            return "".join(x if x.endswith("\n") else x + "\n" for x in rest)
        break
    raise ValueError(
        "a `with mec:` block sent to the engines must start with remote(): "
        "write `with mec:` / `remote()` / your code"
    )


def _with_body_lines(source_lines: list[str], with_lineno: int) -> list[str] | None:
    """The body lines of the ``with`` statement on line ``with_lineno`` (1-based)."""
    try:
        tree = ast.parse("".join(source_lines))
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and node.lineno <= with_lineno:
            end = node.end_lineno or node.lineno
            if with_lineno <= end and node.body:
                first = node.body[0].lineno
                if node.lineno == with_lineno or node.body[0].lineno > with_lineno:
                    return source_lines[first - 1 : end]
    return None


class InteractiveMultiEngineClient:
    """A mixin of conveniences for interactive use of a multiengine client.

    - :meth:`activate` makes the client the one ``%px`` and ``%autopx`` use;
    - ``with mec:`` followed by ``remote()`` runs the block on the engines
      (on ``mec.targets``) instead of here.
    """

    def activate(self) -> None:
        """Make this client the active one for the parallel magics.

        In IPython this also loads the magics (``%px``, ``%%px``, ``%autopx``,
        ``%result``), as ``%load_ext kernel.magic`` does.
        """
        from kernel import magic

        magic.set_active_client(self)
        magic.load_into_running_ipython()

    def findsource_file(self, f: Any) -> str:
        """The engine code of the ``with`` block running in frame ``f``, read
        from the frame's source file."""
        linecache.checkcache(f.f_code.co_filename)
        lines = linecache.getlines(f.f_code.co_filename, f.f_globals)
        body = _with_body_lines(lines, f.f_lineno) if lines else None
        if body is None:
            raise ValueError(
                f"cannot find the source of the `with` block at {f.f_code.co_filename}:"
                f"{f.f_lineno}; use mec.execute(code) instead"
            )
        return strip_whitespace(body)

    def findsource_ipython(self, f: Any) -> str:
        """As :meth:`findsource_file`, for a block typed into IPython (read
        from the cell being run)."""
        try:
            return self.findsource_file(f)
        except ValueError:
            pass
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            raise ValueError("not running in IPython")
        cell = shell.user_ns.get("In", [""])[-1] if "In" in shell.user_ns else ""
        lines = cell.splitlines(True)
        body = _with_body_lines(lines, f.f_lineno)
        if body is None:
            raise ValueError("cannot find the source of the `with` block in the IPython input")
        return strip_whitespace(body)

    def __enter__(self) -> Any:
        f = sys._getframe(1)
        name = f.f_code.co_filename
        if name.startswith("<ipython") or "ipykernel" in name:
            source = self.findsource_ipython(f)
        else:
            source = self.findsource_file(f)
        self._with_context_result = self.execute(source)
        return self._with_context_result

    def __exit__(self, etype: Any, value: Any, tb: Any) -> bool:
        return etype is not None and issubclass(etype, StopLocalExecution)


# ---------------------------------------------------------------------------
# The blocking client
# ---------------------------------------------------------------------------


class IFullBlockingMultiEngineClient(Interface):
    """A blocking multiengine client: every method of
    :class:`~kernel.interfaces.IMultiEngine`,
    :class:`~kernel.interfaces.IMultiEngineCoordinator` and
    :class:`~kernel.interfaces.IMultiEngineExtras` returning its result
    directly (``block=True``) or a :class:`PendingResult` (``block=False``),
    with ``targets`` and ``block`` defaults held as attributes."""

    def execute(lines, targets=None, block=None):
        """Run ``lines`` on the targets; a :class:`ResultList`."""

    def push(namespace, targets=None, block=None):
        """Bind ``namespace``'s items on the targets."""

    def pull(keys, targets=None, block=None):
        """One value (or list of values) per target."""

    def apply(f, *args, targets=None, block=None, **kwargs):
        """``f(*args, **kwargs)`` on each target: its return values."""

    def scatter(key, seq, dist="b", flatten=False, targets=None, block=None):
        """Partition ``seq`` over the targets as ``key``."""

    def gather(key, dist="b", targets=None, block=None):
        """Join ``key``'s partitions from the targets."""

    def map(func, *sequences):
        """Parallel ``map`` over the targets."""

    def get_ids():
        """The registered engine ids."""

    def barrier(pendingResults):
        """Wait for every :class:`PendingResult`."""

    def flush():
        """Forget every result this client has not fetched."""

    def benchmark(push_size=10000):
        """Latency and throughput figures for this cluster, as a dict."""


@implementer(IMapper)
class BlockingMultiEngineMapper:
    """The mapper of a blocking client: ``map`` returns the list of results
    (or a :class:`PendingResult` when ``block`` is false)."""

    def __init__(self, client: FullBlockingMultiEngineClient, dist: str, targets: Any, block: Any):
        from kernel import map as kmap

        kmap.distribution(dist)
        self.client = client
        self.dist = dist
        self.targets = targets
        self.block = block

    def map(self, func: Callable, *sequences: Any) -> Any:
        """``map(func, *sequences)`` spread over the engines."""
        return self.client.raw_map(func, sequences, self.dist, self.targets, self.block)

    def __repr__(self) -> str:
        return (
            f"<BlockingMultiEngineMapper dist={self.dist!r} targets={self.targets!r} "
            f"block={self.block!r}>"
        )


def _check_block(block: Any) -> bool:
    if not isinstance(block, bool):
        raise TypeError(f"block must be True or False, not {block!r}")
    return block


@implementer(IFullBlockingMultiEngineClient)
class FullBlockingMultiEngineClient(InteractiveMultiEngineClient):
    """A blocking client to the multiengine interface.

    Each engine has an int id; ``targets`` (an id, a list of ids, or
    ``'all'``) says which engines a call uses. Every method takes
    ``targets=None`` and ``block=None``, meaning "use the attribute":

    :ivar targets: the default targets (initially ``'all'``).
    :ivar block: the default for ``block`` (initially True): wait for the
        result, or return a :class:`PendingResult` at once.

    :param smultiengine: an :class:`~kernel.interfaces.ISynchronousMultiEngine`
        (its methods return Deferreds and take ``block``); it is only ever
        called in the reactor thread, except for an optional
        ``call_blocking(method, args, kwargs)`` returning ``(sent, result)``,
        tried first for blocking calls, from the calling thread (see
        :meth:`kernel.multienginenative.NativeFullSynchronousMultiEngineClient.call_blocking`).
    """

    def __init__(self, smultiengine: Any):
        self.smultiengine = smultiengine
        # A client half that can make a blocking call from the calling thread
        # (see NativeFullSynchronousMultiEngineClient.call_blocking).
        self._call_blocking = getattr(smultiengine, "call_blocking", None)
        self._targets: Any = "all"
        self._block = True
        self._with_context_result = None

    def __repr__(self) -> str:
        return f"<FullBlockingMultiEngineClient targets={self.targets!r} block={self.block!r}>"

    # -- defaults ----------------------------------------------------------

    @property
    def block(self) -> bool:
        """The default ``block`` of every method."""
        return self._block

    @block.setter
    def block(self, value: bool) -> None:
        self._block = _check_block(value)

    @property
    def targets(self) -> Any:
        """The default ``targets`` of every method."""
        return self._targets

    @targets.setter
    def targets(self, value: Any) -> None:
        self._targets = self._check_targets(value)

    @staticmethod
    def _check_targets(targets: Any) -> Any:
        if isinstance(targets, str) and targets == "all":
            return targets
        if isinstance(targets, int) and not isinstance(targets, bool):
            return targets
        if (
            isinstance(targets, (list, tuple, range))
            and len(targets) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in targets)
        ):
            return list(targets)
        raise TypeError(
            f"targets must be an engine id (int), a non-empty list of ids, or 'all'; "
            f"got {targets!r}"
        )

    def _findTargetsAndBlock(self, targets: Any = None, block: Any = None) -> tuple[Any, bool]:  # noqa: N802
        targets = self._targets if targets is None else self._check_targets(targets)
        block = self._block if block is None else _check_block(block)
        return targets, block

    # -- calling through the reactor ---------------------------------------

    def _blockFromThread(self, function: Callable, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        return reactorthread.blocking_call(function, *args, **kwargs)

    def _call(
        self,
        method: str,
        *args: Any,
        block: bool,
        wrap: Callable[[Any], Any] | None = None,
        wait_desc: str | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Call ``smultiengine.<method>(*args, **kwargs, block=block)``.

        :returns: the result (``wrap``-ped) when ``block``; else a
            :class:`PendingResult` with ``wrap`` as its first callback.
        """
        if block and self._call_blocking is not None and wait_desc is None:
            if not reactorthread.in_reactor_thread():
                sent, result = self._call_blocking(method, args, kwargs or {})
                if sent:
                    return wrap(result) if wrap is not None else result
        f = getattr(self.smultiengine, method)
        if kwargs:
            f = functools.partial(f, **kwargs)
        if block:
            if wait_desc is not None:
                result = progress.wait(reactorthread.submit(f, *args, block=True), wait_desc)
            else:
                result = self._blockFromThread(f, *args, block=True)
            return wrap(result) if wrap is not None else result
        result_id = self._blockFromThread(f, *args, block=False)
        pending = PendingResult(self, result_id)
        if wrap is not None:
            pending.add_callback(wrap)
        return pending

    # -- pending results ---------------------------------------------------

    def _getPendingResult(self, result_id: int, block: bool = True) -> Any:  # noqa: N802
        return self.get_pending_deferred(result_id, block)

    def get_pending_deferred(self, deferredID: int, block: bool) -> Any:  # noqa: N803
        """Wait for (``block``) or fetch the result of pending id ``deferredID``.

        Each id can be redeemed once; :class:`PendingResult` does this for you.

        :raises kernel.error.ResultNotCompleted: not ready and ``block`` false.
        :raises kernel.error.InvalidDeferredID: unknown or already redeemed.
        """
        return self._blockFromThread(self.smultiengine.get_pending_deferred, deferredID, block)

    def barrier(self, pendingResults: Iterable[PendingResult]) -> None:  # noqa: N803
        """Wait for every :class:`PendingResult` in ``pendingResults``.

        They are waited on in order of result id; an exception is kept in its
        PendingResult (raised again by its ``get_result`` or ``.r``) instead
        of being raised here. Their results are then removed from the
        controller; read them with ``get_result()`` or ``.r``.
        """
        ordered = sorted(pendingResults, key=lambda pr: pr.result_id)
        with progress.bar(len(ordered), "barrier", unit="result") as bar:
            for pr in ordered:
                try:
                    pr.get_result(block=True)
                except Exception:
                    pass  # kept in pr; raised again by pr.get_result()
                bar.update()

    def flush(self) -> None:
        """Forget every result of this client not yet fetched.

        The controller keeps the result of each :class:`PendingResult` until
        it is fetched; results that are never fetched stay there. This drops
        them (only this client's, never another client's).
        """
        self._blockFromThread(self.smultiengine.clear_pending_deferreds)

    clear_pending_results = flush

    # -- streamed output ----------------------------------------------------

    def supports_streaming(self) -> bool:
        """Might this connection stream engines' output as it is written?
        (:meth:`add_output_observer` gives the definite answer.)"""
        return callable(getattr(self.smultiengine, "add_output_observer", None))

    def add_output_observer(self, observer: Callable[[int, str, str], Any]) -> bool:
        """Call ``observer(engine_id, stream_name, text)`` with engines' stdout
        and stderr as they are written (called in the reactor thread, before
        the command that wrote the text returns).

        :returns: False, doing nothing, when the connection cannot stream
            output (the output still arrives in each command's result).
        """
        if not self.supports_streaming():
            return False
        # Implementations answer None (in process) or whether they can stream.
        answer = self._blockFromThread(self.smultiengine.add_output_observer, observer)
        return answer is None or bool(answer)

    def remove_output_observer(self, observer: Callable[[int, str, str], Any]) -> None:
        """Stop calling an observer added with :meth:`add_output_observer`."""
        if self.supports_streaming():
            self._blockFromThread(self.smultiengine.remove_output_observer, observer)

    # -- dictionary access -------------------------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        """``mec['a'] = 5`` pushes ``a`` to ``self.targets`` (and waits)."""
        if not isinstance(key, str):
            raise TypeError(f"variable names are str, not {type(key).__name__}")
        self.push({key: value}, block=True)

    def __getitem__(self, key: str) -> Any:
        """``mec['a']`` pulls ``a`` from ``self.targets``: one value per engine."""
        if not isinstance(key, str):
            raise TypeError(f"variable names are str, not {type(key).__name__}")
        return self.pull(key, block=True)

    # -- the engine methods ------------------------------------------------

    def execute(self, lines: str, targets: Any = None, block: Any = None) -> Any:
        """Execute Python code (a str) on the targets.

        :returns: a :class:`ResultList` of one result dict per engine (``id``,
            ``number``, ``input``, ``stdout``, ``stderr``), or a PendingResult.
        :raises kernel.error.CompositeError: with each failing engine's traceback.
        """
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("execute", lines, targets, block=block, wrap=wrapResultList)

    def push(self, namespace: dict, targets: Any = None, block: Any = None) -> Any:
        """Bind every ``name: value`` of ``namespace`` in the targets' namespaces.

        Values must be picklable (cloudpickle: functions and lambdas are fine).
        """
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("push", namespace, targets, block=block)

    def pull(self, keys: str | list[str], targets: Any = None, block: Any = None) -> Any:
        """Pull variables by name: one value (``keys`` a str) or list of
        values (``keys`` a list) per target."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("pull", keys, targets, block=block)

    def push_function(self, namespace: dict, targets: Any = None, block: Any = None) -> Any:
        """Push functions by name (closures and lambdas included)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("push_function", namespace, targets, block=block)

    def pull_function(self, keys: str | list[str], targets: Any = None, block: Any = None) -> Any:
        """Pull functions by name, as :meth:`pull`."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("pull_function", keys, targets, block=block)

    def push_serialized(self, namespace: dict, targets: Any = None, block: Any = None) -> Any:
        """Push ``name:`` :class:`~kernel.serialized.Serialized` pairs, unopened."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("push_serialized", namespace, targets, block=block)

    def pull_serialized(self, keys: str | list[str], targets: Any = None, block: Any = None) -> Any:
        """Pull variables as :class:`~kernel.serialized.Serialized` blobs."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("pull_serialized", keys, targets, block=block)

    def apply(
        self, f: Callable, *args: Any, targets: Any = None, block: Any = None, **kwargs: Any
    ) -> Any:
        """Call ``f(*args, **kwargs)`` on each target, one command per engine.

        The call is serialized once and the same blob goes to every target.
        ``f`` runs with its own globals (as a task does), not in the engine's
        namespace: use :meth:`execute`, :meth:`push` and :meth:`pull` for
        names bound there. ``targets`` and ``block`` belong to this method
        and are not passed on to ``f``.

        :returns: the list of return values in target order, or a PendingResult.
        :raises kernel.error.CompositeError: naming ``apply``, with the
            exception of each engine where ``f`` raised (``raise_exception()``
            re-raises the first as its own type).
        """
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("apply", f, *args, block=block, kwargs={**kwargs, "targets": targets})

    def get_result(self, i: int | None = None, targets: Any = None, block: Any = None) -> Any:
        """The result dict of command ``i`` (None: the latest) on each target,
        as a :class:`ResultList`."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("get_result", i, targets, block=block, wrap=wrapResultList)

    def reset(self, targets: Any = None, block: Any = None) -> Any:
        """Clear the targets' namespaces."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("reset", targets, block=block)

    def keys(self, targets: Any = None, block: Any = None) -> Any:
        """The names bound on each target (a sorted list per engine)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("keys", targets, block=block)

    def kill(self, controller: bool = False, targets: Any = None, block: Any = None) -> Any:
        """Stop the targets' engines (with ``controller``, every engine and the
        controller)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("kill", controller, targets, block=block)

    def clear_queue(self, targets: Any = None, block: Any = None) -> Any:
        """Drop the commands waiting in the targets' queues (the running one
        finishes; each dropped one fails with QueueCleared)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("clear_queue", targets, block=block)

    def queue_status(self, targets: Any = None, block: Any = None) -> Any:
        """What each target is running and what waits in its queue, as a
        :class:`QueueStatusList` of ``(engine_id, status)`` pairs."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("queue_status", targets, block=block, wrap=QueueStatusList)

    def set_properties(self, properties: dict, targets: Any = None, block: Any = None) -> Any:
        """Update the targets' properties (plain data: str, numbers, bools,
        None, lists and dicts of those)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("set_properties", properties, targets, block=block)

    def get_properties(self, keys: Any = None, targets: Any = None, block: Any = None) -> Any:
        """Each target's properties dict (only ``keys`` when given)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("get_properties", keys, targets, block=block)

    def has_properties(self, keys: Any, targets: Any = None, block: Any = None) -> Any:
        """Per target, one bool per key: is that property set?"""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("has_properties", keys, targets, block=block)

    def del_properties(self, keys: Any, targets: Any = None, block: Any = None) -> Any:
        """Remove the named properties on the targets."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("del_properties", keys, targets, block=block)

    def clear_properties(self, targets: Any = None, block: Any = None) -> Any:
        """Remove every property on the targets."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("clear_properties", targets, block=block)

    def get_ids(self) -> list[int]:
        """The ids of the registered engines, sorted."""
        return self._blockFromThread(self.smultiengine.get_ids)

    # -- coordination ------------------------------------------------------

    def scatter(
        self,
        key: str,
        seq: Any,
        dist: str = "b",
        flatten: bool = False,
        targets: Any = None,
        block: Any = None,
    ) -> Any:
        """Partition ``seq`` into one contiguous block per target, bound as ``key``.

        With ``flatten`` a block of one item is bound as the item itself.
        NumPy arrays are split as arrays.
        """
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("scatter", key, seq, dist, flatten, targets, block=block)

    def gather(self, key: str, dist: str = "b", targets: Any = None, block: Any = None) -> Any:
        """Pull ``key``'s partitions from the targets and join them (the
        inverse of :meth:`scatter`)."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("gather", key, dist, targets, block=block)

    def raw_map(
        self,
        func: Callable,
        seq: list | tuple,
        dist: str = "b",
        targets: Any = None,
        block: Any = None,
    ) -> Any:
        """``map(func, seq[0], seq[1], ...)`` spread over the targets.

        The sequences come as one list or tuple because this method also
        takes keyword arguments; :meth:`map` has the builtin's syntax.
        """
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("raw_map", func, seq, dist, targets, block=block, wait_desc="map")

    def map(self, func: Callable, *sequences: Any) -> Any:
        """A parallel version of the builtin ``map`` over ``self.targets``.

        :returns: the list of results in order (or a PendingResult when
            ``self.block`` is false).
        """
        return self.mapper().map(func, *sequences)

    def mapper(self, dist: str = "b", targets: Any = None, block: Any = None) -> Any:
        """An :class:`~kernel.interfaces.IMapper` whose ``map`` uses these
        settings (None: the client's ``targets``/``block`` at map time).

        :param dist: the decomposition; ``'b'`` (blocks) is the only one.
        """
        if targets is not None:
            targets = self._check_targets(targets)
        if block is not None:
            _check_block(block)
        return BlockingMultiEngineMapper(self, dist, targets, block)

    def parallel(self, dist: str = "b", targets: Any = None, block: Any = None) -> Callable:
        """A decorator turning a function into a parallel one::

        @mec.parallel()
        def f(x, y):
            return x + y

        f(range(10), range(10))   # f(0, 0), f(1, 1), ... on the engines
        """
        return parallelfunction.parallel(self.mapper(dist, targets, block))

    # -- extras ------------------------------------------------------------

    def zip_pull(self, keys: str | list[str], targets: Any = None, block: Any = None) -> Any:
        """Pull several keys; one tuple per key of its value on each target."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("zip_pull", keys, targets, block=block)

    def run(self, filename: str, targets: Any = None, block: Any = None) -> Any:
        """Execute the code of the local file ``filename`` on the targets."""
        targets, block = self._findTargetsAndBlock(targets, block)
        return self._call("run", filename, targets, block=block, wrap=wrapResultList)

    # -- benchmarks ----------------------------------------------------------

    def benchmark(self, push_size: int = 10000, repeat: int = 5) -> dict[str, Any]:
        """Measure this cluster: command latency and push throughput.

        Latency is the time of ``execute('pass')`` on one engine and on all
        of them; throughput is the rate at which a NumPy float64 array of
        ``push_size`` elements is pushed to one engine and to all of them.
        Each figure is the median of ``repeat`` runs. The numbers vary
        widely with hardware and network: they describe a configuration, they
        do not test it.

        :returns: a dict: ``engines`` (how many), ``push_size``,
            ``push_bytes`` (bytes per array), ``latency`` and ``throughput``,
            each a dict with keys ``one`` and ``all`` (seconds per command;
            bytes per second delivered to the engines).
        """
        import numpy

        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        ids = self.get_ids()
        if not ids:
            from kernel.error import NoEnginesRegistered

            raise NoEnginesRegistered()
        one = ids[0]
        array = numpy.arange(push_size, dtype=numpy.float64)
        name = "_txkernel_benchmark"

        def timed(f: Callable[[], Any]) -> float:
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                f()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        latency = {
            "one": timed(lambda: self.execute("pass", targets=one, block=True)),
            "all": timed(lambda: self.execute("pass", targets=ids, block=True)),
        }
        t_one = timed(lambda: self.push({name: array}, targets=one, block=True))
        t_all = timed(lambda: self.push({name: array}, targets=ids, block=True))
        self.execute(f"del {name}", targets=ids, block=True)
        throughput = {
            "one": array.nbytes / t_one if t_one > 0 else float("inf"),
            "all": array.nbytes * len(ids) / t_all if t_all > 0 else float("inf"),
        }
        return {
            "engines": len(ids),
            "push_size": push_size,
            "push_bytes": int(array.nbytes),
            "latency": latency,
            "throughput": throughput,
        }


__all__ += ["BlockingMultiEngineMapper", "CompositeError"]
