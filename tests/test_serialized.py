"""Round trips through kernel.serialized, and what stays out of band."""

import pickle

import numpy as np
import pytest

from kernel import serialized
from kernel.error import SerializationError
from kernel.serialized import OUT_OF_BAND_THRESHOLD, Serialized


def roundtrip(obj):
    return serialized.deserialize(serialized.serialize(obj))


def test_closure_lambda_defaults_and_name_survive():
    scale = 3
    f = lambda x, y=2: scale * x + y  # noqa: E731
    g = roundtrip(f)
    assert g(1) == 5 and g(1, y=10) == 13
    assert g.__name__ == "<lambda>"


def test_nested_function_keeps_its_name_and_closure():
    def outer(n):
        def inner(x):
            return x**n

        return inner

    cube = roundtrip(outer(3))
    assert cube(2) == 8
    assert cube.__name__ == "inner"


def test_numpy_array_travels_out_of_band_without_copy_into_stream():
    a = np.arange(100_000, dtype="float64")
    s = serialized.serialize(a)
    assert len(s.buffers) == 1
    assert len(s.data) < 1024, "the array data must not be copied into the pickle stream"
    b = serialized.deserialize(s)
    assert b.dtype == a.dtype and np.array_equal(a, b)


def test_small_array_stays_in_band():
    s = serialized.serialize(np.arange(10))
    assert s.buffers == ()
    assert np.array_equal(serialized.deserialize(s), np.arange(10))


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_large_bytes_travel_out_of_band(kind):
    blob = kind(b"z" * (OUT_OF_BAND_THRESHOLD * 2))
    s = serialized.serialize(blob)
    assert len(s.buffers) == 1 and len(s.data) < 256
    back = serialized.deserialize(s)
    assert type(back) is kind and back == blob


def test_to_bytes_and_from_bytes_roundtrip_with_buffers():
    obj = {"a": np.ones(50_000), "b": [1, "two", None]}
    s = serialized.serialize(obj)
    blob = s.to_bytes()
    back = serialized.deserialize(Serialized.from_bytes(blob))
    assert np.array_equal(back["a"], obj["a"]) and back["b"] == obj["b"]
    assert Serialized.from_bytes(blob) == s


def test_truncated_blob_is_a_clear_error():
    blob = serialized.dumps(list(range(100)))
    with pytest.raises(SerializationError, match="truncated"):
        Serialized.from_bytes(blob[:-5])


def test_serialized_pickles_opaquely():
    s = serialized.serialize({"x": np.arange(70_000)})
    s2 = pickle.loads(pickle.dumps(s))
    assert s2 == s


def test_unpicklable_object_names_its_type():
    import threading

    with pytest.raises(SerializationError, match="lock"):
        serialized.serialize(threading.Lock())


def test_namespace_helpers_require_str_keys():
    ns = serialized.serialize_namespace({"a": 1, "b": [2]})
    assert serialized.deserialize_namespace(ns) == {"a": 1, "b": [2]}
    with pytest.raises(TypeError, match="str"):
        serialized.serialize_namespace({1: "x"})


@pytest.mark.parametrize(
    "value",
    [None, True, 42, 2.5, 1j, "text", b"abc", bytearray(b"xy"), (1, "a"), [None, 2.0], {"k": 1}],
)
def test_small_plain_values_pickle_exactly_as_cloudpickle_writes_them(value):
    """The standard pickler's fast path for small plain values writes the
    very bytes cloudpickle would, so nothing differs for the reader."""
    import io

    import cloudpickle

    assert serialized._is_plain(value)
    stream = io.BytesIO()
    cloudpickle.Pickler(stream, protocol=serialized.PROTOCOL).dump(value)
    blob = serialized.serialize(value)
    assert blob.data == stream.getvalue() and not blob.buffers
    assert serialized.deserialize(blob) == value


@pytest.mark.parametrize(
    "value",
    [lambda: 1, [lambda: 1], (1, [2]), list(range(17)), b"x" * (1 << 20), {"k": object}],
)
def test_anything_but_small_plain_values_is_left_to_cloudpickle(value):
    assert not serialized._is_plain(value)


class _PlainState:
    """A module-level class whose instances pickle as class + __dict__."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _OwnReduce(_PlainState):
    def __reduce__(self):
        return (_PlainState, ())


def _module_function(x):
    return x + 1


def _cloudpickled(value):
    import io

    import cloudpickle

    stream = io.BytesIO()
    cloudpickle.Pickler(stream, protocol=serialized.PROTOCOL).dump(value)
    return stream.getvalue()


@pytest.mark.parametrize(
    "value",
    [
        _module_function,
        len,
        pickle.dumps,
        _PlainState,
        _PlainState(f=_module_function, args=(1, "a"), kwargs={"k": None}, depend=None),
        (_module_function, [2.5, b"xy"], {"f": len}),
    ],
)
def test_objects_made_of_importable_functions_pickle_exactly_as_cloudpickle_writes_them(value):
    """Functions importable by reference (and small objects made of them and
    of plain values) take the standard pickler: the same bytes as cloudpickle's."""
    assert serialized._standard_picklable(value)
    blob = serialized.serialize(value)
    assert blob.data == _cloudpickled(value) and not blob.buffers


def test_a_call_body_of_a_module_function_is_pickled_by_reference_and_runs():
    from kernel.task import MapTaskBody

    body = MapTaskBody(_module_function, (41,), {})
    blob = serialized.serialize(body)
    assert serialized._standard_picklable(body)
    assert blob.data == _cloudpickled(body)
    assert serialized.deserialize(blob).run({}, {}) == 42


def _local_function():
    def inner():
        return 1

    return inner


@pytest.mark.parametrize(
    "value",
    [
        lambda: 1,
        _local_function(),
        _OwnReduce(),
        _PlainState(array=np.arange(3)),
        _PlainState(inner=_PlainState(inner=_PlainState(inner=_PlainState(inner=_PlainState())))),
        [_module_function] * 17,
        (_module_function, b"x" * OUT_OF_BAND_THRESHOLD),
        [].append,
    ],
)
def test_functions_pickled_by_value_and_objects_with_hooks_are_left_to_cloudpickle(value):
    assert not serialized._standard_picklable(value)


def test_a_function_of_main_is_pickled_by_value(monkeypatch):
    def f(x):
        return 2 * x

    f.__module__ = "__main__"
    f.__qualname__ = "f"
    monkeypatch.setattr(__import__("__main__"), "f", f, raising=False)
    assert not serialized._standard_picklable(f)
    assert roundtrip(f)(4) == 8


def test_a_module_registered_to_pickle_by_value_is_left_to_cloudpickle():
    import sys

    import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        assert not serialized._standard_picklable(_module_function)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert serialized._standard_picklable(_module_function)
