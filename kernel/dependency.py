"""Dependencies of load-balanced tasks.

Two kinds, as in :mod:`kernel.task`:

*Functional* dependencies decide whether a given engine can run a task. They
are plain callables that run **on the engine**, never in the controller: a
task's ``depend(properties) -> bool`` flag, or a function wrapped with
:func:`require`, :func:`depend` or :class:`dependent`. When one says no, the
task raises :class:`~kernel.error.UnmetDependency` and the controller moves it
to another engine.

*Graph* dependencies (:class:`Dependency`) say *when* (``after``) and *where*
(``follow``) a task may run, in terms of other tasks. They are plain data, and
the controller judges them: :meth:`Dependency.is_met` and
:meth:`Dependency.is_unreachable` cost O(size of the dependency).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kernel.error import UnmetDependency

__all__ = ["Dependency", "depend", "dependent", "require", "as_dependency"]


# ---------------------------------------------------------------------------
# Functional dependencies (run on engines)
# ---------------------------------------------------------------------------


class dependent:  # noqa: N801 - the seeds' name
    """A function ``f`` that runs only where ``df(*dargs, **dkwargs)`` is not False.

    Calling it first evaluates the dependency function on the engine; if that
    returns ``False`` (exactly ``False``: any other value lets the task run)
    the call raises :class:`~kernel.error.UnmetDependency`, and the controller
    sends the task to another engine.

    :param f: the function to run.
    :param df: the dependency function.
    """

    def __init__(self, f: Callable, df: Callable, *dargs: Any, **dkwargs: Any):
        self.f = f
        self.df = df
        self.dargs = dargs
        self.dkwargs = dkwargs
        self.__name__ = getattr(f, "__name__", "dependent")
        self.__doc__ = getattr(f, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.df(*self.dargs, **self.dkwargs) is False:
            raise UnmetDependency(
                f"{_name(self.df)}{_call_args(self.dargs, self.dkwargs)} returned False "
                "on this engine"
            )
        return self.f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<dependent {self.__name__} on {_name(self.df)}>"


def depend(df: Callable, *dargs: Any, **dkwargs: Any) -> Callable[[Callable], dependent]:
    """Decorator: run the decorated function only where ``df(*dargs, **dkwargs)``
    does not return ``False``.

    >>> @depend(lambda plat: __import__("sys").platform == plat, "linux")
    ... def linux_only(x):
    ...     return x
    """

    def decorate(f: Callable) -> dependent:
        return dependent(f, df, *dargs, **dkwargs)

    return decorate


def _require_modules(*names: str) -> bool:
    """True if every module in ``names`` imports on this engine."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            return False
    return True


