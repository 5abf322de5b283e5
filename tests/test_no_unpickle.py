"""The controller never unpickles user data (real processes, over Foolscap).

Two proofs, on a cluster whose engines (and this client) can import a module
the controller process cannot:

1. Objects of a class defined only in that module round-trip through the
   controller by push/pull, scatter/gather and tasks. Unpickling one needs the
   module, so a controller that opened a blob would fail.
2. Tripwire pickles, which create a file named after the pid of whatever
   process unpickles them, cross the controller in both directions: the files
   appear for the engines and the client, never for the controller.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import pytest_twisted

from kernel.task import MapTask, StringTask
from tests.harness_fc import FoolscapHarness

pytestmark = pytest.mark.slow

MODULE = "txkernel_private_types"

SOURCE = textwrap.dedent(
    '''
    """Types only the client and the engines can import."""


    class Secret:
        def __init__(self, value):
            self.value = value

        def double(self):
            return Secret(2 * self.value)

        def __eq__(self, other):
            return type(other) is Secret and other.value == self.value

        def __repr__(self):
            return f"Secret({self.value!r})"


    def make_secret(value):
        return Secret(value)
    '''
)


def tripwire_code(marker_dir: str) -> str:
    """Source that, evaluated, creates ``<marker_dir>/unpickled-in-<pid>``."""
    path = os.path.join(marker_dir, "unpickled-in-")
    return f"open({path!r} + str(__import__('os').getpid()), 'w').close()"


class Tripwire:
    """Pickles as a call to ``eval(tripwire_code)``: unpickling it leaves a mark."""

    def __init__(self, marker_dir: str):
        self.code = tripwire_code(marker_dir)

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.fixture(scope="module")
def private_dir(tmp_path_factory):
    """A directory holding the private module, importable by this process."""
    d = tmp_path_factory.mktemp("private-types")
    (d / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(d))
    try:
        yield str(d)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("markers"))


@pytest_twisted.async_yield_fixture(scope="module")
async def cluster(private_dir):
    """A controller without the private module; two engines with it."""
    harness = await FoolscapHarness.start(n_engines=2, engine_path=[private_dir])
    try:
        yield harness
    finally:
        await harness.stop()


@pytest.fixture
def private():
    import importlib

    return importlib.import_module(MODULE)


def marks(marker_dir: str) -> set[int]:
    """Pids of the processes that unpickled a tripwire."""
    prefix = "unpickled-in-"
    return {int(f[len(prefix) :]) for f in os.listdir(marker_dir) if f.startswith(prefix)}


def test_the_controller_cannot_import_the_private_module(cluster, private_dir):
    """The premise: the module is on the engines' path and ours, not the controller's."""
    controller = cluster.cluster.controller.pid
    env = open(f"/proc/{controller}/environ", "rb").read().split(b"\0")
    paths = [e for e in env if e.startswith(b"PYTHONPATH=")]
    assert paths and private_dir.encode() not in paths[0]
    assert os.path.realpath(f"/proc/{controller}/cwd") != os.path.realpath(private_dir)
    engine_pid = next(iter(cluster.engine_pids().values()))
    env = open(f"/proc/{engine_pid}/environ", "rb").read()
    assert private_dir.encode() in env


@pytest_twisted.ensureDeferred
async def test_push_and_pull_of_a_private_type_round_trip(cluster, private):
    me = cluster.multiengine
    await me.push({"s": private.Secret(3)})
    await me.execute("d = s.double()\nmodule = type(d).__module__")
    assert await me.pull("module") == [MODULE, MODULE]
    assert await me.pull("d") == [private.Secret(6), private.Secret(6)]
    pulled = await me.pull("s")
    assert all(type(x) is private.Secret for x in pulled)


@pytest_twisted.ensureDeferred
async def test_scatter_and_gather_of_private_types(cluster, private):
    me = cluster.multiengine
    secrets = [private.Secret(i) for i in range(5)]
    await me.scatter("part", secrets)
    assert await me.gather("part") == secrets


@pytest_twisted.ensureDeferred
async def test_tasks_take_and_return_private_types(cluster, private):
    tc = cluster.task_controller
    tid = await tc.run(MapTask(private.make_secret, args=(7,)))
    assert (await tc.get_task_result(tid, block=True)).results == private.Secret(7)
    tid = await tc.run(StringTask("t = s.double()", push={"s": private.Secret(2)}, pull=["t"]))
    assert (await tc.get_task_result(tid, block=True)).ns.t == private.Secret(4)


@pytest_twisted.ensureDeferred
async def test_apply_takes_and_returns_private_types(cluster, private):
    me = cluster.multiengine
    assert await me.apply(private.make_secret, 5) == [private.Secret(5)] * 2
    assert await me.apply(private.Secret.double, private.Secret(4)) == [private.Secret(8)] * 2


@pytest_twisted.ensureDeferred
async def test_tripwire_pickles_cross_the_controller_unopened(cluster, marker_dir):
    me, tc = cluster.multiengine, cluster.task_controller
    controller = cluster.cluster.controller.pid
    engines = set(cluster.engine_pids().values())

    # client -> controller -> engines
    await me.push({"w": Tripwire(marker_dir)})
    assert marks(marker_dir) == engines  # the trap works: each engine tripped it

    # engines -> controller -> client: an object made on the engines that
    # pickles as a tripwire
    code = tripwire_code(marker_dir)
    await me.execute(
        "class _Wire:\n"
        f"    def __reduce__(self):\n        return (eval, ({code!r},))\n"
        "w = _Wire()\n"
    )
    await me.pull("w")
    assert os.getpid() in marks(marker_dir)

    # tasks: a tripwire argument, and a task returning one
    def wire_back(arg):
        class _Back:
            def __reduce__(self):
                return (eval, (code,))

        return _Back()

    tid = await tc.run(MapTask(wire_back, args=(Tripwire(marker_dir),)))
    tr = await tc.get_task_result(tid, block=True)
    assert tr.status == "succeeded"
    assert tr.results is None  # eval's value: the client opened the result

    assert controller not in marks(marker_dir)
    assert marks(marker_dir) == engines | {os.getpid()}
