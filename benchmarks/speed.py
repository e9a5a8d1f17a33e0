"""Inference speed of pruned models on several runtimes, next to the MAC reduction.

Runtimes (each skipped with a note when its package is missing):

* ``ort``: onnxruntime, CPU provider (CUDA and TensorRT providers too when
  onnxruntime-gpu sees a GPU: ``--runtimes ort-cuda ort-trt``), full graph
  optimisation, sequential executor;
* ``openvino``: OpenVINO on CPU, f32 inference precision (its default on
  CPUs with bf16 units would be bf16, which is not what we compare), the
  ONNX file read directly;
* ``mnn``: MNN (the ``mnn`` wheel), ONNX converted to ``.mnn`` by MNN's own
  converter, high precision, CPU.  The converter is called through its
  native module: the wheel's ``mnnconvert`` script pip-installs a logging
  SDK at first run (which downgrades protobuf below what onnx needs) and
  sends usage logs;
* ``ncnn``: ncnn (the ``ncnn`` wheel), ONNX converted by pnnx (the ``pnnx``
  wheel; ``pip install ncnn pnnx``), float32 weights and arithmetic, CPU; ncnn
  has no batch axis, so a batch is run image by image.

Two modes per batch size:

* ``cpu``: one thread, CPU time of the process per run (``process_time``)
  -- what other processes on a shared machine cannot inflate;
* ``wall``: latency with ``--threads`` threads (default: the cores).

Models are timed in interleaved rounds (orig, pruned@0.3, ..., orig, ...) so
that load from other processes hits them alike; medians are reported.
``ideal`` = MACs before / after (batch 1), ``speed-up`` = original / pruned
median, ``eff`` = speed-up / ideal; ``traffic_ratio`` = bytes read and written
by all nodes before / after (batch 1, :func:`traffic_bytes`), ``eff-bytes`` =
speed-up / traffic_ratio: memory-bound layers (depthwise convs, element-wise
ops) shrink with the bytes, compute-bound ones with the MACs.

    python benchmarks/speed.py --quick                          # everything, short
    python benchmarks/speed.py --models resnet50 --runtimes ort --round-to 1 4 8 16 32
    python benchmarks/speed.py --models mobilenetv2 --sparsities 0.3 --runtimes ort openvino mnn

``--round-to`` values are variants of the pruned model (``default`` = the
tool's default options, i.e. ``--target auto``).  Results are appended to
``--out`` (default docs/results/speed.json) after every measurement; rows
already there (same model, runtime, mode, batch, variant) are skipped, so an
interrupted run resumes.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import models as bench_models  # noqa: E402

from onnx_intrafusion import prune  # noqa: E402
from onnx_intrafusion.model_io import save_model  # noqa: E402
from onnx_intrafusion.model_io import weightless  # noqa: E402
from onnx_intrafusion.report import _folded, _shape_inferred, _shapes, count_macs  # noqa: E402

WORK = ROOT / "results" / "speed_models"  # pruned and converted models (not committed)
OUT = ROOT / "docs" / "results" / "speed.json"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def model_path(name: str) -> Path:
    if name in bench_models.MODELS + bench_models.TORCHVISION:
        return bench_models.export(name)
    return ROOT / "samples" / f"{name}.onnx"


def pruned_path(name: str, src: Path, sparsity: float, round_to: str, method: str) -> Path:
    out = WORK / f"{name}-{method}-r{round_to}-s{sparsity}.onnx"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # "default": what the command line does without options (--target auto)
        rt = None if round_to == "default" else int(round_to)
        result = prune(src, sparsity=sparsity, method=method, round_to=rt, target="auto", validate=False)
        save_model(result.model, out)
    return out


def traffic_bytes(model: onnx.ModelProto) -> int | None:
    """Bytes every node reads and writes at batch 1 (activations + weights + outputs, 4 per float).

    A memory-traffic proxy next to the MACs: depthwise convolutions, activations
    and residual adds shrink only linearly with the channels, 1x1 convs
    quadratically, so a pruned model's speed-up lies between this ratio and the
    MACs ratio.  None when some shape is unknown.
    """
    def count(inferred: onnx.ModelProto | None) -> int | None:
        if inferred is None:
            return None
        shapes, total = _shapes(inferred), 0
        for node in inferred.graph.node:
            if node.op_type in ("Shape", "Constant", "ConstantOfShape"):
                continue
            for t in (*node.input, *node.output):
                if not t:
                    continue
                if not _known(shapes.get(t)):
                    return None
                total += 4 * int(np.prod(shapes[t]))
        return total

    # shapes computed from Shape ops (attention reshapes) need the folded model; that graph's nodes are counted
    return count(_shape_inferred(weightless(model))) or count(_folded(model))


def _known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


def input_spec(path: Path) -> tuple[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


# -- runtimes: load(path, batch, threads) -> run(x) ------------------------------------------------

def ort_loader(provider: str):
    def load(path: Path, batch: int, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads == 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
        if sess.get_providers()[0] != provider:
            raise RuntimeError(f"{provider} not usable")
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})

    return load


def openvino_load(path: Path, batch: int, threads: int):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    name, dims = input_spec(path)
    model.reshape({model.inputs[0]: ov.PartialShape([batch if d is None else d for d in dims])})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def mnn_convert(path: Path) -> Path:
    out = path.with_suffix(".mnn")
    if not out.exists():
        import MNN  # noqa: F401  (loads the native converter module below)
        import _tools

        tmp = out.with_suffix(".tmp.mnn")
        _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(path), "--MNNModel", str(tmp),
                           "--bizCode", "bench"])
        if not tmp.exists():
            raise RuntimeError("MNN converter wrote nothing")
        tmp.replace(out)
    return out


def mnn_load(path: Path, batch: int, threads: int):
    import MNN.expr as F
    import MNN.nn as nn

    mnn_file = mnn_convert(path)
    rt = nn.create_runtime_manager(({"precision": "high", "numThread": threads, "backend": "CPU"},))
    module = nn.load_module_from_file(str(mnn_file), [], [], runtime_manager=rt)

    def run(x):
        out = module.forward(F.const(x.ravel(), list(x.shape), F.NCHW))
        return out.read() if hasattr(out, "read") else [o.read() for o in out]

    return run


def ncnn_convert(path: Path) -> tuple[Path, Path]:
    """ONNX -> ncnn ``.param``/``.bin`` with pnnx (the ``pnnx`` wheel's converter), float32 weights."""
    import subprocess
    import tempfile

    import pnnx

    param, weights = path.with_suffix(".ncnn.param"), path.with_suffix(".ncnn.bin")
    if param.exists() and weights.exists():
        return param, weights
    _, dims = input_spec(path)
    shape = ",".join(str(1 if d is None else d) for d in dims)
    with tempfile.TemporaryDirectory(prefix="pnnx-") as tmp:
        t = Path(tmp)
        side = {k: t / f"m.{k}" for k in ("pnnxparam", "pnnxbin", "pnnxpy", "pnnxonnx", "ncnnpy")}
        cmd = [pnnx.EXEC_PATH, str(path), f"inputshape=[{shape}]", "fp16=0", f"ncnnparam={t / 'm.param'}",
               f"ncnnbin={t / 'm.bin'}", *(f"{k}={v}" for k, v in side.items())]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0 or not (t / "m.param").exists():
            raise RuntimeError(f"pnnx failed: {(done.stderr or done.stdout).strip()[-300:]}")
        (t / "m.bin").replace(weights)
        (t / "m.param").replace(param)
    return param, weights


def ncnn_load(path: Path, batch: int, threads: int):
    """ncnn (CPU, float32 storage and arithmetic): one image per extractor, as ncnn has no batch axis."""
    import ncnn

    param, weights = ncnn_convert(path)
    net = ncnn.Net()
    for flag in ("use_vulkan_compute", "use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                 "use_bf16_storage"):
        setattr(net.opt, flag, False)
    net.opt.num_threads = threads
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise RuntimeError("ncnn cannot load the converted model")

    def run(x):
        outs = []
        for image in x:
            ex = net.create_extractor()
            ex.input("in0", ncnn.Mat(np.ascontiguousarray(image)))
            _, out = ex.extract("out0")
            outs.append(np.array(out))
        return outs

    run.keep = net  # the extractors need the net alive
    return run


RUNTIMES = {
    "ort": ort_loader("CPUExecutionProvider"),
    "ort-cuda": ort_loader("CUDAExecutionProvider"),
    "ort-trt": ort_loader("TensorrtExecutionProvider"),
    "openvino": openvino_load,
    "mnn": mnn_load,
    "ncnn": ncnn_load,
}


def time_models(runners: dict, x: np.ndarray, cpu: bool, warmup: int, repeats: int, budget: float
                ) -> dict[str, list[float]]:
    clock = time.process_time if cpu else time.perf_counter
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    start = time.perf_counter()
    for r in range(repeats):
        for k, run in runners.items():
            t = clock()
            run(x)
            times[k].append(clock() - t)
        if r >= 2 and time.perf_counter() - start > budget:
            break
    return times


def key(row: dict) -> tuple:
    return (row["model"], row["runtime"], row["mode"], row["batch"], row["sparsity"], str(row["round_to"]),
            row["method"])


def markdown(rows: list[dict], by_round_to: bool) -> str:
    """The JSON rows as a Markdown table (speed-up and efficiency per runtime)."""
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    keys = sorted({(r["model"], r["mode"], r["batch"], str(r["round_to"]), r["sparsity"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], int(k[3]) if k[3].isdigit() else 0, k[4]))
    first = "round-to | " if by_round_to else ""
    head = (f"| model | mode | batch | {first}sparsity | MACs ratio | bytes ratio | "
            + " | ".join(f"{rt} ms orig -> pruned | {rt} speed-up (eff, eff-bytes)" for rt in runtimes) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, mode, batch, rt_, sparsity in keys:
        cells, ideal, traffic = [], None, None
        for rt in runtimes:
            row = next((r for r in rows if (r["model"], r["mode"], r["batch"], str(r["round_to"]), r["sparsity"], r["runtime"])
                        == (model, mode, batch, rt_, sparsity, rt)), None)
            if row is None:
                cells += ["-", "-"]
                continue
            ideal, traffic = row["ideal_speedup"], row.get("traffic_ratio")
            if "error" in row:
                cells += ["fails to load", "-"]
            else:
                by_bytes = f", {row['speedup'] / traffic:.2f}" if traffic else ""
                cells += [f"{row['orig_ms']:.1f} -> {row['pruned_ms']:.1f}",
                          f"{row['speedup']:.2f}x ({row['efficiency']:.2f}{by_bytes})"]
        first = f"{rt_} | " if by_round_to else ""
        tr = "-" if traffic is None else f"{traffic:.2f}"
        lines.append(f"| {model} | {mode} | {batch} | {first}{sparsity} | {ideal:.2f} | {tr} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(bench_models.MODELS))
    p.add_argument("--runtimes", nargs="+", default=["ort", "openvino", "mnn", "ncnn"], choices=list(RUNTIMES))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--round-to", nargs="+", default=["default"], help="variants: default (= --target auto) or N")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--mode", nargs="+", default=["cpu", "wall"], choices=("cpu", "wall"))
    p.add_argument("--method", default="prune", choices=("prune", "intrafusion"),
                   help="same architecture either way; prune is faster to produce")
    p.add_argument("--threads", type=int, default=cores())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds at most (at least 3)")
    p.add_argument("--budget", type=float, default=40.0, help="seconds of timed rounds per runtime, mode, batch")
    p.add_argument("--quick", action="store_true", help="warmup 1, repeats 5, budget 10 s")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--markdown", action="store_true", help="print --out's rows as a Markdown table, run nothing")
    args = p.parse_args(argv)
    if args.markdown:
        rows = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["mode"] in args.mode]
        print(markdown(rows, len({str(r["round_to"]) for r in rows}) > 1))
        return 0
    if args.quick:
        args.warmup, args.repeats, args.budget = 1, 5, 10.0

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"runs": [], "rows": []}
    done = {key(r) for r in data["rows"]}
    data["runs"].append(dict(machine=platform.node(), processor=platform.processor(), cores=cores(),
                             threads=args.threads, argv=sys.argv[1:] if argv is None else argv,
                             load_start=os.getloadavg(), started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())))
    versions = {}
    for mod in ("onnxruntime", "openvino", "MNN", "ncnn", "pnnx"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "installed")
        except ImportError:
            versions[mod] = None
    data["runs"][-1]["versions"] = versions

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        data["runs"][-1]["load_end"] = os.getloadavg()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)

    print(f"# {cores()} cores, threads {args.threads}, load {os.getloadavg()[0]:.2f} at start, {versions}")
    print(f"{'model':<12} {'runtime':<9} {'mode':>4} {'batch':>5} {'variant':>8} {'sparsity':>8} {'ideal':>6} "
          f"{'orig ms':>9} {'pruned ms':>9} {'speed-up':>8} {'eff':>5}")
    for name in args.models:
        src = model_path(name)
        macs0 = count_macs(onnx.load(str(src)))
        variants = {(s, r): pruned_path(name, src, s, r, args.method) for r in args.round_to for s in args.sparsities}
        macs = {v: count_macs(onnx.load(str(path))) for v, path in variants.items()}
        bytes0 = traffic_bytes(onnx.load(str(src)))
        traffic = {v: traffic_bytes(onnx.load(str(path))) for v, path in variants.items()}
        for runtime in args.runtimes:
            for batch in args.batches:
                for mode in args.mode:
                    todo = {v: path for v, path in variants.items()
                            if (name, runtime, mode, batch, v[0], str(v[1]), args.method) not in done}
                    if not todo:
                        continue
                    threads = 1 if mode == "cpu" else args.threads
                    load = RUNTIMES[runtime]
                    try:
                        runners = {"orig": load(src, batch, threads)}
                    except Exception as exc:  # noqa: BLE001 - runtime missing or cannot load the original
                        print(f"{name:<12} {runtime:<9} skipped: {' '.join(str(exc).split())[:150]}")
                        break
                    errors = {}
                    for v, path in todo.items():
                        try:
                            runners[v] = load(path, batch, threads)
                        except Exception as exc:  # noqa: BLE001 - loads the original but not the pruned model
                            errors[v] = " ".join(str(exc).split())[:300]
                    _, dims = input_spec(src)
                    x = np.random.default_rng(0).standard_normal(
                        [batch if d is None else d for d in dims]).astype(np.float32)
                    if dims[0] is not None and dims[0] != batch:
                        break
                    times = time_models(runners, x, mode == "cpu", args.warmup, args.repeats, args.budget)
                    orig = statistics.median(times["orig"])
                    for v in todo:
                        s, r = v
                        ideal = macs0 / macs[v]
                        row = dict(model=name, runtime=runtime, mode=mode, threads=threads, batch=batch, sparsity=s,
                                   round_to=r, method=args.method, macs_before=macs0, macs_after=macs[v],
                                   ideal_speedup=ideal, orig_ms=orig * 1e3, runs=len(times["orig"]),
                                   bytes_before=bytes0, bytes_after=traffic[v],
                                   traffic_ratio=bytes0 / traffic[v] if bytes0 and traffic[v] else None,
                                   measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
                        if v in errors:
                            row.update(error=errors[v])
                            print(f"{name:<12} {runtime:<9} {mode:>4} {batch:>5} {r:>8} {s:>8} pruned model "
                                  f"FAILED to load: {errors[v][:120]}")
                        else:
                            med = statistics.median(times[v])
                            row.update(pruned_ms=med * 1e3, speedup=orig / med, efficiency=orig / med / ideal,
                                       orig_ms_all=[t * 1e3 for t in times["orig"]],
                                       pruned_ms_all=[t * 1e3 for t in times[v]])
                            print(f"{name:<12} {runtime:<9} {mode:>4} {batch:>5} {r:>8} {s:>8} {ideal:>6.2f} "
                                  f"{orig * 1e3:>9.2f} {med * 1e3:>9.2f} {orig / med:>8.2f} {orig / med / ideal:>5.2f}",
                                  flush=True)
                        data["rows"].append(row)
                        done.add(key(row))
                    save()
    save()
    print(f"# load {os.getloadavg()[0]:.2f} at end; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
