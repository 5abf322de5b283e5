"""Task classes, engine-side task bodies and TaskResult (no engines needed)."""

import pickle

import pytest
from zope.interface.verify import verifyObject

from kernel import serialized
from kernel.dependency import Dependency
from kernel.error import RemoteError, UnmetDependency, engine_failure_info
from kernel.interfaces import ITask
from kernel.serialized import Serialized
from kernel.task import BaseTask, MapTask, StringTask, TaskResult, apply_chunk

PLAIN = (str, int, float, bool, type(None), bytes)


def assert_plain(value, path="flags"):
    """Only plain data (what any transport can carry) anywhere in ``value``."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{path} has key {k!r}"
            assert_plain(v, f"{path}[{k!r}]")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_plain(v, f"{path}[{i}]")
    else:
        assert isinstance(value, PLAIN), f"{path} is a {type(value).__name__}"


def body_of(task):
    return serialized.deserialize(task.to_spec()[1])


class R:
    def __init__(self, taskid):
        self.taskid = taskid


def test_tasks_provide_itask():
    assert verifyObject(ITask, MapTask(len))
    assert verifyObject(ITask, StringTask("x = 1"))


def test_to_spec_splits_plain_flags_from_an_opaque_payload():
    task = MapTask(
        lambda x: x,
        args=(1,),
        retries=2,
        timeout=1.5,
        after=[1, R(2)],
        follow=Dependency([3], all=False),
        clear_before=True,
        recovery_task=StringTask("y = 2", pull="y"),
        depend=lambda p: True,
    )
    flags, payload = task.to_spec()
    assert_plain(flags)
    assert isinstance(payload, Serialized)
    assert flags["retries"] == 2 and flags["timeout"] == 1.5
    assert flags["after"] == {"ids": [1, 2], "all": True, "success": True, "failure": False}
    assert flags["follow"]["all"] is False
    assert flags["clear_before"] is True and flags["clear_after"] is False
    assert flags["description"].startswith("MapTask(")
    rec = flags["recovery_task"]
    assert rec["flags"]["retries"] == 0
    assert serialized.deserialize(Serialized.from_bytes(rec["payload"])).pull == ["y"]


def test_map_task_body_calls_the_function():
    body = body_of(MapTask(lambda a, b=0: a - b, args=(5,), kwargs={"b": 2}))
    assert body.run({}, {}) == 3


def test_functional_depend_is_judged_on_engine_properties():
    body = body_of(MapTask(lambda: "ran", depend=lambda p: p.get("gpu", False)))
    assert body.run({}, {"gpu": True}) == "ran"
    with pytest.raises(UnmetDependency, match="false on this engine"):
        body.run({}, {})


def test_string_task_body_pushes_runs_and_pulls():
    body = body_of(StringTask("z = x * 2", pull="z", push={"x": 4}))
    ns = {}
    assert body.run(ns, {}) == {"z": 8}
    assert ns["x"] == 4


def test_string_task_body_missing_pull_name_raises_name_error():
    with pytest.raises(NameError, match="'w'"):
        body_of(StringTask("z = 1", pull=["w"])).run({}, {})


def test_string_task_without_pull_returns_empty_dict():
    assert body_of(StringTask("z = 1")).run({}, {}) == {}


def test_string_task_syntax_error_is_raised_at_construction():
    with pytest.raises(SyntaxError):
        StringTask("def (")


def test_string_task_rejects_non_str_names():
    with pytest.raises(TypeError):
        StringTask("x = 1", pull=[1])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"retries": -1}, ValueError),
        ({"retries": 1.5}, ValueError),
        ({"timeout": -2}, ValueError),
        ({"recovery_task": "not a task"}, TypeError),
        ({"depend": "not callable"}, TypeError),
        ({"after": ["x"]}, TypeError),
    ],
)
def test_bad_flags_are_refused(kwargs, error):
    with pytest.raises(error):
        BaseTask(**kwargs)


def test_map_task_needs_a_callable():
    with pytest.raises(TypeError):
        MapTask(42)


def test_unpicklable_argument_fails_at_to_spec():
    import threading

    from kernel.error import SerializationError

    with pytest.raises(SerializationError):
        MapTask(len, args=(threading.Lock(),)).to_spec()


def test_apply_chunk():
    assert apply_chunk(pow, [(2, 3), (3, 2)]) == [8, 9]


# -- TaskResult ---------------------------------------------------------------


def ok_result(value, **kw):
    return TaskResult(
        1,
        "succeeded",
        serialized.serialize(value),
        engine_id=2,
        submitted=1.0,
        started=2.0,
        completed=5.5,
        **kw,
    )


def failed_result(exc):
    return TaskResult(1, "failed", None, engine_failure_info(exc), engine_id=2)


def test_result_metadata_and_duration():
    tr = ok_result(7, stdout="out")
    assert (tr.taskid, tr.status, tr.engine_id, tr.stdout, tr.stderr) == (
        1,
        "succeeded",
        2,
        "out",
        "",
    )
    assert tr.duration == 3.5
    assert TaskResult(1, "aborted").duration is None


def test_results_are_deserialized_lazily():
    garbage = Serialized(b"not a pickle")
    tr = TaskResult(3, "succeeded", garbage)
    back = TaskResult.from_dict(tr.to_dict())  # routing never opens the blob
    assert back.serialized_result == garbage
    with pytest.raises(Exception):  # noqa: B017 - any unpickling error
        _ = back.results


def test_ns_gives_attribute_access_to_a_dict_of_results():
    tr = ok_result({"a": 1, "b": [2]})
    assert tr.ns.a == 1 and tr.ns["b"] == [2]
    assert tr.keys == ["a", "b"]


def test_ns_of_non_dict_results_explains():
    with pytest.raises(TypeError, match="use .results"):
        _ = ok_result(5).ns


def test_failure_reraises_original_type():
    tr = failed_result(ZeroDivisionError("nope"))
    assert tr.failure.check(ZeroDivisionError)
    with pytest.raises(ZeroDivisionError, match="nope"):
        tr.raise_exception()
    with pytest.raises(ZeroDivisionError):
        _ = tr.results


def test_failure_that_cannot_be_unpickled_raises_remote_error():
    tr = TaskResult(1, "failed", None, RemoteError("AlienError", "from elsewhere", "tb"))
    with pytest.raises(RemoteError, match="AlienError: from elsewhere"):
        tr.raise_exception()


def test_success_has_no_failure():
    tr = ok_result(1)
    assert tr.failure is None
    tr.raise_exception()


def test_result_dict_and_pickle_roundtrip():
    tr = ok_result([1, 2], stderr="warn")
    for back in (TaskResult.from_dict(tr.to_dict()), pickle.loads(pickle.dumps(tr))):
        assert back.results == [1, 2]
        assert (back.submitted, back.started, back.completed, back.stderr) == (
            1.0,
            2.0,
            5.5,
            "warn",
        )
    bad = pickle.loads(pickle.dumps(failed_result(KeyError("k"))))
    with pytest.raises(KeyError):
        bad.raise_exception()


def test_to_dict_is_plain_data():
    assert_plain(ok_result(1).to_dict(), "result")
    assert_plain(failed_result(ValueError("v")).to_dict(), "result")
