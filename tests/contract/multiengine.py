"""The multiengine contract: :class:`MultiEngineContract`.

Every test drives ``cluster.multiengine`` (and ``cluster.other_multiengine``,
a second client), both :class:`~kernel.interfaces.ISynchronousMultiEngine`
providers, and uses nothing but the interfaces and the
:class:`~tests.contract.ClusterHarness` methods, so a transport runs the very
same class over its own client halves with engines in other processes.

Engines that must stay busy wait on a *gate*: a file in a temporary directory
that the test creates to let them go on (engines run on this machine, so they
see the same file system). No test depends on how long anything takes.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from kernel.error import (
    CompositeError,
    InvalidDeferredID,
    InvalidEngineID,
    NoEnginesRegistered,
    ResultNotCompleted,
)
from kernel.serialized import Serialized, deserialize, serialize

#: Upper bound on any single wait in these tests (seconds).
WAIT = 30


async def until(check, what: str, timeout: float = WAIT) -> None:
    """Poll the coroutine function ``check`` until it returns true (bounded)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02)


def gate_code(path: str) -> str:
    """Source that blocks an engine until ``path`` exists (at most a minute)."""
    return (
        "import os as _gate_os, time as _gate_time\n"
        "_gate_t0 = _gate_time.monotonic()\n"
        f"while not _gate_os.path.exists({path!r}):\n"
        "    if _gate_time.monotonic() - _gate_t0 > 60:\n"
        "        raise RuntimeError('gate never opened')\n"
        "    _gate_time.sleep(0.01)\n"
    )


def open_gate(path: str) -> None:
    with open(path, "w"):
        pass


async def composite(d) -> CompositeError:
    """Await ``d``, which must fail with a CompositeError; return it."""
    with pytest.raises(CompositeError) as info:
        await d
    return info.value


