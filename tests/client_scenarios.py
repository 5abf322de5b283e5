"""Scenarios for the blocking clients, run in a child process.

Blocking clients run the reactor in a thread of their own, which cannot share
a process with pytest-twisted's reactor. So the tests start this module as a
child process::

    python -m tests.client_scenarios --backend local --group multiengine out.json

It builds a cluster (``local``: :class:`kernel.client.LocalCluster`, engines
in this process; ``processes``: a real controller and engine processes from
:class:`kernel.testing.processes.LocalCluster`, reached over the network
with ``client.get_multiengine_client(cluster_dir=...)``), runs every scenario
of the group on it, and writes ``{scenario name: None or traceback text}`` to
``out.json``. Each test then asserts that its scenario passed; the assertions
are in the scenarios below.

A scenario is ``scenario_<group>__<name>(ctx)`` taking a :class:`Context`.
The runner resets the engines (namespace, queue, properties), the client's
``block``/``targets`` defaults and pending results, and the task queue,
between scenarios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import uuid
from typing import Any

GROUPS = ("multiengine", "task", "magic")

#: Bound (seconds) on how long engine code waits for a gate to open.
GATE_TIMEOUT = 60


def scenarios(group: str) -> dict[str, Any]:
    """The scenario functions of ``group``, by name, in file order."""
    prefix = f"scenario_{group}__"
    return {name[len(prefix) :]: f for name, f in globals().items() if name.startswith(prefix)}


class Context:
    """What a scenario works with.

    :ivar mec: a blocking multiengine client.
    :ivar tc: a blocking task client.
    :ivar ids: the engine ids (sorted).
    :ivar n: the number of engines.
    :ivar tmp: a private temporary directory.
    :ivar backend: ``'local'`` or ``'processes'``.
    """

    def __init__(self, backend: str, mec: Any, tc: Any, new_mec: Any, tmp: str):
        self.backend = backend
        self.mec = mec
        self.tc = tc
        self.new_mec = new_mec
        self.tmp = tmp
        self.ids = mec.get_ids()
        self.n = len(self.ids)

    def gate(self, timeout: float = GATE_TIMEOUT) -> tuple[str, str]:
        """A closed gate: ``(path, code)``; engine ``code`` waits until
        :meth:`open_gate` creates ``path`` (at most ``timeout`` seconds)."""
        path = os.path.join(self.tmp, f"gate-{uuid.uuid4().hex}")
        code = (
            "import os as _os, time as _time\n"
            "_t0 = _time.monotonic()\n"
            f"while not _os.path.exists({path!r}):\n"
            f"    if _time.monotonic() - _t0 > {timeout}:\n"
            "        raise TimeoutError('gate never opened')\n"
            "    _time.sleep(0.01)\n"
        )
        return path, code

    @staticmethod
    def open_gate(path: str) -> None:
        """Open a gate made by :meth:`gate`."""
        with open(path, "w"):
            pass


def _raises(exc_type: type, f: Any, *args: Any, **kwargs: Any) -> BaseException:
    """Call ``f``; assert it raises ``exc_type``; return the exception."""
    try:
        f(*args, **kwargs)
    except exc_type as e:
        return e
    raise AssertionError(f"{getattr(f, '__name__', f)} did not raise {exc_type.__name__}")


# ---------------------------------------------------------------------------
# Multiengine
# ---------------------------------------------------------------------------


def scenario_multiengine__execute_returns_result_list_per_engine(ctx: Context) -> None:
    from kernel.multiengineclient import ResultList

    r = ctx.mec.execute("x = id * 10\nprint('x is', x)")
    assert isinstance(r, ResultList), type(r)
    assert [d["id"] for d in r] == ctx.ids
    for d in r:
        assert d["stdout"] == f"x is {d['id'] * 10}\n", d
        assert d["input"] == "x = id * 10\nprint('x is', x)"
    text = repr(r)
    for i in ctx.ids:
        assert f"[{i}] In [" in text and f"[{i}] Out[" in text and f"x is {i * 10}" in text, text


def scenario_multiengine__execute_nonblocking_returns_pending_result(ctx: Context) -> None:
    from kernel.multiengineclient import PendingResult

    gate, wait = ctx.gate()
    pr = ctx.mec.execute(wait + "done = 1", block=False)
    assert isinstance(pr, PendingResult), type(pr)
    assert pr.get_result(default="not yet", block=False) == "not yet"
    ctx.open_gate(gate)
    r = pr.get_result(block=True)
    assert [d["id"] for d in r] == ctx.ids
    assert pr.r is r, "a fetched result is kept in the PendingResult"
    assert ctx.mec.pull("done") == [1] * ctx.n


def scenario_multiengine__pending_result_reraises_on_every_get(ctx: Context) -> None:
    from kernel.error import CompositeError

    pr = ctx.mec.execute("1/0", block=False)
    first = _raises(CompositeError, pr.get_result)
    second = _raises(CompositeError, lambda: pr.r)
    assert first is second
    assert "ZeroDivisionError" in str(first)


def scenario_multiengine__pending_result_callbacks_chain(ctx: Context) -> None:
    ctx.mec.push({"a": 2})
    pr = ctx.mec.pull("a", block=False)
    pr.add_callback(lambda values, k: [v * k for v in values], 3)
    pr.add_callback(sum)
    assert pr.get_result() == 6 * ctx.n
    pr.add_callback(lambda total, extra=0: total + extra, extra=1)
    assert pr.r == 6 * ctx.n + 1, "a callback added after the result arrived applies too"


def scenario_multiengine__composite_error_shows_each_engine(ctx: Context) -> None:
    from kernel.error import CompositeError

    e = _raises(CompositeError, ctx.mec.execute, "raise ValueError('bad %d' % id)")
    assert [x.engine_id for x in e.elist] == ctx.ids
    text = e.format_tracebacks()
    for i in ctx.ids:
        assert f"[engine {i}] ValueError: bad {i}" in text, text
        assert f"engine {i}" in str(e)
    assert "Traceback" in text
    _raises(ValueError, e.raise_exception, 0)


def scenario_multiengine__dictionary_access_uses_targets(ctx: Context) -> None:
    mec = ctx.mec
    mec["a"] = 5
    assert mec["a"] == [5] * ctx.n
    mec.targets = ctx.ids[0]
    mec["a"] = 6
    assert mec["a"] == [6]
    assert mec.pull("a", targets="all") == [6] + [5] * (ctx.n - 1)
    _raises(TypeError, mec.__setitem__, 3, 1)


def scenario_multiengine__targets_argument_and_attribute(ctx: Context) -> None:
    mec = ctx.mec
    last = ctx.ids[-1]
    assert [d["id"] for d in mec.execute("pass", targets=last)] == [last]
    assert [d["id"] for d in mec.execute("pass", targets=ctx.ids[:2])] == ctx.ids[:2]
    mec.targets = [last]
    assert mec.targets == [last]
    assert [d["id"] for d in mec.execute("pass")] == [last]


def scenario_multiengine__invalid_targets_are_refused(ctx: Context) -> None:
    from kernel.error import InvalidEngineID

    bad = max(ctx.ids) + 100
    e = _raises(InvalidEngineID, ctx.mec.execute, "pass", targets=[bad])
    assert str(bad) in str(e)
    _raises(TypeError, setattr, ctx.mec, "targets", "some")
    _raises(TypeError, setattr, ctx.mec, "block", "yes")


def scenario_multiengine__block_attribute_makes_calls_nonblocking(ctx: Context) -> None:
    from kernel.multiengineclient import PendingResult

    mec = ctx.mec
    mec.block = False
    pr = mec.push({"b": 3})
    assert isinstance(pr, PendingResult)
    pr.get_result()
    pulled = mec.pull("b")
    assert isinstance(pulled, PendingResult)
    assert pulled.r == [3] * ctx.n
    mec.block = True
    assert mec.pull("b") == [3] * ctx.n


def scenario_multiengine__push_and_pull_functions(ctx: Context) -> None:
    offset = 10

    def add(x):
        return x + offset

    ctx.mec.push_function({"add": add, "sq": lambda x: x * x})
    ctx.mec.execute("y = add(sq(3))")
    assert ctx.mec.pull("y") == [19] * ctx.n
    fs = ctx.mec.pull_function(["add", "sq"], targets=ctx.ids[0])
    assert fs[0][0](1) == 11 and fs[0][1](4) == 16
    _raises(Exception, ctx.mec.push_function, {"notf": 3})


def scenario_multiengine__push_and_pull_serialized(ctx: Context) -> None:
    from kernel.serialized import Serialized, deserialize, serialize

    ctx.mec.push_serialized({"s": serialize({"k": [1, 2]})})
    assert ctx.mec.pull("s") == [{"k": [1, 2]}] * ctx.n
    blobs = ctx.mec.pull_serialized("s")
    assert all(isinstance(b, Serialized) for b in blobs)
    assert [deserialize(b) for b in blobs] == [{"k": [1, 2]}] * ctx.n


def scenario_multiengine__apply_calls_a_function_on_each_target(ctx: Context) -> None:
    from kernel.error import CompositeError
    from kernel.multiengineclient import PendingResult

    mec = ctx.mec
    base = 5

    def f(x, *, scale=1):
        return (x + base) * scale

    assert mec.apply(f, 1, scale=2) == [12] * ctx.n
    assert mec.apply(f, 1, targets=ctx.ids[1:3]) == [6, 6]
    pr = mec.apply(f, 2, block=False)
    assert isinstance(pr, PendingResult), type(pr)
    assert pr.get_result(block=True) == [7] * ctx.n
    mec.targets = ctx.ids[0]
    try:
        assert mec.apply(abs, -3) == [3], "the targets attribute is the default"
    finally:
        mec.targets = "all"
    e = _raises(CompositeError, mec.apply, divmod, 1, 0, targets=ctx.ids[:2])
    assert "apply" in str(e) and len(e.elist) == 2, str(e)
    _raises(ZeroDivisionError, e.raise_exception)


def scenario_multiengine__scatter_and_gather(ctx: Context) -> None:
    import numpy

    mec = ctx.mec
    mec.scatter("x", list(range(10)))
    parts = mec.pull("x")
    assert sum(parts, []) == list(range(10))
    assert len(parts) == ctx.n
    assert mec.gather("x") == list(range(10))
    arr = numpy.arange(12.0)
    mec.scatter("arr", arr)
    mec.execute("arr = arr * 2")
    back = mec.gather("arr")
    assert isinstance(back, numpy.ndarray)
    assert numpy.array_equal(back, arr * 2)
    mec.scatter("one", list(range(ctx.n)), flatten=True)
    assert mec.pull("one") == list(range(ctx.n))


def scenario_multiengine__map_raw_map_mapper_parallel(ctx: Context) -> None:
    mec = ctx.mec
    assert mec.map(lambda x: x * 2, range(7)) == [x * 2 for x in range(7)]
    assert mec.map(lambda x, y: x + y, range(5), range(5)) == [0, 2, 4, 6, 8]
    assert mec.raw_map(pow, [range(4), [2] * 4]) == [0, 1, 4, 9]
    m = mec.mapper(targets=ctx.ids[:1])
    assert m.map(str, [1, 2]) == ["1", "2"]
    pr = mec.mapper(block=False).map(abs, [-1, -2, 3])
    assert pr.get_result() == [1, 2, 3]

    @mec.parallel()
    def inc(x):
        return x + 1

    assert inc(range(5)) == [1, 2, 3, 4, 5]
    from kernel.error import CompositeError

    _raises(CompositeError, mec.map, lambda x: 1 / x, [1, 0, 2])


def scenario_multiengine__zip_pull(ctx: Context) -> None:
    ctx.mec.push({"a": 1, "b": "two"})
    assert ctx.mec.zip_pull(["a", "b"]) == [(1,) * ctx.n, ("two",) * ctx.n]


def scenario_multiengine__run_a_local_file(ctx: Context) -> None:
    path = os.path.join(ctx.tmp, "script.py")
    with open(path, "w") as f:
        f.write("ran = id + 100\nprint('ran')\n")
    r = ctx.mec.run(path)
    assert [d["stdout"] for d in r] == ["ran\n"] * ctx.n
    assert ctx.mec.pull("ran") == [i + 100 for i in ctx.ids]
    e = _raises(FileNotFoundError, ctx.mec.run, os.path.join(ctx.tmp, "missing.py"))
    assert "missing.py" in str(e)


def scenario_multiengine__keys_and_reset(ctx: Context) -> None:
    ctx.mec.push({"kk": 1})
    assert all("kk" in keys for keys in ctx.mec.keys())
    ctx.mec.reset(targets=ctx.ids[0])
    keys = ctx.mec.keys()
    assert "kk" not in keys[0] and all("kk" in k for k in keys[1:])


def scenario_multiengine__get_result_returns_history(ctx: Context) -> None:
    from kernel.multiengineclient import ResultList

    ctx.mec.execute("hist = 1")
    r = ctx.mec.get_result()
    assert isinstance(r, ResultList)
    assert [d["input"] for d in r] == ["hist = 1"] * ctx.n
    number = r[0]["number"]
    again = ctx.mec.get_result(number, targets=ctx.ids[0])
    assert again[0]["input"] == "hist = 1"


def scenario_multiengine__queue_status_and_clear_queue(ctx: Context) -> None:
    from kernel.error import CompositeError
    from kernel.multiengineclient import QueueStatusList

    first = ctx.ids[0]
    gate, wait = ctx.gate()
    busy = ctx.mec.execute(wait, targets=first, block=False)
    queued = ctx.mec.execute("never = 1", targets=first, block=False)
    status = ctx.mec.queue_status(targets=first)
    assert isinstance(status, QueueStatusList)
    ((engine_id, st),) = status
    assert engine_id == first
    assert len(st["queue"]) == 1, st
    assert "Queue Status List" in repr(status) and "waiting: 1" in repr(status)
    ctx.mec.clear_queue(targets=first)
    ctx.open_gate(gate)
    busy.get_result()
    e = _raises(CompositeError, queued.get_result)
    assert "QueueCleared" in str(e), str(e)
    assert "never" not in ctx.mec.keys(targets=first)[0]


def scenario_multiengine__properties(ctx: Context) -> None:
    mec = ctx.mec
    mec.set_properties({"color": "red", "n": 3})
    assert mec.get_properties() == [{"color": "red", "n": 3}] * ctx.n
    assert mec.get_properties(["n"]) == [{"n": 3}] * ctx.n
    assert mec.has_properties(["color", "size"]) == [[True, False]] * ctx.n
    mec.del_properties(["color"])
    assert mec.has_properties(["color"]) == [[False]] * ctx.n
    mec.clear_properties()
    assert mec.get_properties() == [{}] * ctx.n


def scenario_multiengine__get_ids(ctx: Context) -> None:
    ids = ctx.mec.get_ids()
    assert ids == sorted(ids) and len(ids) == ctx.n and all(isinstance(i, int) for i in ids)


def scenario_multiengine__barrier_waits_and_keeps_exceptions(ctx: Context) -> None:
    from kernel.error import CompositeError

    gate, wait = ctx.gate()
    slow = ctx.mec.execute(wait + "slow = 1", block=False)
    bad = ctx.mec.execute("1/0", block=False)
    fine = ctx.mec.pull("slow", block=False)
    ctx.open_gate(gate)
    ctx.mec.barrier([fine, bad, slow])
    assert slow.called and bad.called and fine.called
    assert fine.get_result(block=False) == [1] * ctx.n
    _raises(CompositeError, bad.get_result)
    _raises(CompositeError, lambda: bad.r)


def scenario_multiengine__flush_forgets_unfetched_results(ctx: Context) -> None:
    from kernel.error import InvalidDeferredID

    pr = ctx.mec.push({"f": 1}, block=False)
    other = ctx.new_mec()
    other_pr = other.pull("f", block=False)
    ctx.mec.flush()
    _raises(InvalidDeferredID, pr.get_result)
    # another client's pending results are untouched
    assert other_pr.r in ([1] * ctx.n,)
    pr2 = ctx.mec.execute("pass", block=False)
    ctx.mec.clear_pending_results()
    _raises(InvalidDeferredID, pr2.get_result)


def scenario_multiengine__get_pending_deferred_redeems_once(ctx: Context) -> None:
    from kernel.error import InvalidDeferredID

    pr = ctx.mec.pull("id", block=False)
    assert ctx.mec.get_pending_deferred(pr.result_id, True) == ctx.ids
    _raises(InvalidDeferredID, ctx.mec.get_pending_deferred, pr.result_id, True)


def scenario_multiengine__benchmark_returns_figures(ctx: Context) -> None:
    b = ctx.mec.benchmark(push_size=1000, repeat=2)
    assert b["engines"] == ctx.n and b["push_size"] == 1000 and b["push_bytes"] == 8000
    for key in ("one", "all"):
        assert b["latency"][key] > 0
        assert b["throughput"][key] > 0
    assert "_txkernel_benchmark" not in ctx.mec.keys()[0]


def scenario_multiengine__with_block_runs_on_engines_only(ctx: Context) -> None:
    from kernel.multiengineclient import remote

    mec = ctx.mec
    with mec:
        remote()
        in_block = id * 3  # noqa: F841 - runs on the engines
    assert "in_block" not in locals()
    assert mec.pull("in_block") == [i * 3 for i in ctx.ids]


def scenario_multiengine__blocking_call_on_reactor_thread_is_refused(ctx: Context) -> None:
    from kernel import reactorthread
    from kernel.error import ClientError

    e = _raises(ClientError, reactorthread.blocking_call, ctx.mec.get_ids)
    assert "reactor thread" in str(e) and "asyncclient" in str(e), str(e)
    # the client still works afterwards
    assert ctx.mec.get_ids() == ctx.ids


def scenario_multiengine__threads_share_a_client(ctx: Context) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for j in range(5):
                ctx.mec.push({f"t{k}": j})
                assert ctx.mec.pull(f"t{k}") == [j] * ctx.n
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert not errors, errors


def scenario_multiengine__output_observers_see_output_as_written(ctx: Context) -> None:
    """Where the connection streams output, observers get each engine's
    text before the command returns and nothing after removal; elsewhere
    add_output_observer says no."""
    seen: list[tuple[int, str, str]] = []

    def observer(engine_id: int, stream_name: str, text: str) -> None:
        seen.append((engine_id, stream_name, text))

    if not ctx.mec.add_output_observer(observer):
        ctx.mec.execute("print('unseen')")
        assert seen == []
        return
    try:
        ctx.mec.execute("import sys\nprint('out', id)\nsys.stderr.write('err\\n')")
    finally:
        ctx.mec.remove_output_observer(observer)
    for i in ctx.ids:
        assert "".join(t for e, s, t in seen if e == i and s == "stdout") == f"out {i}\n", seen
        assert "".join(t for e, s, t in seen if e == i and s == "stderr") == "err\n", seen
    before = len(seen)
    ctx.mec.execute("print('unseen')")
    assert len(seen) == before


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


def scenario_task__run_and_get_task_result(ctx: Context) -> None:
    from kernel.client import MapTask

    tid = ctx.tc.run(MapTask(pow, (2, 10)))
    assert isinstance(tid, int)
    tr = ctx.tc.get_task_result(tid, block=True)
    assert tr.results == 1024 and tr.status == "succeeded" and tr.engine_id in ctx.ids
    tr2 = ctx.tc.run(MapTask(pow, (3, 2)), block=True)
    assert tr2.results == 9


def scenario_task__get_task_result_nonblocking_is_none_until_done(ctx: Context) -> None:
    from kernel.client import StringTask

    gate, wait = ctx.gate()
    tid = ctx.tc.run(StringTask(wait + "v = 5", pull="v"))
    assert ctx.tc.get_task_result(tid) is None
    ctx.open_gate(gate)
    assert ctx.tc.get_task_result(tid, block=True).ns.v == 5


def scenario_task__string_task_pushes_runs_and_pulls(ctx: Context) -> None:
    from kernel.client import StringTask

    tr = ctx.tc.run(StringTask("b = a * 2\nprint(b)", pull=["b"], push={"a": 21}), block=True)
    assert tr.ns.b == 42 and tr.results == {"b": 42}
    assert tr.stdout == "42\n"


def scenario_task__failed_task_raises_its_exception(ctx: Context) -> None:
    from kernel.client import MapTask

    tr = ctx.tc.run(MapTask(lambda: 1 / 0), block=True)
    assert tr.status == "failed"
    _raises(ZeroDivisionError, lambda: tr.results)


def scenario_task__map_mapper_parallel(ctx: Context) -> None:
    tc = ctx.tc
    assert tc.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert tc.map(lambda x, y: x - y, [5, 6], [1, 2]) == [4, 4]
    assert tc.mapper(chunksize=3).map(str, range(7)) == [str(i) for i in range(7)]
    taskids = tc.mapper(block=False).map(abs, [-1, -2])
    assert len(taskids) == 2 and all(isinstance(t, int) for t in taskids)
    tc.barrier(taskids)
    assert [tr.results for tr in tc.get_task_results(taskids)] == [[1], [2]]

    @tc.parallel(retries=1)
    def double(x):
        return 2 * x

    assert double(range(4)) == [0, 2, 4, 6]
    _raises(ZeroDivisionError, tc.map, lambda x: 1 / x, [1, 0])


def scenario_task__abort_a_waiting_task(ctx: Context) -> None:
    from kernel.client import MapTask, StringTask
    from kernel.error import TaskAborted, TaskAlreadyCompleted

    gates = [ctx.gate() for _ in ctx.ids]
    blockers = [ctx.tc.run(StringTask(code)) for _, code in gates]
    victim = ctx.tc.run(MapTask(abs, (-1,)))
    ctx.tc.abort(victim)
    for path, _ in gates:
        ctx.open_gate(path)
    ctx.tc.barrier(blockers + [victim])
    tr = ctx.tc.get_task_result(victim, block=True)
    assert tr.status == "aborted"
    _raises(TaskAborted, lambda: tr.results)
    _raises(TaskAlreadyCompleted, ctx.tc.abort, blockers[0])


def scenario_task__queue_status_spin_and_clear(ctx: Context) -> None:
    from kernel.client import MapTask

    ok = ctx.tc.run(MapTask(abs, (-3,)))
    bad = ctx.tc.run(MapTask(lambda: 1 / 0))
    ctx.tc.barrier([ok, bad])
    assert ctx.tc.spin() is None
    status = ctx.tc.queue_status()
    assert status["succeeded"] >= 1 and status["failed"] >= 1, status
    verbose = ctx.tc.queue_status(verbose=True)
    assert ok in verbose["succeeded"] and bad in verbose["failed"], verbose
    ctx.tc.clear()
    assert ctx.tc.queue_status() == {
        "pending": 0,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "aborted": 0,
    }


def scenario_task__dependencies_order_tasks(ctx: Context) -> None:
    from kernel.client import StringTask

    path = os.path.join(ctx.tmp, f"order-{uuid.uuid4().hex}")
    gate, wait = ctx.gate()
    first = ctx.tc.run(StringTask(wait + f"open({path!r}, 'a').write('first\\n')"))
    second = ctx.tc.run(StringTask(f"open({path!r}, 'a').write('second\\n')", after=[first]))
    ctx.open_gate(gate)
    ctx.tc.barrier([first, second])
    with open(path) as f:
        assert f.read() == "first\nsecond\n"


def scenario_task__runs_one_by_one_from_threads_get_unique_ids(ctx: Context) -> None:
    import threading

    from kernel.client import MapTask

    batcher = getattr(ctx.tc.task_controller, "batcher", None)
    if batcher is not None:
        batcher.block_size = 16  # several blocks, reserved ahead while submitting
    ids: dict[int, list[int]] = {0: [], 1: []}

    def submit(k: int) -> None:
        ids[k] = [ctx.tc.run(MapTask(abs, (-i,))) for i in range(150)]

    threads = [threading.Thread(target=submit, args=(k,)) for k in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(v) == 150 and v == sorted(v) for v in ids.values()), ids
    assert len(set(ids[0]) | set(ids[1])) == 300
    for k in ids:
        results = ctx.tc.get_task_results(ids[k], block=True)
        assert [r.results for r in results] == list(range(150))


def scenario_task__unserializable_task_raises_from_run(ctx: Context) -> None:
    import threading

    from kernel.client import MapTask
    from kernel.error import SerializationError

    lock = threading.Lock()
    _raises(SerializationError, ctx.tc.run, MapTask(lambda: lock))
    assert ctx.tc.run(MapTask(abs, (-3,)), block=True).results == 3


# ---------------------------------------------------------------------------
# Magics, in an IPython InteractiveShell
# ---------------------------------------------------------------------------


def _shell() -> Any:
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance()


def _run(shell: Any, cell: str) -> tuple[Any, str]:
    """Run a cell; return its ExecutionResult and what it printed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = shell.run_cell(cell)
    return result, out.getvalue()


