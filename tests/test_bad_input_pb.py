"""Bad input loses nothing, over Perspective Broker: the cases where the
transport matters (text it cannot encode, raw calls that skip the client
half, a client that leaves mid-command) against a real PB cluster. The PB
client halves share the Foolscap ones' code, checked fully in
:mod:`tests.test_bad_input`."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import threads

from kernel import asyncclient
from kernel.error import CompositeError, ConnectionError, InvalidEngineID, ProtocolError
from kernel.testing.processes import LocalCluster, gated, wait_for_async
from tests.test_bad_input import PROMPT, bounded, engine_errors, unharmed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A PB controller and two engine processes."""
    c = LocalCluster(heartbeat=0.5, max_missed=6, controller_args=["--adapter=pb"])
    try:
        c.start(2)
        yield c
    finally:
        # off the reactor thread: the clients' connections close while it runs
        pytest_twisted.blockon(threads.deferToThread(c.stop))


def _client(cluster):
    d = asyncclient.get_multiengine_client(
        cluster_dir=cluster.cluster_dir.path, adapter="pb", timeout=PROMPT
    )
    return pytest_twisted.blockon(d)


@pytest.fixture(scope="module")
def mec(cluster):
    return _client(cluster)


@pytest.fixture(scope="module")
def bystander(cluster):
    return _client(cluster)


@pytest_twisted.ensureDeferred
async def test_lone_surrogates_from_engines_arrive_escaped(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        results = await bounded(mec.execute("print(chr(0xDC80))"))
        assert {r["stdout"] for r in results} == {"\\udc80\n"}
        with pytest.raises(CompositeError) as info:
            await bounded(mec.execute("raise ValueError(chr(0xDC80))"))
        engine_errors(info, "ValueError")
        assert info.value.elist[0].evalue == "\\udc80"


@pytest_twisted.ensureDeferred
async def test_the_client_half_refuses_before_sending(cluster, mec, bystander):
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(ValueError, match="execute: .*lone surrogate"):
            await bounded(mec.execute("a = '\udc80'"))
        with pytest.raises(InvalidEngineID, match="more than once"):
            await bounded(mec.execute("a = 1", targets=[0, 0]))
        with pytest.raises(TypeError, match="block must be True or False"):
            await bounded(mec.execute("a = 1", block=None))


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((5, "all", True), {}),
        ((), {}),
        (("a = 1",), {"block": 5}),
        (("a = 1",), {"nonsense": 1}),
        (("a = 1", "all", True, "extra"), {}),
    ],
    ids=["int-code", "no-code", "int-block", "unknown-arg", "extra-arg"],
)
@pytest_twisted.ensureDeferred
async def test_raw_calls_with_wrong_arguments_are_refused_and_the_connection_stays(
    cluster, mec, bystander, args, kwargs
):
    session = await bounded(mec.remote_reference.callRemote("connect"))
    async with unharmed(cluster, mec, bystander):
        with pytest.raises(
            ProtocolError,
            match="the peer refused the call execute: .*(refused|missing|unknown|too many)",
        ):
            await bounded(session.callRemote("execute", *args, **kwargs))
        assert await bounded(session.callRemote("get_ids", True)) == (
            "ok",
            sorted(cluster.registered()),
        )


@pytest_twisted.ensureDeferred
async def test_client_that_disconnects_mid_execute_loses_only_its_own_result(
    cluster, mec, bystander, tmp_path
):
    leaver = await bounded(
        asyncclient.get_multiengine_client(
            cluster_dir=cluster.cluster_dir.path, adapter="pb", timeout=PROMPT
        )
    )
    async with unharmed(cluster, mec, bystander):
        await bounded(mec.execute("left_done = False", targets=0))
        started, release = tmp_path / "started", tmp_path / "release"
        d = leaver.execute(gated(started, release) + "left_done = True", targets=0)
        await wait_for_async(started.exists, PROMPT, "the engine never started the command")
        leaver.disconnect()
        release.touch()
        with pytest.raises(ConnectionError):
            await bounded(d)
        assert await bounded(mec.pull("left_done", targets=0)) == [True]
