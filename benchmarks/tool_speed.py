"""Speed and memory of the tool itself, side by side with Torch-Pruning.

Fresh processes per model and method, all with 2 threads:

1. the command line exactly as a user runs it (``--report`` for the stage
   timings; ``cli.main`` behind a two-line wrapper that writes the peak at
   exit); wall time and CPU time (user+sys) come from ``os.wait4`` on that
   process alone, peak RSS from its own VmHWM (``ru_maxrss`` survives
   ``exec``: a child forked from this larger process would report its size);
2. a probe that does what ``cli.main`` does (the allocator setting of
   ``model_io.map_large_allocations``, ``prune`` with
   the command line's options and a progress callback, ``save_model``) and
   records the CPU time of every stage and the peak RSS reached by its end
   (VmHWM), and the RSS after the imports alone (onnxruntime, onnx,
   SciPy: memory no pruning change removes; POT is imported by the first
   transport plan; the L1 costs use the package's C kernel, numba's only where
   that was not built and the run is large enough, see ``plans.use_compiled``);
3. Torch-Pruning (``--tp-python``, a Python with torch, torchvision and
   torch-pruning; skipped with the reason when missing): its
   ``MagnitudePruner`` (L1, ratio 0.5, the fc layer ignored) on torchvision's
   ResNet-50 (random weights) and ``torch.onnx.export`` of the pruned model,
   CPU and wall time of each.  The same interpreter exports the unpruned
   torchvision ResNet-50 that this tool prunes (``tv_resnet50``, cached in
   results/models/).

    python benchmarks/tool_speed.py [--models tv_resnet50 mobilenetv2 resnet_legacy tv_vgg16]
        [--methods intrafusion prune] [--sparsity 0.5] [--repeats 3] [--tp-python /work/tv-venv/bin/python]

CPU time is the main measure (the machine is shared; wall time is printed
too).  Targets on ``tv_resnet50`` at 0.5: Intra-Fusion with validation within
5x of Torch-Pruning's prune + export, ``--method prune`` within 3x, peak RSS
at most 3x the model file.  Results: docs/results/tool_speed.json.
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

STAGES = ("load", "groups", "reference", "plan", "rewrite", "stats", "validate")
THREADS = 2
TP_MODEL = "tv_resnet50"
#: torchvision networks (random weights) exported by the Torch-Pruning interpreter: name -> architecture.
TORCHVISION = {TP_MODEL: "resnet50", "tv_vgg16": "vgg16"}
DEFAULT_TP_PYTHON = "/work/tv-venv/bin/python"


def model_path(name: str, tp_python: str | None = None) -> Path:
    import models as bench_models

    if name in TORCHVISION:
        return tv_export(name, tp_python)
    if name in bench_models.MODELS:
        return bench_models.export(name)
    return ROOT / "samples" / f"{name}.onnx"


def tv_export(name: str, tp_python: str | None) -> Path:
    """A torchvision network of :data:`TORCHVISION` (random weights, eval, legacy exporter, opset 17), exported once."""
    import models as bench_models

    out = bench_models.CACHE / f"{name}.onnx"
    if not out.exists():
        if not tp_python:
            raise SystemExit(f"{name} needs --tp-python (torch and torchvision) to be exported once")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([tp_python, str(Path(__file__).resolve()), "--tp-child", "export", str(out),
                        TORCHVISION[name]], check=True, env=_env())
    return out


def tp_unavailable(tp_python: str | None) -> str | None:
    """Why Torch-Pruning cannot run here, or None."""
    if not tp_python:
        return "no --tp-python given"
    if not Path(tp_python).exists():
        return f"{tp_python} does not exist"
    probe = subprocess.run([tp_python, "-c", "import torch, torchvision, torch_pruning"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"{tp_python} cannot import torch, torchvision and torch_pruning: " \
               f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def tp_child(mode: str, out: str, arch: str = "resnet50") -> None:
    """Child process (torch side): ``export`` the unpruned ``arch``, or ``prune`` ResNet-50 and export it, timed."""
    import importlib.metadata
    import warnings

    import torch
    import torchvision

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    example = torch.randn(1, 3, 224, 224)

    def export() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, out, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

    if mode == "export":
        export()
        return
    import torch_pruning as tp

    params_before = sum(p.numel() for p in model.parameters())
    w0, c0 = time.perf_counter(), time.process_time()
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    w1, c1 = time.perf_counter(), time.process_time()
    model.eval()
    export()
    w2, c2 = time.perf_counter(), time.process_time()
    print(json.dumps(dict(version=importlib.metadata.version("torch-pruning"), torch=torch.__version__,
                          prune_wall_s=w1 - w0, prune_cpu_s=c1 - c0, export_wall_s=w2 - w1, export_cpu_s=c2 - c1,
                          params_before=params_before, params_after=sum(p.numel() for p in model.parameters()),
                          onnx_bytes=os.path.getsize(out))))


def tp_run(tp_python: str, tmp: Path) -> dict:
    wall, cpu, rss, proc = _run([tp_python, str(Path(__file__).resolve()), "--tp-child", "prune",
                                 str(tmp / "tp_pruned.onnx")])
    if proc.returncode:
        raise SystemExit(f"Torch-Pruning run failed: {proc.stderr[-2000:]}")
    return dict(process_wall_s=wall, process_cpu_s=cpu, peak_rss=rss,
                **json.loads(proc.stdout.strip().splitlines()[-1]))


def _env() -> dict:
    threads = str(THREADS)
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=threads, NUMBA_NUM_THREADS=threads,
                MKL_NUM_THREADS=threads)


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


#: The child writes its peak RSS (VmHWM, kB) to this file when it exits (:func:`_write_hwm`).
HWM_ENV = "TOOL_SPEED_HWM"

#: ``python -m onnx_intrafusion`` with the peak written at exit (self-contained: with
#: benchmarks/ on the path, its coverage.py would shadow the module numba imports).
CLI_WRAPPER = ("import atexit, os, sys\n"
               "def _hwm():\n"
               "    with open('/proc/self/status') as f:\n"
               "        kb = next(int(l.split()[1]) for l in f if l.startswith('VmHWM'))\n"
               f"    with open(os.environ['{HWM_ENV}'], 'w') as f:\n"
               "        f.write(str(kb * 1024))\n"
               "atexit.register(_hwm)\n"
               "from onnx_intrafusion.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")


def _vm_hwm() -> int:
    """Peak resident memory of this process in bytes (VmHWM: reset by exec, unlike ``ru_maxrss``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _write_hwm() -> None:
    path = os.environ.get(HWM_ENV)
    if path:
        with open(path, "w") as f:
            f.write(str(_vm_hwm()))


def _run(cmd: list[str]) -> tuple[float, float, int, subprocess.CompletedProcess]:
    """Run ``cmd``; wall and CPU (user+sys) of that process alone (``os.wait4``) and its peak RSS.

    The peak is the child's own VmHWM, written by the child at exit: ``ru_maxrss``
    survives ``exec``, so a child forked from this (larger) process would report the
    parent's size.  Output goes to files, not pipes: a chatty child cannot block on a
    full pipe while we wait.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**_env(), HWM_ENV: hwm.name}, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read(), err.read())
        text = hwm.read().strip()
    if not text:
        raise SystemExit(f"{' '.join(cmd[:3])} ... did not report its peak memory: {done.stderr[-1000:]}")
    return wall, usage.ru_utime + usage.ru_stime, int(text), done


def cli_run(src: Path, method: str, args, tmp: Path) -> dict:
    out, rep = tmp / "out.onnx", tmp / "report.json"
    cmd = [sys.executable, "-c", CLI_WRAPPER, str(src), str(out), "--sparsity", str(args.sparsity),
           "--method", method, "--provider", "cpu", "--report", str(rep), "--quiet", *args.extra]
    wall, cpu, rss, proc = _run(cmd)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    report = json.loads(rep.read_text())
    return dict(wall_s=wall, cpu_s=cpu, peak_rss=rss, timings=report["timings_s"],
                macs=report["macs"], params=report["params"])


def probe_run(src: Path, method: str, args, tmp: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(src), str(tmp / "probe.onnx"),
           str(args.sparsity), method, *args.extra]
    wall, cpu, rss, proc = _run(cmd)
    if proc.returncode:
        raise SystemExit(f"probe failed: {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(src: str, out: str, sparsity: str, method: str, extra: list[str] = ()) -> None:
    """Child process: the CLI's work, with CPU time and peak RSS at every stage boundary."""

    def peak() -> int:
        return _vm_hwm()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    t0 = time.perf_counter()
    marks: list[tuple[str, float, float, int]] = []
    from onnx_intrafusion.cli import build_parser, options_from_args
    from onnx_intrafusion.model_io import save_model
    from onnx_intrafusion.pipeline import prune
    from onnx_intrafusion.model_io import map_large_allocations

    map_large_allocations()
    after_imports = rss()
    marks.append(("imports", time.perf_counter() - t0, time.process_time(), peak()))

    def progress(msg: str) -> None:
        if msg.endswith(" ..."):
            marks.append((msg[:-4], time.perf_counter() - t0, time.process_time(), peak()))

    # The command line's options (its defaults differ from the library's, e.g. --target auto).
    options = options_from_args(build_parser().parse_args(
        [src, out, "--sparsity", sparsity, "--method", method, "--provider", "cpu", *extra]))
    result = prune(src, options=options, progress=progress)
    marks.append(("save", time.perf_counter() - t0, time.process_time(), peak()))
    save_model(result.model, out)
    marks.append(("end", time.perf_counter() - t0, time.process_time(), peak()))
    # Peak by the end of each stage = the peak when the next one starts.
    stages, cpu = {}, {}
    for (name, _, c, _), (_, _, c_next, p_next) in zip(marks, marks[1:]):
        stages[name] = p_next
        cpu[name] = c_next - c
    print(json.dumps(dict(peak_by_end_of=stages, cpu_s_by_stage=cpu, after_imports=after_imports,
                          work_cpu_s=marks[-1][2] - marks[0][2])))


def mb(n: float) -> str:
    return f"{n / 1e6:.0f}"


def main(argv=None) -> int:
    if os.environ.get(HWM_ENV):
        import atexit

        atexit.register(_write_hwm)
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--probe":
        # benchmarks/ off the path: its coverage.py would shadow the module numba imports.
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        probe(*sys.argv[2:6], extra=sys.argv[6:])
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--tp-child":
        tp_child(*sys.argv[2:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[TP_MODEL, "mobilenetv2", "resnet_legacy"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=["intrafusion", "prune"])
    p.add_argument("--repeats", type=int, default=3, help="runs per model, method and tool (median)")
    p.add_argument("--tp-python", default=DEFAULT_TP_PYTHON,
                   help="Python with torch, torchvision and torch-pruning ('' skips Torch-Pruning)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI options, last")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "tool_speed.json"))
    args = p.parse_args(argv)

    why_not = tp_unavailable(args.tp_python)
    if why_not:
        print(f"# Torch-Pruning skipped: {why_not}")
        if TP_MODEL in args.models and not (bench_cache() / f"{TP_MODEL}.onnx").exists():
            print(f"# {TP_MODEL} cannot be exported without it: resnet50 (benchmarks/models.py) instead")
            args.models = ["resnet50" if m == TP_MODEL else m for m in args.models]
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at start; sparsity {args.sparsity}, "
          f"validation on CPU, {THREADS} threads, median of {args.repeats}")
    print(f"{'model':<14} {'method':<12} {'MB':>5} {'cpu s':>6} {'work cpu':>8} {'wall s':>7} "
          + " ".join(f"{s:>8}" for s in STAGES) + f" {'peak MB':>8} {'x model':>7} {'imports MB':>10}")
    rows = []
    for name in args.models:
        src = model_path(name, None if why_not else args.tp_python)
        size = model_bytes(src)
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                runs = [cli_run(src, method, args, Path(tmp)) for _ in range(args.repeats)]
                mems = [probe_run(src, method, args, Path(tmp)) for _ in range(args.repeats)]
            mid = _median_run(runs, "cpu_s")
            mem = _median_run(mems, "work_cpu_s")
            peak = statistics.median(r["peak_rss"] for r in runs)
            row = dict(model=name, method=method, model_bytes=size, cpu_s=statistics.median(r["cpu_s"] for r in runs),
                       wall_s=statistics.median(r["wall_s"] for r in runs),
                       work_cpu_s=statistics.median(m["work_cpu_s"] for m in mems),
                       peak_rss=peak, peak_over_model=peak / size,
                       peak_above_imports_over_model=(peak - mem["after_imports"]) / size,
                       timings=mid["timings"], runs=runs, memory=mem, memory_runs=mems,
                       sparsity=args.sparsity, extra=args.extra)
            rows.append(row)
            print(f"{name:<14} {method:<12} {mb(size):>5} {row['cpu_s']:>6.1f} {row['work_cpu_s']:>8.1f} "
                  f"{row['wall_s']:>7.1f} " + " ".join(f"{mid['timings'].get(s, 0):>8.2f}" for s in STAGES)
                  + f" {mb(peak):>8} {peak / size:>7.1f} {mb(mem['after_imports']):>10}", flush=True)
            print(f"{'':<27} CPU s by stage: " + "  ".join(f"{k} {v:.2f}" for k, v in mem["cpu_s_by_stage"].items())
                  + f"\n{'':<27} peak MB by end of stage: "
                  + "  ".join(f"{k} {mb(v)}" for k, v in mem["peak_by_end_of"].items())
                  + f"  (after imports {mb(mem['after_imports'])})", flush=True)
    result = dict(load_end=None, threads=THREADS, repeats=args.repeats, rows=rows, torch_pruning=None,
                  torch_pruning_skipped=why_not)
    if not why_not:
        with tempfile.TemporaryDirectory() as tmp:
            tps = [tp_run(args.tp_python, Path(tmp)) for _ in range(args.repeats)]
        tp = {k: statistics.median(r[k] for r in tps) for k in tps[0] if isinstance(tps[0][k], float)}
        tp.update(version=tps[0]["version"], torch=tps[0]["torch"], params_before=tps[0]["params_before"],
                  params_after=tps[0]["params_after"], peak_rss=statistics.median(r["peak_rss"] for r in tps),
                  runs=tps)
        tp["prune_export_cpu_s"] = statistics.median(r["prune_cpu_s"] + r["export_cpu_s"] for r in tps)
        tp["prune_export_wall_s"] = statistics.median(r["prune_wall_s"] + r["export_wall_s"] for r in tps)
        result["torch_pruning"] = tp
        result["side_by_side"] = side_by_side(rows, tp)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"# load {os.getloadavg()[0]:.2f} at end; wrote {args.out}")
    return 0


