"""kernel.wiretext: text every transport can carry."""

import pytest

from kernel.capture import OutputSink
from kernel.error import engine_failure_info
from kernel.serialized import Serialized, serialize
from kernel.wiretext import check_sendable, safe_text


def test_safe_text_escapes_lone_surrogates_only():
    assert safe_text("a\udc80b") == "a\\udc80b"
    assert safe_text("a\udc80b").encode("utf-8") == b"a\\udc80b"
    text = "héllo ✓"
    assert safe_text(text) is text


def test_check_sendable_names_the_call_and_the_text():
    with pytest.raises(
        ValueError, match="execute: the text 'x\\\\udc80' contains a lone surrogate"
    ):
        check_sendable(("x\udc80", "all"), "execute")


@pytest.mark.parametrize(
    "value",
    [{"k\udc80": 1}, {"k": ["ok", ("\udc80",)]}, [{"a": {"b": {"\udc80"}}}]],
    ids=["dict-key", "nested-tuple", "set-in-dicts"],
)
def test_check_sendable_looks_into_plain_containers(value):
    with pytest.raises(ValueError, match="lone surrogate"):
        check_sendable(value, "push")


def test_check_sendable_accepts_good_text_and_leaves_blobs_alone():
    check_sendable(("é ✓", [1, 2.5, None, b"\xff"], {"k": serialize("\udc80")}), "push")
    assert isinstance(serialize("\udc80"), Serialized)


def test_captured_output_is_escaped_and_the_write_counts_what_was_written():
    seen = []
    sink = OutputSink(lambda name, text: seen.append((name, text)))
    assert sink.write("stdout", "f\udc80") == 2
    assert sink.stdout.getvalue() == "f\\udc80"
    assert seen == [("stdout", "f\\udc80")]
    with pytest.raises(TypeError, match="write\\(\\) argument must be str, not int"):
        sink.write("stdout", 5)


class _Mute(Exception):
    def __str__(self):
        raise RuntimeError("no words")


def test_failure_info_is_sendable_text_even_when_str_fails():
    info = engine_failure_info(ValueError("bad \udc80"))
    assert info.evalue == "bad \\udc80"
    info.traceback.encode("utf-8")
    mute = engine_failure_info(_Mute())
    assert mute.ename == "_Mute"
    assert mute.evalue == "<str() of this _Mute failed: RuntimeError: no words>"
