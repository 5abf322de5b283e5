"""Calling the far side of a client half, on any transport, without Foolscap.

:func:`call_remote` calls a method on a reference (a Foolscap
RemoteReference, a :class:`~kernel.nativeproto.NativeRemote`, a PB remote)
and opens the reply's envelope (:mod:`kernel.envelope`);
:func:`translate_transport_failure` turns the transport's own failures into
txkernel errors. Foolscap's failure types are consulted only when Foolscap is
loaded: without it, no failure can be one of them, and a native-only process
never imports it.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from kernel.envelope import unpackage
from kernel.error import ConnectionError, ProtocolError

__all__ = ["call_remote", "translate_transport_failure"]


def _foolscap_types() -> tuple[tuple[type, ...], tuple[type, ...], type | None]:
    """Foolscap's (lost-connection, schema-violation, copied-failure) types,
    or empty ones when Foolscap is not loaded."""
    if "foolscap" not in sys.modules:
        return (), (), None
    from foolscap.api import DeadReferenceError, Violation
    from foolscap.call import CopiedFailure

    return (DeadReferenceError,), (Violation,), CopiedFailure


def translate_transport_failure(f: Failure, method: str = "?") -> Failure:
    """Turn a transport's own failures into txkernel errors a user can act on.

    A lost connection becomes :class:`~kernel.error.ConnectionError`; a call
    refused by a Foolscap schema (a size limit, a wrong argument type), on
    either side, becomes :class:`~kernel.error.ProtocolError`; any other
    failure that Foolscap copied from the far side (its exception reduced to
    a type name and a string) becomes a ProtocolError carrying that text.
    Anything else passes through.

    :param f: the failure of a remote call.
    :param method: the remote method's name (for the message).
    :returns: the translated failure (or ``f``).
    """
    dead, violation, copied = _foolscap_types()
    if f.check(*dead, ConnectionLost, ConnectionDone):
        return Failure(
            ConnectionError(
                f"lost the connection to the controller during {method}: {f.value}. "
                "Is the controller still running? Reconnect with a new client."
            )
        )
    if copied is not None and isinstance(f, copied):
        if f.check(*violation):
            return Failure(
                ProtocolError(
                    f"the controller refused the call {method}: {f.value} "
                    "(see the size limits in kernel.fcutil)"
                )
            )
        return Failure(ProtocolError(f"the controller failed in {method}: {f.type}: {f.value}"))
    if violation and f.check(*violation):
        return Failure(
            ProtocolError(
                f"the call {method} was not sent: {f.value} (see the size limits in kernel.fcutil)"
            )
        )
    return f


def call_remote(reference: Any, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
    """Call ``method`` on a reference and open the reply's envelope.

    :returns: Deferred firing the value of the remote call.
    :raises: (errback) the remote failure rebuilt by
        :func:`~kernel.envelope.unpackage`, or a transport failure translated
        by :func:`translate_transport_failure`.
    """
    try:
        d = reference.callRemote(method, *args, **kwargs)
    except Exception:
        d = defer.fail()
    d.addErrback(translate_transport_failure, method)
    d.addCallback(unpackage)
    return d
