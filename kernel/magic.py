"""Parallel magics for IPython and Jupyter: ``%px``, ``%%px``, ``%autopx``, ``%result``.

Load them with ``%load_ext kernel.magic`` (or by calling ``mec.activate()``
on a multiengine client, which also makes that client the one the magics
use)::

    In [1]: from kernel import client
    In [2]: mec = client.MultiEngineClient()
    In [3]: mec.activate()
    In [4]: %px import numpy; a = numpy.random.rand(3).sum()
    In [5]: %%px
       ...: for i in range(2):
       ...:     print(id, i)
    In [6]: %autopx          # from now on every cell runs on the engines
    In [7]: b = a * 2
    In [8]: %autopx          # and back to running here
    In [9]: %result          # the last command's result on each engine

Each engine's output is printed under its id (``[stdout:0] ...``), as it
is written when the client's connection can stream it (else when the command
is done). When
engines fail, the error shows every failing engine's traceback. ``%px`` and
``%autopx`` use the active client's ``targets`` and ``block``: with
``mec.block = False``, ``%px`` returns a PendingResult instead of waiting.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from kernel.error import CompositeError

__all__ = [
    "ParallelMagics",
    "active_client",
    "load_into_running_ipython",
    "load_ipython_extension",
    "set_active_client",
    "unload_ipython_extension",
]

#: Cells that start with one of these run here even while %autopx is on.
LOCAL_MAGICS = ("%autopx", "%result", "%px", "%%px", "%load_ext", "%unload_ext")

_active: Any = None


def set_active_client(client: Any) -> None:
    """Make ``client`` (a blocking multiengine client) the one the magics use."""
    global _active
    _active = client


def active_client() -> Any:
    """The active multiengine client.

    :raises UsageError: there is none yet, with how to make one.
    """
    if _active is None:
        raise UsageError(
            "no active multiengine client: create one and activate it with\n"
            "    from kernel import client\n"
            "    mec = client.MultiEngineClient()\n"
            "    mec.activate()"
        )
    return _active


def _print_output(results: Any) -> None:
    """Print each engine's stdout and stderr, labelled with its id."""
    for r in results:
        if not isinstance(r, dict):
            print(repr(r))
            continue
        engine = r.get("id")
        for stream_name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            text = r.get(stream_name) or ""
            if text:
                lines = text.rstrip("\n").split("\n")
                stream.write("".join(f"[{stream_name}:{engine}] {line}\n" for line in lines))
        sys.stdout.flush()


