"""Plan stage (Intra-Fusion OT) for one group of C = 512 ... 4096 channels.

Random unit-norm features of dimension ``--dim-factor * C`` (ResNet-50's
2048-channel group has 4588 features, 2.2 C), half the channels kept.  Times:
the cost matrix (as the tool computes it: the compiled L1 kernel when numba
is installed and the matrix is large, else SciPy), the same matrix through
SciPy's cdist (threaded) and whether both give the same ``ot.emd`` plan, exact OT (``ot.emd``), the whole
``plans.fusion`` call, entropic OT (``ot.sinkhorn``, reg 0.05) for comparison,
and the cost matrix as POT's ``ot.dist`` computed it before (only up to
``--old-max`` channels: it loops over the features in Python).  Each figure is
the median of ``--repeats`` runs; the machine load is printed.

    python benchmarks/plan_scaling.py [--sizes 512 1024 2048 4096] [--repeats 3]

Results: docs/results/plan_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# This folder's coverage.py would shadow the coverage package, which numba imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_intrafusion import plans  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats):
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    p.add_argument("--dim-factor", type=float, default=2.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-max", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "plan_scaling.json"))
    args = p.parse_args(argv)
    plans.preload_pot()
    import ot

    rows = []
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start; wall s (cpu s), median of {args.repeats}")
    print(f"{'C':>5} {'k':>5} {'dim':>5} {'cost':>14} {'SciPy cost':>14} {'same plan':>9} {'emd':>14} {'fusion total':>14} {'sinkhorn':>14} "
          f"{'old ot.dist':>14}")
    for size in args.sizes:
        rng = np.random.default_rng(size)
        dim = int(args.dim_factor * size)
        feats = plans.normalised_features([rng.standard_normal((size, dim))])
        kept = np.sort(rng.choice(size, size // 2, replace=False))
        a, b = np.full(size, 1 / size), np.full(len(kept), 1 / len(kept))
        plans._l1_kernel()  # compile (or load numba's cache) outside the timings
        cost = timed(lambda: plans.cost_matrix(feats, kept), args.repeats)
        M = cost[2]
        work, plans.COMPILED_COST_WORK = plans.COMPILED_COST_WORK, 10**30
        scipy_cost = timed(lambda: plans.cost_matrix(feats, kept), args.repeats)
        plans.COMPILED_COST_WORK = work
        same = bool(np.array_equal(ot.emd(a, b, M, numItermax=max(100_000, 20 * size * len(kept))),
                                   ot.emd(a, b, scipy_cost[2], numItermax=max(100_000, 20 * size * len(kept)))))
        emd = timed(lambda: ot.emd(a, b, M, numItermax=max(100_000, 20 * size * len(kept))), args.repeats)
        fusion = timed(lambda: plans.fusion(feats, kept), args.repeats)
        sink = timed(lambda: ot.sinkhorn(a, b, M / M.max(), 0.05, numItermax=10000, warn=False), args.repeats)
        old = timed(lambda: ot.dist(feats, feats[kept], metric="minkowski", p=1), 1) if size <= args.old_max else None
        row = dict(C=size, k=len(kept), dim=dim, cost_s=cost[:2], scipy_cost_s=scipy_cost[:2],
                   compiled=plans._l1_kernel() is not None and size * len(kept) * dim >= work,
                   max_abs_diff_vs_scipy=float(np.abs(M - scipy_cost[2]).max()), same_emd_plan=same,
                   emd_s=emd[:2], fusion_s=fusion[:2],
                   sinkhorn_s=sink[:2], old_dist_s=old[:2] if old else None,
                   emd_nonzeros=int(np.count_nonzero(emd[2])))
        rows.append(row)
        fmt = lambda t: f"{t[0]:7.2f} ({t[1]:5.2f})" if t else f"{'-':>14}"  # noqa: E731
        print(f"{size:>5} {len(kept):>5} {dim:>5} {fmt(cost)} {fmt(scipy_cost)} {str(same):>9} {fmt(emd)} {fmt(fusion)} {fmt(sink)} {fmt(old)}",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(load_end=os.getloadavg(), rows=rows), indent=1))
    print(f"# load {os.getloadavg()[0]:.2f} at end; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
