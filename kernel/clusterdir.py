"""The cluster directory: where a controller and its clients meet.

A cluster directory (default ``~/.txkernel/default``, or ``$TXKERNEL_CLUSTER_DIR``,
or an explicit path) holds everything a running cluster shares through the
file system:

- connection files: ``native.json`` (the native transport, the default on
  loopback), or ``engine.furl``, ``multiengine.furl``, ``task.furl``
  (Foolscap), or ``pb.json`` (PB) — capabilities, so they are private. Which
  of them the directory holds tells engines and clients which adapter the
  controller serves (:meth:`ClusterDir.served_adapter`);
- the Foolscap Tub certificates (``*.pem``), so FURLs survive a controller
  restart, and the chosen ports (``ports.json``);
- ``engines.json``, the controller's list of registered engines;
- pid files (``*.pid``), logs (``log/``) and the SQLite task database.

The directory is private (mode 0700) and every file in it is written
atomically (a temporary file renamed over the old one) with mode 0600.
Reading a connection file that others could read or change raises
:class:`kernel.error.SecurityError` naming the file and the fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import tempfile
from typing import Any

from kernel.error import ConnectionError, SecurityError

#: The environment variable that names the default cluster directory.
ENV_VAR = "TXKERNEL_CLUSTER_DIR"

#: Connection files a controller writes, by adapter.
ENGINE_FURL = "engine.furl"
MULTIENGINE_FURL = "multiengine.furl"
TASK_FURL = "task.furl"
PB_FILE = "pb.json"
NATIVE_FILE = "native.json"
#: Every adapter's connection files.
FC_FILES = (ENGINE_FURL, MULTIENGINE_FURL, TASK_FURL)
#: The connection files that show a controller serves an adapter.
ADAPTER_FILES = {"native": (NATIVE_FILE,), "fc": FC_FILES, "pb": (PB_FILE,)}
#: How each adapter is named in messages.
ADAPTER_NAMES = {"native": "the native transport", "fc": "Foolscap", "pb": "Perspective Broker"}
PORTS_FILE = "ports.json"
ENGINES_FILE = "engines.json"
TASK_DB = "tasks.sqlite"

_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600


def default_cluster_dir() -> str:
    """The cluster directory used when none is given.

    :returns: ``$TXKERNEL_CLUSTER_DIR`` if set and not empty, else
        ``~/.txkernel/default``.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".txkernel", "default")


def is_loopback(interface: str) -> bool:
    """Does listening on ``interface`` keep a controller on this machine?

    :param interface: an IP address or ``localhost``; ``""`` and ``0.0.0.0``
        (every interface) are not loopback.
    """
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def default_adapter(interface: str, tls: bool = False) -> str:
    """The adapter a controller serves when none is named.

    The native transport (the fastest) on loopback, or whenever TLS is asked
    for (only it takes ``--tls``); Foolscap (TLS and unguessable FURLs) on
    any other interface.
    """
    return "native" if tls or is_loopback(interface) else "fc"


def _loose(mode: int) -> bool:
    """Is a file or directory with this mode open to group or others?"""
    return bool(stat.S_IMODE(mode) & 0o077)