def scenario_magic__activate_loads_magics_and_px_runs_a_line(ctx: Context) -> None:
    shell = _shell()
    ctx.mec.activate()
    result, out = _run(shell, "%px pxv = id + 1; print('engine', id)")
    assert result.success, result.error_in_exec
    assert ctx.mec.pull("pxv") == [i + 1 for i in ctx.ids]
    for i in ctx.ids:
        assert f"[stdout:{i}] engine {i}" in out, out
    assert "pxv" not in shell.user_ns


def scenario_magic__px_cell_runs_a_block(ctx: Context) -> None:
    shell = _shell()
    ctx.mec.activate()
    result, out = _run(shell, "%%px\ntotal = 0\nfor k in range(4):\n    total += k\nprint(total)\n")
    assert result.success, result.error_in_exec
    assert ctx.mec.pull("total") == [6] * ctx.n
    assert out.count("6") >= ctx.n, out


def scenario_magic__px_errors_show_each_engine(ctx: Context) -> None:
    from kernel.error import CompositeError

    shell = _shell()
    ctx.mec.activate()
    result, out = _run(shell, "%px raise KeyError('k%d' % id)")
    assert not result.success
    assert isinstance(result.error_in_exec, CompositeError)
    for i in ctx.ids:
        assert f"[engine {i}] KeyError" in out, out
    assert "Traceback" in out


