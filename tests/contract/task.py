"""The task contract: :class:`TaskControllerContract`.

Every test drives ``cluster.task_controller`` (an
:class:`~kernel.interfaces.ITaskController`) and, to set engine properties or
interleave direct commands, ``cluster.multiengine``; it uses nothing but the
interfaces and the :class:`~tests.contract.ClusterHarness` methods, so a
transport runs this very class with engines in other processes.

Functions sent to engines are defined inside the tests (or built by the
factories below), so cloudpickle carries them by value: engines need not be
able to import this module. Engine-side state (attempt counters, logs, gates)
lives in files in a temporary directory, which engines on this machine share.
No test depends on how long anything takes.
"""

from __future__ import annotations

import os
import random
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from kernel.dependency import Dependency, depend, require
from kernel.error import (
    DependencyTimeout,
    EngineError,
    ImpossibleDependency,
    InvalidDependency,
    InvalidTaskID,
    TaskAborted,
    TaskAlreadyCompleted,
)
from kernel.interfaces import ITaskController, ITaskSubmission
from kernel.task import MapTask, StringTask, TaskResult

#: Upper bound on any single wait in these tests (seconds).
WAIT = 30


async def forget_all_tasks(task_controller) -> None:
    """Abort every unfinished task and clear every finished one (for a
    harness's ``reset``), using only the ITaskController interface."""
    from kernel.error import TaskError

    status = await task_controller.queue_status(verbose=True)
    for tid in status["pending"] + status["running"]:
        try:
            await task_controller.abort(tid)
        except TaskError:
            pass  # finished meanwhile (e.g. a dependent failed when its dependency was aborted)
    await task_controller.clear()


