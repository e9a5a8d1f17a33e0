#!/usr/bin/env python
"""Generate the small sample ONNX models used by onnx_intrafusion tests/examples.

Three tiny CNNs (TinyVGG, TinyResNet, TinyMobileNetV2) are built with fixed seeds,
given non-trivial BatchNorm statistics, and exported with both torch exporters:

* ``<name>_legacy.onnx``  - TorchScript exporter (``dynamo=False``, opset 17)
* ``<name>_dynamo.onnx``  - torch.export based exporter (``dynamo=True``), with its
  weights in ``<name>_dynamo.onnx.data`` (external data, as users get it)
* ``vgg_dynbatch_legacy.onnx`` - legacy VGG export with a dynamic batch dimension
* ``vgg_unfolded_bn.onnx``  - legacy VGG export that keeps real
  ``BatchNormalization`` nodes (not folded into the preceding Conv)

Usage::

    python samples/make_samples.py [--out DIR]

Importable: ``TinyVGG``, ``TinyResNet``, ``TinyMobileNetV2``, ``build_model(name)``,
``export_all(out_dir) -> dict[str, str]``, ``verify_file(path, model)``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 32, 32)
NUM_CLASSES = 10
SEED = 0
TOL = 1e-4


# --------------------------------------------------------------------------- models
def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class TinyVGG(nn.Module):
    """Conv3x3-BN-ReLU blocks, pooled to a 2x2 map so Flatten->Linear sees HW=4 per channel."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        cfg = [16, 32, "M", 32, 64, "M", 64]
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn(cin, v) + [nn.ReLU(inplace=True)]
                cin = v
        layers += [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2)]  # 8x8 -> 4x4 -> 2x2
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem + 3 stages x 2 basic blocks (16/32/64), identity and projection shortcuts."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, widths[0]), nn.ReLU(inplace=True))
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += conv_bn(cin, hidden, 1) + [nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, hidden, 3, stride, groups=hidden) + [nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNetV2(nn.Module):
    """Stem + inverted residual blocks (one with expansion 1, a chain of 2 residual adds at 24ch)."""

    # (expansion t, out channels c, repeats n, first stride s)
    CFG = [
        (1, 16, 1, 1),  # expansion 1: no expand conv
        (4, 24, 3, 2),  # 2 residual adds on the same width (24)
        (4, 32, 2, 2),  # 1 residual add
    ]

    def __init__(self, num_classes: int = NUM_CLASSES, head: int = 128):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 16, 3, 1), nn.ReLU6(inplace=True))
        blocks = []
        cin = 16
        for t, c, n, s in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(cin, head, 1), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.head(self.blocks(self.stem(x))))))


MODELS = {"vgg": TinyVGG, "resnet": TinyResNet, "mobilenetv2": TinyMobileNetV2}


def build_model(name: str, seed: int = SEED) -> nn.Module:
    """Deterministically build model ``name`` with randomised, non-trivial BatchNorm; eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
        # populate running_mean / running_var with non-trivial statistics
        model.train()
        for _ in range(20):
            model(torch.randn(8, 3, 32, 32) * 1.5 + 0.2)
    model.eval()
    return model


def sample_input(seed: int = SEED + 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *INPUT_SHAPE[1:], generator=g)


# --------------------------------------------------------------------------- export
EXPORT_MESSAGES: collections.Counter = collections.Counter()  # (exporter, message) -> count


@contextlib.contextmanager
def _quiet(tag: str):
    """Silence exporter chatter (progress prints, warnings) but remember it in EXPORT_MESSAGES."""
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(buf_out), \
            contextlib.redirect_stderr(buf_err):
        warnings.simplefilter("always")
        yield
    for w in caught:
        EXPORT_MESSAGES[(tag, f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}")] += 1
    for line in (buf_out.getvalue() + buf_err.getvalue()).splitlines():
        if line.strip() and not line.startswith("[torch.onnx]"):  # drop progress lines
            EXPORT_MESSAGES[(tag, line.strip()[:160])] += 1


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        if p.exists():
            p.unlink()


def export_legacy(model, path: Path, *, dynamic_batch: bool = False, keep_bn: bool = False) -> Path:
    _remove(path)
    kwargs = {}
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    if keep_bn:
        # The legacy exporter folds BN into Conv in its "eval peephole" pass, which only runs
        # for TrainingMode.EVAL. PRESERVE on an eval-mode model skips that pass and emits
        # inference-mode BatchNormalization (training_mode=0, single output).
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
        kwargs["do_constant_folding"] = False
    with _quiet("legacy"):
        torch.onnx.export(model, (sample_input(),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], **kwargs)
    return path


def export_dynamo(model, path: Path) -> Path:
    _remove(path)
    with _quiet("dynamo"):
        torch.onnx.export(model, (sample_input(),), str(path), dynamo=True,
                          input_names=["input"], output_names=["logits"], external_data=True)
    data = path.with_name(path.name + ".data")
    if not data.exists():
        # force the external-data layout the dynamo exporter uses for larger models
        m = onnx.load(str(path))
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=0)
    return path


def export_all(out_dir) -> dict[str, str]:
    """Export every sample into ``out_dir``; returns {sample name: path of the .onnx file}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for name in MODELS:
        model = build_model(name)
        paths[f"{name}_legacy"] = str(export_legacy(model, out / f"{name}_legacy.onnx"))
        paths[f"{name}_dynamo"] = str(export_dynamo(model, out / f"{name}_dynamo.onnx"))
    vgg = build_model("vgg")
    paths["vgg_dynbatch_legacy"] = str(export_legacy(vgg, out / "vgg_dynbatch_legacy.onnx",
                                                     dynamic_batch=True))
    paths["vgg_unfolded_bn"] = str(export_legacy(vgg, out / "vgg_unfolded_bn.onnx", keep_bn=True))
    return paths


