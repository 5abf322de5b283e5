"""Text that every transport can carry.

Foolscap, PB and the native transport send ``str`` as UTF-8, and a lone
surrogate (``'\\udc80'``, what ``surrogateescape`` makes of an undecodable
byte, e.g. in a file name from ``os.listdir``) has no UTF-8 form. Foolscap
finds out while streaming a message and drops the whole connection, taking
every call in flight with it. So text is made safe where it is produced:

- :func:`safe_text` for what an engine produces (captured output, exception
  messages and tracebacks): lone surrogates become backslash escapes, so the
  text arrives readable and nothing else on the connection is lost;
- :func:`check_sendable` for what a client sends (code, names, plain data):
  refused before it is sent, with an error naming the offending text.
"""

from __future__ import annotations

from typing import Any

__all__ = ["safe_text", "check_sendable", "MAX_DEPTH"]

#: How deep :func:`check_sendable` looks into nested plain data.
MAX_DEPTH = 64


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by its backslash escape
    (``'\\udc80'`` becomes the six characters ``\\udc80``); other text is
    returned unchanged (the same object)."""
    if not isinstance(text, str) or _encodable(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_sendable(value: Any, what: str) -> None:
    """Refuse plain data holding text that cannot be sent as UTF-8.

    Looks into str, list, tuple, set and dict (keys and values) down to
    :data:`MAX_DEPTH` levels; anything else (Serialized blobs, bytes,
    numbers) is left to the transport.

    :param value: what is about to be sent.
    :param what: the call it is sent in, for the message (``'execute'``).
    :raises ValueError: naming the call and the text, and how to fix it.
    """
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not _encodable(v):
                raise ValueError(
                    f"{what}: the text {v[:80]!r} contains a lone surrogate, which cannot "
                    "be sent (it has no UTF-8 form). Remove it, or send the raw bytes "
                    "(e.g. text.encode('utf-8', 'surrogateescape')) inside a pushed value."
                )
        elif depth < MAX_DEPTH:
            if isinstance(v, dict):
                stack.extend((x, depth + 1) for x in v.keys())
                stack.extend((x, depth + 1) for x in v.values())
            elif isinstance(v, (list, tuple, set, frozenset)):
                stack.extend((x, depth + 1) for x in v)
