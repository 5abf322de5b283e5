"""BufferPool: large receive buffers reused only once nothing else holds them."""

from __future__ import annotations

import numpy as np
from twisted.internet.task import Clock

from kernel.bufferpool import MIN_BYTES, BufferPool

SIZE = 2 * MIN_BYTES


class Routed(bytearray):
    __slots__ = ("tag",)


def make_pool(**kwargs):
    now = [0.0]
    return BufferPool(clock=lambda: now[0], **kwargs), now


def test_a_buffer_nothing_holds_is_handed_out_again():
    pool, _ = make_pool()
    first = pool.take(bytearray, SIZE)
    first_id = id(first)
    del first
    again = pool.take(bytearray, SIZE)
    assert id(again) == first_id
    assert pool.tracked_bytes == SIZE


def test_a_buffer_still_held_is_never_handed_out():
    pool, _ = make_pool()
    held = [pool.take(bytearray, SIZE)]
    view = memoryview(held[0])
    array = np.frombuffer(pool.take(bytearray, SIZE), dtype=np.uint8)  # only the array holds it
    third = pool.take(bytearray, SIZE)
    assert third is not held[0] and not np.shares_memory(array, np.frombuffer(third, np.uint8))
    assert pool.tracked_bytes == 3 * SIZE
    del view, held
    fourth = pool.take(bytearray, SIZE)  # the first one is free now
    assert not np.shares_memory(array, np.frombuffer(fourth, np.uint8))
    assert pool.tracked_bytes == 3 * SIZE


def test_only_a_buffer_of_the_same_type_and_size_is_reused():
    pool, _ = make_pool()
    pool.take(bytearray, SIZE)
    other_size = pool.take(bytearray, SIZE + 1)
    other_type = pool.take(Routed, SIZE)
    assert len(other_size) == SIZE + 1
    assert type(other_type) is Routed and len(other_type) == SIZE
    assert pool.tracked_bytes == 3 * SIZE + 1


def test_small_buffers_are_fresh_and_not_tracked():
    pool, _ = make_pool()
    a = pool.take(bytearray, 100)
    assert a == bytearray(100)
    assert pool.tracked_bytes == 0


def test_trim_releases_free_buffers_idle_too_long_and_keeps_the_rest():
    pool, now = make_pool(idle=10.0)
    pool.take(bytearray, SIZE)  # free at once
    kept = pool.take(bytearray, SIZE + 1)
    now[0] = 5.0
    assert pool.trim() == 2 * SIZE + 1  # not idle long enough
    now[0] = 11.0
    assert pool.trim() == SIZE + 1  # the free one goes; the held one stays
    del kept
    now[0] = 30.0
    assert pool.trim() == 0


def test_the_limit_bounds_what_is_tracked_and_free_buffers_make_room():
    pool, _ = make_pool(limit=2 * SIZE + 1)
    a = pool.take(bytearray, SIZE)
    b = pool.take(bytearray, SIZE)
    c = pool.take(bytearray, SIZE)  # over the limit, all held: not tracked
    assert pool.tracked_bytes == 2 * SIZE
    del a
    d = pool.take(bytearray, SIZE + 1)  # the free one is dropped to make room
    assert pool.tracked_bytes == 2 * SIZE + 1  # b and d
    assert len(b) == len(c) == SIZE and len(d) == SIZE + 1


def test_keep_trimmed_releases_free_buffers_without_further_receives():
    clock = Clock()
    pool = BufferPool(idle=10.0, clock=clock.seconds)
    held = pool.take(bytearray, SIZE)
    pool.take(bytearray, SIZE + 1)  # free at once
    pool.keep_trimmed(clock)
    pool.keep_trimmed(clock)  # one timer at a time
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(11)
    assert pool.tracked_bytes == SIZE  # the held one is kept; a timer stays for it
    assert len(clock.getDelayedCalls()) == 1
    del held
    clock.advance(11)
    clock.advance(11)
    assert pool.tracked_bytes == 0
    assert clock.getDelayedCalls() == []


def test_threads_taking_at_once_never_get_the_same_free_buffer():
    import threading

    pool = BufferPool()
    size = 2 * MIN_BYTES
    free = [pool.take(bytearray, size) for _ in range(4)]
    del free  # four free buffers of the same size
    got: list = []
    start = threading.Barrier(8)

    def taker():
        start.wait()
        for _ in range(8):
            got.append(pool.take(bytearray, size))

    threads = [threading.Thread(target=taker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 64
    assert len({id(b) for b in got}) == 64  # every buffer handed out is held: all distinct


# -- new buffers -------------------------------------------------------------------


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_new_large_buffer_is_not_zero_filled_so_its_pages_cost_nothing_until_written():
    import sys

    from kernel.bufferpool import allocate

    size = 256 * MIN_BYTES
    before = _resident_bytes() if sys.platform.startswith("linux") else None
    buf = allocate(Routed, size)
    assert type(buf) is Routed and len(buf) == size
    if before is not None:
        assert _resident_bytes() - before < size // 4  # (bytearray(size) would touch all)
    buf[-1] = 7  # writable to the end
    buf[:3] = b"abc"
    assert buf[:3] == b"abc" and buf[-1] == 7


def test_small_new_buffers_and_those_without_the_c_api_are_plain_zero_filled_ones(monkeypatch):
    from kernel import bufferpool

    small = bufferpool.allocate(bytearray, MIN_BYTES - 1)
    assert type(small) is bytearray and small.count(0) == len(small) == MIN_BYTES - 1
    monkeypatch.setattr(bufferpool, "_resize", False)
    plain = bufferpool.allocate(Routed, SIZE)
    assert type(plain) is Routed and plain.count(0) == len(plain) == SIZE


def test_the_pool_makes_its_new_buffers_with_allocate(monkeypatch):
    from kernel import bufferpool

    made = []
    monkeypatch.setattr(bufferpool, "allocate", lambda kind, size: made.append(size) or kind(size))
    pool, _ = make_pool()
    buf = pool.take(bytearray, SIZE)
    assert made == [SIZE] and len(buf) == SIZE
