"""Small transformer blocks in the forms torch exports, with heads built to be duplicates or dead.

Forms (``FORMS``):

* ``bert``: separate Q/K/V Linear, ``view`` + ``transpose`` into heads, ``Q K^T / sqrt(d)``, Softmax, ``@ V``
* ``sdpa``: separate Q/K/V Linear without bias, ``F.scaled_dot_product_attention``
* ``chunk``: one fused QKV Linear cut by ``chunk(3, -1)`` (a Split), then as ``bert``
* ``mask``: ``bert`` with an additive attention mask constant (broadcast over heads)
* ``stacked``: one fused QKV Linear reshaped to ``[B, S, 3, heads, head_dim]`` and permuted (timm, Swin)
* ``relbias``: ``stacked`` plus a learned per-head bias ``[heads, S, S]`` added to the scores (Swin)
* ``mha``: ``nn.MultiheadAttention`` (fused in-projection, ``[S, B, 3, C]``, batch folded with heads)
* ``swin``: a shifted-window block as torchvision writes it (``shifted_window_attention``): the
  ``[B, H, W, C]`` map is rolled, cut into windows, attention with a per-head relative bias and the
  shift mask added through ``view(B, windows, heads, N, N)``, windows merged and rolled back; sizes
  come from ``x.size()``, so the TorchScript exporter computes the Reshape targets at run time

Every block is followed by a residual + LayerNorm and an FFN (Linear, GELU, Linear), mean-pooled
over tokens and classified, so head groups sit next to FFN and hidden-size groups.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMS = ("bert", "sdpa", "chunk", "mask", "stacked", "relbias", "mha", "swin")
EXPORTERS = ("legacy", "dynamo")
D, HEADS, TOKENS = 32, 4, 6
GRID, WINDOW, SHIFT = 8, 4, 2  # swin: an 8x8 map, 4x4 windows, shifted by 2


class Block(nn.Module):
    def __init__(self, form: str, d: int = D, heads: int = HEADS, classes: int = 5):
        super().__init__()
        self.form, self.heads, self.hd = form, heads, d // heads
        bias = form != "sdpa"
        if form in ("chunk", "stacked", "relbias", "swin"):
            self.qkv = nn.Linear(d, 3 * d)
        elif form == "mha":
            self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = self.mha.out_proj if form == "mha" else nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)
        mask = torch.triu(torch.full((TOKENS, TOKENS), -1e4), diagonal=1)
        self.register_buffer("mask", mask)
        n = WINDOW * WINDOW if form == "swin" else TOKENS
        self.rel = nn.Parameter(torch.randn(heads, n, n))

    def qkv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of Q, K and V (views into the fused weight for ``chunk``)."""
        if self.form in ("chunk", "stacked", "relbias", "mha", "swin"):
            d = self.o.in_features
            w, b = (self.mha.in_proj_weight, self.mha.in_proj_bias) if self.form == "mha" else (self.qkv.weight,
                                                                                                self.qkv.bias)
            return [(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) for i in range(3)]
        return [(m.weight, m.bias) for m in (self.q, self.k, self.v)]

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.hd).transpose(1, 2)

    def example(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, GRID, GRID, D) if self.form == "swin" else torch.randn(batch, TOKENS, D)

    def _shifted_window(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's shifted_window_attention, reduced to what the export sees."""
        b, h, w, c = x.shape
        ws, heads = WINDOW, self.heads
        x = torch.roll(x, shifts=(-SHIFT, -SHIFT), dims=(1, 2))
        nw = (h // ws) * (w // ws)
        x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nw, ws * ws, c)
        qkv = self.qkv(x).reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1)) + self.rel
        mask = x.new_zeros((h, w))
        count = 0
        for hs in ((0, -ws), (-ws, -SHIFT), (-SHIFT, None)):
            for wsl in ((0, -ws), (-ws, -SHIFT), (-SHIFT, None)):
                mask[hs[0]:hs[1], wsl[0]:wsl[1]] = count
                count += 1
        mask = mask.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(nw, ws * ws)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = torch.softmax(attn.view(-1, heads, x.size(1), x.size(1)), dim=-1)
        x = self.o(attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c))
        x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return torch.roll(x, shifts=(SHIFT, SHIFT), dims=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "swin":
            x = self.ln1(x + self._shifted_window(x))
            x = self.ln2(x + self.f2(F.gelu(self.f1(x))))
            return self.head(x.mean((1, 2)))
        b, s, d = x.shape
        if self.form == "mha":
            x = self.ln1(x + self.mha(x, x, x, need_weights=False)[0])
            x = self.ln2(x + self.f2(F.gelu(self.f1(x))))
            return self.head(x.mean(1))
        if self.form in ("stacked", "relbias"):
            q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        elif self.form == "chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if self.form not in ("stacked", "relbias"):
            q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.form == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
            if self.form == "mask":
                scores = scores + self.mask
            if self.form == "relbias":
                scores = scores + self.rel
            a = torch.softmax(scores, dim=-1) @ v
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, d)))
        x = self.ln2(x + self.f2(F.gelu(self.f1(x))))
        return self.head(x.mean(1))


def _cols(h: int, hd: int) -> slice:
    return slice(h * hd, (h + 1) * hd)


def duplicated(form: str, seed: int = 0) -> Block:
    """Heads HEADS/2.. copy heads 0.. in Q, K and V; the output projection gives the copy 10%, the original 90%."""
    torch.manual_seed(seed)
    m = Block(form).eval()
    half, hd = HEADS // 2, m.hd
    with torch.no_grad():
        for w, b in m.qkv_weights():
            for h in range(half):
                m.rel[h + half] = m.rel[h]
                w[_cols(h + half, hd)] = w[_cols(h, hd)]
                if b is not None:
                    b[_cols(h + half, hd)] = b[_cols(h, hd)]
        wo = m.o.weight
        for h in range(half):
            base = wo[:, _cols(h, hd)].clone()
            wo[:, _cols(h, hd)] = 0.9 * base
            wo[:, _cols(h + half, hd)] = 0.1 * base
    return m


def dead_heads(form: str, dead: tuple[int, ...], seed: int = 0) -> Block:
    """Heads in ``dead`` have all-zero output-projection columns: they contribute nothing."""
    torch.manual_seed(seed)
    m = Block(form).eval()
    with torch.no_grad():
        for h in dead:
            m.o.weight[:, _cols(h, m.hd)] = 0.0
    return m


def export(model: nn.Module, path: Path, exporter: str, batch: int = 2, dynamic: bool = False,
           dynamic_tokens: bool = True) -> Path:
    """Export with a fixed shape, or (``dynamic``) with a dynamic batch and (``dynamic_tokens``) sequence length."""
    x = model.example(batch)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {"tokens": {0: "batch", **({1: "tokens"} if dynamic_tokens else {})}} if dynamic else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                              input_names=["tokens"], output_names=["logits"], dynamic_axes=axes)
        else:
            dims = ({0: torch.export.Dim("batch"), **({1: torch.export.Dim("tokens")} if dynamic_tokens else {})},
                    ) if dynamic else None
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["tokens"],
                              output_names=["logits"], dynamic_shapes=dims)
    return path
