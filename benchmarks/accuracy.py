"""Accuracy without fine-tuning: Intra-Fusion vs plain pruning on real data.

Models: the Fashion-MNIST CNNs trained by ``samples/train.py`` (VGG11-BN-,
ResNet18- and MobileNetV2-style; legacy exports, dynamic batch), evaluated
with onnxruntime on the full 10k test split.  Needs the Debian package
``dataset-fashion-mnist`` (no download at run time).

Protocols
  whole  every prunable group at the same sparsity (what a user does);
  group  one group at a time, the groups nearest the output, others untouched
         (the paper's protocol, so numbers sit beside its reference runs).
Grid: method {prune, intrafusion} x importance {l1, l2, random} x sparsity
0.1..0.8; plus Intra-Fusion's options (importance marginals, Sinkhorn with a
few regularisations, ground-cost p=2) at 0.3/0.5/0.7.

    python benchmarks/accuracy.py                 # full run (about 20 min on 2 cores)
    python benchmarks/accuracy.py --quick         # one model, few points (< 2 min)

Writes docs/results/accuracy.json and docs/results/accuracy.png (and prints tables).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_intrafusion import prune  # noqa: E402
from onnx_intrafusion.report import model_stats  # noqa: E402

FASHION = ROOT / "samples" / "fashion"
MODELS = ("vgg11bn", "resnet18", "mobilenetv2")
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
OPTION_SPARSITIES = (0.3, 0.5, 0.7)
# Intra-Fusion variants: (label, keyword arguments of prune())
OPTIONS = (
    ("marginals=importance", {"marginals": "importance"}),
    ("sinkhorn reg=0.01", {"ot_reg": 0.01}),
    ("sinkhorn reg=0.05", {"ot_reg": 0.05}),
    ("sinkhorn reg=0.2", {"ot_reg": 0.2}),
    ("cost p=2", {"ot_p": 2.0}),
)


class Evaluator:
    """Accuracy of a model (path or ModelProto) on a fixed labelled set, with onnxruntime."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int = 1000):
        import onnxruntime as ort

        self.ort, self.x, self.y, self.batch = ort, x, y, batch

    def __call__(self, model) -> float:
        src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        sess = self.ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        step = fixed if isinstance(fixed, int) and fixed > 0 else self.batch
        correct = 0
        for i in range(0, len(self.x) - len(self.x) % step if isinstance(fixed, int) else len(self.x), step):
            logits = sess.run(None, {name: self.x[i:i + step]})[0]
            correct += int(np.sum(logits.argmax(axis=1) == self.y[i:i + step]))
        return correct / len(self.x)


def model_path(name: str) -> Path:
    return FASHION / f"{name}_legacy.onnx"


def run(args) -> dict:
    from datasets import DatasetNotFoundError, load_fashion_mnist

    try:
        x, y = load_fashion_mnist("test")
    except DatasetNotFoundError as exc:
        sys.exit(f"accuracy.py: {exc}")
    evaluate = Evaluator(x, y)
    meta = json.loads((FASHION / "metadata.json").read_text()) if (FASHION / "metadata.json").exists() else {}
    rows, originals = [], {}
    start = time.perf_counter()

    def record(model_name, protocol, group, method, importance, sparsity, option, result):
        acc = evaluate(result.model)
        rep = result.report
        row = dict(model=model_name, protocol=protocol, group=group, method=method, importance=importance,
                   sparsity=sparsity, option=option, accuracy=acc, params=rep.params_after, macs=rep.macs_after,
                   params_before=rep.params_before, macs_before=rep.macs_before)
        rows.append(row)
        print(f"[{time.perf_counter() - start:7.1f}s] {model_name:<12} {protocol:<5} g={str(group):<4} "
              f"{method:<11} {importance:<6} s={sparsity:.1f} {option or '':<20} acc={100 * acc:6.2f}%"
              f"  MACs {rep.macs_after / max(rep.macs_before, 1):.2f}x", flush=True)

    for name in args.models:
        path = model_path(name)
        if not path.exists():
            sys.exit(f"accuracy.py: {path} is missing; train it with: python samples/train.py --models {name}")
        base = evaluate(path)
        params, macs = model_stats(__import__("onnx").load(str(path)))
        originals[name] = dict(accuracy=base, params=params, macs=macs,
                               metadata_accuracy=meta.get("files", {}).get(path.name, {}).get("test_acc"))
        print(f"{name}: original accuracy {100 * base:.2f}%  params {params:,}  MACs {macs:,}", flush=True)
        probe = prune(path, sparsity=0.5, validate=False).report
        prunable = [g.id for g in probe.groups if g.status == "pruned"]
        last_groups = prunable[-args.groups:][::-1]  # nearest the output first

        for sparsity in args.sparsities:
            for importance in args.importances:
                for method in ("prune", "intrafusion"):
                    if "whole" in args.protocols:
                        res = prune(path, sparsity=sparsity, method=method, importance=importance,
                                    seed=args.seed, validate=False)
                        record(name, "whole", None, method, importance, sparsity, None, res)
                    if "group" in args.protocols and importance == "l1":
                        for gid in last_groups:
                            res = prune(path, sparsity=sparsity, method=method, importance=importance,
                                        seed=args.seed, groups=[gid], validate=False)
                            record(name, "group", gid, method, importance, sparsity, None, res)
        if args.options:
            for sparsity in [s for s in OPTION_SPARSITIES if s in args.sparsities] or args.sparsities[:1]:
                for label, kwargs in OPTIONS:
                    for protocol in args.protocols:
                        groups = [last_groups[0]] if protocol == "group" else None
                        res = prune(path, sparsity=sparsity, method="intrafusion", importance="l1", seed=args.seed,
                                    groups=groups, validate=False, **kwargs)
                        record(name, protocol, None if groups is None else groups[0], "intrafusion", "l1",
                               sparsity, label, res)
    return dict(originals=originals, rows=rows, wall_seconds=round(time.perf_counter() - start, 1),
                args={k: v for k, v in vars(args).items() if k != "out"})


