"""Statistics, the results table, target checks and the JSON record.

The results of one run are one plain dict (it is what goes to JSON)::

    {"meta": {"started": ..., "quick": ..., "machine": {...}, "command": [...]},
     "systems": {
        "dask": {"available": True, "reason": None, "versions": {...},
                 "workloads": {
                    "apply_lb": {"size": 500, "repeats": 5,
                                 "raw": [0.61, ...], "values": [1.22, ...],
                                 "na": None, "error": None},
                    ...}},
        ...}}

``raw`` holds what the probe measured (seconds, or bytes for memory),
``values`` the same in the workload's unit. ``na`` says why a system has no
equivalent of a workload; ``error`` says why a measurement failed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.workloads import BY_NAME, TARGETS, WORKLOADS, Target, Workload

#: Column order for known systems; txkernel adapters come first, peers after.
PEERS = ("ipyparallel", "dask")
REFERENCE = "loopback"


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """Median, minimum and maximum of repeated measurements.

    :param values: one value per repetition.
    :returns: ``{"median", "min", "max", "n"}``, or ``None`` when empty.
    """
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt_number(value: float) -> str:
    """Three significant figures, thousands separated: ``18,700``, ``6.80``, ``0.0421``."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude == 0:
        return "0"
    return f"{value:.3g}"


def system_order(names: Iterable[str]) -> list[str]:
    """txkernel systems first (alphabetically), then the peers, then loopback."""
    names = list(names)
    ours = sorted(n for n in names if n.startswith("txkernel"))
    peers = [n for n in PEERS if n in names]
    others = sorted(n for n in names if n not in ours and n not in peers and n != REFERENCE)
    ref = [REFERENCE] if REFERENCE in names else []
    return ours + peers + others + ref


#: Short names for the ratio columns' headers.
SHORT_NAMES = {"ipyparallel": "ipp", "dask": "dask", "loopback": "tcp"}


def short_name(system: str) -> str:
    """``txkernel-foolscap`` -> ``foolscap``, ``ipyparallel`` -> ``ipp``."""
    if system.startswith("txkernel-"):
        return system[len("txkernel-") :]
    return SHORT_NAMES.get(system, system)


def _entry(results: dict, system: str, workload: str) -> dict | None:
    return results["systems"].get(system, {}).get("workloads", {}).get(workload)


def median_of(results: dict, system: str, workload: str) -> float | None:
    """:returns: the median value of a system's workload, or ``None`` if not measured."""
    entry = _entry(results, system, workload)
    if not entry:
        return None
    summary = summarize(entry.get("values") or [])
    return summary["median"] if summary else None


def cell(results: dict, system: str, workload: str) -> str:
    """One table cell: ``median (min-max)``, ``n/a``, ``error`` or ``-`` (not run)."""
    sysinfo = results["systems"].get(system)
    if sysinfo is None:
        return "-"
    if not sysinfo.get("available", True):
        return "unavailable"
    entry = _entry(results, system, workload)
    if entry is None:
        return "-"
    if entry.get("na"):
        return "n/a"
    summary = summarize(entry.get("values") or [])
    if summary is None:
        return "error" if entry.get("error") else "-"
    text = fmt_number(summary["median"])
    if summary["n"] > 1:
        text += f" ({fmt_number(summary['min'])}-{fmt_number(summary['max'])})"
    if entry.get("error"):
        text += " !"
    return text


def ratio(ours: float | None, theirs: float | None) -> str:
    """``ours / theirs`` as ``0.20x``, or ``n/a`` when either is missing."""
    if ours is None or theirs is None or theirs == 0:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def _size_of(results: dict, workload: Workload) -> str:
    sizes = {
        entry["size"]
        for system in results["systems"].values()
        for name, entry in system.get("workloads", {}).items()
        if name == workload.name and entry.get("size") is not None
    }
    if not sizes:
        return ""
    return " / ".join(workload.describe_size(s) for s in sorted(sizes))


