"""Bad input loses nothing: a sweep against a real cluster over Foolscap.

Each test feeds a controller and its engine processes something wrong and
checks the two halves of the standard: the caller gets an error naming the
problem (and the fix, where there is one), and nothing is lost — the
controller process is alive, the same engine processes still answer, and work
another client had in flight completes (:func:`unharmed`).

One cluster serves the whole module; the test that makes an engine exit runs
last and starts a replacement. What the contract suites already cover (an
unknown engine id, a missing pull, a failing task) is not repeated here.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from kernel import asyncclient, clusterdir, fcutil
from kernel.error import (
    CompositeError,
    ConnectionError,
    InvalidDeferredID,
    InvalidEngineID,
    InvalidProperty,
    InvalidTaskID,
    ProtocolError,
    RemoteError,
    SerializationError,
)
from kernel.task import MapTask, StringTask
from kernel.testing.processes import LocalCluster, gated, wait_for_async

pytestmark = pytest.mark.slow

#: Bound on every wait, seconds.
PROMPT = 20


@pytest.fixture(scope="module")
def cluster():
    """A controller and two engine processes, over Foolscap."""
    c = LocalCluster(heartbeat=0.5, max_missed=6, controller_args=["--adapter=fc"])
    try:
        c.start(2)
        yield c
    finally:
        # off the reactor thread: the clients' connections close while it runs
        pytest_twisted.blockon(threads.deferToThread(c.stop))


@pytest.fixture(scope="module")
def clients(cluster):
    """Two multiengine clients and a task client (the first client's and a
    bystander's work must not interfere)."""
    path = cluster.cluster_dir.path

    async def make():
        return (
            await asyncclient.get_multiengine_client(cluster_dir=path, timeout=PROMPT),
            await asyncclient.get_multiengine_client(cluster_dir=path, timeout=PROMPT),
            await asyncclient.get_task_client(cluster_dir=path, timeout=PROMPT),
        )

    return pytest_twisted.blockon(defer.ensureDeferred(make()))


@pytest.fixture
def mec(clients):
    return clients[0]


@pytest.fixture
def bystander(clients):
    return clients[1]


@pytest.fixture
def tc(clients):
    return clients[2]


def bounded(d):
    return (
        defer.ensureDeferred(d).addTimeout(PROMPT, reactor)
        if not isinstance(d, defer.Deferred)
        else d.addTimeout(PROMPT, reactor)
    )


@contextlib.asynccontextmanager
async def unharmed(cluster, mec, bystander):
    """Check, around the bad call in the body, that nothing was lost: the
    bystander's command sent before it completes on every engine, the same
    engine processes answer afterwards, the controller is alive."""
    before = cluster.registered()
    pending = bystander.execute("import time; time.sleep(0.2); bystander_ran = True")
    yield
    results = await bounded(pending)
    assert sorted(r["id"] for r in results) == sorted(before)
    assert cluster.controller.alive(), cluster.controller.log()
    assert cluster.registered() == before
    after = await bounded(mec.execute("import os; pid = os.getpid()"))
    assert sorted(r["id"] for r in after) == sorted(before)
    pids = await bounded(mec.pull("pid", targets=sorted(before)))
    assert pids == [before[i] for i in sorted(before)]


def engine_errors(info, ename):
    """The engines named by a CompositeError whose entries are all ``ename``."""
    err = info.value
    assert isinstance(err, CompositeError), err
    assert {e.ename for e in err.elist} == {ename}, str(err)
    return sorted(e.engine_id for e in err.elist)


# -- execute -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_execute_with_non_str_code_is_refused_before_it_is_sent(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        for code in (5, b"a = 1", None):
            with pytest.raises(TypeError, match="execute takes Python source as a str"):
                await bounded(mec.execute(code))


@pytest_twisted.ensureDeferred
async def test_source_over_the_size_limit_is_refused_before_it_is_sent(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        huge = "#" + "x" * fcutil.MAX_SOURCE_CHARS
        with pytest.raises(ProtocolError, match="string too long.*see the size limits"):
            await bounded(mec.execute(huge))


@pytest.mark.parametrize(
    "code, ename",
    [
        ("a = = 1", "SyntaxError"),
        ("a = 1\x00", "SyntaxError"),
        ("raise SystemExit(3)", "SystemExit"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("def f(n):\n    return f(n + 1)\nf(0)", "RecursionError"),
        ("x = [0] * 10**12", "MemoryError"),
        ("class Odd(BaseException):\n    pass\nraise Odd()", "Odd"),
    ],
    ids=["syntax", "null-byte", "systemexit", "keyboardinterrupt", "recursion", "memory", "base"],
)
@pytest_twisted.ensureDeferred
async def test_failing_code_is_reported_per_engine_and_the_engines_stay_up(
    cluster, mec, bystander, code, ename
):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(CompositeError) as info:
            await bounded(mec.execute(code))
        assert engine_errors(info, ename) == sorted(cluster.registered())
        # re-raised here as an Exception: an engine's SystemExit or
        # KeyboardInterrupt does not stop the client
        with pytest.raises(Exception) as raised:
            info.value.raise_exception()
        assert ename in (type(raised.value).__name__, getattr(raised.value, "ename", None))


@pytest_twisted.ensureDeferred
async def test_deleting_id_from_the_namespace_is_harmless(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        await bounded(mec.execute("del id"))
        assert await bounded(mec.execute("y = id(None)")) is not None


@pytest_twisted.ensureDeferred
async def test_an_exception_whose_str_fails_still_reports_its_type(cluster, mec, bystander):
    code = (
        "class Mute(Exception):\n"
        "    def __str__(self):\n"
        "        raise RuntimeError('no words')\n"
        "raise Mute()\n"
    )
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(CompositeError) as info:
            await bounded(mec.execute(code))
        engine_errors(info, "Mute")
        assert "str() of this Mute failed" in info.value.elist[0].evalue


@pytest_twisted.ensureDeferred
async def test_lone_surrogates_in_output_and_errors_arrive_escaped(cluster, mec, bystander):
    # e.g. a file name from os.listdir that is not valid UTF-8: Foolscap cannot
    # encode it, and used to drop the engine's connection with the work on it
    async with unharmed(cluster, mec, bystander):
        results = await bounded(mec.execute("print('name:', chr(0xDC80))"))
        assert {r["stdout"] for r in results} == {"name: \\udc80\n"}
        with pytest.raises(CompositeError) as info:
            await bounded(mec.execute("raise ValueError('bad ' + chr(0xDC80))"))
        engine_errors(info, "ValueError")
        assert info.value.elist[0].evalue == "bad \\udc80"
        await bounded(mec.execute("globals()[chr(0xDC80)] = 1"))
        assert all("\\udc80" in names for names in await bounded(mec.keys()))
        await bounded(mec.execute("del globals()[chr(0xDC80)]"))


@pytest_twisted.ensureDeferred
async def test_lone_surrogates_a_client_would_send_are_refused_before_sending(
    cluster, mec, bystander, tc
):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(ValueError, match="execute: .*lone surrogate"):
            await bounded(mec.execute("a = '\udc80'"))
        with pytest.raises(ValueError, match="lone surrogate"):
            await bounded(mec.push({"\udc80": 1}))
        with pytest.raises(ValueError, match="run: .*lone surrogate"):
            await bounded(tc.run(MapTask(abs, args=(1,), description="\udc80")))
        # the client's connection survived
        assert await bounded(tc.run(MapTask(abs, args=(-1,)))) >= 0


# -- push and pull -----------------------------------------------------------


class RefusesToLoad:
    """Pickles fine here; fails when an engine unpickles it."""

    def __reduce__(self):
        return (_refuse, ("RefusesToLoad cannot be rebuilt on an engine",))


def _refuse(message):
    raise ValueError(message)


@pytest_twisted.ensureDeferred
async def test_unpicklable_values_are_refused_in_the_client(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        for value, kind in ((threading.Lock(), "lock"), ((i for i in ()), "generator")):
            with pytest.raises(
                SerializationError, match=f"cannot serialize an object of type {kind}"
            ):
                await bounded(mec.push({"v": value}))


@pytest_twisted.ensureDeferred
async def test_push_with_a_bad_namespace_names_the_problem(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(TypeError, match="namespace keys must be str, got 1"):
            await bounded(mec.push({1: 2}))
        with pytest.raises(TypeError, match="push takes a dict of name: value, got a list"):
            await bounded(mec.push([1, 2]))


@pytest_twisted.ensureDeferred
async def test_a_value_that_fails_to_unpickle_on_the_engine_comes_back_as_its_error(
    cluster, mec, bystander
):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(CompositeError) as info:
            await bounded(mec.push({"r": RefusesToLoad()}))
        engine_errors(info, "ValueError")
        with pytest.raises(ValueError, match="cannot be rebuilt on an engine") as original:
            info.value.raise_exception()
        # the engine's traceback travels with it
        assert "_refuse" in info.value.elist[0].traceback
        assert original.value is not None


@pytest_twisted.ensureDeferred
async def test_pulling_something_unpicklable_or_with_bad_keys(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        await bounded(mec.execute("import threading; lock = threading.Lock()"))
        with pytest.raises(CompositeError) as info:
            await bounded(mec.pull("lock"))
        engine_errors(info, "SerializationError")
        for keys in (5, ["a", 5], None):
            with pytest.raises(TypeError, match="keys must be a name"):
                await bounded(mec.pull(keys))


# -- targets and block ---------------------------------------------------------


@pytest.mark.parametrize(
    "targets, message",
    [
        (-1, "no engine with id -1: registered engines"),
        (1.0, "invalid targets 1.0"),
        (True, "invalid targets True"),
        ("some", "invalid targets 'some'"),
        ([], "invalid targets \\[\\]"),
        (None, "invalid targets None"),
        ([0, 0], "targets name engine\\(s\\) 0 more than once: list each engine once"),
        ([0] * 20_000, "more than once"),
        (list(range(20_000)), "no engine with id .*\\.\\.\\. \\(19998 unknown ids in all\\)"),
        (2**70, "no engine with id 1180591620717411303424"),
    ],
    ids=["negative", "float", "bool", "str", "empty", "none", "dup", "many-dups", "huge", "big"],
)
@pytest_twisted.ensureDeferred
async def test_bad_targets_are_refused_and_nothing_runs(cluster, mec, bystander, targets, message):
    async with unharmed(cluster, mec, bystander):
        await bounded(mec.execute("ran = 0"))
        with pytest.raises(InvalidEngineID, match=message) as info:
            await bounded(mec.execute("ran += 1", targets=targets))
        assert len(str(info.value)) < 1000
        assert await bounded(mec.pull("ran")) == [0, 0]


@pytest_twisted.ensureDeferred
async def test_block_must_be_a_bool_and_nothing_runs_otherwise(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        await bounded(mec.execute("ran = 0"))
        for block in (None, "yes", 1):
            with pytest.raises(TypeError, match="block must be True or False"):
                await bounded(mec.execute("ran += 1", block=block))
        assert await bounded(mec.pull("ran")) == [0, 0]


@pytest_twisted.ensureDeferred
async def test_get_result_with_a_bad_number(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(TypeError, match="get_result takes a command number"):
            await bounded(mec.get_result("last"))
        with pytest.raises(CompositeError) as info:
            await bounded(mec.get_result(10**9))
        engine_errors(info, "InvalidResultNumber")


# -- properties ----------------------------------------------------------------


@pytest.mark.parametrize(
    "properties, message",
    [
        ({"p": object()}, "property 'p' is a object; properties hold plain data only"),
        ({"p": threading.Lock()}, "property 'p' is a lock"),
        ({"p": b"x"}, "property 'p' is a bytes"),
        ({1: 2}, "property names must be str, got 1"),
        ({"p": {1: 2}}, "holds a dict with the non-str key 1"),
        ([("p", 1)], "set_properties\\(\\) needs a dict, got list"),
    ],
    ids=["object", "lock", "bytes", "int-name", "dict-key", "not-a-dict"],
)
@pytest_twisted.ensureDeferred
async def test_non_plain_properties_are_refused_with_the_engines_message(
    cluster, mec, bystander, properties, message
):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(InvalidProperty, match=message):
            await bounded(mec.set_properties(properties))


@pytest_twisted.ensureDeferred
async def test_a_huge_property_is_stored_and_read_back(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        big = "x" * 5_000_000
        await bounded(mec.set_properties({"big": big}, targets=0))
        (props,) = await bounded(mec.get_properties(["big"], targets=0))
        assert props == {"big": big}
        await bounded(mec.del_properties(["big"], targets=0))


# -- pending results -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pending_ids_belong_to_their_client_and_are_redeemed_once(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        pid = await bounded(mec.execute("import time; time.sleep(0.2)", block=False))
        with pytest.raises(InvalidDeferredID, match=f"no pending result with id {pid}"):
            await bounded(bystander.get_pending_deferred(pid, True))
        assert len(await bounded(mec.get_pending_deferred(pid, True))) == 2
        for bad in (pid, -1, "x"):
            with pytest.raises(InvalidDeferredID, match="never issued to this client"):
                await bounded(mec.get_pending_deferred(bad, True))


# -- tasks -------------------------------------------------------------------------


def _raise_key_error(x):
    raise KeyError(x)


def _broken_depend(properties):
    raise RuntimeError("the depend function broke")


async def task_outcome(tc, taskid):
    return await bounded(tc.get_task_result(taskid, block=True))


@pytest_twisted.ensureDeferred
async def test_failing_tasks_fail_alone(cluster, mec, bystander, tc):
    async with unharmed(cluster, mec, bystander):
        cases = {
            "KeyError": MapTask(_raise_key_error, args=("k",)),
            "SystemExit": StringTask("raise SystemExit(2)"),
            "RuntimeError": MapTask(abs, args=(1,), depend=_broken_depend),
            "recovery": MapTask(
                _raise_key_error, args=(1,), recovery_task=MapTask(_raise_key_error, args=(2,))
            ),
            "unknown-after": MapTask(abs, args=(1,), after=[999_999]),
            "arg": MapTask(abs, args=(RefusesToLoad(),)),
        }
        ids = {name: await bounded(tc.run(t)) for name, t in cases.items()}
        good = await bounded(tc.run(MapTask(abs, args=(-5,))))
        outcomes = {name: await task_outcome(tc, t) for name, t in ids.items()}
        assert {n: o.status for n, o in outcomes.items()} == dict.fromkeys(cases, "failed")
        assert outcomes["KeyError"].error.ename == "KeyError"
        assert outcomes["SystemExit"].error.ename == "SystemExit"
        # reading it must not stop this process: it comes as a RemoteError
        with pytest.raises(RemoteError, match="SystemExit: 2"):
            _ = outcomes["SystemExit"].results
        assert "the depend function broke" in outcomes["RuntimeError"].error.evalue
        # the recovery task's own failure is the outcome
        assert outcomes["recovery"].error.evalue == "2"
        assert outcomes["unknown-after"].error.ename == "InvalidDependency"
        assert "999999" in outcomes["unknown-after"].error.evalue
        assert "cannot be rebuilt" in outcomes["arg"].error.evalue
        assert (await task_outcome(tc, good)).results == 5


def test_bad_task_options_are_refused_when_the_task_is_built():
    with pytest.raises(SyntaxError):
        StringTask("a = = 1")
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        MapTask(abs, args=(1,), retries=-1)
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        MapTask(abs, args=(1,), timeout=-5)


@pytest_twisted.ensureDeferred
async def test_unknown_task_ids(cluster, mec, bystander, tc):
    async with unharmed(cluster, mec, bystander):
        for call in (tc.abort, tc.get_task_result, tc.barrier, tc.resubmit):
            for bad in (999_999, -1):
                with pytest.raises(InvalidTaskID, match=f"no task with id {bad}"):
                    await bounded(call(bad if call in (tc.abort, tc.get_task_result) else [bad]))


@pytest_twisted.ensureDeferred
async def test_bad_task_queries(cluster, mec, bystander, tc):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(TypeError, match="db_query takes a dict query"):
            await bounded(tc.db_query("status == failed"))
        with pytest.raises(KeyError, match="is not a task record key; use one of"):
            await bounded(tc.db_query({"$bad": 1}))


@pytest_twisted.ensureDeferred
async def test_clearing_a_running_task_leaves_it_to_finish(cluster, mec, bystander, tc):
    async with unharmed(cluster, mec, bystander):
        taskid = await bounded(tc.run(StringTask("import time; time.sleep(0.5); z = 1", pull="z")))
        await task.deferLater(reactor, 0.2, lambda: None)
        await bounded(tc.clear([taskid]))
        tr = await task_outcome(tc, taskid)
        assert tr.status == "succeeded" and tr.results == {"z": 1}


# -- the wire itself ---------------------------------------------------------------


BAD_EXECUTE_ARGS = [
    ((5, "all", True), {}),  # code not a str
    ((), {}),  # no code
    (("a = 1",), {"block": "yes"}),
    (("a = 1",), {"nonsense": 1}),
    (("a = 1", "all", True, "extra"), {}),
    (("a = 1", "all", 5), {}),  # block not a bool
]


@pytest_twisted.ensureDeferred
async def test_raw_calls_with_wrong_arguments_are_refused_and_the_connection_stays(
    cluster, mec, bystander
):
    furl = cluster.cluster_dir.read_furl(clusterdir.MULTIENGINE_FURL)
    ref = await asyncclient.connect(furl, timeout=PROMPT)
    session = await bounded(ref.callRemote("connect"))
    async with unharmed(cluster, mec, bystander):
        for args, kwargs in BAD_EXECUTE_ARGS:
            d = session.callRemote("execute", *args, **kwargs)
            d.addErrback(fcutil.translate_transport_failure, "execute")
            with pytest.raises(ProtocolError, match="the call execute was not sent: Violation"):
                await bounded(d)
        d = session.callRemote("no_such_method")
        d.addErrback(fcutil.translate_transport_failure, "no_such_method")
        with pytest.raises(ProtocolError, match="does not offer no_such_method"):
            await bounded(d)
        # the same connection and session still work
        tag, ids = await bounded(session.callRemote("get_ids", True))
        assert (tag, ids) == ("ok", sorted(cluster.registered()))


@pytest.mark.parametrize("args, kwargs", BAD_EXECUTE_ARGS)
@pytest_twisted.ensureDeferred
async def test_raw_calls_that_skip_the_schema_are_refused_by_the_controller(
    cluster, mec, bystander, args, kwargs
):
    # a connection of its own: Foolscap used to drop the connection of a peer
    # sending an int where text or a bool belongs
    from foolscap.api import Tub

    tub = Tub()
    tub.startService()
    try:
        furl = cluster.cluster_dir.read_furl(clusterdir.MULTIENGINE_FURL)
        ref = await asyncclient.connect(furl, tub=tub, timeout=PROMPT)
        session = await bounded(ref.callRemote("connect"))
        async with unharmed(cluster, mec, bystander):
            # _useSchema=False: sent as is, for the controller to judge
            d = session.callRemote("execute", *args, _useSchema=False, **kwargs)
            d.addErrback(fcutil.translate_transport_failure, "execute")
            with pytest.raises(ProtocolError, match="the controller refused the call execute"):
                await bounded(d)
            # the same connection and session still work
            tag, ids = await bounded(session.callRemote("get_ids", True))
            assert (tag, ids) == ("ok", sorted(cluster.registered()))
    finally:
        await tub.stopService()


@pytest_twisted.ensureDeferred
async def test_raw_task_specs_with_bad_flags_are_refused(cluster, mec, bystander, tc):
    furl = cluster.cluster_dir.read_furl(clusterdir.TASK_FURL)
    ref = await asyncclient.connect(furl, timeout=PROMPT)
    flags, payload = MapTask(abs, args=(-2,)).to_spec()
    async with unharmed(cluster, mec, bystander):
        bad_specs = [
            "not a spec",
            (flags, b"not a payload"),
            ({**flags, "retries": -1}, payload),
            ({**flags, "timeout": -5}, payload),
            ({**flags, "after": "garbage"}, payload),
            ({**flags, "recovery_task": 7}, payload),
        ]
        for spec in bad_specs:
            tag, body = await bounded(ref.callRemote("run", spec))
            assert tag == "error", spec
            assert body["ename"] in ("TypeError", "ValueError"), body
        tag, taskid = await bounded(ref.callRemote("run", (flags, payload)))
        assert tag == "ok"
        assert (await task_outcome(tc, taskid)).results == 2


@pytest_twisted.ensureDeferred
async def test_client_that_disconnects_mid_execute_loses_only_its_own_result(
    cluster, mec, bystander, tmp_path
):
    from foolscap.api import Tub

    tub = Tub()
    tub.startService()
    leaver = await asyncclient.get_multiengine_client(
        cluster_dir=cluster.cluster_dir.path, tub=tub, timeout=PROMPT
    )
    async with unharmed(cluster, mec, bystander):
        await bounded(mec.execute("left_done = False", targets=0))
        started, release = tmp_path / "started", tmp_path / "release"
        d = leaver.execute(gated(started, release) + "left_done = True", targets=0)
        await wait_for_async(started.exists, PROMPT, "the engine never started the command")
        await tub.stopService()
        release.touch()
        with pytest.raises(ConnectionError, match="lost the connection to the controller"):
            await bounded(d)
        # the engine finishes the command; the next one queued after it sees that
        assert await bounded(mec.pull("left_done", targets=0)) == [True]


# -- last: an engine that exits --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_code_that_exits_the_engine_loses_that_engine_only(cluster, mec, bystander):
    before = cluster.registered()
    victim, survivor = sorted(before)
    pending = bystander.execute("import time; time.sleep(0.3); b = 1", targets=survivor)
    with pytest.raises(CompositeError) as info:
        await bounded(mec.execute("import os; os._exit(3)", targets=victim))
    assert engine_errors(info, "EngineError") == [victim]
    assert "resubmit" in str(info.value)
    assert [r["id"] for r in await bounded(pending)] == [survivor]
    assert cluster.controller.alive()
    await cluster.wait_until_unregistered_async(victim)
    proc = next(p for p in cluster.engines if p.pid == before[victim])
    await wait_for_async(lambda: not proc.alive(), PROMPT, "the engine did not exit")
    assert proc.returncode == 3
    # a new engine takes its place and the cluster carries on
    cluster.start_engine()
    await cluster.wait_for_engines_async(2)
    assert len(await bounded(mec.execute("c = 1"))) == 2


# -- in process: what a departed client leaves on the controller -------------------


class _SlowEngine:
    """An engine whose commands finish only when the test says so."""

    def __init__(self):
        self.running = []

    def execute(self, lines):
        d = defer.Deferred()
        self.running.append(d)
        return d


class _Controller:
    def __init__(self, engine):
        self.engines = {0: engine}


@pytest_twisted.ensureDeferred
async def test_a_departed_clients_session_and_pending_results_are_released():
    import gc
    import weakref

    from kernel.multiengine import MultiEngine
    from kernel.multienginefc import FCSynchronousMultiEngineFromMultiEngine
    from tests.fcloopback import Loopback

    engine = _SlowEngine()
    root = FCSynchronousMultiEngineFromMultiEngine(MultiEngine(_Controller(engine)))
    sessions = []
    connect = root.remote_connect

    def remember_session():
        session = connect()
        sessions.append(weakref.ref(session))
        return session

    root.remote_connect = remember_session
    loop = Loopback()
    try:
        ref = await bounded(loop.reference(root))
        session = await bounded(ref.callRemote("connect"))
        # a result left on the controller (block=False), then the client goes
        tag, pending_id = await bounded(session.callRemote("execute", "x = 1", 0, False))
        assert tag == "ok"
        pending = weakref.ref(sessions[0]().smultiengine.pending)
        await loop.client.stopService()
        await wait_for_async(
            lambda: gc.collect() is not None and sessions[0]() is None,
            PROMPT,
            "the departed client's session is still held",
        )
        # the engine finishes later; its result has nowhere to go and is dropped
        assert pending() is not None
        engine.running[0].callback({"id": 0})
        gc.collect()
        assert pending() is None
    finally:
        await loop.server.stopService()
