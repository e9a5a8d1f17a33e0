"""Time of least-squares recovery on a text-line-recognizer-shaped model, and accuracy on Fashion-MNIST.

The scaling model (built here from seeded random weights with ``onnx.helper``,
no download, no torch): input 3x48x320, a convolutional stem (3 convs, stride
8x4 overall) and 14 mixing blocks at 6x80 positions (depthwise 3x3, pointwise
expand, ReLU, pointwise project, residual Add), then a sequence head (mean
over the height, two MatMuls on [batch, 80, channels] activations): 47
Conv/MatMul layers, ~9.5 MB of float32 weights, ~1.1 GMAC per sample.  Every
layer is re-fitted when the whole network is pruned at 0.5.

For each calibration size, ``prune(..., calibration=random inputs,
recover="lstsq", validate=False)`` is timed: wall time, process CPU time
(onnxruntime threads included) and the ``recover`` stage.  ``--fashion``
adds an accuracy check: a bundled Fashion-MNIST model at 0.5 with 1024
unlabelled training images (lstsq), accuracy on the 10k test images.

    python benchmarks/recovery_scaling.py --label after                 # 32 and 256 samples
    python benchmarks/recovery_scaling.py --label after --fashion resnet18
    PYTHONPATH=/path/to/older/checkout python benchmarks/recovery_scaling.py --label before --timeout 900

Rows are merged by label into docs/results/recovery_scaling.json; a run
over ``--timeout`` seconds is stopped and recorded as such.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
try:  # an explicit PYTHONPATH (e.g. an older checkout, for "before" numbers) wins
    import onnx_intrafusion  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "results" / "recovery_scaling.json"
INPUT_SHAPE = (3, 48, 320)
WIDTH = 192  # channels in the mixing blocks
BLOCKS = 14
HEAD = 512
CLASSES = 100


def build_model(seed: int = 0) -> onnx.ModelProto:
    """Conv stem + mixing blocks + sequence head; He-initialised so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name, shape, fan_in):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
                                             name))
        return name

    def bias(name, n):
        inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.05).astype(np.float32), name))
        return name

    def conv(x, name, cin, cout, k, stride=(1, 1), group=1, relu=True):
        w = weight(f"{name}.w", (cout, cin // group, k, k), cin // group * k * k)
        b = bias(f"{name}.b", cout)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"{name}.y"], name=name, kernel_shape=[k, k],
                                      pads=[k // 2] * 4, strides=list(stride), group=group))
        if not relu:
            return f"{name}.y"
        nodes.append(helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    x = conv("input", "stem0", 3, 32, 3, (2, 2))
    x = conv(x, "stem1", 32, 64, 3, (2, 2))
    x = conv(x, "stem2", 64, WIDTH, 3, (2, 1))
    for i in range(BLOCKS):
        h = conv(x, f"b{i}.dw", WIDTH, WIDTH, 3, group=WIDTH, relu=False)
        h = conv(h, f"b{i}.pw1", WIDTH, 2 * WIDTH, 1)
        h = conv(h, f"b{i}.pw2", 2 * WIDTH, WIDTH, 1, relu=False)
        nodes.append(helper.make_node("Add", [x, h], [f"b{i}.out"], name=f"b{i}.add"))
        x = f"b{i}.out"
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes_h")
    inits.append(axes)
    nodes.append(helper.make_node("ReduceMean", [x, "axes_h"], ["pooled"], name="pool", keepdims=0))
    nodes.append(helper.make_node("Transpose", ["pooled"], ["seq"], name="to_seq", perm=[0, 2, 1]))
    w1 = weight("head1.w", (WIDTH, HEAD), WIDTH)
    nodes.append(helper.make_node("MatMul", ["seq", w1], ["head1.y"], name="head1"))
    nodes.append(helper.make_node("Add", ["head1.y", bias("head1.b", HEAD)], ["head1.z"], name="head1.bias"))
    nodes.append(helper.make_node("Relu", ["head1.z"], ["head1.r"], name="head1.relu"))
    w2 = weight("head2.w", (HEAD, CLASSES), HEAD)
    nodes.append(helper.make_node("MatMul", ["head1.r", w2], ["logits"], name="head2"))
    graph = helper.make_graph(
        nodes, "textline", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", INPUT_SHAPE[2] // 4, CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _time_prune(model_bytes: bytes, samples: int, seed: int, queue) -> None:
    from onnx_intrafusion import prune

    model = onnx.load_from_string(model_bytes)
    calib = np.random.default_rng([seed, samples]).standard_normal((samples, *INPUT_SHAPE)).astype(np.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    result = prune(model, 0.5, calibration={"input": calib}, recover="lstsq", validate=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rep = result.report.to_dict()
    queue.put(dict(samples=samples, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                   recover_s=rep["timings_s"].get("recover"), layers=len(rep.get("recovery", [])),
                   whole_model=rep.get("recovery_model")))


def scaling_row(samples: int, seed: int, timeout: float) -> dict:
    """One timed prune() in a child process (so a run over the timeout can be stopped)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_time_prune, args=(build_model(seed).SerializeToString(), samples, seed, queue))
    start = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return dict(samples=samples, wall_s=None, cpu_s=None, recover_s=None,
                    note=f"stopped after {time.perf_counter() - start:.0f} s")
    return queue.get() if not queue.empty() else dict(samples=samples, note=f"failed (exit {proc.exitcode})")


def fashion_row(name: str, images: int, seed: int) -> dict:
    import onnxruntime as ort
    from datasets import load_fashion_mnist

    from onnx_intrafusion import prune

    path = ROOT / "samples" / "fashion" / f"{name}_legacy.onnx"
    (x_train, _), (x_test, y_test) = load_fashion_mnist("train"), load_fashion_mnist("test")
    calib = x_train[np.random.default_rng(seed).permutation(len(x_train))[:images]]

    def accuracy(model) -> float:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0].name
        hits = sum(int((sess.run(None, {inp: x_test[i:i + 1000]})[0].argmax(1) == y_test[i:i + 1000]).sum())
                   for i in range(0, len(x_test), 1000))
        return hits / len(x_test)

    row = dict(model=f"{name}_legacy", sparsity=0.5, calibration=images, base=accuracy(onnx.load(str(path))))
    row["data_free"] = accuracy(prune(path, 0.5, validate=False).model)
    start = time.perf_counter()
    result = prune(path, 0.5, calibration={"input": calib}, recover="lstsq", validate=False)
    row.update(lstsq=accuracy(result.model), seconds=round(time.perf_counter() - start, 2),
               whole_model=result.report.to_dict().get("recovery_model"))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="row label, e.g. before / after")
    p.add_argument("--samples", type=int, nargs="*", default=[32, 256])
    p.add_argument("--fashion", nargs="*", default=[], help="Fashion-MNIST models to check (e.g. resnet18)")
    p.add_argument("--fashion-images", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    import onnx_intrafusion

    model = build_model(args.seed)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    layers = sum(n.op_type in ("Conv", "MatMul") for n in model.graph.node)
    print(f"code: {Path(onnx_intrafusion.__file__).parent}; cores: {os.cpu_count()}; "
          f"model: {layers} Conv/MatMul layers, {n_params * 4 / 1e6:.1f} MB weights, input {INPUT_SHAPE}")
    rows = []
    print(f"{'label':<8} {'samples':>7} {'wall s':>8} {'cpu s':>8} {'recover s':>9}  note")
    for n in args.samples:
        row = dict(label=args.label, **scaling_row(n, args.seed, args.timeout))
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{args.label:<8} {n:>7} {fmt(row.get('wall_s')):>8} {fmt(row.get('cpu_s')):>8} "
              f"{fmt(row.get('recover_s')):>9}  {row.get('note', '')}", flush=True)
    fashion = []
    for name in args.fashion:
        row = dict(label=args.label, **fashion_row(name, args.fashion_images, args.seed))
        fashion.append(row)
        print(f"{args.label:<8} {row['model']}: base {row['base']:.4f}  data-free {row['data_free']:.4f}  "
              f"lstsq ({row['calibration']} images) {row['lstsq']:.4f}  {row['seconds']:.1f} s", flush=True)

    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["model"] = dict(input=list(INPUT_SHAPE), layers=layers, weights_mb=round(n_params * 4 / 1e6, 2),
                         sparsity=0.5, recover="lstsq", cores=os.cpu_count())
    for key, new in (("scaling", rows), ("fashion", fashion)):
        if new:
            keep = [r for r in data.get(key, []) if r["label"] != args.label or
                    r.get("samples", r.get("model")) not in {x.get("samples", x.get("model")) for x in new}]
            data[key] = keep + new
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
