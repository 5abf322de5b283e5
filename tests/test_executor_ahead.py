"""ThreadExecutor: callables sent ahead (revoked until they start), targeted
interrupts, and pausing the thread after a callable."""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.internet import reactor

from kernel import executor
from tests.contract.engine import WAIT, failure_of
from tests.test_engineservice import wait_for


@pytest_twisted.async_yield_fixture
async def ex():
    ex = executor.ThreadExecutor(name="t-ahead")
    try:
        yield ex
    finally:
        ex.stop()
        await ex.when_stopped().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_a_revoked_callable_never_runs_and_its_deferred_never_fires(ex):
    gate, ran = threading.Event(), []
    first = ex.submit(lambda: gate.wait(WAIT))
    await wait_for(lambda: ex.busy)
    second = ex.submit(lambda: ran.append("second"), revocable=True)
    third = ex.submit(lambda: ran.append("third"), revocable=True)
    assert ex.revoke(second) is True
    assert ex.revoke(second) is False  # once
    gate.set()
    assert await first.addTimeout(WAIT, reactor) is True
    await third.addTimeout(WAIT, reactor)
    assert ran == ["third"] and not second.called


@pytest_twisted.ensureDeferred
async def test_a_started_or_plain_callable_cannot_be_revoked(ex):
    gate = threading.Event()
    running = ex.submit(lambda: gate.wait(WAIT), revocable=True)
    plain = ex.submit(lambda: "plain")
    await wait_for(lambda: ex.busy)
    assert ex.revoke(running) is False
    assert ex.revoke(plain) is False
    gate.set()
    assert await plain.addTimeout(WAIT, reactor) == "plain"


@pytest_twisted.ensureDeferred
async def test_interrupt_only_hits_the_named_callable_while_it_runs(ex):
    gate = threading.Event()
    first = ex.submit(lambda: gate.wait(WAIT), revocable=True)
    second = ex.submit(lambda: "second", revocable=True)
    await wait_for(lambda: ex.is_running(first))
    assert ex.is_running(second) is False
    assert ex.interrupt(only=second) is False  # not the one running
    gate.set()
    assert await first.addTimeout(WAIT, reactor) is True  # not interrupted
    await second.addTimeout(WAIT, reactor)
    assert ex.is_running(first) is False

    looping = ex.submit(lambda: [None for _ in iter(int, 1)], revocable=True)
    await wait_for(lambda: ex.is_running(looping))
    assert ex.interrupt(only=looping) is True
    f = await failure_of(looping)
    assert f.check(KeyboardInterrupt)


@pytest_twisted.ensureDeferred
async def test_pause_holds_the_next_callable_until_released(ex):
    released = []

    def pausing():
        released.append(ex.pause())
        return "paused"

    assert await ex.submit(pausing).addTimeout(WAIT, reactor) == "paused"
    after = ex.submit(lambda: "after")
    await wait_for(lambda: not ex.busy)
    await wait_for(lambda: ex._queue.empty())  # the thread holds it, paused
    assert not after.called and not ex.busy
    released[0]()
    assert await after.addTimeout(WAIT, reactor) == "after"


@pytest_twisted.ensureDeferred
async def test_stop_releases_a_pause_and_leaves_revoked_callables_alone():
    ex = executor.ThreadExecutor(name="t-ahead-stop")
    gate = threading.Event()
    first = ex.submit(lambda: (ex.pause(), gate.wait(WAIT))[1])
    await wait_for(lambda: ex.busy)
    revoked = ex.submit(lambda: "revoked", revocable=True)
    queued = ex.submit(lambda: "queued", revocable=True)
    assert ex.revoke(revoked)
    dropped = ex.stop()
    gate.set()
    assert dropped == [queued]
    assert not revoked.called
    assert await first.addTimeout(WAIT, reactor) is True
    await ex.when_stopped().addTimeout(WAIT, reactor)
    f = await failure_of(queued)
    assert isinstance(f.value, executor.ExecutorStopped)
