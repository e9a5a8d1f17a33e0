"""Inference speed of pruned models: onnxruntime CPU latency next to the MAC reduction.

For every model and sparsity the model is pruned (``--method prune`` by
default: Intra-Fusion gives the same architecture, only other weights), then
original and pruned models run in onnxruntime on the CPU with the intra-op
threads pinned to the machine's cores, sequential execution, full graph
optimisations.  After a warm-up, the models are timed in interleaved rounds
(orig, p0.3, p0.5, ..., orig, ...) so that load from other processes hits
all of them alike; the table shows the median per model.

    python benchmarks/speed.py                       # resnet50, mobilenetv2, samples; 0.3/0.5/0.7; batch 1, 32
    python benchmarks/speed.py --models resnet50 --sparsities 0.5 --batches 32 --round-to 8

``speed-up`` = original / pruned latency; ``ideal`` = MACs before / after;
``eff`` = speed-up / ideal (the target is >= 0.8 at batch 32, sparsity 0.5
on resnet50).  Results: docs/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models as bench_models  # noqa: E402

from onnx_intrafusion import prune  # noqa: E402
from onnx_intrafusion.model_io import save_model  # noqa: E402
from onnx_intrafusion.report import count_macs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"  # committed JSON
MODEL_CACHE = ROOT / "results"  # exported models (gitignored)
SAMPLES = ("vgg_dynbatch_legacy", "resnet_legacy", "mobilenetv2_legacy")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray] | None:
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else batch for d in inp.shape]
    if isinstance(inp.shape[0], int) and inp.shape[0] != batch:
        return None  # fixed batch: this batch size does not apply
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def model_path(name: str) -> Path:
    if name in bench_models.MODELS:
        return bench_models.export(name)
    return ROOT / "samples" / f"{name}.onnx"


def pruned_path(name: str, src: Path, sparsity: float, args) -> Path:
    tag = f"{args.method}-{args.allocation}-r{args.round_to}-s{sparsity}"
    out = MODEL_CACHE / "speed_models" / f"{name}-{tag}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        result = prune(src, sparsity=sparsity, method=args.method, round_to=args.round_to,
                       allocation=args.allocation, validate=False)
        save_model(result.model, out)
    return out


def time_models(paths: dict[str, Path], batch: int, threads: int, warmup: int, repeats: int,
                budget: float, cpu: bool = False) -> dict[str, list[float]]:
    """Seconds per run of each model, interleaved rounds.

    ``cpu``: one intra-op thread and the CPU time of the calling thread (which
    then does all the work): insensitive to other processes on the machine.
    """
    clock = time.thread_time if cpu else time.perf_counter
    sessions = {k: session(p, 1 if cpu else threads) for k, p in paths.items()}
    feeds = {k: feed(s, batch) for k, s in sessions.items()}
    if any(f is None for f in feeds.values()):
        return {}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    for r in range(repeats):
        for k, s in sessions.items():
            t = clock()
            s.run(None, feeds[k])
            times[k].append(clock() - t)
        if r >= 4 and time.perf_counter() - start > budget:
            break
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[*bench_models.MODELS, *SAMPLES])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--method", default="prune", choices=("prune", "intrafusion"))
    p.add_argument("--allocation", default="uniform", choices=("uniform", "global"))
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--threads", type=int, default=cores(), help="onnxruntime intra-op threads (default: cores)")
    p.add_argument("--mode", nargs="+", default=["wall", "cpu"], choices=("wall", "cpu"),
                   help="wall: latency with --threads threads; cpu: CPU time of a 1-thread run (robust to load)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds at most (at least 5)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per model and batch")
    p.add_argument("--out", default=str(RESULTS / "speed.json"))
    args = p.parse_args(argv)

    rows = []
    header = (f"{'model':<20} {'mode':>4} {'batch':>5} {'sparsity':>8} {'MACs(b=1)':>11} {'ideal':>6} {'orig ms':>9} "
              f"{'pruned ms':>9} {'speed-up':>8} {'eff':>5} {'runs':>4}")
    print(f"# {platform.node()}  {cores()} cores, ort {ort.__version__}, threads {args.threads}, "
          f"load {os.getloadavg()[0]:.2f} at start")
    print(header)
    for name in args.models:
        src = model_path(name)
        macs0 = count_macs(onnx.load(str(src)))
        variants = {f"s{s}": pruned_path(name, src, s, args) for s in args.sparsities}
        macs = {k: count_macs(onnx.load(str(v))) for k, v in variants.items()}
        for mode, batch in [(m, b) for b in args.batches for m in args.mode]:
            times = time_models({"orig": src, **variants}, batch, args.threads, args.warmup, args.repeats,
                                args.budget, cpu=mode == "cpu")
            if not times:
                continue
            orig = statistics.median(times["orig"])
            for s in args.sparsities:
                k = f"s{s}"
                med = statistics.median(times[k])
                ideal = macs0 / macs[k]
                row = dict(model=name, mode=mode, threads=1 if mode == "cpu" else args.threads, batch=batch, sparsity=s, method=args.method, allocation=args.allocation,
                           round_to=args.round_to, macs_before=macs0, macs_after=macs[k], ideal_speedup=ideal,
                           orig_ms=orig * 1e3, pruned_ms=med * 1e3, speedup=orig / med,
                           efficiency=orig / med / ideal, runs=len(times[k]),
                           orig_ms_all=[t * 1e3 for t in times["orig"]], pruned_ms_all=[t * 1e3 for t in times[k]])
                rows.append(row)
                print(f"{name:<20} {mode:>4} {batch:>5} {s:>8} {macs[k] / 1e6:>10.0f}M {ideal:>6.2f} {orig * 1e3:>9.2f} "
                      f"{med * 1e3:>9.2f} {orig / med:>8.2f} {orig / med / ideal:>5.2f} {len(times[k]):>4}",
                      flush=True)
    meta = dict(machine=platform.node(), cores=cores(), threads=args.threads, ort=ort.__version__,
                load_end=os.getloadavg(), argv=sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"# load {os.getloadavg()[0]:.2f} at end; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
