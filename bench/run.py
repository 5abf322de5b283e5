"""The benchmark's one command: measure every system, print one table, save JSON.

Usually run through ``bash bench/run.sh`` (which builds ``bench/.venv`` first)::

    bash bench/run.sh --quick
    bash bench/run.sh --only latency,push --systems ipyparallel,dask

Each system runs in its own child process (``--child``), one after another,
so no two systems compete for the 2 cores and a crash or hang of one cannot
take the others with it. Every process a child starts carries a marker in its
environment; after the child ends, any process still carrying the marker is
stopped by pid, so no engine, worker or controller outlives the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.systems import MODULES, make_systems  # noqa: E402
from bench.workloads import BY_NAME, GROUPS, select  # noqa: E402

MARKER = "TXKERNEL_BENCH_RUN"
DEFAULT_SYSTEMS = "loopback,ipyparallel,dask,txkernel"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="bench/run.sh",
        description="Run the same workloads on txkernel, ipyparallel, dask.distributed "
        "and plain loopback TCP (2 engines/workers each); print one table; save JSON.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts and fewer runs (a few minutes); sizes are "
                        "shown in the table and saved in the JSON")  # fmt: skip
    parser.add_argument("--only", default="",
                        help=f"comma-separated workloads or groups ({', '.join(GROUPS)}; "
                        f"workloads: {', '.join(BY_NAME)})")  # fmt: skip
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS,
                        help=f"comma-separated, from {', '.join(MODULES)} "
                        f"(default {DEFAULT_SYSTEMS})")  # fmt: skip
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per workload (default per workload: 3-5, --quick 2-3)",
    )
    parser.add_argument("--size", action="append", default=[], metavar="WORKLOAD=N",
                        help="override a workload's count (calls, items, bytes), "
                        "e.g. --size scale_memory=20000; repeatable")  # fmt: skip
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per system (default 3600, --quick 900)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where the JSON record goes (default bench/results)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write JSON")
    # Internal: the child process measuring one system.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-system", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        args.workloads = select(args.only)
        args.sizes, args.repeats_by = sizing(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def sizing(args: argparse.Namespace) -> tuple[dict[str, int], dict[str, int]]:
    """Sizes and repeat counts per workload, after ``--quick``/``--size``/``--repeats``.

    :raises ValueError: for a malformed or unknown ``--size``.
    """
    sizes, repeats = {}, {}
    for w in BY_NAME.values():
        sizes[w.name], repeats[w.name] = w.sizing(args.quick)
        if args.repeats is not None and w.repeatable:
            repeats[w.name] = args.repeats
    for item in args.size:
        name, _, count = item.partition("=")
        if name not in BY_NAME or not count.replace("_", "").isdigit() or int(count) < 1:
            raise ValueError(f"--size wants WORKLOAD=N with N >= 1 and a workload from "
                             f"{', '.join(BY_NAME)}; got {item!r}")  # fmt: skip
        sizes[name] = int(count)
    return sizes, repeats


def child_main(args: argparse.Namespace) -> int:
    """Measure one system (inside the child process)."""
    from bench.runner import run_system

    (system,) = [s for s in make_systems(args.child) if s.name == args.child_system]
    run_system(system, args.workloads, args.sizes, args.repeats_by, args.child_out)
    return 0


def reap_marked(token: str, since: float) -> list[int]:
    """Stop, by pid, every process still carrying this run's marker.

    :param token: the marker value given to the child's environment.
    :param since: only processes created after this time can carry it.
    :returns: the pids that had to be stopped.
    """
    import psutil

    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if proc.pid == me or proc.info["create_time"] < since - 1:
                continue
            if proc.environ().get(MARKER) == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in found:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in found]


def run_child(args: argparse.Namespace, cli_name: str, system_name: str, timeout: float) -> dict:
    """Measure one system in a child process; always clean up after it.

    :returns: the system's entry for the results dict.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"txkbench-{system_name}-"))
    out = workdir / "results.jsonl"
    token = uuid.uuid4().hex
    env = dict(os.environ)
    env[MARKER] = token
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["IPYTHONDIR"] = str(workdir / "ipython")  # ipyparallel profiles stay private
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "bench.run", "--child", cli_name, "--child-system",
           system_name, "--child-out", str(out), "--only",
           ",".join(w.name for w in args.workloads)]  # fmt: skip
    cmd += [f"--size={name}={size}" for name, size in args.sizes.items()]
    if args.repeats is not None:
        cmd += ["--repeats", str(args.repeats)]
    if args.quick:
        cmd.append("--quick")
    since = time.time()
    failure = None
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
        if code != 0:
            failure = f"measuring process exited with status {code}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:.0f} s (raise --timeout)"
        proc.send_signal(signal.SIGTERM)  # lets the system shut its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        stray = reap_marked(token, since)
        if stray:
            print(f"[{system_name}] stopped leftover processes: {stray}", file=sys.stderr)
        entry = read_child_results(out, system_name)
        shutil.rmtree(workdir, ignore_errors=True)
    if failure:
        entry["error"] = failure
        for w in args.workloads:
            if w.name not in entry["workloads"]:
                entry["workloads"][w.name] = {"size": args.sizes[w.name], "repeats": 0,
                                              "raw": [], "values": [], "na": None,
                                              "error": failure}  # fmt: skip
    return entry


