"""An oracle that does not use the channel analysis: channels that are provably dead.

The models are built here with onnx.helper.  A channel whose producer filters
and bias are all zero is zero after ReLU; a channel whose every consumer input
slice is zero is read by nobody.  Removing exactly those channels cannot change
the outputs, whatever the graph in between (Concat offsets, a residual Add,
Flatten blocks).  Every other channel has the same weight norm, so l1
importance ranks the dead channels strictly last and plain pruning at the
matching sparsity must remove exactly them: the report's kept indices are
checked against the channels the test made dead, and the outputs against the
original model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_intrafusion import prune

from conftest import assert_same_outputs, assert_valid

RNG = np.random.default_rng(7)


def _rows(n: int, *shape: int) -> np.ndarray:
    """n random rows of the given shape, each with L1 norm 1 (equal importance for live channels)."""
    v = RNG.standard_normal((n, *shape))
    v /= np.abs(v.reshape(n, -1)).sum(axis=1).reshape(n, *[1] * len(shape))
    return v.astype(np.float32)


def _cols(rows: int, n: int, block: int = 1, *rest: int) -> np.ndarray:
    """A consumer weight (rows, n * block, *rest) whose n input channels have equal L1 norm."""
    per_channel = _rows(n, rows, block, *rest)  # (n, rows, block, *rest)
    return np.moveaxis(per_channel, 0, 1).reshape(rows, n * block, *rest)


def _model(nodes, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _dead_producer(inits: dict, name: str, dead: list[int]) -> None:
    inits[f"{name}.w"][dead] = 0
    inits[f"{name}.b"][dead] = 0


def _conv(name: str, x: str, weight: np.ndarray, inits: dict) -> onnx.NodeProto:
    inits[f"{name}.w"] = weight
    inits[f"{name}.b"] = np.full(weight.shape[0], 0.1, np.float32)
    k = weight.shape[-1]
    return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, pads=[k // 2] * 4)


def chain_model():
    """conv1 (8, channels 1,4,6 dead by zero filters) -> ReLU -> conv2 (8, channels 0,3,7 dead by zero
    Gemm columns) -> ReLU -> GlobalAveragePool -> Flatten -> Gemm."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("conv1", "x", _rows(8, 3, 3, 3), inits), helper.make_node("Relu", ["conv1"], ["r1"]),
             _conv("conv2", "r1", _cols(8, 8, 1, 3, 3), inits), helper.make_node("Relu", ["conv2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    inits["fc.w"], inits["fc.b"] = _cols(4, 8), np.zeros(4, np.float32)
    _dead_producer(inits, "conv1", [1, 4, 6])
    inits["fc.w"][:, [0, 3, 7]] = 0
    return _model(nodes, inits), {"conv1": [1, 4, 6], "conv2": [0, 3, 7]}


def concat_residual_model():
    """Concat of a (4, channel 2 dead) and b (8, channels 0,5 dead) -> ReLU -> c (8) -> ReLU, plus
    d(ReLU(c)): a residual stream whose channels 1,4 are dead by zero slices in d and in the
    Gemm behind Flatten (4 columns per channel)."""
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("a", "x", _rows(4, 3, 3, 3), inits), _conv("b", "x", _rows(8, 3, 1, 1), inits),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1), helper.make_node("Relu", ["cat"], ["rc"]),
             _conv("c", "rc", _cols(8, 12, 1, 3, 3), inits), helper.make_node("Relu", ["c"], ["c_relu"]),
             _conv("d", "c_relu", _cols(8, 8, 1, 1, 1), inits),
             helper.make_node("Add", ["c_relu", "d"], ["sum"]), helper.make_node("Relu", ["sum"], ["s"]),
             helper.make_node("AveragePool", ["s"], ["pool"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    inits["fc.w"], inits["fc.b"] = _cols(5, 8, 4), np.zeros(5, np.float32)
    _dead_producer(inits, "a", [2])
    _dead_producer(inits, "b", [0, 5])
    inits["d.w"][:, [1, 4]] = 0
    for ch in (1, 4):
        inits["fc.w"][:, 4 * ch:4 * ch + 4] = 0
    return _model(nodes, inits), {"a": [2], "b": [0, 5], "c": [1, 4]}


def nan_guard_model():
    """The chain model with a NaN guard after the first ReLU: Where(Not(IsNaN(r1)), r1, 0), per element."""
    base, dead = chain_model()
    nodes = list(base.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Relu") + 1
    for n in nodes[at:]:
        n.input[:] = ["g1" if i == "r1" else i for i in n.input]
    guard = [helper.make_node("IsNaN", ["r1"], ["nan"]), helper.make_node("Not", ["nan"], ["ok"]),
             helper.make_node("Where", ["ok", "r1", "zero"], ["g1"])]
    inits = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer} | {"zero": np.float32(0.0)}
    return _model(nodes[:at] + guard + nodes[at:], inits), dead


@pytest.mark.parametrize("build, sparsity",
                         [(chain_model, 0.375), (concat_residual_model, 0.25), (nan_guard_model, 0.375)],
                         ids=["chain", "concat_residual", "nan_guard"])
def test_pruning_removes_exactly_the_dead_channels_and_keeps_the_outputs(build, sparsity):
    model, dead = build()
    result = prune(model, sparsity=sparsity, method="prune", validate=False)
    assert_valid(result.model, model)
    removed = {}
    for row in result.report.pruned_groups:
        producer = next(p for p in row.producers if p in dead)
        removed[producer] = sorted(set(range(row.channels_before)) - set(row.kept))
    assert removed == dead, result.report.to_text()
    assert_same_outputs(result.model, model, atol=1e-5)
