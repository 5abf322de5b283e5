"""twistd plugins: ``twistd -n txkernel-controller`` and ``twistd -n txkernel-engine``.

Twisted's ``tap.py`` pattern: option classes and ``makeService`` functions,
referenced lazily by ``twisted/plugins/txkernel_plugins.py`` as
``kernel.tap.controller`` and ``kernel.tap.engine``.

The controller process runs the core services (ControllerService, MultiEngine,
TaskController), a heartbeat monitor and the listeners of one adapter. With no
``--adapter`` it serves the native transport when it listens on loopback (the
default interface), one port described by ``native.json``, and Foolscap on any
other interface: two Tubs, one for engines (``engine.furl``) and one for
clients (``multiengine.furl``, ``task.furl``), whose certificates and ports are
kept in the cluster directory, so a restarted controller has the same FURLs
and its engines find it again by themselves. The native transport off
loopback needs ``--tls``.

The engine process runs an :class:`~kernel.engineservice.EngineService` and a
connector (:mod:`kernel.engineremote`) that keeps it registered with the
controller, over the adapter whose connection files the cluster directory
holds unless ``--adapter`` names one.
"""

from __future__ import annotations

import os
import socket
import threading
import types
from typing import Any

from twisted.application import service
from twisted.python import log, usage

from kernel import clusterdir
from kernel.clusterdir import ClusterDir

#: ``--pipeline``'s default: :data:`kernel.taskcontroller.DEFAULT_PIPELINE`
#: (not imported here, to keep option parsing light; a test keeps them equal).
DEFAULT_PIPELINE = 2
#: ``--short-pipeline``'s default: :data:`kernel.taskcontroller.DEFAULT_SHORT_PIPELINE`
#: (likewise).
DEFAULT_SHORT_PIPELINE = 16

#: The native transport's connection file (see :mod:`kernel.nativeproto`).
NATIVE_FILE = clusterdir.NATIVE_FILE

#: Load-balancing schemes the task controller understands.
SCHEMES = ("lru", "plainrandom", "twobin", "weighted", "leastload")
ADAPTERS = ("fc", "pb", "native")


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(port)
    return port


