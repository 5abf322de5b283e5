"""The ``txkernel`` command.

::

    txkernel cluster start -n 4 [--cluster-dir D] [--adapter native|fc|pb] [--daemon]
    txkernel cluster stop [--cluster-dir D]
    txkernel cluster status [--cluster-dir D]
    txkernel run -n 4 script.py [args...]
    txkernel controller [controller options]     (twistd txkernel-controller, foreground)
    txkernel engine [engine options]             (twistd txkernel-engine, foreground)

The cluster directory defaults to ``$TXKERNEL_CLUSTER_DIR`` or
``~/.txkernel/default``. Processes are found again through the pid files in
it, so ``stop`` and ``status`` work from any shell.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernel.clusterdir import ClusterDir

# The rest of txkernel (and Twisted) is imported where it is used: `cluster
# start` imports it in kernel.spawn.preload, which makes imports cheaper.

START_HINT = "start one with `txkernel cluster start -n 4`"


class CommandError(Exception):
    """A failure to report to the user (no traceback), with an exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Processes found through pid files
# ---------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Is there a process ``pid`` (that is not a zombie)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def is_txkernel_process(pid: int) -> bool:
    """Does ``pid`` run a txkernel plugin? (Guards against a reused pid in a
    stale pid file.) True when it cannot be told.

    A controller or engine forked by ``txkernel cluster start`` (see
    :mod:`kernel.spawn`) has the command line of the ``txkernel`` command
    (or ``python -m kernel.cli``) that forked it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return pid_alive(pid)
    return b"txkernel" in cmdline or b"kernel.cli" in cmdline


def cluster_processes(cd: ClusterDir) -> dict[str, int]:
    """The live txkernel processes of ``cd`` by pid-file name; stale pid
    files are removed."""
    live = {}
    for name, pid in cd.pids().items():
        if pid_alive(pid) and is_txkernel_process(pid):
            live[name] = pid
        else:
            cd.remove_file(f"{name}.pid")
    return live


def controller_pid(cd: ClusterDir) -> int | None:
    """The pid of the controller running in ``cd``, or None."""
    return cluster_processes(cd).get("controller") if cd.exists() else None


def terminate(pids: Sequence[int], grace: float) -> list[int]:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL the rest.

    :returns: the pids that had to be killed.
    """
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


# ---------------------------------------------------------------------------
# cluster start / stop / status
# ---------------------------------------------------------------------------


def _spawn_mode(args: argparse.Namespace) -> str:
    """How ``cluster start`` and ``run`` start the processes: ``"fork"``
    (``--spawn fork``, where possible) or ``"exec"``. When forking, what the
    forked processes need is imported now (:func:`kernel.spawn.preload`;
    again: nothing)."""
    from kernel import spawn

    if args.spawn == "fork" and spawn.available():
        spawn.preload(spawn.COMMON_PRELOAD)
        return "fork"
    return "exec"


def start_cluster(args: argparse.Namespace, cd: ClusterDir, spawn: str):
    """Start a controller and ``args.n`` engines in ``cd``; return the
    :class:`~kernel.testing.processes.LocalCluster` once all are registered.

    :param spawn: how to start them, from :func:`_spawn_mode`.
    """
    if args.n < 1:
        raise CommandError("-n must be at least 1 engine", 2)
    pid = controller_pid(cd)
    if pid is not None:
        raise CommandError(
            f"a controller (pid {pid}) is already running in {cd.path}: use it, or stop it "
            f"with `txkernel cluster stop --cluster-dir {cd.path}`"
        )
    from kernel.testing.processes import LocalCluster

    cluster = LocalCluster(
        cd.path,
        timeout=args.timeout,
        heartbeat=args.heartbeat,
        controller_args=[f"--adapter={args.adapter}"] if args.adapter else [],
        spawn=spawn,
    )
    try:
        cluster.start(args.n)
    except (TimeoutError, RuntimeError) as e:
        cluster.stop()
        raise CommandError(f"the cluster did not start: {e}") from None
    return cluster


