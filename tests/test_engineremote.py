"""The transport-independent engine halves (kernel.engineremote): they work with
any object that has ``callRemote``, and importing them (or the native engine
adapter built on them) loads no Foolscap."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, error
from zope.interface.verify import verifyObject

from kernel import engineremote
from kernel.controllerservice import ControllerService
from kernel.engineservice import EngineService
from kernel.error import EngineError
from kernel.interfaces import IEngineBase, IEngineInterrupt, IEngineTasks
from kernel.testing.processes import python_output


class DirectReference:
    """A 'remote' reference that calls the ``remote_*`` methods of a local
    object at once: the shared halves need nothing more from a transport."""

    def __init__(self, target):
        self.target = target
        self.disconnect_callbacks = []

    def callRemote(self, method, *args, **kwargs):  # noqa: N802 - the transport API
        return defer.maybeDeferred(getattr(self.target, f"remote_{method}"), *args, **kwargs)

    def notifyOnDisconnect(self, callback, *args):  # noqa: N802
        self.disconnect_callbacks.append((callback, args))

    def getPeer(self):  # noqa: N802
        return None


class BrokenReference:
    def callRemote(self, method, *args, **kwargs):  # noqa: N802
        return defer.fail(error.ConnectionLost("gone"))


def test_the_controller_side_engine_provides_the_engine_interfaces():
    remote = engineremote.EngineFromReference(DirectReference(None))
    assert verifyObject(IEngineBase, remote)
    assert verifyObject(IEngineInterrupt, remote)
    assert verifyObject(IEngineTasks, remote)


@pytest_twisted.ensureDeferred
async def test_an_engine_registered_through_plain_objects_runs_commands_and_moves_data():
    controller = ControllerService()
    registrar = engineremote.EngineRegistrar(controller)
    engine = EngineService()
    exposed = engineremote.EngineReferenceFromService(engine)
    engine_id = registrar.remote_register_engine(DirectReference(exposed), pid=123)
    assert registrar.connected_engines() == [engine_id]
    engine.id = engine_id  # (the engine's connector does this on registration)
    queued = controller.engines[engine_id]
    result = await queued.execute("x = 6 * 7")
    assert result["id"] == engine_id
    await queued.push({"y": [1, 2, 3]})
    assert await queued.pull(["x", "y"]) == [42, [1, 2, 3]]
    engine.kill()


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_fails_the_call_with_engine_error():
    remote = engineremote.EngineFromReference(BrokenReference())
    remote.id = 3
    try:
        await remote.execute("pass")
    except EngineError as e:
        assert "engine 3 disconnected" in str(e)
    else:
        raise AssertionError("a lost connection did not fail the call")


def test_importing_the_native_engine_adapter_loads_no_foolscap():
    code = (
        "import sys, kernel.engineremote, kernel.enginenative, kernel.tap; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'foolscap'))"
    )
    assert python_output(code).strip() == "[]"
