"""The task contract against in-process engines."""

from __future__ import annotations

import pytest_twisted

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
