"""Progress bars for long blocking waits (tqdm), shown only to people.

A blocking ``map``, a task ``barrier`` or any wait over many items shows a
progress bar when someone is watching: stderr is a terminal, or the code runs
in IPython or Jupyter. Scripts whose output goes to a file or a pipe stay
quiet. In automatic mode a bar appears only once a wait has lasted
:data:`AUTO_DELAY` seconds, so quick calls print nothing.

Control it with the environment variable ``TXKERNEL_PROGRESS`` (``0``/``off``
never, ``1``/``on`` always and at once) or from Python with
:func:`set_enabled` (``True``, ``False``, or ``None`` for automatic).
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

__all__ = ["AUTO_DELAY", "ENV_VAR", "Progress", "bar", "enabled", "set_enabled", "wait"]

#: The environment variable that forces bars on or off.
ENV_VAR = "TXKERNEL_PROGRESS"

#: Seconds a wait must last before an automatic bar appears.
AUTO_DELAY = 1.0

#: How often (seconds) a bar is redrawn while nothing else happens.
REFRESH_INTERVAL = 0.2

_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}

#: Set by :func:`set_enabled`; None means automatic.
_setting: bool | None = None


def set_enabled(value: bool | None) -> None:
    """Turn progress bars on (``True``), off (``False``) or back to automatic (``None``).

    This takes precedence over ``TXKERNEL_PROGRESS``.
    """
    global _setting
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"set_enabled takes True, False or None, not {value!r}")
    _setting = value


def _forced() -> bool | None:
    """True/False when bars are forced on/off, None when automatic."""
    if _setting is not None:
        return _setting
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return None


def _in_ipython() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        return ipython.get_ipython() is not None
    except Exception:
        return False


def _in_jupyter() -> bool:
    if not _in_ipython():
        return False
    shell = sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def is_interactive(stream: TextIO | None = None) -> bool:
    """Is someone watching: is ``stream`` (stderr) a terminal, or is this IPython/Jupyter?"""
    stream = sys.stderr if stream is None else stream
    if _in_ipython():
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def enabled() -> bool:
    """Would a bar be shown now?"""
    forced = _forced()
    if forced is not None:
        return forced
    return is_interactive()


class Progress:
    """A progress bar, or nothing at all when bars are off.

    Use as a context manager; :meth:`update` as items complete. Safe to
    update from another thread (tqdm locks its writes).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "item"):
        self._bar: Any = None
        forced = _forced()
        if forced is False or (forced is None and not is_interactive()):
            return
        # Forced on: draw at once and on every update. Automatic: only once
        # the wait has lasted AUTO_DELAY, at tqdm's usual pace.
        timing = {"delay": 0.0, "mininterval": 0.0} if forced else {"delay": AUTO_DELAY}
        self._bar = _tqdm_class()(
            total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, **timing
        )

    @property
    def shown(self) -> bool:
        """Is there a real bar behind this object?"""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """Record ``n`` more completed items."""
        if self._bar is not None:
            self._bar.update(n)

    def refresh(self) -> None:
        """Redraw (so the elapsed time moves while nothing completes)."""
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tqdm_class() -> Any:
    if _in_jupyter():
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bar needs it)
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm


def bar(total: int | None, desc: str, unit: str = "item") -> Progress:
    """A :class:`Progress` over ``total`` items (None: unknown, shows elapsed time)."""
    return Progress(total, desc, unit)


def wait(call: Any, desc: str) -> Any:
    """Wait for a :class:`kernel.reactorthread.Call`, showing elapsed time.

    :returns: the call's result.
    :raises Exception: what the call failed with.
    """
    if call.done() or not enabled():
        return call.result()
    with bar(None, desc, unit="s") as progress:
        while not call.wait(REFRESH_INTERVAL):
            progress.refresh()
    return call.result()
