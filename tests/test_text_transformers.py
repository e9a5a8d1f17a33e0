"""Text encoders as ``transformers`` writes them (BERT-style), built here without that library.

The block has what a BERT export carries around its attention: token ids looked up in an embedding
table, position ids sliced from a constant buffer, an embeddings sum with LayerNorm, an attention mask
turned into ``(1 - mask) * min_float`` and Expand-ed to ``[batch, 1, query, key]`` by a shape computed
at run time (then broadcast over the heads), GELU written as Erf arithmetic and a pooler (Linear +
Tanh on the first token).  Oracles do not use the pruning code: heads whose output-projection
columns are zero are removed exactly and the outputs do not change.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import onnx
import pytest

from conftest import assert_valid, run
from onnx_intrafusion import coupling, model_io, prune

torch = pytest.importorskip("torch")
nn = torch.nn

VOCAB, TYPES, POSITIONS, D, HEADS, FFN, TOKENS = 50, 2, 16, 32, 4, 64, 7
DEAD = (1, 3)


class TextEncoder(nn.Module):
    """One BERT layer with embeddings, mask arithmetic, Erf GELU and a pooler."""

    def __init__(self):
        super().__init__()
        self.words, self.types = nn.Embedding(VOCAB, D), nn.Embedding(TYPES, D)
        self.positions = nn.Embedding(POSITIONS, D)
        self.register_buffer("position_ids", torch.arange(POSITIONS).unsqueeze(0))
        self.ln0, self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.f1, self.f2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.pool, self.cls = nn.Linear(D, D), nn.Linear(D, 3)
        self.hd = D // HEADS

    def _heads(self, t):
        b, s, _ = t.shape
        return t.view(b, s, -1, self.hd).transpose(1, 2)

    def forward(self, input_ids, attention_mask, token_type_ids):
        b, s = input_ids.shape
        pos = self.position_ids[:, :s]
        x = self.ln0(self.words(input_ids) + self.types(token_type_ids) + self.positions(pos))
        mask = attention_mask[:, None, None, :].to(x.dtype).expand(b, 1, s, s)
        mask = (1.0 - mask) * torch.finfo(x.dtype).min
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask
        a = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)
        x = self.ln1(x + self.o(a))
        h = self.f1(x)
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = self.ln2(x + self.f2(h))
        return self.cls(torch.tanh(self.pool(x[:, 0])))


def encoder(dead=DEAD) -> TextEncoder:
    torch.manual_seed(0)
    m = TextEncoder().eval()
    with torch.no_grad():
        for h in dead:
            m.o.weight[:, h * m.hd:(h + 1) * m.hd] = 0.0
    return m


NAMES = ("input_ids", "attention_mask", "token_type_ids")


def feeds(batch: int, tokens: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (rng.random((batch, tokens)) < 0.7).astype(np.int64)
    mask[:, 0] = 1
    return {"input_ids": rng.integers(0, VOCAB, (batch, tokens)), "attention_mask": mask,
            "token_type_ids": rng.integers(0, TYPES, (batch, tokens))}


def export(model, path, exporter: str) -> str:
    args = tuple(torch.from_numpy(v) for v in feeds(2, TOKENS, 0).values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {n: {0: "batch", 1: "tokens"} for n in NAMES} | {"logits": {0: "batch"}}
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=list(NAMES),
                              output_names=["logits"], dynamic_axes=axes)
        else:
            batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=POSITIONS)
            torch.onnx.export(model, args, str(path), dynamo=True, input_names=list(NAMES),
                              output_names=["logits"], dynamic_shapes=tuple({0: batch, 1: tokens} for _ in NAMES))
    return str(path)


_CACHE: dict = {}


def exported(tmp_path_factory, exporter: str) -> tuple[str, onnx.ModelProto]:
    if exporter not in _CACHE:
        path = export(encoder(), tmp_path_factory.mktemp("text") / f"{exporter}.onnx", exporter)
        _CACHE[exporter] = (path, onnx.load(path))
    return _CACHE[exporter]


def groups(path: str) -> list[coupling.Group]:
    return coupling.analyse(model_io.to_graph(model_io.load_model(path).model)).groups