def read_child_results(path: Path, system_name: str) -> dict:
    """Assemble a child's JSON lines into the system's results entry."""
    entry = {"available": True, "reason": None, "versions": {}, "workloads": {}, "error": None}
    if not path.exists():
        entry["error"] = "measuring process wrote no results"
        return entry
    for line in path.read_text().splitlines():
        record = json.loads(line)
        kind = record.pop("type")
        if kind == "system":
            record.pop("name", None)
            entry.update(record)
        elif kind == "workload":
            entry["workloads"][record.pop("name")] = record
    return entry


def git_describe() -> dict:
    """The checkout measured: commit and whether the tree had changes."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    try:
        return {
            "commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        }
    except OSError:
        return {"commit": None, "dirty": None}


def main(argv: list[str] | None = None) -> int:
    """Entry point: the parent, or (with ``--child``) the measuring child."""
    args = parse_args(argv)
    if args.child:
        return child_main(args)

    timeout = args.timeout or (900.0 if args.quick else 3600.0)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    try:
        plan = [(n, s.name) for n in names for s in make_systems(n)]
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "quick": args.quick,
            "command": ["bash", "bench/run.sh", *sys.argv[1:]],
            "python": sys.executable,
            "machine": report.machine_info(),
            "checkout": git_describe(),
            "sizes": {w.name: args.sizes[w.name] for w in args.workloads},
            "repeats": {w.name: args.repeats_by[w.name] for w in args.workloads},
        },
        "systems": {},
    }
    busy = []
    # SIGTERM stops the run like Ctrl-C: the current system is shut down, and
    # what was measured so far is still reported and saved.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for cli_name, system_name in plan:
            load = os.getloadavg()
            print(f"== {system_name} (load average {load[0]:.2f})", file=sys.stderr, flush=True)
            entry = run_child(args, cli_name, system_name, timeout)
            entry["loadavg_before"], entry["loadavg_after"] = load, os.getloadavg()
            if entry.get("available") and load[0] > 0.5 * (os.cpu_count() or 1):
                busy.append(f"{system_name} {load[0]:.1f}")
            results["systems"][system_name] = entry
    except KeyboardInterrupt:
        results["meta"]["interrupted"] = True
        print("\ninterrupted: reporting what was measured so far", file=sys.stderr)
    results["meta"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    mode = "quick run: reduced counts" if args.quick else "full run"
    print(f"\ntxkernel side-by-side benchmark ({mode}; medians, (min-max) over runs)\n")
    print(report.table(results))
    if busy:
        print(f"\nwarning: the machine was busy when systems started (1-minute load average "
              f"on {os.cpu_count()} cores: {', '.join(busy)}); numbers are noisy, compare "
              f"only within one run")  # fmt: skip
    print()
    print(report.targets_summary(results))
    if not args.no_save:
        stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
        path = report.save_json(results, args.results_dir, stamp)
        print(f"\nsaved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