class MultiEngineContract:
    """Tests of ISynchronousMultiEngine (with the coordinator and extras
    methods) against the ``cluster`` fixture."""

    # -- ids and targets ---------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_get_ids_fires_sorted_ids_of_every_engine(self, cluster):
        ids = await cluster.multiengine.get_ids()
        assert ids == sorted(ids)
        assert len(ids) >= cluster.n_engines
        assert all(isinstance(i, int) for i in ids)
        assert len(set(ids)) == len(ids)

    @pytest_twisted.ensureDeferred
    async def test_execute_on_all_fires_one_result_dict_per_engine_in_id_order(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        results = await me.execute("print('hello', id)")
        assert [r["id"] for r in results] == ids
        for engine_id, r in zip(ids, results, strict=True):
            assert r["input"] == "print('hello', id)"
            assert r["stdout"] == f"hello {engine_id}\n"
            assert isinstance(r["number"], int)

    @pytest_twisted.ensureDeferred
    async def test_targets_int_and_list_select_engines_in_the_given_order(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        one = await me.execute("a = 1", targets=ids[1])
        assert [r["id"] for r in one] == [ids[1]]
        backwards = list(reversed(ids[:3]))
        results = await me.execute("a = 2", targets=backwards)
        assert [r["id"] for r in results] == backwards
        assert await me.pull("id", targets=tuple(backwards)) == backwards

    @pytest_twisted.ensureDeferred
    async def test_execute_captures_stderr(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        (r,) = await me.execute("import sys; sys.stderr.write('oops')", targets=ids[0])
        assert r["stderr"] == "oops"
        assert r["stdout"] == ""

    @pytest_twisted.ensureDeferred
    async def test_unregistered_or_malformed_targets_fail_with_invalid_engine_id(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        missing = max(ids) + 100
        for targets in (missing, [ids[0], missing], "some", [], 1.5, None, True, ["0"]):
            with pytest.raises(InvalidEngineID):
                await me.execute("a = 1", targets=targets)
        with pytest.raises(InvalidEngineID, match=str(missing)):
            await me.push({"a": 1}, targets=missing)
        for call in (
            me.pull("a", targets=missing),
            me.keys(targets=[missing]),
            me.scatter("a", [1, 2], targets=missing),
            me.gather("a", targets=missing),
            me.raw_map(abs, [[1]], targets=missing),
            me.zip_pull(["a"], targets=missing),
            me.queue_status(targets=missing),
            me.get_properties(targets=missing),
        ):
            with pytest.raises(InvalidEngineID):
                await call
        # Nothing ran on the registered engine named beside the bad one.
        assert "a" not in (await me.keys(targets=ids[0]))[0]

    @pytest_twisted.ensureDeferred
    async def test_bad_targets_with_block_false_fail_when_redeemed(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        pid = await me.execute("a = 1", targets=max(ids) + 100, block=False)
        with pytest.raises(InvalidEngineID):
            await me.get_pending_deferred(pid, True)

    @pytest_twisted.ensureDeferred
    async def test_no_engines_registered_names_how_to_start_some(self, cluster):
        me = cluster.multiengine
        for engine_id in await me.get_ids():
            await cluster.kill_engine(engine_id)
        assert await me.get_ids() == []
        for call in (
            me.execute("a = 1"),
            me.push({"a": 1}),
            me.scatter("a", [1]),
            me.map(abs, [1]),
        ):
            with pytest.raises(NoEnginesRegistered, match="txkernel cluster start"):
                await call
        for _ in range(cluster.n_engines):
            await cluster.add_engine()
        assert len(await me.get_ids()) == cluster.n_engines

    # -- failures ----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_failures_on_several_engines_make_one_composite_error(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        bad = [ids[0], ids[2]]
        code = (
            "before = id\n"
            f"if id in {bad!r}:\n"
            "    raise ValueError(f'bad engine {id}')\n"
            "after = id\n"
        )
        ce = await composite(me.execute(code))
        assert [e.engine_id for e in ce.elist] == bad
        assert [e.ename for e in ce.elist] == ["ValueError", "ValueError"]
        assert [e.evalue for e in ce.elist] == [f"bad engine {i}" for i in bad]
        assert all("ValueError" in e.traceback for e in ce.elist)
        text = str(ce)
        assert "execute" in text
        assert all(f"engine {i}" in text for i in bad)
        with pytest.raises(ValueError, match=f"bad engine {bad[0]}"):
            ce.raise_exception()
        # The other engines did all their work; the failing ones stopped at the raise.
        good = [i for i in ids if i not in bad]
        assert await me.pull("after", targets=good) == good
        assert await me.pull("before") == ids

    @pytest_twisted.ensureDeferred
    async def test_pull_of_a_missing_name_fails_with_name_error_on_each_engine(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.push({"here": 1}, targets=ids[0])
        ce = await composite(me.pull("here"))
        assert [e.engine_id for e in ce.elist] == ids[1:]
        assert {e.ename for e in ce.elist} == {"NameError"}
        assert all("here" in e.evalue for e in ce.elist)
        ce = await composite(me.pull(["here", "nowhere"], targets=ids[0]))
        assert ce.elist[0].ename == "NameError" and "nowhere" in ce.elist[0].evalue

    # -- data --------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_push_then_pull_round_trips_values(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        values = {
            "i": 7,
            "s": "text",
            "n": None,
            "l": [1, [2, 3], {"k": (4, 5)}],
            "b": b"\x00" * 100_000,
            "arr": np.arange(20_000.0).reshape(100, 200),
        }
        assert await me.push(values) == [None] * len(ids)
        assert await me.pull("i") == [7] * len(ids)
        assert await me.pull("n") == [None] * len(ids)
        pulled = await me.pull(["s", "l", "b", "arr"], targets=ids[-1])
        s, lst, b, arr = pulled[0]
        assert (s, lst, b) == ("text", [1, [2, 3], {"k": (4, 5)}], b"\x00" * 100_000)
        np.testing.assert_array_equal(arr, values["arr"])

    @pytest_twisted.ensureDeferred
    async def test_pulled_arrays_are_writable_copies_of_the_callers_own(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.execute("import numpy\nbig = numpy.zeros(100_000)", targets=ids[0])
        (big,) = await me.pull("big", targets=ids[0])
        big[0] = 5.0  # would raise if the array were read-only
        (again,) = await me.pull("big", targets=ids[0])
        assert again[0] == 0.0
        await me.scatter("part", np.zeros(400_000), targets=ids[:2])
        gathered = await me.gather("part", targets=ids[:2])
        gathered[:] = 1.0
        assert (await me.pull("part", targets=ids[0]))[0].sum() == 0.0

    @pytest_twisted.ensureDeferred
    async def test_pushed_arrays_are_private_and_writable_on_each_engine(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        mine = np.zeros(100_000)
        await me.push({"shared": mine}, targets=ids[:2])
        await me.execute("shared[0] = 99.0", targets=ids[0])  # raises if read-only
        assert mine[0] == 0.0, "an engine's write must not reach the client's array"
        first, second = await me.pull("shared", targets=ids[:2])
        assert (first[0], second[0]) == (99.0, 0.0)

    @pytest_twisted.ensureDeferred
    async def test_push_to_some_targets_leaves_the_others_alone(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.push({"only": "here"}, targets=[ids[1]])
        keys = await me.keys()
        assert ["only" in k for k in keys] == [i == ids[1] for i in ids]

    @pytest_twisted.ensureDeferred
    async def test_push_function_and_pull_function_move_closures_and_lambdas(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        offset = 10

        def add_offset(x):
            return x + offset

        await me.push_function({"f": add_offset, "g": lambda x: x * 3})
        await me.execute("r = f(id) + g(1)")
        assert await me.pull("r") == [i + 13 for i in ids]
        (f,) = await me.pull_function("f", targets=ids[0])
        assert f(1) == 11
        ((f2, g2),) = await me.pull_function(["f", "g"], targets=ids[0])
        assert (f2(0), g2(2)) == (10, 6)

    @pytest_twisted.ensureDeferred
    async def test_push_function_and_pull_function_refuse_non_functions(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        with pytest.raises(TypeError, match="not a function"):
            await me.push_function({"f": 3})
        await me.push({"v": 3}, targets=ids[0])
        with pytest.raises(TypeError, match="'v'.*not a function"):
            await me.pull_function("v", targets=ids[0])

    @pytest_twisted.ensureDeferred
    async def test_serialized_values_pass_through_unopened(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.push_serialized({"x": serialize({"deep": [1, 2]})}, targets=ids[:2])
        assert await me.pull("x", targets=ids[:2]) == [{"deep": [1, 2]}] * 2
        blobs = await me.pull_serialized("x", targets=ids[:2])
        assert all(isinstance(b, Serialized) for b in blobs)
        assert [deserialize(b) for b in blobs] == [{"deep": [1, 2]}] * 2
        ((bx, bid),) = await me.pull_serialized(["x", "id"], targets=ids[1])
        assert (deserialize(bx), deserialize(bid)) == ({"deep": [1, 2]}, ids[1])

    @pytest_twisted.ensureDeferred
    async def test_get_result_returns_history_by_number(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        t = ids[0]
        (first,) = await me.execute("a = 1", targets=t)
        (second,) = await me.execute("b = 2", targets=t)
        assert second["number"] > first["number"]
        (latest,) = await me.get_result(targets=t)
        assert latest["input"] == "b = 2"
        (again,) = await me.get_result(first["number"], targets=t)
        assert again["input"] == "a = 1" and again["number"] == first["number"]
        ce = await composite(me.get_result(second["number"] + 1000, targets=t))
        assert ce.elist[0].ename == "InvalidResultNumber"
        await me.execute("c = 3")
        assert [r["input"] for r in await me.get_result(targets="all")] == ["c = 3"] * len(ids)

    @pytest_twisted.ensureDeferred
    async def test_reset_clears_namespaces_and_keys_lists_names(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.push({"b": 1, "a": 2})
        keys = await me.keys()
        assert len(keys) == len(ids)
        for k in keys:
            assert {"a", "b"} <= set(k)
            assert k == sorted(k)
        assert await me.reset(targets=ids[:1]) == [None]
        after = await me.keys()
        assert "a" not in after[0] and "b" not in after[0]
        assert all({"a", "b"} <= set(k) for k in after[1:])
        assert await me.pull("id", targets=ids[0]) == [ids[0]]  # id survives reset

    # -- blocking and pending results -----------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_block_false_fires_a_pending_id_redeemed_exactly_once(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        pid = await me.execute("x = id", block=False)
        assert isinstance(pid, int)
        results = await me.get_pending_deferred(pid, True)
        assert [r["id"] for r in results] == ids
        with pytest.raises(InvalidDeferredID):
            await me.get_pending_deferred(pid, True)
        with pytest.raises(InvalidDeferredID):
            await me.get_pending_deferred(pid + 1000, False)

    @pytest_twisted.ensureDeferred
    async def test_pending_none_results_are_delivered(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        pid = await me.push({"x": 1}, block=False)
        assert await me.get_pending_deferred(pid, True) == [None] * len(ids)
        pid = await me.scatter("y", [1, 2, 3], block=False)
        assert await me.get_pending_deferred(pid, True) is None

    @pytest_twisted.ensureDeferred
    async def test_result_not_ready_without_blocking_raises_result_not_completed(
        self, cluster, tmp_path
    ):
        me = cluster.multiengine
        ids = await me.get_ids()
        gate = str(tmp_path / "gate")
        pid = await me.execute(gate_code(gate) + "done = True", targets=ids[0], block=False)
        with pytest.raises(ResultNotCompleted):
            await me.get_pending_deferred(pid, False)
        open_gate(gate)
        (r,) = await me.get_pending_deferred(pid, True)
        assert r["id"] == ids[0]
        assert await me.pull("done", targets=ids[0]) == [True]

    @pytest_twisted.ensureDeferred
    async def test_pending_failure_is_raised_once_then_the_id_is_gone(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        pid = await me.execute("1/0", targets=ids[:2], block=False)
        ce = await composite(me.get_pending_deferred(pid, True))
        assert [e.ename for e in ce.elist] == ["ZeroDivisionError"] * 2
        with pytest.raises(InvalidDeferredID):
            await me.get_pending_deferred(pid, True)

    @pytest_twisted.ensureDeferred
    async def test_clear_pending_deferreds_drops_only_this_clients_results(self, cluster):
        me, other = cluster.multiengine, cluster.other_multiengine
        ids = await me.get_ids()
        mine = await me.pull("id", block=False)
        theirs = await other.pull("id", block=False)
        await other.clear_pending_deferreds()
        with pytest.raises(InvalidDeferredID):
            await other.get_pending_deferred(theirs, True)
        assert await me.get_pending_deferred(mine, True) == ids
        mine = await me.pull("id", block=False)
        await me.clear_pending_deferreds()
        with pytest.raises(InvalidDeferredID):
            await me.get_pending_deferred(mine, True)

    @pytest_twisted.ensureDeferred
    async def test_two_clients_see_the_same_engines(self, cluster):
        me, other = cluster.multiengine, cluster.other_multiengine
        ids = await me.get_ids()
        assert await other.get_ids() == ids
        await me.push({"shared": "yes"}, targets=ids[0])
        assert await other.pull("shared", targets=ids[0]) == ["yes"]

    # -- queues ----------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_queue_status_fires_id_status_pairs(self, cluster, tmp_path):
        me = cluster.multiengine
        ids = await me.get_ids()
        idle = await me.queue_status()
        assert [i for i, _ in idle] == ids
        assert all(s["queue"] == [] and s["pending"] is None for _, s in idle)
        gate = str(tmp_path / "gate")
        busy = await me.execute(gate_code(gate), targets=ids[0], block=False)
        waiting = [await me.execute(f"w = {k}", targets=ids[0], block=False) for k in range(2)]

        async def queued_two():
            ((_, status),) = await me.queue_status(targets=ids[0])
            return status["pending"] is not None and len(status["queue"]) == 2

        await until(queued_two, "two commands queued behind a running one")
        open_gate(gate)
        for pid in (busy, *waiting):
            await me.get_pending_deferred(pid, True)
        assert await me.pull("w", targets=ids[0]) == [1]

    @pytest_twisted.ensureDeferred
    async def test_clear_queue_fails_waiting_commands_and_spares_the_running_one(
        self, cluster, tmp_path
    ):
        me = cluster.multiengine
        ids = await me.get_ids()
        t = ids[0]
        gate = str(tmp_path / "gate")
        running = await me.execute(gate_code(gate) + "ran = True", targets=t, block=False)
        waiting = await me.execute("never = True", targets=t, block=False)

        async def one_waiting():
            ((_, status),) = await me.queue_status(targets=t)
            return len(status["queue"]) == 1

        await until(one_waiting, "a command waiting in the queue")
        assert await me.clear_queue(targets=t) == [None]
        ce = await composite(me.get_pending_deferred(waiting, True))
        assert ce.elist[0].ename == "QueueCleared" and ce.elist[0].engine_id == t
        open_gate(gate)
        await me.get_pending_deferred(running, True)
        assert await me.pull("ran", targets=t) == [True]
        assert "never" not in (await me.keys(targets=t))[0]

    # -- engines dying ---------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_killing_an_engine_mid_execute_fails_the_command_with_engine_error(
        self, cluster, tmp_path
    ):
        me = cluster.multiengine
        ids = await me.get_ids()
        victim = ids[-1]
        gate = str(tmp_path / "never-opened")
        pid = await me.execute(gate_code(gate), targets=[ids[0], victim], block=False)

        async def running():
            ((_, status),) = await me.queue_status(targets=victim)
            return status["pending"] is not None

        await until(running, "the command to start")
        await cluster.kill_engine(victim)
        open_gate(gate)  # let the surviving engine finish
        ce = await composite(me.get_pending_deferred(pid, True))
        assert [(e.engine_id, e.ename) for e in ce.elist] == [(victim, "EngineError")]
        assert victim not in await me.get_ids()
        await cluster.add_engine()

    @pytest_twisted.ensureDeferred
    async def test_kill_stops_the_targeted_engines(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        victim = ids[-1]
        assert await me.kill(targets=victim) == [None]

        async def gone():
            return victim not in await me.get_ids()

        await until(gone, f"engine {victim} to go away after kill")
        assert await me.pull("id", targets=ids[:-1]) == ids[:-1]
        await cluster.add_engine()

    # -- scatter and gather ----------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_scatter_sends_contiguous_blocks_and_gather_joins_them(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        seq = list(range(len(ids) * 3 + 1))  # uneven
        assert await me.scatter("part", seq) is None
        parts = await me.pull("part")
        assert [x for p in parts for x in p] == seq
        lengths = [len(p) for p in parts]
        assert max(lengths) - min(lengths) <= 1
        assert lengths == sorted(lengths, reverse=True)
        assert await me.gather("part") == seq

    @pytest_twisted.ensureDeferred
    async def test_scatter_and_gather_over_chosen_targets(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        chosen = [ids[2], ids[0]]
        await me.scatter("t", ("a", "b", "c"), targets=chosen)
        assert await me.pull("t", targets=chosen) == [("a", "b"), ("c",)]
        assert await me.gather("t", targets=chosen) == ["a", "b", "c"]
        assert "t" not in (await me.keys(targets=ids[1]))[0]

    @pytest_twisted.ensureDeferred
    async def test_scatter_more_engines_than_items_gives_empty_blocks(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.scatter("few", [10, 20])
        parts = await me.pull("few")
        assert parts == [[10], [20]] + [[]] * (len(ids) - 2)
        assert await me.gather("few") == [10, 20]

    @pytest_twisted.ensureDeferred
    async def test_scatter_flatten_binds_single_items_by_themselves(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        seq = [i * 10 for i in range(len(ids))]
        await me.scatter("one", seq, flatten=True)
        assert await me.pull("one") == seq
        assert await me.gather("one") == seq
        items = seq + [99]  # one block of two, the rest single items
        await me.scatter("two", items, flatten=True)
        assert await me.pull("two") == [items[:2], *items[2:]]
        assert await me.gather("two") == items

    @pytest_twisted.ensureDeferred
    async def test_numpy_arrays_scatter_as_arrays_and_gather_by_concatenation(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        a = np.arange(2 * (len(ids) * 2 + 1), dtype=float).reshape(-1, 2)
        await me.scatter("a", a)
        parts = await me.pull("a")
        assert all(isinstance(p, np.ndarray) and p.shape[1] == 2 for p in parts)
        assert sum(p.shape[0] for p in parts) == a.shape[0]
        gathered = await me.gather("a")
        assert isinstance(gathered, np.ndarray)
        np.testing.assert_array_equal(gathered, a)
        await me.execute("a = a * 2")
        np.testing.assert_array_equal(await me.gather("a"), a * 2)

    @pytest_twisted.ensureDeferred
    async def test_scatter_and_gather_refuse_unknown_distributions(self, cluster):
        me = cluster.multiengine
        with pytest.raises(ValueError, match="unknown distribution"):
            await me.scatter("x", [1, 2], dist="z")
        with pytest.raises(ValueError, match="unknown distribution"):
            await me.gather("x", dist="z")

    # -- parallel map ----------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_raw_map_returns_results_in_order_and_cleans_up(self, cluster):
        me = cluster.multiengine
        keys_before = await me.keys()
        xs, ys = list(range(23)), list(range(100, 123))
        assert await me.raw_map(lambda x, y: x * y, [xs, ys]) == [
            x * y for x, y in zip(xs, ys, strict=True)
        ]
        assert await me.keys() == keys_before  # no temporary names left behind

    @pytest_twisted.ensureDeferred
    async def test_raw_map_with_fewer_items_than_engines_and_with_nothing(self, cluster):
        me = cluster.multiengine
        assert await me.raw_map(str, [[1, 2]]) == ["1", "2"]
        assert await me.raw_map(str, [[]]) == []
        assert await me.raw_map(pow, [[2, 3, 4], [2, 2]]) == [4, 9]  # shortest wins

    @pytest_twisted.ensureDeferred
    async def test_raw_map_failures_make_a_composite_error(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        ce = await composite(me.raw_map(lambda x: 1 / x, [list(range(len(ids)))]))
        assert [(e.engine_id, e.ename) for e in ce.elist] == [(ids[0], "ZeroDivisionError")]
        assert "raw_map" in str(ce)

    @pytest_twisted.ensureDeferred
    async def test_map_mapper_and_parallel(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        assert await me.map(lambda x, y: x - y, range(9), range(9, 0, -1)) == [
            x - y for x, y in zip(range(9), range(9, 0, -1), strict=True)
        ]
        mapper = me.mapper(targets=ids[1:3])
        assert await mapper.map(abs, [-1, -2, 3]) == [1, 2, 3]

        @me.parallel(targets=ids[:2])
        def square(x):
            return x * x

        assert square.__name__ == "square"
        assert await square(np.arange(5)) == [0, 1, 4, 9, 16]

    @pytest_twisted.ensureDeferred
    async def test_non_blocking_map_and_parallel_fire_pending_ids(self, cluster):
        me = cluster.multiengine
        pid = await me.mapper(block=False).map(abs, [-5, 6])
        assert await me.get_pending_deferred(pid, True) == [5, 6]
        pid = await me.map(str, [1], block=False)
        assert await me.get_pending_deferred(pid, True) == ["1"]
        neg = me.parallel(block=False)(lambda x: -x)
        pid = await neg([1, 2, 3])
        assert await me.get_pending_deferred(pid, True) == [-1, -2, -3]

    # -- apply -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_apply_returns_each_engines_value_in_target_order(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        # An engine's commands run on its own thread, in its own process or not:
        # (pid, thread) names the engine that ran a call.
        await me.execute("import os, threading\nme = (os.getpid(), threading.get_ident())")
        order = [ids[2], ids[0], ids[1]]
        expected = await me.pull("me", targets=order)
        assert len(set(expected)) == 3

        def whoami():
            import os
            import threading

            return (os.getpid(), threading.get_ident())

        assert await me.apply(whoami, targets=order) == expected
        assert await me.apply(whoami, targets=ids[1]) == [expected[2]]
        assert await me.apply(whoami) == await me.pull("me")

    @pytest_twisted.ensureDeferred
    async def test_apply_passes_args_kwargs_and_closures(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        offset = 100

        def f(a, b, *rest, scale=1, **extra):
            return (a + b + offset) * scale, rest, extra

        got = await me.apply(f, 1, 2, 3, scale=10, tag="t", targets=ids[:2])
        assert got == [(1030, (3,), {"tag": "t"})] * 2
        assert await me.apply(lambda: np.arange(3) * offset, targets=ids[0]) == [
            pytest.approx(np.arange(3) * offset)
        ]
        assert await me.apply(len, [1, 2, 3]) == [3] * len(ids)

    @pytest_twisted.ensureDeferred
    async def test_apply_runs_with_its_own_globals_not_the_engine_namespace(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.push({"only_on_engine": 1}, targets=ids[0])

        def read_it():
            return only_on_engine  # noqa: F821 - not in this module, only on the engine

        ce = await composite(me.apply(read_it, targets=ids[0]))
        assert [e.ename for e in ce.elist] == ["NameError"]
        # Nor does apply bind anything on the engine.
        keys_before = await me.keys(targets=ids[0])
        await me.apply(abs, -1, targets=ids[0])
        assert await me.keys(targets=ids[0]) == keys_before

    @pytest_twisted.ensureDeferred
    async def test_apply_failures_make_a_composite_error_naming_apply(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()

        class Oops(ValueError):
            pass

        def fail(x):
            raise Oops(f"no {x}")

        ce = await composite(me.apply(fail, 7, targets=ids[:2]))
        assert [(e.engine_id, e.ename) for e in ce.elist] == [(i, "Oops") for i in ids[:2]]
        assert [e.evalue for e in ce.elist] == ["no 7", "no 7"]
        assert "apply" in str(ce)
        with pytest.raises(ValueError, match="no 7"):
            ce.raise_exception()
        # A failed apply leaves the engines' queues running.
        assert await me.apply(abs, -2, targets=ids[:2]) == [2, 2]

    @pytest_twisted.ensureDeferred
    async def test_apply_with_block_false_fires_a_pending_id(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        pid = await me.apply(pow, 2, 5, targets=ids[:2], block=False)
        assert isinstance(pid, int)
        assert await me.get_pending_deferred(pid, True) == [32, 32]
        pid = await me.apply(divmod, 1, 0, targets=ids[0], block=False)
        ce = await composite(me.get_pending_deferred(pid, True))
        assert [e.ename for e in ce.elist] == ["ZeroDivisionError"]

    @pytest_twisted.ensureDeferred
    async def test_apply_waits_in_the_engines_queue_behind_earlier_commands(
        self, cluster, tmp_path
    ):
        me = cluster.multiengine
        ids = await me.get_ids()
        t = ids[0]
        gate = str(tmp_path / "gate")
        running = await me.execute(gate_code(gate), targets=t, block=False)
        applied = await me.apply(os.path.exists, gate, targets=t, block=False)

        async def apply_queued():
            ((_, status),) = await me.queue_status(targets=t)
            return status["pending"] is not None and len(status["queue"]) == 1

        await until(apply_queued, "apply queued behind a running command")
        open_gate(gate)
        await me.get_pending_deferred(running, True)
        # It ran only after the command before it, which waited for the gate.
        assert await me.get_pending_deferred(applied, True) == [True]

    @pytest_twisted.ensureDeferred
    async def test_apply_serialized_passes_the_result_through_unopened(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        from kernel.task import MapTask

        _, payload = MapTask(print, ("hello",)).to_spec()
        results = await me.apply_serialized(payload, targets=ids[:2])
        assert [type(r["result"]) for r in results] == [Serialized, Serialized]
        assert [deserialize(r["result"]) for r in results] == [None, None]
        assert [r["stdout"] for r in results] == ["hello\n", "hello\n"]

    @pytest_twisted.ensureDeferred
    async def test_apply_refuses_what_is_not_a_function_call(self, cluster):
        me = cluster.multiengine
        with pytest.raises(TypeError, match="apply needs a function"):
            await me.apply(42)
        with pytest.raises(TypeError, match="Serialized task body"):
            await me.apply_serialized(b"not a blob")
        with pytest.raises(InvalidEngineID):
            await me.apply(abs, 1, targets=[10_000])

    # -- extras ------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_zip_pull_fires_one_tuple_per_key(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        await me.execute("double = id * 2")
        assert await me.zip_pull(["id", "double"]) == [tuple(ids), tuple(i * 2 for i in ids)]
        assert await me.zip_pull("id", targets=ids[1]) == [(ids[1],)]

    @pytest_twisted.ensureDeferred
    async def test_run_executes_a_local_file_on_each_target(self, cluster, tmp_path):
        me = cluster.multiengine
        ids = await me.get_ids()
        script = tmp_path / "script.py"
        script.write_text("ran = id * 10\nprint('ran', id)\n")
        results = await me.run(str(script), targets=ids[:2])
        assert [r["stdout"] for r in results] == [f"ran {i}\n" for i in ids[:2]]
        assert await me.pull("ran", targets=ids[:2]) == [i * 10 for i in ids[:2]]
        with pytest.raises(FileNotFoundError, match="no file"):
            await me.run(str(tmp_path / "missing.py"))

    @pytest_twisted.ensureDeferred
    async def test_properties_set_get_has_del_clear(self, cluster):
        me = cluster.multiengine
        ids = await me.get_ids()
        t = ids[1]
        await me.set_properties({"color": "red", "size": 3, "tags": ["a", "b"]}, targets=t)
        assert await me.get_properties(targets=t) == [
            {"color": "red", "size": 3, "tags": ["a", "b"]}
        ]
        assert await me.get_properties(["size"], targets=t) == [{"size": 3}]
        assert await me.has_properties(["color", "shape"], targets=[ids[0], t]) == [
            [False, False],
            [True, False],
        ]
        await me.del_properties(["color"], targets=t)
        assert await me.get_properties(targets=t) == [{"size": 3, "tags": ["a", "b"]}]
        await me.clear_properties(targets=t)
        assert await me.get_properties(targets=t) == [{}]

    @pytest_twisted.ensureDeferred
    async def test_every_method_accepts_block_false(self, cluster, tmp_path):
        me = cluster.multiengine
        ids = await me.get_ids()
        t = ids[0]
        script = tmp_path / "s.py"
        script.write_text("s = 1\n")
        calls = [
            me.execute("e = 1", targets=t, block=False),
            me.push({"p": 1}, targets=t, block=False),
            me.push_function({"pf": abs}, targets=t, block=False),
            me.push_serialized({"ps": serialize(1)}, targets=t, block=False),
            me.set_properties({"k": 1}, targets=t, block=False),
            me.run(str(script), targets=t, block=False),
        ]
        for pid in [await c for c in calls]:
            await me.get_pending_deferred(pid, True)
        more = {
            "pull": me.pull("p", targets=t, block=False),
            "pull_function": me.pull_function("pf", targets=t, block=False),
            "zip_pull": me.zip_pull(["p", "e"], targets=t, block=False),
            "keys": me.keys(targets=t, block=False),
            "get_result": me.get_result(targets=t, block=False),
            "queue_status": me.queue_status(targets=t, block=False),
            "has_properties": me.has_properties(["k"], targets=t, block=False),
            "get_ids": me.get_ids(block=False),
        }
        got = {}
        for name, d in more.items():
            got[name] = await me.get_pending_deferred(await d, True)
        assert got["pull"] == [1]
        assert got["pull_function"][0](-2) == 2
        assert got["zip_pull"] == [(1,), (1,)]
        assert {"e", "p", "pf", "ps", "s"} <= set(got["keys"][0])
        assert got["get_result"][0]["input"] == "s = 1\n"
        assert got["queue_status"][0][0] == t
        assert got["has_properties"] == [[True]]
        assert got["get_ids"] == ids
        assert await me.get_pending_deferred(
            await me.gather("p", targets=t, block=False), True
        ) == [1]
        assert await me.get_pending_deferred(
            await me.raw_map(abs, [[-1]], targets=t, block=False), True
        ) == [1]
        # One at a time: clear_queue would rightly drop (QueueCleared) any
        # command still queued behind one in flight on a remote engine.
        for call in (
            lambda: me.del_properties(["k"], targets=t, block=False),
            lambda: me.clear_properties(targets=t, block=False),
            lambda: me.clear_queue(targets=t, block=False),
            lambda: me.reset(targets=t, block=False),
        ):
            await me.get_pending_deferred(await call(), True)
        pid = await me.get_properties(targets=t, block=False)
        assert await me.get_pending_deferred(pid, True) == [{}]
        assert "p" not in (await me.keys(targets=t))[0]