def print_tables(result: dict) -> None:
    rows = result["rows"]
    for name, orig in result["originals"].items():
        print(f"\n## {name} (original {100 * orig['accuracy']:.2f}%)")
        sps = sorted({r["sparsity"] for r in rows if r["model"] == name})
        head = f"{'protocol':<9}{'group':<6}{'importance':<11}{'method':<12}" + "".join(f"{s:>7.1f}" for s in sps)
        print(head)
        keys = sorted({(r["protocol"], str(r["group"]), r["importance"], r["method"]) for r in rows
                       if r["model"] == name and r["option"] is None})
        for protocol, group, importance, method in keys:
            cells = []
            for s in sps:
                match = [r for r in rows if r["model"] == name and r["option"] is None and r["protocol"] == protocol
                         and str(r["group"]) == group and r["importance"] == importance and r["method"] == method
                         and r["sparsity"] == s]
                cells.append(f"{100 * match[0]['accuracy']:>7.2f}" if match else f"{'':>7}")
            print(f"{protocol:<9}{group:<6}{importance:<11}{method:<12}" + "".join(cells))
        opts = [r for r in rows if r["model"] == name and r["option"]]
        if opts:
            print("Intra-Fusion options (l1):")
            for r in opts:
                print(f"  {r['protocol']:<6} g={str(r['group']):<4} s={r['sparsity']:.1f} {r['option']:<22} "
                      f"{100 * r['accuracy']:6.2f}%")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["originals"])
    protocols = sorted({r["protocol"] for r in result["rows"]}, reverse=True)
    fig, axes = plt.subplots(len(protocols), len(names), figsize=(4.5 * len(names), 3.6 * len(protocols)),
                             squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, name in enumerate(names):
            ax = axes[i][j]
            rows = [r for r in result["rows"] if r["model"] == name and r["protocol"] == protocol and not r["option"]]
            if protocol == "group":
                # one colour per group, l1 importance: solid Intra-Fusion, dashed prune
                for k, gid in enumerate(sorted({r["group"] for r in rows})):
                    for method, style in (("intrafusion", "-"), ("prune", "--")):
                        pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                                     if r["group"] == gid and r["method"] == method and r["importance"] == "l1")
                        if pts:
                            ax.plot(*zip(*pts), style, color=f"C{k + 3}", marker="o", ms=3,
                                    label=f"{method} group {gid}")
                ax.legend(fontsize=6)
            else:
                for method, style in (("intrafusion", "-"), ("prune", "--")):
                    for imp, color in (("l1", "C0"), ("l2", "C1"), ("random", "C2")):
                        pts = sorted((r["sparsity"], r["accuracy"]) for r in rows
                                     if r["method"] == method and r["importance"] == imp)
                        if pts:
                            ax.plot(*zip(*pts), style, color=color, marker="o", ms=3, label=f"{method} {imp}")
            ax.axhline(result["originals"][name]["accuracy"], color="gray", lw=0.8, ls=":")
            title = f"{name}: " + ("whole network" if protocol == "whole" else "one group at a time")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--importances", default="l1,l2,random")
    ap.add_argument("--protocols", default="whole,group")
    ap.add_argument("--groups", type=int, default=3, help="groups nearest the output for the group protocol")
    ap.add_argument("--no-options", dest="options", action="store_false", help="skip the Intra-Fusion option sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="vgg11bn, 0.3/0.5/0.7, l1, one group (< 2 min)")
    ap.add_argument("--out", default=None,
                    help="output path without suffix (default docs/results/accuracy, with --quick accuracy_quick)")
    args = ap.parse_args(argv)
    if args.out is None:  # a quick run never overwrites the full results
        args.out = str(ROOT / "docs" / "results" / ("accuracy_quick" if args.quick else "accuracy"))
    if args.quick:
        args.models, args.sparsities, args.importances, args.groups, args.options = \
            "vgg11bn", "0.3,0.5,0.7", "l1", 1, False
    args.models = args.models.split(",")
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.importances = args.importances.split(",")
    args.protocols = args.protocols.split(",")
    result = run(args)
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}  (wall {result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