def render_table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces; a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table(results: dict) -> str:
    """The one results table: per workload, each system's median (min-max) and
    every txkernel/peer ratio of medians.

    Ratios are txkernel's median divided by the peer's: for ``ms`` and ``s``
    rows below 1 is better, for rates and bandwidth above 1 is better (the
    ``better`` column says which).

    :param results: a run's results dict (see the module docstring).
    :returns: the table as text, with notes on failures under it.
    """
    systems = system_order(results["systems"])
    ours_all = [s for s in systems if s.startswith("txkernel")] or ["txkernel"]
    # ratio columns only for txkernel systems that ran (or none ran at all)
    ours = [s for s in ours_all if results["systems"].get(s, {}).get("available", True)]
    peers = [p for p in PEERS if p in systems] or list(PEERS)
    columns = list(dict.fromkeys(ours_all + systems))
    header = ["workload", "size", "unit", "better"] + columns
    header += [f"{short_name(o)}/{short_name(p)}" for o in ours for p in peers]
    rows = [header]
    run_names = {n for s in results["systems"].values() for n in s.get("workloads", {})}
    for workload in WORKLOADS:
        if workload.name not in run_names:
            continue
        row = [
            workload.name,
            _size_of(results, workload),
            workload.unit,
            "higher" if workload.higher_is_better else "lower",
        ]
        row += [cell(results, s, workload.name) for s in columns]
        for o in ours:
            for p in peers:
                row.append(
                    ratio(
                        median_of(results, o, workload.name), median_of(results, p, workload.name)
                    )
                )
        rows.append(row)
    out = render_table(rows)
    out += (
        "\nratios: txkernel's median / the peer's (ipp = ipyparallel); below 1x is better "
        "for ms, s and MB, above 1x for /s and MB/s"
    )
    notes = notes_for(results)
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out


def notes_for(results: dict) -> list[str]:
    """Lines explaining unavailable systems, failed and partial measurements."""
    notes = []
    for name in system_order(results["systems"]):
        sysinfo = results["systems"][name]
        if not sysinfo.get("available", True):
            notes.append(f"{name}: unavailable: {sysinfo.get('reason')}")
            continue
        if sysinfo.get("error"):
            notes.append(f"{name}: {sysinfo['error']}")
        for wname, entry in sysinfo.get("workloads", {}).items():
            if entry.get("error"):
                got = len(entry.get("values") or [])
                notes.append(f"{name} {wname} ({got} of {entry.get('repeats')} runs ok): "
                             f"{entry['error']}")  # fmt: skip
    return notes


def check_target(results: dict, target: Target, system: str) -> tuple[str, str]:
    """Evaluate one target for one txkernel system.

    :returns: ``(status, detail)``, status one of ``met``, ``missed``, ``n/a``.
    """
    workload = BY_NAME[target.workload]
    ours = median_of(results, system, target.workload)
    if ours is None:
        return "n/a", f"{system} has no {target.workload} measurement"
    if not target.ref_system:
        ok = ours < target.factor
        return ("met" if ok else "missed"), f"{fmt_number(ours)} {workload.unit}"
    ref = median_of(results, target.ref_system, target.ref_workload)
    if ref is None:
        return "n/a", f"{target.ref_system} has no {target.ref_workload} measurement"
    if workload.higher_is_better:
        better_by = ours / ref
    else:
        better_by = ref / ours if ours else float("inf")
    ok = better_by >= target.factor
    detail = (f"{fmt_number(ours)} vs {fmt_number(ref)} {workload.unit}: "
              f"{better_by:.2f}x better (needs {target.factor:g}x)")  # fmt: skip
    return ("met" if ok else "missed"), detail


def targets_summary(results: dict) -> str:
    """One line per (txkernel system, target): met, missed or n/a, with numbers."""
    ours = [
        s
        for s in system_order(results["systems"])
        if s.startswith("txkernel") and results["systems"][s].get("available", True)
    ]
    if not ours:
        return "targets: no txkernel system measured in this run"
    lines = ["targets:"]
    for system in ours:
        for target in TARGETS:
            status, detail = check_target(results, target, system)
            lines.append(f"  [{status:>6}] {system}: {target.description} -- {detail}")
    return "\n".join(lines)


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, OS, Python."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": None,
        "memory_bytes": None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return info


def save_json(results: dict, directory: Path, stamp: str) -> Path:
    """Write results to ``directory/<stamp>.json`` atomically (via a ``.tmp`` file).

    :param results: the run's results dict.
    :param directory: created if missing.
    :param stamp: file name without extension, e.g. ``20261122T110000Z``.
    :returns: the path written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    tmp = directory / f"{stamp}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
