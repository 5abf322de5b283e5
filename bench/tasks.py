"""The functions the workloads run remotely.

They live in a tiny importable module so that every system ships them the
same way (by reference; engines and workers get the checkout on PYTHONPATH)
and no system pays for pickling a function's code on each call.
"""


def noop(*args: object) -> None:
    """Do nothing: the cheapest possible task."""


def identity(value: object) -> object:
    """Return ``value``: a task whose argument can be a previous task's result."""
    return value
