"""Speed and memory of the tool itself: ``python -m onnx_intrafusion`` per model.

Two fresh processes per model and run:

1. the command line exactly as a user runs it (``--report`` for the stage
   timings); wall time, CPU time (user+sys) and peak RSS come from
   ``os.wait4`` on that process alone;
2. a probe that does what ``cli.main`` does (preload POT, ``prune`` with a
   progress callback, ``save_model``) and records the peak RSS reached by the
   end of every stage (``ru_maxrss``) and the RSS after imports, so the
   memory a stage adds is visible.

    python benchmarks/tool_speed.py [--models resnet50 mobilenetv2 resnet_legacy] [--sparsity 0.5]
        [--method intrafusion] [--repeats 1]

The target: resnet50 at 0.5 with intrafusion, validation included, <= 15 s
wall on 2 cores and peak memory <= 4x the model file.  Results:
docs/results/tool_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

STAGES = ("load", "groups", "plan", "rewrite", "stats", "validate")


def model_path(name: str) -> Path:
    import models as bench_models

    if name in bench_models.MODELS:
        return bench_models.export(name)
    return ROOT / "samples" / f"{name}.onnx"


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _run(cmd: list[str]) -> tuple[float, float, int, subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, proc


def cli_run(src: Path, args, tmp: Path) -> dict:
    out, rep = tmp / "out.onnx", tmp / "report.json"
    cmd = [sys.executable, "-m", "onnx_intrafusion", str(src), str(out), "--sparsity", str(args.sparsity),
           "--method", args.method, "--provider", "cpu", "--report", str(rep), "--quiet", *args.extra]
    wall, cpu, rss, proc = _run(cmd)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read()}")
    report = json.loads(rep.read_text())
    return dict(wall_s=wall, cpu_s=cpu, peak_rss=rss, timings=report["timings_s"],
                macs=report["macs"], params=report["params"])


def probe_run(src: Path, args, tmp: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(src), str(tmp / "probe.onnx"),
           str(args.sparsity), args.method]
    wall, cpu, rss, proc = _run(cmd)
    if proc.returncode:
        raise SystemExit(f"probe failed: {proc.stderr.read()}")
    return json.loads(proc.stdout.read().strip().splitlines()[-1])


def probe(src: str, out: str, sparsity: str, method: str) -> None:
    """Child process: the CLI's work, with the peak RSS at every stage boundary."""
    import resource

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    t0 = time.perf_counter()
    marks: list[tuple[str, float, int]] = []
    from onnx_intrafusion.model_io import save_model
    from onnx_intrafusion.pipeline import prune
    from onnx_intrafusion.plans import preload_pot

    preload_pot()
    marks.append(("imports", time.perf_counter() - t0, peak()))

    def progress(msg: str) -> None:
        if msg.endswith(" ..."):
            marks.append((msg[:-4], time.perf_counter() - t0, peak()))

    result = prune(src, sparsity=float(sparsity), method=method, provider="cpu", progress=progress)
    marks.append(("save", time.perf_counter() - t0, peak()))
    save_model(result.model, out)
    marks.append(("end", time.perf_counter() - t0, peak()))
    # Peak by the end of each stage = the peak when the next one starts.
    stages = {}
    for (name, _, _), (_, t_next, p_next) in zip(marks, marks[1:]):
        stages[name] = p_next
    print(json.dumps(dict(peak_by_end_of=stages, after_imports=marks[0][2])))


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(*sys.argv[2:6])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv2", "resnet_legacy", "vgg_legacy"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--method", default="intrafusion")
    p.add_argument("--repeats", type=int, default=1, help="CLI runs per model (median)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI options, last")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "tool_speed.json"))
    args = p.parse_args(argv)

    rows = []
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start; "
          f"sparsity {args.sparsity}, {args.method}, validation on CPU")
    print(f"{'model':<16} {'MB':>5} {'wall s':>7} {'cpu s':>6} " + " ".join(f"{s:>8}" for s in STAGES)
          + f" {'peak MB':>8} {'x model':>7} {'imports MB':>10}")
    for name in args.models:
        src = model_path(name)
        size = model_bytes(src)
        with tempfile.TemporaryDirectory() as tmp:
            runs = [cli_run(src, args, Path(tmp)) for _ in range(args.repeats)]
            mem = probe_run(src, args, Path(tmp))
        best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        wall = statistics.median(r["wall_s"] for r in runs)
        row = dict(model=name, model_bytes=size, wall_s=wall, cpu_s=best["cpu_s"], peak_rss=best["peak_rss"],
                   peak_over_model=best["peak_rss"] / size, timings=best["timings"], runs=runs, memory=mem,
                   sparsity=args.sparsity, method=args.method, extra=args.extra)
        rows.append(row)
        print(f"{name:<16} {mb(size):>5} {wall:>7.1f} {best['cpu_s']:>6.1f} "
              + " ".join(f"{best['timings'].get(s, 0):>8.2f}" for s in STAGES)
              + f" {mb(best['peak_rss']):>8} {best['peak_rss'] / size:>7.1f} {mb(mem['after_imports']):>10}",
              flush=True)
        print(f"{'':<16} peak MB by end of stage: "
              + "  ".join(f"{k} {mb(v)}" for k, v in mem["peak_by_end_of"].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(load_end=os.getloadavg(), rows=rows), indent=1))
    print(f"# load {os.getloadavg()[0]:.2f} at end; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
