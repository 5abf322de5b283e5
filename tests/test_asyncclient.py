"""kernel.asyncclient: finding the controller and building the client halves."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from foolscap.api import Referenceable

from kernel import asyncclient, clusterdir
from kernel.clusterdir import ClusterDir
from kernel.error import ConnectionError, SecurityError
from kernel.multienginefc import FCFullSynchronousMultiEngineClient, make_client_referenceable
from kernel.taskfc import FCTaskClient, FCTaskControllerFromTaskController
from tests.fcloopback import Loopback

FURL = "pb://abcdefghijklmnopqrstuvwxyz234567@tcp:127.0.0.1:1/swiss"


@pytest.fixture
def cd(tmp_path):
    return ClusterDir(tmp_path / "cluster").create()


def test_a_furl_is_used_as_given(cd):
    assert asyncclient.find_furl(FURL, None, clusterdir.MULTIENGINE_FURL) == FURL


def test_a_connection_file_or_a_cluster_directory_is_read(cd):
    path = cd.write_furl(clusterdir.TASK_FURL, FURL)
    assert asyncclient.find_furl(path, None, clusterdir.TASK_FURL) == FURL
    assert asyncclient.find_furl(None, cd.path, clusterdir.TASK_FURL) == FURL
    assert asyncclient.find_furl(cd.path, None, clusterdir.TASK_FURL) == FURL


def test_missing_connection_file_says_how_to_start_a_cluster(cd):
    with pytest.raises(ConnectionError, match="txkernel cluster start"):
        asyncclient.find_furl(None, cd.path, clusterdir.MULTIENGINE_FURL)
    with pytest.raises(ConnectionError, match="neither a FURL"):
        asyncclient.find_furl(os.path.join(cd.path, "nope.furl"), None, "x")


def test_a_connection_file_others_can_read_is_refused(cd):
    path = cd.write_furl(clusterdir.MULTIENGINE_FURL, FURL)
    os.chmod(path, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        asyncclient.find_furl(path, None, clusterdir.MULTIENGINE_FURL)


def test_unknown_adapter_is_refused():
    with pytest.raises(ValueError, match="unknown adapter"):
        asyncclient._adapter("zmq", None, None)


@pytest_twisted.ensureDeferred
async def test_pb_clients_need_a_cluster_directory_not_a_furl():
    with pytest.raises(ValueError, match="cluster directory"):
        await asyncclient.get_multiengine_client(FURL, adapter="pb")


@pytest_twisted.async_yield_fixture
async def loop():
    loop = Loopback()
    yield loop
    await loop.stop()


@pytest_twisted.ensureDeferred
async def test_factories_build_the_class_the_server_names(loop, cd):
    cd.write_furl(
        clusterdir.MULTIENGINE_FURL,
        loop.server.registerReference(make_client_referenceable(None)),
    )
    cd.write_furl(
        clusterdir.TASK_FURL,
        loop.server.registerReference(FCTaskControllerFromTaskController(None)),
    )
    me = await asyncclient.get_multiengine_client(cluster_dir=cd.path, tub=loop.client)
    assert isinstance(me, FCFullSynchronousMultiEngineClient)
    tc = await asyncclient.get_task_client(cd.file(clusterdir.TASK_FURL), tub=loop.client)
    assert isinstance(tc, FCTaskClient)


class Impostor(Referenceable):
    def remote_get_client_name(self):
        return "os.system"


@pytest_twisted.ensureDeferred
async def test_a_client_class_outside_kernel_is_refused(loop):
    furl = loop.server.registerReference(Impostor())
    with pytest.raises(ConnectionError, match="unknown client class"):
        await asyncclient.get_task_client(furl, tub=loop.client)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_controller_raises_connection_error(loop):
    furl = loop.server.registerReference(Impostor())
    await loop.server.stopService()
    with pytest.raises(ConnectionError, match="cannot reach the controller"):
        await asyncclient.get_multiengine_client(furl, tub=loop.client, timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_wrong_furl_raises_connection_error(loop):
    furl = loop.server.registerReference(Impostor())
    wrong = furl.rsplit("/", 1)[0] + "/not-the-swissnum"
    with pytest.raises(ConnectionError, match="cannot reach the controller"):
        await asyncclient.get_multiengine_client(wrong, tub=loop.client, timeout=10)


def test_with_no_adapter_clients_speak_what_the_cluster_directory_serves(tmp_path):
    cd = clusterdir.ClusterDir(tmp_path / "c").create()
    with pytest.raises(ConnectionError, match="no controller connection files"):
        asyncclient._adapter(None, None, cd.path)
    cd.write_json(clusterdir.NATIVE_FILE, {"port": 1})
    assert asyncclient._adapter(None, None, cd.path) == "native"
    assert asyncclient._adapter(None, cd.path, None) == "native"  # a directory given
    assert asyncclient._adapter(None, FURL, cd.path) == "fc"  # a FURL is Foolscap's


def test_an_explicit_adapter_wins_but_a_mismatch_names_the_fix(tmp_path):
    cd = clusterdir.ClusterDir(tmp_path / "c").create()
    cd.write_json(clusterdir.NATIVE_FILE, {"port": 1})
    assert asyncclient._adapter("native", None, cd.path) == "native"
    with pytest.raises(ConnectionError, match="serves the native transport .* not Foolscap"):
        asyncclient._adapter("fc", None, cd.path)