def scenario_magic__autopx_on_and_off(ctx: Context) -> None:
    shell = _shell()
    ctx.mec.activate()
    result, out = _run(shell, "%autopx")
    assert result.success and "enabled" in out, out
    result, out = _run(shell, "ap = 2\nif ap:\n    for j in range(2):\n        print('j', j)\n")
    assert result.success, result.error_in_exec
    assert "ap" not in shell.user_ns, "with %autopx on, cells must not run locally"
    assert ctx.mec.pull("ap") == [2] * ctx.n
    assert f"[stdout:{ctx.ids[0]}] j 0" in out, out
    result, out = _run(shell, "1/0")
    assert not result.success and "ZeroDivisionError" in out
    result, out = _run(shell, "%autopx")
    assert result.success and "disabled" in out, out
    result, _ = _run(shell, "local_only = 9")
    assert shell.user_ns["local_only"] == 9
    assert all("local_only" not in k for k in ctx.mec.keys())


def scenario_magic__result_shows_last_command(ctx: Context) -> None:
    shell = _shell()
    ctx.mec.activate()
    _run(shell, "%px last_cmd = 1")
    result, out = _run(shell, "%result")
    assert result.success, result.error_in_exec
    assert "last_cmd = 1" in out, out
    assert [d["input"] for d in result.result] == ["last_cmd = 1"] * ctx.n


