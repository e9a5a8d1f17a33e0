"""Accuracy with a little unlabelled data: calibration-driven recovery, no training.

Models: the Fashion-MNIST CNNs of ``samples/fashion/`` (``{name}_legacy.onnx``,
when present) and the digits CNN ``samples/digits/digits_cnn.onnx``.
Calibration images come from the TRAINING split (a seeded random subset, no
labels used); accuracy is measured with onnxruntime on the whole test split
(10k images for Fashion-MNIST, 450 for digits).

Grid (whole network, every prunable group at the same sparsity):
  sparsity {0.3, 0.5, 0.7} x method {prune, intrafusion} x
  {data-free, lstsq with 128/512/2048 images, bias and ewr with 512 images};
  plus activation importance (intrafusion + lstsq), the target setting
  (1024 images, lstsq), and Gaussian noise on the calibration inputs at the
  middle sparsity (lstsq vs ewr with the smallest and largest sets: the EWR
  robustness claim).
Time and peak numpy memory (tracemalloc) of each prune() call are recorded.

    python benchmarks/calibration.py                    # full grid
    python benchmarks/calibration.py --quick            # 512 images, sparsity 0.5 only
    python benchmarks/calibration.py --models digits    # only the digits CNN

Writes docs/results/calibration.json and docs/results/calibration.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_intrafusion import prune  # noqa: E402

FASHION_MODELS = ("vgg11bn", "resnet18", "mobilenetv2")
SPARSITIES = (0.3, 0.5, 0.7)
SIZES = (128, 512, 2048)
TARGET_SIZE = 1024
MODES = ("bias", "lstsq", "ewr")
NOISE = 0.5  # std of the Gaussian noise added to the (standardised) calibration inputs


def model_files(names: list[str], fashion_dir: Path) -> dict[str, Path]:
    files = {}
    for name in names:
        path = (ROOT / "samples" / "digits" / "digits_cnn.onnx" if name == "digits"
                else fashion_dir / f"{name}_legacy.onnx")
        if path.exists():
            files[name] = path
        else:
            print(f"skipping {name}: {path} not found", file=sys.stderr)
    return files


def data(name: str):
    from datasets import load_digits_split, load_fashion_mnist

    load = load_digits_split if name == "digits" else load_fashion_mnist
    (x_train, _), (x_test, y_test) = load("train"), load("test")
    return x_train, x_test, y_test


class Evaluator:
    def __init__(self, x, y, batch: int = 1000):
        import onnxruntime as ort

        self.ort, self.x, self.y, self.batch = ort, x, y, batch

    def __call__(self, model) -> float:
        opts = self.ort.SessionOptions()
        opts.log_severity_level = 3
        sess = self.ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        hits = 0
        for i in range(0, len(self.x), self.batch):
            hits += int((sess.run(None, {name: self.x[i:i + self.batch]})[0].argmax(1) == self.y[i:i + self.batch]).sum())
        return hits / len(self.x)


def timed_prune(path, **kwargs):
    tracemalloc.start()
    start = time.perf_counter()
    result = prune(path, validate=False, **kwargs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def run(args) -> dict:
    rows = []
    files = model_files(args.models, Path(args.fashion_dir))
    for name, path in files.items():
        x_train, x_test, y_test = data(name)
        evaluate = Evaluator(x_test, y_test)
        order = np.random.default_rng(args.seed).permutation(len(x_train))
        base = evaluate(__import__("onnx").load(str(path)))
        print(f"\n== {name}: baseline test accuracy {base:.4f} ({len(x_test)} test images)", flush=True)

        def record(**row):
            row.update(model=name, baseline=base)
            rows.append(row)
            print(f"  {row['sparsity']:.1f} {row['method']:<11} {row['importance']:<10} {row['recover']:<5} "
                  f"n={row['calibration']:<5} noise={row['noise']:<4} acc {row['accuracy']:.4f}  "
                  f"{row['seconds']:.1f}s  {row['peak_mb']:.0f}MB", flush=True)

        def one(sparsity, method, recover=None, size=0, importance="l1", noise=0.0):
            calib = None
            if size:
                calib = x_train[order[:size]]
                if noise:
                    calib = calib + np.random.default_rng(args.seed + 1).normal(0, noise, calib.shape).astype(calib.dtype)
                calib = {"input": calib}
            result, seconds, peak = timed_prune(path, sparsity=sparsity, method=method, importance=importance,
                                                calibration=calib, recover=recover if size else None)
            record(sparsity=sparsity, method=method, importance=importance, recover=recover or "none",
                   calibration=size, noise=noise, accuracy=evaluate(result.model), seconds=seconds, peak_mb=peak,
                   macs=result.report.macs_after / max(result.report.macs_before, 1))

        sizes = [s for s in args.sizes if s <= len(x_train)]
        side = min(args.side_size, len(x_train))
        target = min(TARGET_SIZE, len(x_train))
        for sparsity in args.sparsities:
            for method in ("prune", "intrafusion"):
                one(sparsity, method)
                for size in sizes:
                    one(sparsity, method, "lstsq", size)
                for mode in args.modes:
                    if mode != "lstsq":
                        one(sparsity, method, mode, side)
                if target not in sizes:
                    one(sparsity, method, "lstsq", target)
            one(sparsity, "intrafusion", "lstsq", target, importance="activation")
            if not args.no_noise and sparsity == args.sparsities[len(args.sparsities) // 2]:
                for mode in ("lstsq", "ewr"):
                    for size in sorted({min(sizes), max(sizes)}):
                        one(sparsity, "intrafusion", mode, size, noise=NOISE)
    return {"rows": rows, "settings": {"sizes": args.sizes, "sparsities": args.sparsities, "modes": args.modes,
                                       "noise_std": NOISE, "seed": args.seed, "target_size": TARGET_SIZE}}


def print_table(result: dict) -> None:
    rows = result["rows"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name and r["noise"] == 0 and r["importance"] == "l1"]
        sizes = sorted({r["calibration"] for r in mine if r["calibration"]})
        print(f"\n{name} (baseline {mine[0]['baseline']:.4f}): test accuracy, whole network")
        head = f"{'sparsity':>8} {'method':<11} {'data-free':>9}"
        for size in sizes:
            head += "".join(f" {m + '@' + str(size):>12}" for m in ("bias", "lstsq", "ewr")
                            if any(r['recover'] == m and r['calibration'] == size for r in mine))
        print(head)
        for sparsity in sorted({r["sparsity"] for r in mine}):
            for method in ("prune", "intrafusion"):
                sel = [r for r in mine if r["sparsity"] == sparsity and r["method"] == method]
                free = next((r["accuracy"] for r in sel if r["recover"] == "none"), float("nan"))
                line = f"{sparsity:>8.1f} {method:<11} {free:>9.4f}"
                for size in sizes:
                    for m in ("bias", "lstsq", "ewr"):
                        hit = [r for r in sel if r["recover"] == m and r["calibration"] == size]
                        if hit:
                            line += f" {hit[0]['accuracy']:>12.4f}"
                        elif any(r['recover'] == m and r['calibration'] == size for r in mine):
                            line += f" {'':>12}"
                print(line)
        extra = [r for r in rows if r["model"] == name and (r["noise"] or r["importance"] != "l1")]
        if extra:
            print("  activation importance / noisy calibration (intrafusion):")
            for r in extra:
                print(f"    sparsity {r['sparsity']:.1f} {r['importance']:<10} {r['recover']:<5} n={r['calibration']:<5} "
                      f"noise std {r['noise']:<4} acc {r['accuracy']:.4f}")
        timing = [r for r in rows if r["model"] == name]
        free_t = [r["seconds"] for r in timing if r["recover"] == "none"]
        for m in ("bias", "lstsq", "ewr"):
            t = [r for r in timing if r["recover"] == m and r["noise"] == 0]
            if t and free_t:
                print(f"  time {m}: median {np.median([r['seconds'] for r in t]):.1f}s, peak numpy memory "
                      f"{max(r['peak_mb'] for r in t):.0f}MB (data-free median {np.median(free_t):.2f}s, peak "
                      f"{max(r['peak_mb'] for r in timing if r['recover'] == 'none'):.0f}MB)")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name and r["noise"] == 0 and r["importance"] == "l1"]
        size = max([r["calibration"] for r in mine if r["recover"] == "ewr"] or [0])
        for method, style in (("prune", "--"), ("intrafusion", "-")):
            for mode, color in (("none", "black"), ("bias", "tab:orange"), ("lstsq", "tab:blue"), ("ewr", "tab:green")):
                pts = sorted((r["sparsity"], r["accuracy"]) for r in mine if r["method"] == method
                             and r["recover"] == mode and (mode == "none" or r["calibration"] == size))
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{method} {mode}")
        ax.axhline(mine[0]["baseline"], color="gray", lw=0.8)
        ax.set_title(f"{name} (calibration {size} train images)")
        ax.set_xlabel("channel sparsity (whole network)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg11bn,resnet18,mobilenetv2,digits")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--side-size", type=int, default=512, help="calibration size for bias and ewr (default 512)")
    p.add_argument("--fashion-dir", default=str(ROOT / "samples" / "fashion"), help="folder of the Fashion-MNIST models")
    p.add_argument("--tag", default="", help="suffix of the output files (calibration{tag}.json/.png)")
    p.add_argument("--quick", action="store_true", help="512 images, sparsity 0.5, lstsq and ewr")
    p.add_argument("--no-noise", action="store_true", help="skip the noisy-calibration runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.modes = args.modes.split(",")
    if args.quick:
        args.sparsities, args.sizes, args.modes = [0.5], [512], ["lstsq", "ewr"]
        args.tag = args.tag or "_quick"  # a quick run never overwrites the full results
    start = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"calibration{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    if result["rows"]:
        plot(result, out / f"{stem}.png")
    print(f"\nwall time {result['wall_seconds']}s; wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
