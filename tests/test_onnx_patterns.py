"""Patterns torch does not write: graphs built with onnx.helper at opsets 9 to 21.

tf2onnx/paddle2onnx style (weights in Constant nodes, NHWC with Transposes),
the attribute and input forms of Split/Slice/Pad across opsets, per-channel
constants, shared weights, several inputs and outputs, Identity chains and a
run-time read of the channel count (which must block).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_graphsurgeon as gs

from onnx_intrafusion import coupling, prune

from conftest import assert_plans_keeping_every_channel_are_exact, assert_valid

RNG = np.random.default_rng(0)


class Builder:
    """A tiny graph builder: every weight is an initializer or (``constants=True``) a Constant node."""

    def __init__(self, opset: int, constants: bool = False):
        self.opset, self.constants = opset, constants
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def const(self, value: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        value = np.asarray(value)
        if self.constants:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1) -> str:
        w = self.const(RNG.standard_normal((cout, cin // group, k, k)).astype(np.float32) * 0.3)
        b = self.const(RNG.standard_normal(cout).astype(np.float32) * 0.1)
        return self.op("Conv", [x, w, b], pads=[k // 2] * 4, group=group)

    def gemm(self, x: str, cin: int, cout: int) -> str:
        w = self.const(RNG.standard_normal((cout, cin)).astype(np.float32) * 0.3)
        b = self.const(RNG.standard_normal(cout).astype(np.float32) * 0.1)
        return self.op("Gemm", [x, w, b], transB=1)

    def head(self, x: str, c: int, n: int = 4) -> str:
        return self.gemm(self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1), c, n)

    def model(self, inputs: dict[str, list], outputs: dict[str, list]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
            self.inits)
        ir = 7 if self.opset <= 12 else (8 if self.opset <= 18 else 10)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir)
        onnx.checker.check_model(model, full_check=True)
        return model

    def output(self, x: str, name: str) -> None:
        self.nodes.append(helper.make_node("Identity", [x], [name]))


def check(model: onnx.ModelProto, sparsity: float = 0.5):
    assert_plans_keeping_every_channel_are_exact(model, atol=1e-4, seed=2)
    result = prune(model, sparsity=sparsity, validate=False)
    assert_valid(result.model, model)
    assert result.report.macs_after < result.report.macs_before
    return result.report


def pruned_sizes(rep) -> list[tuple[int, int]]:
    return sorted((g.channels_before, g.channels_after) for g in rep.pruned_groups)


def _split(b: Builder, x: str, sizes: list[int], axis: int = 1) -> list[str]:
    if b.opset < 13:
        return b.op("Split", [x], n_out=len(sizes), axis=axis, split=sizes)
    return b.op("Split", [x, b.const(np.array(sizes, np.int64), "s")], n_out=len(sizes), axis=axis)


def _slice(b: Builder, x: str, start: int, end: int, axis: int = 1) -> str:
    if b.opset < 10:
        return b.op("Slice", [x], starts=[start], ends=[end], axes=[axis])
    c = lambda v: b.const(np.array([v], np.int64), "s")  # noqa: E731
    return b.op("Slice", [x, c(start), c(end), c(axis)])


@pytest.mark.parametrize("constants", [False, True])
@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21])
def test_split_slice_concat_across_opsets(opset, constants):
    b = Builder(opset, constants)
    x = b.op("Relu", [b.conv("x", 3, 12)])
    p, q = _split(b, x, [4, 8])
    q1 = _slice(b, q, 2, 8)  # channels 6..12 of the conv
    q1 = b.op("Identity", [b.op("Identity", [q1])])
    y = b.op("Concat", [b.conv(p, 4, 6), q1], axis=-3 if opset >= 11 else 1)  # negative axes from 11
    y = b.op("Mul", [y, b.const(RNG.random((1, 12, 1, 1)).astype(np.float32), "c")])
    y = b.op("PRelu", [y, b.const(RNG.random((12, 1, 1)).astype(np.float32), "c")])
    b.output(b.head(y, 12), "out")
    rep = check(b.model({"x": [1, 3, 8, 8]}, {"out": [1, 4]}))
    # conv cut at 4, 6 (slice start) -> parts 4, 2, 6; the 4-part feeds conv(6); conv(6) pruned too
    assert pruned_sizes(rep) == [(2, 1), (4, 2), (6, 3), (6, 3)]


@pytest.mark.parametrize("opset", [18, 21])
def test_split_num_outputs(opset):
    b = Builder(opset)
    x = b.conv("x", 3, 8)
    p, q = b.op("Split", [x], n_out=2, axis=1, num_outputs=2)
    y = b.op("Add", [b.conv(p, 4, 5), b.conv(q, 4, 5)])
    b.output(b.head(y, 5), "out")
    rep = check(b.model({"x": [1, 3, 8, 8]}, {"out": [1, 4]}))
    assert pruned_sizes(rep) == [(4, 2), (4, 2), (5, 3)]


@pytest.mark.parametrize("opset", [9, 13, 20])
def test_nhwc_graph_with_transposes(opset):
    """tf2onnx style: NHWC tensors, a Transpose before every Conv and after it."""
    b = Builder(opset, constants=True)
    x = b.op("Transpose", ["x"], perm=[0, 3, 1, 2])
    x = b.op("Transpose", [b.conv(x, 3, 8)], perm=[0, 2, 3, 1])  # NHWC, channels on axis 3
    x = b.op("Add", [x, b.const(RNG.random(8).astype(np.float32), "c")])  # per-channel bias, NHWC
    x = b.op("Clip", [x], min=0.0, max=6.0) if opset < 11 else b.op(
        "Clip", [x, b.const(np.array(0, np.float32), "c"), b.const(np.array(6, np.float32), "c")])
    x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    x = b.conv(x, 8, 6)
    y = b.op("ReduceMean", [b.op("Transpose", [x], perm=[0, 2, 3, 1])], axes=[1, 2], keepdims=0) \
        if opset < 18 else b.op("ReduceMean", [b.op("Transpose", [x], perm=[0, 2, 3, 1]),
                                               b.const(np.array([1, 2], np.int64), "a")], keepdims=0)
    y = b.op("MatMul", [y, b.const(RNG.standard_normal((6, 4)).astype(np.float32), "w")])
    b.output(y, "out")
    rep = check(b.model({"x": [1, 8, 8, 3]}, {"out": [1, 4]}))
    assert pruned_sizes(rep) == [(6, 3), (8, 4)]


def test_shared_weight_dynamic_dims_two_inputs_two_outputs():
    b = Builder(17)
    w = b.const(RNG.standard_normal((8, 3, 3, 3)).astype(np.float32))
    a = b.op("Relu", [b.op("Conv", ["x1", w], pads=[1] * 4)])
    c = b.op("Relu", [b.op("Conv", ["x2", w], pads=[1] * 4)])  # same weight, second input
    y = b.op("Add", [b.conv(a, 8, 6), b.conv(c, 8, 6)])
    b.output(b.head(y, 6), "logits")
    b.output(b.head(a, 8, 2), "aux")
    rep = check(b.model({"x1": ["N", 3, "H", "W"], "x2": ["N", 3, "H", "W"]},
                        {"logits": ["N", 4], "aux": ["N", 2]}))
    # the shared conv is one group for both inputs; the two 6-channel convs are joined by the Add
    assert pruned_sizes(rep) == [(6, 3), (8, 4)]


def test_unfolded_batchnorm_and_depthwise_at_opset_9():
    b = Builder(9)
    x = b.conv("x", 3, 8)
    c = lambda: b.const(RNG.random(8).astype(np.float32) + 0.5, "bn")  # noqa: E731
    x = b.op("Relu", [b.op("BatchNormalization", [x, c(), c(), c(), c()])])
    x = b.op("Relu", [b.conv(x, 8, 8, group=8)])
    b.output(b.head(x, 8), "out")
    rep = check(b.model({"x": [2, 3, 8, 8]}, {"out": [2, 4]}))
    assert pruned_sizes(rep) == [(8, 4)]


def test_run_time_channel_count_blocks():
    """Shape -> Gather(channel dim) -> arithmetic: the channel count is used as a number."""
    b = Builder(17)
    x = b.op("Relu", [b.conv("x", 3, 8)])
    n = b.op("Cast", [b.op("Gather", [b.op("Shape", [x]), b.const(np.array(1, np.int64), "i")], axis=0)],
             to=TensorProto.FLOAT)
    y = b.op("Div", [b.op("GlobalAveragePool", [x]), n])
    b.output(b.gemm(b.op("Flatten", [y], axis=1), 8, 4), "out")
    model = b.model({"x": ["N", 3, 8, 8]}, {"out": ["N", 4]})
    # Loading folds Shape reads of static dims (the model then divides by the
    # original count, as before pruning); unfolded, the read must block.
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    groups = coupling.analyse(graph.toposort()).groups
    conv = [g for g in groups if g.size == 8]
    assert len(conv) == 1 and conv[0].blocked[0][1] == "the channel count is read at run time (Shape)"
    assert prune(model, sparsity=0.5, validate=False).report.pruned_groups


def test_resize_sizes_input_is_fixed():
    b = Builder(13)
    x = b.op("Relu", [b.conv("x", 3, 8)])
    x = b.op("Resize", [x, "", "", b.const(np.array([1, 8, 12, 12], np.int64), "s")], mode="nearest")
    x = b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p")])
    b.output(b.head(b.conv(x, 8, 5), 5), "out")
    rep = check(b.model({"x": [1, 3, 8, 8]}, {"out": [1, 4]}))
    assert pruned_sizes(rep) == [(5, 3), (8, 4)]


def test_pad_on_channels_blocks():
    b = Builder(11)
    x = b.op("Pad", [b.conv("x", 3, 8), b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "p")])
    b.output(b.head(b.conv(x, 10, 5), 5), "out")
    rep = check(b.model({"x": [1, 3, 8, 8]}, {"out": [1, 4]}))
    assert pruned_sizes(rep) == [(5, 3)]
    assert {b_["reason"] for g in rep.blocked_groups for b_ in g.blocked} == {"Pad adds positions along the channel axis"}


def test_deduplicated_batchnorm_constants_are_unshared():
    """The dynamo exporter stores equal BN vectors once; BNs of different groups share them."""
    b = Builder(18)
    ones, zeros = b.const(np.ones(8, np.float32), "one"), b.const(np.zeros(8, np.float32), "zero")
    a = b.conv("x", 3, 4)
    c = b.conv("x", 3, 4)
    x = b.op("Concat", [a, c], axis=1)  # 8 channels from two groups
    x = b.op("Relu", [b.op("BatchNormalization", [x, ones, zeros, zeros, ones])])
    y = b.conv("x", 3, 8)  # one group of 8 channels, same BN constants
    y = b.op("Relu", [b.op("BatchNormalization", [y, ones, zeros, zeros, ones])])
    z = b.op("Add", [b.conv(x, 8, 6), b.conv(y, 8, 6)])
    b.output(b.head(z, 6), "out")
    rep = check(b.model({"x": [1, 3, 8, 8]}, {"out": [1, 4]}))
    assert pruned_sizes(rep) == [(4, 2), (4, 2), (6, 3), (8, 4)]


def test_bias_shared_with_an_unedited_reader():
    """A zero bias deduplicated into a LayerNorm that is not edited: the pruned Add gets a private copy."""
    b = Builder(17)
    zeros = b.const(np.zeros(6, np.float32), "zero")
    x = b.op("Transpose", [b.conv("x", 3, 6)], perm=[0, 2, 3, 1])
    x = b.op("LayerNormalization", [x, b.const(np.ones(6, np.float32), "one"), zeros], axis=-1)
    h = b.op("MatMul", [x, b.const(RNG.standard_normal((6, 6)).astype(np.float32), "w")])
    h = b.op("Relu", [b.op("Add", [h, zeros])])
    y = b.op("MatMul", [h, b.const(RNG.standard_normal((6, 4)).astype(np.float32), "w")])
    b.output(b.op("ReduceMean", [y], axes=[1, 2], keepdims=0), "out")
    rep = check(b.model({"x": [1, 3, 8, 8]}, {"out": [1, 4]}))
    assert pruned_sizes(rep) == [(6, 3)]
