#!/usr/bin/env python
"""Where the time of a pruned model goes in onnxruntime CPU, per op kind, against the original.

Runs original and pruned models (the speed benchmark's cached models, default
options) with onnxruntime's profiler (``SessionOptions.enable_profiling``),
one thread, full graph optimisation (so the nodes are the ones onnxruntime
really runs: Conv+Clip fused, NCHWc convs and their layout reorders), and
sums per op kind the median kernel time of every node over the profiled runs
(the first runs are dropped as warm-up).  Per kind it also sums the MACs (from
the shapes the profiler records) and the bytes a kernel reads and writes
(activations + weights + outputs, float32), so one sees which kinds shrink
with the MACs and which only with the memory traffic.

Kinds: ``conv`` (dense and 1x1 convs), ``depthwise`` (group = channels),
``gemm`` (Gemm/MatMul/FusedGemm), ``reorder`` (NCHWc layout changes),
``other`` (Add, activations, pooling, reshapes).

    python benchmarks/op_profile.py --models mobilenetv2 --batches 1 16     # docs/results/speed_ops.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402

OUT = speed.ROOT / "docs" / "results" / "speed_ops.json"
KINDS = ("conv", "depthwise", "gemm", "reorder", "other")


def kind(op: str, shapes: list[list[int]]) -> str:
    if op == "Conv":
        x, w = shapes[0], shapes[1]
        return "depthwise" if w[1] == 1 and x[1] == w[0] and w[0] > 1 else "conv"
    if op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
        return "gemm"
    if op in ("ReorderInput", "ReorderOutput"):
        return "reorder"
    return "other"


def macs(op: str, ins: list[list[int]], outs: list[list[int]]) -> int:
    if op == "Conv":
        return int(np.prod(outs[0])) * int(np.prod(ins[1][1:]))
    if op in ("Gemm", "MatMul", "FusedGemm", "FusedMatMul"):
        return int(np.prod(outs[0])) * int(ins[0][-1])
    return 0


def _shapes(entries) -> list[list[int]]:
    return [next(iter(e.values())) for e in entries or []]


def profile(path: Path, batch: int, runs: int, warmup: int) -> dict[str, dict]:
    """Per node: op, kind, median µs over the profiled runs, MACs, bytes read + written."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(speed.WORK / "ortprofile")
    speed.WORK.mkdir(parents=True, exist_ok=True)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name, dims = speed.input_spec(path)
    x = np.random.default_rng(0).standard_normal([batch if d is None else d for d in dims]).astype(np.float32)
    for _ in range(warmup + runs):
        sess.run(None, {name: x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    durs: dict[str, list[float]] = defaultdict(list)
    info: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node, args = e["name"][: -len("_kernel_time")], e["args"]
        durs[node].append(e["dur"])
        if node not in info:
            ins, outs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
            op = args["op_name"]
            info[node] = dict(op=op, kind=kind(op, ins), macs=macs(op, ins, outs),
                              bytes=sum(int(args.get(k, 0)) for k in ("activation_size", "parameter_size",
                                                                      "output_size")),
                              inputs=ins, outputs=outs)
    for node, d in durs.items():
        info[node]["us"] = statistics.median(d[warmup:] or d)
    return info


def by_kind(nodes: dict[str, dict]) -> dict[str, dict]:
    out = {k: dict(ms=0.0, macs=0, bytes=0, nodes=0) for k in KINDS}
    for n in nodes.values():
        k = out[n["kind"]]
        k["ms"] += n["us"] / 1e3
        k["macs"] += n["macs"]
        k["bytes"] += n["bytes"]
        k["nodes"] += 1
    out["total"] = {f: sum(out[k][f] for k in KINDS) for f in ("ms", "macs", "bytes", "nodes")}
    return out


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def table(rows: list[dict]) -> str:
    head = ("| model | batch | sparsity | kind | ms orig -> pruned | time share orig -> pruned | speed-up | "
            "MACs ratio | bytes ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        o, p = r["orig"], r["pruned"]
        for k in (*KINDS, "total"):
            if not o[k]["nodes"] and not p[k]["nodes"]:
                continue
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['sparsity']} | {k} | {o[k]['ms']:.2f} -> {p[k]['ms']:.2f} | "
                f"{100 * o[k]['ms'] / o['total']['ms']:.0f}% -> {100 * p[k]['ms'] / p['total']['ms']:.0f}% | "
                f"{f(ratio(o[k]['ms'], p[k]['ms']))} | {f(ratio(o[k]['macs'], p[k]['macs']))} | "
                f"{f(ratio(o[k]['bytes'], p[k]['bytes']))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobilenetv2"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--runs", type=int, default=20, help="profiled runs at batch 1 (fewer for larger batches)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--markdown", action="store_true", help="print --out as a Markdown table, run nothing")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.markdown:
        print(table(json.loads(out.read_text())["rows"]))
        return 0
    rows = []
    for model in args.models:
        src = speed.model_path(model)
        for batch in args.batches:
            runs = max(3, args.runs // batch)
            orig = profile(src, batch, runs, warmup=2)
            for s in args.sparsities:
                pruned = profile(speed.pruned_path(model, src, s, "default", "prune"), batch, runs, warmup=2)
                rows.append(dict(model=model, batch=batch, sparsity=s, runs=runs, orig=by_kind(orig),
                                 pruned=by_kind(pruned), nodes_orig=orig, nodes_pruned=pruned))
                print(table(rows[-1:]), flush=True)
    import onnxruntime as ort

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   argv=sys.argv[1:] if argv is None else argv, load=os.getloadavg(),
                                   onnxruntime=ort.__version__, threads=1, rows=rows), indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
