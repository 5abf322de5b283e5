"""What the Foolscap adapters share: wire forms, size limits, failure packaging.

Three things cross the wire between a Foolscap client half and a server half:

- **Serialized blobs** travel as a Foolscap *copyable* (``txkernel.Serialized``)
  whose state is the list of frames (the pickle stream, then the out-of-band
  buffers). The receiving side rebuilds a :class:`~kernel.serialized.Serialized`
  from the frames without opening it, so the controller routes user data it
  never unpickles. Frame sizes and counts are limited by the copyable's state
  schema, which Foolscap enforces token by token as the bytes arrive.
- **Plain data** (ids, names, result dicts, properties) travels as Foolscap's
  own lists, tuples, dicts, strings and numbers.
- **Outcomes**: every remote method answers with an envelope,
  ``("ok", value)`` or ``("error", failure_dict)``
  (:mod:`kernel.envelope`, shared by every transport and re-exported here),
  because a Foolscap failure reaches the caller only as a type *name* and a
  string. The failure dict is plain data
  (:meth:`kernel.error.RemoteError.to_dict`, or a composite of them);
  :func:`unpackage` turns it back into the original exception type with the
  remote traceback attached.

Size limits
-----------
Foolscap has no default limits. Byte strings are limited per frame
(:data:`MAX_FRAME_BYTES`, so a 100 MB push fits with room to spare), frame
counts per blob (:data:`MAX_FRAMES`), names per call (:data:`MAX_NAMES`),
source code per ``execute`` (:data:`MAX_SOURCE_CHARS`). Arguments whose type
varies (``targets`` is an int, a list or ``'all'``; ``keys`` a str or a list)
use Foolscap's ``Any`` constraint: Foolscap 24 cannot taste a choice between a
string and a container, so the core validates those (and raises the
documented errors) instead.
"""

from __future__ import annotations

from typing import Any as AnyType

from foolscap.api import (
    Any,
    DictOf,
    ListOf,
    registerCopier,
    registerRemoteCopyFactory,
)
from foolscap.constraint import ByteStringConstraint
from foolscap.copyable import AttributeDictConstraint
from foolscap.schema import BooleanConstraint, UnicodeConstraint

from kernel.envelope import package_failure, package_success, unpackage, unpackage_failure
from kernel.error import ProtocolError
from kernel.remotecall import call_remote, translate_transport_failure
from kernel.serialized import Serialized

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_FRAMES",
    "MAX_NAMES",
    "MAX_NAME_CHARS",
    "MAX_SOURCE_CHARS",
    "SERIALIZED_TYPE",
    "Anything",
    "Flag",
    "Name",
    "NameList",
    "SerializedNamespace",
    "Source",
    "Text",
    "package_failure",
    "package_success",
    "unpackage",
    "unpackage_failure",
    "call_remote",
    "translate_transport_failure",
]

#: Largest single frame (pickle stream or out-of-band buffer) accepted, in bytes.
MAX_FRAME_BYTES = 2**31
#: Most frames in one Serialized blob (the stream plus out-of-band buffers).
MAX_FRAMES = 10_000
#: Most names in one push/pull.
MAX_NAMES = 100_000
#: Longest variable name.
MAX_NAME_CHARS = 1_000
#: Longest source text for one ``execute``.
MAX_SOURCE_CHARS = 64 * 2**20

#: The Foolscap copyable type name of a Serialized blob.
SERIALIZED_TYPE = "txkernel.Serialized.v1"

# -- constraints used by the RemoteInterfaces ---------------------------------

#: Any value; used for plain data whose type varies (``targets``, ``keys``) and
#: for replies (envelopes of plain data and Serialized blobs).
Anything = Any()


# Foolscap's own text and bool constraints treat a token of another type (an
# int where text belongs) as a broken protocol and drop the connection, with
# every call on it. These refuse just that call, with a Violation.
class _LenientText(UnicodeConstraint):
    strictTaster = False


class _LenientBool(BooleanConstraint):
    strictTaster = False


#: A variable name.
Name = _LenientText(maxLength=MAX_NAME_CHARS)
#: A list of variable names.
NameList = ListOf(Name, maxLength=MAX_NAMES)
#: Python source text.
Source = _LenientText(maxLength=MAX_SOURCE_CHARS)
#: Text an engine wrote (one streamed piece of stdout or stderr).
Text = _LenientText(maxLength=MAX_SOURCE_CHARS)
#: A flag (``block``, ``controller``, ``verbose``).
Flag = _LenientBool()

_Frames = ListOf(ByteStringConstraint(maxLength=MAX_FRAME_BYTES), maxLength=MAX_FRAMES)

#: ``{name: Serialized}``. The values are checked by the copyable's own state
#: schema as they arrive, so the value constraint itself is ``Any``.
SerializedNamespace = DictOf(Name, Anything, maxKeys=MAX_NAMES)


# -- Serialized as a Foolscap copyable ----------------------------------------


def _copy_serialized(s: Serialized) -> tuple[str, dict[str, AnyType]]:
    # Foolscap sends bytes only: buffers that are views are copied once here.
    frames = [f if type(f) is bytes else bytes(f) for f in s.frames()]
    return SERIALIZED_TYPE, {"frames": frames}


def _build_serialized(state: dict[str, AnyType]) -> Serialized:
    frames = state.get("frames")
    if not isinstance(frames, list) or not frames:
        raise ProtocolError("a Serialized blob arrived without frames")
    return Serialized.from_frames(frames)


_registered = False


def register_serialized_copyable() -> None:
    """Teach Foolscap to send and receive :class:`Serialized` (idempotent).

    Called when this module is imported; the state schema bounds what a peer
    may send (:data:`MAX_FRAMES` frames of at most :data:`MAX_FRAME_BYTES`).
    """
    global _registered
    if _registered:
        return
    registerCopier(Serialized, _copy_serialized)
    registerRemoteCopyFactory(
        SERIALIZED_TYPE,
        _build_serialized,
        stateSchema=AttributeDictConstraint(("frames", _Frames)),
        cyclic=False,
    )
    _registered = True


register_serialized_copyable()
