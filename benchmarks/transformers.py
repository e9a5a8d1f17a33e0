"""Accuracy of the trained transformer samples under head / FFN pruning, data-free and with lstsq recovery.

Models (samples/transformers, see samples/README.md):

* ``vit_legacy.onnx``: Vision Transformer, Fashion-MNIST (test split, 10,000 images);
* ``textenc_legacy.onnx``: BERT-style text encoder, BBC News topics (test split, 444 articles).

For each model, each pruning kind (``heads``: ``head_sparsity=S``; ``ffn``:
``ffn_sparsity=S``; ``both``: both at ``S``; every other group kind at
sparsity 0; ``global`` / ``sensitivity``: ``allocation=`` that, ``S`` = the
fraction of the MACs removed, every kind competing for it; the sensitivity
analysis is measured once per model with lstsq and reused by its rows), each
``S`` in ``--sparsities`` and each recovery of ``KIND_RECOVERIES`` (``none``:
data-free; ``lstsq``: least squares on ``--calibration`` unlabelled samples
from the TRAINING split, with the tool's own held-back never-worse check;
``distill``: lstsq then 10 epochs of distillation, needs torch),
one ``onnx_intrafusion.prune`` run (l1 importance, default methods: heads are
dropped, FFN neurons merged with Intra-Fusion, ``target="none"`` = exact
counts).  Top-1 accuracy of the written model on the full test split with
onnxruntime, MACs before/after from the report, prune wall time and the
report's ``recovery_model`` record (whole-model distortion on held-back
calibration samples before/after recovery, and which one was kept).

    OMP_NUM_THREADS=1 python benchmarks/transformers.py           # 24 rows per model, ~10 minutes each
    OMP_NUM_THREADS=1 python benchmarks/transformers.py --kinds both,global   # a subset of the kinds
    OMP_NUM_THREADS=1 python benchmarks/transformers.py --quick   # S=0.5, 256 samples, test subsets
    OMP_NUM_THREADS=1 python benchmarks/transformers.py --models vit_dynamo,textenc_dynamo   # the dynamo exports
    OMP_NUM_THREADS=1 python benchmarks/transformers.py --hidden  # with/without the hidden size at equal MACs

Writes docs/results/transformers.json (``--quick``: transformers_quick.json; without ``--quick`` also
the plot docs/transformers.png)
after every row; a rerun skips rows already in the file with the same
settings (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from datasets import calibration_arrays, load_bbc_news, load_fashion_mnist  # noqa: E402

from onnx_intrafusion import prune  # noqa: E402
from onnx_intrafusion.errors import NothingToPrune  # noqa: E402

MODELS = ("vit_legacy", "textenc_legacy")
KINDS = ("heads", "ffn", "both", "global", "sensitivity")
SPARSITIES = (0.3, 0.5)
RECOVERIES = ("none", "lstsq", "distill")
#: Recoveries measured per kind: distillation (torch) only where it is compared across allocations;
#: the sensitivity allocation needs calibration data, so it has no data-free row.
KIND_RECOVERIES = {"heads": ("none", "lstsq"), "ffn": ("none", "lstsq"), "both": ("none", "lstsq", "distill"),
                   "global": ("none", "lstsq", "distill"), "sensitivity": ("lstsq", "distill")}
SAMPLES = ROOT / "samples" / "transformers"
OUT = ROOT / "docs" / "results"

ort.set_default_logger_severity(3)  # ORT's graph-optimizer chatter about Unsqueeze nodes is not a finding


def test_split(model: str, limit: int | None):
    """``(feeds, labels)`` of the model's test split (first ``limit`` samples if given)."""
    if model.startswith("textenc"):
        ids, mask, y = load_bbc_news("test")
        feeds = {"input_ids": ids, "attention_mask": mask}
    else:
        x, y = load_fashion_mnist("test")
        feeds = {"input": np.ascontiguousarray(x)}
    if limit is not None:
        feeds, y = {k: v[:limit] for k, v in feeds.items()}, y[:limit]
    return feeds, np.asarray(y)


def accuracy(model: onnx.ModelProto | str, feeds: dict, y: np.ndarray, batch: int = 500) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    model = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = {i.name: i.type for i in sess.get_inputs()}
    correct = 0
    for start in range(0, len(y), batch):
        chunk = {k: v[start:start + batch].astype(np.int64 if "int64" in names[k] else v.dtype)
                 for k, v in feeds.items()}
        correct += int((sess.run(None, chunk)[0].argmax(1) == y[start:start + batch]).sum())
    return correct / len(y)


