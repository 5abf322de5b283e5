"""Start controller and engine processes by forking one that has imported them.

Most of a txkernel process's start-up is importing Twisted and txkernel (about
0.3 s of CPU each). ``txkernel cluster start -n 2`` used to pay it three
times, once per ``python -m twisted`` process. Here the starting process
imports what the controller and engines need once (:func:`preload`), then each
controller or engine is a ``fork`` of it that runs the twistd plugin
(:func:`fork_twist`): same plugin, options, log file and session as
``python -m twisted --log-file=LOG txkernel-engine ...``, without the imports
(nor those of ``twist`` itself: :func:`run_plugin` runs the plugin as it does).

The reactor must not be installed in the forking process (a child would
share its epoll object): :func:`preload` imports nothing that installs it, and
:func:`fork_twist` refuses to fork once it is.

POSIX only (``os.fork``); :func:`available` says whether it can be used.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = [
    "COMMON_PRELOAD",
    "CONTROLLER_PRELOAD",
    "ENGINE_PRELOAD",
    "EX_USAGE",
    "PLUGINS",
    "PRELOAD",
    "ForkedChild",
    "available",
    "fork_twist",
    "preload",
    "run_plugin",
]

#: What controllers and engines both import on start, in the order they need
#: it. Nothing here (nor below) installs the reactor or imports Foolscap
#: (which would).
COMMON_PRELOAD = (
    "twisted.internet.epollreactor",
    "twisted.internet.tcp",
    "twisted.application.service",
    "twisted.logger",
    "kernel.tap",
    "kernel.nativeproto",
    "kernel.engineremote",
    "kernel.enginenative",
    "kernel.engineservice",
)

#: What an engine imports on start besides :data:`COMMON_PRELOAD`.
ENGINE_PRELOAD = ("twisted.internet.endpoints",)

#: What a controller imports on start besides :data:`COMMON_PRELOAD`.
#: :class:`~kernel.testing.processes.LocalCluster` forks the controller
#: once :data:`COMMON_PRELOAD` is imported and leaves this to it: the
#: controller imports it while the starter imports :data:`ENGINE_PRELOAD`
#: and forks the engines.
CONTROLLER_PRELOAD = (
    "twisted.application.internet",
    "kernel.heartbeat",
    "kernel.controllerservice",
    "kernel.multiengine",
    "kernel.taskcontroller",
    "kernel.taskdb.sqlite",
    "kernel.remotecall",
    "kernel.multiengineremote",
    "kernel.taskremote",
    "kernel.multienginenative",
    "kernel.tasknative",
)

#: Everything controllers and engines import on start.
PRELOAD = COMMON_PRELOAD + ENGINE_PRELOAD + CONTROLLER_PRELOAD


def available() -> bool:
    """Can processes be forked here (POSIX, reactor not installed)?"""
    return hasattr(os, "fork") and "twisted.internet.reactor" not in sys.modules


def preload(modules: Sequence[str] = PRELOAD) -> None:
    """Import ``modules`` (default :data:`PRELOAD`) so forked children need not.

    The cyclic garbage collector is off while they are imported (imports make
    many objects and little garbage: a tenth less time), and what is then in
    memory is frozen (:func:`gc.freeze`): no collection in this process or in
    a child looks at it again, which also keeps a child from copying the
    memory pages it shares with this process just to collect.

    :raises RuntimeError: importing them installed the reactor.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                continue  # (e.g. no epoll here: the child imports what it has)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("preloading installed the reactor: a forked child would share it")


class ForkedChild:
    """A forked child, with the part of :class:`subprocess.Popen`'s API that
    :class:`kernel.testing.processes.Process` uses.

    :param pid: the child's process id.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Reap the child if it has exited; return its exit status or None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0  # reaped elsewhere: its status is lost
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return its exit status.

        :raises subprocess.TimeoutExpired: still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode


def fork_twist(
    plugin: str,
    args: Sequence[str],
    log_path: str,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    path: Sequence[str] = (),
) -> ForkedChild:
    """Fork a child that runs ``twist --log-file=LOG --log-format=text PLUGIN ARGS``
    (:func:`run_plugin` for txkernel's plugins).

    The child starts a new session, reads /dev/null, writes to ``log_path``,
    and keeps no other file descriptor of this process. It exits with
    twist's status, never returning here and never running this process's
    exit handlers.

    :param env: the child's environment (default: this one's).
    :param cwd: the child's working directory.
    :param path: directories put first on the child's ``sys.path``.
    :raises RuntimeError: the reactor is installed in this process.
    """
    if not available():
        raise RuntimeError("cannot fork txkernel processes: the reactor is installed here")
    argv = ["twist", f"--log-file={log_path}", "--log-format=text", plugin, *args]
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # (else the child would write this process's buffers too)
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return ForkedChild(pid)
    status = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, _max_fd())
        if cwd is not None:
            os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        sys.path[:0] = list(path)
        sys.argv = argv
        if plugin in PLUGINS:
            run_plugin(plugin, args, log_path)
        else:
            from twisted.application.twist._twist import Twist

            Twist.main(argv)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


#: The plugins :func:`run_plugin` runs, by name: where their ``Options`` and
#: ``makeService`` are in :mod:`kernel.tap`.
PLUGINS = {"txkernel-controller": "controller", "txkernel-engine": "engine"}

#: ``twist``'s exit status for a usage error (``EX_USAGE``).
EX_USAGE = 64


def run_plugin(plugin: str, args: Sequence[str], log_path: str) -> None:
    """Run a txkernel twistd plugin in this process, as ``twist
    --log-file=LOG --log-format=text PLUGIN ARGS`` does: the plugin's options
    and service, started under a :class:`~twisted.application.service.Application`
    and stopped before the reactor shuts down, the default reactor, a text
    log appended to ``log_path`` (level info and up), and an exit by the
    signal that stopped the reactor, if any.

    ``twist`` finds the plugin among every installed one and parses its own
    options first; here the plugin is one of :data:`PLUGINS`, so a forking
    starter need not import ``twist``'s machinery for its children.

    :param plugin: a key of :data:`PLUGINS`.
    :raises SystemExit: :data:`EX_USAGE` for bad ``args`` (the error and the
        options' help are written to stderr).
    """
    from twisted.application.service import Application, IService
    from twisted.logger import (
        FilteringLogObserver,
        Logger,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.python import usage

    from kernel import tap

    maker = getattr(tap, PLUGINS[plugin])
    options = maker.Options()
    try:
        options.parseOptions(list(args))
    except usage.UsageError as e:
        sys.stderr.write(f"Error: {e}\n\n{options}\n")
        raise SystemExit(EX_USAGE) from None
    from twisted.internet import reactor

    application = Application(plugin)
    maker.makeService(options).setServiceParent(application)
    top = IService(application)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    observer = textFileLogObserver(open(log_path, "a"))  # (open for the process's life)
    level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [level])])
    Logger().info("Starting reactor...")
    reactor.run()
    signum = getattr(reactor, "_exitSignal", None)
    if signum is not None:
        # (stopped by a signal: end by it too, as twist does)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _max_fd() -> int:
    try:
        return max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")
