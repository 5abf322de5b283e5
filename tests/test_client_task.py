"""The blocking task client (BlockingTaskClient, with
its mapper and parallel), driven in child processes.

Each test checks one scenario of :mod:`tests.client_scenarios` (where its
assertions live). The scenarios of a group run in one child process per
backend: ``local`` engines inside the child (:class:`kernel.client.LocalCluster`),
and ``processes``, a real controller and engine processes reached over the
network.
"""

import pytest

from tests import client_scenarios

NAMES = list(client_scenarios.scenarios("task"))


@pytest.fixture(scope="module")
def local_outcomes(tmp_path_factory):
    return client_scenarios.run_in_child(
        "task", "local", str(tmp_path_factory.mktemp("task-local"))
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_in_process_engines(name, local_outcomes):
    """The scenario passes against engines running in the client's process."""
    assert name in local_outcomes, f"scenario {name} did not run"
    assert local_outcomes[name] is None, local_outcomes[name]


@pytest.fixture(scope="module")
def process_outcomes(tmp_path_factory):
    return client_scenarios.run_in_child(
        "task", "processes", str(tmp_path_factory.mktemp("task-processes"))
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_real_cluster(name, process_outcomes):
    """The scenario passes against a controller and engine processes, through
    client.get_multiengine_client / get_task_client over the network."""
    assert name in process_outcomes, f"scenario {name} did not run"
    assert process_outcomes[name] is None, process_outcomes[name]
