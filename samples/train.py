#!/usr/bin/env python
"""Train and export the sample models used by onnx_intrafusion's tests and benchmarks.

Fashion-MNIST models (28x28, 1 channel, 10 classes) -> samples/fashion/:
  vgg11bn      VGG11-BN-style: 8 x (conv3x3-BN-ReLU), VGG11 pattern of MaxPools
               adapted to 28x28, classifier Linear-ReLU-Dropout-Linear
  resnet18     ResNet18-style: conv3x3-BN-ReLU stem (+MaxPool), 4 stages x 2 basic
               blocks, projection shortcuts (conv1x1+BN) where stride/width change
  mobilenetv2  MobileNetV2-style: inverted residuals (1x1 expand, 3x3 depthwise,
               1x1 linear projection), residual adds, GAP, Linear
  mobilenetv3  MobileNetV3-small-style: bottlenecks with depthwise convs, squeeze-excite
               (hard-sigmoid gate), hard-swish; exported with BatchNormalization kept
               (not folded into Conv) by both exporters
Each is exported in eval mode twice: {name}_legacy.onnx (TorchScript exporter,
opset 17) and {name}_dynamo.onnx (torch.export based exporter). Input `input`
[batch,1,28,28], output `logits` [batch,10].

Digits model (scikit-learn's bundled 8x8 digits) -> samples/digits/digits_cnn.onnx:
  a tight conv16-conv32-pool-conv32-GAP-Linear CNN (legacy exporter).

Data come from benchmarks/datasets.py (offline; Fashion-MNIST from the Debian
package dataset-fashion-mnist). Usage:

  python samples/train.py [--models vgg11bn,resnet18,mobilenetv2,mobilenetv3,digits] [--epochs N]

Deterministic given --seed (on the same machine / thread count).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import datasets  # noqa: E402  (pure numpy, no downloads)

SAMPLES = ROOT / "samples"
FASHION_MODELS = ("vgg11bn", "resnet18", "mobilenetv2", "mobilenetv3")
ALL_MODELS = FASHION_MODELS + ("digits",)


# --------------------------------------------------------------------------- models
def conv_bn_relu(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(inplace=True),
    ]


class VGG11BN(nn.Module):
    """VGG11-BN (cfg A: 8 convs) for 28x28x1. VGG11 pools after convs 1, 2, 4, 6
    and 8; 28x28 allows only four 2x poolings, so the pool after conv 6 is
    dropped (convs 5-8 all run at 3x3 and the last pool takes 3x3 -> 1x1)."""

    def __init__(self, widths=(16, 32, 64, 64, 128, 128, 128, 128), hidden=256, num_classes=10):
        super().__init__()
        w = widths
        cfg = [w[0], "M", w[1], "M", w[2], w[3], "M", w[4], w[5], w[6], w[7], "M"]
        layers, cin = [], 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 28x28x1: stem conv3x3-BN-ReLU + MaxPool (28 -> 14), stages at
    14, 7, 4, 2 (stage 1 has identity shortcuts, stages 2-4 start with a stride-2
    block with a conv1x1+BN projection), global average pool, Linear."""

    def __init__(self, widths=(16, 32, 64, 128), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(1, widths[0]), nn.MaxPool2d(2))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hid = cin * expand
        layers = []
        if expand != 1:
            layers += conv_bn_relu(cin, hid, 1, act=nn.ReLU6)
        layers += conv_bn_relu(hid, hid, 3, stride, groups=hid, act=nn.ReLU6)  # depthwise
        layers += [nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 28x28x1 (scaled down; expansion 4 instead of 6 to keep
    CPU training fast). (t, c, n, s) rows as in the paper."""

    CFG = ((1, 16, 1, 2), (4, 24, 2, 1), (4, 32, 3, 2), (4, 64, 3, 2), (4, 96, 2, 1))

    def __init__(self, stem=16, last=384, cfg=CFG, num_classes=10):
        super().__init__()
        layers = conv_bn_relu(1, stem, act=nn.ReLU6)
        cin = stem
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += conv_bn_relu(cin, last, 1, act=nn.ReLU6)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_divisible(v, divisor=8):
    """Round a channel count to a multiple of `divisor` (MobileNet convention)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """MobileNetV3 SE: GAP -> 1x1 conv (ReLU) -> 1x1 conv -> hard-sigmoid gate -> scale."""

    def __init__(self, ch):
        super().__init__()
        sq = make_divisible(ch // 4)
        self.fc1 = nn.Conv2d(ch, sq, 1)
        self.fc2 = nn.Conv2d(sq, ch, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class Bneck(nn.Module):
    """MobileNetV3 bottleneck: 1x1 expand-BN-act, kxk depthwise-BN-act, optional SE,
    1x1 linear projection-BN, residual add when stride 1 and widths match."""

    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        layers = []
        if exp != cin:
            layers += conv_bn_relu(cin, exp, 1, act=act)
        layers += conv_bn_relu(exp, exp, k, stride, groups=exp, act=act)
        if se:
            layers.append(SqueezeExcite(exp))
        layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-small-style for 28x28x1: conv3x3-BN-hswish stem at full
    resolution, bneck rows (kernel, expand, out, SE, activation, stride) with
    strides placed for 28 -> 14 -> 7 -> 4, 1x1 conv-BN-hswish head, GAP, then
    the V3 classifier Linear-hswish-Dropout-Linear."""

    RE, HS = nn.ReLU, nn.Hardswish
    CFG = ((3, 16, 16, True, RE, 2), (3, 64, 24, False, RE, 1), (3, 72, 24, False, RE, 1),
           (5, 96, 40, True, HS, 2), (5, 160, 40, True, HS, 1), (5, 120, 48, True, HS, 1),
           (5, 144, 48, True, HS, 1), (5, 288, 96, True, HS, 2), (5, 384, 96, True, HS, 1))

    def __init__(self, stem=16, last=384, hidden=256, cfg=CFG, num_classes=10):
        super().__init__()
        layers = conv_bn_relu(1, stem, act=nn.Hardswish)
        cin = stem
        for k, exp, cout, se, act, s in cfg:
            layers.append(Bneck(cin, k, exp, cout, se, act, s))
            cin = cout
        layers += conv_bn_relu(cin, last, 1, act=nn.Hardswish)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsCNN(nn.Module):
    """Tight CNN for 8x8 digits: conv16@8 - conv32@8 - MaxPool - conv32@4 - GAP - Linear."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, 16), *conv_bn_relu(16, 32), nn.MaxPool2d(2), *conv_bn_relu(32, 32)
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# Per-model training recipe. epochs are defaults (override with --epochs).
RECIPES = {
    "vgg11bn": dict(cls=VGG11BN, epochs=5, batch=128, lr=0.1, wd=5e-4, channels_last=False),
    "resnet18": dict(cls=ResNet18, epochs=5, batch=128, lr=0.1, wd=5e-4, channels_last=False),
    # depthwise convs train ~2x faster in channels_last on CPU (oneDNN)
    "mobilenetv2": dict(cls=MobileNetV2, epochs=6, batch=128, lr=0.1, wd=1e-4, channels_last=True),
    # exported with BatchNormalization unfolded (see export_legacy / export_dynamo)
    "mobilenetv3": dict(cls=MobileNetV3, epochs=6, batch=128, lr=0.1, wd=1e-4, channels_last=True, keep_bn=True),
    "digits": dict(cls=DigitsCNN, epochs=60, batch=64, lr=0.05, wd=5e-4, channels_last=False),
}


# --------------------------------------------------------------------------- training
def augment(x, pad, fill, flip, gen):
    """Random crop with `pad` pixels of padding (filled with the normalised
    background value) and optional horizontal flip; per sample, on a batch."""
    b, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad), value=fill)
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        rows = oy[:, None] + torch.arange(h)  # [b, h]
        cols = ox[:, None] + torch.arange(w)  # [b, w]
        bi = torch.arange(b)[:, None, None]
        # advanced indexing puts the indexed dims first: [b, h, w, c] -> [b, c, h, w]
        x = xp[bi, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if flip:
        m = torch.rand(b, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def torch_predict(model, x, batch=1000, channels_last=False):
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        outs.append(model(xb).float().numpy())
    return np.concatenate(outs)


def train_model(name, x_tr, y_tr, x_te, y_te, epochs, seed, aug):
    r = RECIPES[name]
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = r["cls"]()
    cl = r["channels_last"]
    if cl:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9, nesterov=True, weight_decay=r["wd"])
    n = len(x_tr)
    steps = epochs * ((n + r["batch"] - 1) // r["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=steps, pct_start=0.25,
                                                div_factor=10.0, final_div_factor=100.0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    history = []
    t0, c0 = time.time(), time.process_time()
    print(f"[{name}] params={params:,} epochs={epochs} batch={r['batch']} lr={r['lr']} "
          f"wd={r['wd']} aug={aug}", flush=True)
    for ep in range(1, epochs + 1):
        model.train()
        te = time.time()
        perm = torch.randperm(n, generator=gen)
        tot_loss, tot_ok = 0.0, 0
        for i in range(0, n, r["batch"]):
            idx = perm[i:i + r["batch"]]
            xb, yb = xt[idx], yt[idx]
            xb = augment(xb, **aug, gen=gen)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_ok += (out.argmax(1) == yb).sum().item()
        acc = float((torch_predict(model, x_te, channels_last=cl).argmax(1) == y_te).mean())
        history.append(dict(epoch=ep, train_loss=round(tot_loss / n, 4), train_acc=round(tot_ok / n, 4),
                            test_acc=round(acc, 4), seconds=round(time.time() - te, 1)))
        print(f"[{name}] epoch {ep}/{epochs} loss={tot_loss / n:.4f} train_acc={tot_ok / n:.4f} "
              f"test_acc={acc:.4f} ({time.time() - te:.0f}s, total {time.time() - t0:.0f}s)", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, dict(params=params, epochs=epochs, train_seconds=round(wall, 1), train_cpu_seconds=round(cpu, 1),
                       history=history)


# --------------------------------------------------------------------------- export / check
def op_counter(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter(n.op_type for n in m.graph.node)
    # count nodes inside local functions too (dynamo exports may use them)
    for f in m.functions:
        c.update(f"{n.op_type}" for n in f.node)
    return dict(sorted(c.items()))


def file_bytes(path):
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0), data if data.exists() else None


def export_legacy(model, path, shape, keep_bn=False):
    """TorchScript exporter, opset 17, dynamic batch. With keep_bn the eval-mode
    model is exported with TrainingMode.PRESERVE: the exporter's BN-into-Conv
    folding runs only for TrainingMode.EVAL, so BatchNormalization stays as an
    inference node (training_mode=0, one output)."""
    x = torch.zeros(1, *shape)
    kwargs = {}
    if keep_bn:
        kwargs = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
    notes = "BatchNormalization kept (training=PRESERVE on an eval-mode model)" if keep_bn else ""
    return dict(exporter="legacy (TorchScript)", opset=17, dynamic_batch=True, notes=notes)


@contextlib.contextmanager
def dynamo_rewrites_without_bn_fusion():
    """The dynamo exporter's optimizer (onnxscript) folds BatchNormalization into
    the preceding Conv/Gemm through its default rewrite rules. Inside this context
    those rules are left out of the default set, everything else (constant folding,
    the other rewrites) runs unchanged."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    bn_rules = {id(r) for r in _fuse_batchnorm.rules}
    saved = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in bn_rules)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def export_dynamo(model, path, shape, keep_bn=False):
    notes = ""
    for p in (Path(path), Path(str(path) + ".data")):
        if p.exists():
            p.unlink()
    # Example batch 2: torch.export specialises size-1 dims, the graph is symbolic anyway.
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                                     dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
                                     optimize=not keep_bn)
        dynamic = True
    except Exception as e:  # pragma: no cover - depends on torch version
        notes = f"dynamic batch failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); fixed batch 1"
        print("  dynamo dynamic export failed, falling back to fixed batch:", notes, flush=True)
        with torch.no_grad():
            prog = torch.onnx.export(model, (torch.zeros(1, *shape),), dynamo=True, input_names=["input"],
                                     output_names=["logits"], verbose=False, optimize=not keep_bn)
        dynamic = False
    if keep_bn:
        with dynamo_rewrites_without_bn_fusion():
            prog.optimize()
        notes = (notes + "; " if notes else "") + (
            "BatchNormalization kept: exported with optimize=False, then the default onnxscript "
            "optimizer run without its BatchNorm-fusion rewrite rules")
    prog.save(str(path))
    import onnx

    opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    return dict(exporter="dynamo (torch.export)", opset=opset, dynamic_batch=dynamic, notes=notes)


def check_and_eval(path, x_te, y_te, ref_logits, dynamic):
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    out = sess.get_outputs()[0]
    assert inp.name == "input" and out.name == "logits", (inp.name, out.name)
    bs = 500 if dynamic else 1
    logits = np.concatenate([sess.run(["logits"], {"input": x_te[i:i + bs]})[0] for i in range(0, len(x_te), bs)])
    acc = float((logits.argmax(1) == y_te).mean())
    maxdiff = float(np.abs(logits - ref_logits).max())
    agree = float((logits.argmax(1) == ref_logits.argmax(1)).mean())
    return logits, dict(test_acc=round(acc, 4), max_abs_diff_vs_torch=maxdiff, argmax_agreement_vs_torch=agree,
                        input_shape=[d if isinstance(d, int) else str(d) for d in inp.shape],
                        output_shape=[d if isinstance(d, int) else str(d) for d in out.shape])


def check_batchnorm_kept(path):
    """Number of BatchNormalization nodes; raises unless there is at least one
    and each is an inference node (one output, training_mode 0)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        raise RuntimeError(f"{path}: BatchNormalization was folded away")
    for n in bns:
        mode = next((a.i for a in n.attribute if a.name == "training_mode"), 0)
        if len([o for o in n.output if o]) != 1 or mode != 0:
            raise RuntimeError(f"{path}: {n.name} is not an inference BatchNormalization")
    return len(bns)


def export_all(name, model, x_te, y_te, outdir, shape, exporters, cl=False, keep_bn=False):
    ref = torch_predict(model, x_te)
    torch_acc = float((ref.argmax(1) == y_te).mean())
    results = {}
    for kind in exporters:
        fname = f"{name}_{kind}.onnx" if name != "digits" else "digits_cnn.onnx"
        path = outdir / fname
        t = time.time()
        info = (export_legacy if kind == "legacy" else export_dynamo)(model, path, shape, keep_bn=keep_bn)
        if keep_bn:
            info["batchnorm_nodes"] = check_batchnorm_kept(path)
        logits, ev = check_and_eval(path, x_te, y_te, ref, info["dynamic_batch"])
        size, data = file_bytes(path)
        info.update(ev)
        info.update(file=fname, external_data=data.name if data else None, size_bytes=size,
                    op_types=op_counter(path), torch_test_acc=round(torch_acc, 4))
        if info["max_abs_diff_vs_torch"] > 1e-3 or info["argmax_agreement_vs_torch"] < 0.999:
            raise RuntimeError(f"{fname} disagrees with torch: {ev}")
        print(f"  {fname}: ort_acc={ev['test_acc']:.4f} torch_acc={torch_acc:.4f} "
              f"maxdiff={ev['max_abs_diff_vs_torch']:.2e} size={size / 1e6:.2f}MB "
              f"dynamic_batch={info['dynamic_batch']} ({time.time() - t:.0f}s)\n    ops={info['op_types']}",
              flush=True)
        results[fname] = info
    return results


def l1_prune_sanity(model, x_te, y_te, ratio=0.5):
    """Plain L1 channel pruning (zeroing) of every conv's output channels, no
    fine-tuning, to show that pruning actually hurts this model."""
    import copy

    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        last_conv = None
        for mod in m.modules():  # every Conv2d here is directly followed by its BatchNorm2d
            if isinstance(mod, nn.Conv2d):
                last_conv = mod
            elif isinstance(mod, nn.BatchNorm2d):
                w = last_conv.weight.abs().flatten(1).sum(1)
                drop = torch.argsort(w)[: int(round(ratio * len(w)))]
                last_conv.weight[drop] = 0
                mod.weight[drop] = 0
                mod.bias[drop] = 0
    return float((torch_predict(m, x_te).argmax(1) == y_te).mean())


# --------------------------------------------------------------------------- main
def load_meta(path):
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {}


@contextlib.contextmanager
def locked_meta(path):
    """Read-modify-write of a metadata.json under a file lock, so parallel
    training runs that finish at the same time do not drop each other's entries."""
    with open(Path(tempfile.gettempdir()) / f"onnx_intrafusion_{path.parent.name}_meta.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = load_meta(path)
        yield meta
        path.write_text(json.dumps(meta, indent=2) + "\n")


def parse_training_args(doc, all_models, argv=None, add_arguments=None):
    """Command line shared by the sample trainers (--models, --epochs, --seed,
    --threads, plus whatever `add_arguments(parser)` adds). Sets torch's thread
    count and deterministic mode; returns (args, list of model names)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--models", default=",".join(all_models),
                    help=f"comma separated subset of {','.join(all_models)}")
    ap.add_argument("--epochs", type=int, default=None, help="override every model's default epoch count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in all_models]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {all_models}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, seed={args.seed}", flush=True)
    return args, models


def main(argv=None):
    args, models = parse_training_args(
        __doc__, ALL_MODELS, argv,
        lambda ap: ap.add_argument("--exporters", default="legacy,dynamo", help="fashion models: legacy,dynamo"))

    fashion = [m for m in models if m in FASHION_MODELS]
    if fashion:
        x_tr, y_tr = datasets.load_fashion_mnist("train")
        x_te, y_te = datasets.load_fashion_mnist("test")
        outdir = SAMPLES / "fashion"
        outdir.mkdir(parents=True, exist_ok=True)
        meta_path = outdir / "metadata.json"
        fill = float((0.0 - datasets.FASHION_MEAN) / datasets.FASHION_STD)
        aug = dict(pad=2, fill=fill, flip=True)
        for name in fashion:
            epochs = args.epochs or RECIPES[name]["epochs"]
            model, info = train_model(name, x_tr, y_tr, x_te, y_te, epochs, args.seed, aug)
            files = export_all(name, model, x_te, y_te, outdir, (1, 28, 28), args.exporters.split(","),
                               keep_bn=RECIPES[name].get("keep_bn", False))
            with locked_meta(meta_path) as meta:  # parallel runs
                meta.setdefault("dataset", dict(
                    name="Fashion-MNIST", source="Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)",
                    loader="benchmarks.datasets.load_fashion_mnist", test_images=int(len(y_te)),
                    input_normalisation=dict(scale="pixel/255", mean=datasets.FASHION_MEAN, std=datasets.FASHION_STD),
                    classes=list(datasets.FASHION_CLASSES)))
                meta.setdefault("files", {})
                r = RECIPES[name]
                for fname, fi in files.items():
                    meta["files"][fname] = dict(
                        model=name, **fi, params=info["params"], epochs=info["epochs"],
                        train_wall_seconds=info["train_seconds"],
                        train_cpu_seconds=info["train_cpu_seconds"], seed=args.seed, threads=args.threads,
                        torch_version=torch.__version__,
                        input_normalisation=dict(mean=datasets.FASHION_MEAN, std=datasets.FASHION_STD),
                        training=dict(optimizer="SGD nesterov momentum 0.9", lr_schedule="OneCycle", max_lr=r["lr"],
                                      weight_decay=r["wd"], batch=r["batch"],
                                      augmentation="random crop (pad 2) + horizontal flip"),
                        history=info["history"])

    if "digits" in models:
        x_tr, y_tr = datasets.load_digits_split("train")
        x_te, y_te = datasets.load_digits_split("test")
        outdir = SAMPLES / "digits"
        outdir.mkdir(parents=True, exist_ok=True)
        epochs = args.epochs or RECIPES["digits"]["epochs"]
        fill = float((0.0 - datasets.DIGITS_MEAN) / datasets.DIGITS_STD)
        model, info = train_model("digits", x_tr, y_tr, x_te, y_te, epochs, args.seed,
                                  dict(pad=1, fill=fill, flip=False))
        files = export_all("digits", model, x_te, y_te, outdir, (1, 8, 8), ["legacy"])
        pruned = l1_prune_sanity(model, x_te, y_te, 0.5)
        print(f"  digits: plain L1 50% channel pruning (no fine-tune) -> test acc {pruned:.4f}", flush=True)
        fi = files["digits_cnn.onnx"]
        r = RECIPES["digits"]
        meta = dict(
            dataset=dict(name="scikit-learn load_digits (8x8)", loader="benchmarks.datasets.load_digits_split",
                         split=f"stratified, test fraction {datasets.DIGITS_TEST_FRACTION}, "
                               f"seed {datasets.DIGITS_SPLIT_SEED}",
                         train_images=int(len(y_tr)), test_images=int(len(y_te)),
                         input_normalisation=dict(scale="pixel/16", mean=datasets.DIGITS_MEAN,
                                                  std=datasets.DIGITS_STD)),
            files={"digits_cnn.onnx": dict(
                model="digits_cnn", **fi, params=info["params"], epochs=info["epochs"],
                train_wall_seconds=info["train_seconds"],
                    train_cpu_seconds=info["train_cpu_seconds"], seed=args.seed, threads=args.threads,
                torch_version=torch.__version__,
                input_normalisation=dict(mean=datasets.DIGITS_MEAN, std=datasets.DIGITS_STD),
                l1_prune_50pct_zeroed_no_finetune_test_acc=round(pruned, 4),
                training=dict(optimizer="SGD nesterov momentum 0.9", lr_schedule="OneCycle", max_lr=r["lr"],
                              weight_decay=r["wd"], batch=r["batch"], augmentation="random shift (pad 1)"),
                history=info["history"])},
        )
        (outdir / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
