"""Engines over Foolscap: exposing an engine, registering it, and using it remotely.

The logic lives in :mod:`kernel.engineremote` (shared with the native
transport, which must not import Foolscap); this module gives it Foolscap's
``RemoteInterface`` schemas and makes its pieces ``Referenceable``.

The pieces, following the adapter split of the design (server half exposes a
core interface, client half implements the *same* interface remotely):

- :class:`FCEngineReferenceFromService` (runs in the engine process): a
  ``Referenceable`` exposing an :class:`~kernel.interfaces.IEngineBase`
  engine as :class:`RIEngine`. Data moves only as serialized blobs
  (``push_serialized``/``pull_serialized``); plain ``push``/``pull`` never
  cross the wire.
- :class:`EngineFromReference` (runs in the controller): implements
  ``IEngineBase``, ``IEngineInterrupt`` and ``IEngineTasks`` over the remote
  reference. Payloads stay :class:`~kernel.serialized.Serialized`, so the
  controller never unpickles user data; an engine's exception arrives as a
  :class:`~kernel.error.RemoteError` built from plain data; a lost connection
  fails the call with :class:`~kernel.error.EngineError`.
- :class:`FCEngineRegistrar` (controller, exposed as ``engine.furl``) and
  :class:`EngineConnector` (engine): the engine connects, registers (asking
  for its previous id on re-registration), and reconnects with exponential
  backoff when the controller goes away. The controller watches each engine
  with a :class:`~kernel.heartbeat.HeartMonitor` and unregisters it on
  connection loss or missed heartbeats.
- Streaming output: once something on the controller calls
  :meth:`FCEngineRegistrar.add_output_observer`, each engine is handed an
  :class:`FCOutputSink` and streams its stdout/stderr to it as written
  (coalesced every :data:`OUTPUT_DELAY` seconds).

Every remote method answers with an envelope of :mod:`kernel.envelope`,
``("ok", value)`` or ``("error", info)`` where ``info`` is
:meth:`RemoteError.to_dict` plain data: Foolscap's own failure transport would
lose the pickled exception and mix engine errors with transport errors.
"""

from __future__ import annotations

from foolscap.api import (
    Any as AnyConstraint,
)
from foolscap.api import (
    ChoiceOf,
    DeadReferenceError,
    DictOf,
    Referenceable,
    RemoteInterface,
    fireEventually,
)
from foolscap.constraint import ByteStringConstraint
from zope.interface import implementer

from kernel import engineremote
from kernel.engineremote import (  # noqa: F401 - OUTPUT_DELAY, is_refused_furl: re-exported
    OUTPUT_DELAY,
    EngineReferenceFromService,
    EngineRegistrar,
    OutputSink,
    is_refused_furl,
)
from kernel.fcutil import MAX_NAMES, Name, Source
from kernel.interfaces import IEngineBase, IEngineInterrupt, IEngineTasks

#: Largest serialized blob (one pushed value, one task body) accepted over
#: the wire. Large pushes (hundreds of MB) must work; a bound still stops a
#: confused peer from exhausting memory.
MAX_BLOB = 2**31 - 1

Blob = ByteStringConstraint(maxLength=MAX_BLOB)
# Name, Source and MAX_NAMES come from kernel.fcutil: engines take the same
# names and source text as the client interfaces.
# A name or a list of names. (Foolscap's ChoiceOf cannot hold a
# UnicodeConstraint, so this one is open; the engine checks the names.)
Names = AnyConstraint()
# Replies are plain data of any size (an envelope around results and blobs).
Reply = AnyConstraint()
BlobNamespace = DictOf(Name, Blob, maxKeys=MAX_NAMES)
OptionalInt = ChoiceOf(int, None)
PlainData = AnyConstraint()


