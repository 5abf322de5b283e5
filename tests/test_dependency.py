"""Functional and graph dependencies."""

import pickle

import cloudpickle
import pytest

from kernel.dependency import Dependency, as_dependency, depend, dependent, require
from kernel.error import UnmetDependency


class R:
    def __init__(self, taskid):
        self.taskid = taskid


def outcomes(**kw):
    """outcome(tid) from t<N>=True/False keywords."""
    table = {int(k[1:]): v for k, v in kw.items()}
    return table.get


# -- functional ---------------------------------------------------------


def test_dependent_runs_when_dependency_holds():
    f = dependent(lambda x: x + 1, lambda flag: flag, True)
    assert f(1) == 2


def test_dependent_raises_unmet_dependency_on_false():
    f = dependent(lambda: 1, lambda: False)
    with pytest.raises(UnmetDependency, match="returned False"):
        f()


def test_dependent_only_exact_false_is_unmet():
    assert dependent(lambda: "ran", lambda: None)() == "ran"
    assert dependent(lambda: "ran", lambda: 0)() == "ran"


def test_depend_decorator_passes_arguments_to_dependency():
    seen = []

    def check(a, b=None):
        seen.append((a, b))
        return True

    @depend(check, 1, b=2)
    def f(x):
        return x * 2

    assert f(4) == 8 and seen == [(1, 2)]


def test_require_imports_and_binds_module():
    g = {}
    exec("def f():\n    return json.dumps([1])\n", g)
    f = require("json")(g["f"])
    assert f() == "[1]"


def test_require_missing_module_is_unmet():
    f = require("no_such_module_txkernel")(lambda: 1)
    with pytest.raises(UnmetDependency, match="no_such_module_txkernel"):
        f()


def test_require_rejects_non_str():
    with pytest.raises(TypeError):
        require(pickle)


def test_dependent_survives_cloudpickle():
    f = dependent(lambda x: -x, lambda: True)
    assert cloudpickle.loads(cloudpickle.dumps(f))(3) == -3


# -- graph ----------------------------------------------------------------


def test_dependency_takes_ints_results_and_dependencies():
    d = Dependency([1, R(2), Dependency([3])])
    assert d == {1, 2, 3}


def test_dependency_rejects_non_ids():
    with pytest.raises(TypeError, match="taskids"):
        Dependency(["x"])


def test_dependency_that_can_never_count_is_refused():
    with pytest.raises(ValueError, match="never be met"):
        Dependency([1], success=False, failure=False)


def test_all_success_met_only_when_all_succeeded():
    d = Dependency([1, 2])
    assert not d.is_met(outcomes(t1=True))
    assert d.is_met(outcomes(t1=True, t2=True))
    assert not d.is_met(outcomes(t1=True, t2=False))


def test_all_success_unreachable_when_any_failed():
    d = Dependency([1, 2])
    assert not d.is_unreachable(outcomes(t1=True))
    assert d.is_unreachable(outcomes(t2=False))


def test_any_success_met_by_one_success():
    d = Dependency([1, 2], all=False)
    assert not d.is_met(outcomes(t1=False))
    assert d.is_met(outcomes(t2=True))


def test_any_success_unreachable_only_when_all_failed():
    d = Dependency([1, 2], all=False)
    assert not d.is_unreachable(outcomes(t1=False))
    assert d.is_unreachable(outcomes(t1=False, t2=False))


def test_failure_only_dependency():
    d = Dependency([1], success=False, failure=True)
    assert d.is_met(outcomes(t1=False))
    assert d.is_unreachable(outcomes(t1=True))


def test_success_or_failure_dependency_met_by_any_outcome():
    d = Dependency([1, 2], success=True, failure=True)
    assert d.is_met(outcomes(t1=False, t2=True))
    assert not d.is_unreachable(outcomes(t1=False, t2=True))


def test_empty_dependency_is_met():
    assert Dependency().is_met(outcomes())


def test_counting_lists_ids_that_count():
    d = Dependency([1, 2, 3], all=False)
    assert sorted(d.counting(outcomes(t1=True, t2=False, t3=True))) == [1, 3]


def test_dict_roundtrip_and_pickle():
    d = Dependency([3, 1], all=False, success=True, failure=True)
    assert d.as_dict() == {"ids": [1, 3], "all": False, "success": True, "failure": True}
    assert Dependency.from_dict(d.as_dict()) == d
    back = pickle.loads(pickle.dumps(d))
    assert back == d and back.all is False


def test_as_dependency_normalizes_arguments():
    assert as_dependency(None) is None
    assert as_dependency([]) is None
    assert as_dependency(4) == Dependency([4])
    assert as_dependency(R(5)) == Dependency([5])
    assert as_dependency([4, R(5)]) == Dependency([4, 5])
    d = Dependency([1], all=False)
    assert as_dependency(d) is d
    assert as_dependency(d.as_dict()) == d


def test_check_costs_only_the_dependency_size():
    """is_met asks about each of its own ids once, never about other tasks."""
    asked = []

    def outcome(tid):
        asked.append(tid)
        return True

    Dependency([5, 6, 7]).is_met(outcome)
    assert sorted(asked) == [5, 6, 7]
