"""Estimate pi by Monte Carlo on in-process engines.

A controller and ``--engines`` engines (4 by default) run inside this one
process; the multiengine interface drives them exactly as it drives engines in
other processes. Each engine throws random darts at the unit square and counts
those inside the quarter circle; the counts are gathered and combined::

    python examples/inprocess_pi.py --engines 4 --samples 5000000

Steps: ``push_function`` the dart thrower, ``scatter`` one random seed per
engine, ``execute`` the throws, ``gather`` the hit counts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

try:
    import kernel  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task

from kernel.controllerservice import ControllerService
from kernel.engineservice import EngineService, QueuedEngine
from kernel.multiengine import MultiEngine, SynchronousMultiEngine

#: How long to wait for the engines' threads to exit at the end (seconds).
STOP_TIMEOUT = 10


def count_hits(seed: int, samples: int) -> int:
    """Throw ``samples`` darts at the unit square; count those with x²+y² <= 1."""
    try:
        import numpy as np
    except ImportError:
        import random

        rng = random.Random(seed)
        return sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 1_000_000):  # bounded memory
        n = min(1_000_000, samples - start)
        x, y = rng.random(n), rng.random(n)
        hits += int(np.count_nonzero(x * x + y * y <= 1.0))
    return hits


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", type=int, default=4, help="number of engines (default 4)")
    parser.add_argument(
        "--samples", type=int, default=5_000_000, help="darts per engine (default 5000000)"
    )
    parser.add_argument("--seed", type=int, default=None, help="base random seed")
    args = parser.parse_args(argv)
    if args.engines < 1 or args.samples < 1:
        parser.error("--engines and --samples must be at least 1")
    return args


async def main(reactor, argv: list[str]) -> None:
    args = parse_args(argv)
    controller = ControllerService()
    controller.startService()
    services = []
    for _ in range(args.engines):
        engine = EngineService()
        services.append(engine)
        controller.register_engine(QueuedEngine(engine))
    mec = SynchronousMultiEngine(MultiEngine(controller))
    try:
        ids = await mec.get_ids()
        base = args.seed if args.seed is not None else time.time_ns() % 2**32
        started = time.perf_counter()
        await mec.push_function({"count_hits": count_hits})
        await mec.push({"samples": args.samples})
        await mec.scatter("seeds", [base + i for i in range(len(ids))])
        await mec.execute("hits = [count_hits(s, samples) for s in seeds]")
        hits = await mec.gather("hits")
        elapsed = time.perf_counter() - started
    finally:
        await mec.kill()
        for engine in services:
            await engine.when_stopped().addTimeout(STOP_TIMEOUT, reactor)
        await controller.stopService()
    total = args.samples * len(ids)
    estimate = 4.0 * sum(hits) / total
    print(f"pi is about {estimate:.6f} (error {abs(estimate - math.pi):.6f})")
    print(f"{total} samples on {len(ids)} engines {ids} in {elapsed:.2f} s")


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