def scenario_magic__px_output_streams_while_the_command_runs(ctx: Context) -> None:
    """Where the connection streams output, a %%px cell's first line shows
    before the cell finishes (the cell waits for a gate that only opens once
    that line has been seen); elsewhere it shows when the cell is done."""
    import contextlib
    import io
    import time

    shell = _shell()
    ctx.mec.activate()
    first = ctx.ids[0]
    ctx.mec.targets = first
    gate, wait = ctx.gate(timeout=20)
    cell = "%%px\nprint('early')\n" + wait + "print('late')\n"
    out = io.StringIO()
    probe = lambda *_: None  # noqa: E731
    streaming = ctx.mec.add_output_observer(probe)
    ctx.mec.remove_output_observer(probe)
    opened_early = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if f"[stdout:{first}] early" in out.getvalue():
                opened_early.set()
                ctx.open_gate(gate)
                return
            time.sleep(0.01)

    if streaming:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    else:
        ctx.open_gate(gate)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        result = shell.run_cell(cell)
    assert result.success, (result.error_in_exec, out.getvalue())
    text = out.getvalue()
    if streaming:
        assert opened_early.is_set(), text
    assert text.count(f"[stdout:{first}] early") == 1, text
    assert f"[stdout:{first}] late" in text, text
    assert text.index("early") < text.index("late"), text


