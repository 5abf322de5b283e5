"""Reply envelopes: how every remote method of every transport answers.

A remote call answers ``("ok", value)`` or ``("error", failure_dict)``, because
a transport's own failure forwarding reduces an exception to a type name and a
string, and mixes the far side's errors with its own. The failure dict is
plain data: ``{"kind": "remote", **RemoteError.to_dict()}`` for one failure
(:func:`package_engine_failure`), or ``{"kind": "composite", "message": ...,
"elist": [...]}`` for a :class:`~kernel.error.CompositeError`.

Opening an envelope comes in two strengths:

- :func:`open_plain` (the controller, opening an engine's reply) raises the
  failure as plain data, a :class:`~kernel.error.RemoteError` or a
  CompositeError of them, so the controller never unpickles user data;
- :func:`unpackage` (a client) raises the original exception type, unpickled
  there, with the remote traceback attached.

No transport is imported here: the Foolscap, PB and native adapters share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

from kernel.error import (
    CompositeError,
    KernelError,
    ProtocolError,
    RemoteError,
    engine_failure_info,
)

__all__ = [
    "open_plain",
    "package_engine_failure",
    "package_failure",
    "package_success",
    "unpackage",
    "unpackage_failure",
]

_OK = "ok"
_ERROR = "error"


def package_success(value: Any) -> tuple[str, Any]:
    """The envelope of a successful call: ``("ok", value)``."""
    return (_OK, value)


def package_engine_failure(f: Failure | BaseException) -> tuple[str, dict[str, Any]]:
    """The envelope of a failed call as one :class:`~kernel.error.RemoteError`
    (:func:`kernel.error.engine_failure_info`; a RemoteError passes through
    unchanged, so an engine's exception is never unpickled on the way).

    :returns: ``("error", {"kind": "remote", ...})``.
    """
    return (_ERROR, {"kind": "remote", **engine_failure_info(f).to_dict()})


def package_failure(f: Failure | BaseException) -> tuple[str, dict[str, Any]]:
    """The envelope of a failed call, as plain data.

    A :class:`~kernel.error.CompositeError` keeps each engine's
    :class:`~kernel.error.RemoteError`; anything else is packaged by
    :func:`package_engine_failure`.

    :returns: ``("error", failure_dict)``.
    """
    exc = f.value if isinstance(f, Failure) else f
    if isinstance(exc, CompositeError):
        return (
            _ERROR,
            {
                "kind": "composite",
                "message": exc.message,
                "elist": [e.to_dict() for e in exc.elist],
            },
        )
    return package_engine_failure(f)


def _plain_failure(d: dict[str, Any]) -> BaseException:
    if d.get("kind") == "composite":
        elist = [RemoteError.from_dict(e) for e in d.get("elist", [])]
        return CompositeError(d.get("message", "remote failure"), elist)
    return RemoteError.from_dict(d)


def _open(
    r: Any,
    rebuild: Callable[[dict[str, Any]], BaseException],
    malformed: Callable[[Any], Exception],
) -> Any:
    if isinstance(r, tuple) and len(r) == 2:
        tag, body = r
        if tag == _OK:
            return body
        if tag == _ERROR and isinstance(body, dict):
            raise rebuild(body)
    raise malformed(r)


def open_plain(r: Any, malformed: Callable[[Any], Exception]) -> Any:
    """Open an envelope without unpickling anything.

    :param malformed: builds the exception raised for a reply that is not an
        envelope (called with the reply).
    :returns: the value of a success.
    :raises: a :class:`~kernel.error.RemoteError` (or a
        :class:`~kernel.error.CompositeError` of them) for a failure.
    """
    return _open(r, _plain_failure, malformed)


def unpackage_failure(d: dict[str, Any]) -> BaseException:
    """Rebuild the exception a failure dict describes.

    :returns: a :class:`~kernel.error.CompositeError` of RemoteErrors, or the
        original exception (its type unpickled here, the remote traceback
        attached and added as a note), or a RemoteError if the original type
        cannot be rebuilt in this process.
    """
    if not isinstance(d, dict):
        return ProtocolError(f"malformed failure from the controller: {d!r}")
    exc = _plain_failure(d)
    if isinstance(exc, RemoteError):
        original = exc.original()
        if original is not exc:
            _add_remote_traceback_note(original, exc)
        return original
    return exc


def _add_remote_traceback_note(exc: BaseException, remote: RemoteError) -> None:
    """Show the remote traceback of a user's exception when it is printed."""
    if isinstance(exc, KernelError) or not remote.traceback or not hasattr(exc, "add_note"):
        return
    where = "an engine" if remote.engine_id is None else f"engine {remote.engine_id}"
    try:
        exc.add_note(f"Remote traceback (from {where}):\n{remote.traceback.rstrip()}")
    except Exception:  # pragma: no cover - exotic exception types
        pass


def _unexpected_reply(r: Any) -> ProtocolError:
    return ProtocolError(
        f"unexpected reply from the controller: {r!r:.200}; are the client and "
        "controller running the same txkernel version?"
    )


def unpackage(r: Any) -> Any:
    """Open an envelope made by :func:`package_success`/:func:`package_failure`
    (a client opening the controller's reply).

    :returns: the value of a success.
    :raises: the rebuilt exception of a failure (:func:`unpackage_failure`);
        :class:`~kernel.error.ProtocolError` for anything else (including a
        failure that is not a dict).
    """
    return _open(r, unpackage_failure, _unexpected_reply)
