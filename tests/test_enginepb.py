"""Engines over PB: registration, the controller-side engine, cred, reconnection."""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from kernel import pbutil
from kernel.engineservice import QueuedEngine
from kernel.error import ConnectionError, RemoteError, SecurityError
from kernel.interfaces import IEngineBase, IEngineInterrupt, IEngineTasks
from kernel.serialized import deserialize, serialize
from tests.harness_pb import PBLoopback


@pytest_twisted.async_yield_fixture
async def loop(tmp_path):
    harness = await PBLoopback.start(n_engines=1, cluster_dir=str(tmp_path / "cluster"))
    try:
        yield harness
    finally:
        await harness.stop()


def _remote(loop: PBLoopback, engine_id: int):
    queued = loop.controller.engines[engine_id]
    assert isinstance(queued, QueuedEngine)
    return queued, queued.engine


@pytest_twisted.ensureDeferred
async def test_engine_registers_and_the_controller_side_engine_has_the_engine_interfaces(loop):
    (engine_id,) = loop.controller.engines
    _, remote = _remote(loop, engine_id)
    assert isinstance(remote.reference, pbutil.PBRemote)
    verifyObject(IEngineBase, remote)
    verifyObject(IEngineInterrupt, remote)
    verifyObject(IEngineTasks, remote)
    assert remote.id == engine_id == loop.engines[engine_id].id


@pytest_twisted.ensureDeferred
async def test_execute_runs_on_the_engine_and_its_errors_arrive_as_plain_data(loop):
    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    result = await queued.execute("x = 6 * 7\nprint(x)")
    assert result["stdout"] == "42\n" and result["id"] == engine_id
    with pytest.raises(RemoteError) as info:
        await queued.execute("1 / 0")
    # the controller side never unpickles the engine's exception: plain data only
    assert info.value.ename == "ZeroDivisionError"
    assert "1 / 0" in info.value.traceback


@pytest_twisted.ensureDeferred
async def test_serialized_blobs_cross_unopened_both_ways_chunked(loop):
    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    payload = os.urandom(3 * pbutil.CHUNK_SIZE + 1)
    await queued.push_serialized({"blob": serialize(payload)})
    await queued.execute("n = len(blob)")
    assert deserialize(await queued.pull_serialized("n")) == len(payload)
    back = await queued.pull_serialized("blob")
    assert deserialize(back) == payload


@pytest_twisted.ensureDeferred
async def test_tasks_run_through_the_controller_side_engine(loop):
    from kernel.task import MapTask

    (engine_id,) = loop.controller.engines
    queued, _ = _remote(loop, engine_id)
    _, payload = MapTask(pow, args=(2, 10)).to_spec()
    result = await queued.run_task(payload)
    assert deserialize(result["result"]) == 1024


@pytest_twisted.ensureDeferred
async def test_a_wrong_engine_secret_is_refused_and_nothing_registers(loop):
    before = set(loop.controller.engines)
    bad = dict(loop.info, engine_secret=pbutil.generate_secret())
    fatal = []
    with pytest.raises(SecurityError, match="refused the PB credentials"):
        await loop.add_engine(info=bad, on_fatal=fatal.append)
    assert fatal and fatal[0].check(SecurityError)
    assert set(loop.controller.engines) == before


@pytest_twisted.ensureDeferred
async def test_the_client_secret_does_not_open_the_engine_port(loop):
    info = loop.info
    swapped = dict(info, engine_secret=info["client_secret"])
    with pytest.raises(SecurityError):
        await pbutil.login_with(swapped, pbutil.ENGINE_USER, "registrar")


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_unregisters_the_engine_which_registers_again_with_its_id(loop):
    (engine_id,) = loop.controller.engines
    connector = loop.connectors[engine_id]
    first = loop.controller.engines[engine_id]
    connector.controller.disconnect()
    await loop.wait_unregistered(engine_id)
    assert await connector.when_registered().addTimeout(30, reactor) == engine_id
    assert loop.controller.engines[engine_id] is not first
    assert connector.registrations == 2
    result = await loop.controller.engines[engine_id].execute("y = 1")
    assert result["id"] == engine_id


