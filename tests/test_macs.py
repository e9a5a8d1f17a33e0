"""MACs of a BERT-style encoder exported with dynamic batch and sequence, against an architecture oracle.

The dynamo exporter reads the sequence length with ``Shape(x, start=1, end=2)`` and builds the
attention reshapes and the mask from it; the count must still be known, equal the product of the
layer sizes at ``DEFAULT_DYNAMIC_DIM`` tokens and batch 1, and match the TorchScript export.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from test_text_transformers import D, FFN, HEADS, exported  # noqa: E402

from onnx_intrafusion.model_io import DEFAULT_DYNAMIC_DIM  # noqa: E402
from onnx_intrafusion.report import mac_count  # noqa: E402


def oracle(tokens: int = DEFAULT_DYNAMIC_DIM) -> int:
    """Q, K, V and output projections, the FFN, QK^T and attention x V per head, pooler and classifier
    on the first token (3 classes)."""
    head_dim = D // HEADS
    projections = 4 * tokens * D * D
    ffn = 2 * tokens * D * FFN
    attention = 2 * HEADS * tokens * tokens * head_dim
    return projections + ffn + attention + D * D + D * 3


@pytest.mark.parametrize("form", ["arith", "index"])
def test_dynamo_export_with_dynamic_batch_and_sequence_counts_every_matmul(tmp_path_factory, form):
    _, model = exported(tmp_path_factory, "dynamo", form)
    count = mac_count(model)
    assert count.reason == "" and count.total == oracle()


def test_legacy_export_gives_the_same_count(tmp_path_factory):
    _, model = exported(tmp_path_factory, "legacy")
    assert mac_count(model).total == oracle()


def _ranged_shape_graph(first_dim):
    """``x[first_dim, 5, 7]`` -> Shape(start=1) -> Gather(1): the last dim (7), not the second (5)."""
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=1),
             helper.make_node("Gather", ["s", "i"], ["g"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [first_dim, 5, 7])],
                              [helper.make_tensor_value_info("g", TensorProto.INT64, [])],
                              [helper.make_tensor("i", TensorProto.INT64, [], [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("first_dim", [2, "batch"])
def test_fold_reads_shape_start_and_end(first_dim):
    import numpy as np
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from onnx_intrafusion.model_io import fold
    model = _ranged_shape_graph(first_dim)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((2, 5, 7), np.float32)})[0]
    assert int(expected) == 7
    folded = gs.export_onnx(fold(gs.import_onnx(model)))
    got = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((2, 5, 7), np.float32)})[0]
    assert int(got) == 7

