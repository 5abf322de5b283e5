"""Contract tests for IControllerCore: the engine registry.

A transport runs these by subclassing :class:`ControllerContract` and
providing two fixtures: ``controller`` (a fresh IControllerCore provider with
no engines) and ``make_engine`` (a callable returning a new engine object to
register, which accepts an ``id`` attribute; a ``lost(reason)`` method, if it
has one, must fail the engine's queued work with EngineError).
"""

from __future__ import annotations

import pytest
import pytest_twisted

from kernel.error import EngineError, InvalidEngineID
from tests.contract.engine import failure_of


class ControllerContract:
    """The behaviour every IControllerCore implementation must show."""

    def test_engines_get_consecutive_ids_from_zero(self, controller, make_engine):
        ids = [controller.register_engine(make_engine())["id"] for _ in range(3)]
        assert ids == [0, 1, 2]
        assert sorted(controller.engines) == [0, 1, 2]

    def test_register_sets_the_engine_id(self, controller, make_engine):
        engine = make_engine()
        result = controller.register_engine(engine, ip="127.0.0.1", port=1234, pid=99)
        assert engine.id == result["id"]
        assert controller.engines[result["id"]] is engine

    def test_requested_free_id_is_honoured(self, controller, make_engine):
        assert controller.register_engine(make_engine(), id=7) == {"id": 7}
        assert controller.register_engine(make_engine()) == {"id": 0}

    def test_requested_id_in_use_gets_the_lowest_free_id(self, controller, make_engine):
        for _ in range(3):
            controller.register_engine(make_engine())
        controller.unregister_engine(1)
        assert controller.register_engine(make_engine(), id=2) == {"id": 1}
        assert controller.register_engine(make_engine(), id=0) == {"id": 3}

    @pytest.mark.parametrize("bad", [-1, "3", 2.0, True])
    def test_invalid_requested_id_gets_the_lowest_free_id(self, controller, make_engine, bad):
        assert controller.register_engine(make_engine(), id=bad) == {"id": 0}

    def test_no_cap_on_the_number_of_engines(self, controller, make_engine):
        for _ in range(300):
            controller.register_engine(make_engine())
        assert len(controller.engines) == 300

    def test_unregister_forgets_the_engine_and_frees_its_id(self, controller, make_engine):
        controller.register_engine(make_engine())
        controller.register_engine(make_engine())
        controller.unregister_engine(0)
        assert list(controller.engines) == [1]
        assert controller.register_engine(make_engine()) == {"id": 0}

    @pytest.mark.parametrize("bad", [5, "0", None])
    def test_unregister_unknown_id_raises_invalid_engine_id(self, controller, make_engine, bad):
        controller.register_engine(make_engine())
        with pytest.raises(InvalidEngineID, match="registered ids: \\[0\\]"):
            controller.unregister_engine(bad)

    @pytest_twisted.ensureDeferred
    async def test_unregister_fails_the_engines_queued_work(self, controller, make_engine):
        engine = make_engine()
        engine_id = controller.register_engine(engine)["id"]
        import threading

        ev = threading.Event()
        await engine.push({"ev": ev})
        running = engine.execute("ev.wait(20)")
        queued = engine.execute("a = 1")
        controller.unregister_engine(engine_id)
        ev.set()
        for d in (running, queued):
            f = await failure_of(d)
            assert f.check(EngineError)
            assert f"engine {engine_id}" in str(f.value)

    def test_register_and_unregister_observers(self, controller, make_engine):
        seen = []
        controller.on_register_engine_do(lambda *a, **kw: seen.append(("reg", a, kw)), True, "x")
        controller.on_unregister_engine_do(lambda **kw: seen.append(("unreg", kw)), True)
        controller.on_register_engine_do(lambda: seen.append("plain"), False)
        controller.register_engine(make_engine())
        controller.unregister_engine(0)
        assert seen == [("reg", ("x",), {"id": 0}), "plain", ("unreg", {"id": 0})]

    def test_do_not_removes_observers(self, controller, make_engine):
        seen = []

        def on_reg(id):
            seen.append(("reg", id))

        def on_unreg(id):
            seen.append(("unreg", id))

        controller.on_register_engine_do(on_reg, True)
        controller.on_unregister_engine_do(on_unreg, True)
        controller.on_register_engine_do_not(on_reg)
        controller.on_unregister_engine_do_not(on_unreg)
        controller.register_engine(make_engine())
        controller.unregister_engine(0)
        assert seen == []

    def test_a_failing_observer_does_not_stop_registration(self, controller, make_engine):
        seen = []

        def broken(id):
            raise RuntimeError("observer bug")

        controller.on_register_engine_do(broken, True)
        controller.on_register_engine_do(seen.append, False, "ok")
        assert controller.register_engine(make_engine()) == {"id": 0}
        assert seen == ["ok"]

    def test_n_engines_callback_fires_once_when_reached(self, controller, make_engine):
        fired = []
        controller.on_n_engines_registered_do(2, fired.append, "two")
        controller.register_engine(make_engine())
        assert fired == []
        controller.register_engine(make_engine())
        assert fired == ["two"]
        controller.register_engine(make_engine())
        assert fired == ["two"]

    def test_n_engines_callback_fires_at_once_if_already_satisfied(self, controller, make_engine):
        controller.register_engine(make_engine())
        fired = []
        controller.on_n_engines_registered_do(1, lambda **kw: fired.append(kw), k="v")
        assert fired == [{"k": "v"}]