def scenario_magic__with_block_typed_into_ipython_runs_on_engines(ctx: Context) -> None:
    shell = _shell()
    shell.user_ns["mec"] = ctx.mec
    result, out = _run(
        shell,
        "from kernel.multiengineclient import remote\n"
        "with mec:\n"
        "    remote()\n"
        "    typed = id + 1\n",
    )
    assert result.success, (result.error_in_exec, out)
    assert "typed" not in shell.user_ns
    assert ctx.mec.pull("typed") == [i + 1 for i in ctx.ids]


def scenario_magic__px_without_active_client_explains(ctx: Context) -> None:
    from kernel import magic

    shell = _shell()
    ctx.mec.activate()
    saved = magic.active_client()
    magic.set_active_client(None)
    try:
        result, out = _run(shell, "%px a = 1")
    finally:
        magic.set_active_client(saved)
    assert not result.success
    assert "mec.activate()" in out, out


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------


def _reset(ctx: Context) -> None:
    mec = ctx.mec
    mec.block = True
    mec.targets = "all"
    mec.flush()
    mec.clear_queue()
    mec.reset()
    mec.clear_properties()
    if ctx.tc is not None:
        ctx.tc.clear()


def _local(n: int) -> tuple[Any, Any, Any, Any]:
    from kernel import client

    cluster = client.LocalCluster(n)
    return cluster, cluster.multiengine_client(), cluster.task_client(), cluster.multiengine_client


