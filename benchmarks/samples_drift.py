"""Params, MACs and output drift of every bundled sample, intrafusion vs prune.

Drift is measured on random normal inputs (the samples have random weights, so
there is no accuracy to measure; benchmarks/accuracy.py does that on real
data).  Cosine similarity and top-1 agreement of the logits compare each
pruned model with its original.

    python benchmarks/samples_drift.py [--sparsity 0.5] [--samples 256] [--out docs/results/samples_drift.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_intrafusion import prune  # noqa: E402
from onnx_intrafusion.model_io import load_model  # noqa: E402
from onnx_intrafusion.validate import compare  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "samples_drift.json"))
    args = ap.parse_args(argv)
    rows = []
    header = f"{'sample':<26} {'method':<12} {'params':>17} {'MACs':>23} {'cosine':>7} {'top-1':>6} {'time s':>6}"
    print(header)
    print("-" * len(header))
    for path in sorted((ROOT / "samples").glob("*.onnx")):
        original = load_model(path).model
        for method in ("intrafusion", "prune"):
            t0 = time.perf_counter()
            res = prune(path, sparsity=args.sparsity, method=method, validate=False)
            wall = time.perf_counter() - t0
            drift = compare(original, res.model, provider="cpu", samples=args.samples).outputs[0]
            r = res.report
            row = dict(sample=path.name, method=method, sparsity=args.sparsity,
                       params_before=r.params_before, params_after=r.params_after,
                       macs_before=r.macs_before, macs_after=r.macs_after,
                       cosine=drift.cosine, top1_agreement=drift.top1_agreement, seconds=round(wall, 3))
            rows.append(row)
            print(f"{path.name:<26} {method:<12} {r.params_before:>7}->{r.params_after:<8} "
                  f"{r.macs_before:>10}->{r.macs_after:<11} {drift.cosine:>7.3f} {drift.top1_agreement:>6.3f} {wall:>6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
