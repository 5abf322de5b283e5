"""The blocking task client (BlockingTaskClient with its mapper and parallel),
driven in child processes.

Each test checks one scenario of :mod:`tests.client_scenarios` (where its
assertions live). All the scenarios of the group run in one child process per
backend (blocking clients cannot share a process with pytest-twisted's
reactor): ``local``, engines inside the child (:class:`kernel.client.LocalCluster`);
``processes``, a real controller and engine processes reached over Foolscap
through ``client.get_*_client(cluster_dir=...)``; and ``processes-pb``, the same
over Perspective Broker.
"""

import pytest

from tests import client_scenarios

NAMES = list(client_scenarios.scenarios("task"))

BACKENDS = [
    pytest.param("local", id="local"),
    pytest.param("processes", id="processes", marks=pytest.mark.slow),
    pytest.param("processes-pb", id="processes-pb", marks=pytest.mark.slow),
    pytest.param("processes-native", id="processes-native", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=BACKENDS)
def outcomes(request, tmp_path_factory):
    backend = request.param
    workdir = str(tmp_path_factory.mktemp(f"task-{backend}"))
    return client_scenarios.run_in_child("task", backend, workdir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_scenario(name, outcomes):
    """The scenario passes on the backend."""
    assert name in outcomes, f"scenario {name} did not run"
    assert outcomes[name] is None, outcomes[name]
