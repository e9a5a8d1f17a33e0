"""What gradients buy: distillation recovery and Taylor / ProsPr importance on Fashion-MNIST.

Models: the Fashion-MNIST CNNs of ``samples/fashion/`` (``{name}_{exporter}.onnx``).
Unlabelled calibration images come from the TRAINING split (a seeded random
subset); accuracy is measured with onnxruntime on the 10k test images.

Grid (whole network, Intra-Fusion, every prunable group at the same sparsity):
  sparsity {0.3, 0.5, 0.7, 0.8} x calibration size {256, 1024, 8192} x
  importance {l1, activation, taylor, prospr} x recovery
  {none (data-free weights; the importance may still read the calibration images),
   lstsq, lstsq + distill}.
Every row runs in a fresh subprocess, so its wall time and peak resident
memory (ru_maxrss, which includes torch) are its own.  The JSON is rewritten
after every row and rows already in it are skipped: an interrupted run
resumes where it stopped.

    python benchmarks/finetune.py                  # full grid (hours on 2 cores)
    python benchmarks/finetune.py --quick          # vgg11bn, 0.5 and 0.7, 1024 images, l1/prospr, lstsq/distill
    python benchmarks/finetune.py --models resnet18 --sparsities 0.5 --sizes 8192 --importances l1

Writes docs/results/finetune.json (and finetune.png when matplotlib is there)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = ("vgg11bn", "resnet18", "mobilenetv2")
SPARSITIES = (0.3, 0.5, 0.7, 0.8)
SIZES = (256, 1024, 8192)
IMPORTANCES = ("l1", "activation", "taylor", "prospr")
RECOVERIES = ("none", "lstsq", "distill")
OUT = ROOT / "docs" / "results" / "finetune.json"


def key(row: dict) -> tuple:
    return (row["model"], row["exporter"], row["sparsity"], row["calibration"], row["importance"], row["recover"],
            row.get("epochs"), row.get("group"))


def one_row(spec: dict) -> dict:
    """Run one configuration in this process (the child side) and return its measured row."""
    from calibration import Evaluator, data

    from onnx_intrafusion import prune

    path = ROOT / "samples" / "fashion" / f"{spec['model']}_{spec['exporter']}.onnx"
    x_train, x_test, y_test = data(spec["model"])
    order = np.random.default_rng(spec["seed"]).permutation(len(x_train))
    calib = {"input": x_train[order[:spec["calibration"]]]} if spec["calibration"] else None
    kwargs = dict(sparsity=spec["sparsity"], importance=spec["importance"], calibration=calib, seed=spec["seed"],
                  validate=False)
    if calib is not None:
        kwargs["recover"] = spec["recover"]
    if spec["recover"] == "distill":
        kwargs["finetune_epochs"] = spec["epochs"]
    if spec.get("group") is not None:
        kwargs["groups"] = [spec["group"]]
    start = time.perf_counter()
    result = prune(path, **kwargs)
    seconds = time.perf_counter() - start
    row = dict(spec, accuracy=Evaluator(x_test, y_test)(result.model), seconds=round(seconds, 2),
               peak_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               macs=result.report.macs_after / max(result.report.macs_before, 1))
    report = result.report.to_dict() if hasattr(result.report, "to_dict") else {}
    if report.get("distill"):
        row["distill"] = report["distill"]
    row["timings"] = result.report.timings
    return row


def baseline(name: str, exporter: str) -> float:
    import onnx
    from calibration import Evaluator, data

    _, x_test, y_test = data(name)
    return Evaluator(x_test, y_test)(onnx.load(str(ROOT / "samples" / "fashion" / f"{name}_{exporter}.onnx")))


def last_groups(name: str, exporter: str, count: int = 3) -> list[int]:
    """The prunable groups nearest the output (the paper's one-group protocol, as benchmarks/accuracy.py)."""
    from onnx_intrafusion import prune

    probe = prune(ROOT / "samples" / "fashion" / f"{name}_{exporter}.onnx", sparsity=0.5, validate=False).report
    return [g.id for g in probe.groups if g.status == "pruned"][-count:][::-1]


def grid(args) -> list[dict]:
    specs = []
    if args.one_group:
        for name in args.models:
            for gid in last_groups(name, args.exporter):
                for sparsity in args.sparsities:
                    for importance in args.importances:
                        specs.append(dict(model=name, exporter=args.exporter, sparsity=sparsity,
                                          calibration=0 if importance in ("l1", "l2", "linf") else args.sizes[0],
                                          importance=importance, recover="none", epochs=None, seed=args.seed,
                                          group=gid))
        return specs
    for name in args.models:
        for sparsity in args.sparsities:
            for size in args.sizes:
                for importance in args.importances:
                    for recover in args.recoveries:
                        if importance == "l1" and recover == "none" and size != args.sizes[0]:
                            continue  # data-free with a weight importance does not depend on the size
                        specs.append(dict(model=name, exporter=args.exporter, sparsity=sparsity,
                                          calibration=0 if (importance == "l1" and recover == "none") else size,
                                          importance=importance, recover=recover,
                                          epochs=args.epochs if recover == "distill" else None, seed=args.seed))
    return specs


def run(args) -> dict:
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": [], "baselines": {}}
    done = {key(r) for r in result["rows"]}
    for name in args.models:
        tag = f"{name}_{args.exporter}"
        if tag not in result["baselines"]:
            result["baselines"][tag] = baseline(name, args.exporter)
    for spec in grid(args):
        if key(spec) in done:
            continue
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, __file__, "--row", json.dumps(spec)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            print(f"  FAILED {spec}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["baseline"] = result["baselines"][f"{row['model']}_{row['exporter']}"]
        result["rows"].append(row)
        done.add(key(row))
        extra = ""
        if "distill" in row:
            d = row["distill"]
            extra = (f"  held-back {d['held_back_before']:.4f} -> {d['held_back_after']:.4f} "
                     f"({d['epochs']} epochs, {d['seconds']:.0f}s)")
        print(f"  {row['model']} {row['sparsity']:.1f} n={row['calibration']:<5} {row['importance']:<10} "
              f"{row['recover']:<7} acc {row['accuracy']:.4f} (base {row['baseline']:.4f})  {row['seconds']:.0f}s "
              f"{row['peak_mb']:.0f}MB{extra}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def print_table(result: dict) -> None:
    rows = [r for r in result["rows"] if r.get("group") is None]
    for tag, base in result["baselines"].items():
        mine = [r for r in rows if f"{r['model']}_{r['exporter']}" == tag]
        if not mine:
            continue
        print(f"\n{tag} (unpruned {base:.4f}): test accuracy, whole network, Intra-Fusion")
        cols = [(imp, rec) for rec in RECOVERIES for imp in IMPORTANCES
                if any(r["importance"] == imp and r["recover"] == rec for r in mine)]
        print(f"{'sparsity':>8} {'images':>6} " + " ".join(f"{(imp + '/' + rec)[:17]:>17}" for imp, rec in cols))
        for sparsity in sorted({r["sparsity"] for r in mine}):
            for size in sorted({r["calibration"] for r in mine if r["calibration"]}):
                if not any(r["sparsity"] == sparsity and r["calibration"] == size for r in mine):
                    continue
                line = f"{sparsity:>8.1f} {size:>6} "
                for imp, rec in cols:
                    hit = [r for r in mine if r["sparsity"] == sparsity and r["importance"] == imp
                           and r["recover"] == rec and r["calibration"] in ((0, size) if rec == "none" else (size,))]
                    line += f" {hit[-1]['accuracy']:>17.4f}" if hit else f" {'-':>17}"
                print(line)
        for rec in RECOVERIES:
            sel = [r for r in mine if r["recover"] == rec]
            if sel:
                print(f"  {rec}: median wall time {np.median([r['seconds'] for r in sel]):.1f}s, "
                      f"peak RSS {max(r['peak_mb'] for r in sel):.0f}MB")


def print_one_group(result: dict) -> None:
    rows = [r for r in result["rows"] if r.get("group") is not None]
    if not rows:
        return
    imps = [i for i in IMPORTANCES if any(r["importance"] == i for r in rows)]
    print("\none group at a time, no recovery (Intra-Fusion): test accuracy")
    print(f"{'model':<20} {'group':>5} {'sparsity':>8} " + " ".join(f"{i:>10}" for i in imps))
    where = lambda r: (r["model"], r["exporter"], r["group"], r["sparsity"])  # noqa: E731
    for k in dict.fromkeys(where(r) for r in rows):
        hit = {r["importance"]: r["accuracy"] for r in rows if where(r) == k}
        print(f"{k[0] + '_' + k[1]:<20} {k[2]:>5} {k[3]:>8.1f} "
              + " ".join(f"{hit[i]:>10.4f}" if i in hit else f"{'-':>10}" for i in imps))


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("group") is None]
    tags = [t for t in result["baselines"] if any(f"{r['model']}_{r['exporter']}" == t for r in rows)]
    fig, axes = plt.subplots(1, len(tags), figsize=(5 * len(tags), 4), squeeze=False)
    styles = {"none": ":", "lstsq": "--", "distill": "-"}
    colors = {"l1": "black", "activation": "tab:orange", "taylor": "tab:green", "prospr": "tab:blue"}
    for ax, tag in zip(axes[0], tags):
        mine = [r for r in rows if f"{r['model']}_{r['exporter']}" == tag]
        sizes = [r["calibration"] for r in mine if r["calibration"]]
        size = max(set(sizes), key=sizes.count) if sizes else 0  # the size with the most rows
        for rec, style in styles.items():
            for imp, color in colors.items():
                pts = sorted((r["sparsity"], r["accuracy"]) for r in mine if r["recover"] == rec
                             and r["importance"] == imp and r["calibration"] in (0, size))
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{imp} {rec}")
        ax.axhline(result["baselines"][tag], color="gray", lw=0.8)
        ax.set_title(f"{tag} ({size} unlabelled train images)")
        ax.set_xlabel("channel sparsity (whole network)")
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"))
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--importances", default=",".join(IMPORTANCES))
    p.add_argument("--recoveries", default=",".join(RECOVERIES))
    p.add_argument("--epochs", type=int, default=10, help="distillation epochs (default 10)")
    p.add_argument("--one-group", action="store_true",
                   help="the paper's protocol instead: one group at a time (the three nearest the output), "
                   "no recovery; compares which channels each importance keeps (first --sizes value)")
    p.add_argument("--quick", action="store_true",
                   help="vgg11bn at 0.5 and 0.7 with 1024 images: l1/prospr x lstsq/distill (+ data-free l1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args(argv)
    if args.row:
        print(json.dumps(one_row(json.loads(args.row))))
        return 0
    args.models = args.models.split(",")
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.importances = args.importances.split(",")
    args.recoveries = args.recoveries.split(",")
    if args.quick:
        args.models, args.sparsities, args.sizes = ["vgg11bn"], [0.5, 0.7], [1024]
        args.importances, args.recoveries = ["l1", "prospr"], ["none", "lstsq", "distill"]
    start = time.perf_counter()
    result = run(args)
    print_table(result)
    print_one_group(result)
    plot(result, Path(args.out).with_suffix(".png"))
    print(f"\nwall time {time.perf_counter() - start:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