class RIEngine(RemoteInterface):
    """An engine as the controller sees it over Foolscap.

    Every method returns an envelope: ``("ok", value)`` or ``("error", info)``.
    Serialized values travel as :meth:`Serialized.to_bytes` blobs.
    """

    __remote_name__ = "RIEngine.txkernel"

    def execute(lines=Source):
        return Reply

    def push_serialized(namespace=BlobNamespace):
        return Reply

    def pull_serialized(keys=Names):
        return Reply

    def get_result(i=OptionalInt):
        return Reply

    def reset():
        return Reply

    def keys():
        return Reply

    def kill():
        return Reply

    def interrupt():
        return Reply

    def set_properties(properties=PlainData):
        return Reply

    def get_properties(keys=Names):
        return Reply

    def del_properties(keys=Names):
        return Reply

    def has_properties(keys=Names):
        return Reply

    def clear_properties():
        return Reply

    def run_task(payload=Blob, clear_before=bool, clear_after=bool):
        return Reply

    def ping():
        return Reply

    def set_output_sink(sink=PlainData):
        """Stream the engine's stdout/stderr to ``sink`` (an :class:`RIOutputSink`)."""
        return Reply


class RIOutputSink(RemoteInterface):
    """Where an engine streams its output as it is written."""

    __remote_name__ = "RIOutputSink.txkernel"

    def write(chunks=PlainData):
        """``chunks``: a list of ``(stream_name, text)`` pairs, in order."""
        return None


class RIEngineRegistrar(RemoteInterface):
    """What a controller offers to engines (the object behind ``engine.furl``)."""

    __remote_name__ = "RIEngineRegistrar.txkernel"

    def register_engine(
        engine_reference=RIEngine,
        id=OptionalInt,
        pid=OptionalInt,
        properties=PlainData,
    ):
        """Register the engine; return its int id."""
        return int


# ---------------------------------------------------------------------------
# The shared halves as Foolscap objects
# ---------------------------------------------------------------------------


@implementer(RIEngine)
class FCEngineReferenceFromService(EngineReferenceFromService, Referenceable):
    """Expose an engine to a controller over Foolscap (engine process):
    :class:`kernel.engineremote.EngineReferenceFromService` as a
    ``Referenceable`` speaking :class:`RIEngine`.

    :param engine: the engine service.
    :param on_kill: called (with no arguments) after the engine has been
        killed remotely; an engine process uses it to stop its reactor.
    """


@implementer(IEngineBase, IEngineInterrupt, IEngineTasks)
class EngineFromReference(engineremote.EngineFromReference):
    """An engine in another process, used through its Foolscap reference
    (controller process): :class:`kernel.engineremote.EngineFromReference`
    over :class:`RIEngine`, where a ``DeadReferenceError`` also means the
    engine is gone.

    :param reference: the engine's ``RemoteReference`` (``RIEngine``).
    :param properties: the properties the engine advertised when it registered.
    """

    connection_lost = (DeadReferenceError, *engineremote.CONNECTION_LOST)

    def _after_output(self, result):
        # Foolscap hands inbound calls (the engine's streamed output) over an
        # eventual turn after they arrive, but replies at once: wait one turn
        # so output the engine wrote before replying is relayed first.
        return fireEventually(result)


@implementer(RIOutputSink)
class FCOutputSink(OutputSink, Referenceable):
    """Receives one engine's streamed output on the controller, over Foolscap
    (see :class:`kernel.engineremote.OutputSink`)."""


@implementer(RIEngineRegistrar)
class FCEngineRegistrar(EngineRegistrar, Referenceable):
    """The controller's registration desk for engines, behind ``engine.furl``:
    :class:`kernel.engineremote.EngineRegistrar` as a ``Referenceable``
    speaking :class:`RIEngineRegistrar` (same arguments).
    """

    engine_class = EngineFromReference
    sink_class = FCOutputSink


class EngineConnector(engineremote.EngineConnector):
    """Keep an engine registered with a controller over Foolscap: connects to
    the controller's ``engine.furl`` through ``tub`` (see
    :class:`kernel.engineremote.EngineConnector`, same arguments) and exposes
    the engine as :class:`FCEngineReferenceFromService`.
    """

    reference_class = FCEngineReferenceFromService
