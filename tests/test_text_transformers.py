"""Text encoders as ``transformers`` writes them (BERT-style), built here without that library.

The block has what a BERT export carries around its attention: token ids looked up in an embedding
table, position ids sliced from a constant buffer, an embeddings sum with LayerNorm, an attention mask
turned into ``(1 - mask) * min_float`` (form ``arith``) or indexed with arange tensors and turned into
``Where(keep, 0, min_float)`` (form ``index``, as transformers' masking utilities do), Expand-ed to
``[batch, 1, query, key]`` by a shape computed at run time (then broadcast over the heads), GELU written as Erf arithmetic and a pooler (Linear +
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

from conftest import io_signature, run
from onnx_intrafusion import coupling, model_io, prune

torch = pytest.importorskip("torch")
nn = torch.nn

VOCAB, TYPES, POSITIONS, D, HEADS, FFN, TOKENS = 50, 2, 40, 32, 4, 64, 7  # validation runs 32 tokens
DEAD = (1, 3)  # heads with zero output-projection columns
DEAD_FFN = tuple(range(0, FFN, 2))  # FFN neurons with zero output columns (and small input rows)
DEAD_POOL = tuple(range(1, D, 2))  # pooler neurons the classifier does not read


class TextEncoder(nn.Module):
    """One BERT layer with embeddings, mask arithmetic, Erf GELU and a pooler."""

    def __init__(self, form: str = "arith"):
        super().__init__()
        self.form = form
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
        if self.form == "arith":  # BERT's extended mask
            mask = attention_mask[:, None, None, :].to(x.dtype).expand(b, 1, s, s)
            mask = (1.0 - mask) * torch.finfo(x.dtype).min
        else:  # transformers' masking utilities: the padding mask indexed by arange tensors, then Where
            rows = torch.arange(b)[:, None, None, None]
            keys, queries = torch.arange(s)[None, None, None, :], torch.arange(s)[None, None, :, None]
            keep = attention_mask.bool()[rows, keys] & (queries >= 0)
            mask = torch.where(keep.expand(b, -1, s, s), 0.0, torch.finfo(x.dtype).min)
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask
        a = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)
        x = self.ln1(x + self.o(a))
        h = self.f1(x)
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        x = self.ln2(x + self.f2(h))
        return self.cls(torch.tanh(self.pool(x[:, 0])))


def encoder(form: str = "arith") -> TextEncoder:
    """Dead heads, FFN neurons and pooler neurons: they contribute nothing to the logits, and their
    remaining weights are scaled down so that every magnitude criterion ranks them last."""
    torch.manual_seed(0)
    m = TextEncoder(form).eval()
    with torch.no_grad():
        for h in DEAD:
            cols = slice(h * m.hd, (h + 1) * m.hd)
            m.o.weight[:, cols] = 0.0
            for lin in (m.q, m.k, m.v):
                lin.weight[cols] *= 0.01
        m.f2.weight[:, list(DEAD_FFN)] = 0.0
        m.f1.weight[list(DEAD_FFN)] *= 0.01
        m.cls.weight[:, list(DEAD_POOL)] = 0.0
        m.pool.weight[list(DEAD_POOL)] *= 0.01
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


def exported(tmp_path_factory, exporter: str, form: str = "arith") -> tuple[str, onnx.ModelProto]:
    if (exporter, form) not in _CACHE:
        path = export(encoder(form), tmp_path_factory.mktemp("text") / f"{form}_{exporter}.onnx", exporter)
        _CACHE[exporter, form] = (path, onnx.load(path))
    return _CACHE[exporter, form]


def groups(path: str) -> list[coupling.Group]:
    return coupling.analyse(model_io.to_graph(model_io.load_model(path).model)).groups


def assert_valid(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """conftest's contract with integer token inputs: checker, strict shape inference, same signature, runs."""
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    assert io_signature(pruned) == io_signature(original)
    f = feeds(2, TOKENS, 4)
    assert np.all(np.isfinite(run(pruned, f)["logits"]))


