"""Least-squares recovery on transformer activations ([batch, sequence, hidden]) helps instead of hurting.

A BERT-style encoder (token + position embeddings, LayerNorm, multi-head
attention with an attention mask, GELU FFN, post-residual LayerNorms) on
padded token sequences, and a ViT-style encoder on images (patch embedding
conv, same blocks, mean pooling, class scores), both exported with both
torch exporters.  Every prunable group (attention heads and FFN neurons)
is pruned at 0.3; recovery with calibration
data must end up closer to the original model than data-free pruning on
samples the fit never saw, by its own fit (kept "recovered"), not by the
never-worse fallback.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import run

from onnx_intrafusion import distortion, prune

torch = pytest.importorskip("torch")

HIDDEN, HEADS, FFN, VOCAB, SEQ = 32, 4, 96, 40, 24


def _block():
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.f1, self.f2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

        def forward(self, x, bias):
            b, t, _ = x.shape

            def heads(z):
                return z.reshape(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)

            scores = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5
            a = torch.softmax(scores + bias, -1) @ heads(self.v(x))
            x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, HIDDEN)))
            return self.ln2(x + self.f2(torch.nn.functional.gelu(self.f1(x))))

    return Block()


def _text_encoder():
    nn = torch.nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.ln = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN), nn.LayerNorm(HIDDEN)
            self.blocks = nn.ModuleList(_block() for _ in range(2))

        def forward(self, input_ids, attention_mask):
            x = self.ln(self.tok(input_ids) + self.pos.weight[: input_ids.shape[1]])
            bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
            for block in self.blocks:
                x = block(x, bias)
            return x * attention_mask[..., None].float()  # padding positions are nobody's output

    return Encoder()


def _vit():
    nn = torch.nn

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, HIDDEN, 4, 4)
            self.pos = nn.Parameter(torch.randn(1, 16, HIDDEN) * 0.5)
            self.blocks = nn.ModuleList(_block() for _ in range(2))
            self.head = nn.Linear(HIDDEN, 10)

        def forward(self, image):
            x = self.patch(image).flatten(2).transpose(1, 2) + self.pos
            for block in self.blocks:
                x = block(x, torch.zeros(()))
            return self.head(x.mean(1))

    return ViT()


def _tokens(n: int, rng) -> dict[str, np.ndarray]:
    """Short sentences padded to SEQ (most positions are padding, as with max-length padding)."""
    lengths = rng.integers(3, 9, n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": (rng.integers(1, VOCAB, (n, SEQ)) * mask).astype(np.int64), "attention_mask": mask}


def _images(n: int, rng) -> dict[str, np.ndarray]:
    """Smooth random images (blurred noise), so patches are correlated like real ones."""
    x = rng.standard_normal((n, 1, 16, 16))
    for axis in (2, 3):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return {"image": x.astype(np.float32)}


def _export(net, example: dict[str, np.ndarray], path, dynamo: bool) -> None:
    torch.manual_seed(0)
    args = tuple(torch.from_numpy(v[:2]) for v in example.values())
    names = list(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), args, str(path), input_names=names, output_names=["out"], opset_version=18,
                          dynamic_axes={**{k: {0: "batch"} for k in names}, "out": {0: "batch"}}, dynamo=dynamo)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("kind", ["text", "vit"])
def test_lstsq_beats_data_free_on_transformer_pruning(tmp_path, kind, dynamo):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, data = (_text_encoder(), _tokens) if kind == "text" else (_vit(), _images)
        rng = np.random.default_rng(0)
        calib, test = data(96, rng), data(32, rng)
        path = tmp_path / f"{kind}.onnx"
        _export(net, calib, path, dynamo)
    finally:
        torch.set_num_threads(threads)
    reference = run(path, test)

    def held_out_distortion(model) -> float:
        return distortion.output_distortion(reference, run(model, test))

    free = prune(path, 0.3, validate=False)
    fitted = prune(path, 0.3, calibration=calib, validate=False)
    assert any(g.status == "pruned" for g in fitted.report.groups)
    report = fitted.report.to_dict()
    assert report["recovery_model"]["kept"] == "recovered"
    assert report["recovery_model"]["after"] < report["recovery_model"]["before"]
    d_free, d_fit = held_out_distortion(free.model), held_out_distortion(fitted.model)
    assert d_fit < 0.7 * d_free, (d_free, d_fit)
