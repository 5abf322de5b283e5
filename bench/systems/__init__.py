"""One module per benchmarked system, all behind the :class:`System` base.

A system is started once per run (2 engines or workers on this machine),
measured by *probes* -- methods named ``probe_<probe>`` (see
:mod:`bench.workloads`) -- and stopped. Probes take the size (calls, items or
bytes) and return raw measurements keyed by workload name: elapsed seconds,
or bytes for memory. Keys starting with ``_`` are extra facts worth keeping
in the JSON (a baseline, a count) and are not table values.
"""

from __future__ import annotations

#: System names the command line accepts, mapped to the module holding them.
MODULES = {
    "loopback": "bench.systems.loopback",
    "ipyparallel": "bench.systems.ipyparallel_sys",
    "dask": "bench.systems.dask_sys",
    "txkernel": "bench.systems.txkernel_sys",
}


class System:
    """Base of every benchmarked system.

    Subclasses set :attr:`name`, may list workloads they have no equivalent
    for in :attr:`not_applicable` (name -> why), and implement ``probe_*``.
    """

    name = "system"
    #: workload name -> why this system has no equivalent.
    not_applicable: dict[str, str] = {}

    def unavailable(self) -> str | None:
        """:returns: why this system cannot run here (and the fix), or ``None``."""
        return None

    def versions(self) -> dict[str, str]:
        """:returns: package name -> version of what is measured."""
        return {}

    def start(self) -> None:
        """Start the system's processes and wait until 2 engines are ready."""

    def stop(self) -> None:
        """Shut everything :meth:`start` started down; safe to call twice."""

    def probe(self, name: str):
        """:returns: the bound ``probe_<name>`` method, or ``None`` if there is none."""
        return getattr(self, f"probe_{name}", None)


def make_systems(name: str) -> list[System]:
    """Instantiate the systems a command-line name stands for.

    :param name: a key of :data:`MODULES`; ``txkernel`` stands for one system
        per transport adapter.
    :raises ValueError: for an unknown name, listing the known ones.
    """
    import importlib

    if name not in MODULES:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(MODULES)}")
    module = importlib.import_module(MODULES[name])
    return module.systems()
