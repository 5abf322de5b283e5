"""The cluster directory: location, private permissions, atomic writes."""

import os
import stat

import pytest

from kernel import clusterdir
from kernel.clusterdir import ClusterDir
from kernel.error import ConnectionError, SecurityError


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_default_is_home_dot_txkernel(monkeypatch, tmp_path):
    monkeypatch.delenv(clusterdir.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ClusterDir().path == str(tmp_path / ".txkernel" / "default")


def test_environment_variable_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv(clusterdir.ENV_VAR, str(tmp_path / "c"))
    assert ClusterDir().path == str(tmp_path / "c")


def test_explicit_path_overrides_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(clusterdir.ENV_VAR, str(tmp_path / "env"))
    assert ClusterDir(tmp_path / "given").path == str(tmp_path / "given")


def test_create_makes_private_directory(tmp_path):
    cd = ClusterDir(tmp_path / "a" / "b").create()
    assert mode(cd.path) == 0o700
    assert os.path.isdir(cd.log_dir)


def test_create_refuses_world_readable_directory_naming_the_fix(tmp_path):
    path = tmp_path / "loose"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    with pytest.raises(SecurityError) as e:
        ClusterDir(path).create()
    assert f"chmod 700 {path}" in str(e.value)


def test_create_with_repair_tightens_directory(tmp_path):
    path = tmp_path / "loose"
    path.mkdir()
    os.chmod(path, 0o775)
    ClusterDir(path).create(repair=True)
    assert mode(path) == 0o700


def test_write_file_is_private_and_replaces_atomically(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    path = cd.write_file("x.furl", "one")
    inode = os.stat(path).st_ino
    cd.write_file("x.furl", "two")
    assert mode(path) == 0o600
    assert cd.read_file("x.furl") == b"two"
    # a rename, not an overwrite in place: a new inode, no temp files left
    assert os.stat(path).st_ino != inode
    assert sorted(os.listdir(cd.path)) == ["log", "x.furl"]


def test_write_file_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_file("x.furl", "old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        cd.write_file("x.furl", "new")
    monkeypatch.undo()
    assert cd.read_file("x.furl") == b"old"
    assert sorted(os.listdir(cd.path)) == ["log", "x.furl"]


def test_reading_loose_connection_file_raises_security_error(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    path = cd.write_furl(clusterdir.ENGINE_FURL, "pb://x@127.0.0.1:1/y")
    os.chmod(path, 0o644)
    with pytest.raises(SecurityError) as e:
        cd.read_furl(clusterdir.ENGINE_FURL)
    assert path in str(e.value)
    assert f"chmod 600 {path}" in str(e.value)


def test_reading_file_in_loose_directory_raises_security_error(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_furl(clusterdir.ENGINE_FURL, "pb://x@127.0.0.1:1/y")
    os.chmod(cd.path, 0o755)
    with pytest.raises(SecurityError, match="chmod 700"):
        cd.read_furl(clusterdir.ENGINE_FURL)


def test_missing_furl_says_how_to_start_a_cluster(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    with pytest.raises(ConnectionError, match="txkernel cluster start -n 4"):
        cd.read_furl(clusterdir.MULTIENGINE_FURL)


def test_furl_round_trip(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_furl(clusterdir.TASK_FURL, "pb://abc@127.0.0.1:5/def")
    assert cd.read_furl(clusterdir.TASK_FURL) == "pb://abc@127.0.0.1:5/def"


def test_ports_are_remembered(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    assert cd.get_port("engine") is None
    cd.set_port("engine", 4001)
    cd.set_port("client", 4002)
    again = ClusterDir(cd.path)
    assert (again.get_port("engine"), again.get_port("client")) == (4001, 4002)


def test_certificate_is_stored_private(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    assert cd.read_cert("engine") is None
    cd.write_cert("engine", b"PEM DATA")
    assert cd.read_cert("engine") == b"PEM DATA"
    assert mode(cd.cert_file("engine")) == 0o600


def test_pids_lists_pid_files(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.write_file("controller.pid", "123\n")
    cd.write_file("engine-0.pid", "456")
    cd.write_file("broken.pid", "not a pid")
    assert cd.pids() == {"controller": 123, "engine-0": 456}


@pytest.mark.parametrize(
    "interface, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.org", False),
    ],
)
def test_is_loopback(interface, loopback):
    assert clusterdir.is_loopback(interface) is loopback


def test_default_adapter_is_native_on_loopback_or_with_tls_and_foolscap_elsewhere():
    assert clusterdir.default_adapter("127.0.0.1") == "native"
    assert clusterdir.default_adapter("0.0.0.0") == "fc"
    assert clusterdir.default_adapter("0.0.0.0", tls=True) == "native"


def _touch(cd, name, when):
    cd.write_file(name, "x")
    os.utime(cd.file(name), (when, when))


def test_served_adapter_is_none_without_connection_files(tmp_path):
    assert ClusterDir(tmp_path / "c").create().served_adapter() is None
    assert ClusterDir(tmp_path / "missing").served_adapter() is None


@pytest.mark.parametrize(
    "name, adapter",
    [
        (clusterdir.NATIVE_FILE, "native"),
        (clusterdir.ENGINE_FURL, "fc"),
        (clusterdir.MULTIENGINE_FURL, "fc"),
        (clusterdir.PB_FILE, "pb"),
    ],
)
def test_served_adapter_follows_the_connection_file(tmp_path, name, adapter):
    cd = ClusterDir(tmp_path / "c").create()
    _touch(cd, name, 1000)
    assert cd.served_adapter() == adapter


def test_served_adapter_prefers_the_newest_connection_file(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    _touch(cd, clusterdir.ENGINE_FURL, 1000)
    _touch(cd, clusterdir.NATIVE_FILE, 2000)
    assert cd.served_adapter() == "native"
    _touch(cd, clusterdir.TASK_FURL, 3000)
    assert cd.served_adapter() == "fc"


def test_check_adapter_accepts_the_served_adapter_or_an_empty_directory(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    cd.check_adapter("fc")  # nothing to contradict it (no controller yet)
    _touch(cd, clusterdir.NATIVE_FILE, 1000)
    cd.check_adapter("native")


def test_check_adapter_names_the_mismatch_and_both_fixes(tmp_path):
    cd = ClusterDir(tmp_path / "c").create()
    _touch(cd, clusterdir.NATIVE_FILE, 1000)
    with pytest.raises(ConnectionError) as info:
        cd.check_adapter("fc")
    text = str(info.value)
    assert "serves the native transport (native.json), not Foolscap" in text
    assert "adapter='native'" in text and "--adapter native" in text
    assert "restart the controller with `--adapter fc`" in text
