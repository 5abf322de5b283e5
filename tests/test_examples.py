"""The examples run as a user would run them: with engines in their own
process (``--local``), and on a real local cluster through ``txkernel run``."""

import math
import os
import re
import signal
import subprocess
import sys

import pytest

from kernel.clusterdir import ClusterDir
from kernel.testing.processes import ROOT, subprocess_env

EXAMPLES = os.path.join(ROOT, "examples")

#: Small sizes so the examples finish quickly.
ARGS = {
    "montecarlo_pi.py": ["--samples", "200000", "--seed", "1"],
    "parameter_sweep.py": [],
    "scatter_gather_numpy.py": ["--rows", "400", "--cols", "50"],
}


def run(argv, tmp_path, timeout=200):
    """Run ``argv`` from the checkout; return its stdout (it must succeed).

    Any controller or engine left in ``tmp_path/cluster`` is killed after.
    """
    env = subprocess_env()
    env["TXKERNEL_PROGRESS"] = "0"
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    finally:
        cd = tmp_path / "cluster"
        if cd.is_dir():
            for pid in ClusterDir(str(cd)).pids().values():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if b"txkernel" in f.read():
                            os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def local(name, tmp_path, *extra):
    return run(
        [sys.executable, os.path.join(EXAMPLES, name), "--local", "2", *ARGS[name], *extra],
        tmp_path,
    )


def on_cluster(name, tmp_path, *extra):
    return run(
        [
            sys.executable,
            "-m",
            "kernel.cli",
            "run",
            "-n",
            "2",
            "--cluster-dir",
            str(tmp_path / "cluster"),
            os.path.join(EXAMPLES, name),
            *ARGS[name],
            *extra,
        ],
        tmp_path,
    )


def check_pi(out):
    m = re.search(r"pi is about (\d+\.\d+)", out)
    assert m, out
    assert abs(float(m.group(1)) - math.pi) < 0.05, out
    assert "400000 samples on 2 engines" in out, out


def check_sweep(out, outdir):
    assert "68 runs on 2 engines" in out, out
    rows = dict(re.findall(r"^(\d[\d.e-]*)\s+(\d+)\s+[\d.]+$", out, re.M))
    assert rows["0"] == "45", out  # no drag: the textbook 45 degrees
    assert int(rows["0.01"]) < 45, out  # drag lowers the best angle
    assert (outdir / "summary.json").exists()
    assert len(list(outdir.glob("run-*.json"))) == 68


def check_numpy(out):
    assert "on 2 engines: matches NumPy" in out, out
    assert "match NumPy" in out.splitlines()[1], out


def test_montecarlo_pi_with_local_engines(tmp_path):
    check_pi(local("montecarlo_pi.py", tmp_path))


def test_parameter_sweep_with_local_engines(tmp_path):
    outdir = tmp_path / "sweep"
    check_sweep(local("parameter_sweep.py", tmp_path, "--out", str(outdir)), outdir)


def test_scatter_gather_numpy_with_local_engines(tmp_path):
    check_numpy(local("scatter_gather_numpy.py", tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_montecarlo_pi_on_a_cluster(tmp_path):
    check_pi(on_cluster("montecarlo_pi.py", tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_parameter_sweep_on_a_cluster(tmp_path):
    outdir = tmp_path / "sweep"
    check_sweep(on_cluster("parameter_sweep.py", tmp_path, "--out", str(outdir)), outdir)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scatter_gather_numpy_on_a_cluster(tmp_path):
    check_numpy(on_cluster("scatter_gather_numpy.py", tmp_path))
