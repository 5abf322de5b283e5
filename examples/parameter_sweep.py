"""A parameter sweep as load-balanced tasks, with a dependent summary task.

For a projectile launched at 50 m/s with quadratic air drag, which launch
angle throws farthest? Without drag the answer is 45 degrees; drag lowers it.
Every (angle, drag) pair is one task, load-balanced over the engines. Each
writes its result to a file in a shared output directory; a summary task,
declared to run ``after`` all of them, reads those files and picks the best
angle per drag coefficient::

    txkernel run -n 4 examples/parameter_sweep.py
    python examples/parameter_sweep.py --local 4 --out /tmp/sweep

The output directory must be visible to every engine (true for a local
cluster; use a shared file system across machines). Tasks are retried once
if they fail (``retries=1``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _connect import add_cluster_options, clients

from kernel.client import MapTask

ANGLES = list(range(5, 90, 5))
DRAGS = [0.0, 0.001, 0.003, 0.01]


def simulate(angle_deg: float, drag: float, outdir: str, v0: float = 50.0) -> dict:
    """Fly one projectile; write and return its range and peak height.

    Integrates dv/dt = -g ŷ - drag·|v|·v (per unit mass) with a small fixed
    step until the projectile lands.
    """
    import json
    import math

    g, dt = 9.81, 1e-3
    vx, vy = v0 * math.cos(math.radians(angle_deg)), v0 * math.sin(math.radians(angle_deg))
    x = y = peak = 0.0
    while True:
        speed = math.hypot(vx, vy)
        vx -= drag * speed * vx * dt
        vy -= (g + drag * speed * vy) * dt
        x_next, y_next = x + vx * dt, y + vy * dt
        if y_next < 0.0:  # landed during this step: interpolate the touchdown
            x += (x_next - x) * y / (y - y_next)
            break
        x, y = x_next, y_next
        peak = max(peak, y)
    result = {"angle": angle_deg, "drag": drag, "range": x, "peak": peak}
    path = os.path.join(outdir, f"run-{angle_deg:g}-{drag:g}.json")
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def summarize(outdir: str) -> dict:
    """Read every run's file; the best angle (and its range) per drag; also
    written to ``summary.json``."""
    import glob
    import json

    best: dict = {}
    runs = 0
    for path in glob.glob(os.path.join(outdir, "run-*.json")):
        with open(path) as f:
            r = json.load(f)
        runs += 1
        key = str(r["drag"])
        if key not in best or r["range"] > best[key]["range"]:
            best[key] = {"angle": r["angle"], "range": r["range"]}
    summary = {"runs": runs, "best": best}
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def sweep(tc, outdir: str) -> dict:
    """Submit the sweep and the summary; wait; return the summary."""
    runs = [
        MapTask(simulate, (angle, drag, outdir), retries=1, description=f"{angle} deg, k={drag}")
        for drag in DRAGS
        for angle in ANGLES
    ]
    run_ids = tc.run_many(runs)
    # The summary starts only once every run has finished successfully.
    summary_id = tc.run(MapTask(summarize, (outdir,), after=run_ids, description="summary"))
    tc.barrier(run_ids + [summary_id])
    for tr in tc.get_task_results(run_ids):
        tr.raise_exception()  # the first failed run's exception, if any
    return tc.get_task_result(summary_id, block=True).results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    add_cluster_options(parser)
    args = parser.parse_args(argv)
    outdir = args.out or tempfile.mkdtemp(prefix="sweep-")
    os.makedirs(outdir, exist_ok=True)
    with clients(args, task=True) as (mec, tc):
        n = len(mec.get_ids())
        started = time.perf_counter()
        summary = sweep(tc, outdir)
        elapsed = time.perf_counter() - started
    print(f"{summary['runs']} runs on {n} engines in {elapsed:.2f} s; results in {outdir}")
    print("drag      best angle   range (m)")
    for drag in DRAGS:
        best = summary["best"][str(drag)]
        print(f"{drag:<9g} {best['angle']:>10g}   {best['range']:9.1f}")


if __name__ == "__main__":
    main()