class _StreamPrinter:
    """Prints engines' streamed output as it arrives (called from the reactor
    thread): each complete line labelled ``[stdout:<id>]``, so that lines
    from several engines do not mix; partial lines wait for their end, or
    for :meth:`finish`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial: dict[tuple[int, str], str] = {}

    def __call__(self, engine_id: int, stream_name: str, text: str) -> None:
        key = (engine_id, stream_name)
        with self._lock:
            text = self._partial.pop(key, "") + text
            lines = text.split("\n")
            if lines[-1]:
                self._partial[key] = lines[-1]
            self._write(key, lines[:-1])

    def _write(self, key: tuple[int, str], lines: list[str]) -> None:
        if not lines:
            return
        engine_id, stream_name = key
        stream = sys.stderr if stream_name == "stderr" else sys.stdout
        stream.write("".join(f"[{stream_name}:{engine_id}] {line}\n" for line in lines))
        stream.flush()

    def finish(self) -> None:
        """Print the partial last lines."""
        with self._lock:
            for key, text in sorted(self._partial.items()):
                self._write(key, [text])
            self._partial.clear()


def _engine_tracebacks(shell: Any, etype: type, value: Any, tb: Any, tb_offset: Any = None) -> list:
    """IPython's display of a CompositeError: every engine's traceback
    (instead of the local traceback, which only shows the client waiting)."""
    lines = [f"{type(value).__name__}: {value.message}"]
    lines.append(value.format_tracebacks())
    text = "\n".join(lines)
    # IPython does not display what a custom handler returns: print it here,
    # where IPython prints its own tracebacks.
    print(text.rstrip("\n"))
    return [text]


@magics_class
class ParallelMagics(Magics):
    """The parallel magics, bound to one IPython shell."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.autopx_on = False

    def run_on_engines(self, code: str) -> Any:
        """Execute ``code`` with the active client and print each engine's output.

        Output is printed as the engines write it when the client's
        connection can stream it, else once the command is done.

        :returns: None, or a PendingResult when the client does not block.
        :raises kernel.error.CompositeError: when engines fail.
        """
        mec = active_client()
        if not mec.block:
            return mec.execute(code)  # a PendingResult
        printer = _StreamPrinter()
        streaming = mec.add_output_observer(printer)
        try:
            result = mec.execute(code)
        finally:
            if streaming:
                mec.remove_output_observer(printer)
                printer.finish()
        if not streaming:
            _print_output(result)
        return None

    @line_cell_magic
    def px(self, line: str, cell: str | None = None) -> Any:
        """Run a line (``%px code``) or a cell (``%%px``) on the active
        client's engines."""
        code = line if cell is None else cell
        if not code.strip():
            raise UsageError("%px needs code to run: %px a = 1, or a %%px cell")
        return self.run_on_engines(code)

    @line_magic
    def autopx(self, line: str = "") -> None:
        """Toggle running every cell on the engines (``%autopx`` again to stop)."""
        if self.autopx_on:
            self._disable_autopx()
        else:
            active_client()  # refuse to turn on with nothing to send cells to
            self._enable_autopx()

    @line_magic
    def result(self, line: str = "") -> Any:
        """Show the result of command ``N`` (default: the latest) on each engine."""
        arg = line.strip()
        try:
            i = int(arg) if arg else None
        except ValueError:
            raise UsageError(f"%result takes a command number, not {arg!r}") from None
        return active_client().get_result(i)

    # -- %autopx -------------------------------------------------------------

    def _transform(self, lines: list[str]) -> list[str]:
        """Input transformer: rewrite a whole cell into a ``%%px`` call."""
        if not self.autopx_on or not lines:
            return lines
        source = "".join(lines)
        stripped = source.strip()
        if not stripped or stripped.startswith(LOCAL_MAGICS):
            return lines
        return [f"get_ipython().run_cell_magic('px', '', {source!r})\n"]

    def _enable_autopx(self) -> None:
        transforms = self.shell.input_transformers_cleanup
        if self._transform not in transforms:
            transforms.append(self._transform)
        self.autopx_on = True
        print("%autopx enabled: cells now run on the engines (%autopx again to stop)")

    def _disable_autopx(self) -> None:
        transforms = self.shell.input_transformers_cleanup
        while self._transform in transforms:
            transforms.remove(self._transform)
        self.autopx_on = False
        print("%autopx disabled: cells run here again")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext kernel.magic``: register the magics and the per-engine
    error display."""
    ipython.register_magics(ParallelMagics)
    if not ipython.custom_exceptions:
        ipython.set_custom_exc((CompositeError,), _engine_tracebacks)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext kernel.magic``: stop ``%autopx`` and the error display."""
    magics = ipython.magics_manager.registry.get("ParallelMagics")
    if magics is not None and magics.autopx_on:
        magics._disable_autopx()
    if ipython.custom_exceptions == (CompositeError,):
        ipython.set_custom_exc((), None)


def load_into_running_ipython() -> bool:
    """Load the magics into the running IPython shell, if there is one.

    :returns: whether a shell was found.
    """
    ipython_module = sys.modules.get("IPython")
    if ipython_module is None:
        return False
    shell = ipython_module.get_ipython()
    if shell is None:
        return False
    shell.extension_manager.load_extension("kernel.magic")
    return True
