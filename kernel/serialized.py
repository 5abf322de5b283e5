"""Turning Python objects into opaque blobs and back.

One scheme for everything: cloudpickle (so functions, closures, lambdas and
classes defined in ``__main__`` travel by value) at pickle protocol 5, with
large buffers (NumPy arrays, ``bytes``/``bytearray`` wrapped in
:class:`pickle.PickleBuffer`) kept *out of band*: they are not copied into the
pickle stream but carried beside it as separate frames, so a transport can
write them to a socket without copying.

A :class:`Serialized` is what travels between client and engine. The
controller routes it and never calls :func:`deserialize` on it.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import struct
import types
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

from kernel.error import SerializationError

PROTOCOL = 5

#: Buffers smaller than this stay inside the pickle stream: for small data a
#: separate frame costs more than the copy it saves.
OUT_OF_BAND_THRESHOLD = 64 * 1024

BufferLike = bytes | bytearray | memoryview


class Serialized:
    """An opaque serialized object: a pickle stream plus out-of-band buffers.

    :ivar data: the pickle stream (bytes).
    :ivar buffers: tuple of buffer-like objects the stream refers to.
    """

    __slots__ = ("data", "buffers")

    def __init__(self, data: bytes, buffers: Sequence[BufferLike] = ()):
        self.data = data
        self.buffers = tuple(buffers)

    @property
    def nbytes(self) -> int:
        """Total size in bytes of the stream and its buffers."""
        return len(self.data) + sum(memoryview(b).nbytes for b in self.buffers)

    def frames(self) -> list[BufferLike]:
        """The stream followed by each buffer: what a transport writes."""
        return [self.data, *self.buffers]

    @classmethod
    def from_frames(cls, frames: Iterable[BufferLike]) -> Serialized:
        """Inverse of :meth:`frames`."""
        frames = list(frames)
        if not frames:
            raise SerializationError("a serialized object needs at least one frame")
        return cls(bytes(frames[0]), frames[1:])

    def to_bytes(self) -> bytes:
        """One contiguous blob (for transports that carry only bytes).

        Layout: a count ``n`` then ``n`` lengths (unsigned 64-bit, big-endian),
        then the frames back to back.
        """
        frames = self.frames()
        sizes = [memoryview(f).nbytes for f in frames]
        header = struct.pack(f">Q{len(sizes)}Q", len(sizes), *sizes)
        return b"".join([header, *frames])

    @classmethod
    def from_bytes(cls, blob: BufferLike) -> Serialized:
        """Inverse of :meth:`to_bytes`; buffers are zero-copy views of ``blob``."""
        view = memoryview(blob)
        try:
            (count,) = struct.unpack_from(">Q", view, 0)
            sizes = struct.unpack_from(f">{count}Q", view, 8)
        except struct.error as e:
            raise SerializationError(f"truncated serialized blob: {e}") from None
        offset = 8 + 8 * count
        frames = []
        for size in sizes:
            if offset + size > len(view):
                raise SerializationError("truncated serialized blob: a frame runs past the end")
            frames.append(view[offset : offset + size])
            offset += size
        return cls.from_frames(frames)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Serialized):
            return NotImplemented
        return self.data == other.data and [bytes(b) for b in self.buffers] == [
            bytes(b) for b in other.buffers
        ]

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"<Serialized {self.nbytes} bytes, {len(self.buffers)} out-of-band buffers>"

    def __reduce__(self):
        # Pickling a Serialized (e.g. inside a task record) keeps it opaque.
        # A module-level function, not the bound classmethod: once
        # twisted.persisted.styles is imported (twisted.application does),
        # its copyreg hook for bound methods cannot pickle classmethods.
        return (_serialized_from_bytes, (self.to_bytes(),))


def _serialized_from_bytes(blob: bytes) -> Serialized:
    return Serialized.from_bytes(blob)


class _OutOfBandBytes:
    """Pickles a large ``bytes``/``bytearray`` with its payload out of band.

    The C pickler writes ``bytes`` itself before any hook can see them, so a
    large top-level value is wrapped in this before pickling.
    """

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray):
        self.value = value

    def __reduce_ex__(self, protocol: int):
        return type(self.value), (pickle.PickleBuffer(self.value),)


#: Types the standard pickler writes exactly as cloudpickle does (by value,
#: with no hooks involved).
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str})
#: Containers of plain scalars up to this length take the fast path too.
_PLAIN_ITEMS = 16


def _is_plain(obj: Any) -> bool:
    """Is ``obj`` a small value cloudpickle would add nothing to (a plain
    scalar, short bytes, or a short tuple/list/dict of plain scalars)?"""
    t = type(obj)
    if t in _PLAIN_SCALARS:
        return True
    if t is bytes or t is bytearray:
        return len(obj) < OUT_OF_BAND_THRESHOLD
    if t is tuple or t is list:
        return len(obj) <= _PLAIN_ITEMS and all(type(x) in _PLAIN_SCALARS for x in obj)
    if t is dict:
        return len(obj) <= _PLAIN_ITEMS and all(
            type(k) in _PLAIN_SCALARS and type(v) in _PLAIN_SCALARS for k, v in obj.items()
        )
    return False


try:
    from cloudpickle.cloudpickle import _should_pickle_by_reference
except ImportError:  # pragma: no cover - another cloudpickle: always by value

    def _should_pickle_by_reference(obj: Any) -> bool:
        return False


#: How deep :func:`_standard_picklable` looks into containers and instances.
_REFERENCE_DEPTH = 4
#: Classes whose instances pickle as (class, ``__dict__``) alike in both
#: picklers (see :func:`_plain_class`), and those that do not.
_plain_classes: dict[type, bool] = {}


def _plain_class(cls: type) -> bool:
    """Do instances of ``cls`` pickle as "the class by reference, then its
    ``__dict__``" with no hook of the class's own or of either pickler?"""
    known = _plain_classes.get(cls)
    if known is None:
        known = (
            type(cls) is type
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and cls.__getstate__ is object.__getstate__
            and not hasattr(cls, "__getnewargs_ex__")
            and not hasattr(cls, "__getnewargs__")
            and "__slots__" not in cls.__dict__
            and cls not in copyreg.dispatch_table
            and cls not in cloudpickle.Pickler.dispatch_table
            and _should_pickle_by_reference(cls)
        )
        if len(_plain_classes) < 1024:
            _plain_classes[cls] = known
    return known