async def until(check, what: str, timeout: float = WAIT) -> None:
    """Poll the coroutine function ``check`` until it returns true (bounded)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02)


async def result(tc, taskid) -> TaskResult:
    """The TaskResult of ``taskid``, waiting (bounded) for it."""
    return await tc.get_task_result(taskid, block=True).addTimeout(WAIT, reactor)


def open_gate(path) -> None:
    with open(path, "w"):
        pass


# -- engine-side functions (built here so they travel by value) -------------


def gated(gate: str, value=None, log: str | None = None, tag=None):
    """A function that appends ``tag`` to ``log`` when it starts, waits (at
    most a minute) until the file ``gate`` exists, and returns ``value``."""

    def wait_for_gate():
        import os
        import time

        if log is not None:
            with open(log, "a") as f:
                f.write(f"{tag}\n")
        t0 = time.monotonic()
        while not os.path.exists(gate):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("gate never opened")
            time.sleep(0.005)
        return value

    return wait_for_gate


def gate_code(gate: str) -> str:
    """Source that blocks until ``gate`` exists (at most a minute)."""
    return (
        "import os as _g_os, time as _g_time\n"
        "_g_t0 = _g_time.monotonic()\n"
        f"while not _g_os.path.exists({gate!r}):\n"
        "    if _g_time.monotonic() - _g_t0 > 60:\n"
        "        raise RuntimeError('gate never opened')\n"
        "    _g_time.sleep(0.005)\n"
    )


def fails_until(counter: str, n_failures: int, value):
    """A function that fails its first ``n_failures`` calls, then returns
    ``value``. Calls are counted as bytes appended to the file ``counter``
    (one atomic append each, so concurrent engines count correctly)."""

    def flaky():
        import os

        fd = os.open(counter, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, b"x")
            count = os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            os.close(fd)
        if count <= n_failures:
            raise ValueError(f"attempt {count} fails")
        return value

    return flaky


def calls(counter: str) -> int:
    """How many times a :func:`fails_until` function was called."""
    return os.path.getsize(counter) if os.path.exists(counter) else 0


def logger(log: str, line: str):
    """A function that appends ``line`` to ``log`` and returns it."""

    def write():
        with open(log, "a") as f:
            f.write(f"{line}\n")
        return line

    return write


async def tasks_waiting_on_every_engine(multiengine) -> bool:
    """Does every engine hold a task waiting behind the one it runs?"""
    statuses = await multiengine.queue_status()
    return all(
        any(str(q).startswith("run_task(") for q in status["queue"]) for _, status in statuses
    )


async def kill_then_check_each_task_ran_once_elsewhere(cluster, taskids, victim, gate, log):
    """Kill engine ``victim`` while it holds gated tasks (one running, the
    rest sent ahead), open the gate, and check that every task in
    ``taskids`` succeeded on another engine, each having run there exactly
    once and only the running one having started on the victim. Each task
    logs ``"<i> <engine id>"`` to ``log`` when it starts (``i`` its index
    in ``taskids``). A new engine replaces the victim afterwards."""
    tc = cluster.task_controller
    await cluster.kill_engine(victim)
    open_gate(gate)
    await tc.barrier(taskids).addTimeout(WAIT, reactor)
    for t in taskids:
        tr = await tc.get_task_result(t)
        assert tr.status == "succeeded" and tr.engine_id != victim
    runs = [line.split() for line in read_lines(log)]
    on_victim = [tag for tag, engine in runs if int(engine) == victim]
    elsewhere = [tag for tag, engine in runs if int(engine) != victim]
    assert len(on_victim) == 1  # only its running task had started there
    assert sorted(elsewhere, key=int) == [str(i) for i in range(len(taskids))]
    await cluster.add_engine()


def read_lines(path) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def events_per_engine(path) -> dict[str, list[str]]:
    """The ``"<engine id> <event>"`` lines of a log file, as ``{engine id: [events]}``."""
    per_engine: dict[str, list[str]] = {}
    for line in read_lines(path):
        engine, what = line.split()
        per_engine.setdefault(engine, []).append(what)
    return per_engine


class TaskControllerContract:
    """Tests of ITaskController against the ``cluster`` fixture."""

    # -- basics --------------------------------------------------------------

    def test_provides_interface(self, cluster):
        assert verifyObject(ITaskController, cluster.task_controller)
        assert verifyObject(ITaskSubmission, cluster.task_controller)

    @pytest_twisted.ensureDeferred
    async def test_map_task_result_and_metadata(self, cluster):
        tc = cluster.task_controller
        taskid = await tc.run(MapTask(lambda x, y=1: x * y, args=(6,), kwargs={"y": 7}))
        assert isinstance(taskid, int)
        tr = await result(tc, taskid)
        ids = await cluster.multiengine.get_ids()
        assert tr.taskid == taskid
        assert tr.results == 42
        assert tr.status == "succeeded"
        assert tr.failure is None
        assert tr.engine_id in ids
        assert tr.submitted is not None and tr.started is not None
        assert tr.completed >= tr.started and tr.duration >= 0
        tr.raise_exception()  # a success raises nothing

    @pytest_twisted.ensureDeferred
    async def test_string_task_pushes_runs_and_pulls(self, cluster):
        tc = cluster.task_controller
        task = StringTask("c = a + b\nprint('sum', c)", pull=["c", "a"], push={"a": 2, "b": 3})
        tr = await result(tc, await tc.run(task))
        assert tr.results == {"c": 5, "a": 2}
        assert tr.ns.c == 5 and tr.ns["a"] == 2
        assert tr.stdout == "sum 5\n"

    @pytest_twisted.ensureDeferred
    async def test_string_task_pull_of_undefined_name_fails_with_name_error(self, cluster):
        tc = cluster.task_controller
        tr = await result(tc, await tc.run(StringTask("x = 1", pull="nope")))
        assert tr.status == "failed"
        with pytest.raises(NameError, match="nope"):
            tr.raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_failed_task_reraises_original_exception_type(self, cluster):
        tc = cluster.task_controller

        def boom():
            raise KeyError("missing thing")

        tr = await result(tc, await tc.run(MapTask(boom)))
        assert tr.status == "failed"
        assert tr.failure.check(KeyError)
        with pytest.raises(KeyError, match="missing thing"):
            tr.raise_exception()
        with pytest.raises(KeyError):
            _ = tr.results

    @pytest_twisted.ensureDeferred
    async def test_get_task_result_without_block_is_none_until_done(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        taskid = await tc.run(MapTask(gated(gate, "done")))
        assert await tc.get_task_result(taskid) is None
        assert await tc.get_task_result(taskid, block=False) is None
        open_gate(gate)
        assert (await result(tc, taskid)).results == "done"
        assert (await tc.get_task_result(taskid)).results == "done"

    @pytest_twisted.ensureDeferred
    async def test_unknown_taskid_fails_with_invalid_task_id(self, cluster):
        tc = cluster.task_controller
        with pytest.raises(InvalidTaskID):
            await tc.get_task_result(10**9)
        with pytest.raises(InvalidTaskID):
            await tc.abort(10**9)
        with pytest.raises(InvalidTaskID):
            await tc.barrier([10**9])

    @pytest_twisted.ensureDeferred
    async def test_spin_fires_none(self, cluster):
        assert await cluster.task_controller.spin() is None

    @pytest_twisted.ensureDeferred
    async def test_tasks_spread_over_engines(self, cluster, tmp_path):
        """With every engine busy on a gated task, each task is on its own engine."""
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        n = cluster.n_engines
        taskids = [await tc.run(MapTask(gated(gate))) for _ in range(n)]
        open_gate(gate)
        engines = {(await result(tc, t)).engine_id for t in taskids}
        assert len(engines) == n

    # -- barrier, queue_status, clear -------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_barrier_fires_once_every_task_is_done(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        taskids = [await tc.run(MapTask(gated(gate, i))) for i in range(3)]
        taskids.append(await tc.run(MapTask(lambda: 1 / 0)))
        d = tc.barrier(taskids)
        assert not d.called
        open_gate(gate)
        assert await d.addTimeout(WAIT, reactor) is None
        for t in taskids:
            assert await tc.get_task_result(t) is not None

    @pytest_twisted.ensureDeferred
    async def test_queue_status_counts_and_lists(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        ok = await tc.run(MapTask(lambda: 1))
        bad = await tc.run(MapTask(lambda: 1 / 0))
        await tc.barrier([ok, bad])
        running = [await tc.run(MapTask(gated(gate))) for _ in range(cluster.n_engines)]
        extra = await tc.run(MapTask(gated(gate)))  # every engine is busy

        async def all_running():
            s = await tc.queue_status(verbose=True)
            return set(running) <= set(s["running"])

        await until(all_running, "the gated tasks to run")
        verbose = await tc.queue_status(verbose=True)
        assert verbose["succeeded"] == [ok]
        assert verbose["failed"] == [bad]
        assert extra in verbose["pending"]
        assert verbose["aborted"] == []
        counts = await tc.queue_status()
        assert counts == {k: len(v) for k, v in verbose.items()}
        open_gate(gate)
        await tc.barrier(running + [extra])
        counts = await tc.queue_status()
        assert counts["succeeded"] == len(running) + 2
        assert counts["pending"] == counts["running"] == 0

    @pytest_twisted.ensureDeferred
    async def test_clear_forgets_finished_tasks(self, cluster):
        tc = cluster.task_controller
        a = await tc.run(MapTask(lambda: 1))
        b = await tc.run(MapTask(lambda: 2))
        await tc.barrier([a, b])
        await tc.clear([a])
        with pytest.raises(InvalidTaskID):
            await tc.get_task_result(a)
        assert (await tc.get_task_result(b)).results == 2
        await tc.clear()
        with pytest.raises(InvalidTaskID):
            await tc.get_task_result(b)
        status = await tc.queue_status()
        assert status["succeeded"] == 0

    @pytest_twisted.ensureDeferred
    async def test_clear_with_unknown_id_fails(self, cluster):
        with pytest.raises(InvalidTaskID):
            await cluster.task_controller.clear([10**9])

    # -- retries and recovery ---------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_task_failing_twice_succeeds_with_two_retries(self, cluster, tmp_path):
        tc = cluster.task_controller
        counter = str(tmp_path / "count")
        tr = await result(
            tc, await tc.run(MapTask(fails_until(counter, 2, "third time"), retries=2))
        )
        assert tr.results == "third time"
        assert calls(counter) == 3

    @pytest_twisted.ensureDeferred
    async def test_retries_spent_fails_with_the_last_error(self, cluster, tmp_path):
        tc = cluster.task_controller
        counter = str(tmp_path / "count")
        tr = await result(tc, await tc.run(MapTask(fails_until(counter, 5, "never"), retries=1)))
        assert tr.status == "failed"
        with pytest.raises(ValueError, match="attempt 2 fails"):
            tr.raise_exception()
        assert calls(counter) == 2

    @pytest_twisted.ensureDeferred
    async def test_retry_prefers_another_engine(self, cluster, tmp_path):
        tc = cluster.task_controller
        log = str(tmp_path / "log")
        task = StringTask(
            f"open({log!r}, 'a').write(f'{{id}}\\n')\nraise RuntimeError('no')", retries=1
        )
        tr = await result(tc, await tc.run(task))
        assert tr.status == "failed"
        first, second = read_lines(log)
        assert first != second

    @pytest_twisted.ensureDeferred
    async def test_recovery_task_runs_under_the_same_taskid(self, cluster):
        tc = cluster.task_controller
        task = MapTask(lambda: 1 / 0, recovery_task=MapTask(lambda: "recovered"))
        taskid = await tc.run(task)
        tr = await result(tc, taskid)
        assert tr.taskid == taskid
        assert tr.status == "succeeded"
        assert tr.results == "recovered"

    @pytest_twisted.ensureDeferred
    async def test_recovery_task_runs_after_retries_and_can_fail(self, cluster, tmp_path):
        tc = cluster.task_controller
        counter = str(tmp_path / "count")

        def recovery():
            raise OSError("recovery failed too")

        task = MapTask(fails_until(counter, 9, None), retries=1, recovery_task=MapTask(recovery))
        tr = await result(tc, await tc.run(task))
        assert calls(counter) == 2
        with pytest.raises(OSError, match="recovery failed too"):
            tr.raise_exception()

    # -- functional dependencies -------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_depend_on_properties_picks_the_matching_engine(self, cluster):
        tc = cluster.task_controller
        ids = await cluster.multiengine.get_ids()
        chosen = ids[-1]
        await cluster.multiengine.set_properties({"role": "special"}, targets=[chosen])
        for _ in range(3):
            task = MapTask(lambda: "ok", depend=lambda p: p.get("role") == "special")
            tr = await result(tc, await tc.run(task))
            assert tr.results == "ok"
            assert tr.engine_id == chosen

    @pytest_twisted.ensureDeferred
    async def test_unmet_dependency_never_tries_an_engine_twice(self, cluster, tmp_path):
        tc = cluster.task_controller
        ids = await cluster.multiengine.get_ids()
        for engine_id in ids:
            await cluster.multiengine.set_properties({"eid": engine_id}, targets=[engine_id])
        chosen = ids[-1]
        log = str(tmp_path / "log")

        def check(props):
            with open(log, "a") as f:
                f.write(f"{props['eid']}\n")
            return props["eid"] == chosen

        tr = await result(tc, await tc.run(MapTask(lambda: "ran", depend=check)))
        assert tr.results == "ran" and tr.engine_id == chosen
        tried = [int(x) for x in read_lines(log)]
        assert len(tried) == len(set(tried))
        assert tried[-1] == chosen

    @pytest_twisted.ensureDeferred
    async def test_dependency_no_engine_meets_fails_with_impossible_dependency(self, cluster):
        tc = cluster.task_controller
        tr = await result(tc, await tc.run(MapTask(lambda: 1, depend=lambda p: False)))
        assert tr.status == "failed"
        with pytest.raises(ImpossibleDependency):
            tr.raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_require_decorator(self, cluster):
        tc = cluster.task_controller

        @require("json")
        def dumps():
            return json.dumps([1, 2])  # noqa: F821 - bound by @require on the engine

        @require("no_such_module_for_txkernel_tests")
        def never():
            return 1

        assert (await result(tc, await tc.run(MapTask(dumps)))).results == "[1, 2]"
        tr = await result(tc, await tc.run(MapTask(never)))
        with pytest.raises(ImpossibleDependency):
            tr.raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_depend_decorator_runs_dependency_on_engines(self, cluster, tmp_path):
        tc = cluster.task_controller
        evaluated = str(tmp_path / "evaluated")

        def platform_is(name):
            import sys

            open(evaluated, "w").close()
            return sys.platform == name

        @depend(platform_is, sys.platform)
        def here():
            return "ran"

        assert (await result(tc, await tc.run(MapTask(here)))).results == "ran"
        assert os.path.exists(evaluated)

        @depend(platform_is, "no-such-platform")
        def nowhere():
            return "ran"

        tr = await result(tc, await tc.run(MapTask(nowhere)))
        with pytest.raises(ImpossibleDependency):
            tr.raise_exception()

    # -- graph dependencies ------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_after_chain_runs_in_order(self, cluster, tmp_path):
        tc = cluster.task_controller
        log = str(tmp_path / "log")
        gate = str(tmp_path / "gate")
        first = await tc.run(MapTask(gated(gate)))
        taskids = [first]
        for i in range(10):
            taskids.append(await tc.run(MapTask(logger(log, str(i)), after=[taskids[-1]])))
        assert read_lines(log) == []
        open_gate(gate)
        await tc.barrier(taskids).addTimeout(WAIT, reactor)
        assert read_lines(log) == [str(i) for i in range(10)]

    @pytest_twisted.ensureDeferred
    async def test_after_accepts_task_results_and_dependency_objects(self, cluster, tmp_path):
        tc = cluster.task_controller
        a = await tc.run(MapTask(lambda: 1))
        tra = await result(tc, a)
        b = await tc.run(MapTask(lambda: 2, after=tra))
        c = await tc.run(MapTask(lambda: 3, after=Dependency([a, b])))
        assert (await result(tc, c)).results == 3

    @pytest_twisted.ensureDeferred
    async def test_random_dag_of_100_tasks_completes_in_a_valid_order(self, cluster, tmp_path):
        tc = cluster.task_controller
        log = str(tmp_path / "log")
        rng = random.Random(2718)
        parents: dict[int, list[int]] = {}
        node_task: dict[int, int] = {}
        for node in range(100):
            k = rng.randint(0, min(node, 3))
            parents[node] = rng.sample(range(node), k) if k else []
            after = [node_task[p] for p in parents[node]]

            def step(node=node):
                with open(log, "a") as f:
                    f.write(f"start {node}\n")
                with open(log, "a") as f:
                    f.write(f"end {node}\n")
                return node

            node_task[node] = await tc.run(MapTask(step, after=after or None))
        await tc.barrier(list(node_task.values())).addTimeout(WAIT, reactor)
        lines = read_lines(log)
        pos = {line: i for i, line in enumerate(lines)}
        assert len(lines) == 200
        for node, ps in parents.items():
            for p in ps:
                assert pos[f"end {p}"] < pos[f"start {node}"], (p, node)
        for node, t in node_task.items():
            assert (await tc.get_task_result(t)).results == node

    @pytest_twisted.ensureDeferred
    async def test_follow_runs_where_the_dependency_ran(self, cluster):
        tc = cluster.task_controller
        for _ in range(3):
            a = await tc.run(MapTask(lambda: 1))
            b = await tc.run(MapTask(lambda: 2, follow=[a]))
            assert (await result(tc, b)).engine_id == (await result(tc, a)).engine_id

    @pytest_twisted.ensureDeferred
    async def test_failure_only_dependency_runs_cleanup_after_a_failure(self, cluster):
        tc = cluster.task_controller
        bad = await tc.run(MapTask(lambda: 1 / 0))
        cleanup = await tc.run(
            MapTask(lambda: "cleaned", after=Dependency([bad], success=False, failure=True))
        )
        assert (await result(tc, cleanup)).results == "cleaned"
        good = await tc.run(MapTask(lambda: 1))
        skipped = await tc.run(
            MapTask(lambda: "cleaned", after=Dependency([good], success=False, failure=True))
        )
        with pytest.raises(ImpossibleDependency):
            (await result(tc, skipped)).raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_any_dependency_runs_after_the_first_success(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        slow = await tc.run(MapTask(gated(gate)))
        fast = await tc.run(MapTask(lambda: 1))
        either = await tc.run(MapTask(lambda: "ran", after=Dependency([slow, fast], all=False)))
        assert (await result(tc, either)).results == "ran"
        assert await tc.get_task_result(slow) is None
        open_gate(gate)
        await result(tc, slow)

    @pytest_twisted.ensureDeferred
    async def test_unknown_dependency_fails_at_once(self, cluster):
        tc = cluster.task_controller
        tr = await result(tc, await tc.run(MapTask(lambda: 1, after=[10**9])))
        assert tr.status == "failed" and tr.started is None
        with pytest.raises(InvalidDependency):
            tr.raise_exception()
        assert issubclass(InvalidDependency, ImpossibleDependency)

    @pytest_twisted.ensureDeferred
    async def test_follow_all_across_several_engines_is_impossible(self, cluster):
        tc = cluster.task_controller
        ids = await cluster.multiengine.get_ids()
        a_engine, b_engine = ids[0], ids[1]
        await cluster.multiengine.set_properties({"pin": "a"}, targets=[a_engine])
        await cluster.multiengine.set_properties({"pin": "b"}, targets=[b_engine])
        a = await tc.run(MapTask(lambda: 1, depend=lambda p: p.get("pin") == "a"))
        b = await tc.run(MapTask(lambda: 2, depend=lambda p: p.get("pin") == "b"))
        assert (await result(tc, a)).engine_id == a_engine
        assert (await result(tc, b)).engine_id == b_engine
        tr = await result(tc, await tc.run(MapTask(lambda: 3, follow=[a, b])))
        with pytest.raises(ImpossibleDependency, match="different engines"):
            tr.raise_exception()
        # with all=False it runs on either one
        tr = await result(
            tc, await tc.run(MapTask(lambda: 3, follow=Dependency([a, b], all=False)))
        )
        assert tr.engine_id in (a_engine, b_engine)

    @pytest_twisted.ensureDeferred
    async def test_failed_dependency_under_success_only_is_impossible(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        bad = await tc.run(MapTask(lambda: 1 / 0))
        await tc.barrier([bad])
        tr = await result(tc, await tc.run(MapTask(lambda: 1, after=[bad])))
        with pytest.raises(ImpossibleDependency, match="failed"):
            tr.raise_exception()

        # a dependency that fails later makes its waiting dependents fail then
        wait = gated(gate)

        def fail_later():
            wait()
            raise RuntimeError("late failure")

        late = await tc.run(MapTask(fail_later))
        ok = await tc.run(MapTask(lambda: 1))
        waiting = await tc.run(MapTask(lambda: 1, after=[ok, late]))
        chained = await tc.run(MapTask(lambda: 1, after=[waiting]))
        assert await tc.get_task_result(waiting) is None
        open_gate(gate)
        for t in (waiting, chained):
            with pytest.raises(ImpossibleDependency):
                (await result(tc, t)).raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_all_dependencies_failed_under_any_is_impossible(self, cluster):
        tc = cluster.task_controller
        x = await tc.run(MapTask(lambda: 1 / 0))
        y = await tc.run(MapTask(lambda: [][1]))
        tr = await result(tc, await tc.run(MapTask(lambda: 1, after=Dependency([x, y], all=False))))
        with pytest.raises(ImpossibleDependency):
            tr.raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_dependency_timeout(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        blocker = await tc.run(MapTask(gated(gate)))
        waiting = await tc.run(MapTask(lambda: 1, after=[blocker], timeout=0.2))
        tr = await result(tc, waiting)
        assert tr.status == "failed"
        with pytest.raises(DependencyTimeout):
            tr.raise_exception()
        assert await tc.get_task_result(blocker) is None
        open_gate(gate)
        assert (await result(tc, blocker)).status == "succeeded"

    # -- abort -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_abort_queued_task_removes_it(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        log = str(tmp_path / "log")
        busy = [await tc.run(MapTask(gated(gate))) for _ in range(cluster.n_engines)]
        queued = await tc.run(MapTask(logger(log, "should not run")))
        status = await tc.queue_status(verbose=True)
        assert queued in status["pending"]
        assert await tc.abort(queued) is None
        tr = await result(tc, queued)
        assert tr.status == "aborted"
        with pytest.raises(TaskAborted):
            tr.raise_exception()
        open_gate(gate)
        await tc.barrier(busy)
        after = await tc.run(MapTask(lambda: 1))
        await result(tc, after)
        assert read_lines(log) == []
        assert queued in (await tc.queue_status(verbose=True))["aborted"]

    @pytest_twisted.ensureDeferred
    async def test_abort_running_task_interrupts_it(self, cluster, tmp_path):
        tc = cluster.task_controller
        started = str(tmp_path / "started")
        gate = str(tmp_path / "never-opened")

        wait = gated(gate)

        def spin():
            open(started, "w").close()
            wait()

        taskid = await tc.run(MapTask(spin))

        async def is_running():
            return os.path.exists(started)

        await until(is_running, "the task to start")
        await tc.abort(taskid)
        tr = await result(tc, taskid)
        assert tr.status == "aborted"
        with pytest.raises(TaskAborted):
            tr.raise_exception()
        # the engine was interrupted, not left spinning: every engine runs tasks again
        n = cluster.n_engines
        gate2 = str(tmp_path / "gate2")
        more = [await tc.run(MapTask(gated(gate2, i))) for i in range(n)]

        async def all_running():
            return (await tc.queue_status())["running"] == n

        await until(all_running, "a task to run on every engine")
        open_gate(gate2)
        await tc.barrier(more).addTimeout(WAIT, reactor)
        engines = {(await tc.get_task_result(t)).engine_id for t in more}
        assert len(engines) == n

    @pytest_twisted.ensureDeferred
    async def test_abort_of_task_queued_behind_multiengine_commands(self, cluster, tmp_path):
        """A task sent to an engine busy with a multiengine command is aborted
        at once, and interrupted when it starts: the engine is not lost to it."""
        tc = cluster.task_controller
        me = cluster.multiengine
        me_gate = str(tmp_path / "me-gate")
        never = str(tmp_path / "never-opened")
        busy = me.execute(gate_code(me_gate))

        async def executing():
            statuses = await me.queue_status()
            return all(str(st["pending"]).startswith("execute(") for _, st in statuses)

        await until(executing, "the command to run on every engine")
        taskid = await tc.run(MapTask(gated(never)))

        async def sent():
            return taskid in (await tc.queue_status(verbose=True))["running"]

        await until(sent, "the task to be sent to an engine")
        await tc.abort(taskid)
        assert (await result(tc, taskid)).status == "aborted"
        open_gate(me_gate)
        await busy
        n = cluster.n_engines
        gate = str(tmp_path / "gate")
        more = [await tc.run(MapTask(gated(gate, i))) for i in range(n)]

        async def all_running():
            return (await tc.queue_status())["running"] == n

        await until(all_running, "a task to run on every engine")
        open_gate(gate)
        await tc.barrier(more).addTimeout(WAIT, reactor)
        assert len({(await tc.get_task_result(t)).engine_id for t in more}) == n

    @pytest_twisted.ensureDeferred
    async def test_abort_of_finished_task_fails(self, cluster):
        tc = cluster.task_controller
        t = await tc.run(MapTask(lambda: 1))
        await result(tc, t)
        with pytest.raises(TaskAlreadyCompleted):
            await tc.abort(t)

    @pytest_twisted.ensureDeferred
    async def test_abort_of_waiting_task_makes_dependents_impossible(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        blocker = await tc.run(MapTask(gated(gate)))
        waiting = await tc.run(MapTask(lambda: 1, after=[blocker]))
        dependent = await tc.run(MapTask(lambda: 2, after=[waiting]))
        await tc.abort(waiting)
        assert (await result(tc, waiting)).status == "aborted"
        with pytest.raises(ImpossibleDependency):
            (await result(tc, dependent)).raise_exception()
        open_gate(gate)
        await result(tc, blocker)

    # -- engines coming and going -----------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_engine_lost_mid_task_retries_elsewhere(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        where = str(tmp_path / "where")
        code = f"open({where!r}, 'a').write(f'{{id}}\\n')\n" + gate_code(gate) + "x = 'finished'"
        taskid = await tc.run(StringTask(code, pull="x", retries=1))

        async def started():
            return bool(read_lines(where))

        await until(started, "the task to start")
        victim = int(read_lines(where)[0])
        await cluster.kill_engine(victim)
        open_gate(gate)
        tr = await result(tc, taskid)
        assert tr.results == {"x": "finished"}
        assert tr.engine_id != victim
        await cluster.add_engine()

    @pytest_twisted.ensureDeferred
    async def test_engine_lost_mid_task_without_retries_fails_with_engine_error(
        self, cluster, tmp_path
    ):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        where = str(tmp_path / "where")
        code = f"open({where!r}, 'a').write(f'{{id}}\\n')\n" + gate_code(gate)
        taskid = await tc.run(StringTask(code))

        async def started():
            return bool(read_lines(where))

        await until(started, "the task to start")
        await cluster.kill_engine(int(read_lines(where)[0]))
        tr = await result(tc, taskid)
        open_gate(gate)
        assert tr.status == "failed"
        with pytest.raises(EngineError):
            tr.raise_exception()
        await cluster.add_engine()

    @pytest_twisted.ensureDeferred
    async def test_tasks_wait_for_engines_to_register(self, cluster):
        tc = cluster.task_controller
        for engine_id in await cluster.multiengine.get_ids():
            await cluster.kill_engine(engine_id)
        taskid = await tc.run(MapTask(lambda: "ran"))
        assert await tc.get_task_result(taskid) is None
        assert (await tc.queue_status(verbose=True))["pending"] == [taskid]
        await cluster.add_engine()
        assert (await result(tc, taskid)).results == "ran"
        for _ in range(cluster.n_engines - 1):
            await cluster.add_engine()

    # -- sharing engines with the multiengine interface -------------------------

    @pytest_twisted.ensureDeferred
    async def test_multiengine_commands_are_not_starved_by_tasks(self, cluster, tmp_path):
        tc = cluster.task_controller
        me = cluster.multiengine
        gate = str(tmp_path / "gate")
        log = str(tmp_path / "log")
        n = cluster.n_engines
        code = gate_code(gate) + f"open({log!r}, 'a').write(f'{{id}} task\\n')\n"
        taskids = [await tc.run(StringTask(code)) for _ in range(4 * n)]

        async def all_busy():
            return (await tc.queue_status())["running"] >= n

        await until(all_busy, "every engine to run a task")
        d = me.execute(f"open({log!r}, 'a').write(f'{{id}} execute\\n')")

        async def execute_queued():
            statuses = await me.queue_status()
            return all(
                any(str(q).startswith("execute(") for q in status["queue"])
                for _, status in statuses
            )

        await until(execute_queued, "the command to be queued on every engine")
        open_gate(gate)
        await d
        await tc.barrier(taskids).addTimeout(WAIT, reactor)
        per_engine = events_per_engine(log)
        assert sum(v.count("task") for v in per_engine.values()) == 4 * n
        assert len(per_engine) == n
        for engine, events in per_engine.items():
            # the command waited for the one task running when it came, no more
            assert events.index("execute") <= 1, (engine, events)
        # and tasks kept flowing after it
        assert any(events[-1] == "task" for events in per_engine.values())

    # -- tasks sent ahead to engines (pipelined dispatch) --------------------------

    @pytest_twisted.ensureDeferred
    async def test_tasks_are_pipelined_by_default(self, cluster, tmp_path):
        """With every engine busy, each engine already holds its next task."""
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        n = cluster.n_engines
        taskids = [await tc.run(StringTask(gate_code(gate))) for _ in range(3 * n)]
        await until(
            lambda: tasks_waiting_on_every_engine(cluster.multiengine),
            "a second task on every engine",
        )
        assert (await tc.queue_status())["running"] == n
        open_gate(gate)
        await tc.barrier(taskids).addTimeout(WAIT, reactor)

    @pytest_twisted.ensureDeferred
    async def test_commands_overtake_tasks_sent_ahead(self, cluster, tmp_path):
        """A multiengine command waits for the running task only, not for the
        task already sent to the engine behind it."""
        tc = cluster.task_controller
        me = cluster.multiengine
        gate = str(tmp_path / "gate")
        log = str(tmp_path / "log")
        n = cluster.n_engines
        code = f"open({log!r}, 'a').write(f'{{id}} task\\n')\n" + gate_code(gate)
        taskids = [await tc.run(StringTask(code)) for _ in range(2 * n)]

        async def started():
            return len(read_lines(log)) == n

        await until(started, "a task to start on every engine")
        await until(lambda: tasks_waiting_on_every_engine(me), "a second task on every engine")
        d = me.execute(f"open({log!r}, 'a').write(f'{{id}} execute\\n')")

        async def execute_first():
            statuses = await me.queue_status()
            return all(
                [str(q).split("(")[0] for q in status["queue"]][:2] == ["execute", "run_task"]
                for _, status in statuses
            )

        await until(execute_first, "the command to wait ahead of the queued task on every engine")
        open_gate(gate)
        await d
        await tc.barrier(taskids).addTimeout(WAIT, reactor)
        per_engine = events_per_engine(log)
        assert len(per_engine) == n
        for engine, events in per_engine.items():
            # (the task it held may have moved on to an engine that ran out)
            assert events[:2] == ["task", "execute"], (engine, events)
        assert sum(events.count("task") for events in per_engine.values()) == 2 * n

    @pytest_twisted.ensureDeferred
    async def test_abort_of_a_task_sent_ahead_never_runs_it(self, cluster, tmp_path):
        tc = cluster.task_controller
        me = cluster.multiengine
        gate = str(tmp_path / "gate")
        log = str(tmp_path / "log")
        n = cluster.n_engines
        busy = [await tc.run(MapTask(gated(gate))) for _ in range(n)]
        ahead = [await tc.run(MapTask(logger(log, f"ran {i}"))) for i in range(n)]
        await until(lambda: tasks_waiting_on_every_engine(me), "a task sent ahead to every engine")
        victim = ahead[-1]
        assert victim in (await tc.queue_status(verbose=True))["pending"]
        assert await tc.abort(victim) is None
        tr = await result(tc, victim)
        assert tr.status == "aborted"
        with pytest.raises(TaskAborted):
            tr.raise_exception()
        open_gate(gate)
        await tc.barrier(busy + ahead[:-1]).addTimeout(WAIT, reactor)

        async def idle():
            return all(
                st["pending"] is None and not st["queue"] for _, st in await me.queue_status()
            )

        await until(idle, "every engine to be idle")
        assert sorted(read_lines(log)) == sorted(f"ran {i}" for i in range(n - 1))
        # the engine that held it runs tasks as before
        more = [await tc.run(MapTask(lambda: 1)) for _ in range(2 * n)]
        await tc.barrier(more).addTimeout(WAIT, reactor)

    @pytest_twisted.ensureDeferred
    async def test_an_idle_engine_takes_a_task_waiting_on_a_busy_one(self, cluster, tmp_path):
        """A task sent ahead to an engine that stays busy is moved to an
        engine that has run out of tasks, rather than wait."""
        tc = cluster.task_controller
        n = cluster.n_engines
        gates = [str(tmp_path / f"gate{i}") for i in range(n)]
        log = str(tmp_path / "log")
        busy = [await tc.run(MapTask(gated(g))) for g in gates]
        quick = [await tc.run(MapTask(logger(log, f"quick {i}"))) for i in range(n)]
        await until(
            lambda: tasks_waiting_on_every_engine(cluster.multiengine),
            "a task sent ahead to every engine",
        )
        for g in gates[1:]:
            open_gate(g)
        # every quick task finishes, the one behind the closed gate elsewhere
        await tc.barrier(quick).addTimeout(WAIT, reactor)
        assert sorted(read_lines(log)) == sorted(f"quick {i}" for i in range(n))
        assert busy[0] in (await tc.queue_status(verbose=True))["running"]  # still blocked
        for t in quick:
            assert (await tc.get_task_result(t)).status == "succeeded"
        open_gate(gates[0])
        await tc.barrier(busy).addTimeout(WAIT, reactor)

    @pytest_twisted.ensureDeferred
    async def test_engine_lost_with_tasks_sent_ahead_retries_each_once(self, cluster, tmp_path):
        """Every task on a lost engine, running or sent ahead, runs again
        elsewhere exactly once; none runs twice on the other engines."""
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        log = str(tmp_path / "log")
        n = cluster.n_engines
        taskids = []
        for i in range(2 * n):
            code = f"open({log!r}, 'a').write(f'{i} {{id}}\\n')\n" + gate_code(gate)
            taskids.append(await tc.run(StringTask(code, retries=1)))

        async def started():
            return len(read_lines(log)) == n

        await until(started, "a task to start on every engine")
        await until(
            lambda: tasks_waiting_on_every_engine(cluster.multiengine),
            "a second task on every engine",
        )
        victim = int(read_lines(log)[0].split()[1])
        await kill_then_check_each_task_ran_once_elsewhere(cluster, taskids, victim, gate, log)

    # -- clearing the namespace --------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_clear_after_resets_the_engine_namespace(self, cluster):
        tc = cluster.task_controller
        tr = await result(
            tc, await tc.run(StringTask("leftover = 1", pull="leftover", clear_after=True))
        )
        keys = await cluster.multiengine.keys(targets=[tr.engine_id])
        assert "leftover" not in keys[0]

    @pytest_twisted.ensureDeferred
    async def test_clear_before_resets_the_engine_namespace(self, cluster):
        tc = cluster.task_controller
        await cluster.multiengine.push({"stale": 1})
        tr = await result(
            tc,
            await tc.run(StringTask("found = 'stale' in dir()", pull="found", clear_before=True)),
        )
        assert tr.ns.found is False

    # -- load-balanced map --------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_map_returns_results_in_order(self, cluster):
        tc = cluster.task_controller
        out = await tc.map(lambda x, y: x * y, range(20), range(20, 40))
        assert out == [x * y for x, y in zip(range(20), range(20, 40), strict=True)]

    @pytest_twisted.ensureDeferred
    async def test_mapper_with_chunksize_and_flags(self, cluster, tmp_path):
        tc = cluster.task_controller
        counter = str(tmp_path / "count")
        flaky = fails_until(counter, 1, None)

        def f(x):
            flaky()
            return x + 1

        m = tc.mapper(retries=1, chunksize=3)
        assert await m.map(f, range(10)) == list(range(1, 11))

    @pytest_twisted.ensureDeferred
    async def test_mapper_without_block_fires_taskids(self, cluster):
        tc = cluster.task_controller
        taskids = await tc.mapper(block=False, chunksize=2).map(lambda x: -x, range(5))
        assert len(taskids) == 3
        await tc.barrier(taskids)
        chunks = [(await tc.get_task_result(t)).results for t in taskids]
        assert chunks == [[0, -1], [-2, -3], [-4]]

    @pytest_twisted.ensureDeferred
    async def test_map_failure_raises_the_original_exception(self, cluster):
        tc = cluster.task_controller

        def f(x):
            if x == 3:
                raise ArithmeticError(f"bad {x}")
            return x

        with pytest.raises(ArithmeticError, match="bad 3"):
            await tc.map(f, range(6))

    @pytest_twisted.ensureDeferred
    async def test_parallel_decorator(self, cluster):
        tc = cluster.task_controller

        @tc.parallel(chunksize=2)
        def square(x):
            return x * x

        assert await square(range(7)) == [x * x for x in range(7)]

    # -- submission in batches under reserved taskids ----------------------------

    async def other_task_client(self, cluster):
        """A second client of the same controller (the controller itself in process)."""
        connect = getattr(cluster, "connect", None)
        return cluster.task_controller if connect is None else await connect("task")

    @pytest_twisted.ensureDeferred
    async def test_taskids_are_unique_and_increase_per_client_across_clients(self, cluster):
        tc = cluster.task_controller
        other = await self.other_task_client(cluster)
        first = [await tc.run(MapTask(abs, (-i,))) for i in range(20)]
        theirs = [await other.run(MapTask(abs, (-i,))) for i in range(20)]
        then = [await tc.run(MapTask(abs, (-i,))) for i in range(20, 40)]
        mine = first + then
        assert mine == sorted(mine) and theirs == sorted(theirs)
        assert len(set(mine) | set(theirs)) == 60
        results = await tc.get_task_results(mine, block=True).addTimeout(WAIT, reactor)
        assert [r.results for r in results] == list(range(40))
        results = await other.get_task_results(theirs, block=True).addTimeout(WAIT, reactor)
        assert [r.results for r in results] == list(range(20))

    @pytest_twisted.ensureDeferred
    async def test_reserved_blocks_of_two_clients_do_not_overlap(self, cluster):
        other = await self.other_task_client(cluster)
        a0, a1 = await cluster.task_controller.reserve_taskids(50)
        b0, b1 = await other.reserve_taskids(50)
        assert a1 - a0 == 50 and b1 - b0 == 50
        assert a1 <= b0 or b1 <= a0

    @pytest_twisted.ensureDeferred
    async def test_reserve_taskids_refuses_a_bad_count(self, cluster):
        with pytest.raises(ValueError, match="from 1 to"):
            await cluster.task_controller.reserve_taskids(0)

    @pytest_twisted.ensureDeferred
    async def test_calls_right_after_run_see_the_task(self, cluster, tmp_path):
        tc = cluster.task_controller
        gate = str(tmp_path / "gate")
        taskids = [await tc.run(MapTask(gated(gate, i))) for i in range(30)]
        # the tasks may still sit in the client's batch: each call must see them
        assert await tc.get_task_result(taskids[-1]) is None
        status = await tc.queue_status(verbose=True)
        assert set(taskids) <= set(status["pending"]) | set(status["running"])
        last = await tc.run(MapTask(abs, (-7,)))
        await tc.abort(last)
        with pytest.raises(TaskAborted):
            (await result(tc, last)).raise_exception()
        open_gate(gate)
        await tc.barrier(taskids).addTimeout(WAIT, reactor)
        results = await tc.get_task_results(taskids)
        assert [r.results for r in results] == list(range(30))

    @pytest_twisted.ensureDeferred
    async def test_get_task_results_in_order_and_unknown_ids_fail(self, cluster):
        tc = cluster.task_controller
        taskids = [await tc.run(MapTask(abs, (-i,))) for i in range(5)]
        results = await tc.get_task_results(taskids, block=True).addTimeout(WAIT, reactor)
        assert [r.taskid for r in results] == taskids
        assert [r.results for r in results] == list(range(5))
        with pytest.raises(InvalidTaskID):
            await tc.get_task_results([taskids[0], 10**12], block=True)

    @pytest_twisted.ensureDeferred
    async def test_rejected_spec_in_a_batch_fails_only_its_own_task(self, cluster):
        tc = cluster.task_controller
        start, _ = await tc.reserve_taskids(3)
        good_flags, payload = MapTask(abs, (-5,)).to_spec()
        bad_flags = dict(good_flags, retries=-1)
        refused = await tc.run_batch(
            [
                [start, good_flags, payload],
                [start + 1, bad_flags, payload],
                [start + 2, good_flags, payload],
            ]
        )
        assert refused == []
        first, bad, last = await tc.get_task_results(range(start, start + 3), block=True)
        assert first.results == 5 and last.results == 5
        assert bad.status == "failed"
        with pytest.raises(ValueError, match="retries must be an int >= 0"):
            bad.raise_exception()

    @pytest_twisted.ensureDeferred
    async def test_a_taskid_never_granted_is_refused(self, cluster):
        tc = cluster.task_controller
        flags, payload = MapTask(abs, (-1,)).to_spec()
        refused = await tc.run_batch([[10**12, flags, payload]])
        assert [tid for tid, _ in refused] == [10**12]
        assert isinstance(refused[0][1], InvalidTaskID)
        assert "run()" in str(refused[0][1])

    @pytest_twisted.ensureDeferred
    async def test_a_batch_sent_again_runs_each_task_once(self, cluster, tmp_path):
        tc = cluster.task_controller
        log = str(tmp_path / "log")
        start, _ = await tc.reserve_taskids(2)
        specs = [[start + i, *MapTask(logger(log, f"task {i}")).to_spec()] for i in range(2)]
        assert await tc.run_batch(specs) == []
        assert await tc.run_batch(specs) == []  # resent while queued or running
        await tc.barrier([start, start + 1]).addTimeout(WAIT, reactor)
        assert await tc.run_batch(specs) == []  # resent once finished
        await tc.spin()
        status = await tc.queue_status(verbose=True)
        assert start not in status["pending"] + status["running"]
        assert sorted(read_lines(log)) == ["task 0", "task 1"]
        results = await tc.get_task_results([start, start + 1])
        assert [r.results for r in results] == ["task 0", "task 1"]
