"""The ``txkernel`` command: argument errors in process, clusters end to end."""

import os
import signal
import subprocess
import sys

import pytest

from kernel import cli, clusterdir
from kernel.clusterdir import ClusterDir
from kernel.testing.processes import ROOT, subprocess_env

TIMEOUT = 90


def txkernel(*argv, env=None, **kw):
    """Run ``python -m kernel.cli`` (what the console script runs)."""
    return subprocess.run(
        [sys.executable, "-m", "kernel.cli", *argv],
        env=subprocess_env(env=env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        **kw,
    )


def assert_all_stopped(pids):
    for pid in pids:
        assert not cli.pid_alive(pid), f"process {pid} is still running"


def test_missing_engine_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["cluster", "start"])
    assert e.value.code == 2
    assert "-n" in capsys.readouterr().err


def test_status_without_controller_says_how_to_start(tmp_path, capsys):
    assert cli.main(["cluster", "status", "--cluster-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "no controller is running" in err
    assert "txkernel cluster start -n 4" in err


def test_stop_without_cluster_fails(tmp_path, capsys):
    assert cli.main(["cluster", "stop", "--cluster-dir", str(tmp_path / "none")]) == 1
    assert "no txkernel cluster is running" in capsys.readouterr().err


def test_stale_pid_file_is_not_a_running_controller(tmp_path, capsys):
    cd = ClusterDir(tmp_path / "c").create()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cd.write_file("controller.pid", f"{dead.pid}\n")
    assert cli.main(["cluster", "status", "--cluster-dir", cd.path]) == 1
    assert not os.path.exists(cd.pid_file("controller"))


def test_pid_file_of_an_unrelated_process_is_ignored(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_file("controller.pid", f"{os.getpid()}\n")  # pytest, not txkernel
    assert cli.controller_pid(cd) is None


def test_run_missing_script_is_an_error(tmp_path, capsys):
    assert cli.main(["run", "-n", "1", str(tmp_path / "nope.py")]) == 2
    assert "no such script" in capsys.readouterr().err


def test_cluster_dir_comes_from_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(clusterdir.ENV_VAR, str(tmp_path / "envdir"))
    assert cli.main(["cluster", "status"]) == 1
    assert str(tmp_path / "envdir") in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["fc", "pb", "native"])
def test_cluster_start_status_stop(tmp_path, adapter):
    d = str(tmp_path / "cluster")
    started = txkernel(
        "cluster", "start", "-n", "2", "--cluster-dir", d, "--daemon", f"--adapter={adapter}"
    )
    assert started.returncode == 0, started.stderr
    assert "2 engines (ids 0, 1)" in started.stdout
    pids = list(ClusterDir(d).pids().values())
    assert len(pids) == 3
    try:
        again = txkernel("cluster", "start", "-n", "1", "--cluster-dir", d, "--daemon")
        assert again.returncode == 1
        assert "already running" in again.stderr

        status = txkernel("cluster", "status", "--cluster-dir", d)
        assert status.returncode == 0, status.stderr
        assert f"(adapter {adapter})" in status.stdout
        assert "engines: 2" in status.stdout
        for engine_id in (0, 1):
            assert f"engine {engine_id}: pid" in status.stdout
        # the queues come from the controller itself, as a client asks
        assert status.stdout.count("queue 0, running nothing") == 2, status.stdout
    finally:
        stopped = txkernel("cluster", "stop", "--cluster-dir", d)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped 3 txkernel processes" in stopped.stdout
    assert_all_stopped(pids)
    assert ClusterDir(d).pids() == {}
    gone = txkernel("cluster", "status", "--cluster-dir", d)
    assert gone.returncode == 1


@pytest.mark.slow
def test_foreground_cluster_stops_on_interrupt(tmp_path):
    d = str(tmp_path / "cluster")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kernel.cli", "cluster", "start", "-n", "1", "--cluster-dir", d],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        assert any("1 engines" in line for line in lines), lines
        pids = list(ClusterDir(d).pids().values())
        assert len(pids) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
        assert_all_stopped(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


SCRIPT = """
import sys
from kernel import client
from kernel.clusterdir import ClusterDir

print("pids", sorted(ClusterDir().pids().values()))  # found through $TXKERNEL_CLUSTER_DIR
mec = client.MultiEngineClient()
mec.execute("x = id * 10")
print("engines", mec.get_ids(), "x", mec.pull("x"), "args", sys.argv[1:])
sys.exit(3)
"""


@pytest.mark.slow
def test_run_script_against_temporary_cluster(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    out = txkernel("run", "-n", "2", str(script), "a", "--b")
    assert out.returncode == 3, out.stderr
    assert "engines [0, 1] x [0, 10] args ['a', '--b']" in out.stdout
    (pids_line,) = [line for line in out.stdout.splitlines() if line.startswith("pids")]
    pids = [int(p) for p in pids_line[len("pids [") : -1].split(",")]
    assert len(pids) == 3  # the controller and two engines, all stopped now
    assert_all_stopped(pids)


@pytest.mark.parametrize("name", ["controller", "engine"])
def test_controller_and_engine_commands_run_the_twistd_plugins(name):
    out = txkernel(name, "--help")
    assert out.returncode == 0, out.stderr
    assert f"txkernel-{name}" in out.stdout
    assert "--cluster-dir" in out.stdout


def test_engine_command_passes_option_errors_through():
    out = txkernel("engine", "--adapter=zmq")
    assert out.returncode != 0
    assert "use --adapter auto, native, fc or pb" in out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("spawn, marker", [("fork", b"kernel.cli"), ("exec", b"txkernel-engine")])
def test_cluster_start_forks_its_processes_or_execs_new_interpreters(tmp_path, spawn, marker):
    """--spawn fork (the default) runs the controller and engines in forks of
    the command, --spawn exec in new interpreters; both start, are found by
    their pid files and stop."""
    d = str(tmp_path / "cluster")
    args = ["cluster", "start", "-n", "1", "--cluster-dir", d, "--daemon"]
    started = txkernel(*args, *([] if spawn == "fork" else ["--spawn=exec"]))
    assert started.returncode == 0, started.stderr
    procs = ClusterDir(d).pids()
    try:
        assert set(procs) == {"controller", *(n for n in procs if n.startswith("engine-"))}
        engine_pid = next(pid for name, pid in procs.items() if name != "controller")
        with open(f"/proc/{engine_pid}/cmdline", "rb") as f:
            assert marker in f.read()
        assert cli.is_txkernel_process(engine_pid)
    finally:
        stopped = txkernel("cluster", "stop", "--cluster-dir", d)
    assert stopped.returncode == 0, stopped.stderr
    assert_all_stopped(procs.values())


def test_exit_now_flushes_the_output_and_skips_the_teardown():
    code = (
        "import atexit, sys\n"
        "from kernel import cli\n"
        "atexit.register(print, 'teardown')\n"
        "print('started', end='')\n"
        "sys.stderr.write('note')\n"
        "cli.exit_now(3)\n"
        "print('not reached')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    assert (out.returncode, out.stdout, out.stderr) == (3, "started", "note")
