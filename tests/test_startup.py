"""Starting clusters with the defaults, real processes: the native transport
on loopback, engines and controllers that import no Foolscap, engines that
find a controller started after them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor

from kernel import asyncclient, clusterdir, spawn
from kernel.clusterdir import ClusterDir
from kernel.testing.processes import ROOT, LocalCluster, python_output, subprocess_env, wait_for

#: Bound on every wait, seconds.
WAIT = 60


@pytest_twisted.ensureDeferred
async def test_a_default_cluster_serves_native_and_its_engines_never_import_foolscap():
    cluster = LocalCluster()
    try:
        await cluster.start_async(2)
        assert cluster.cluster_dir.served_adapter() == "native"
        mec = await asyncclient.get_multiengine_client(
            cluster_dir=cluster.cluster_dir.path, timeout=WAIT
        )
        # Several kinds of inbound call first: commands, data, properties.
        await mec.push({"a": [1, 2]}, targets="all", block=True).addTimeout(WAIT, reactor)
        assert await mec.pull("a", targets="all", block=True).addTimeout(WAIT, reactor) == [
            [1, 2],
            [1, 2],
        ]
        await mec.execute(
            "import sys\nfc = sorted(m for m in sys.modules if m.split('.')[0] == 'foolscap')",
            targets="all",
            block=True,
        ).addTimeout(WAIT, reactor)
        loaded = await mec.pull("fc", targets="all", block=True).addTimeout(WAIT, reactor)
        assert loaded == [[], []]
    finally:
        cluster.stop()


def _imported(log_text: str) -> set[str]:
    """The modules a process imported, from its ``-X importtime`` lines."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log_text.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest_twisted.ensureDeferred
async def test_a_native_controller_never_imports_foolscap(monkeypatch):
    # Every import of the controller process (and the engines) goes to its log.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    cluster = LocalCluster()
    try:
        await cluster.start_async(2)
        assert cluster.cluster_dir.served_adapter() == "native"
        # Clients of both front ends, streamed output, a load-balanced task.
        mec = await asyncclient.get_multiengine_client(
            cluster_dir=cluster.cluster_dir.path, timeout=WAIT
        )
        tc = await asyncclient.get_task_client(cluster_dir=cluster.cluster_dir.path, timeout=WAIT)
        seen: list = []

        def observe(*output) -> None:
            seen.append(output)

        assert await mec.add_output_observer(observe).addTimeout(WAIT, reactor)
        await mec.push({"a": 3}, targets="all", block=True).addTimeout(WAIT, reactor)
        await mec.execute("print(a)", targets="all", block=True).addTimeout(WAIT, reactor)
        assert await tc.map(lambda x: 2 * x, [1, 2]).addTimeout(WAIT, reactor) == [2, 4]
        await mec.remove_output_observer(observe).addTimeout(WAIT, reactor)
        imported = _imported(cluster.controller.log(100_000))
        # the log holds the controller's imports: the native server halves among them
        assert {"kernel.multiengineremote", "kernel.taskremote"} <= imported
        assert sorted(m for m in imported if m.split(".")[0] == "foolscap") == []
    finally:
        cluster.stop()


def test_what_a_forking_starter_preloads_imports_no_foolscap_and_no_reactor():
    code = (
        "import sys\n"
        "from kernel import spawn\n"
        "spawn.preload()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'foolscap'),"
        " 'twisted.internet.reactor' in sys.modules)\n"
    )
    assert python_output(code, timeout=WAIT).split() == ["[]", "False"]
    assert "kernel.multiengineremote" in spawn.PRELOAD


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["native", "fc"])
def test_an_engine_started_before_its_controller_uses_the_adapter_it_then_serves(adapter):
    cluster = LocalCluster(controller_args=[f"--adapter={adapter}"])
    try:
        engine = cluster.start_engine()  # no --adapter, no connection files yet
        wait_for(
            lambda: "waiting for a controller's connection files" in engine.log(200),
            WAIT,
            lambda: f"the engine never waited for connection files:\n{engine.log()}",
        )
        cluster.start_controller()
        registered = cluster.wait_for_engines(1)
        assert list(registered.values()) == [engine.pid]
        assert f"the controller serves {adapter}" in engine.log(200)
    finally:
        cluster.stop()