class _Requiring(dependent):
    """A :class:`dependent` that also binds the required modules in the
    function's globals, so the function body can use them by name."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _require_modules(*self.dargs):
            raise UnmetDependency(f"this engine cannot import every module in {list(self.dargs)}")
        namespace = getattr(self.f, "__globals__", None)
        if namespace is not None:
            for name in self.dargs:
                top = name.split(".")[0]
                namespace.setdefault(top, importlib.import_module(top))
        return self.f(*args, **kwargs)


def require(*names: str) -> Callable[[Callable], dependent]:
    """Decorator: run the decorated function only on engines where every module
    in ``names`` can be imported; they are imported (and bound by their
    top-level name in the function's globals) before it runs.

    >>> @require("numpy")
    ... def norm(v):
    ...     return numpy.linalg.norm(v)
    """
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"require() takes module names as str, got {name!r}")

    def decorate(f: Callable) -> dependent:
        return _Requiring(f, _require_modules, *names)

    return decorate


# ---------------------------------------------------------------------------
# Graph dependencies (judged by the controller)
# ---------------------------------------------------------------------------


class Dependency(set):
    """A set of taskids plus the rule for when they count as met.

    :param ids: taskids (ints), objects with a ``taskid`` attribute (such as
        :class:`kernel.task.TaskResult`), or other Dependencies (their ids are
        taken).
    :param all: met when *all* the tasks are done (True) or when *any* is.
    :param success: a task that succeeded counts towards the dependency.
    :param failure: a task that failed (or was aborted) counts towards it.
    """

    def __init__(
        self,
        ids: Iterable[Any] = (),
        all: bool = True,  # noqa: A002 - the seeds' name
        success: bool = True,
        failure: bool = False,
    ):
        super().__init__(_taskids(ids))
        self.all = bool(all)
        self.success = bool(success)
        self.failure = bool(failure)
        if not (self.success or self.failure):
            raise ValueError(
                "a Dependency with success=False and failure=False can never be met; "
                "set success=True, failure=True, or both"
            )

    def _counts(self, succeeded: bool) -> bool:
        return self.success if succeeded else self.failure

    def is_met(self, outcome: Callable[[int], bool | None]) -> bool:
        """Is the dependency met in time?

        :param outcome: ``outcome(taskid)`` is True if the task succeeded,
            False if it failed or was aborted, None if it is not done.
        """
        if not self:
            return True
        if self.all:
            for tid in self:
                done = outcome(tid)
                if done is None or not self._counts(done):
                    return False
            return True
        for tid in self:
            done = outcome(tid)
            if done is not None and self._counts(done):
                return True
        return False

    def is_unreachable(self, outcome: Callable[[int], bool | None]) -> bool:
        """Can the dependency never be met any more (see :meth:`is_met`)?

        With ``all=True`` one finished task with an outcome that does not count
        makes it unreachable; with ``all=False``, every task finished and none
        counts.
        """
        if not self:
            return False
        if self.all:
            for tid in self:
                done = outcome(tid)
                if done is not None and not self._counts(done):
                    return True
            return False
        for tid in self:
            done = outcome(tid)
            if done is None or self._counts(done):
                return False
        return True

    def counting(self, outcome: Callable[[int], bool | None]) -> list[int]:
        """The taskids that are done with an outcome that counts."""
        found = []
        for tid in self:
            done = outcome(tid)
            if done is not None and self._counts(done):
                found.append(tid)
        return found

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (what travels in a task's flags)."""
        return {
            "ids": sorted(self),
            "all": self.all,
            "success": self.success,
            "failure": self.failure,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Dependency:
        """Inverse of :meth:`as_dict`."""
        return cls(
            d.get("ids", ()),
            all=d.get("all", True),
            success=d.get("success", True),
            failure=d.get("failure", False),
        )

    def __repr__(self) -> str:
        return (
            f"Dependency({sorted(self)!r}, all={self.all}, success={self.success}, "
            f"failure={self.failure})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dependency):
            return set.__eq__(self, other) and (self.all, self.success, self.failure) == (
                other.all,
                other.success,
                other.failure,
            )
        return set.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        # A module function, not the bound classmethod: twisted.persisted.styles
        # replaces how bound methods pickle once it is imported.
        return (_dependency_from_dict, (self.as_dict(),))


def _dependency_from_dict(d: Mapping[str, Any]) -> Dependency:
    return Dependency.from_dict(d)


def as_dependency(value: Any) -> Dependency | None:
    """Normalize an ``after``/``follow`` argument to a :class:`Dependency`.

    :param value: None, a taskid, an object with a ``taskid``, a list of those,
        a Dependency, or its :meth:`~Dependency.as_dict` form.
    :returns: a Dependency, or None when ``value`` names no task.
    :raises TypeError: for anything else.
    """
    if value is None:
        return None
    if isinstance(value, Dependency):
        dep = value
    elif isinstance(value, Mapping):
        dep = Dependency.from_dict(value)
    elif isinstance(value, (int, str, bytes)) or hasattr(value, "taskid"):
        dep = Dependency([value])
    else:
        dep = Dependency(value)
    return dep if dep else None


def _taskids(ids: Any) -> list[int]:
    if isinstance(ids, (int, str, bytes)) or hasattr(ids, "taskid"):
        ids = [ids]
    out = []
    for item in ids:
        if isinstance(item, Dependency):
            out.extend(item)
            continue
        tid = getattr(item, "taskid", item)
        if isinstance(tid, bool) or not isinstance(tid, int):
            raise TypeError(f"a dependency takes taskids (int) or TaskResults, got {item!r}")
        out.append(tid)
    return out


def _name(f: Callable) -> str:
    return getattr(f, "__name__", repr(f))


def _call_args(args: tuple, kwargs: dict) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
