"""PendingDeferredManager: results saved by id, redeemed exactly once."""

import gc

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from kernel.error import InvalidDeferredID, ResultNotCompleted
from kernel.pendingdeferred import PendingDeferredManager


def result_of(d):
    """The value a fired Deferred holds, or the Failure it failed with."""
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_saved_ids_are_distinct_ints():
    pdm = PendingDeferredManager()
    ids = [pdm.save_pending_deferred(defer.Deferred()) for _ in range(3)]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == 3
    assert len(pdm) == 3


def test_fired_result_is_returned_exactly_once():
    pdm = PendingDeferredManager()
    i = pdm.save_pending_deferred(defer.succeed(42))
    assert result_of(pdm.get_pending_deferred(i, block=False)) == 42
    assert not pdm.quick_has_id(i)
    f = result_of(pdm.get_pending_deferred(i, block=True))
    f.trap(InvalidDeferredID)


def test_none_results_are_results():
    pdm = PendingDeferredManager()
    i = pdm.save_pending_deferred(defer.succeed(None))
    assert result_of(pdm.get_pending_deferred(i, block=False)) is None
    result_of(pdm.get_pending_deferred(i, block=False)).trap(InvalidDeferredID)


def test_not_ready_and_not_blocking_fails_with_result_not_completed_and_keeps_the_id():
    pdm = PendingDeferredManager()
    d = defer.Deferred()
    i = pdm.save_pending_deferred(d)
    f = result_of(pdm.get_pending_deferred(i, block=False))
    f.trap(ResultNotCompleted)
    assert "block=True" in str(f.value)
    d.callback("late")
    assert result_of(pdm.get_pending_deferred(i, block=False)) == "late"


def test_blocking_get_fires_when_the_result_comes_and_redeems_the_id():
    pdm = PendingDeferredManager()
    d = defer.Deferred()
    i = pdm.save_pending_deferred(d)
    got = pdm.get_pending_deferred(i, block=True)
    assert not got.called
    result_of(pdm.get_pending_deferred(i, block=True)).trap(InvalidDeferredID)
    d.callback([1, 2])
    assert result_of(got) == [1, 2]


def test_failures_are_kept_and_delivered_once():
    pdm = PendingDeferredManager()
    i = pdm.save_pending_deferred(defer.fail(ZeroDivisionError("boom")))
    f = result_of(pdm.get_pending_deferred(i, block=False))
    f.trap(ZeroDivisionError)
    result_of(pdm.get_pending_deferred(i, block=False)).trap(InvalidDeferredID)


def test_failure_arriving_after_a_blocking_get_errbacks_it():
    pdm = PendingDeferredManager()
    d = defer.Deferred()
    i = pdm.save_pending_deferred(d)
    got = pdm.get_pending_deferred(i, block=True)
    d.errback(KeyError("k"))
    result_of(got).trap(KeyError)


def test_unknown_ids_fail_with_invalid_deferred_id():
    pdm = PendingDeferredManager()
    f = result_of(pdm.get_pending_deferred(99, block=False))
    f.trap(InvalidDeferredID)
    assert "99" in str(f.value)
    result_of(pdm.get_pending_deferred("nope", block=True)).trap(InvalidDeferredID)


def test_clear_drops_ready_and_pending_results():
    pdm = PendingDeferredManager()
    ready = pdm.save_pending_deferred(defer.succeed(1))
    later = defer.Deferred()
    pending = pdm.save_pending_deferred(later)
    pdm.clear_pending_deferreds()
    assert len(pdm) == 0
    result_of(pdm.get_pending_deferred(ready, block=False)).trap(InvalidDeferredID)
    later.callback(2)
    result_of(pdm.get_pending_deferred(pending, block=False)).trap(InvalidDeferredID)


def test_delete_drops_one_id():
    pdm = PendingDeferredManager()
    a = pdm.save_pending_deferred(defer.succeed("a"))
    b = pdm.save_pending_deferred(defer.succeed("b"))
    pdm.delete_pending_deferred(a)
    result_of(pdm.get_pending_deferred(a, block=False)).trap(InvalidDeferredID)
    assert result_of(pdm.get_pending_deferred(b, block=False)) == "b"


@pytest.fixture
def logged_errors():
    """Collect every error event logged while the test runs."""
    events = []

    def observer(event):
        if event.get("isError") or event.get("log_failure") is not None:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_cleared_failures_are_not_logged_as_unhandled(logged_errors):
    pdm = PendingDeferredManager()
    already_failed = pdm.save_pending_deferred(defer.fail(ValueError("early")))
    later = defer.Deferred()
    pdm.save_pending_deferred(later)
    pdm.clear_pending_deferreds()
    later.errback(ValueError("late"))
    del later
    gc.collect()
    assert not logged_errors
    assert not pdm.quick_has_id(already_failed)


def test_unredeemed_failures_are_not_logged_as_unhandled(logged_errors):
    pdm = PendingDeferredManager()
    d = defer.Deferred()
    pdm.save_pending_deferred(d)
    d.errback(RuntimeError("kept"))
    del d
    gc.collect()
    assert not logged_errors
