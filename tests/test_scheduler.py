"""The routing schemes and the load table."""

import random

import pytest

from kernel import scheduler
from kernel.scheduler import LoadTable, get_scheme


class FixedRandom(random.Random):
    """A Random whose randrange/choices return scripted values."""

    def __init__(self, picks):
        super().__init__(0)
        self.picks = list(picks)

    def randrange(self, n):
        return self.picks.pop(0)

    def choices(self, population, weights=None, k=1):
        self.weights = weights
        return [self.picks.pop(0) for _ in range(k)]


def test_lru_picks_the_front_whatever_the_loads():
    assert scheduler.lru([5, 0, 0]) == 0


def test_leastload_picks_lowest_load():
    assert scheduler.leastload([3, 1, 2]) == 1


def test_leastload_breaks_ties_by_lru_order():
    assert scheduler.leastload([2, 1, 4, 1]) == 1


def test_plainrandom_uses_the_random_pick():
    assert scheduler.plainrandom([0, 0, 0], rng=FixedRandom([2])) == 2


def test_plainrandom_covers_every_engine():
    rng = random.Random(1)
    assert {scheduler.plainrandom([0] * 4, rng=rng) for _ in range(200)} == {0, 1, 2, 3}


def test_twobin_takes_the_less_recently_used_of_two():
    assert scheduler.twobin([9, 9, 9, 9], rng=FixedRandom([3, 1])) == 1
    assert scheduler.twobin([0, 0, 0, 0], rng=FixedRandom([2, 3])) == 2


def test_weighted_takes_the_less_loaded_of_two():
    assert scheduler.weighted([1, 5, 2], rng=FixedRandom([1, 2])) == 2
    assert scheduler.weighted([1, 5, 2], rng=FixedRandom([0, 1])) == 0


def test_weighted_weights_are_inverse_loads():
    rng = FixedRandom([0, 0])
    scheduler.weighted([1, 4, 0], rng=rng)
    w = rng.weights
    assert w[0] == 1.0 and w[1] == 0.25 and w[2] > w[0]


def test_weighted_prefers_idle_engines_statistically():
    rng = random.Random(3)
    picks = [scheduler.weighted([10, 0, 10], rng=rng) for _ in range(300)]
    assert picks.count(1) > 250


def test_get_scheme_by_name_and_callable():
    assert get_scheme("lru") is scheduler.lru

    def mine(loads):
        return len(loads) - 1

    assert get_scheme(mine) is mine


def test_get_scheme_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="leastload"):
        get_scheme("fastest")


def test_load_table_keeps_lru_order_and_counts():
    t = LoadTable("lru")
    for k in "abc":
        t.add_engine(k)
    assert t.choose() == "a"
    t.add_job("a")
    assert t.keys() == ["b", "c", "a"] and t.load("a") == 1
    assert t.choose() == "b"
    t.finish_job("a")
    assert t.load("a") == 0


def test_load_table_leastload_sees_outstanding_jobs():
    t = LoadTable("leastload")
    for k in "ab":
        t.add_engine(k)
    t.add_job("a")
    t.add_job("a")
    t.add_job("b")
    assert t.choose() == "b"


def test_load_table_hwm_excludes_full_engines():
    t = LoadTable("leastload", hwm=1)
    t.add_engine("a")
    t.add_engine("b")
    t.add_job("a")
    assert t.available() == ["b"]
    t.add_job("b")
    assert t.choose() is None
    t.finish_job("b")
    assert t.choose() == "b"


def test_load_table_hwm_zero_is_unlimited():
    t = LoadTable("leastload", hwm=0)
    t.add_engine("a")
    for _ in range(50):
        t.add_job("a")
    assert t.choose() == "a"


def test_load_table_choose_among_candidates():
    t = LoadTable("leastload")
    for k in "abc":
        t.add_engine(k)
    t.add_job("c")
    assert t.choose(["c"]) == "c"
    assert t.choose(["x"]) is None


def test_load_table_rejects_bad_scheme_result():
    t = LoadTable(lambda loads: 7)
    t.add_engine("a")
    with pytest.raises(ValueError, match="index"):
        t.choose()


def test_load_table_rejects_negative_hwm():
    with pytest.raises(ValueError, match="hwm"):
        LoadTable(hwm=-1)


def test_finish_job_on_removed_engine_is_harmless():
    t = LoadTable()
    t.add_engine("a")
    t.remove_engine("a")
    t.finish_job("a")
    assert len(t) == 0


def test_has_room_anywhere():
    t = LoadTable(hwm=1)
    assert not t.has_room_anywhere()
    t.add_engine("a")
    assert t.has_room_anywhere()
    t.add_job("a")
    assert not t.has_room_anywhere()
    unlimited = LoadTable(hwm=0)
    unlimited.add_engine("a")
    unlimited.add_job("a")
    assert unlimited.has_room_anywhere()
