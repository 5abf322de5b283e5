"""Security by default, with real processes: private files, loopback, FURL capabilities."""

import os
import stat

import pytest
import pytest_twisted
from foolscap.api import Tub
from foolscap.referenceable import SturdyRef
from twisted.internet import defer, error, reactor
from twisted.python.failure import Failure

from kernel import clusterdir
from kernel.clusterdir import ClusterDir
from kernel.error import SecurityError
from kernel.multienginefc import FCMultiEngine
from kernel.testing.processes import LocalCluster, Process, subprocess_env, twist_argv, wait_for

pytestmark = pytest.mark.slow

TIMEOUT = 30


@pytest.fixture(scope="module")
def cluster():
    """A controller serving Foolscap (FURL capabilities) and one engine process."""
    c = LocalCluster(heartbeat=0.5, controller_args=["--adapter=fc"])
    try:
        c.start(1)
        yield c
    finally:
        c.stop()


@pytest_twisted.async_yield_fixture
async def tub():
    t = Tub()
    t.startService()
    yield t
    await t.stopService()


def altered_swissnum(furl):
    head, swissnum = furl.rsplit("/", 1)
    return f"{head}/{'a' if swissnum[0] != 'a' else 'b'}{swissnum[1:]}"


def altered_tubid(furl):
    sr = SturdyRef(furl)
    other = ("a" if sr.tubID[0] != "a" else "b") + sr.tubID[1:]
    return furl.replace(sr.tubID, other)


def test_cluster_dir_and_every_file_in_it_are_private(cluster):
    cd = cluster.cluster_dir
    assert stat.S_IMODE(os.stat(cd.path).st_mode) == 0o700
    for parent, dirs, files in os.walk(cd.path):
        for name in dirs + files:
            mode = stat.S_IMODE(os.stat(os.path.join(parent, name)).st_mode)
            assert mode & 0o077 == 0, f"{name} has mode {mode:o}"
    for name in (clusterdir.ENGINE_FURL, clusterdir.MULTIENGINE_FURL, "engine.pem"):
        assert stat.S_IMODE(os.stat(cd.file(name)).st_mode) == 0o600


def test_controller_listens_on_loopback_only(cluster):
    cd = cluster.cluster_dir
    for name in (clusterdir.ENGINE_FURL, clusterdir.MULTIENGINE_FURL):
        sr = SturdyRef(cd.read_furl(name))
        assert [h.split(":")[-2] for h in sr.locationHints] == ["127.0.0.1"]
    with open("/proc/net/tcp") as f:
        listening = {
            int(local.split(":")[1], 16): local.split(":")[0]
            for _, local, _, st, *rest in (line.split()[:4] for line in list(f)[1:])
            if st == "0A"
        }
    for port in (cd.get_port("engine"), cd.get_port("client")):
        assert listening[port] == "0100007F"  # 127.0.0.1, not 0.0.0.0


async def refused(d):
    """The Failure ``d`` fails with (bounded); the test fails if it succeeds."""
    (outcome,) = await d.addTimeout(TIMEOUT, reactor).addCallbacks(lambda r: [r], lambda f: [f])
    assert isinstance(outcome, Failure), f"expected a refusal, got {outcome!r}"
    assert not outcome.check(defer.TimeoutError, error.TimeoutError)
    return outcome


@pytest_twisted.ensureDeferred
async def test_wrong_swissnum_is_refused_and_nothing_runs(cluster, tub, tmp_path):
    marker = tmp_path / "ran"
    furl = cluster.cluster_dir.read_furl(clusterdir.MULTIENGINE_FURL)
    f = await refused(tub.getReference(altered_swissnum(furl)))
    assert "unable to find reference" in f.getErrorMessage()
    # The genuine FURL still works, and the refused attempt ran nothing.
    ref = await tub.getReference(furl).addTimeout(TIMEOUT, reactor)
    me = FCMultiEngine(ref)
    await me.execute(f"import os; ran = os.path.exists({str(marker)!r})")
    assert await me.pull("ran") == [False]
    assert not marker.exists()


@pytest_twisted.ensureDeferred
async def test_wrong_tubid_is_refused(cluster, tub):
    """The tubid is the controller's certificate hash: a FURL naming another
    Tub cannot connect even to the right address and port."""
    furl = cluster.cluster_dir.read_furl(clusterdir.MULTIENGINE_FURL)
    f = await refused(tub.getReference(altered_tubid(furl)))
    assert "unknown TubID" in f.getErrorMessage()


def start_engine(cd_or_file_args, log_path):
    argv = twist_argv("txkernel-engine", cd_or_file_args, str(log_path))
    return Process("engine", argv, str(log_path), subprocess_env())


def test_engine_with_wrong_furl_exits_and_does_not_register(cluster, tmp_path):
    cd = ClusterDir(tmp_path / "fake").create()
    good = cluster.cluster_dir.read_furl(clusterdir.ENGINE_FURL)
    cd.write_furl(clusterdir.ENGINE_FURL, altered_swissnum(good))
    before = cluster.registered()
    proc = start_engine([f"--furl-file={cd.file(clusterdir.ENGINE_FURL)}"], tmp_path / "e.log")
    try:
        wait_for(lambda: not proc.alive(), TIMEOUT, lambda: f"engine still running:\n{proc.log()}")
        assert proc.returncode == 1
        assert "refused this engine's FURL" in proc.log()
        assert cluster.registered() == before
    finally:
        proc.kill()


def test_engine_refuses_connection_file_with_loose_permissions(cluster, tmp_path):
    cd = ClusterDir(tmp_path / "loose").create()
    path = cd.write_furl(
        clusterdir.ENGINE_FURL, cluster.cluster_dir.read_furl(clusterdir.ENGINE_FURL)
    )
    os.chmod(path, 0o644)
    before = cluster.registered()
    proc = start_engine([f"--cluster-dir={cd.path}"], tmp_path / "e.log")
    try:
        wait_for(lambda: not proc.alive(), TIMEOUT, lambda: f"engine still running:\n{proc.log()}")
        assert proc.returncode == 1
        assert f"chmod 600 {path}" in proc.log()
        assert cluster.registered() == before
    finally:
        proc.kill()


def test_client_refuses_connection_file_with_loose_permissions(cluster, tmp_path):
    cd = ClusterDir(tmp_path / "loose").create()
    furl = cluster.cluster_dir.read_furl(clusterdir.MULTIENGINE_FURL)
    path = cd.write_furl(clusterdir.MULTIENGINE_FURL, furl)
    os.chmod(path, 0o640)
    with pytest.raises(SecurityError, match="chmod 600"):
        cd.read_furl(clusterdir.MULTIENGINE_FURL)


def test_controller_refuses_world_readable_cluster_dir(tmp_path):
    path = tmp_path / "open"
    path.mkdir()
    os.chmod(path, 0o755)
    log_path = str(tmp_path / "controller.log")
    argv = twist_argv("txkernel-controller", [f"--cluster-dir={path}"], log_path)
    proc = Process("controller", argv, log_path, subprocess_env())
    try:
        wait_for(lambda: not proc.alive(), TIMEOUT, lambda: f"still running:\n{proc.log()}")
        assert proc.returncode != 0
        assert f"chmod 700 {path}" in proc.log()
        assert not os.path.exists(path / clusterdir.ENGINE_FURL)
    finally:
        proc.kill()
