"""Where to prune: uniform vs global vs sensitivity allocation at a MAC budget, and the analysis time.

Part 1 (accuracy).  The Fashion-MNIST models of ``samples/fashion/`` (legacy
exports) at 2x and 4x fewer MACs, 1024 unlabelled training images
(seeded subset) as calibration, Intra-Fusion + lstsq recovery for every
allocation, test accuracy on the 10k test split:

* uniform      every group loses the same fraction of its channels; that
               fraction is found by bisection so the MAC budget is met;
* global       ``allocation="global"`` (channels ranked across groups, MAC target);
* sensitivity  ``allocation="sensitivity"``: one analysis per model
               (default levels 0.25/0.5/0.75, reused for both budgets).

Part 2 (analysis time).  The ResNet-50-sized model of benchmarks/models.py
(random weights, 224x224): the analysis (no recovery, 3 levels) with
``workers=1`` and ``workers=2``; ``--r50-samples`` calibration images
(random normal inputs; 10% are held back and evaluated).

    python benchmarks/sensitivity.py                       # both parts
    python benchmarks/sensitivity.py --quick               # vgg11bn only, 256 images, no ResNet-50
    python benchmarks/sensitivity.py --parts time --r50-samples 40

Writes docs/results/sensitivity.json (+ sensitivity.png: per-model heat maps)
and prints tables.
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
from onnx_intrafusion.plans import preload_pot  # noqa: E402
from onnx_intrafusion.sensitivity import Sensitivity  # noqa: E402

FASHION = ROOT / "samples" / "fashion"
MODELS = ("vgg11bn", "resnet18", "mobilenetv2", "mobilenetv3")
BUDGETS = (2.0, 4.0)  # x fewer MACs
ALLOCATIONS = ("uniform", "global", "sensitivity")
OUT = ROOT / "docs" / "results" / "sensitivity.json"


def uniform_at_budget(path: Path, budget: float, **kwargs):
    """Uniform channel sparsity meeting the MAC budget (bisection on data-free runs), then the real run."""
    lo, hi = 0.0, 0.95
    target = 1.0 / budget
    for _ in range(12):
        mid = (lo + hi) / 2
        rep = prune(str(path), sparsity=mid, validate=False, method="prune", recover="none").report
        if rep.macs_after / rep.macs_before <= target:
            hi = mid
        else:
            lo = mid
    return prune(str(path), sparsity=hi, validate=False, **kwargs), hi


def accuracy_part(args) -> list[dict]:
    import onnx
    from calibration import Evaluator  # benchmarks/calibration.py: accuracy on a labelled set
    from datasets import load_fashion_mnist

    (x_train, _), (x_test, y_test) = load_fashion_mnist("train"), load_fashion_mnist("test")
    evaluate = Evaluator(x_test, y_test)
    calib = {"input": x_train[np.random.default_rng(args.seed).permutation(len(x_train))[:args.samples]]}
    rows = []
    for name in args.models:
        path = FASHION / f"{name}_legacy.onnx"
        if not path.exists():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        base = evaluate(onnx.load(str(path)))
        table_path = Path(args.tables) / f"{name}_legacy.sensitivity.json"
        table = prune(str(path), calibration=calib, analyse_only=True, workers=args.workers,
                      sensitivity=str(table_path)).sensitivity
        print(f"\n== {name}: unpruned {100 * base:.2f}%; analysis {table.seconds:.0f}s "
              f"({sum(len(g.points) for g in table.groups)} runs, {table.backend})", flush=True)
        print(table.to_text(max_rows=12), flush=True)
        for budget in args.budgets:
            common = dict(calibration=calib, seed=args.seed)
            for allocation in args.allocations:
                t = time.perf_counter()
                if allocation == "uniform":
                    result, channel_sparsity = uniform_at_budget(path, budget, **common)
                else:
                    channel_sparsity = None
                    extra = dict(sensitivity=str(table_path), workers=args.workers) if allocation == "sensitivity" else {}
                    result = prune(str(path), sparsity=1 - 1 / budget, allocation=allocation, validate=False,
                                   **common, **extra)
                rep = result.report
                row = dict(model=name, budget=budget, allocation=allocation, baseline=base, calibration=args.samples,
                           accuracy=evaluate(result.model), macs_before=rep.macs_before, macs_after=rep.macs_after,
                           params_before=rep.params_before, params_after=rep.params_after,
                           channel_sparsity=channel_sparsity, seconds=round(time.perf_counter() - t, 1),
                           analysis_seconds=round(table.seconds, 1) if allocation == "sensitivity" else None,
                           predicted=(rep.sensitivity or {}).get("predicted_distortion"),
                           budget_met=(rep.sensitivity or {}).get("budget_met"))
                rows.append(row)
                print(f"  {budget:g}x {allocation:<11} acc {100 * row['accuracy']:6.2f}%  MACs "
                      f"{rep.macs_before / max(rep.macs_after, 1):.2f}x fewer  ({row['seconds']}s)", flush=True)
        if args.plot:
            table.plot(Path(args.plot_dir) / f"sensitivity_{name}.png")
    return rows


def time_part(args) -> list[dict]:
    import onnx
    from models import export

    path = export("resnet50")
    rng = np.random.default_rng(0)
    calib = {"input": rng.standard_normal((args.r50_samples, 3, 224, 224)).astype(np.float32)}
    model = onnx.load(str(path))
    rows = []
    for workers in args.r50_workers:
        start = time.perf_counter()
        table = prune(model, calibration=calib, analyse_only=True, workers=workers, recover="none",
                      sensitivity_levels=args.levels).sensitivity
        wall = time.perf_counter() - start
        runs = sum(len(g.points) for g in table.groups)
        rows.append(dict(model="resnet50", workers=workers, groups=len(table.groups), runs=runs,
                         held_back=table.samples, calibration=args.r50_samples, analysis_seconds=table.seconds,
                         wall_seconds=round(wall, 1), backend=table.backend))
        print(f"resnet50 analysis, workers={workers}: {len(table.groups)} groups, {runs} runs on "
              f"{table.samples} held-back images: {table.seconds:.0f}s (wall {wall:.0f}s)", flush=True)
    return rows


def print_table(result: dict) -> None:
    rows = result.get("accuracy", [])
    if rows:
        print("\n| model | budget | unpruned | uniform | global | sensitivity | analysis |")
        print("|---|---|---|---|---|---|---|")
        for name in dict.fromkeys(r["model"] for r in rows):
            for budget in dict.fromkeys(r["budget"] for r in rows):
                cell = {r["allocation"]: r for r in rows if r["model"] == name and r["budget"] == budget}
                if not cell:
                    continue
                any_row = next(iter(cell.values()))
                accs = " | ".join(f"{100 * cell[a]['accuracy']:.2f}%" if a in cell else "-"
                                  for a in ("uniform", "global", "sensitivity"))
                an = cell.get("sensitivity", {}).get("analysis_seconds")
                print(f"| {name} | {budget:g}x | {100 * any_row['baseline']:.2f}% | {accs} | "
                      f"{'-' if an is None else f'{an:.0f}s'} |")
    for r in result.get("time", []):
        print(f"resnet50 analysis workers={r['workers']}: {r['analysis_seconds']:.0f}s "
              f"({r['runs']} runs, {r['held_back']} held-back images)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    p.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=ALLOCATIONS)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["accuracy", "time"], choices=("accuracy", "time"))
    p.add_argument("--r50-samples", type=int, default=256)
    p.add_argument("--r50-workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--levels", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--tables", default=str(ROOT / "results"), help="folder for the per-model analyses (reused)")
    p.add_argument("--fresh", action="store_true", help="measure the analyses again even if saved")
    p.add_argument("--plot", action="store_true", help="also write one heat map per model")
    p.add_argument("--plot-dir", default=str(ROOT / "docs" / "results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.samples, args.parts = ["vgg11bn"], 256, ["accuracy"]
    preload_pot()
    Path(args.tables).mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if "accuracy" in args.parts:
        if args.fresh:
            for name in args.models:
                (Path(args.tables) / f"{name}_legacy.sensitivity.json").unlink(missing_ok=True)
        result["accuracy_settings"] = dict(samples=args.samples, seed=args.seed, budgets=args.budgets,
                                           method="intrafusion", recover="lstsq", importance="l1",
                                           levels=[0.25, 0.5, 0.75])
        key = lambda r: (r["model"], r["budget"], r["allocation"])  # noqa: E731
        for name in args.models:  # saved after every model: a long run keeps what it measured
            new = accuracy_part(argparse.Namespace(**{**vars(args), "models": [name]}))
            fresh = {key(r) for r in new}
            result["accuracy"] = [r for r in result.get("accuracy", []) if key(r) not in fresh] + new
            out.write_text(json.dumps(result, indent=1) + "\n")
    if "time" in args.parts:
        result["time"] = time_part(args)
        result["time_settings"] = dict(calibration=args.r50_samples, levels=args.levels, recover="none",
                                       input="224x224 random normal", cores=2)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