def model_for_sample(sample: str) -> nn.Module:
    return build_model(sample.split("_")[0])


# --------------------------------------------------------------------------- verify
def op_histogram(path) -> collections.Counter:
    m = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in m.graph.node)


def reshape_shapes(path) -> list:
    """Literal shape constants feeding Reshape nodes (None if the shape is computed)."""
    m = onnx.load(str(path))
    consts = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = onnx.numpy_helper.to_array(a.t).tolist()
    return [consts.get(n.input[1]) for n in m.graph.node if n.op_type == "Reshape"]


def file_size(path) -> int:
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def verify_file(path, model: nn.Module, batch: int = 1) -> float:
    """checker + onnxruntime vs torch; returns max abs diff (raises if > TOL)."""
    onnx.checker.check_model(str(path), full_check=True)
    x = sample_input(seed=123, batch=batch)
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    (got,) = sess.run(["logits"], {"input": x.numpy()})
    assert got.shape == ref.shape, (got.shape, ref.shape)
    diff = float(np.abs(got - ref).max())
    if diff > TOL:
        raise AssertionError(f"{path}: max abs diff {diff} > {TOL}")
    return diff


def check_unfolded_bn(path) -> int:
    m = onnx.load(str(path))
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert bns, "no BatchNormalization nodes"
    for n in bns:
        assert len(n.output) == 1, (n.name, list(n.output))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("training_mode", 0) == 0, attrs
    return len(bns)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent),
                    help="output directory (default: folder of this script)")
    args = ap.parse_args(argv)

    paths = export_all(args.out)
    total = 0
    rows = []
    for sample, path in paths.items():
        model = model_for_sample(sample)
        diff = verify_file(path, model)
        if sample == "vgg_dynbatch_legacy":
            diff = max(diff, verify_file(path, model, batch=3))
        size = file_size(path)
        total += size
        rows.append((sample, path, size, diff))

    print(f"{'file':<34} {'bytes':>9} {'maxdiff':>9}  ops")
    for sample, path, size, diff in rows:
        hist = op_histogram(path)
        extra = " (+.data)" if Path(path + ".data").exists() else ""
        print(f"{Path(path).name + extra:<34} {size:>9} {diff:>9.2e}  "
              f"{sum(hist.values())} nodes, {len(hist)} op types")
    print(f"total {total} bytes")
    print()
    for sample, path, size, diff in rows:
        hist = op_histogram(path)
        print(f"{Path(path).name}: {dict(sorted(hist.items()))}")
        shapes = reshape_shapes(path)
        if shapes:
            print(f"    Reshape shape inputs: {shapes}")
    n_bn = check_unfolded_bn(paths["vgg_unfolded_bn"])
    print(f"\nvgg_unfolded_bn.onnx: {n_bn} BatchNormalization nodes, 1 output each, training_mode=0")
    if EXPORT_MESSAGES:
        print("\nexporter messages (count x exporter: message):")
        for (tag, msg), cnt in sorted(EXPORT_MESSAGES.items()):
            print(f"  {cnt} x {tag}: {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