class ClusterDir:
    """A cluster directory on disk.

    Constructing one touches nothing; :meth:`create` makes the directory and
    the accessors check permissions as they read.

    :param path: the directory; None for :func:`default_cluster_dir`.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = (
            os.path.abspath(os.path.expanduser(os.fspath(path)))
            if path is not None
            else default_cluster_dir()
        )

    def __repr__(self) -> str:
        return f"<ClusterDir {self.path}>"

    # -- the directory itself ----------------------------------------------

    def create(self, repair: bool = False) -> ClusterDir:
        """Make the directory (and missing parents) with mode 0700.

        :param repair: if the directory exists but group or others can reach
            it, tighten it to 0700 instead of refusing.
        :returns: ``self``.
        :raises SecurityError: the directory exists with loose permissions and
            ``repair`` is false.
        """
        os.makedirs(self.path, mode=_PRIVATE_DIR, exist_ok=True)
        self.check_permissions(repair=repair)
        os.makedirs(self.log_dir, mode=_PRIVATE_DIR, exist_ok=True)
        return self

    def exists(self) -> bool:
        """Does the directory exist?"""
        return os.path.isdir(self.path)

    def check_permissions(self, repair: bool = False) -> None:
        """Refuse (or with ``repair``, fix) a directory others can reach.

        :raises SecurityError: naming the directory and the ``chmod`` fix.
        """
        st = os.stat(self.path)
        if not _loose(st.st_mode):
            return
        if repair:
            os.chmod(self.path, _PRIVATE_DIR)
            return
        raise SecurityError(
            f"the cluster directory {self.path} is accessible by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}); it holds connection secrets. "
            f"Fix it with `chmod 700 {self.path}`."
        )

    def file(self, name: str) -> str:
        """The absolute path of ``name`` inside the directory."""
        return os.path.join(self.path, name)

    @property
    def log_dir(self) -> str:
        """Where process logs go."""
        return self.file("log")

    def log_file(self, name: str) -> str:
        """The log file of the process called ``name`` (e.g. ``controller``)."""
        return os.path.join(self.log_dir, f"{name}.log")

    @property
    def task_db_path(self) -> str:
        """The SQLite task database file."""
        return self.file(TASK_DB)

    # -- private files ------------------------------------------------------

    def write_file(self, name: str, data: str | bytes) -> str:
        """Write ``name`` atomically with mode 0600.

        The data goes to a temporary file in the same directory, which is
        then renamed over ``name``: readers see the old file or the new one,
        never a partial one.

        :returns: the file's path.
        """
        path = self.file(name)
        raw = data.encode("utf-8") if isinstance(data, str) else data
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(name)}.")
        try:
            os.fchmod(fd, _PRIVATE_FILE)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def check_file(self, name: str) -> str:
        """Refuse a private file that group or others can read or write.

        :returns: the file's path.
        :raises SecurityError: naming the file and the ``chmod`` fix.
        :raises FileNotFoundError: if it does not exist.
        """
        path = self.file(name)
        st = os.stat(path)
        if _loose(st.st_mode):
            raise SecurityError(
                f"refusing to use {path}: it is accessible by other users "
                f"(mode {stat.S_IMODE(st.st_mode):o}) and holds a secret. "
                f"Fix it with `chmod 600 {path}` (and `chmod 700 {self.path}`), "
                "or restart the cluster to write new connection files."
            )
        return path

    def read_file(self, name: str) -> bytes:
        """Read a private file, checking its permissions first.

        :raises SecurityError: the file (or the directory) is not private.
        :raises FileNotFoundError: if it does not exist.
        """
        path = self.check_file(name)
        self.check_permissions()
        with open(path, "rb") as f:
            return f.read()

    def remove_file(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        try:
            os.unlink(self.file(name))
        except FileNotFoundError:
            pass

    def write_json(self, name: str, obj: Any) -> str:
        """Write plain data as JSON, atomically, mode 0600."""
        return self.write_file(name, json.dumps(obj, indent=1, sort_keys=True) + "\n")

    def read_json(self, name: str, default: Any = None) -> Any:
        """Read a JSON file written by :meth:`write_json`; ``default`` if missing."""
        try:
            return json.loads(self.read_file(name).decode("utf-8"))
        except FileNotFoundError:
            return default

    # -- connection files ----------------------------------------------------

    def write_furl(self, name: str, furl: str) -> str:
        """Write a FURL connection file (e.g. :data:`ENGINE_FURL`)."""
        return self.write_file(name, furl + "\n")

    def read_furl(self, name: str) -> str:
        """Read a FURL connection file.

        :raises ConnectionError: no such file — no controller has run here —
            with the command that starts one.
        :raises SecurityError: the file is not private.
        """
        try:
            return self.read_file(name).decode("utf-8").strip()
        except FileNotFoundError:
            raise ConnectionError(
                f"no controller connection file {self.file(name)}: is a controller "
                f"running with this cluster directory? Start one with "
                f"`txkernel cluster start -n 4 --cluster-dir {self.path}`."
            ) from None

    # -- which adapter the controller serves ----------------------------------

    def served_adapter(self) -> str | None:
        """The adapter whose connection files the directory holds (``native``,
        ``fc`` or ``pb``), or None if it holds none.

        A starting controller removes the other adapters' files; should
        several be present anyway, the most recently written wins.
        """
        newest, found = -1.0, None
        for adapter, names in ADAPTER_FILES.items():
            for name in names:
                try:
                    mtime = os.stat(self.file(name)).st_mtime
                except OSError:
                    continue
                if mtime > newest:
                    newest, found = mtime, adapter
        return found

    def check_adapter(self, adapter: str) -> None:
        """Refuse to connect with ``adapter`` when the controller here serves another.

        :raises ConnectionError: ``adapter``'s connection file is missing but
            another adapter's is present, naming both and the two fixes.
        """
        served = self.served_adapter()
        if served is None or served == adapter:
            return
        if any(os.path.exists(self.file(n)) for n in ADAPTER_FILES.get(adapter, ())):
            return
        raise ConnectionError(
            f"the controller of {self.path} serves {ADAPTER_NAMES[served]} "
            f"({ADAPTER_FILES[served][0]}), not {ADAPTER_NAMES.get(adapter, adapter)}: "
            f"connect with adapter {served!r} (adapter={served!r} or --adapter {served}), "
            "or give no adapter to use whatever it serves, or restart the controller "
            f"with `--adapter {adapter}`."
        )

    # -- ports and certificates ---------------------------------------------

    def get_port(self, name: str) -> int | None:
        """The port remembered for listener ``name`` (e.g. ``engine``), or None."""
        port = self.read_json(PORTS_FILE, {}).get(name)
        return int(port) if port else None

    def set_port(self, name: str, port: int) -> None:
        """Remember the port of listener ``name`` for the next controller run."""
        ports = self.read_json(PORTS_FILE, {})
        ports[name] = int(port)
        self.write_json(PORTS_FILE, ports)

    def cert_file(self, name: str) -> str:
        """The certificate file of the Tub called ``name``."""
        return self.file(f"{name}.pem")

    def read_cert(self, name: str) -> bytes | None:
        """The stored certificate of Tub ``name``, or None if there is none yet."""
        try:
            return self.read_file(f"{name}.pem")
        except FileNotFoundError:
            return None

    def write_cert(self, name: str, data: bytes) -> None:
        """Store Tub ``name``'s certificate (private key included), mode 0600."""
        self.write_file(f"{name}.pem", data)

    # -- pid files -----------------------------------------------------------

    def pid_file(self, name: str) -> str:
        """The pid file of the process called ``name`` (``controller``, ``engine-3``)."""
        return self.file(f"{name}.pid")

    def pids(self) -> dict[str, int]:
        """Every pid file in the directory, as ``{name: pid}`` (unreadable ones skipped)."""
        out = {}
        for entry in sorted(os.listdir(self.path)) if self.exists() else []:
            if not entry.endswith(".pid"):
                continue
            try:
                with open(self.file(entry)) as f:
                    out[entry[: -len(".pid")]] = int(f.read().strip())
            except (OSError, ValueError):
                continue
        return out
