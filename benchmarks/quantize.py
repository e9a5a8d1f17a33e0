"""Prune, then quantize to int8, on the bundled Fashion-MNIST models.

Four models per network: the original fp32, pruned fp32, pruned int8
(``--quantize int8``, i.e. prune + recovery + static QDQ quantization on the
same calibration data), and quantized-only (the original through the same
quantizer).  For each: test accuracy on Fashion-MNIST's test split, file size,
and latency in onnxruntime CPU and OpenVINO CPU (CPU time of a one-thread run,
median of interleaved rounds, as in benchmarks/speed.py).

    python benchmarks/quantize.py                                  # all bundled models, sparsity 0.3
    python benchmarks/quantize.py --models resnet18_legacy --sparsity 0.5 --test-samples 2000
    python benchmarks/quantize.py --sparsity 0.2 --recover distill    # distillation (torch) before int8

Calibration: ``--calibration-samples`` images of the *training* split (labels
unused).  Results are appended to docs/results/quantize.json (rows already
there for the same model, sparsity and options are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import speed  # noqa: E402
from datasets import load_fashion_mnist  # noqa: E402

from onnx_intrafusion import calibration as calibration_mod, deploy, prune  # noqa: E402
from onnx_intrafusion.report import count_macs  # noqa: E402

FASHION = ROOT / "samples" / "fashion"
OUT = ROOT / "docs" / "results" / "quantize.json"
MODELS = ("vgg11bn_legacy", "resnet18_legacy", "mobilenetv2_legacy")


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    preds = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float(np.mean(preds == y))


def latencies(paths: dict[str, Path], runtime: str, batch: int, args) -> dict[str, float]:
    load = speed.RUNTIMES[runtime]
    runners = {k: load(p, batch, 1) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28)).astype(np.float32)
    times = speed.time_models(runners, x, True, args.warmup, args.repeats, args.budget)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--method", default="intrafusion")
    p.add_argument("--recover", default=None, help="recovery (default: lstsq; distill needs torch)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="with --recover distill")
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--runtimes", nargs="+", default=["ort", "openvino"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--budget", type=float, default=10.0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    x_train, _ = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[: args.test_samples], y_test[: args.test_samples]
    calib = {"x": x_train[np.random.default_rng(0).permutation(len(x_train))[: args.calibration_samples]]}
    print(f"# load {os.getloadavg()[0]:.2f}; sparsity {args.sparsity}, {args.method}, recover {args.recover or 'lstsq'}, "
          f"{args.calibration_samples} calibration images, {len(x_test)} test images")
    print(f"{'model':<20} {'variant':<16} {'acc %':>6} {'KB':>7} {'MMACs':>6} "
          + " ".join(f"{r + ' b' + str(b) + ' ms':>14}" for r in args.runtimes for b in args.batches))
    for name in args.models:
        tag = dict(model=name, sparsity=args.sparsity, method=args.method,
                   calibration_samples=args.calibration_samples, test_samples=len(x_test))
        options = dict(recover=args.recover, finetune_epochs=args.finetune_epochs)  # None: the default
        extra = {k: v for k, v in options.items() if v is not None}
        if any(all(r.get(k) == v for k, v in {**tag, **options}.items()) for r in data["rows"]):
            continue
        src = FASHION / f"{name}.onnx"
        original = onnx.load(str(src))
        t = time.perf_counter()
        result = prune(src, args.sparsity, args.method, target="auto", calibration=calib, quantize="int8",
                       validate=False, **extra)
        prune_s = time.perf_counter() - t
        t = time.perf_counter()
        quant_only = deploy.quantize_int8(original, calibration_mod.batches(calibration_mod.match(calib, original),
                                                                           original))
        quant_s = time.perf_counter() - t
        variants = {"original fp32": original, "pruned fp32": result.fp32, "pruned int8": result.model,
                    "quantized only": quant_only}
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for k, m in variants.items():
                paths[k] = Path(tmp) / (k.replace(" ", "_") + ".onnx")
                onnx.save_model(m, str(paths[k]))
            lat = {}
            for runtime in args.runtimes:
                for batch in args.batches:
                    try:
                        lat[f"{runtime}_b{batch}"] = latencies(paths, runtime, batch, args)
                    except Exception as exc:  # noqa: BLE001 - a runtime that is missing or refuses a model
                        print(f"# {name} {runtime} b{batch}: {' '.join(str(exc).split())[:200]}")
            sizes = {k: p.stat().st_size for k, p in paths.items()}
        row = dict(tag, **extra, round_to=result.report.options["round_to"], prune_and_quantize_s=prune_s,
                   quantize_only_s=quant_s, quantization=result.report.quantization, variants={})
        for k, m in variants.items():
            acc = accuracy(m, x_test, y_test)
            macs = count_macs(m) if "int8" not in k and "quantized" not in k else None
            row["variants"][k] = dict(accuracy=acc, bytes=sizes[k], macs=macs,
                                      latency_cpu_ms={lk: v[k] for lk, v in lat.items()})
            print(f"{name:<20} {k:<16} {acc * 100:>6.2f} {sizes[k] / 1e3:>7.0f} "
                  f"{'' if macs is None else f'{macs / 1e6:.1f}':>6} "
                  + " ".join(f"{lat[lk][k] if lk in lat else float('nan'):>14.3f}" for lk in
                             [f'{r}_b{b}' for r in args.runtimes for b in args.batches]), flush=True)
        data["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
