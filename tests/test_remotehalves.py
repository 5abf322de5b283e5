"""The transport-independent multiengine and task halves
(:mod:`kernel.multiengineremote`, :mod:`kernel.taskremote`,
:mod:`kernel.remotecall`): interfaces, sessions, failure translation, and
that none of them imports Foolscap."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from kernel import multienginefc, multienginenative, taskfc, tasknative
from kernel.envelope import package_success
from kernel.error import ConnectionError, InvalidTaskID
from kernel.interfaces import (
    IBlockingClientAdaptor,
    IMultiEngine,
    IMultiEngineCoordinator,
    IMultiEngineExtras,
    ISynchronousMultiEngine,
    ITaskController,
)
from kernel.multiengineremote import (
    FullSynchronousMultiEngineClient,
    OutputReceiver,
    RemoteMultiEngine,
    SynchronousMultiEngineFromMultiEngine,
    make_client_referenceable,
)
from kernel.remotecall import call_remote, translate_transport_failure
from kernel.taskremote import TaskClient, TaskControllerFromTaskController
from kernel.testing.processes import python_output


def test_the_shared_halves_and_the_native_adapters_import_no_foolscap():
    code = (
        "import sys\n"
        "import kernel.multiengineremote, kernel.taskremote, kernel.remotecall\n"
        "import kernel.multienginenative, kernel.tasknative\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'foolscap'))\n"
    )
    assert python_output(code).strip() == "[]"


def test_multiengine_client_half_provides_the_multiengine_interfaces():
    client = FullSynchronousMultiEngineClient(remote_reference=None)
    verifyObject(ISynchronousMultiEngine, client)
    verifyObject(IMultiEngineCoordinator, client)
    verifyObject(IMultiEngineExtras, client)
    verifyObject(IBlockingClientAdaptor, client)
    core = RemoteMultiEngine(remote_reference=None)
    verifyObject(IMultiEngine, core)
    verifyObject(IMultiEngineCoordinator, core)
    verifyObject(IMultiEngineExtras, core)


def test_task_client_half_provides_itask_controller_and_blocking_adaptor():
    client = TaskClient(remote_reference=None)
    verifyObject(ITaskController, client)
    verifyObject(IBlockingClientAdaptor, client)


def test_the_remote_methods_are_those_of_the_foolscap_remote_interfaces():
    def remote(cls: type) -> list[str]:
        return sorted(n.removeprefix("remote_") for n in dir(cls) if n.startswith("remote_"))

    assert remote(SynchronousMultiEngineFromMultiEngine) == sorted(
        multienginefc.RIMultiEngine.names()
    )
    assert remote(OutputReceiver) == sorted(multienginefc.RIOutputObserver.names())
    assert remote(TaskControllerFromTaskController) == sorted(taskfc.IFCTaskController.names())


def test_the_foolscap_and_native_adapters_build_on_the_shared_halves():
    assert issubclass(
        multienginefc.FCSynchronousMultiEngineFromMultiEngine, SynchronousMultiEngineFromMultiEngine
    )
    assert issubclass(
        multienginefc.FCFullSynchronousMultiEngineClient, FullSynchronousMultiEngineClient
    )
    assert issubclass(taskfc.FCTaskClient, TaskClient)
    assert issubclass(taskfc.FCTaskControllerFromTaskController, TaskControllerFromTaskController)
    assert multienginenative.make_client_referenceable is make_client_referenceable
    assert tasknative.NativeTaskControllerFromTaskController is TaskControllerFromTaskController
    # what get_client_name answers is unchanged
    assert multienginefc.CLIENT_NAME == "kernel.multienginefc.FCFullSynchronousMultiEngineClient"
    assert taskfc.CLIENT_NAME == "kernel.taskfc.FCTaskClient"


def test_a_session_is_of_the_class_of_the_object_that_opened_it():
    plain = make_client_referenceable(multiengine=None)
    assert type(plain.remote_connect()) is SynchronousMultiEngineFromMultiEngine
    fc = multienginefc.make_client_referenceable(multiengine=None)
    assert type(fc.remote_connect()) is multienginefc.FCSynchronousMultiEngineFromMultiEngine


class _Registrar:
    def __init__(self) -> None:
        self.observers: list = []

    def add_output_observer(self, f) -> None:
        self.observers.append(f)

    def remove_output_observer(self, f) -> None:
        self.observers.remove(f)


class _Observer:
    """A reference to a client's receiver whose connection is gone."""

    class Gone(Exception):
        pass

    def __init__(self) -> None:
        self.calls = 0

    def callRemoteOnly(self, *args) -> None:  # noqa: N802 - the reference API
        self.calls += 1
        raise self.Gone()

    def notifyOnDisconnect(self, *args) -> None:  # noqa: N802 - the reference API
        pass


def test_output_to_an_observer_whose_connection_is_lost_stops_it():
    registrar = _Registrar()
    server = SynchronousMultiEngineFromMultiEngine(multiengine=None, output=registrar)
    server._lost = (_Observer.Gone,)
    observer = _Observer()
    assert server.remote_add_output_observer(observer) == package_success(True)
    registrar.observers[0](0, "stdout", "hi")
    assert observer.calls == 1
    assert registrar.observers == []


def test_a_server_half_without_output_says_it_cannot_stream():
    server = SynchronousMultiEngineFromMultiEngine(multiengine=None)
    assert server.remote_add_output_observer(_Observer()) == package_success(False)


def test_task_server_packages_successes_and_failures_for_the_client_half():
    server = TaskControllerFromTaskController(taskController=None)
    client = TaskClient(remote_reference=None)
    assert client.unpackage(server.packageSuccess(7)) == 7
    with pytest.raises(InvalidTaskID, match="no task 9"):
        client.unpackage(server.packageFailure(InvalidTaskID("no task 9")))


def test_a_lost_connection_becomes_a_connection_error_naming_the_call():
    f = translate_transport_failure(Failure(ConnectionLost("gone")), "keys")
    assert f.check(ConnectionError)
    assert "during keys" in str(f.value)


def test_other_failures_pass_through_untranslated():
    original = Failure(ValueError("x"))
    assert translate_transport_failure(original, "keys") is original


class _Reference:
    def __init__(self, reply) -> None:
        self.reply = reply

    def callRemote(self, method, *args, **kwargs):  # noqa: N802 - the reference API
        return self.reply


def test_call_remote_opens_the_envelope_of_the_reply():
    d = call_remote(_Reference(defer.succeed(package_success([1, 2]))), "keys")
    assert d.result == [1, 2]


def test_call_remote_translates_a_lost_connection():
    d = call_remote(_Reference(defer.fail(ConnectionLost("gone"))), "keys")
    failures: list = []
    d.addErrback(failures.append)
    assert failures[0].check(ConnectionError)