def kind_options(kind: str, s: float) -> dict:
    if kind in ("global", "sensitivity"):  # every kind allocated together: S = fraction of the MACs removed
        return {"other_sparsity": s, "allocation": kind}
    return {"other_sparsity": 0.0,
            "head_sparsity": s if kind in ("heads", "both") else 0.0,
            "ffn_sparsity": s if kind in ("ffn", "both") else 0.0}


def group_summary(report: dict) -> dict:
    """Per kind: channels before -> after summed over the groups, how many groups were pruned, and why
    the groups that could not be pruned were left alone (first reason of each, as in the report)."""
    out: dict[str, dict] = {}
    for g in report["groups"]:
        k = out.setdefault(g["kind"], {"groups": 0, "pruned": 0, "before": 0, "after": 0, "statuses": {}})
        k["groups"] += 1
        k["pruned"] += g["status"] == "pruned"
        k["before"] += g["channels_before"]
        k["after"] += g["channels_after"]
        k["statuses"][g["status"]] = k["statuses"].get(g["status"], 0) + 1
        if g["blocked"]:
            k.setdefault("not_pruned_because", []).append(f"{g['blocked'][0]['node']}: {g['blocked'][0]['reason']}")
    return out


def run_row(model: str, kind: str, s: float, recover: str, calib: dict | None, test,
            analysis_file: Path | None = None) -> dict:
    row = {"model": model, "kind": kind, "sparsity": s, "recover": recover, **kind_options(kind, s)}
    opts = kind_options(kind, s)
    kwargs = dict(sparsity=opts.pop("other_sparsity"), **opts, target="none")
    if recover != "none":
        kwargs.update(calibration=calib, recover=recover)
    if kind == "sensitivity":  # one analysis per model (measured with lstsq), shared by its rows
        kwargs.update(workers=1, sensitivity=str(analysis_file))
    return measure(model, row, kwargs, test)


