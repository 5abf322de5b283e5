"""Start and stop real controller and engine processes (tests, benchmarks, CLI).

A :class:`LocalCluster` is one controller process and any number of engine
processes sharing a cluster directory (a fresh private temp directory unless
one is given), on ephemeral loopback ports::

    cluster = LocalCluster(heartbeat=0.5)
    cluster.start(n_engines=2)              # returns once both are registered
    furl = cluster.cluster_dir.read_furl("multiengine.furl")
    ...
    cluster.kill_engine(engine_id)          # SIGKILL, by pid
    cluster.stop()                          # every process, by pid

Every wait is bounded (``timeout`` seconds, :class:`TimeoutError` after that
with the tail of the relevant log). From Twisted code use the ``*_async``
variants, which poll with the reactor instead of sleeping.

The processes run ``python -m twisted txkernel-controller`` /
``txkernel-engine`` with ``PYTHONPATH`` starting at this checkout, so they
import this ``kernel`` and Twisted finds the plugin in ``twisted/plugins/``.
Processes still alive when the interpreter exits are killed.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from kernel import clusterdir
from kernel.clusterdir import ClusterDir

#: The checkout (or install) root that holds ``kernel/`` and ``twisted/plugins/``.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Default bound on every wait, seconds.
TIMEOUT = 30.0
#: Longest sleep between two looks of :func:`wait_for`, seconds.
POLL_CAP = 0.02
#: Sleep between two looks at ``engines.json`` while a cluster starts,
#: seconds: a look that finds the file unchanged is one ``stat``.
ENGINES_POLL = 0.002

_live: dict[int, Process] = {}


def subprocess_env(extra_path: Sequence[str] = (), env: dict | None = None) -> dict[str, str]:
    """The environment for a txkernel subprocess: ``PYTHONPATH`` starts with
    ``extra_path`` then :data:`ROOT`."""
    env = dict(os.environ if env is None else env)
    parts = [*extra_path, ROOT]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def python_output(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter with this checkout first on its path.

    :returns: what it printed to stdout.
    :raises subprocess.CalledProcessError: it exited with an error.
    """
    return subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout


def gated(started: Any, release: Any) -> str:
    """Engine code that creates the file ``started``, then waits until the
    file ``release`` exists (a test then knows a command is running, and
    decides when it ends, without guessing with sleeps).

    :param started: path the code creates once it runs.
    :param release: path whose creation lets it go on.
    """
    return (
        "import os as _os, time as _time\n"
        f"open({str(started)!r}, 'w').close()\n"
        f"while not _os.path.exists({str(release)!r}): _time.sleep(0.01)\n"
    )


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


class Process:
    """A child process started by these helpers, controlled by pid.

    :ivar name: a label (``controller``, ``engine-2``).
    :ivar pid: the process id.
    :ivar log_path: where its output goes.
    """

    def __init__(self, name: str, argv: list[str], log_path: str, env: dict[str, str]):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        # logs are private like everything else in the cluster directory
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            self.popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        self.pid = self.popen.pid
        _live[self.pid] = self

    @classmethod
    def fork(
        cls,
        name: str,
        plugin: str,
        args: Sequence[str],
        log_path: str,
        env: dict[str, str],
        path: Sequence[str] = (),
    ) -> Process:
        """Run ``plugin`` in a fork of this process instead of a new
        interpreter (see :mod:`kernel.spawn`; call :func:`kernel.spawn.preload`
        first to save the children the imports).

        :param path: directories put first on the child's ``sys.path``.
        """
        from kernel import spawn

        self = cls.__new__(cls)
        self.name = name
        self.argv = twist_argv(plugin, args, log_path)
        self.log_path = log_path
        self.popen = spawn.fork_twist(plugin, args, log_path, env=env, cwd=ROOT, path=path)
        self.pid = self.popen.pid
        _live[self.pid] = self
        return self

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid}>"

    def alive(self) -> bool:
        """Is the process still running (not exited, not reaped)?"""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit status (negative: killed by that signal), None if running."""
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process is still running."""
        if self.alive():
            os.kill(self.pid, sig)

    def pause(self) -> None:
        """SIGSTOP: the process freezes (its connections stay open)."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.popen.wait()
        _live.pop(self.pid, None)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM (SIGCONT first, in case it is paused), then SIGKILL after
        ``grace`` seconds; reaped on return.

        :returns: the exit status.
        """
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait()
        _live.pop(self.pid, None)
        return self.popen.returncode

    def log(self, lines: int = 30) -> str:
        """The last ``lines`` lines of its log."""
        return _tail(self.log_path, lines)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live.values()):
        try:
            proc.kill()
        except Exception:
            pass


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: Callable[[], str] | str,
    cap: float = POLL_CAP,
) -> Any:
    """Poll ``predicate`` (sleeping) until it returns something true.

    :param cap: the longest sleep between two looks, seconds (the first is
        10 ms or ``cap`` if shorter, then each doubles).
    :returns: that value.
    :raises TimeoutError: after ``timeout`` seconds, with ``what``.
    """
    deadline = time.monotonic() + timeout
    delay = min(0.01, cap)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what() if callable(what) else what)
        time.sleep(delay)
        delay = min(delay * 2, cap)


