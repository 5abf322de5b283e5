"""twistd plugins and their options (kernel.tap, twisted/plugins/txkernel_plugins.py)."""

import os
import socket

import pytest
import pytest_twisted
from twisted.application import service
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from zope.interface.verify import verifyObject

from kernel import clusterdir, tap, taskcontroller
from kernel.clusterdir import ClusterDir
from kernel.testing.processes import python_output


def parse(options_class, *argv):
    o = options_class()
    o.parseOptions(list(argv))
    return o


def test_controller_defaults_listen_on_loopback():
    o = parse(tap.ControllerOptions)
    assert o["interface"] == "127.0.0.1"
    assert o["adapter"] == "native"  # the default on loopback
    assert o["heartbeat"] == 3.0
    assert o["scheme"] == "leastload"
    assert o["hwm"] is None
    # tasks sent ahead by default, as the task controller's own default
    assert o["pipeline"] == tap.DEFAULT_PIPELINE == taskcontroller.DEFAULT_PIPELINE > 1
    assert o["short-pipeline"] == tap.DEFAULT_SHORT_PIPELINE
    assert tap.DEFAULT_SHORT_PIPELINE == taskcontroller.DEFAULT_SHORT_PIPELINE


def test_pipeline_one_is_still_available():
    assert parse(tap.ControllerOptions, "--pipeline=1")["pipeline"] == 1


