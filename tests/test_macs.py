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


def test_nan_guard_isnan_not_where_keeps_channels_prunable():
    """conv1 -> ReLU -> Where(Not(IsNaN(r)), r, 0) (a NaN guard) -> conv2 -> ... : per element, so the
    dead channels of the chain model (test_dead_channels) are removed exactly, outputs unchanged."""
    import numpy as np
    from onnx import helper, numpy_helper

    from conftest import assert_same_outputs, assert_valid
    from onnx_intrafusion import prune
    from test_dead_channels import _model, chain_model

    base, dead = chain_model()
    nodes = list(base.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Relu") + 1
    guard = [helper.make_node("IsNaN", ["r1"], ["nan"]), helper.make_node("Not", ["nan"], ["ok"]),
             helper.make_node("Where", ["ok", "r1", "zero"], ["g1"])]
    for n in nodes[at:]:
        n.input[:] = ["g1" if i == "r1" else i for i in n.input]
    inits = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer} | {"zero": np.float32(0.0)}
    model = _model(nodes[:at] + guard + nodes[at:], inits)
    result = prune(model, sparsity=0.375, method="prune", validate=False)
    assert_valid(result.model, model)
    removed = {}
    for row in result.report.pruned_groups:
        producer = next(p for p in row.producers if p in dead)
        removed[producer] = sorted(set(range(row.channels_before)) - set(row.kept))
    assert removed == dead, result.report.to_text()
    assert_same_outputs(result.model, model, atol=1e-5)