def cmd_cluster_start(args: argparse.Namespace) -> int:
    # What the forks need first: the cluster directory's code is part of it,
    # and preload imports it more cheaply.
    spawn = _spawn_mode(args)
    cd = _cluster_dir(args, create=True)
    cluster = start_cluster(args, cd, spawn)
    ids = sorted(cluster.registered())
    print(
        f"txkernel cluster running in {cd.path}: controller pid {cluster.controller.pid}, "
        f"{len(ids)} engines (ids {', '.join(map(str, ids))})"
    )
    if args.daemon:
        cluster.detach()
        print(f"stop it with `txkernel cluster stop --cluster-dir {cd.path}`")
        return 0
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    # Handlers go in before the prompt: a Ctrl-C right after it must stop cleanly.
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print("press Ctrl-C to stop it", flush=True)
    try:
        while not stopping:
            if not cluster.controller.alive():
                cluster.stop()
                raise CommandError(
                    f"the controller exited (status {cluster.controller.returncode}); "
                    f"see {cluster.controller.log_path}"
                )
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print("stopping the cluster")
    cluster.stop()
    return 0


def cmd_cluster_stop(args: argparse.Namespace) -> int:
    from kernel import clusterdir

    cd = _cluster_dir(args)
    procs = cluster_processes(cd) if cd.exists() else {}
    if not procs:
        raise CommandError(f"no txkernel cluster is running in {cd.path}")
    engines = [pid for name, pid in procs.items() if name != "controller"]
    # engines first, so that they do not try to reconnect to a stopping controller
    killed = terminate(engines, args.grace)
    if "controller" in procs:
        killed += terminate([procs["controller"]], args.grace)
    for name in procs:
        cd.remove_file(f"{name}.pid")
    cd.remove_file(clusterdir.ENGINES_FILE)
    note = f" ({len(killed)} needed SIGKILL)" if killed else ""
    print(f"stopped {len(procs)} txkernel processes in {cd.path}{note}")
    return 0


def cluster_adapter(cd: ClusterDir) -> str | None:
    """The adapter the running controller of ``cd`` serves (``native``,
    ``fc`` or ``pb``, by the connection files it wrote), or None."""
    return cd.served_adapter()