def _positive(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise ValueError(x)
    return x


class ControllerOptions(usage.Options):
    """Options of ``twistd txkernel-controller``."""

    synopsis = "[options]"
    longdesc = (
        "Run a txkernel controller: engines and clients find it through the "
        "connection files it writes in the cluster directory (native.json for "
        "the native transport, the default on loopback; engine.furl, "
        "multiengine.furl and task.furl for Foolscap, the default on other "
        "interfaces; pb.json for PB)."
    )
    optParameters = [
        [
            "cluster-dir",
            "d",
            None,
            "Cluster directory [default: $TXKERNEL_CLUSTER_DIR or ~/.txkernel/default].",
        ],
        ["interface", "i", "127.0.0.1", "Interface to listen on (loopback by default)."],
        [
            "engine-port",
            None,
            0,
            "Port for engines (0: the port of the last run, else a free one).",
            _port,
        ],
        [
            "client-port",
            None,
            0,
            "Port for clients (0: the port of the last run, else a free one).",
            _port,
        ],
        [
            "adapter",
            "a",
            None,
            "Transport: native (signed frames, see kernel.nativeproto), fc "
            "(Foolscap) or pb (Perspective Broker) [default: native on a loopback "
            "interface or with --tls, else fc].",
        ],
        ["heartbeat", None, 3.0, "Seconds between engine heartbeats.", _positive],
        ["max-missed", None, 3, "Heartbeats an engine may miss before it is declared dead.", int],
        ["scheme", None, "leastload", "Task scheduling scheme: " + ", ".join(SCHEMES) + "."],
        [
            "hwm",
            None,
            None,
            "Most tasks outstanding on one engine (0: no limit; default: the --pipeline depth).",
            int,
        ],
        [
            "pipeline",
            None,
            DEFAULT_PIPELINE,
            "Most tasks sent to one engine at once: they wait in the engine's task queue, "
            "which multiengine commands overtake, so an engine starts its next task without "
            "a round trip to the controller. 1: send the next only when one finishes.",
            int,
        ],
        [
            "short-pipeline",
            None,
            DEFAULT_SHORT_PIPELINE,
            "Most tasks sent to one engine at once while its tasks are short (under 2 ms): "
            "it then never waits for the controller between them. Never fewer than "
            "--pipeline; unused with --pipeline 1.",
            int,
        ],
        ["task-db", None, "sqlite", "Task database: sqlite (in the cluster directory) or memory."],
    ]
    optFlags = [
        [
            "tls",
            None,
            "TLS on the native port (certificate pinned in native.json); needed "
            "to serve the native transport off loopback. Foolscap and PB always "
            "use TLS.",
        ],
    ]

    def postOptions(self) -> None:
        if self["adapter"] is None:
            self["adapter"] = clusterdir.default_adapter(self["interface"], bool(self["tls"]))
        if self["adapter"] not in ADAPTERS:
            raise usage.UsageError(
                f"unknown adapter {self['adapter']!r}: use --adapter native, fc or pb"
            )
        if self["scheme"] not in SCHEMES:
            raise usage.UsageError(
                f"unknown scheme {self['scheme']!r}: choose one of {', '.join(SCHEMES)}"
            )
        if self["hwm"] is not None and self["hwm"] < 0:
            raise usage.UsageError(f"--hwm must be 0 (no limit) or positive, got {self['hwm']}")
        if self["pipeline"] < 1:
            raise usage.UsageError(f"--pipeline must be at least 1, got {self['pipeline']}")
        if self["short-pipeline"] < 1:
            raise usage.UsageError(
                f"--short-pipeline must be at least 1, got {self['short-pipeline']}"
            )
        if self["max-missed"] < 1:
            raise usage.UsageError(f"--max-missed must be at least 1, got {self['max-missed']}")
        if self["task-db"] not in ("sqlite", "memory"):
            raise usage.UsageError(
                f"unknown task database {self['task-db']!r}: use --task-db sqlite or memory"
            )
        if self["tls"] and self["adapter"] != "native":
            raise usage.UsageError(
                "--tls is for --adapter native: Foolscap and PB always use TLS; drop --tls"
            )
        if self["adapter"] == "native" and not self["tls"]:
            if not clusterdir.is_loopback(self["interface"]):
                raise usage.UsageError(
                    f"the native transport on {self['interface'] or 'every interface'} "
                    "would send your data unencrypted over the network: add --tls, or "
                    "leave out --adapter to serve Foolscap there"
                )
        ports = [p for p in (self["engine-port"], self["client-port"]) if p]
        if len(ports) == 2 and ports[0] == ports[1]:
            raise usage.UsageError("--engine-port and --client-port must differ")


class EngineOptions(usage.Options):
    """Options of ``twistd txkernel-engine``."""

    synopsis = "[options]"
    longdesc = "Run a txkernel engine that registers with the controller of a cluster."
    optParameters = [
        [
            "cluster-dir",
            "d",
            None,
            "Cluster directory holding the controller's connection files [default: "
            "$TXKERNEL_CLUSTER_DIR or ~/.txkernel/default].",
        ],
        ["furl-file", "f", None, "The controller's engine.furl (overrides --cluster-dir)."],
        [
            "adapter",
            "a",
            "auto",
            "How to reach the controller: native, fc, pb, or auto (the "
            "adapter whose connection files the cluster directory holds; "
            "waits for them if there are none yet).",
        ],
        ["max-delay", None, 5.0, "Longest wait between reconnection attempts, seconds.", _positive],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["properties"] = {}

    def opt_property(self, value: str) -> None:
        """An engine property, NAME=VALUE (VALUE read as JSON if it parses,
        else as a string); repeat for several."""
        import json

        name, sep, raw = value.partition("=")
        if not sep or not name:
            raise usage.UsageError(f"--property needs NAME=VALUE, got {value!r}")
        try:
            self["properties"][name] = json.loads(raw)
        except ValueError:
            self["properties"][name] = raw

    def postOptions(self) -> None:
        if self["adapter"] not in ("auto", *ADAPTERS):
            raise usage.UsageError(
                f"unknown adapter {self['adapter']!r}: use --adapter auto, native, fc or pb"
            )
        if self["furl-file"] and self["adapter"] in ("pb", "native"):
            raise usage.UsageError("--furl-file is for Foolscap: drop it or use --adapter fc")
        f = self["furl-file"]
        if f is not None and os.path.isdir(f):
            raise usage.UsageError(
                f"--furl-file {f} is a directory: give the engine.furl file, or use --cluster-dir"
            )


# ---------------------------------------------------------------------------
# Tubs
# ---------------------------------------------------------------------------


#: Seconds a stopping controller waits for its peers to close their
#: connections before it exits anyway.
STOP_GRACE = 2.0


def _bounded_stop(tub: Any) -> None:
    """Make ``tub.stopService`` give up waiting for peers after :data:`STOP_GRACE`.

    A Tub stops once every connection has closed cleanly, which a peer whose
    reactor is blocked never does: without a bound, one stalled client kept a
    SIGTERMed controller alive until it was killed.
    """
    from twisted.internet import defer, reactor

    stop = tub.stopService

    def stop_service() -> defer.Deferred:
        d = defer.maybeDeferred(stop)
        d.addTimeout(STOP_GRACE, reactor)
        d.addErrback(
            lambda f: (
                f.trap(defer.TimeoutError)
                and log.msg(f"peers did not close their connections in {STOP_GRACE} s; stopping")
            )
        )
        return d

    tub.stopService = stop_service


def make_tub(cd: ClusterDir, name: str, interface: str = "127.0.0.1", port: int = 0) -> Any:
    """A Foolscap Tub with a certificate kept in the cluster directory.

    :param name: the listener's name (``engine``, ``client``): its certificate
        is ``<name>.pem`` and its port is remembered in ``ports.json``.
    :param port: the port to listen on; 0 for the remembered one if it is
        still free, else a free one.
    :returns: the Tub (not yet started), listening on ``interface:port``.
    """
    from foolscap.api import Tub

    cert = cd.read_cert(name)
    tub = Tub(certData=cert)
    if cert is None:
        cd.write_cert(name, tub.getCertData())
    from kernel import ports

    reservation = ports.reserve(cd, name, interface, port)
    tub.listenOn(ports.PortEndpoint(reservation, keep_failure=True))
    host = socket.getfqdn() if interface in ("", "0.0.0.0") else interface
    tub.setLocation(f"{host}:{reservation.port}")
    tub.setOption("logLocalFailures", False)
    _bounded_stop(tub)
    return tub


def register_furl(tub: Any, ref: Any, cd: ClusterDir, filename: str) -> str:
    """Register ``ref`` on ``tub`` and write its FURL to ``filename``.

    The swissnum of an existing connection file from the same Tub is reused,
    so the FURL stays the same across controller restarts.
    """
    from foolscap.referenceable import SturdyRef

    name = None
    try:
        old = SturdyRef(cd.read_furl(filename))
        if old.tubID == tub.getTubID():
            name = old.name
    except Exception:
        name = None
    furl = tub.registerReference(ref, name=name)
    cd.write_furl(filename, furl)
    return furl


# ---------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------


class ListeningCheck(service.Service):
    """Fails the controller's start if a Tub could not listen on its port.

    (Foolscap only logs a listening failure; a controller that cannot be
    reached must not look ready.) Start it after the Tubs.
    """

    def __init__(self, *tubs: Any):
        self.tubs = tubs

    def startService(self) -> None:
        service.Service.startService(self)
        for tub in self.tubs:
            for listener in tub.getListeners():
                if getattr(listener, "_lp", True) is None:
                    failure = getattr(getattr(listener, "_ep", None), "failure", None)
                    why = "the port is taken"
                    if failure is not None and "in use" not in failure.getErrorMessage():
                        why = failure.getErrorMessage()
                    raise RuntimeError(
                        f"cannot listen at {', '.join(tub.locationHints)}: {why}. "
                        "Choose free ports with --engine-port and --client-port (0 for any), "
                        "and an address of this machine with --interface."
                    )


class PidFile(service.Service):
    """Writes ``<name>.pid`` in the cluster directory while running."""

    def __init__(self, cd: ClusterDir, name: str):
        self.cd = cd
        self.name = name

    def startService(self) -> None:
        service.Service.startService(self)
        self.cd.write_file(f"{self.name}.pid", f"{os.getpid()}\n")

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.cd.remove_file(f"{self.name}.pid")


class EngineList(service.Service):
    """Keeps ``engines.json`` (the registered engines) up to date while running.

    Used as the ``on_change`` observer of an
    :class:`~kernel.enginefc.FCEngineRegistrar`.
    """

    def __init__(self, cd: ClusterDir):
        self.cd = cd
        self.engines: dict[int, dict] = {}

    def startService(self) -> None:
        service.Service.startService(self)
        self._write()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.cd.remove_file(clusterdir.ENGINES_FILE)

    def engine_added(self, engine_id: int, info: dict) -> None:
        self.engines[engine_id] = info
        self._write()

    def engine_removed(self, engine_id: int) -> None:
        self.engines.pop(engine_id, None)
        self._write()

    def _write(self) -> None:
        if self.running:
            engines = {str(k): v for k, v in sorted(self.engines.items())}
            self.cd.write_json(
                clusterdir.ENGINES_FILE, {"controller_pid": os.getpid(), "engines": engines}
            )


class InThread(threading.Thread):
    """Calls ``function()`` in a thread of its own, started at once;
    :meth:`result` waits for it.

    A controller opens its task database this way: creating an SQLite
    database waits for the disk several times, and those waits overlap the
    rest of the controller's start (importing and building its services).

    :param function: what to call (with no arguments).
    """

    def __init__(self, function: Any):
        super().__init__(name="txkernel-start", daemon=True)
        self._function = function
        self._value: Any = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._function()
        except BaseException as e:
            self._error = e

    def result(self) -> Any:
        """Wait for the call to end.

        :returns: what ``function`` returned.
        :raises: what ``function`` raised.
        """
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def _open_task_db(options: Any, cd: ClusterDir) -> InThread | None:
    """Start opening the cluster directory's SQLite task database in a
    thread (:class:`InThread`, whose result is the database and its next
    free task id); None with ``--task-db memory``."""
    if options["task-db"] == "memory":
        return None
    from kernel.taskdb.sqlite import SQLiteDB  # (imported here, not in the thread)

    def open_db() -> tuple[Any, int]:
        db = SQLiteDB(cd.task_db_path)
        return db, db.next_taskid()  # after a restart: never reuse an id

    return InThread(open_db)


def _build_frontends(
    controller: Any, options: Any, cd: ClusterDir, task_db: InThread | None = None
) -> tuple[Any, Any]:
    """The MultiEngine and the TaskController over ``controller``; tasks are
    recorded in the cluster directory's SQLite database unless
    ``--task-db memory`` was given.

    :param task_db: the database being opened (:func:`_open_task_db`);
        None to open it here.
    """
    from kernel.multiengine import MultiEngine
    from kernel.taskcontroller import TaskController

    if task_db is None:
        task_db = _open_task_db(options, cd)
    db, first_taskid = (None, 0) if task_db is None else task_db.result()
    task_controller = TaskController(
        controller,
        scheme=options["scheme"],
        hwm=options["hwm"],
        db=db,
        first_taskid=first_taskid,
        pipeline=options["pipeline"],
        short_pipeline=options["short-pipeline"],
    )
    return MultiEngine(controller), task_controller


def _expose_clients(
    tub: Any, cd: ClusterDir, multiengine: Any, task_controller: Any, output: Any
) -> list[str]:
    """Register the client-facing Foolscap objects and write their FURL files.

    :param output: the engine registrar, whose streamed engine output is
        relayed to clients that subscribe to it.
    :returns: the names of the connection files written.
    """
    from kernel import multienginefc, taskfc

    register_furl(
        tub,
        multienginefc.make_client_referenceable(multiengine, output),
        cd,
        clusterdir.MULTIENGINE_FURL,
    )
    register_furl(
        tub, taskfc.FCTaskControllerFromTaskController(task_controller), cd, clusterdir.TASK_FURL
    )
    return [clusterdir.MULTIENGINE_FURL, clusterdir.TASK_FURL]


def _serve_pb(
    cd: ClusterDir, registrar: Any, multiengine: Any, task_controller: Any, options: Any
) -> service.MultiService:
    """The controller's Perspective Broker listeners (see :mod:`kernel.pbutil`)."""
    from kernel import pbutil

    return pbutil.serve_controller(
        cd,
        registrar,
        multiengine,
        task_controller,
        interface=options["interface"],
        engine_port=options["engine-port"],
        client_port=options["client-port"],
    )


def make_controller_service(options: ControllerOptions) -> service.MultiService:
    """Build the controller process's service tree (see the module docstring).

    With ``--adapter fc`` engines and clients connect over Foolscap
    (``engine.furl``, ``multiengine.furl``, ``task.furl``); with ``--adapter
    pb`` over Perspective Broker (``pb.json``, see :mod:`kernel.pbutil`); with
    ``--adapter native`` over the native framed protocol (``native.json``, see
    :mod:`kernel.nativeproto`).

    :raises usage.UsageError: the cluster directory is not private.
    """
    from kernel.error import SecurityError

    # Everything this process creates (task database, logs, ...) is private.
    os.umask(0o077)
    cd = ClusterDir(options["cluster-dir"])
    try:
        cd.create()
    except SecurityError as e:
        raise usage.UsageError(str(e))
    task_db = _open_task_db(options, cd)  # (first: it waits for the disk meanwhile)

    from kernel.controllerservice import ControllerService
    from kernel.heartbeat import HeartMonitor

    top = service.MultiService()
    controller = ControllerService()
    if service.IService.providedBy(controller):
        controller.setServiceParent(top)
    engine_list = EngineList(cd)

    monitor = HeartMonitor(options["heartbeat"], on_dead=None, max_missed=options["max-missed"])
    if options["adapter"] == "native":
        from kernel.enginenative import NativeEngineRegistrar as registrar_class
    else:
        from kernel.enginefc import FCEngineRegistrar as registrar_class
    registrar = registrar_class(controller, monitor, on_change=engine_list)
    monitor.setServiceParent(top)

    multiengine, task_controller = _build_frontends(controller, options, cd, task_db)
    for part in (multiengine, task_controller):
        if service.IService.providedBy(part):
            part.setServiceParent(top)

    # The connection files describe the running controller: drop the other
    # adapter's, so that engines and clients cannot pick up stale ones.
    interface = options["interface"]
    if options["adapter"] != "native":
        cd.remove_file(NATIVE_FILE)
    if options["adapter"] == "native":
        from kernel import nativeproto

        for name in (*clusterdir.FC_FILES, clusterdir.PB_FILE):
            cd.remove_file(name)
        nativeproto.serve_controller(
            cd,
            registrar,
            multiengine,
            task_controller,
            interface,
            options["client-port"],
            tls=bool(options["tls"]),
        ).setServiceParent(top)
    elif options["adapter"] == "pb":
        for name in clusterdir.FC_FILES:
            cd.remove_file(name)
        _serve_pb(cd, registrar, multiengine, task_controller, options).setServiceParent(top)
    else:
        cd.remove_file(clusterdir.PB_FILE)
        engine_tub = make_tub(cd, "engine", interface, options["engine-port"])
        engine_tub.setServiceParent(top)
        register_furl(engine_tub, registrar, cd, clusterdir.ENGINE_FURL)
        client_tub = make_tub(cd, "client", interface, options["client-port"])
        client_tub.setServiceParent(top)
        _expose_clients(client_tub, cd, multiengine, task_controller, registrar)
        ListeningCheck(engine_tub, client_tub).setServiceParent(top)

    engine_list.setServiceParent(top)
    PidFile(cd, "controller").setServiceParent(top)
    top.controller = controller
    top.multiengine = multiengine
    top.task_controller = task_controller
    top.registrar = registrar
    top.cluster_dir = cd
    return top


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


def _engine_adapter(options: EngineOptions, cd: ClusterDir) -> str | None:
    """The adapter an engine uses: as given (``fc`` with ``--furl-file``),
    else the one whose connection files the cluster directory holds, else
    None (no controller has written any yet)."""
    if options["furl-file"]:
        return "fc"
    if options["adapter"] != "auto":
        return options["adapter"]
    return cd.served_adapter()


def _make_connector(adapter: str, cd: ClusterDir, furl_name: str, engine: Any, **common: Any):
    """The service that keeps ``engine`` registered over ``adapter``; for
    Foolscap, with the Tub it connects from as its child."""
    if adapter == "native":
        from kernel import enginenative, nativeproto

        def get_info() -> dict:
            cd.check_adapter("native")
            return nativeproto.read_connection_info(cd)

        return enginenative.NativeEngineConnector(get_info, engine, **common)
    if adapter == "pb":
        from kernel import enginepb, pbutil

        def get_pb_info() -> dict:
            cd.check_adapter("pb")
            return pbutil.read_connection_info(cd)

        return enginepb.PBEngineConnector(get_pb_info, engine, **common)
    from foolscap.api import Tub

    from kernel.enginefc import EngineConnector

    tub = Tub()
    tub.setOption("logLocalFailures", False)

    def get_furl() -> str:
        cd.check_adapter("fc")
        return cd.read_furl(furl_name)

    connector = EngineConnector(tub, get_furl, engine, **common)
    connector.tub_service = tub
    return connector


class AdapterWatch(service.MultiService):
    """Waits for a controller's connection files, then starts the connector
    for the adapter they name (an engine started before its controller, with
    ``--adapter auto``), or for the adapter it was given.

    Looks every :data:`WATCH_POLL` seconds for :data:`WATCH_WINDOW` seconds,
    then every second; a look is a few ``stat`` calls.

    :param cd: the cluster directory.
    :param make_connector: ``make_connector(adapter)`` returns the connector service.
    :param clock: an ``IReactorTime`` (default: the reactor).
    :param adapter: connect over this adapter once any connection files are
        there (the connector reports a controller that serves another);
        None for the one they name.
    """

    def __init__(
        self, cd: ClusterDir, make_connector: Any, clock: Any = None, adapter: str | None = None
    ):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.cd = cd
        self.make_connector = make_connector
        self.clock = clock
        self.adapter = adapter
        self.connector: Any = None
        self._started_at = 0.0
        self._call: Any = None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._started_at = self.clock.seconds()
        log.msg(f"waiting for a controller's connection files in {self.cd.path}")
        self._look()

    def stopService(self) -> Any:  # noqa: N802
        if self._call is not None and self._call.active():
            self._call.cancel()
        return super().stopService()

    def _look(self) -> None:
        self._call = None
        if not self.running:
            return
        adapter = self.cd.served_adapter()
        if adapter is None:
            waited = self.clock.seconds() - self._started_at
            self._call = self.clock.callLater(
                WATCH_POLL if waited < WATCH_WINDOW else 1.0, self._look
            )
            return
        if self.adapter is None:
            log.msg(f"the controller serves {adapter}: connecting with it")
        else:
            log.msg(f"the controller's connection files are there: connecting with {self.adapter}")
            adapter = self.adapter
        self.connector = self.make_connector(adapter)
        tub = getattr(self.connector, "tub_service", None)
        if tub is not None:
            tub.setServiceParent(self)
        self.connector.setServiceParent(self)


#: How often an engine waiting for its controller's connection files looks,
#: seconds (an engine started with its controller connects this soon after
#: the controller listens).
WATCH_POLL = 0.005
#: For how long it looks that often, seconds.
WATCH_WINDOW = 10.0


def make_engine_service(options: EngineOptions) -> service.MultiService:
    """Build an engine process's service tree: an EngineService and the
    connector that keeps it registered with the controller (see
    :func:`_engine_adapter`; an :class:`AdapterWatch` until the controller's
    connection files exist, also when an adapter is given: an engine started
    with its controller connects as soon as they appear)."""
    from kernel.engineservice import EngineService

    if options["furl-file"]:
        furl_dir, furl_name = os.path.split(os.path.abspath(options["furl-file"]))
        cd = ClusterDir(furl_dir)
    else:
        cd = ClusterDir(options["cluster-dir"])
        furl_name = clusterdir.ENGINE_FURL

    from twisted.internet import reactor

    def stop():
        # (this may happen before the reactor runs: a refused FURL file)
        reactor.callWhenRunning(reactor.stop)

    def give_up(reason):
        log.msg(f"engine stopping: {reason.getErrorMessage()}")
        # exit non-zero once the reactor has shut down cleanly
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        stop()

    top = service.MultiService()
    engine = EngineService()
    # (JSON values are plain data, as properties must be)
    engine.properties.update(options["properties"])
    common = {"on_fatal": give_up, "on_kill": stop, "max_delay": options["max-delay"]}
    adapter = _engine_adapter(options, cd)

    def make_connector(adapter: str) -> Any:
        return _make_connector(adapter, cd, furl_name, engine, **common)

    if adapter is None or (not options["furl-file"] and cd.served_adapter() is None):
        # No controller has written its connection files yet (e.g. one
        # started together with this engine): wait for them.
        connector = AdapterWatch(cd, make_connector, adapter=adapter)
    else:
        connector = _make_connector(adapter, cd, furl_name, engine, **common)
        tub = getattr(connector, "tub_service", None)
        if tub is not None:
            tub.setServiceParent(top)
    connector.setServiceParent(top)
    if cd.exists() and not options["furl-file"]:
        PidFile(cd, f"engine-{os.getpid()}").setServiceParent(top)
    top.engine = engine
    top.connector = connector
    return top


#: What ``twisted/plugins/txkernel_plugins.py`` points twistd at.
controller = types.SimpleNamespace(Options=ControllerOptions, makeService=make_controller_service)
engine = types.SimpleNamespace(Options=EngineOptions, makeService=make_engine_service)