def test_controller_options_parse_values():
    o = parse(
        tap.ControllerOptions,
        "--cluster-dir=/x",
        "--engine-port=4000",
        "--client-port=4001",
        "--heartbeat=0.5",
        "--scheme=lru",
        "--hwm=3",
        "--pipeline=4",
        "--short-pipeline=6",
    )
    assert (o["cluster-dir"], o["engine-port"], o["client-port"]) == ("/x", 4000, 4001)
    assert (o["heartbeat"], o["scheme"], o["hwm"], o["pipeline"]) == (0.5, "lru", 3, 4)
    assert o["short-pipeline"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter=zmq"], "use --adapter native, fc or pb"),
        (["--scheme=fastest"], "choose one of lru"),
        (["--hwm=-1"], "--hwm must be 0"),
        (["--pipeline=0"], "--pipeline must be at least 1"),
        (["--short-pipeline=0"], "--short-pipeline must be at least 1"),
        (["--max-missed=0"], "--max-missed must be at least 1"),
        (["--task-db=mongo"], "use --task-db sqlite or memory"),
        (["--engine-port=5000", "--client-port=5000"], "must differ"),
    ],
)
def test_controller_option_errors_say_what_to_do(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        parse(tap.ControllerOptions, *argv)


@pytest.mark.parametrize(
    "argv", [["--engine-port=70000"], ["--heartbeat=0"], ["--heartbeat=-2"], ["--hwm=x"]]
)
def test_controller_rejects_bad_numbers(argv):
    with pytest.raises(usage.UsageError):
        parse(tap.ControllerOptions, *argv)


def test_engine_furl_file_must_not_be_a_directory(tmp_path):
    with pytest.raises(usage.UsageError, match="give the engine.furl file"):
        parse(tap.EngineOptions, f"--furl-file={tmp_path}")


def test_engine_options_parse():
    o = parse(tap.EngineOptions, "--cluster-dir=/c", "--max-delay=2")
    assert (o["cluster-dir"], o["max-delay"], o["furl-file"]) == ("/c", 2.0, None)


def test_plugins_are_discovered():
    from twisted import plugins

    makers = {m.tapname: m for m in getPlugins(IServiceMaker, plugins)}
    for name in ("txkernel-controller", "txkernel-engine"):
        assert name in makers
        verifyObject(IServiceMaker, makers[name])
    assert makers["txkernel-controller"].options is tap.ControllerOptions
    assert makers["txkernel-engine"].options is tap.EngineOptions


def test_plugin_file_is_lazy():
    """Importing the plugin module pulls in neither kernel.tap nor the reactor."""
    code = (
        "import sys; import twisted.plugins.txkernel_plugins; "
        "print('kernel.tap' in sys.modules, 'twisted.internet.reactor' in sys.modules)"
    )
    assert python_output(code).split() == ["False", "False"]


@pytest_twisted.ensureDeferred
async def test_make_tub_keeps_certificate_and_port(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    first = tap.make_tub(cd, "engine")
    port = cd.get_port("engine")
    first.startService()  # the first run listens, then ends
    await first.stopService()
    second = tap.make_tub(cd, "engine")
    assert first.getTubID() == second.getTubID()
    assert cd.get_port("engine") == port
    assert oct(os.stat(cd.cert_file("engine")).st_mode & 0o777) == "0o600"


def test_make_tub_moves_off_a_taken_port(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cd.set_port("engine", taken)
        tap.make_tub(cd, "engine")
        assert cd.get_port("engine") != taken


@pytest_twisted.ensureDeferred
async def test_register_furl_keeps_swissnum_for_same_tub(tmp_path):
    from foolscap.api import Referenceable

    cd = ClusterDir(tmp_path / "c").create()
    first = tap.make_tub(cd, "engine")
    furl = tap.register_furl(first, Referenceable(), cd, clusterdir.ENGINE_FURL)
    first.startService()  # the first run listens, then ends
    await first.stopService()
    again = tap.register_furl(
        tap.make_tub(cd, "engine"), Referenceable(), cd, clusterdir.ENGINE_FURL
    )
    assert again == furl
    assert cd.read_furl(clusterdir.ENGINE_FURL) == furl


def test_register_furl_new_swissnum_for_new_tub(tmp_path):
    from foolscap.api import Referenceable

    cd = ClusterDir(tmp_path / "c").create()
    furl = tap.register_furl(
        tap.make_tub(cd, "engine"), Referenceable(), cd, clusterdir.ENGINE_FURL
    )
    os.unlink(cd.cert_file("engine"))
    other = tap.register_furl(
        tap.make_tub(cd, "engine"), Referenceable(), cd, clusterdir.ENGINE_FURL
    )
    assert other.rsplit("/", 1)[1] != furl.rsplit("/", 1)[1]


def test_controller_service_refuses_loose_cluster_dir(tmp_path):
    path = tmp_path / "loose"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(usage.UsageError, match="chmod 700"):
        tap.make_controller_service(parse(tap.ControllerOptions, f"--cluster-dir={path}"))


@pytest.mark.parametrize(
    "argv, adapter",
    [
        ([], "native"),
        (["--interface=127.0.0.2"], "native"),
        (["--interface=localhost"], "native"),
        (["--interface=::1"], "native"),
        (["--interface=0.0.0.0"], "fc"),
        (["--interface="], "fc"),
        (["--interface=192.168.1.5"], "fc"),
        (["--interface=0.0.0.0", "--tls"], "native"),
        (["--interface=0.0.0.0", "--adapter=native", "--tls"], "native"),
        (["--adapter=fc"], "fc"),
        (["--adapter=pb"], "pb"),
    ],
)
def test_controller_adapter_defaults_to_native_on_loopback_and_foolscap_elsewhere(argv, adapter):
    assert parse(tap.ControllerOptions, *argv)["adapter"] == adapter


@pytest.mark.parametrize("interface", ["0.0.0.0", "", "10.1.2.3"])
def test_native_transport_off_loopback_needs_tls(interface):
    with pytest.raises(usage.UsageError, match="unencrypted over the network: add --tls"):
        parse(tap.ControllerOptions, f"--interface={interface}", "--adapter=native")


def test_default_controller_service_tree_serves_the_native_transport_only(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    top = tap.make_controller_service(parse(tap.ControllerOptions, f"--cluster-dir={cd.path}"))
    from kernel.enginenative import NativeEngineRegistrar

    assert isinstance(top.registrar, NativeEngineRegistrar)
    top.startService()
    try:
        assert cd.served_adapter() == "native"
        assert not any(
            os.path.exists(cd.file(n)) for n in (*clusterdir.FC_FILES, clusterdir.PB_FILE)
        )
    finally:
        top.stopService()


def test_the_controller_gives_its_task_controller_both_pipeline_depths(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    top = tap.make_controller_service(
        parse(
            tap.ControllerOptions,
            f"--cluster-dir={cd.path}",
            "--task-db=memory",
            "--pipeline=3",
            "--short-pipeline=5",
        )
    )
    assert (top.task_controller.pipeline, top.task_controller.short_pipeline) == (3, 5)


def test_controller_service_tree_writes_engine_furl(tmp_path):
    cd = tmp_path / "c"
    top = tap.make_controller_service(
        parse(tap.ControllerOptions, f"--cluster-dir={cd}", "--adapter=fc")
    )
    assert top.cluster_dir.read_furl(clusterdir.ENGINE_FURL).startswith("pb://")
    assert oct(os.stat(cd / clusterdir.ENGINE_FURL).st_mode & 0o777) == "0o600"
    assert top.controller is not None


@pytest.mark.parametrize(
    "files, given, expected",
    [
        ([], "auto", None),  # no controller yet: the engine waits (AdapterWatch)
        ([clusterdir.ENGINE_FURL], "auto", "fc"),
        ([clusterdir.PB_FILE], "auto", "pb"),
        ([clusterdir.PB_FILE, clusterdir.ENGINE_FURL], "auto", "fc"),
        ([clusterdir.ENGINE_FURL, clusterdir.PB_FILE], "auto", "pb"),
        ([clusterdir.PB_FILE], "fc", "fc"),
        ([], "pb", "pb"),
        (["native.json"], "auto", "native"),
        (["native.json", clusterdir.ENGINE_FURL], "auto", "fc"),
        ([clusterdir.ENGINE_FURL, "native.json"], "auto", "native"),
        ([], "native", "native"),
    ],
)
def test_engine_adapter_follows_connection_files(tmp_path, files, given, expected):
    """Given no adapter, an engine takes the one whose connection file is
    newest (stale files of another adapter lose)."""
    cd = ClusterDir(tmp_path / "c").create()
    for age, name in enumerate(files):
        cd.write_file(name, "x")
        os.utime(cd.file(name), (1000 + age, 1000 + age))
    options = parse(tap.EngineOptions, f"--cluster-dir={cd.path}", f"--adapter={given}")
    assert tap._engine_adapter(options, cd) == expected


def test_engine_furl_file_is_foolscap_only(tmp_path):
    with pytest.raises(usage.UsageError, match="--furl-file is for Foolscap"):
        parse(tap.EngineOptions, f"--furl-file={tmp_path / 'e.furl'}", "--adapter=pb")


def test_controller_drops_the_other_adapters_connection_files(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_json(clusterdir.PB_FILE, {"stale": True})
    cd.write_json(clusterdir.NATIVE_FILE, {"stale": True})
    tap.make_controller_service(
        parse(tap.ControllerOptions, f"--cluster-dir={cd.path}", "--adapter=fc")
    )
    assert not os.path.exists(cd.file(clusterdir.PB_FILE))
    assert not os.path.exists(cd.file(clusterdir.NATIVE_FILE))
    assert os.path.exists(cd.file(clusterdir.ENGINE_FURL))


def test_engine_properties_from_the_command_line():
    o = parse(
        tap.EngineOptions,
        "--property=gpu=true",
        "--property=mem=16",
        "--property=name=box-1",
        '--property=tags=["a", "b"]',
    )
    assert o["properties"] == {"gpu": True, "mem": 16, "name": "box-1", "tags": ["a", "b"]}


def test_engine_property_needs_a_name_and_a_value():
    with pytest.raises(usage.UsageError, match="NAME=VALUE"):
        parse(tap.EngineOptions, "--property=gpu")


def test_engine_service_advertises_command_line_properties(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    top = tap.make_engine_service(
        parse(tap.EngineOptions, f"--cluster-dir={cd.path}", "--property=gpu=true")
    )
    assert top.engine.properties == {"gpu": True}


def test_controller_start_fails_when_its_port_is_taken(tmp_path):
    """A controller that cannot listen must not write its pid file or engine list."""
    cd = ClusterDir(tmp_path / "c").create()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        top = tap.make_controller_service(
            parse(
                tap.ControllerOptions,
                f"--cluster-dir={cd.path}",
                "--adapter=fc",
                f"--engine-port={taken}",
            )
        )
        with pytest.raises(RuntimeError, match="port is taken"):
            top.startService()
    assert not os.path.exists(cd.pid_file("controller"))
    assert not os.path.exists(cd.file(clusterdir.ENGINES_FILE))
    for child in list(top):
        if child.running and not isinstance(child, tap.ListeningCheck):
            child.stopService()


def _started_watch(cd, adapter=None):
    """An AdapterWatch on a fake clock, started; its connectors are plain
    services, and the adapters they were made for are listed in ``made``."""
    from twisted.internet import task

    clock = task.Clock()
    made = []

    def make_connector(adapter):
        made.append(adapter)
        return service.Service()

    watch = tap.AdapterWatch(cd, make_connector, clock=clock, adapter=adapter)
    watch.startService()
    return watch, clock, made


def test_engine_without_connection_files_waits_for_them_then_uses_their_adapter(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    watch, clock, made = _started_watch(cd)
    try:
        clock.advance(tap.WATCH_POLL * 4)
        assert made == [] and watch.connector is None
        cd.write_json(clusterdir.NATIVE_FILE, {"port": 1})
        clock.advance(tap.WATCH_POLL)
        assert made == ["native"]
        assert watch.connector.running
        clock.advance(tap.WATCH_POLL * 4)
        assert made == ["native"]  # chosen once
    finally:
        watch.stopService()
    assert not watch.connector.running


def test_engine_service_waits_for_a_controller_when_the_directory_is_empty(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    top = tap.make_engine_service(parse(tap.EngineOptions, f"--cluster-dir={cd.path}"))
    assert isinstance(top.connector, tap.AdapterWatch)
    cd.write_json(clusterdir.NATIVE_FILE, {"port": 1})
    top = tap.make_engine_service(parse(tap.EngineOptions, f"--cluster-dir={cd.path}"))
    from kernel.enginenative import NativeEngineConnector

    assert isinstance(top.connector, NativeEngineConnector)


def test_engine_given_an_adapter_waits_for_connection_files_then_uses_that_adapter(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    watch, clock, made = _started_watch(cd, adapter="native")
    try:
        clock.advance(tap.WATCH_POLL * 4)
        assert made == [] and watch.connector is None
        # Files of another adapter: the given one is still used (its
        # connector then reports the mismatch).
        cd.write_json(clusterdir.PB_FILE, {"port": 1})
        clock.advance(tap.WATCH_POLL)
        assert made == ["native"]
        assert watch.connector.running
    finally:
        watch.stopService()


def test_engine_service_given_an_adapter_waits_only_while_there_are_no_connection_files(
    tmp_path,
):
    from kernel.enginenative import NativeEngineConnector

    cd = ClusterDir(tmp_path / "c").create()
    options = parse(tap.EngineOptions, f"--cluster-dir={cd.path}", "--adapter=native")
    top = tap.make_engine_service(options)
    assert isinstance(top.connector, tap.AdapterWatch)
    assert top.connector.adapter == "native"
    cd.write_json(clusterdir.NATIVE_FILE, {"port": 1})
    top = tap.make_engine_service(options)
    assert isinstance(top.connector, NativeEngineConnector)


def test_in_thread_gives_the_result_or_raises_the_error_of_its_call():
    import threading

    caller = threading.get_ident()
    assert tap.InThread(lambda: threading.get_ident()).result() != caller

    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        tap.InThread(fail).result()


def test_controller_opens_its_task_db_and_continues_the_task_ids_after_a_restart(tmp_path):
    from kernel.taskdb.sqlite import SQLiteDB

    cd = ClusterDir(tmp_path / "c").create()
    db = SQLiteDB(cd.task_db_path)
    db.add_record(41, {"taskid": 41})
    db.commit()
    db.close()
    top = tap.make_controller_service(
        parse(tap.ControllerOptions, f"--cluster-dir={cd.path}", "--adapter=native")
    )
    assert isinstance(top.task_controller.db, SQLiteDB)
    assert top.task_controller.db.next_taskid() == 42