def _queue_status(cd: ClusterDir, timeout: float) -> tuple[list | None, dict | None, str]:
    """Ask the controller for engine queues and task counts, as a client.

    :returns: ``(engine queues or None, task counts or None, note)``.
    """
    from twisted.internet import defer, task

    from kernel import asyncclient

    adapter = cluster_adapter(cd)
    out: dict = {}

    async def ask(reactor):
        try:
            me = await asyncclient.get_multiengine_client(
                cluster_dir=cd.path, adapter=adapter, timeout=timeout
            )
            out["queues"] = await me.queue_status().addTimeout(timeout, reactor)
        except Exception as e:
            out["note"] = f"engine queues unavailable: {e}"
        try:
            tc = await asyncclient.get_task_client(
                cluster_dir=cd.path, adapter=adapter, timeout=timeout
            )
            out["tasks"] = await tc.queue_status().addTimeout(timeout, reactor)
        except Exception as e:
            out.setdefault("note", f"task queue unavailable: {e}")

    try:
        task.react(lambda reactor: defer.ensureDeferred(ask(reactor)))
    except SystemExit as e:
        if e.code:
            out.setdefault("note", "could not query the controller")
    return out.get("queues"), out.get("tasks"), out.get("note", "")


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from kernel import clusterdir

    cd = _cluster_dir(args)
    pid = controller_pid(cd)
    if pid is None:
        raise CommandError(f"no controller is running in {cd.path}: {START_HINT}")
    data = cd.read_json(clusterdir.ENGINES_FILE) or {}
    engines = {int(k): v for k, v in data.get("engines", {}).items()}
    print(f"cluster directory: {cd.path}")
    print(f"controller: pid {pid} (adapter {cluster_adapter(cd)})")
    print(f"engines: {len(engines)}")
    queues, tasks, note = _queue_status(cd, args.timeout)
    by_id = dict(queues or [])
    for engine_id in sorted(engines):
        line = f"  engine {engine_id}: pid {engines[engine_id].get('pid')}"
        status = by_id.get(engine_id)
        if status is not None:
            pending = status.get("pending")
            line += f", queue {len(status.get('queue', []))}, running {pending or 'nothing'}"
        print(line)
    if tasks is not None:
        print("tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(tasks.items())))
    if note:
        print(f"({note})")
    return 0


# ---------------------------------------------------------------------------
# run, controller, engine
# ---------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    if not os.path.isfile(args.script):
        raise CommandError(f"no such script: {args.script}", 2)
    spawn = _spawn_mode(args)
    from kernel import clusterdir
    from kernel.clusterdir import ClusterDir
    from kernel.testing.processes import subprocess_env

    temp = None
    if args.cluster_dir is None:
        temp = tempfile.mkdtemp(prefix="txkernel-run-")
        cd = ClusterDir(temp).create()
    else:
        cd = _cluster_dir(args, create=True)
    cluster = start_cluster(args, cd, spawn)
    try:
        env = subprocess_env()
        env[clusterdir.ENV_VAR] = cd.path
        proc = subprocess.Popen([sys.executable, args.script, *args.script_args], env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()
    finally:
        cluster.stop()
        if temp is not None:
            import shutil

            shutil.rmtree(temp, ignore_errors=True)


def _exec_plugin(plugin: str, argv: list[str]) -> int:
    import subprocess

    from kernel.testing.processes import subprocess_env

    cmd = [sys.executable, "-m", "twisted", "--log-format=text", plugin, *argv]
    return subprocess.call(cmd, env=subprocess_env())


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _cluster_dir(args: argparse.Namespace, create: bool = False) -> ClusterDir:
    from kernel.clusterdir import ClusterDir

    cd = ClusterDir(args.cluster_dir)
    if create:
        cd.create()
    return cd


def _add_cluster_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-dir",
        "-d",
        default=None,
        help="cluster directory (default: $TXKERNEL_CLUSTER_DIR or ~/.txkernel/default)",
    )


def _add_start_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", type=int, required=True, help="number of engines")
    p.add_argument(
        "--adapter",
        choices=("native", "fc", "pb"),
        default=None,
        help="transport (default: native, as the controller listens on loopback)",
    )
    p.add_argument("--heartbeat", type=float, default=3.0, help="seconds between engine heartbeats")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the engines to register"
    )
    p.add_argument(
        "--spawn",
        choices=("fork", "exec"),
        default="fork",
        help="start the controller and engines as forks of this command, which imports "
        "their code once (fork, the default where possible), or as new interpreters (exec)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``txkernel`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="txkernel", description="Interactive parallel computing on Twisted."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    cluster = sub.add_parser("cluster", help="start, stop or inspect a local cluster")
    csub = cluster.add_subparsers(dest="action", required=True)
    start = csub.add_parser("start", help="start a controller and N engines")
    _add_cluster_dir(start)
    _add_start_options(start)
    start.add_argument(
        "--daemon", action="store_true", help="return once started, leaving the cluster running"
    )
    start.set_defaults(func=cmd_cluster_start)
    stop = csub.add_parser("stop", help="stop the cluster's processes (by pid file)")
    _add_cluster_dir(stop)
    stop.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL")
    stop.set_defaults(func=cmd_cluster_stop)
    status = csub.add_parser("status", help="show the controller, engines and queues")
    _add_cluster_dir(status)
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for answers")
    status.set_defaults(func=cmd_cluster_status)

    run = sub.add_parser("run", help="run a script against a temporary local cluster")
    _add_cluster_dir(run)
    _add_start_options(run)
    run.add_argument("script", help="the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's arguments")
    run.set_defaults(func=cmd_run)

    # Listed for --help; main() hands their arguments to the twistd plugins.
    for name in ("controller", "engine"):
        sub.add_parser(name, help=f"run a {name} in the foreground (see `txkernel {name} --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``txkernel`` console script.

    :param argv: the arguments; None for the command line's. Run as the
        command (None), a ``cluster start --daemon`` that started its cluster
        ends this process as soon as it has said so (:func:`exit_now`).
    :returns: the exit status.
    """
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("controller", "engine"):
        # Everything after the command belongs to the twistd plugin (argparse
        # cannot pass leading options through untouched).
        return _exec_plugin(f"txkernel-{argv[0]}", argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from kernel.error import KernelError

    try:
        status = args.func(args)
    except CommandError as e:
        print(f"txkernel: error: {e}", file=sys.stderr)
        return e.status
    except KernelError as e:
        print(f"txkernel: error: {e}", file=sys.stderr)
        return 1
    if as_command and args.func is cmd_cluster_start and args.daemon and status == 0:
        exit_now(status)  # (its processes are detached: nothing left to do)
    return status


def exit_now(status: int) -> None:
    """End this process with ``status`` once its output is flushed, skipping
    the interpreter's teardown (exit handlers, freeing every module).

    For a command that has done everything: after ``cluster start`` has
    imported what its forked processes need, the teardown is about a tenth
    of the command's time. Never returns.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 1  # (output lost: e.g. a closed pipe)
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