#: Targets on ResNet-50 at 0.5: this tool's CPU time over Torch-Pruning's prune + export, per method.
TIME_TARGETS = {"intrafusion": 5.0, "prune": 3.0}
MEMORY_TARGET = 3.0  # peak RSS over the model file


def side_by_side(rows: list[dict], tp: dict) -> list[dict]:
    """The table of both tools on the comparison model, with the ratios to the targets."""
    print(f"\n# Side by side, ResNet-50 at 0.5, {THREADS} threads, median of the runs; CPU s = user+sys")
    print(f"{'tool':<34} {'work cpu s':>10} {'process cpu s':>13} {'wall s':>7} {'peak MB':>8} "
          f"{'x TP work':>9} {'target':>6}")
    print(f"{'Torch-Pruning ' + tp['version'] + ' prune + export':<34} {tp['prune_export_cpu_s']:>10.2f} "
          f"{tp['process_cpu_s']:>13.2f} {tp['prune_export_wall_s']:>7.2f} {mb(tp['peak_rss']):>8} {1.0:>9.1f} {'':>6}")
    print(f"{'  of which prune / export':<34} {tp['prune_cpu_s']:>5.2f} / {tp['export_cpu_s']:.2f}")
    table = []
    for row in rows:
        if row["model"] != TP_MODEL:
            continue
        ratio = row["work_cpu_s"] / tp["prune_export_cpu_s"]
        process_ratio = row["cpu_s"] / tp["process_cpu_s"]
        target = TIME_TARGETS.get(row["method"])
        label = f"onnx_intrafusion {row['method']} + validation"
        print(f"{label:<34} {row['work_cpu_s']:>10.2f} {row['cpu_s']:>13.2f} {row['wall_s']:>7.2f} "
              f"{mb(row['peak_rss']):>8} {ratio:>9.1f} {target or '':>6}")
        table.append(dict(method=row["method"], work_cpu_s=row["work_cpu_s"], process_cpu_s=row["cpu_s"],
                          over_tp_work=ratio, over_tp_process=process_ratio, time_target=target,
                          time_target_met=target is not None and ratio <= target,
                          peak_over_model=row["peak_over_model"],
                          peak_above_imports_over_model=row["peak_above_imports_over_model"],
                          memory_target=MEMORY_TARGET, memory_target_met=row["peak_over_model"] <= MEMORY_TARGET))
        print(f"{'':<34} peak {row['peak_over_model']:.1f}x the model file "
              f"({row['peak_above_imports_over_model']:.1f}x above the imports); target {MEMORY_TARGET:g}x")
    return table


def _median_run(runs: list[dict], key: str) -> dict:
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def bench_cache() -> Path:
    import models as bench_models

    return bench_models.CACHE


if __name__ == "__main__":
    sys.exit(main())