def test_connection_file_is_private_and_keeps_its_secrets_across_restarts(tmp_path):
    from kernel.clusterdir import ClusterDir
    from kernel.controllerservice import ControllerService
    from kernel.enginefc import FCEngineRegistrar

    cd = ClusterDir(tmp_path / "c").create()
    registrar = FCEngineRegistrar(ControllerService())
    first = pbutil.serve_controller(cd, registrar)
    first.startService()
    try:
        info = pbutil.read_connection_info(cd)
    finally:
        first.stopService()
    assert stat.S_IMODE(os.stat(cd.file(pbutil.PB_FILE)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cd.file(pbutil.CERT_FILE)).st_mode) == 0o600
    assert "PRIVATE KEY" not in info["certificate"]
    assert info["certificate"] == pbutil.public_pem(pbutil.controller_certificate(cd))
    assert info["engine_secret"] != info["client_secret"]
    assert info["engine_port"] != info["client_port"]
    second = pbutil.serve_controller(cd, registrar)
    second.startService()
    try:
        again = pbutil.read_connection_info(cd)
    finally:
        second.stopService()
    assert again["engine_secret"] == info["engine_secret"]
    assert again["client_secret"] == info["client_secret"]
    assert again["certificate"] == info["certificate"]


# -- real processes ---------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def processes():
    """A controller process and one engine process, both ``--adapter pb``."""
    from kernel.testing.processes import LocalCluster

    cluster = LocalCluster(
        heartbeat=0.5, controller_args=["--adapter=pb"], engine_args=["--adapter=pb"]
    )
    try:
        await cluster.start_async(1)
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_engine_process_with_a_wrong_secret_gives_up_and_never_registers(
    processes, tmp_path
):
    from kernel.clusterdir import ClusterDir
    from kernel.testing.processes import Process, subprocess_env, twist_argv, wait_for_async

    real = pbutil.read_connection_info(processes.cluster_dir)
    bad_dir = ClusterDir(tmp_path / "bad").create()
    bad_dir.write_json(pbutil.PB_FILE, dict(real, engine_secret=pbutil.generate_secret()))
    log_path = bad_dir.log_file("engine")
    argv = twist_argv(
        "txkernel-engine", [f"--cluster-dir={bad_dir.path}", "--adapter=pb"], log_path
    )
    proc = Process("bad-engine", argv, log_path, subprocess_env())
    try:
        await wait_for_async(lambda: not proc.alive(), 30, lambda: proc.log())
    finally:
        proc.stop()
    assert proc.returncode == 1
    assert "refused the PB credentials" in proc.log(200)
    assert len(processes.registered()) == 1


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_engines_register_again_with_their_ids_after_a_controller_restart(processes):
    before = processes.registered()
    info = pbutil.read_connection_info(processes.cluster_dir)
    processes.stop_controller()
    await processes.start_controller_async()
    assert await processes.wait_for_engines_async(1) == before
    assert pbutil.read_connection_info(processes.cluster_dir) == info


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_paused_engine_is_declared_dead_and_registers_again_when_resumed(processes):
    ((engine_id, pid),) = processes.registered().items()
    proc = processes.pause_engine(engine_id)
    try:
        # heartbeat 0.5 s, 3 missed: dead long before this bound
        await processes.wait_until_unregistered_async(engine_id, timeout=30)
    finally:
        proc.resume()
    # the controller dropped the connection; the resumed engine notices and comes back
    assert await processes.wait_for_engines_async(1) == {engine_id: pid}


@pytest_twisted.ensureDeferred
async def test_a_server_without_the_pinned_certificate_is_refused(loop, tmp_path):
    """Another controller (another key) cannot stand in for ours."""
    from kernel.clusterdir import ClusterDir

    stranger = pbutil.controller_certificate(ClusterDir(tmp_path / "other").create())
    forged = dict(loop.info, certificate=pbutil.public_pem(stranger))
    with pytest.raises(SecurityError, match="TLS certificate does not match"):
        await pbutil.login_with(forged, pbutil.ENGINE_USER, "registrar")


@pytest_twisted.ensureDeferred
async def test_the_listeners_accept_no_plain_tcp(loop):
    info = loop.info
    with pytest.raises(ConnectionError):
        await pbutil.login(
            info["host"],
            info["client_port"],
            pbutil.CLIENT_USER,
            info["client_secret"],
            "multiengine",
            timeout=1,  # a TLS listener never answers PB's plain-TCP greeting
            certificate=None,
        )
