"""Block partitioning of sequences and joining the blocks back."""

import numpy as np
import pytest

from kernel import map as kmap


@pytest.mark.parametrize(
    "length,p,expected",
    [
        (10, 4, [3, 3, 2, 2]),
        (8, 4, [2, 2, 2, 2]),
        (3, 5, [1, 1, 1, 0, 0]),
        (0, 3, [0, 0, 0]),
        (7, 1, [7]),
    ],
)
def test_block_lengths_differ_by_at_most_one_and_cover_the_sequence(length, p, expected):
    blocks = kmap.partition(list(range(length)), p)
    assert [len(b) for b in blocks] == expected
    assert [x for b in blocks for x in b] == list(range(length))


def test_blocks_keep_the_sequence_type():
    assert kmap.partition((1, 2, 3), 2) == [(1, 2), (3,)]
    assert kmap.partition(range(5), 2) == [range(0, 3), range(3, 5)]
    assert kmap.partition("abcde", 2) == ["abc", "de"]


def test_numpy_arrays_are_split_as_arrays():
    a = np.arange(20).reshape(10, 2)
    blocks = kmap.partition(a, 3)
    assert all(isinstance(b, np.ndarray) for b in blocks)
    assert [b.shape for b in blocks] == [(4, 2), (3, 2), (3, 2)]
    np.testing.assert_array_equal(np.concatenate(blocks), a)


def test_get_partition_returns_one_block():
    d = kmap.distribution("b")
    assert d.get_partition(list(range(10)), 1, 4) == [3, 4, 5]
    assert d.get_partition(list(range(10)), 3, 4) == [8, 9]


def test_iterables_without_slicing_are_listed_first():
    assert kmap.partition((x * x for x in range(4)), 2) == [[0, 1], [4, 9]]


def test_non_iterables_are_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="cannot partition an object of type int"):
        kmap.partition(5, 2)
    with pytest.raises(TypeError, match="0-dimensional"):
        kmap.partition(np.array(1.0), 2)


def test_unknown_distribution_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown distribution 'r'.*'b'"):
        kmap.partition([1, 2], 2, dist="r")


def test_zero_blocks_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        kmap.partition([1, 2], 0)


def test_join_lists_tuples_and_ranges_gives_one_list():
    assert kmap.join([[1, 2], (3,), range(4, 6), []]) == [1, 2, 3, 4, 5]


def test_join_counts_flattened_elements_as_one_item():
    assert kmap.join([[1, 2], 3, [4]]) == [1, 2, 3, 4]


def test_join_strings_gives_a_string():
    assert kmap.join(["ab", "c", ""]) == "abc"


def test_join_arrays_concatenates_including_empty_and_flattened_blocks():
    a = np.arange(6.0).reshape(3, 2)
    blocks = kmap.partition(a, 5)  # two empty blocks at the end
    joined = kmap.join(blocks)
    assert isinstance(joined, np.ndarray)
    np.testing.assert_array_equal(joined, a)
    # a flattened one-row block is a row, not a 1-row array
    flat = [a[0], a[1:3]]
    np.testing.assert_array_equal(kmap.join(flat), a)
    np.testing.assert_array_equal(kmap.join([np.float64(1.0), np.array([2.0, 3.0])]), [1, 2, 3])


def test_join_of_nothing_is_an_empty_list():
    assert kmap.join([]) == []


def test_partition_then_join_round_trips():
    seq = list(range(17))
    for p in range(1, 20):
        assert kmap.join(kmap.partition(seq, p)) == seq


def _memory_owner(array):
    owner = array
    while True:
        nxt = getattr(owner, "base", None)
        if nxt is None:
            nxt = getattr(owner, "obj", None)  # a memoryview's exporter
        if nxt is None:
            return owner
        owner = nxt


def test_a_large_joined_array_fills_a_pooled_buffer_reused_only_once_released():
    joined = kmap.join(kmap.partition(np.arange(300_000, dtype=np.float64), 3))
    np.testing.assert_array_equal(joined, np.arange(300_000, dtype=np.float64))
    assert joined.flags.writeable
    assert type(_memory_owner(joined)) is bytearray  # a pool buffer, not fresh memory
    held = joined.copy()
    again = kmap.join(kmap.partition(np.zeros(300_000), 2))  # same size
    np.testing.assert_array_equal(joined, held)  # a result still held is never refilled
    assert _memory_owner(again) is not _memory_owner(joined)
    pooled = {id(_memory_owner(joined)), id(_memory_owner(again))}  # (the pool keeps both)
    del joined, again
    third = kmap.join(kmap.partition(np.ones(300_000), 4))
    assert id(_memory_owner(third)) in pooled  # filled again, not allocated
    np.testing.assert_array_equal(third, np.ones(300_000))


def test_large_blocks_that_do_not_line_up_are_refused_as_numpy_refuses_them():
    with pytest.raises(ValueError):
        kmap.join([np.zeros((200_000, 2)), np.zeros((200_000, 3))])


def test_a_large_join_of_object_arrays_is_concatenated_as_usual():
    blocks = [np.array([object()] * 200_000), np.array([None] * 200_000)]
    joined = kmap.join(blocks)
    assert joined.dtype == object and len(joined) == 400_000
