"""Measure one system, inside the child process ``bench/run.py`` starts for it.

Results go to a JSON-lines file as they are measured, so the parent keeps
whatever was measured before a crash or a time-out. The system is always
stopped, also on errors and on SIGTERM from the parent.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.systems import System
from bench.workloads import Workload

#: Probes given one untimed run at a tenth of the size first, so imports,
#: connections and caches are warm before timing starts.
WARMUP_PROBES = {
    "tcp_rtt",
    "tcp_bandwidth",
    "execute",
    "apply_direct",
    "apply_lb",
    "tasks_one_by_one",
    "map_default",
    "map_chunk100",
    "chain_after",
}
#: Probes that run with no main cluster up (they start their own).
STANDALONE_PROBES = {"startup"}
#: Probes that run last, because they load the controller.
LAST_PROBES = {"scale_memory"}
#: Probes that get a freshly started cluster of their own.
FRESH_PROBES = {"scale_memory"}


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"stopped by signal {signum}")


def group_by_probe(
    workloads: list[Workload], sizes: dict[str, int], repeats: dict[str, int]
) -> list[tuple[str, list[Workload], int, int]]:
    """Group workloads measured by the same probe, in run order.

    Standalone probes come first, then the ones needing the main cluster, the
    scale probe last. A group's size and repeats are the largest of its
    members' (they are equal unless overridden).

    :returns: ``[(probe, workloads, size, repeats), ...]``.
    """
    groups: dict[str, list[Workload]] = {}
    for w in workloads:
        groups.setdefault(w.probe, []).append(w)

    def order(probe: str) -> int:
        return 0 if probe in STANDALONE_PROBES else 2 if probe in LAST_PROBES else 1

    out = []
    for probe in sorted(groups, key=order):
        members = groups[probe]
        out.append(
            (
                probe,
                members,
                max(sizes[w.name] for w in members),
                max(repeats[w.name] for w in members),
            )
        )
    return out


def measure(
    probe: Callable[[int], dict],
    members: list[Workload],
    size: int,
    repeats: int,
    warmup: bool,
    log: Callable[[str], None],
) -> list[dict]:
    """Run a probe ``repeats`` times and turn its raw results into entries.

    :returns: one results entry per member workload (see :mod:`bench.report`).
    """
    entries = {
        w.name: {"size": size, "repeats": repeats, "raw": [], "values": [], "na": None,
                 "error": None, "extra": []}
        for w in members
    }  # fmt: skip
    try:
        if warmup:
            probe(max(1, size // 10))
        for i in range(repeats):
            raw = probe(size)
            extra = {k: v for k, v in raw.items() if k.startswith("_")}
            for w in members:
                entry = entries[w.name]
                entry["raw"].append(raw[w.name])
                entry["values"].append(w.value(raw[w.name], size))
                if extra:
                    entry["extra"].append(extra)
            shown = ", ".join(
                f"{w.name} {entries[w.name]['values'][-1]:.4g} {w.unit}" for w in members
            )
            log(f"  run {i + 1}/{repeats}: {shown}")
    except _Terminated:
        raise
    except Exception as e:  # noqa: BLE001 -- record any failure and go on
        message = f"{type(e).__name__}: {e}"
        log(f"  failed: {message}\n{traceback.format_exc()}")
        for entry in entries.values():
            entry["error"] = message
    return [dict(name=name, **entry) for name, entry in entries.items()]


def run_system(
    system: System,
    workloads: list[Workload],
    sizes: dict[str, int],
    repeats: dict[str, int],
    out_path: Path,
) -> None:
    """Measure ``workloads`` on ``system``, appending JSON lines to ``out_path``.

    Lines: one ``{"type": "system", ...}`` header, then one
    ``{"type": "workload", "name": ..., ...}`` per workload.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)

    def log(text: str) -> None:
        print(f"[{system.name}] {text}", file=sys.stderr, flush=True)

    def emit(record: dict) -> None:
        with out_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    reason = system.unavailable()
    header = {"type": "system", "name": system.name, "available": reason is None,
              "reason": reason, "versions": {} if reason else system.versions()}  # fmt: skip
    emit(header)
    if reason:
        log(f"unavailable: {reason}")
        return

    started = False
    start_error = None
    try:
        for probe_name, members, size, reps in group_by_probe(workloads, sizes, repeats):
            na = [w for w in members if w.name in system.not_applicable]
            for w in na:
                emit({"type": "workload", "name": w.name, "size": None, "repeats": 0,
                      "raw": [], "values": [], "na": system.not_applicable[w.name],
                      "error": None})  # fmt: skip
            members = [w for w in members if w not in na]
            if not members:
                continue
            probe = system.probe(probe_name)
            if probe is None:
                continue  # not something this system does (the loopback rows)
            if probe_name not in STANDALONE_PROBES and not started:
                log("starting")
                t0 = time.perf_counter()
                started = True
                try:
                    system.start()
                except _Terminated:
                    raise
                except Exception as e:  # noqa: BLE001 -- report, skip what needs it
                    start_error = f"could not start: {type(e).__name__}: {e}"
                    log(f"{start_error}\n{traceback.format_exc()}")
                else:
                    log(f"started in {time.perf_counter() - t0:.1f} s")
            if start_error and probe_name not in STANDALONE_PROBES:
                for w in members:
                    emit({"type": "workload", "name": w.name, "size": size, "repeats": reps,
                          "raw": [], "values": [], "na": None, "error": start_error})  # fmt: skip
                continue
            if probe_name in FRESH_PROBES and started and not start_error:
                # Memory must not depend on what ran before (the data workloads
                # leave large buffers behind): measure on a fresh cluster.
                log("restarting for a fresh controller")
                system.stop()
                system.start()
            log(f"{probe_name}: size {size:,}, {reps} runs")
            for entry in measure(probe, members, size, reps, probe_name in WARMUP_PROBES, log):
                emit({"type": "workload", **entry})
    finally:
        if started:
            log("stopping")
            system.stop()
