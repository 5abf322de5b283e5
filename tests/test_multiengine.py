"""The multiengine contract against in-process engines, plus in-process-only tests."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from zope.interface.verify import verifyObject

from kernel.controllerservice import ControllerService
from kernel.error import InvalidEngineID, NoEnginesRegistered
from kernel.interfaces import (
    IMapper,
    IMultiEngine,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    IParallelFunction,
    ISynchronousMultiEngine,
)
from kernel.mapper import MultiEngineMapper
from kernel.multiengine import (
    MultiEngine,
    MultiEngineCallerMixin,
    SynchronousMultiEngine,
    resolve_targets,
)
from kernel.parallelfunction import ParallelFunction
from kernel.serialized import Serialized
from tests.contract.multiengine import MultiEngineContract
from tests.harness import InProcessHarness


@pytest_twisted.async_yield_fixture
async def cluster():
    harness = await InProcessHarness.start(n_engines=4)
    try:
        await harness.reset()
        yield harness
    finally:
        await harness.stop()


class TestMultiEngineInProcess(MultiEngineContract):
    """Every multiengine contract test, on four in-process engines."""


# -- in-process only -----------------------------------------------------------


def test_implementations_provide_their_interfaces():
    me = MultiEngine(ControllerService())
    for iface in (IMultiEngine, IMultiEngineCoordinator, IMultiEngineExtras):
        assert verifyObject(iface, me)
    sme = SynchronousMultiEngine(me)
    assert verifyObject(ISynchronousMultiEngine, sme)
    assert verifyObject(IMapper, sme.mapper())
    assert verifyObject(IMapper, me.mapper())
    assert verifyObject(IParallelFunction, me.parallel()(abs))


def test_adapting_makes_a_new_synchronous_multiengine_per_client():
    me = MultiEngine(ControllerService())
    a, b = ISynchronousMultiEngine(me), ISynchronousMultiEngine(me)
    assert isinstance(a, SynchronousMultiEngine)
    assert a is not b
    assert a.pending is not b.pending
    assert a.multiengine is me


def test_engine_ids_resolution():
    controller = ControllerService()
    me = MultiEngine(controller)
    with pytest.raises(NoEnginesRegistered, match="txkernel cluster start"):
        me.engine_ids("all")
    with pytest.raises(InvalidEngineID, match="no engines are registered"):
        me.engine_ids(0)
    for engine_id in (3, 1, 2):
        controller.engines[engine_id] = object()
    assert me.engine_ids() == [1, 2, 3]
    assert me.engine_ids(2) == [2]
    assert me.engine_ids((3, 1)) == [3, 1]
    np = pytest.importorskip("numpy")
    assert me.engine_ids(np.int64(2)) == [2]
    with pytest.raises(
        InvalidEngineID, match=r"no engine with id 7: registered engines: \[1, 2, 3\]"
    ):
        me.engine_ids([1, 7])
    with pytest.raises(InvalidEngineID, match="use an engine id"):
        me.engine_ids("ALL")


@pytest_twisted.ensureDeferred
async def test_kill_with_controller_kills_every_engine_then_stops_the_controller():
    harness = await InProcessHarness.start(n_engines=2)
    stopped = []
    try:
        ids = await harness.multiengine.get_ids()
        me = MultiEngine(harness.controller, stop_controller=lambda: stopped.append(True))
        # targets is ignored: killing the controller takes every engine with it
        assert await me.kill(controller=True, targets=ids[0]) == [None, None]
        assert stopped == [True]
        for engine in harness.engine_services.values():
            await engine.when_stopped().addTimeout(10, reactor)
    finally:
        await harness.stop()


class _RecordingEngine:
    """Records push_serialized calls; stands in for a queued engine."""

    def __init__(self):
        self.pushed = []

    def push_serialized(self, namespace):
        self.pushed.append(namespace)
        return defer.succeed(None)


@pytest_twisted.ensureDeferred
async def test_push_serializes_each_value_once_and_sends_the_same_blob_to_every_engine():
    controller = ControllerService()
    engines = {i: _RecordingEngine() for i in range(3)}
    controller.engines.update(engines)
    me = MultiEngine(controller)
    await me.push({"a": [1, 2, 3], "b": "x"})
    blobs = [e.pushed[0] for e in engines.values()]
    assert all(isinstance(b["a"], Serialized) for b in blobs)
    assert blobs[0]["a"] is blobs[1]["a"] is blobs[2]["a"]
    assert blobs[0]["b"] is blobs[2]["b"]


@pytest_twisted.ensureDeferred
async def test_the_mapper_passes_its_settings_to_raw_map():
    calls = []

    class Recorder:
        def raw_map(self, func, seqs, **kwargs):
            calls.append((func, seqs, kwargs))
            return defer.succeed("mapped")

    assert await MultiEngineMapper(Recorder(), targets=[1]).map(abs, [1], [2]) == "mapped"
    assert calls == [(abs, ([1], [2]), {"dist": "b", "targets": [1]})]
    await MultiEngineMapper(Recorder(), block=False).map(abs, [1])
    assert calls[-1][2] == {"dist": "b", "targets": "all", "block": False}
    with pytest.raises(ValueError, match="unknown distribution"):
        MultiEngineMapper(Recorder(), dist="x")


def test_parallel_function_wraps_and_refuses_non_functions():
    class Echo:
        def map(self, func, *seqs):
            return [func(*args) for args in zip(*seqs, strict=False)]

    def add(x, y):
        """Add two numbers."""
        return x + y

    pf = ParallelFunction(add, Echo())
    assert pf.__name__ == "add" and pf.__doc__ == "Add two numbers."
    assert pf([1, 2], [10, 20]) == [11, 22]
    with pytest.raises(TypeError, match="wraps functions"):
        ParallelFunction(5, Echo())


REPO = Path(__file__).resolve().parent.parent


def test_inprocess_pi_example_prints_an_estimate_the_engines_and_the_time(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "inprocess_pi.py"), "--samples", "200000"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    estimate = re.search(r"pi is about (\d+\.\d+)", proc.stdout)
    assert estimate, proc.stdout
    # 800000 darts: the standard error is about 0.002, so 0.05 is 25 of them.
    assert abs(float(estimate.group(1)) - math.pi) < 0.05
    assert re.search(r"800000 samples on 4 engines \[0, 1, 2, 3\] in \d+\.\d+ s", proc.stdout)


class _BlobStore(MultiEngineCallerMixin):
    """Only the serialized primitives, over namespaces that hold blobs and
    refuse anything else: what a controller that never unpickles sees."""

    def __init__(self, n):
        self.namespaces = {i: {} for i in range(n)}

    def get_ids(self):
        return defer.succeed(sorted(self.namespaces))

    def _ids(self, targets):
        return resolve_targets(targets, self.namespaces)

    def push_serialized(self, namespace, targets="all"):
        for value in namespace.values():
            assert isinstance(value, Serialized), f"the controller got a {type(value)}"
        for i in self._ids(targets):
            self.namespaces[i].update(namespace)
        return defer.succeed([None] * len(self._ids(targets)))

    def pull_serialized(self, keys, targets="all"):
        ids = self._ids(targets)
        if isinstance(keys, str):
            return defer.succeed([self.namespaces[i][keys] for i in ids])
        return defer.succeed([[self.namespaces[i][k] for k in keys] for i in ids])

    def execute(self, lines, targets="all"):
        raise AssertionError("not needed here")


@pytest_twisted.ensureDeferred
async def test_the_caller_side_sends_and_receives_only_serialized_blobs():
    store = _BlobStore(3)
    await store.push({"a": [1, 2], "f": len})
    await store.push_function({"g": abs}, targets=[2])
    await store.scatter("s", list(range(7)))
    assert await store.pull("a", targets=1) == [[1, 2]]
    assert await store.gather("s") == list(range(7))
    assert await store.zip_pull(["a", "s"], targets=[0, 2]) == [
        ([1, 2], [1, 2]),
        ([0, 1, 2], [5, 6]),
    ]
    assert (await store.pull_function("g", targets=2))[0] is abs
    with pytest.raises(InvalidEngineID):
        await store.scatter("s", [1], targets=[0, 9])
    assert all(isinstance(v, Serialized) for ns in store.namespaces.values() for v in ns.values())
