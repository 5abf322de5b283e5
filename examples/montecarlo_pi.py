"""Estimate pi by throwing random darts, in parallel on every engine.

Each engine throws darts at the unit square and counts those that land inside
the quarter circle; the fraction inside is pi/4. Run it on a local cluster::

    txkernel run -n 4 examples/montecarlo_pi.py
    txkernel run -n 4 examples/montecarlo_pi.py --samples 20000000

or against a cluster you started (``txkernel cluster start -n 4``)::

    python examples/montecarlo_pi.py

or with engines inside this process (``--local 4``). The steps are the
multiengine interface's: ``push_function`` the dart thrower, ``scatter`` one
random seed per engine, ``execute`` the throws, ``gather`` the counts.
"""

from __future__ import annotations

import argparse
import math
import time

from _connect import add_cluster_options, clients


def count_hits(seed: int, samples: int) -> int:
    """Throw ``samples`` darts; count those with x² + y² <= 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, samples, 1_000_000):  # bounded memory per engine
        n = min(1_000_000, samples - start)
        x, y = rng.random(n), rng.random(n)
        hits += int(np.count_nonzero(x * x + y * y <= 1.0))
    return hits


def estimate_pi(mec, samples: int, seed: int) -> tuple[float, int]:
    """Throw ``samples`` darts on each engine; return (estimate, total darts)."""
    ids = mec.get_ids()
    mec.push_function({"count_hits": count_hits})
    mec.push({"samples": samples})
    mec.scatter("seeds", [seed + i for i in range(len(ids))])
    mec.execute("hits = sum(count_hits(s, samples) for s in seeds)")
    hits = mec.pull("hits")
    total = samples * len(ids)
    return 4.0 * sum(hits) / total, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--samples", type=int, default=5_000_000, help="darts per engine (default 5000000)"
    )
    parser.add_argument("--seed", type=int, default=None, help="base random seed")
    add_cluster_options(parser)
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    with clients(args) as (mec, _):
        ids = mec.get_ids()
        started = time.perf_counter()
        estimate, total = estimate_pi(mec, args.samples, seed)
        elapsed = time.perf_counter() - started
    print(f"pi is about {estimate:.6f} (error {abs(estimate - math.pi):.6f})")
    print(f"{total} samples on {len(ids)} engines {ids} in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
