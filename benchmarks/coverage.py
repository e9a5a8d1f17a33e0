#!/usr/bin/env python
"""Coverage benchmark: can the tool prune real torchvision architectures?

For every model: export with random weights (both torch exporters), prune at
``--sparsity`` with both methods, and print one row per (model, exporter,
method): valid (onnx.checker + onnxruntime run) / groups pruned / groups
blocked with the most common reasons / % of Conv+Gemm+MatMul weights that sit
in a pruned group / params and MACs before -> after / wall time.  JSON goes to
``docs/results/coverage.json``.

torchvision is not a dependency of the project.  Install it in a separate
virtual environment (large, about 5.5 GB)::

    python -m venv /work/tv-venv
    /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript onnxruntime \
        onnx-graphsurgeon pot numpy
    /work/tv-venv/bin/pip install -e . --no-deps
    /work/tv-venv/bin/python benchmarks/coverage.py            # all models
    /work/tv-venv/bin/python benchmarks/coverage.py --models resnet18 vit_b_16
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_intrafusion import model_io, prune  # noqa: E402
from onnx_intrafusion.errors import UserError  # noqa: E402

MODELS = [
    "resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "densenet121", "shufflenet_v2_x1_0", "squeezenet1_1", "regnet_x_400mf", "googlenet",
    "resnext50_32x4d", "convnext_tiny", "mnasnet1_0", "vit_b_16", "swin_t",
]
EXPORTERS = ("legacy", "dynamo")
METHODS = ("intrafusion", "prune")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# exported at 224x224: vit/vgg have fixed-size layers, swin is run at the size its windows were designed for
FULL_SIZE = ("vit", "vgg", "swin")


def _import_torchvision():
    try:
        import torch
        import torchvision
    except ImportError:
        sys.exit(
            "torchvision is missing. Install it in a separate venv (never in the project's environment):\n"
            "  python -m venv /work/tv-venv\n"
            "  /work/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript onnxruntime "
            "onnx-graphsurgeon pot numpy\n"
            "  /work/tv-venv/bin/pip install -e . --no-deps\n"
            "then run this script with /work/tv-venv/bin/python"
        )
    return torch, torchvision


def export(name: str, exporter: str, folder: Path, size: int, dynamic_batch: bool = False) -> Path:
    torch, torchvision = _import_torchvision()
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(2 if dynamic_batch else 1, 3, size, size)  # torch.export specialises a batch of 1
    path = folder / f"{name}_{exporter}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        else:
            shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], dynamic_shapes=shapes)
    return path


def weight_coverage(path: Path, report) -> float:
    """% of Conv/Gemm/MatMul weight values edited by a pruned group (producer, consumer or depthwise)."""
    graph = model_io.to_graph(model_io.load_model(path).model)
    in_pruned = {n for g in report.pruned_groups for n in g.producers + g.consumers + g.params}
    total = covered = 0
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not hasattr(w, "values"):
            continue
        n = int(np.prod(w.shape))
        total += n
        if node.name in in_pruned:
            covered += n
    return 100.0 * covered / total if total else 0.0


def random_calibration(path: Path, samples: int) -> dict[str, np.ndarray]:
    """``samples`` standard-normal inputs per graph input (dynamic dims at 1): structure only, no accuracy."""
    model = onnx.load(str(path), load_external_data=False)
    rng = np.random.default_rng(0)
    init = {t.name for t in model.graph.initializer}
    arrays = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        arrays[inp.name] = rng.standard_normal([samples, *dims[1:]]).astype(np.float32)
    return arrays


def check_valid(model: onnx.ModelProto) -> str | None:
    """None if ``model`` passes onnx.checker, strict shape inference and onnxruntime (two batch sizes when
    the batch is dynamic) with finite outputs, else the first problem."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        dynamic = any(not isinstance(inp.shape[0], int) for inp in sess.get_inputs() if inp.shape)
        for batch in (1, 3) if dynamic else (1,):
            feeds = {}
            for inp in sess.get_inputs():
                dims = [d if isinstance(d, int) else 1 for d in inp.shape]
                if dims and not isinstance(inp.shape[0], int):
                    dims[0] = batch
                feeds[inp.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
            outs = sess.run(None, feeds)
            if not all(np.all(np.isfinite(o)) for o in outs):
                return f"non-finite output at batch {batch}"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def run_one(path: Path, method: str, sparsity: float, calibration: dict | None = None) -> dict:
    row: dict = {"method": method}
    extra = {} if calibration is None else dict(calibration=calibration, hidden_sparsity=sparsity, recover="none")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only N calibration samples": known, structure only
            result = prune(path, sparsity=sparsity, method=method, validate=False, **extra)
    except UserError as exc:
        row.update(valid=False, error=f"{type(exc).__name__}: {exc}", time_s=time.perf_counter() - start)
        return row
    except Exception as exc:  # noqa: BLE001 - a bug: record and go on
        row.update(valid=False, error=f"BUG {type(exc).__name__}: {exc}", trace=traceback.format_exc(),
                   time_s=time.perf_counter() - start)
        return row
    elapsed = time.perf_counter() - start
    rep = result.report
    error = check_valid(result.model)
    valid = error is None
    reasons = collections.Counter(b["reason"] for g in rep.blocked_groups for b in g.blocked)
    row.update(
        valid=valid, error=error, time_s=round(elapsed, 2),
        pruned=len(rep.pruned_groups), blocked=len(rep.blocked_groups), groups=len(rep.groups),
        reasons=reasons.most_common(4),
        pruned_kinds=dict(collections.Counter(g.kind for g in rep.pruned_groups)),  # channel/head/ffn
        weights_in_pruned_pct=round(weight_coverage(path, rep), 1),
        params=[rep.params_before, rep.params_after], macs=[rep.macs_before, rep.macs_after],
    )
    if rep.macs_note:
        row["macs_note"] = rep.macs_note
    if calibration is not None:
        row.update(samples=len(next(iter(calibration.values()))), hidden_sparsity=sparsity, recover="none")
    return row


def _m(x: int | None) -> str:
    return "unknown" if x is None else f"{x / 1e6:.2f}M"


def _short(x: int | None) -> str:
    if x is None:
        return "unknown"
    return f"{x / 1e9:.2f}G" if x >= 1e9 else f"{x / 1e6:.1f}M"


def markdown(rows: list[dict]) -> str:
    """The results table of docs/coverage.md, generated from the JSON rows."""
    lines = ["| model | exporter | method | valid | pruned groups (kinds) | blocked groups | "
             "% Conv/Gemm/MatMul weights in pruned groups | params before → after | MACs before → after | "
             "blocked reasons (count) | with calibration: % weights, MACs after, valid |",
             "| --- | --- | --- | --- | --- | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        if "export_error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | | export failed: {r['export_error']} | | | | | | | |")
            continue
        if "pruned" not in r:
            lines.append(f"| {r['model']} | {r['exporter']} | {r['method']} | no: {r['error']} | | | | | | | |")
            continue
        if r.get("dynamic_batch"):
            r = {**r, "exporter": f"{r['exporter']}, dynamic batch"}
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(r.get("pruned_kinds", {}).items()))
        reasons = "; ".join(f"{reason} ({n})" for reason, n in r["reasons"])
        valid = "yes" if r["valid"] else f"no: {r['error']}"
        lines.append(f"| {r['model']} | {r['exporter']} | {r['method']} | {valid} | {r['pruned']} ({kinds}) | "
                     f"{r['blocked']} | {r['weights_in_pruned_pct']:.1f} | {_short(r['params'][0])} → "
                     f"{_short(r['params'][1])} | {_short(r['macs'][0])} → {_short(r['macs'][1])} | {reasons} | "
                     f"{_calibrated_cell(r.get('calibrated'))} |")
    return "\n".join(lines)


def _calibrated_cell(c: dict | None) -> str:
    if c is None:
        return ""
    if "pruned" not in c:
        return f"failed: {c['error']}"
    valid = "yes" if c["valid"] else f"no: {c['error']}"
    return f"{c['weights_in_pruned_pct']:.1f}, {_short(c['macs'][1])}, {valid}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--exporters", nargs="*", default=list(EXPORTERS))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--size", type=int, default=64, help="input size for CNNs (vit, vgg and swin use 224)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "coverage.json"))
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip their runs")
    p.add_argument("--calibration", choices=("none", "random"), default="none",
                   help="random: also run with random calibration inputs (lifts the hidden-size block; structure "
                        "only, no recovery); results in each row's 'calibrated' record")
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--dynamic-batch", action="store_true",
                   help="export with a dynamic batch dimension (rows marked dynamic_batch)")
    p.add_argument("--markdown", metavar="JSON", help="print the Markdown table of a results file and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return 0
    rows = json.loads(Path(args.out).read_text())["rows"] if args.resume and Path(args.out).exists() else []
    calibrated = args.calibration == "random"
    print(f"{'model':<20} {'exporter':<7} {'method':<11} {'data':<5} {'valid':<5} {'pruned':>6} {'blocked':>7} "
          f"{'w%':>5} {'params before->after':>22} {'MACs before->after':>22} {'time':>6}  top blocked reasons",
          flush=True)
    dyn = {"dynamic_batch": True} if args.dynamic_batch else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for exporter in args.exporters:
                old = {r.get("method"): r for r in rows if (r["model"], r["exporter"]) == (name, exporter)
                       and r.get("dynamic_batch", False) == args.dynamic_batch}
                todo = [m for m in args.methods if m not in old or (calibrated and "calibrated" not in old[m])]
                if not todo:
                    continue
                size = 224 if name.startswith(FULL_SIZE) else args.size
                try:
                    path = export(name, exporter, Path(tmp), size, args.dynamic_batch)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"model": name, "exporter": exporter, **dyn,
                                 "export_error": str(exc).splitlines()[0]})
                    print(f"{name:<20} {exporter:<7} export failed: {str(exc).splitlines()[0][:100]}", flush=True)
                    continue
                calib = random_calibration(path, args.calibration_samples) if calibrated else None
                for method in todo:
                    row = old.get(method)
                    if row is None:
                        row = {"model": name, "exporter": exporter, **dyn, **run_one(path, method, args.sparsity)}
                        rows.append(row)
                        _print(name, exporter, method, "free", row)
                    if calibrated and "pruned" in row:
                        row["calibrated"] = run_one(path, method, args.sparsity, calib)
                        _print(name, exporter, method, "calib", row["calibrated"])
                (Path(tmp) / f"{name}_{exporter}.onnx").unlink(missing_ok=True)
                (Path(tmp) / f"{name}_{exporter}.onnx.data").unlink(missing_ok=True)
                _write(args, rows)  # after every model: a long run stopped early keeps its rows
    print(f"wrote {_write(args, rows)}")
    return 0


def _print(name: str, exporter: str, method: str, data: str, row: dict) -> None:
    head = f"{name:<20} {exporter:<7} {method:<11} {data:<5} {str(row['valid']):<5}"
    if "pruned" not in row or row.get("error"):
        print(f"{head} {row.get('error', '')[:160]}", flush=True)
        if "pruned" not in row:
            return
    reasons = "; ".join(f"{r} x{n}" for r, n in row["reasons"][:2])
    print(f"{head} {row['pruned']:>6} {row['blocked']:>7} {row['weights_in_pruned_pct']:>5.1f} "
          f"{_m(row['params'][0]):>10}->{_m(row['params'][1]):<11} "
          f"{_m(row['macs'][0]):>10}->{_m(row['macs'][1]):<11} {row['time_s']:>6.1f}  {reasons[:140]}", flush=True)


def _write(args, rows) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sparsity": args.sparsity, "size": args.size, "rows": rows}, indent=1))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
