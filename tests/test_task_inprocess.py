"""The task contract against in-process engines."""

from __future__ import annotations

import pytest
import pytest_twisted

from kernel.taskcontroller import TaskController
from kernel.taskdb.sqlite import SQLiteDB
from tests.contract.task import TaskControllerContract
from tests.harness import InProcessHarness


@pytest_twisted.async_yield_fixture
async def cluster():
    harness = await InProcessHarness.start(n_engines=4)
    try:
        await harness.reset()
        yield harness
    finally:
        await harness.stop()


class TestTaskControllerInProcess(TaskControllerContract):
    """Every ITaskController contract test, with four in-process engines."""


@pytest_twisted.async_yield_fixture
async def sqlite_cluster(tmp_path):
    harness = await InProcessHarness.start(n_engines=4)
    try:
        # swap in a controller that records to SQLite (the default store of a real controller)
        harness.task_controller.stopService()
        harness.task_controller = TaskController(
            harness.controller, db=SQLiteDB(str(tmp_path / "tasks.db"))
        )
        await harness.reset()
        yield harness
    finally:
        await harness.stop()
        await harness.task_controller.db.close()


class TestTaskControllerInProcessSQLite(TaskControllerContract):
    """The contract again, with task records in a SQLite file."""

    @pytest.fixture
    def cluster(self, sqlite_cluster):
        return sqlite_cluster
