"""The benchmark's workloads: what each measures, its size, and its unit.

Every system module (``bench/systems/*``) implements the workloads it can as
*probes*: one method per probe, called once per repetition, returning raw
measurements (elapsed seconds, or bytes for memory) keyed by workload name.
Several workloads can share one probe (push and pull are measured by one
push-then-pull round), so a probe returns a dict.

This module knows nothing of any system and imports nothing heavy, so the
report code and its tests can use it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Kinds of measurement, and how a raw measurement becomes a reported value.
#: ``latency``: seconds for ``size`` calls -> milliseconds per call.
#: ``rate``: seconds for ``size`` items -> items per second.
#: ``bandwidth``: seconds for ``size`` bytes -> MB (10**6 bytes) per second.
#: ``duration``: seconds -> seconds.
#: ``memory``: bytes -> MB (10**6 bytes).
KINDS = {
    "latency": ("ms", False),
    "rate": ("/s", True),
    "bandwidth": ("MB/s", True),
    "duration": ("s", False),
    "memory": ("MB", False),
}

MB = 10**6


@dataclass(frozen=True)
class Workload:
    """One row of the benchmark table.

    :param name: short identifier, used on the command line and in JSON.
    :param group: the issue's heading it belongs to (``latency``, ``throughput``,
        ``data``, ``startup``, ``scale``, ``loopback``).
    :param probe: the system method that measures it.
    :param kind: one of :data:`KINDS`.
    :param title: what it measures, for the table.
    :param size: calls, items or bytes per repetition in a full run.
    :param quick_size: the same under ``--quick``.
    :param repeats: repetitions in a full run.
    :param quick_repeats: repetitions under ``--quick``.
    :param size_label: how to print a size (``"{:,} calls"``).
    """

    name: str
    group: str
    probe: str
    kind: str
    title: str
    size: int
    quick_size: int
    repeats: int
    quick_repeats: int
    size_label: str = "{:,}"
    #: False when runs would not be independent (memory keeps growing run to
    #: run): such a workload always runs once, whatever ``--repeats`` says.
    repeatable: bool = True

    @property
    def unit(self) -> str:
        """The unit of reported values (``ms``, ``/s``, ``MB/s``, ``s``, ``MB``)."""
        return KINDS[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger reported value is the better one."""
        return KINDS[self.kind][1]

    def sizing(self, quick: bool) -> tuple[int, int]:
        """:returns: ``(size, repeats)`` for a full or a ``--quick`` run."""
        if not self.repeatable:
            return (self.quick_size if quick else self.size), 1
        if quick:
            return self.quick_size, self.quick_repeats
        return self.size, self.repeats

    def describe_size(self, size: int) -> str:
        """:returns: a size as the table prints it, e.g. ``"10,000 tasks"``."""
        if self.kind in ("bandwidth",):
            return f"{size / MB:,.0f} MB"
        return self.size_label.format(size)

    def value(self, raw: float, size: int) -> float:
        """Turn one raw measurement into the reported value.

        :param raw: seconds (bytes for ``memory`` workloads).
        :param size: calls, items or bytes measured in that time.
        :returns: the value in :attr:`unit`.
        :raises ValueError: if a time is not positive.
        """
        if self.kind == "memory":
            return raw / MB
        if raw <= 0:
            raise ValueError(f"{self.name}: elapsed time must be positive, got {raw!r}")
        if self.kind == "latency":
            return raw / size * 1000.0
        if self.kind == "rate":
            return size / raw
        if self.kind == "bandwidth":
            return size / raw / MB
        return raw