def _processes(
    n: int, cluster_dir: str | None = None, adapter: str = "fc"
) -> tuple[Any, Any, Any, Any]:
    from kernel import client
    from kernel.testing.processes import LocalCluster

    cluster = LocalCluster(cluster_dir=cluster_dir, controller_args=[f"--adapter={adapter}"])
    try:
        cluster.start(n_engines=n)
        path = cluster.cluster_dir.path
        mec = client.get_multiengine_client(cluster_dir=path, adapter=adapter)
        tc = client.get_task_client(cluster_dir=path, adapter=adapter)
    except BaseException:
        cluster.stop()
        raise
    return (
        cluster,
        mec,
        tc,
        lambda: client.get_multiengine_client(cluster_dir=path, adapter=adapter),
    )


def main(argv: list[str] | None = None) -> int:
    """Run one group of scenarios; write their outcomes as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--backend",
        choices=["local", "processes", "processes-pb", "processes-native"],
        default="local",
    )
    parser.add_argument("--group", choices=GROUPS, required=True)
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--cluster-dir", default=None)
    parser.add_argument("out")
    args = parser.parse_args(argv)
    # SIGTERM (a test's timeout) unwinds normally, so the cluster is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated by SIGTERM"))

    if args.backend == "local":
        cluster, mec, tc, new_mec = _local(args.engines)
    else:
        adapter = {"processes-pb": "pb", "processes-native": "native"}.get(args.backend, "fc")
        cluster, mec, tc, new_mec = _processes(args.engines, args.cluster_dir, adapter)
    outcomes: dict[str, str | None] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="txkernel-scenarios-") as tmp:
            ctx = Context(args.backend, mec, tc, new_mec, tmp)
            for name, scenario in scenarios(args.group).items():
                if args.only and name not in args.only:
                    continue
                try:
                    _reset(ctx)
                    scenario(ctx)
                except BaseException:
                    outcomes[name] = traceback.format_exc()
                else:
                    outcomes[name] = None
    finally:
        with open(args.out, "w") as f:
            json.dump(outcomes, f)
        cluster.stop()
    return 0


def _kill_if_ours(pid: int) -> None:
    """SIGKILL ``pid`` if it is still a txkernel process (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"txkernel" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


#: The backends a group of scenarios can run on. All but ``local`` start a real
#: controller and engine processes (Foolscap, PB, the native transport).
BACKENDS = ("local", "processes", "processes-pb", "processes-native")


def outcomes_fixture(group: str, backends: tuple[str, ...] = BACKENDS) -> Any:
    """A module-scoped pytest fixture, parametrized by backend, firing the
    outcomes of ``group`` (:func:`run_in_child`); process backends are marked
    slow. Assign it to ``outcomes`` in a test module."""
    import pytest

    params = [
        pytest.param(b, id=b, marks=() if b == "local" else pytest.mark.slow) for b in backends
    ]

    @pytest.fixture(scope="module", params=params)
    def outcomes(request: Any, tmp_path_factory: Any) -> dict[str, str | None]:
        workdir = str(tmp_path_factory.mktemp(f"{group}-{request.param}"))
        return run_in_child(group, request.param, workdir)

    return outcomes


def run_in_child(
    group: str,
    backend: str,
    workdir: str,
    engines: int = 3,
    timeout: float = 200,
    env: dict[str, str] | None = None,
) -> dict[str, str | None]:
    """Run ``group`` on ``backend`` in a child process; its outcomes by name.

    Every process it started is gone on return: the child is stopped
    (SIGTERM, then SIGKILL), and so is any controller or engine whose pid
    file is left in its cluster directory.

    :raises RuntimeError: the child did not report, with its output.
    """
    from kernel.clusterdir import ClusterDir
    from kernel.testing.processes import subprocess_env

    out = os.path.join(workdir, f"{group}-{backend}.json")
    cluster_dir = os.path.join(workdir, f"cluster-{group}-{backend}")
    argv = [
        sys.executable,
        "-m",
        "tests.client_scenarios",
        f"--backend={backend}",
        f"--group={group}",
        f"--engines={engines}",
        f"--cluster-dir={cluster_dir}",
        out,
    ]
    child_env = subprocess_env(env=env)
    child_env.setdefault("TXKERNEL_PROGRESS", "0")
    proc = subprocess.Popen(
        argv,
        env=child_env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        output = f"(timed out after {timeout} s)\n{output}"
    finally:
        if os.path.isdir(cluster_dir):
            for pid in ClusterDir(cluster_dir).pids().values():
                _kill_if_ours(pid)
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise RuntimeError(
            f"the scenario child ({' '.join(argv)}) exited with {proc.returncode} "
            f"without reporting:\n{output}"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
