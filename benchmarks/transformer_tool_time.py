#!/usr/bin/env python
"""Tool time on a transformer: torchvision vit_b_16 at 0.5 with calibration data, one CLI process.

Runs ``python -m onnx_intrafusion IN OUT --sparsity S --calibration X.npz
--report R.json`` (Intra-Fusion, default recovery, validation on) as a child
process and records its wall time, CPU time (user + system of the child),
peak RSS, and the per-stage timings of the report.  The calibration file
holds seeded random 224x224 images (``--samples``; the time depends on the
sample count, not on their content).  ``--profile`` runs the child under
cProfile and keeps the 25 functions with the most cumulative time in the
JSON (the profiler itself slows the run; the plain run's times are the ones
to quote).

The model is the speed benchmark's export (``benchmarks/models.py``;
export it once with the torchvision venv: ``/work/tv-venv/bin/python
benchmarks/models.py vit_b_16``).

    python benchmarks/transformer_tool_time.py --samples 256          # docs/results/speed_tool_time.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import models as bench_models  # noqa: E402

OUT = ROOT / "docs" / "results" / "speed_tool_time.json"


def run(model: Path, sparsity: float, calib: Path, tmp: Path, profile: Path | None, extra: list[str]) -> dict:
    report = tmp / "report.json"
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "onnx_intrafusion", str(model), str(tmp / "out.onnx"), "--sparsity", str(sparsity),
            "--calibration", str(calib), "--report", str(report), "--quiet", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"the tool failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    rep = json.loads(report.read_text())
    return dict(cmd=cmd[1:], wall_s=round(wall, 2),
                cpu_s=round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2),
                peak_rss_mb=round(after.ru_maxrss / 1024, 1), timings=rep.get("timings_s"),
                macs=rep.get("macs"), recovery_model=rep.get("recovery_model"),
                recovered_layers=sum(r.get("kept") == "recovered" for r in rep.get("recovery", [])),
                layers=len(rep.get("recovery", [])))


def top_functions(path: Path, n: int = 25) -> list[str]:
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("cumulative").print_stats(n)
    return [line for line in out.getvalue().splitlines() if line.strip()][-n - 1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b_16")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=256, help="random calibration images")
    p.add_argument("--profile", action="store_true", help="also run under cProfile")
    p.add_argument("--note", default="", help="what this row measures (kept in the JSON)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("extra", nargs="*", help="more CLI options (after --)")
    args = p.parse_args(argv)
    model = bench_models.export(args.model)
    import onnx

    inp = onnx.load(str(model), load_external_data=False).graph.input[0]
    dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim][1:]
    row = dict(model=args.model, sparsity=args.sparsity, samples=args.samples, extra=args.extra,
               cores=len(os.sched_getaffinity(0)), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
               note=args.note, load_start=os.getloadavg(),
               measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with tempfile.TemporaryDirectory(prefix="tool-time-") as tmp:
        t = Path(tmp)
        calib = t / "calib.npz"
        rng = np.random.default_rng(0)
        np.savez(calib, **{inp.name: rng.standard_normal((args.samples, *dims)).astype(np.float32)})
        row.update(run(model, args.sparsity, calib, t, None, args.extra))
        print(f"{args.model} at {args.sparsity}, {args.samples} samples: wall {row['wall_s']} s, "
              f"CPU {row['cpu_s']} s, peak RSS {row['peak_rss_mb']} MB; stages {row['timings']}", flush=True)
        if args.profile:
            prof = t / "profile.out"
            prof_row = run(model, args.sparsity, calib, t, prof, args.extra)
            row["profiled"] = dict(wall_s=prof_row["wall_s"], cpu_s=prof_row["cpu_s"],
                                   top_cumulative=top_functions(prof))
            print("\n".join(row["profiled"]["top_cumulative"]))
    row["load_end"] = os.getloadavg()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    data["rows"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