_DATA_100MB = 100 * MB
_DATA_80MB = 10_000_000 * 8

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "tcp_rtt", "loopback", "tcp_rtt", "latency",
        "plain TCP small-message round trip (1 byte each way)",
        20_000, 5_000, 5, 3, "{:,} round trips",
    ),
    Workload(
        "tcp_bandwidth", "loopback", "tcp_bandwidth", "bandwidth",
        "plain TCP bandwidth, one process to another",
        2_000 * MB, 500 * MB, 5, 3,
    ),
    Workload(
        "execute", "latency", "execute", "latency",
        "blocking execute('pass') on one engine",
        500, 100, 5, 3, "{:,} calls",
    ),
    Workload(
        "apply_direct", "latency", "apply_direct", "latency",
        "no-op function round trip, direct on one engine",
        500, 100, 5, 3, "{:,} calls",
    ),
    Workload(
        "apply_lb", "latency", "apply_lb", "latency",
        "no-op function round trip, through the load balancer",
        500, 100, 5, 3, "{:,} calls",
    ),
    Workload(
        "tasks_one_by_one", "throughput", "tasks_one_by_one", "rate",
        "no-op tasks submitted one by one, then all awaited",
        10_000, 500, 2, 2, "{:,} tasks",
    ),
    Workload(
        "map_default", "throughput", "map_default", "rate",
        "load-balanced map of a no-op, default chunking",
        10_000, 1_000, 2, 2, "{:,} items",
    ),
    Workload(
        "map_chunk100", "throughput", "map_chunk100", "rate",
        "load-balanced map of a no-op, chunksize=100",
        10_000, 1_000, 3, 2, "{:,} items",
    ),
    Workload(
        "chain_after", "throughput", "chain_after", "rate",
        "chain of tasks, each running after the previous one",
        2_000, 200, 3, 2, "{:,} tasks",
    ),
    Workload(
        "push", "data", "push_pull", "bandwidth",
        "push a float64 array to one engine",
        _DATA_100MB, _DATA_100MB, 5, 2,
    ),
    Workload(
        "pull", "data", "push_pull", "bandwidth",
        "pull the same array back from that engine",
        _DATA_100MB, _DATA_100MB, 5, 2,
    ),
    Workload(
        "scatter", "data", "scatter_gather", "bandwidth",
        "scatter a 10M-element float64 array over both engines",
        _DATA_80MB, _DATA_80MB, 5, 2,
    ),
    Workload(
        "gather", "data", "scatter_gather", "bandwidth",
        "gather it back from both engines",
        _DATA_80MB, _DATA_80MB, 5, 2,
    ),
    Workload(
        "startup", "startup", "startup", "duration",
        "launch to 2 engines ready (then shut down)",
        2, 2, 3, 2, "{} engines",
    ),
    Workload(
        "scale_memory", "scale", "scale_memory", "memory",
        "controller/scheduler resident memory after completed tasks",
        100_000, 2_000, 1, 1, "{:,} tasks", repeatable=False,
    ),
)  # fmt: skip

BY_NAME = {w.name: w for w in WORKLOADS}
GROUPS = tuple(dict.fromkeys(w.group for w in WORKLOADS))


def select(spec: str | None) -> list[Workload]:
    """Workloads named by a comma-separated list of workload or group names.

    :param spec: e.g. ``"latency,push"``; ``None`` or empty selects all.
    :returns: the selected workloads, in table order.
    :raises ValueError: naming the unknown entries and the valid ones.
    """
    if not spec:
        return list(WORKLOADS)
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = sorted(wanted - set(BY_NAME) - set(GROUPS))
    if unknown:
        raise ValueError(
            f"unknown workload(s) {', '.join(unknown)}; choose from groups "
            f"{', '.join(GROUPS)} or workloads {', '.join(BY_NAME)}"
        )
    return [w for w in WORKLOADS if w.name in wanted or w.group in wanted]


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``system``'s ``workload`` against a reference.

    The check passes when ``ours`` is at least ``factor`` times better than
    the reference, in the workload's own direction (for latency, ``factor=5``
    means at most a fifth of the reference's time).

    :param description: the goal in words.
    :param workload: the txkernel workload compared.
    :param ref_system: the reference system (``ipyparallel``, ``dask``, ``loopback``).
    :param ref_workload: the reference's workload (often the same name).
    :param factor: how many times better txkernel must be (0.5 = half as good).
    """

    description: str
    workload: str
    ref_system: str
    ref_workload: str
    factor: float


TARGETS: tuple[Target, ...] = (
    Target("execute('pass') <= 1/5 of ipyparallel apply_sync", "execute", "ipyparallel",
           "apply_direct", 5),
    Target("no-op round trip <= 1/5 of ipyparallel apply_sync", "apply_direct", "ipyparallel",
           "apply_direct", 5),
    Target("no-op round trip <= 1/8 of dask submit().result()", "apply_direct", "dask",
           "apply_direct", 8),
    Target("tasks one by one >= 10x ipyparallel", "tasks_one_by_one", "ipyparallel",
           "tasks_one_by_one", 10),
    Target("tasks one by one >= 5x dask", "tasks_one_by_one", "dask", "tasks_one_by_one", 5),
    Target("default map >= ipyparallel map with chunksize=100", "map_default", "ipyparallel",
           "map_chunk100", 1),
    Target("after-chain >= 5x dask", "chain_after", "dask", "chain_after", 5),
    Target("push >= 50% of loopback TCP", "push", "loopback", "tcp_bandwidth", 0.5),
    Target("pull >= 50% of loopback TCP", "pull", "loopback", "tcp_bandwidth", 0.5),
    Target("scatter >= 4x ipyparallel", "scatter", "ipyparallel", "scatter", 4),
    Target("gather >= 4x ipyparallel", "gather", "ipyparallel", "gather", 4),
    Target("startup no slower than dask LocalCluster", "startup", "dask", "startup", 1),
    Target("controller memory after the scale run < 200 MB", "scale_memory", "", "", 200),
)  # fmt: skip