def _run_forking(code: str, importtime: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter (where clusters can be forked:
    no reactor); it prints one JSON object, returned. With ``importtime``
    every process, forks included, logs its imports (``-X importtime``)."""
    env = subprocess_env()
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


FORKED_START = """
import json, sys
from kernel.testing.processes import LocalCluster
cluster = LocalCluster(spawn="fork")
try:
    registered = cluster.start(2)
    print(json.dumps({
        "registered": sorted(registered.values()),
        "engines": sorted(e.pid for e in cluster.engines),
        "starter": sorted(m for m in sys.modules if m.startswith("kernel.")),
        "controller_log": cluster.controller.log(100_000),
        "engine_log": cluster.engines[0].log(100_000),
        # SIGTERM: each ends by that signal, as under twist
        "statuses": [p.stop(60) for p in [*cluster.engines, cluster.controller]],
    }))
finally:
    cluster.stop()
"""


@pytest.mark.slow
def test_a_forking_starter_forks_the_controller_before_the_engines_own_code_is_imported():
    """The controller is forked once what it shares with engines is
    imported: it imports the rest of its own code itself (while the starter
    imports the engines' and forks them) and never what only engines need;
    the engines never import the controller's code."""
    out = _run_forking(FORKED_START, importtime=True)
    assert out["registered"] == out["engines"]
    starter = set(out["starter"])
    assert {m for m in spawn.COMMON_PRELOAD if m.startswith("kernel.")} <= starter
    assert not set(spawn.CONTROLLER_PRELOAD) & starter
    in_controller = _imported(out["controller_log"])
    in_engine = _imported(out["engine_log"])
    assert {"kernel.controllerservice", "twisted.application.internet"} <= in_controller
    assert not set(spawn.ENGINE_PRELOAD) & in_controller
    assert not set(spawn.ENGINE_PRELOAD) & in_engine  # preloaded before their fork
    assert "kernel.engineservice" not in in_controller | in_engine  # preloaded for both
    assert not set(spawn.CONTROLLER_PRELOAD) & in_engine
    assert out["statuses"] == [-signal.SIGTERM] * 3


ENGINES_FIRST = """
import json
from kernel.testing.processes import LocalCluster, wait_for
cluster = LocalCluster(spawn="fork", controller_args=["--adapter=native"])
try:
    engines = [cluster.start_engine("--adapter=native") for _ in range(2)]
    for engine in engines:
        wait_for(
            lambda: "waiting for a controller's connection files" in engine.log(200),
            60,
            lambda: "an engine never waited for connection files:" + engine.log(),
        )
    cluster.launch_controller()
    registered = cluster.wait_for_engines(2, timeout=60)
    print(json.dumps({
        "registered": sorted(registered.values()),
        "engines": sorted(e.pid for e in engines),
        "log": engines[0].log(200),
    }))
finally:
    cluster.stop()
"""


@pytest.mark.slow
def test_engines_forked_before_their_controller_listens_register_once_it_does():
    out = _run_forking(ENGINES_FIRST)
    assert out["registered"] == out["engines"]
    assert "the controller's connection files are there: connecting with native" in out["log"]


def test_the_engine_list_is_read_again_only_when_the_controller_rewrote_it(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cluster = LocalCluster(cd.path)
    assert cluster.engines_file() == {}
    cd.write_json(clusterdir.ENGINES_FILE, {"controller_pid": 1, "engines": {}})
    first = cluster.engines_file()
    assert first == {"controller_pid": 1, "engines": {}}
    assert cluster.engines_file() is first  # unchanged: not read again
    cd.write_json(clusterdir.ENGINES_FILE, {"controller_pid": 1, "engines": {"0": {"pid": 5}}})
    assert cluster.engines_file()["engines"] == {"0": {"pid": 5}}
    os.remove(cd.file(clusterdir.ENGINES_FILE))
    assert cluster.engines_file() == {}
