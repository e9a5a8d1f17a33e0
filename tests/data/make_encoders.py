"""Write the tiny BERT-style encoder exports used by tests/test_gradients.py.

    python tests/data/make_encoders.py      # needs torch (and onnxscript for the dynamo export)

Token and position embeddings, a padding mask, a GELU TransformerEncoderLayer,
nn.MultiheadAttention and masked mean pooling: the ops of encoder exports
(Gather on weights, Equal/Where/Cast masks, Shape arithmetic, Softmax,
LayerNormalization, Gelu/Erf) in a few kilobytes, exported by both torch
exporters with a dynamic batch.
"""

from __future__ import annotations

import io
from pathlib import Path

import onnx
import torch

HERE = Path(__file__).resolve().parent


class _Encoder(torch.nn.Module):
    """A BERT-style encoder: token + position embeddings, a padding mask, a GELU encoder layer, MHA, pooling."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(11, 16)
        self.pos = torch.nn.Parameter(torch.randn(1, 5, 16) * 0.1)
        self.layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu")
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids):
        pad = ids == 0
        h = self.layer(self.tok(ids) + self.pos, src_key_padding_mask=pad)
        h = h + self.mha(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((self.norm(h) * keep).sum(1) / keep.sum(1))


def export(dynamo: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = _Encoder().eval()
    ids = torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])
    buf = io.BytesIO()
    if dynamo:
        torch.onnx.export(net, (ids,), buf, dynamo=True, input_names=["ids"], output_names=["y"],
                          dynamic_shapes={"ids": {0: torch.export.Dim("batch")}})
    else:
        torch.onnx.export(net, (ids,), buf, dynamo=False, input_names=["ids"], output_names=["y"],
                          dynamic_axes={"ids": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


if __name__ == "__main__":
    for dynamo in (False, True):
        path = HERE / f"tiny_encoder_{'dynamo' if dynamo else 'legacy'}.onnx"
        onnx.save(export(dynamo), str(path))
        print("wrote", path)
