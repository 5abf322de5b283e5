"""Partitioning sequences over engines, and joining the pieces back.

Used on the caller's side by ``scatter``, ``gather`` and the parallel maps:
the controller never sees the data, only the blobs of each partition.

Only the block distribution, ``'b'``, exists: a sequence of length ``n`` split
over ``p`` engines gives ``p`` contiguous blocks whose lengths differ by at
most one (the first ``n % p`` blocks hold one more item). Lists, tuples,
ranges, strings and NumPy arrays are split by slicing, so each block has the
type of the sequence (NumPy blocks are arrays). NumPy is optional: it is used
only if the caller has already imported it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["BlockDistribution", "DISTRIBUTIONS", "distribution", "join", "partition"]


def _numpy():
    """The NumPy module if it has been imported in this process, else None."""
    return sys.modules.get("numpy")


def _is_array(obj: Any) -> bool:
    np = _numpy()
    return np is not None and isinstance(obj, np.ndarray)


class BlockDistribution:
    """The ``'b'`` distribution: contiguous blocks of nearly equal length."""

    name = "b"

    def bounds(self, length: int, p: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` slice bounds of each of ``p`` blocks.

        :param length: the length of the sequence.
        :param p: the number of blocks (>= 1).
        """
        if p < 1:
            raise ValueError(f"cannot split a sequence into {p} blocks: need at least one")
        base, extra = divmod(length, p)
        out = []
        start = 0
        for i in range(p):
            stop = start + base + (1 if i < extra else 0)
            out.append((start, stop))
            start = stop
        return out

    def get_partition(self, seq: Sequence, p: int, q: int) -> Sequence:
        """Block ``p`` (0-based) of ``seq`` split into ``q`` blocks."""
        seq = as_sliceable(seq)
        start, stop = self.bounds(len(seq), q)[p]
        return seq[start:stop]

    def partition(self, seq: Sequence, q: int) -> list[Sequence]:
        """All ``q`` blocks of ``seq``, in order."""
        seq = as_sliceable(seq)
        return [seq[start:stop] for start, stop in self.bounds(len(seq), q)]

    def join_partitions(self, partitions: list[Any]) -> Any:
        """Rebuild one sequence from the blocks, in order.

        NumPy arrays are concatenated into one array; strings are joined into
        one string; anything else becomes one list. A block that is not a
        sequence (a ``flatten``-ed single element) counts as one item.
        """
        if not partitions:
            return []
        if any(_is_array(p) for p in partitions):
            return _join_arrays(partitions)
        if all(isinstance(p, str) for p in partitions):
            return "".join(partitions)
        out: list[Any] = []
        for p in partitions:
            if isinstance(p, (list, tuple, range)):
                out.extend(p)
            else:
                out.append(p)
        return out


#: A joined array of at least this many bytes is written into a pooled
#: buffer (see :func:`_join_arrays`).
POOLED_JOIN_BYTES = 1 << 20


def _join_arrays(partitions: list[Any]) -> Any:
    np = _numpy()
    ndim = max(np.ndim(p) for p in partitions)
    blocks = []
    for p in partitions:
        a = np.asarray(p)
        # A flattened block (one element bound by itself) has lost a dimension.
        if a.ndim < ndim:
            a = np.expand_dims(a, 0)
        blocks.append(a)
    out = _pooled_result(np, blocks)
    if out is None:
        return np.concatenate(blocks)
    return np.concatenate(blocks, out=out)


def _pooled_result(np: Any, blocks: list[Any]) -> Any:
    """An uninitialised array for the concatenation of ``blocks``, on a
    buffer of :data:`kernel.bufferpool.POOL` (None when small, or when the
    blocks do not line up: ``np.concatenate`` then allocates, or explains).

    A large result is otherwise fresh memory, which costs more to fault in
    and zero than to fill; a pooled buffer that the previous result left
    (once nothing refers to it) is filled again instead. The caller owns the
    array as any other: the pool only reuses the buffer once the array and
    every view of it are gone.
    """
    from kernel.bufferpool import POOL

    first = blocks[0]
    if first.ndim == 0 or any(b.shape[1:] != first.shape[1:] for b in blocks):
        return None
    dtype = np.result_type(*blocks)
    if dtype.hasobject:
        return None
    shape = (sum(len(b) for b in blocks), *first.shape[1:])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < POOLED_JOIN_BYTES:
        return None
    buf = POOL.take(bytearray, nbytes)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def as_sliceable(seq: Any) -> Any:
    """``seq`` itself if it supports ``len`` and slicing, else a list of it."""
    if isinstance(seq, (list, tuple, range, str, bytes)) or _is_array(seq):
        if _is_array(seq) and seq.ndim == 0:
            raise TypeError("cannot partition a 0-dimensional array: pass a sequence or an array")
        return seq
    if isinstance(seq, Sequence):
        return seq
    try:
        return list(seq)
    except TypeError:
        raise TypeError(
            f"cannot partition an object of type {type(seq).__name__}: "
            "pass a list, tuple, range, string, NumPy array or other iterable"
        ) from None


#: Distributions by name.
DISTRIBUTIONS = {"b": BlockDistribution()}


def distribution(dist: str) -> BlockDistribution:
    """The distribution named ``dist``.

    :raises ValueError: for an unknown name, listing the known ones.
    """
    try:
        return DISTRIBUTIONS[dist]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in DISTRIBUTIONS)
        raise ValueError(
            f"unknown distribution {dist!r}: use one of {known} ('b' splits into blocks)"
        ) from None


def partition(seq: Sequence, q: int, dist: str = "b") -> list[Sequence]:
    """Split ``seq`` into ``q`` blocks with the distribution ``dist``."""
    return distribution(dist).partition(seq, q)


def join(partitions: list[Any], dist: str = "b") -> Any:
    """Join blocks made by :func:`partition` back into one sequence."""
    return distribution(dist).join_partitions(partitions)
