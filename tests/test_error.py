"""Engine failures as plain data, and CompositeError."""

import pytest
from twisted.python.failure import Failure

from kernel import error


def failure_of(exc):
    try:
        raise exc
    except BaseException:
        return Failure()


def test_engine_failure_info_keeps_type_message_and_traceback():
    info = error.engine_failure_info(failure_of(ZeroDivisionError("division by zero")))
    assert info.ename == "ZeroDivisionError"
    assert info.evalue == "division by zero"
    assert "ZeroDivisionError" in info.traceback


def test_remote_error_reraises_original_type_with_engine_traceback():
    info = error.engine_failure_info(failure_of(KeyError("k")))
    info.engine_id = 3
    exc = info.original()
    assert isinstance(exc, KeyError)
    assert exc._txkernel_engine_id == 3


def test_remote_error_dict_roundtrip():
    info = error.RemoteError("ValueError", "bad", "tb text", 2, None)
    back = error.RemoteError.from_dict(info.to_dict())
    assert (back.ename, back.evalue, back.traceback, back.engine_id) == (
        "ValueError",
        "bad",
        "tb text",
        2,
    )
    assert back.original() is back


def test_collect_exceptions_passes_plain_results_through():
    assert error.collect_exceptions([1, None, "x"], "execute") == [1, None, "x"]


def test_collect_exceptions_builds_composite_error_with_engine_ids():
    results = [1, failure_of(ValueError("v")), failure_of(NameError("n"))]
    with pytest.raises(error.CompositeError) as info:
        error.collect_exceptions(results, "execute", engine_ids=[0, 1, 2])
    ce = info.value
    assert [(e.engine_id, e.ename) for e in ce.elist] == [(1, "ValueError"), (2, "NameError")]
    text = str(ce)
    assert "engine 1" in text and "ValueError: v" in text and "NameError: n" in text
    assert "engine 2" in ce.format_tracebacks()
    with pytest.raises(NameError):
        ce.raise_exception(1)
    with pytest.raises(IndexError, match="does not exist"):
        ce.raise_exception(5)


def test_no_engines_message_says_how_to_start_some():
    assert "txkernel cluster start" in str(error.NoEnginesRegistered())