async def wait_for_async(
    predicate: Callable[[], Any], timeout: float, what: Callable[[], str] | str
) -> Any:
    """As :func:`wait_for`, polling with the reactor (for Twisted code)."""
    from twisted.internet import reactor, task

    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what() if callable(what) else what)
        await task.deferLater(reactor, delay, lambda: None)
        delay = min(delay * 2, 0.1)


def twist_argv(plugin: str, args: Sequence[str], log_path: str) -> list[str]:
    """The command line running ``plugin`` under ``python -m twisted``."""
    return [
        sys.executable,
        "-m",
        "twisted",
        f"--log-file={log_path}",
        "--log-format=text",
        plugin,
        *args,
    ]


def _option(args: Sequence[str], name: str, short: str) -> str | None:
    """The last value of option ``name`` (or ``short``) in ``args``, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg in (name, short) and i + 1 < len(args):
            value = args[i + 1]
    return value


class LocalCluster:
    """A controller process and engine processes on this machine.

    :param cluster_dir: the cluster directory; None for a new private temp
        directory (removed by :meth:`stop` unless ``keep_dir``).
    :param heartbeat: the controller's heartbeat period, seconds.
    :param max_missed: heartbeats an engine may miss before it is dead.
    :param controller_args: more ``txkernel-controller`` options.
    :param engine_args: more ``txkernel-engine`` options.
    :param extra_path: directories put first on the processes' ``PYTHONPATH``
        (a test can give the engines modules the controller lacks by using
        ``engine_path``).
    :param engine_path: directories put first on the engines' ``PYTHONPATH`` only.
    :param timeout: bound on every wait, seconds.
    :param spawn: ``"exec"``: each process is a new ``python -m twisted``;
        ``"fork"``: a fork of this process, which imports what they need once
        (:mod:`kernel.spawn`: much less CPU, so a faster start; only where
        this process has not installed the reactor).
    """

    def __init__(
        self,
        cluster_dir: str | os.PathLike | None = None,
        heartbeat: float = 1.0,
        max_missed: int = 3,
        controller_args: Sequence[str] = (),
        engine_args: Sequence[str] = (),
        extra_path: Sequence[str] = (),
        engine_path: Sequence[str] = (),
        timeout: float = TIMEOUT,
        keep_dir: bool = False,
        spawn: str = "exec",
    ):
        if spawn not in ("exec", "fork"):
            raise ValueError(f"spawn must be 'exec' or 'fork', got {spawn!r}")
        self.spawn = spawn
        self._own_dir = cluster_dir is None
        if cluster_dir is None:
            cluster_dir = tempfile.mkdtemp(prefix="txkernel-")
        self.cluster_dir = ClusterDir(cluster_dir).create()
        self.heartbeat = heartbeat
        self.max_missed = max_missed
        self.controller_args = list(controller_args)
        self.engine_args = list(engine_args)
        self.extra_path = list(extra_path)
        self.engine_path = list(engine_path)
        self.timeout = timeout
        self.keep_dir = keep_dir
        self.controller: Process | None = None
        self.engines: list[Process] = []
        self._n_controllers = 0
        self._engines_seen: tuple[Any, dict] = (None, {})

    def __repr__(self) -> str:
        return f"<LocalCluster {self.cluster_dir.path} engines={len(self.engines)}>"

    # -- the controller ----------------------------------------------------

    def launch_controller(self) -> Process:
        """Start the controller process (without waiting for it)."""
        cd = self.cluster_dir
        # a stale engine list from an earlier controller must not count
        cd.remove_file(clusterdir.ENGINES_FILE)
        self._n_controllers += 1
        log_path = cd.log_file("controller")
        args = [
            f"--cluster-dir={cd.path}",
            f"--heartbeat={self.heartbeat}",
            f"--max-missed={self.max_missed}",
            *self.controller_args,
        ]
        self.controller = self._process(
            "controller", "txkernel-controller", args, log_path, self.extra_path
        )
        return self.controller

    def _process(
        self, name: str, plugin: str, args: list[str], log_path: str, path: Sequence[str]
    ) -> Process:
        env = subprocess_env(path)
        if self.spawn == "fork":
            from kernel import spawn

            # The controller is forked (first) once what both need is
            # imported, and imports the rest of its own code while this
            # process imports the engines' and forks them.
            engine = plugin == "txkernel-engine"
            spawn.preload(spawn.COMMON_PRELOAD + (spawn.ENGINE_PRELOAD if engine else ()))
            return Process.fork(name, plugin, args, log_path, env, path)
        return Process(name, twist_argv(plugin, args, log_path), log_path, env)

    def controller_ready(self) -> bool:
        """Has the controller started listening and written its files?"""
        proc = self.controller
        if proc is None:
            return False
        if not proc.alive():
            raise RuntimeError(
                f"the controller exited with status {proc.returncode}:\n{proc.log()}"
            )
        data = self.engines_file()
        return bool(data) and data.get("controller_pid") == proc.pid

    def engines_file(self) -> dict:
        """``engines.json`` as the controller last wrote it, ``{}`` if there is none.

        Read again only when it has changed: each write replaces the file by
        a rename (a new inode), so an unchanged file costs one ``stat``.
        """
        try:
            st = os.stat(self.cluster_dir.file(clusterdir.ENGINES_FILE))
        except FileNotFoundError:
            self._engines_seen = (None, {})
            return {}
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._engines_seen[0] != seen:
            data = self.cluster_dir.read_json(clusterdir.ENGINES_FILE) or {}
            self._engines_seen = (seen, data)
        return self._engines_seen[1]

    def start_controller(self) -> Process:
        """Start the controller and wait until it is ready."""
        proc = self.launch_controller()
        wait_for(
            self.controller_ready,
            self.timeout,
            self._timeout_text("controller start"),
            cap=ENGINES_POLL,
        )
        return proc

    async def start_controller_async(self) -> Process:
        """As :meth:`start_controller`, for Twisted code."""
        proc = self.launch_controller()
        await wait_for_async(
            self.controller_ready, self.timeout, self._timeout_text("controller start")
        )
        return proc

    def stop_controller(self, grace: float = 10.0) -> None:
        """SIGTERM the controller (SIGKILL after ``grace``)."""
        if self.controller is not None:
            self.controller.stop(grace)

    # -- engines -----------------------------------------------------------

    def start_engine(self, *args: str) -> Process:
        """Start one engine process (it registers by itself; see
        :meth:`wait_for_engines`).

        :param args: more ``txkernel-engine`` options for this engine only
            (e.g. ``"--property=gpu=true"``).
        """
        cd = self.cluster_dir
        name = f"engine-{len(self.engines)}"
        log_path = cd.log_file(name)
        proc = self._process(
            name,
            "txkernel-engine",
            [f"--cluster-dir={cd.path}", "--max-delay=1", *self.engine_args, *args],
            log_path,
            [*self.engine_path, *self.extra_path],
        )
        self.engines.append(proc)
        return proc

    def registered(self) -> dict[int, int]:
        """The engines the running controller has registered: ``{id: pid}``."""
        data = self.engines_file()
        if self.controller is None or data.get("controller_pid") != self.controller.pid:
            return {}
        return {int(k): v.get("pid") for k, v in data.get("engines", {}).items()}

    def _enough(self, n: int) -> Callable[[], dict[int, int] | None]:
        def check():
            if self.controller is not None and not self.controller.alive():
                raise RuntimeError(
                    f"the controller exited with status {self.controller.returncode}:\n"
                    f"{self.controller.log()}"
                )
            reg = self.registered()
            return reg if len(reg) >= n else None

        return check

    def wait_for_engines(self, n: int, timeout: float | None = None) -> dict[int, int]:
        """Wait until at least ``n`` engines are registered; return ``{id: pid}``."""
        return wait_for(
            self._enough(n),
            timeout or self.timeout,
            self._timeout_text(f"{n} engines"),
            cap=ENGINES_POLL,
        )

    async def wait_for_engines_async(self, n: int, timeout: float | None = None) -> dict[int, int]:
        """As :meth:`wait_for_engines`, for Twisted code."""
        return await wait_for_async(
            self._enough(n), timeout or self.timeout, self._timeout_text(f"{n} engines")
        )

    def wait_until_unregistered(self, engine_id: int, timeout: float | None = None) -> None:
        """Wait until the controller no longer lists ``engine_id``."""
        wait_for(
            lambda: engine_id not in self.registered(),
            timeout or self.timeout,
            self._timeout_text(f"engine {engine_id} to be unregistered"),
        )

    async def wait_until_unregistered_async(
        self, engine_id: int, timeout: float | None = None
    ) -> None:
        """As :meth:`wait_until_unregistered`, for Twisted code."""
        await wait_for_async(
            lambda: engine_id not in self.registered(),
            timeout or self.timeout,
            self._timeout_text(f"engine {engine_id} to be unregistered"),
        )

    def engine_process(self, engine_id: int) -> Process:
        """The process of registered engine ``engine_id``.

        :raises KeyError: if no engine with that id is registered.
        """
        pid = self.registered()[engine_id]
        for proc in self.engines:
            if proc.pid == pid:
                return proc
        raise KeyError(f"engine {engine_id} (pid {pid}) was not started by this cluster")

    def kill_engine(self, engine_id: int) -> Process:
        """SIGKILL the process of engine ``engine_id`` (reaped at once)."""
        proc = self.engine_process(engine_id)
        proc.kill()
        return proc

    def pause_engine(self, engine_id: int) -> Process:
        """SIGSTOP the process of engine ``engine_id``."""
        proc = self.engine_process(engine_id)
        proc.pause()
        return proc

    # -- everything --------------------------------------------------------

    def launch(self, n_engines: int) -> None:
        """Start the controller and ``n_engines`` engines without waiting."""
        self.launch_controller()
        for _ in range(n_engines):
            self.start_engine()

    def _engines_with_controller(self) -> list[str] | None:
        """The engine options for starting engines together with the
        controller, or None when they must wait for it.

        Native engines are started at once: they look for the controller
        until it listens (:class:`kernel.enginenative.NativeEngineConnector`),
        so their start-up overlaps the controller's. They are told the adapter,
        since ``native.json`` may not exist yet to detect it by.
        """
        if self.controller_adapter() != "native":
            return None
        if any(a.startswith("--adapter") for a in self.engine_args):
            return []
        return ["--adapter=native"]

    def controller_adapter(self) -> str:
        """The adapter the controller serves: its ``--adapter``, else the
        default for its ``--interface`` (:func:`kernel.clusterdir.default_adapter`)."""
        given = _option(self.controller_args, "--adapter", "-a")
        if given is not None:
            return given
        interface = _option(self.controller_args, "--interface", "-i")
        return clusterdir.default_adapter(
            "127.0.0.1" if interface is None else interface, "--tls" in self.controller_args
        )

    def start(self, n_engines: int = 2) -> dict[int, int]:
        """Start the controller and ``n_engines`` engines; wait until all are
        registered. Returns ``{id: pid}``."""
        together = self._engines_with_controller()
        if together is None:
            self.start_controller()
        else:
            self.launch_controller()
        for _ in range(n_engines):
            self.start_engine(*(together or ()))
        return self.wait_for_engines(n_engines)

    async def start_async(self, n_engines: int = 2) -> dict[int, int]:
        """As :meth:`start`, for Twisted code."""
        together = self._engines_with_controller()
        if together is None:
            await self.start_controller_async()
        else:
            self.launch_controller()
        for _ in range(n_engines):
            self.start_engine(*(together or ()))
        return await self.wait_for_engines_async(n_engines)

    def stop(self, grace: float = 10.0) -> None:
        """Stop every engine, then the controller (SIGTERM, SIGKILL after
        ``grace``), and remove a temp cluster directory."""
        for proc in self.engines:
            proc.stop(grace)
        self.stop_controller(grace)
        if self._own_dir and not self.keep_dir:
            import shutil

            shutil.rmtree(self.cluster_dir.path, ignore_errors=True)

    def detach(self) -> None:
        """Leave the processes running when this interpreter exits (they are
        no longer killed at exit; stop them later by their pid files)."""
        for proc in [self.controller, *self.engines]:
            if proc is not None:
                _live.pop(proc.pid, None)

    def logs(self) -> str:
        """The tails of every process's log (for failure messages)."""
        procs = ([self.controller] if self.controller else []) + self.engines
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.log()}" for p in procs)

    def _timeout_text(self, what: str) -> Callable[[], str]:
        return lambda: f"timed out after {self.timeout} s waiting for {what}:\n{self.logs()}"