def by_kind(path: str) -> dict[str, list[coupling.Group]]:
    out: dict[str, list[coupling.Group]] = {}
    for g in groups(path):
        out.setdefault(g.kind, []).append(g)
    return out


def assert_same_logits(pruned: onnx.ModelProto, original: onnx.ModelProto, atol: float = 1e-5) -> None:
    # batch and length differ from the export's, down to one token and up to the position table's size
    for batch, tokens, seed in ((3, TOKENS, 1), (1, 1, 2), (2, POSITIONS, 3)):
        f = feeds(batch, tokens, seed)
        np.testing.assert_allclose(run(pruned, f)["logits"], run(original, f)["logits"], atol=atol, rtol=0)


FORMS = ("arith", "index")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_mask_position_ids_and_pooler_leave_every_group_prunable(tmp_path_factory, exporter, form):
    # the mask is Expand-ed to a shape computed at run time and the position ids are cut to the sequence
    # length at run time: the analysis must still see the mask broadcast over the heads
    path, _ = exported(tmp_path_factory, exporter, form)
    kinds = by_kind(path)
    assert [(g.size, g.blocked) for g in kinds["head"]] == [(HEADS, [])]
    assert [(g.size, g.blocked) for g in kinds["ffn"]] == [(FFN, [])]
    (hidden,) = kinds["hidden"]
    assert hidden.needs_data  # LayerNorm over the hidden size: only with calibration data
    pooler = [g for g in kinds["channel"] if g.prunable]
    assert [g.size for g in pooler] == [D]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_dead_heads_ffn_and_pooler_neurons_are_removed_exactly(tmp_path_factory, exporter, form):
    path, original = exported(tmp_path_factory, exporter, form)
    result = prune(path, sparsity=0.5, method="prune")
    assert_valid(result.model, original)
    kept = {r.kind: r.kept for r in result.report.pruned_groups}
    assert kept["head"] == [h for h in range(HEADS) if h not in DEAD]
    assert kept["ffn"] == [n for n in range(FFN) if n not in DEAD_FFN]
    assert kept["channel"] == [n for n in range(D) if n not in DEAD_POOL]
    assert_same_logits(result.model, original)


def test_sparsity_zero_changes_nothing(tmp_path_factory):
    path, original = exported(tmp_path_factory, "legacy")
    result = prune(path, sparsity=0.0, method="prune", allow_unchanged=True)
    assert_valid(result.model, original)
    # the written graph has static shape computations folded: onnxruntime may round in the last bit
    assert_same_logits(result.model, original, atol=1e-6)


def test_hidden_size_with_calibration_gives_a_valid_model(tmp_path_factory):
    path, original = exported(tmp_path_factory, "dynamo")
    calibration = {k: np.concatenate([feeds(8, TOKENS, s)[k] for s in (5, 6)]) for k in NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples: structure only
        result = prune(path, sparsity=0.5, method="prune", calibration=calibration, hidden_sparsity=0.5,
                       recover="none")
    assert_valid(result.model, original)
    hidden = [r for r in result.report.pruned_groups if r.kind == "hidden"]
    assert [(r.channels_before, r.channels_after) for r in hidden] == [(D, D // 2)]
    f = feeds(3, 5, 9)
    assert run(result.model, f)["logits"].shape == run(original, f)["logits"].shape


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_random_validation_inputs_index_inside_the_embedding_tables(tmp_path_factory, exporter):
    from onnx_intrafusion.validate import index_bounds, random_feeds

    _, original = exported(tmp_path_factory, exporter)
    assert index_bounds(original) == {"input_ids": VOCAB, "token_type_ids": TYPES}  # the mask indexes nothing
    f = random_feeds(original, seed=0, batch=64)
    assert 0 <= f["input_ids"].min() and f["input_ids"].max() < VOCAB and len(np.unique(f["input_ids"])) > TYPES
    assert set(np.unique(f["token_type_ids"])) == {0, 1}
    assert np.all(np.isfinite(run(original, f)["logits"]))
