"""The heartbeat monitor, driven by task.Clock."""

import pytest
from twisted.internet import defer, task

from kernel.error import EngineError
from kernel.heartbeat import HeartMonitor


class Engine:
    """A fake engine whose pings answer, hang, or fail on demand."""

    def __init__(self):
        self.pings = []  # Deferreds of pings sent
        self.mode = "answer"

    def ping(self):
        d = defer.Deferred()
        self.pings.append(d)
        if self.mode == "answer":
            d.callback(None)
        elif self.mode == "fail":
            d.errback(ConnectionError("connection lost"))
        return d


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def dead():
    return []


@pytest.fixture
def monitor(clock, dead):
    m = HeartMonitor(1.0, lambda i, f: dead.append((i, f)), max_missed=3, clock=clock)
    m.startService()
    yield m
    if m.running:
        m.stopService()


def test_answering_engine_stays_alive(clock, monitor, dead):
    e = Engine()
    monitor.add(0, e.ping)
    clock.pump([1.0] * 20)
    assert dead == []
    assert monitor.watched() == [0]
    assert len(e.pings) == 20


def test_silent_engine_declared_dead_after_max_missed(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    monitor.add(7, e.ping)
    clock.pump([1.0, 1.0, 1.0])  # pinged at 1 s, missed at 2 s and 3 s
    assert dead == []
    clock.advance(1.0)  # third miss
    assert [i for i, _ in dead] == [7]
    f = dead[0][1]
    assert f.check(EngineError)
    assert "engine 7" in f.getErrorMessage()
    assert monitor.watched() == []


def test_hung_engine_gets_only_one_ping_in_flight(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    monitor.add(1, e.ping)
    clock.pump([1.0, 1.0])
    assert len(e.pings) == 1


def test_failed_ping_declares_dead_at_once(clock, monitor, dead):
    e = Engine()
    e.mode = "fail"
    monitor.add(2, e.ping)
    clock.advance(1.0)
    assert [i for i, _ in dead] == [2]
    assert "cannot be reached" in dead[0][1].getErrorMessage()


def test_late_answer_revives_engine(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    monitor.add(3, e.ping)
    clock.pump([1.0, 1.0, 1.0])
    e.pings[0].callback(None)  # answers just in time
    clock.advance(1.0)
    assert dead == []
    assert len(e.pings) == 2  # and is pinged afresh


def test_beat_counts_as_sign_of_life(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    monitor.add(4, e.ping)
    clock.pump([1.0, 1.0, 1.0])
    monitor.beat(4)
    clock.advance(1.0)
    assert dead == []
    clock.pump([1.0, 1.0])
    assert [i for i, _ in dead] == [4]


def test_removed_engine_is_not_declared_dead(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    monitor.add(5, e.ping)
    clock.advance(1.0)
    monitor.remove(5)
    e.pings[0].errback(ConnectionError("gone"))
    clock.pump([1.0] * 5)
    assert dead == []


def test_dead_engine_reported_once(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    monitor.add(6, e.ping)
    clock.pump([1.0] * 10)
    e.pings[0].errback(ConnectionError("gone"))
    assert [i for i, _ in dead] == [6]


def test_one_dead_engine_does_not_affect_others(clock, monitor, dead):
    good, bad = Engine(), Engine()
    bad.mode = "hang"
    monitor.add(0, good.ping)
    monitor.add(1, bad.ping)
    clock.pump([1.0] * 4)
    assert [i for i, _ in dead] == [1]
    assert monitor.watched() == [0]


def test_stopped_monitor_pings_nothing(clock, monitor, dead):
    e = Engine()
    monitor.add(0, e.ping)
    monitor.stopService()
    clock.pump([1.0] * 5)
    assert e.pings == []


def test_error_in_on_dead_is_logged_not_raised(clock):
    def explode(i, f):
        raise RuntimeError("observer bug")

    m = HeartMonitor(1.0, explode, max_missed=1, clock=clock)
    e = Engine()
    e.mode = "hang"
    m.add(0, e.ping)
    m.startService()
    clock.pump([1.0, 1.0])  # ping, then one miss
    assert m.watched() == []
    m.stopService()


def test_timeout_is_period_times_max_missed_plus_one():
    assert HeartMonitor(0.5, lambda i, f: None, max_missed=4, clock=task.Clock()).timeout == 2.5


def test_stalled_controller_does_not_blame_engines(clock, monitor, dead):
    """If the controller's own reactor was blocked (heartbeats ran late), the
    time it could not listen does not count against the engines."""
    e = Engine()
    e.mode = "hang"
    monitor.add(0, e.ping)
    clock.advance(1.0)  # ping sent
    clock.advance(30.0)  # the controller was busy for 30 heartbeats: one late check
    e.pings[0].callback(None)  # the answer was waiting all along
    clock.pump([1.0] * 2)
    assert dead == []


def test_sigstopped_engine_dead_within_timeout(clock, monitor, dead):
    e = Engine()
    e.mode = "hang"
    clock.advance(0.5)  # frozen half-way between two heartbeats
    monitor.add(0, e.ping)
    waited = 0.0
    while not dead:
        clock.advance(0.25)
        waited += 0.25
    assert waited <= monitor.timeout


def test_bad_period_rejected():
    with pytest.raises(ValueError, match="period"):
        HeartMonitor(0, lambda i, f: None, clock=task.Clock())
