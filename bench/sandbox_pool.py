"""Runs per second of a short sympy program: the sandbox pool vs a fresh ``python -c`` per run, same run.

The peer gets no isolation at all (a bare interpreter), so the ratio understates what the pool saves over
a fresh *sandboxed* interpreter. Both run the identical program and must print the identical answer.

    python bench/sandbox_pool.py [--pool-runs 60] [--fresh-runs 6] [--size 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tqdm import tqdm

PROGRAM = "import sympy\nx = sympy.Symbol('x')\nprint(sympy.factor(x**2 - 5*x + 6))\n"
EXPECTED = "(x - 3)*(x - 2)\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-runs", type=int, default=60)
    ap.add_argument("--fresh-runs", type=int, default=6)
    ap.add_argument("--size", type=int, default=1, help="pool size (1 = sequential, like the peer)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from dsmath.sandbox import SandboxPool

    t0 = time.perf_counter()
    pool = SandboxPool(size=args.size)
    startup_s = time.perf_counter() - t0
    for _ in range(3):  # warm-up: first runs fault in the template's pages
        assert pool.run(PROGRAM).stdout == EXPECTED
    walls = []
    t0 = time.perf_counter()
    if args.size == 1:
        for _ in tqdm(range(args.pool_runs), desc="pool", leave=False):
            r = pool.run(PROGRAM)
            assert r.stdout == EXPECTED and r.ok, r
            walls.append(r.wall_s)
    else:
        results = pool.run_many([PROGRAM] * args.pool_runs)
        assert all(r.stdout == EXPECTED for r in results)
        walls = [r.wall_s for r in results]
    pool_s = time.perf_counter() - t0
    pool.close()

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    for _ in tqdm(range(args.fresh_runs), desc="fresh python -c", leave=False):
        out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True)
        assert out.stdout == EXPECTED
    fresh_s = time.perf_counter() - t0

    pool_rps = args.pool_runs / pool_s
    fresh_rps = args.fresh_runs / fresh_s
    walls.sort()
    card = {
        "bench": "sandbox_pool", "program": "sympy.factor of a quadratic", "pool_size": args.size,
        "pool_runs": args.pool_runs, "fresh_runs": args.fresh_runs,
        "pool_runs_per_s": round(pool_rps, 2), "fresh_python_runs_per_s": round(fresh_rps, 3),
        "speedup": round(pool_rps / fresh_rps, 1),
        "pool_ms_per_run": round(1000 * pool_s / args.pool_runs, 1),
        "fresh_ms_per_run": round(1000 * fresh_s / args.fresh_runs, 1),
        "pool_child_wall_ms_p50": round(1000 * walls[len(walls) // 2], 1),
        "pool_startup_s": round(startup_s, 2), "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    print("sandbox pool vs fresh interpreter (same program, same run)")
    print(f"  pool (size {args.size}, fork server, full isolation): {card['pool_runs_per_s']:8.2f} runs/s "
          f"({card['pool_ms_per_run']} ms/run; child wall p50 {card['pool_child_wall_ms_p50']} ms)")
    print(f"  fresh `python -c` per run (no isolation):  {card['fresh_python_runs_per_s']:8.3f} runs/s "
          f"({card['fresh_ms_per_run']} ms/run)")
    print(f"  speedup: {card['speedup']}x   (pool start-up {card['pool_startup_s']} s, paid once; "
          f"1-min load {card['loadavg_1m']} on {card['cpus']} CPUs)")
    print(json.dumps(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
