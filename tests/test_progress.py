"""Progress bars: shown when someone watches (a terminal, IPython) or when
forced on, never otherwise; blocking waits show them."""

import io
import subprocess
import sys
import textwrap

import pytest

from kernel import progress
from kernel.testing.processes import ROOT, subprocess_env


@pytest.fixture(autouse=True)
def automatic(monkeypatch):
    """Each test starts in automatic mode with no TXKERNEL_PROGRESS."""
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    progress.set_enabled(None)
    yield
    progress.set_enabled(None)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class FakeCall:
    """Stands in for a reactorthread.Call that finishes after ``waits`` waits."""

    def __init__(self, waits, result=None, error=None):
        self.waits = waits
        self._result = result
        self.error = error

    def done(self):
        return self.waits <= 0

    def wait(self, timeout=None):
        self.waits -= 1
        return self.waits <= 0

    def result(self):
        if self.error is not None:
            raise self.error
        return self._result


def test_environment_variable_turns_bars_off(monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "0")
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert not progress.enabled()
    assert not progress.bar(10, "work").shown


def test_environment_variable_turns_bars_on_without_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_VAR, "1")
    assert progress.enabled()
    with progress.bar(3, "crunching") as bar:
        assert bar.shown
        bar.update(3)
    assert "crunching" in capsys.readouterr().err


def test_automatic_mode_follows_whether_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert progress.enabled()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()
    assert not progress.bar(5, "quiet").shown


def test_automatic_bar_waits_before_appearing(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with progress.bar(2, "slow-to-show") as bar:
        assert bar.shown
        bar.update(2)
    # finished well within AUTO_DELAY: nothing was drawn
    assert "slow-to-show" not in tty.getvalue()


def test_set_enabled_takes_precedence_over_the_environment(monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "1")
    progress.set_enabled(False)
    assert not progress.enabled()
    monkeypatch.setenv(progress.ENV_VAR, "0")
    progress.set_enabled(True)
    assert progress.enabled()


def test_set_enabled_refuses_anything_but_true_false_none():
    with pytest.raises(TypeError):
        progress.set_enabled("yes")


def test_wait_shows_an_elapsed_bar_while_the_call_runs(capsys):
    progress.set_enabled(True)
    assert progress.wait(FakeCall(3, result=42), "mapping") == 42
    assert "mapping" in capsys.readouterr().err


def test_wait_without_bars_prints_nothing(capsys):
    progress.set_enabled(False)
    assert progress.wait(FakeCall(3, result="r"), "mapping") == "r"
    assert capsys.readouterr().err == ""


def test_wait_raises_what_the_call_raised():
    progress.set_enabled(True)
    with pytest.raises(KeyError):
        progress.wait(FakeCall(1, error=KeyError("k")), "failing")


CHILD = textwrap.dedent(
    """
    import time
    from kernel import client

    def slow_abs(x):
        time.sleep(0.3)  # (so the map is still running when the client waits)
        return abs(x)

    with client.LocalCluster(2) as cluster:
        tc = cluster.task_client()
        assert tc.map(slow_abs, [-1, -2, -3]) == [1, 2, 3]
        mec = cluster.multiengine_client()
        assert mec.map(slow_abs, [-4, -5]) == [4, 5]
    print("ok")
    """
)


def _run_child(env_value):
    env = subprocess_env()
    env.pop(progress.ENV_VAR, None)
    if env_value is not None:
        env[progress.ENV_VAR] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    return proc.stderr


def test_blocking_task_map_and_multiengine_map_show_bars_when_forced_on():
    err = _run_child("1")
    assert "tasks" in err and "3/3" in err, err
    assert "map" in err, err


def test_blocking_map_is_quiet_when_output_is_not_a_terminal():
    assert _run_child(None) == ""
