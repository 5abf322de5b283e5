"""kernel.spawn: forked children and their statuses, and the refusal to fork
once the reactor is installed."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from kernel import spawn


def _fork(body):
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(3)
    return spawn.ForkedChild(pid)


def test_a_forked_child_reports_its_exit_status():
    child = _fork(lambda: None)
    assert child.wait(30) == 3
    assert child.poll() == 3


def test_waiting_for_a_running_child_times_out_and_it_can_still_be_reaped():
    child = _fork(lambda: time.sleep(60))
    try:
        assert child.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(0.05)
    finally:
        os.kill(child.pid, 9)
    assert child.wait(30) == -9


def test_no_fork_once_the_reactor_is_installed(tmp_path):
    import twisted.internet.reactor  # noqa: F401 - pytest-twisted's, installed

    assert not spawn.available()
    with pytest.raises(RuntimeError, match="reactor is installed"):
        spawn.fork_twist("txkernel-engine", [], str(tmp_path / "log"))


def test_preloading_leaves_the_reactor_uninstalled():
    from kernel.testing.processes import python_output

    code = (
        "import sys; from kernel import spawn; spawn.preload(); "
        "print(spawn.available(), 'kernel.enginenative' in sys.modules)"
    )
    assert python_output(code).split() == ["True", "True"]


def test_preloading_freezes_what_it_imported_and_leaves_the_collector_as_it_was():
    from kernel.testing.processes import python_output

    code = (
        "import gc; from kernel import spawn\n"
        "before = gc.get_freeze_count()\n"
        "spawn.preload(spawn.COMMON_PRELOAD)\n"
        "print(gc.isenabled(), gc.get_freeze_count() > before)\n"
        "gc.disable(); spawn.preload(spawn.ENGINE_PRELOAD); print(gc.isenabled())\n"
    )
    assert python_output(code).split() == ["True", "True", "False"]


def test_the_preload_lists_split_everything_by_who_needs_it():
    parts = (spawn.COMMON_PRELOAD, spawn.ENGINE_PRELOAD, spawn.CONTROLLER_PRELOAD)
    assert sorted(spawn.PRELOAD) == sorted(m for part in parts for m in part)
    assert len(set(spawn.PRELOAD)) == len(spawn.PRELOAD)  # each in one list only


def test_a_forked_plugin_with_bad_options_exits_with_a_usage_error(tmp_path):
    from kernel.testing.processes import python_output

    log = tmp_path / "engine.log"
    code = (
        "from kernel import spawn\n"
        "spawn.preload(spawn.COMMON_PRELOAD + spawn.ENGINE_PRELOAD)\n"
        f"child = spawn.fork_twist('txkernel-engine', ['--adapter=zmq'], {str(log)!r})\n"
        "print(child.wait(60))\n"
    )
    assert python_output(code).split() == [str(spawn.EX_USAGE)]
    text = log.read_text()
    assert "use --adapter auto, native, fc or pb" in text
    assert "--cluster-dir" in text  # the options' help follows the error