def measure(model: str, row: dict, kwargs: dict, test) -> dict:
    """One ``prune(model, **kwargs)``: accuracy, MACs, time and the report's records added to ``row``."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = prune(str(SAMPLES / f"{model}.onnx"), **kwargs)
    except NothingToPrune as exc:
        row.update(status="nothing_pruned", reason=str(exc), seconds=round(time.perf_counter() - start, 2))
        return row
    except Exception as exc:  # a crash of the tool is a finding: keep the exact error
        row.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                   seconds=round(time.perf_counter() - start, 2))
        return row
    seconds = time.perf_counter() - start
    rep = result.report.to_dict()
    try:
        onnx.checker.check_model(result.model, full_check=True)
        acc = accuracy(result.model, *test)
    except Exception as exc:  # an invalid written model is a finding too
        row.update(status="invalid_model", error=f"{type(exc).__name__}: {exc}", seconds=round(seconds, 2))
        return row
    before, after = rep["macs"]["before"], rep["macs"]["after"]
    row.update(
        status="ok", accuracy=acc, seconds=round(seconds, 2),
        macs_before=before, macs_after=after,
        mac_reduction=None if not before or after is None else 1 - after / before,
        params_before=rep["params"]["before"], params_after=rep["params"]["after"],
        groups=group_summary(rep), recovery_model=rep.get("recovery_model"),
        warnings=sorted({str(w.message) for w in caught}),
    )
    for key in ("sensitivity", "distill"):
        if rep.get(key):
            row[key] = rep[key]
    return row


def fmt_row(r: dict, base: float) -> str:
    head = f"{r['model']:<15} {r['kind']:<6} {r['sparsity']:>4} {r['recover']:<6}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {(r.get('reason') or r.get('error', ''))[:90]}"
    rm = r.get("recovery_model") or {}
    kept = f"{rm['kept']} ({rm['before']:.3g}->{rm['after']:.3g})" if rm else "-"
    if r.get("distill"):
        kept += f", distill ->{r['distill']['held_back_after']:.3g}"
    per_kind = " ".join(f"{k} {g['after']}/{g['before']}" for k, g in r["groups"].items() if g["pruned"])
    return (f"{head} {100 * r['accuracy']:6.2f} {100 * (r['accuracy'] - base):+6.2f} "
            f"{100 * r['mac_reduction']:6.1f}% {r['seconds']:7.1f}s  {kept}  [{per_kind}]")


#: Plotted series: (kind, recover) -> (label, style).
PLOTTED = {("both", "none"): ("uniform, data-free", "C0:"), ("both", "lstsq"): ("uniform, lstsq", "C0--"),
           ("both", "distill"): ("uniform, distill", "C0-"), ("global", "none"): ("global, data-free", "C1:"),
           ("global", "lstsq"): ("global, lstsq", "C1--"), ("global", "distill"): ("global, distill", "C1-"),
           ("sensitivity", "lstsq"): ("sensitivity, lstsq", "C2--"),
           ("sensitivity", "distill"): ("sensitivity, distill", "C2-")}


def plot(data: dict, path: Path, models=("vit_legacy", "textenc_legacy")) -> None:
    """Accuracy against the fraction of MACs removed, one panel per model, one line per allocation x recovery,
    with the targets (at most 1.0 / 2.5 points lost at 30% / 50% fewer MACs) as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in models if m in data["baseline"]]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        base = 100 * data["baseline"][model]["accuracy"]
        ax.axhline(base, color="grey", lw=0.8)
        ax.plot([30, 50], [base - 1.0, base - 2.5], "kx", ms=8, label="target (max. loss)")
        for (kind, recover), (label, style) in PLOTTED.items():
            rows = sorted((r for r in data["rows"] if r["model"] == model and r["kind"] == kind
                           and r["recover"] == recover and r["status"] == "ok"), key=lambda r: r["sparsity"])
            if rows:
                pts = [(0.0, base)] + [(100 * r["mac_reduction"], 100 * r["accuracy"]) for r in rows]
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=label)
        ax.set_title(f"{model} (unpruned {base:.2f}%)")
        ax.set_xlabel("MACs removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_results(out: Path, settings: dict, fresh: bool) -> dict:
    """The rows already in ``out`` when they were measured with the same ``settings`` (a rerun resumes)."""
    if out.exists() and not fresh:
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            return old
    return {"settings": settings, "baseline": {}, "rows": []}


#: Hidden-size mode: which kinds are pruned at a common S, that S chosen so that the MACs fall by the target.
HIDDEN_CONFIGS = {"heads+ffn": ("head_sparsity", "ffn_sparsity"),
                  "heads+ffn+hidden": ("head_sparsity", "ffn_sparsity", "hidden_sparsity"),
                  "hidden": ("hidden_sparsity",)}
MAC_TARGETS = (0.3, 0.5)


def mac_reduction(model: str, fields: tuple[str, ...], s: float, tiny: dict) -> float:
    """Fraction of the MACs removed with ``fields`` at ``s`` (no recovery, no validation: only counting)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = prune(str(SAMPLES / f"{model}.onnx"), sparsity=0.0, target="none", calibration=tiny, recover="none",
                    validate=False, allow_unchanged=True, **{f: s for f in fields}).report
    return 1 - rep.macs_after / rep.macs_before


def matched_sparsity(model: str, fields: tuple[str, ...], target: float, tiny: dict) -> tuple[float, float]:
    """(S, MAC reduction at S): bisection for the S whose reduction is closest to ``target`` (counts are whole)."""
    lo, hi, best = 0.0, 0.95, (0.0, 0.0)
    for _ in range(9):
        mid = round((lo + hi) / 2, 4)
        red = mac_reduction(model, fields, mid, tiny)
        if abs(red - target) < abs(best[1] - target):
            best = (mid, red)
        lo, hi = (mid, hi) if red < target else (lo, mid)
    return best


def hidden_main(args) -> int:
    """With and without hidden-size pruning at equal MACs (lstsq), and Intra-Fusion vs selection for it."""
    n_calib = args.calibration or 1024
    out = OUT / "transformers_hidden.json"
    settings = {"calibration_samples": n_calib, "calibration_split": "train", "importance": "l1",
                "target": "none", "threads": 1, "recover": "lstsq", "mac_targets": list(MAC_TARGETS),
                "methods": {"head": "prune (default)", "ffn": "intrafusion (default)", "hidden": "per row"}}
    data = load_results(out, settings, args.fresh)
    done = {(r["model"], r["kind"], r["mac_target"], r["method"]) for r in data["rows"]}
    models = args.models.split(",")
    print(f"{'model':<15} {'pruned':<17} {'MACs-':>6} {'S':>6} {'method':<11} {'acc%':>6} {'d pts':>6} {'prune':>7}"
          f"  recovery_model kept (held-back distortion before->after)")
    for model in models:
        test = test_split(model, None)
        if model not in data["baseline"]:
            data["baseline"][model] = {"accuracy": accuracy(str(SAMPLES / f"{model}.onnx"), *test),
                                       "test_samples": int(len(test[1]))}
        base = data["baseline"][model]["accuracy"]
        calib, tiny = None, calibration_arrays(model, 2, split="train")
        for target in MAC_TARGETS:
            for kind, fields in HIDDEN_CONFIGS.items():
                methods = ("intrafusion", "prune") if "hidden" in kind else ("intrafusion",)
                for method in methods:
                    key = (model, kind, target, method)
                    if key in done:
                        row = next(r for r in data["rows"]
                                   if (r["model"], r["kind"], r["mac_target"], r["method"]) == key)
                    else:
                        s, _ = matched_sparsity(model, fields, target, tiny)
                        calib = calib if calib is not None else calibration_arrays(model, n_calib, split="train")
                        row = {"model": model, "kind": kind, "mac_target": target, "sparsity": s,
                               "method": method,  # of the hidden groups
                               "recover": "lstsq", **{f: s for f in fields}}
                        kwargs = dict(sparsity=0.0, target="none", calibration=calib, recover="lstsq",
                                      hidden_method=method, **{f: s for f in fields})
                        row = measure(model, row, kwargs, test)
                        data["rows"].append(row)
                        out.write_text(json.dumps(data, indent=1) + "\n")
                    if row["status"] != "ok":
                        print(f"{model:<15} {kind:<17} {row['status']}: {row.get('error', row.get('reason'))}")
                        continue
                    rm = row.get("recovery_model") or {}
                    print(f"{model:<15} {kind:<17} {100 * row['mac_reduction']:5.1f}% {row['sparsity']:6.3f} "
                          f"{method:<11} {100 * row['accuracy']:6.2f} {100 * (row['accuracy'] - base):+6.2f} "
                          f"{row['seconds']:6.1f}s  {rm.get('kept')} ({rm.get('before', 0):.3g}->{rm.get('after', 0):.3g})",
                          flush=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", action="store_true",
                    help="hidden-size rows: heads+FFN vs heads+FFN+hidden vs hidden alone at 30%%/50%% fewer MACs "
                    "(lstsq; Intra-Fusion and selection for the hidden groups); writes transformers_hidden.json")
    ap.add_argument("--quick", action="store_true", help="S=0.5 only, 256 calibration samples, 2,000 ViT test images")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default=None, help="comma-separated (default 0.3,0.5)")
    ap.add_argument("--calibration", type=int, default=None, help="calibration samples (default 1024)")
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the JSON")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    args = ap.parse_args(argv)
    if args.hidden:
        return hidden_main(args)

    sparsities = (tuple(float(s) for s in args.sparsities.split(",")) if args.sparsities
                  else (0.5,) if args.quick else SPARSITIES)
    n_calib = args.calibration or (256 if args.quick else 1024)
    limit = 2000 if args.quick else None
    out = OUT / ("transformers_quick.json" if args.quick else "transformers.json")
    settings = {"calibration_samples": n_calib, "calibration_split": "train", "test_limit": limit,
                "importance": "l1", "target": "none", "threads": 1,
                "methods": {"head": "prune (default --head-method)", "ffn": "intrafusion (default --method)"}}
    data = load_results(out, settings, args.fresh)
    done = {(r["model"], r["kind"], r["sparsity"], r["recover"]) for r in data["rows"]}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")

    print(f"{'model':<15} {'kind':<6} {'S':>4} {'recov':<6} {'acc%':>6} {'d pts':>6} {'MACs-':>7} {'prune':>8}  "
          f"recovery_model kept (held-back distortion before->after)")
    for model in args.models.split(","):
        test = test_split(model, limit)
        if model not in data["baseline"]:
            data["baseline"][model] = {"accuracy": accuracy(str(SAMPLES / f"{model}.onnx"), *test),
                                       "test_samples": int(len(test[1]))}
            save()
        base = data["baseline"][model]["accuracy"]
        print(f"{model:<15} {'-':<6} {0:>4} {'-':<6} {100 * base:6.2f}  (unpruned, {len(test[1])} test samples)")
        calib = None
        analysis_file = Path(tempfile.mkdtemp()) / f"{model}_sensitivity.json"
        for kind in args.kinds.split(","):
            for s in sparsities:
                for recover in KIND_RECOVERIES[kind]:
                    key = (model, kind, s, recover)
                    if key in done:
                        row = next(r for r in data["rows"] if (r["model"], r["kind"], r["sparsity"], r["recover"]) == key)
                    else:
                        if recover != "none" and calib is None:
                            calib = calibration_arrays(model, n_calib, split="train")
                        row = run_row(model, kind, s, recover, calib, test, analysis_file)
                        data["rows"].append(row)
                        save()
                    print(fmt_row(row, base), flush=True)
    if not args.quick:
        plot(data, ROOT / "docs" / "transformers.png")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