def _standard_picklable(obj: Any, depth: int = _REFERENCE_DEPTH) -> bool:
    """Does the standard pickler write ``obj`` exactly as cloudpickle would?

    True for small plain values (:func:`_is_plain`'s), functions and classes
    cloudpickle pickles by reference (defined at the top level of an
    importable module other than ``__main__``, not registered to be pickled
    by value), builtin functions of modules, and short tuples, lists, dicts
    and plain instances (:func:`_plain_class`) of those, up to
    :data:`_REFERENCE_DEPTH` levels deep. A function call's task body (a
    module function and a few small arguments) is such an object.
    """
    t = type(obj)
    if t in _PLAIN_SCALARS:
        return True
    if t is bytes or t is bytearray:
        return len(obj) < OUT_OF_BAND_THRESHOLD
    if t is types.FunctionType or t is type:
        return _should_pickle_by_reference(obj)
    if t is types.BuiltinFunctionType:
        return isinstance(obj.__self__, types.ModuleType)
    if not depth:
        return False
    depth -= 1
    if t is tuple or t is list:
        return len(obj) <= _PLAIN_ITEMS and all(_standard_picklable(x, depth) for x in obj)
    if t is dict:
        return len(obj) <= _PLAIN_ITEMS and all(
            type(k) in _PLAIN_SCALARS and _standard_picklable(v, depth) for k, v in obj.items()
        )
    if _plain_class(t):
        state = obj.__dict__
        return len(state) <= _PLAIN_ITEMS and all(
            type(k) is str and _standard_picklable(v, depth) for k, v in state.items()
        )
    return False


def serialize(obj: Any) -> Serialized:
    """Serialize ``obj``; large buffers are kept out of band.

    Small plain values (None, numbers, short text, short containers of
    them: see :func:`_is_plain`) and small objects made of those and of
    functions importable by reference (see :func:`_standard_picklable`:
    a call of a module's function) are pickled by the standard pickler,
    which writes them exactly as cloudpickle would, several times faster
    (the result of almost every call and task, and most calls' bodies).

    :raises SerializationError: naming the object's type when it cannot be pickled.
    """
    if _is_plain(obj) or _standard_picklable(obj):
        return Serialized(pickle.dumps(obj, protocol=PROTOCOL), [])
    buffers: list[pickle.PickleBuffer] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= OUT_OF_BAND_THRESHOLD:
            buffers.append(buf)
            return False  # out of band
        return True  # small: serialize in band

    if type(obj) in (bytes, bytearray) and len(obj) >= OUT_OF_BAND_THRESHOLD:
        obj = _OutOfBandBytes(obj)
    stream = io.BytesIO()
    try:
        cloudpickle.Pickler(stream, protocol=PROTOCOL, buffer_callback=keep_large).dump(obj)
    except Exception as e:
        raise SerializationError(
            f"cannot serialize an object of type {type(obj).__name__}: {e}. "
            "Only picklable objects can be sent to engines."
        ) from e
    return Serialized(stream.getvalue(), [b.raw() for b in buffers])


def deserialize(s: Serialized) -> Any:
    """Rebuild the object from a :class:`Serialized`."""
    if not isinstance(s, Serialized):
        raise SerializationError(f"expected a Serialized, got {type(s).__name__}")
    return pickle.loads(s.data, buffers=s.buffers)


def deserialize_private(s: Serialized) -> Any:
    """Deserialize into an object that shares memory with nothing else.

    A blob made in this process borrows the memory of the object it came from
    (a client's array pushed to an in-process engine), and one received from a
    wire may hold read-only ``bytes``; either way its out-of-band buffers are
    copied into private, writable bytearrays first. Buffers that already are
    bytearrays (a receiver's own, preallocated) are used as they are.
    """
    if any(type(b) is not bytearray for b in s.buffers):
        s = Serialized(s.data, [b if type(b) is bytearray else bytearray(b) for b in s.buffers])
    return deserialize(s)


def dumps(obj: Any) -> bytes:
    """Serialize ``obj`` to one contiguous bytes blob."""
    return serialize(obj).to_bytes()


def loads(blob: BufferLike) -> Any:
    """Inverse of :func:`dumps`."""
    return deserialize(Serialized.from_bytes(blob))


def serialize_namespace(namespace: dict[str, Any]) -> dict[str, Serialized]:
    """Serialize each value of a ``name: object`` dict (keys must be str)."""
    if not isinstance(namespace, dict):
        raise TypeError(f"push takes a dict of name: value, got a {type(namespace).__name__}")
    out = {}
    for key, value in namespace.items():
        if not isinstance(key, str):
            raise TypeError(f"namespace keys must be str, got {key!r}")
        out[key] = serialize(value)
    return out


def deserialize_namespace(namespace: dict[str, Serialized]) -> dict[str, Any]:
    """Inverse of :func:`serialize_namespace`; every value is private
    (see :func:`deserialize_private`)."""
    return {key: deserialize_private(value) for key, value in namespace.items()}
