"""Shared by the examples: connect to a cluster, or start one in this process.

``--local N`` runs N engines inside the example's own process
(:class:`kernel.client.LocalCluster`), so an example can be tried without
starting anything. Otherwise the example connects to the running cluster: the
one ``txkernel run`` started for it, ``--cluster-dir``, or the default
cluster directory (where ``txkernel cluster start`` writes its files).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

try:
    import kernel  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--local N`` and ``--cluster-dir DIR`` to an example's options."""
    parser.add_argument(
        "--local",
        type=int,
        metavar="N",
        default=None,
        help="run N engines inside this process instead of connecting to a cluster",
    )
    parser.add_argument(
        "--cluster-dir", default=None, help="the running cluster's directory (default: the usual)"
    )


@contextlib.contextmanager
def clients(args: argparse.Namespace, task: bool = False) -> Iterator[tuple[Any, Any]]:
    """``(multiengine client, task client or None)`` for the chosen cluster."""
    from kernel import client

    if args.local is not None:
        with client.LocalCluster(args.local) as cluster:
            yield cluster.multiengine_client(), cluster.task_client() if task else None
        return
    mec = client.MultiEngineClient(cluster_dir=args.cluster_dir)
    tc = client.TaskClient(cluster_dir=args.cluster_dir) if task else None
    yield mec, tc
