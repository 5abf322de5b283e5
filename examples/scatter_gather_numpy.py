"""Scatter a NumPy computation over the engines and gather the result.

Two classic data-parallel steps, checked against NumPy on one machine:

1. a matrix-vector product: the rows of ``A`` are scattered (each engine gets
   a block), ``x`` is pushed to every engine, each computes its block of
   ``A @ x``, and the blocks are gathered back in order;
2. the mean and standard deviation of a large sample: each engine reduces
   its block to (count, sum, sum of squares) and the client combines them.

::

    txkernel run -n 4 examples/scatter_gather_numpy.py
    python examples/scatter_gather_numpy.py --local 4 --rows 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _connect import add_cluster_options, clients


def matvec(mec, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``a @ x`` with the rows of ``a`` spread over the engines."""
    mec.scatter("a_rows", a)
    mec.push({"x": x})
    mec.execute("y = a_rows @ x")
    return mec.gather("y")


def mean_std(mec, sample: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation, reduced on the engines."""
    mec.scatter("part", sample)
    mec.execute("stats = (part.size, float(part.sum()), float((part * part).sum()))")
    parts = mec.pull("stats")
    n = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts)
    squares = sum(p[2] for p in parts)
    mean = total / n
    return mean, max(squares / n - mean * mean, 0.0) ** 0.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows of A (default 4000)")
    parser.add_argument("--cols", type=int, default=1000, help="columns of A (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_cluster_options(parser)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    a = rng.standard_normal((args.rows, args.cols))
    x = rng.standard_normal(args.cols)
    sample = rng.normal(3.0, 2.0, size=args.rows * 100)

    with clients(args) as (mec, _):
        n = len(mec.get_ids())
        started = time.perf_counter()
        y = matvec(mec, a, x)
        mean, std = mean_std(mec, sample)
        elapsed = time.perf_counter() - started

    if y.shape != (args.rows,) or not np.allclose(y, a @ x):
        raise SystemExit("the gathered product differs from NumPy's")
    if not (np.isclose(mean, sample.mean()) and np.isclose(std, sample.std())):
        raise SystemExit("the reduced mean and std differ from NumPy's")
    print(f"A @ x for A of shape {a.shape} on {n} engines: matches NumPy")
    print(f"mean {mean:.4f}, std {std:.4f} of {sample.size} values: match NumPy")
    print(f"done in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
