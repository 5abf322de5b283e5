"""Contract test mixins: one per interface, run unchanged over every transport.

Each mixin is a plain class of ``async def test_*`` methods (decorated with
``@pytest_twisted.ensureDeferred``) that use one fixture, ``cluster``: an
object following :class:`ClusterHarness`. A transport opts in by subclassing
the mixin in its own test module and overriding the ``cluster`` fixture::

    class TestMultiEngineInProcess(MultiEngineContract):
        @pytest_twisted.async_yield_fixture
        async def cluster(self):
            harness = await InProcessHarness.start(n_engines=4)
            yield harness
            await harness.stop()

Rules for every contract test, so that a transport may share one real
cluster between tests (starting processes per test would be too slow):

- never assume engine ids are ``0..n-1``: ask ``get_ids()``;
- never assume an empty namespace beyond what the harness guarantees: the
  harness resets every engine's namespace, queue and properties before each
  test (``await cluster.reset()`` is called by the fixture);
- a test that changes the set of engines (``add_engine``/``kill_engine``)
  must leave at least ``n_engines`` running (the harness restores them in
  ``reset``);
- every wait is bounded (``Deferred.addTimeout`` or pytest-timeout).
"""

from typing import Protocol


class ClusterHarness(Protocol):
    """What a transport's ``cluster`` fixture provides to the contract mixins."""

    #: ISynchronousMultiEngine implementer under test (one client's view).
    multiengine: object
    #: a second, independent client's ISynchronousMultiEngine (same cluster).
    other_multiengine: object
    #: ITaskController implementer under test.
    task_controller: object
    #: number of engines running at the start of each test (>= 2).
    n_engines: int

    async def add_engine(self) -> int:
        """Start one more engine; return its id once it is registered."""

    async def kill_engine(self, engine_id: int) -> None:
        """Kill an engine abruptly (SIGKILL for a process; in-process: make it
        fail like a lost connection); return once the controller has noticed."""

    async def reset(self) -> None:
        """Restore ``n_engines`` running engines with empty namespaces, queues
        and properties, and no tasks."""
