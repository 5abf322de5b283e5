"""The parallel magics (%px, %%px, %autopx, %result) in an IPython
InteractiveShell, driven in child processes.

Each test checks one scenario of :mod:`tests.client_scenarios` (where its
assertions live). All the scenarios of the group run in one child process per
backend (blocking clients cannot share a process with pytest-twisted's
reactor): ``local``, engines inside the child (:class:`kernel.client.LocalCluster`);
``processes``, a real controller and engine processes reached over Foolscap
through ``client.get_*_client(cluster_dir=...)``.
"""

import pytest

from tests import client_scenarios

NAMES = list(client_scenarios.scenarios("magic"))

outcomes = client_scenarios.outcomes_fixture("magic", ("local", "processes"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_scenario(name, outcomes):
    """The scenario passes on the backend."""
    assert name in outcomes, f"scenario {name} did not run"
    assert outcomes[name] is None, outcomes[name]
