"""Contract tests for one engine: IEngineCore, IEngineSerialized,
IEngineProperties, IEngineInterrupt and IEngineTasks.

A transport runs these by subclassing :class:`EngineContract` and providing an
``engine`` fixture: a fresh engine (any provider of those interfaces, e.g. the
client half of a remote engine) with an int ``id``, empty namespace (``id``
aside) and no properties. Failures are checked through
:func:`kernel.error.engine_failure_info`, so they may arrive as the original
exception (in process) or as a :class:`kernel.error.RemoteError` (over a wire).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from kernel import error, serialized

#: bound on any single wait in these tests (seconds)
WAIT = 30


async def failure_of(d: Deferred) -> Failure:
    """Wait for ``d`` and return its Failure; fail the test if it succeeds."""
    try:
        result = await d.addTimeout(WAIT, reactor)
    except BaseException:
        return Failure()
    pytest.fail(f"expected a failure, got {result!r}")


def ename(f: Failure) -> str:
    """The engine-side exception type name of a failure."""
    return error.engine_failure_info(f).ename


async def interrupt_when_running(engine, attempts: int = 500) -> bool:
    """Call ``engine.interrupt()`` until a running command is interrupted."""
    for _ in range(attempts):
        if await engine.interrupt():
            return True
        await deferLater(reactor, 0.01, lambda: None)
    return False


class EngineContract:
    """The behaviour every engine implementation must show."""

    # -- execute, history ---------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_execute_fires_result_dict_with_captured_output(self, engine):
        code = "print('out'); import sys; sys.stderr.write('err');"
        result = await engine.execute(code)
        assert result["id"] == engine.id
        assert result["input"] == code
        assert result["stdout"] == "out\n"
        assert result["stderr"] == "err"
        assert isinstance(result["number"], int)

    @pytest_twisted.ensureDeferred
    async def test_execute_numbers_commands_in_order(self, engine):
        first = await engine.execute("a = 1")
        second = await engine.execute("b = 2")
        assert second["number"] == first["number"] + 1

    @pytest_twisted.ensureDeferred
    async def test_namespace_persists_between_commands(self, engine):
        await engine.execute("def f(x):\n    return x * k")
        await engine.execute("k = 3")
        await engine.execute("y = f(5)")
        assert await engine.pull("y") == 15

    @pytest_twisted.ensureDeferred
    async def test_engine_id_is_bound_in_namespace(self, engine):
        assert await engine.pull("id") == engine.id
        result = await engine.execute("print(id)")
        assert result["stdout"] == f"{engine.id}\n"

    @pytest_twisted.ensureDeferred
    async def test_execute_failure_carries_type_engine_id_and_traceback(self, engine):
        f = await failure_of(engine.execute("x = 1\ndef g():\n    return 1 / 0\ng()"))
        info = error.engine_failure_info(f)
        assert info.ename == "ZeroDivisionError"
        assert info.engine_id == engine.id
        assert "return 1 / 0" in info.traceback
        assert "ZeroDivisionError" in info.traceback

    @pytest_twisted.ensureDeferred
    async def test_syntax_error_fails_the_command(self, engine):
        f = await failure_of(engine.execute("def ("))
        assert ename(f) == "SyntaxError"

    @pytest_twisted.ensureDeferred
    async def test_engine_is_usable_after_a_failing_command(self, engine):
        await failure_of(engine.execute("raise ValueError('boom')"))
        result = await engine.execute("z = 4")
        assert result["input"] == "z = 4"
        assert await engine.pull("z") == 4

    @pytest_twisted.ensureDeferred
    async def test_execute_refuses_non_str(self, engine):
        f = await failure_of(engine.execute(42))
        assert ename(f) == "TypeError"

    @pytest_twisted.ensureDeferred
    async def test_get_result_returns_history(self, engine):
        r0 = await engine.execute("print('zero')")
        r1 = await engine.execute("print('one')")
        assert await engine.get_result(r0["number"]) == r0
        assert await engine.get_result(r1["number"]) == r1
        assert await engine.get_result() == r1

    @pytest_twisted.ensureDeferred
    async def test_get_result_without_history_fails(self, engine):
        f = await failure_of(engine.get_result())
        assert ename(f) == "InvalidResultNumber"

    @pytest_twisted.ensureDeferred
    async def test_get_result_bad_number_fails(self, engine):
        r = await engine.execute("a = 1")
        for bad in (r["number"] + 1, -1, "0"):
            f = await failure_of(engine.get_result(bad))
            assert ename(f) == "InvalidResultNumber"

    # -- push / pull --------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_push_then_pull_single_and_list(self, engine):
        assert await engine.push({"a": 10, "b": [1, 2], "c": {"k": "v"}}) is None
        assert await engine.pull("a") == 10
        assert await engine.pull(["c", "a", "b"]) == [{"k": "v"}, 10, [1, 2]]

    @pytest_twisted.ensureDeferred
    async def test_pushed_values_are_visible_to_code(self, engine):
        await engine.push({"n": 6})
        await engine.execute("m = n * 7")
        assert await engine.pull("m") == 42

    @pytest_twisted.ensureDeferred
    async def test_pull_missing_name_fails_with_name_error_naming_it(self, engine):
        await engine.push({"present": 1})
        f = await failure_of(engine.pull(["present", "absent_name"]))
        assert ename(f) == "NameError"
        assert "absent_name" in str(error.engine_failure_info(f).evalue)

    @pytest_twisted.ensureDeferred
    async def test_push_refuses_non_identifier_keys(self, engine):
        f = await failure_of(engine.push({"not a name": 1}))
        assert ename(f) == "TypeError"

    @pytest_twisted.ensureDeferred
    async def test_push_function_and_call_it_on_the_engine(self, engine):
        offset = 100

        def add_offset(x):
            return x + offset

        await engine.push_function({"add_offset": add_offset, "sq": lambda v: v * v})
        await engine.execute("r = add_offset(sq(3))")
        assert await engine.pull("r") == 109

    @pytest_twisted.ensureDeferred
    async def test_pull_function_defined_on_engine(self, engine):
        await engine.execute("scale = 4\ndef times(x):\n    return x * scale")
        times = await engine.pull_function("times")
        assert times(5) == 20
        [same] = await engine.pull_function(["times"])
        assert same(2) == 8

    # -- serialized ---------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_push_serialized_is_deserialized_on_engine(self, engine):
        await engine.push_serialized({"s": serialized.serialize({"x": [1, 2, 3]})})
        await engine.execute("t = sum(s['x'])")
        assert await engine.pull("t") == 6

    @pytest_twisted.ensureDeferred
    async def test_pull_serialized_single_and_list(self, engine):
        await engine.push({"a": "alpha", "b": (1, 2)})
        one = await engine.pull_serialized("a")
        assert isinstance(one, serialized.Serialized)
        assert serialized.deserialize(one) == "alpha"
        many = await engine.pull_serialized(["b", "a"])
        assert [serialized.deserialize(s) for s in many] == [(1, 2), "alpha"]

    @pytest_twisted.ensureDeferred
    async def test_serialized_numpy_array_round_trip(self, engine):
        np = pytest.importorskip("numpy")
        arr = np.arange(100_000, dtype="float64")
        await engine.push_serialized({"arr": serialized.serialize(arr)})
        await engine.execute("arr2 = arr * 2")
        back = serialized.deserialize(await engine.pull_serialized("arr2"))
        assert np.array_equal(back, arr * 2)

    @pytest_twisted.ensureDeferred
    async def test_pull_serialized_missing_name_fails(self, engine):
        f = await failure_of(engine.pull_serialized("nope"))
        assert ename(f) == "NameError"

    # -- reset, keys --------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_keys_lists_sorted_user_names(self, engine):
        await engine.push({"zeta": 1, "alpha": 2})
        await engine.execute("import math")
        assert await engine.keys() == ["alpha", "id", "math", "zeta"]

    @pytest_twisted.ensureDeferred
    async def test_reset_clears_namespace_but_keeps_id(self, engine):
        await engine.push({"a": 1})
        await engine.execute("b = 2")
        assert await engine.reset() is None
        assert await engine.keys() == ["id"]
        assert await engine.pull("id") == engine.id
        f = await failure_of(engine.pull("a"))
        assert ename(f) == "NameError"

    # -- properties ---------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_properties_set_get_has_del_clear(self, engine):
        assert await engine.get_properties() == {}
        await engine.set_properties({"gpu": True, "mem": 16, "tags": ["a", "b"]})
        assert await engine.get_properties() == {"gpu": True, "mem": 16, "tags": ["a", "b"]}
        assert await engine.get_properties(["mem"]) == {"mem": 16}
        assert await engine.has_properties(["gpu", "cpu"]) == [True, False]
        await engine.del_properties(["gpu"])
        assert await engine.has_properties(["gpu"]) == [False]
        await engine.set_properties({"mem": 32})
        assert await engine.get_properties("mem") == {"mem": 32}
        await engine.clear_properties()
        assert await engine.get_properties() == {}

    @pytest_twisted.ensureDeferred
    async def test_properties_accept_nested_plain_data(self, engine):
        value = {"versions": {"py": [3, 11], "name": None}, "ratio": 0.5}
        await engine.set_properties({"info": value})
        assert await engine.get_properties(["info"]) == {"info": value}

    @pytest_twisted.ensureDeferred
    async def test_non_plain_property_is_refused_naming_key_and_changes_nothing(self, engine):
        await engine.set_properties({"kept": 1})
        f = await failure_of(engine.set_properties({"ok": 2, "bad": object()}))
        info = error.engine_failure_info(f)
        assert info.ename == "InvalidProperty"
        assert "'bad'" in info.evalue
        assert "plain data" in info.evalue
        assert await engine.get_properties() == {"kept": 1}

    @pytest_twisted.ensureDeferred
    async def test_property_with_non_str_dict_key_is_refused(self, engine):
        f = await failure_of(engine.set_properties({"d": {1: "one"}}))
        assert ename(f) == "InvalidProperty"

    @pytest_twisted.ensureDeferred
    async def test_get_missing_property_fails_naming_it(self, engine):
        f = await failure_of(engine.get_properties(["missing_prop"]))
        info = error.engine_failure_info(f)
        assert info.ename == "KeyError"
        assert "missing_prop" in info.evalue

    # -- interrupt ------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_interrupt_when_idle_returns_false(self, engine):
        assert await engine.interrupt() is False

    @pytest_twisted.ensureDeferred
    async def test_interrupt_stops_running_command_and_engine_stays_usable(self, engine):
        running = engine.execute("n = 0\nwhile True:\n    n += 1")
        assert await interrupt_when_running(engine)
        f = await failure_of(running)
        assert ename(f) == "KeyboardInterrupt"
        assert await engine.pull("n") > 0
        result = await engine.execute("after = 1")
        assert result["input"] == "after = 1"

    # -- tasks ----------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_run_task_fires_serialized_result_output_and_times(self, engine):
        class Body:  # defined here so it is pickled by value
            def run(self, namespace, properties):
                print("working")
                namespace["seen"] = properties.get("color")
                return {"double": namespace.get("base", 0) * 2}

        await engine.push({"base": 21})
        await engine.set_properties({"color": "blue"})
        out = await engine.run_task(serialized.serialize(Body()))
        assert serialized.deserialize(out["result"]) == {"double": 42}
        assert out["stdout"] == "working\n"
        assert out["stderr"] == ""
        assert out["started"] <= out["completed"]
        assert await engine.pull("seen") == "blue"

    @pytest_twisted.ensureDeferred
    async def test_run_task_clear_before_and_after(self, engine):
        class Body:
            def run(self, namespace, properties):
                namespace["made_by_task"] = True
                return sorted(k for k in namespace if not k.startswith("__"))

        await engine.push({"old": 1})
        out = await engine.run_task(serialized.serialize(Body()), clear_before=True)
        assert serialized.deserialize(out["result"]) == ["id", "made_by_task"]
        await engine.run_task(serialized.serialize(Body()), clear_after=True)
        assert await engine.keys() == ["id"]

    @pytest_twisted.ensureDeferred
    async def test_run_task_exception_propagates_with_engine_info(self, engine):
        class Body:
            def run(self, namespace, properties):
                raise LookupError("no such thing")

        f = await failure_of(engine.run_task(serialized.serialize(Body())))
        info = error.engine_failure_info(f)
        assert info.ename == "LookupError"
        assert info.engine_id == engine.id
        assert "no such thing" in info.traceback

    @pytest_twisted.ensureDeferred
    async def test_run_task_unmet_dependency_propagates(self, engine):
        class Body:
            def run(self, namespace, properties):
                from kernel.error import UnmetDependency

                raise UnmetDependency("needs a gpu")

        f = await failure_of(engine.run_task(serialized.serialize(Body())))
        assert ename(f) == "UnmetDependency"

    # -- kill -------------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_commands_after_kill_fail_with_engine_error(self, engine):
        await engine.execute("a = 1")
        assert await engine.kill() is None
        f = await failure_of(engine.execute("a = 2"))
        assert ename(f) == "EngineError"
