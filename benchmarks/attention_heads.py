"""Attention heads: merging them (head-level Intra-Fusion) vs dropping them, without fine-tuning.

Trains small vision transformers here (a patch-embedding Conv, pre-norm blocks
with BERT-style attention: separate Q/K/V Linear, view/transpose, softmax),
exports them with the legacy exporter (dynamic batch), prunes only the
attention-head groups at several sparsities with ``method=prune`` and
``method=intrafusion`` (l1 importance), and evaluates with onnxruntime on the
test split.  Models:

* ``vit_fashion``: Fashion-MNIST (Debian package dataset-fashion-mnist), patch 4
  (49 tokens), width 64, 8 heads, 2 blocks, trained on a 10k-image subset (3 epochs);
* ``vit_digits``: scikit-learn's 8x8 digits, patch 2 (16 tokens), width 32,
  4 heads, 2 blocks.

Each model is trained with ``--seeds`` seeds.

    python benchmarks/attention_heads.py            # 2 seeds, both models (about 10 min on 2 idle cores)
    python benchmarks/attention_heads.py --quick    # digits only, 1 seed (< 1 min)

Writes docs/results/attention_heads.json (and prints a table).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_intrafusion import coupling, model_io, prune  # noqa: E402

SPARSITIES = (0.25, 0.5, 0.75)
METHODS = ("prune", "intrafusion")
CONFIGS = {
    "vit_digits": dict(data="digits", patch=2, d=32, heads=4, depth=2, epochs=60, train=None, batch=64),
    "vit_fashion": dict(data="fashion", patch=4, d=64, heads=8, depth=2, epochs=3, train=10000, batch=128),
}


def _build(cfg: dict, image: int, seed: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    d, heads = cfg["d"], cfg["heads"]

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape

            def split(t):
                return t.view(b, n, heads, d // heads).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v
            return self.o(a.transpose(1, 2).reshape(b, n, d))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = Attention()
            self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.f2(F.gelu(self.f1(self.ln2(x))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            tokens = (image // cfg["patch"]) ** 2
            self.embed = nn.Conv2d(1, d, cfg["patch"], stride=cfg["patch"])
            self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d))
            self.blocks = nn.Sequential(*(Block() for _ in range(cfg["depth"])))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(x)).mean(1))

    return ViT()


def _data(name: str, train_limit: int | None):
    from datasets import load_digits_split, load_fashion_mnist

    load = load_digits_split if name == "digits" else load_fashion_mnist
    (xtr, ytr), (xte, yte) = load("train"), load("test")
    if train_limit:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    return xtr, ytr, xte, yte


def train_and_export(name: str, seed: int, folder: Path) -> tuple[Path, float]:
    import torch

    cfg = CONFIGS[name]
    xtr, ytr, xte, yte = _data(cfg["data"], cfg["train"])
    model = _build(cfg, xtr.shape[-1], seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = cfg["epochs"] * (len(xtr) // cfg["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    model.train()
    for _ in range(cfg["epochs"]):
        order = rng.permutation(len(xtr))
        for i in range(len(xtr) // cfg["batch"]):
            idx = torch.from_numpy(order[i * cfg["batch"]:(i + 1) * cfg["batch"]])
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    path = folder / f"{name}_{seed}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(xte[:2]),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path, accuracy(path, xte, yte)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(None, {"input": x[i:i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])
    return float((preds == y).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits only, one seed")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "attention_heads.json"))
    args = ap.parse_args(argv)
    names = ["vit_digits"] if args.quick else list(CONFIGS)
    seeds = range(1 if args.quick else args.seeds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            _, _, xte, yte = _data(CONFIGS[name]["data"], 1)
            for seed in seeds:
                t0 = time.perf_counter()
                path, base = train_and_export(name, seed, Path(tmp))
                graph = model_io.to_graph(model_io.load_model(str(path)).model)
                heads = [g.id for g in coupling.analyse(graph).groups if g.kind == "head" and g.prunable]
                print(f"{name} seed {seed}: accuracy {base:.4f}, {len(heads)} head groups, "
                      f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
                for sparsity in SPARSITIES:
                    for method in METHODS:
                        result = prune(str(path), sparsity=sparsity, head_method=method, groups=heads, validate=False)
                        acc = accuracy(result.model, xte, yte)
                        kept = [r.channels_after for r in result.report.pruned_groups]
                        rows.append(dict(model=name, seed=seed, sparsity=sparsity, method=method, accuracy=acc,
                                         base=base, heads_kept=kept, macs_before=result.report.macs_before,
                                         macs_after=result.report.macs_after))
    print(f"\n{'model':12s} {'heads removed':>13s} {'prune':>8s} {'intrafusion':>12s}  (mean test accuracy over seeds;"
          " unpruned in brackets)")
    table = {}
    for name in names:
        base = np.mean([r["base"] for r in rows if r["model"] == name and r["method"] == "prune"
                        and r["sparsity"] == SPARSITIES[0]])
        for sparsity in SPARSITIES:
            acc = {m: float(np.mean([r["accuracy"] for r in rows if r["model"] == name and r["method"] == m
                                     and r["sparsity"] == sparsity])) for m in METHODS}
            table.setdefault(name, {})[str(sparsity)] = acc
            print(f"{name:12s} {sparsity:13.2f} {acc['prune']:8.4f} {acc['intrafusion']:12.4f}  ({base:.4f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/attention_heads.py" + (" --quick" if args.quick else ""),
                               "sparsities": SPARSITIES, "table": table, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
