"""Each op the channel analysis supports, in a tiny graph built with onnx.helper.

Oracle for correctness (not just validity): plain pruning must give exactly
the outputs of the original model with the dropped channels' consumer weights
set to zero (found by comparing each layer's weights before and after, not
from the channel analysis).  That holds whatever sits between producer and consumer, so a
wrong rewrite of a producer, a parameter, a Reshape or a consumer slice shows
up as a numeric difference.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_intrafusion import prune

from conftest import (assert_plans_keeping_every_channel_are_exact, assert_pruning_equals_zeroed_original, assert_valid)

RNG = np.random.default_rng(0)


def w(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make(nodes, inits, inputs, outputs, opset=17):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def check(model, pruned_groups: int, sparsity=0.5, atol=1e-4):
    """Both methods valid, plain pruning equal to the zeroed oracle, plans keeping every channel exact."""
    reports = {}
    for method in ("prune", "intrafusion"):
        res = prune(model, sparsity=sparsity, method=method)
        assert_valid(res.model, model)
        assert len(res.report.pruned_groups) == pruned_groups, res.report.to_text()
        assert res.report.params_after < res.report.params_before
        reports[method] = res
    assert_plans_keeping_every_channel_are_exact(model)
    assert_pruning_equals_zeroed_original(model, reports["prune"], atol=atol)
    return reports


def conv(name, x, cin, cout, k=3, bias=True, inits=None, **attrs):
    inits[f"{name}.w"] = w(cout, cin, k, k)
    ins = [x, f"{name}.w"]
    if bias:
        inits[f"{name}.b"] = w(cout)
        ins.append(f"{name}.b")
    return helper.make_node("Conv", ins, [name], name=name, pads=[k // 2] * 4, **attrs)


def cnn_with(middle, cin=8, extra_inits=None, opset=17, out_ch=6):
    """x -> conv1 (cin ch) -> middle(list of nodes, 'm_in' -> 'm_out') -> conv2 -> GAP -> Flatten -> Gemm."""
    inits = dict(extra_inits or {})
    nodes = [conv("c1", "x", 3, cin, inits=inits), helper.make_node("Identity", ["c1"], ["m_in"])]
    nodes += middle
    nodes += [conv("c2", "m_out", cin, out_ch, inits=inits),
              helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"], axis=1)]
    inits["fc.w"], inits["fc.b"] = w(4, out_ch), w(4)
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1))
    return make(nodes, inits, [("x", [2, 3, 8, 8])], ["y"], opset)


ACTIVATIONS = [
    ("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("Sigmoid", {}), ("HardSigmoid", {}), ("Tanh", {}),
    ("Elu", {}), ("Softplus", {}), ("Identity", {}),
]


@pytest.mark.parametrize("op, attrs", ACTIVATIONS)
def test_elementwise_activation(op, attrs):
    check(cnn_with([helper.make_node(op, ["m_in"], ["m_out"], **attrs)]), pruned_groups=2)


def test_hardswish_and_gelu_opset20():
    nodes = [helper.make_node("HardSwish", ["m_in"], ["h"]), helper.make_node("Gelu", ["h"], ["m_out"])]
    check(cnn_with(nodes, opset=20), pruned_groups=2)


def test_clip_relu6_with_constant_bounds():
    nodes = [helper.make_node("Clip", ["m_in", "lo", "hi"], ["m_out"])]
    check(cnn_with(nodes, extra_inits={"lo": np.float32(0), "hi": np.float32(6)}), pruned_groups=2)


def test_prelu_per_channel_slope_is_pruned_with_the_channels():
    nodes = [helper.make_node("PRelu", ["m_in", "slope"], ["m_out"])]
    reports = check(cnn_with(nodes, extra_inits={"slope": w(8, 1, 1)}), pruned_groups=2)
    assert "PRelu_1" in " ".join(reports["prune"].report.pruned_groups[0].params) or any(
        "PRelu" in p for g in reports["prune"].report.pruned_groups for p in g.params)


def test_swish_x_times_sigmoid_x():
    nodes = [helper.make_node("Sigmoid", ["m_in"], ["s"]), helper.make_node("Mul", ["m_in", "s"], ["m_out"])]
    check(cnn_with(nodes), pruned_groups=2)


def test_per_channel_constant_mul_and_add():
    nodes = [helper.make_node("Mul", ["m_in", "scale"], ["a"]), helper.make_node("Add", ["bias", "a"], ["m_out"])]
    check(cnn_with(nodes, extra_inits={"scale": w(1, 8, 1, 1), "bias": w(8, 1, 1)}), pruned_groups=2)


@pytest.mark.parametrize("op, attrs", [("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
                                       ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})])
def test_pooling(op, attrs):
    check(cnn_with([helper.make_node(op, ["m_in"], ["m_out"], **attrs)]), pruned_groups=2)


def test_dropout_with_ratio_input():
    nodes = [helper.make_node("Dropout", ["m_in", "ratio"], ["m_out"])]
    check(cnn_with(nodes, extra_inits={"ratio": np.float32(0.5)}), pruned_groups=2)


def test_unfolded_batchnorm():
    inits = {"s": w(8) + 1.5, "b": w(8), "mean": w(8), "var": np.abs(w(8)) + 0.5}
    nodes = [helper.make_node("BatchNormalization", ["m_in", "s", "b", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["m_out"])]
    check(cnn_with(nodes, extra_inits=inits), pruned_groups=2)


def test_depthwise_conv_carries_the_group():
    inits = {"dw.w": w(8, 1, 3, 3), "dw.b": w(8)}
    nodes = [helper.make_node("Conv", ["m_in", "dw.w", "dw.b"], ["m_out"], group=8, pads=[1, 1, 1, 1])]
    res = check(cnn_with(nodes, extra_inits=inits), pruned_groups=2)
    dw = [n for n in res["prune"].model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert [a.i for a in dw[0].attribute if a.name == "group"] == [4]


def test_residual_add_joins_groups():
    inits = {}
    nodes = [conv("r1", "m_in", 8, 8, inits=inits), helper.make_node("Relu", ["r1"], ["r1a"]),
             conv("r2", "r1a", 8, 8, inits=inits), helper.make_node("Add", ["r2", "m_in"], ["m_out"])]
    res = check(cnn_with(nodes, extra_inits=inits), pruned_groups=3)
    stream = [g for g in res["prune"].report.pruned_groups if len(g.producers) == 2]
    assert len(stream) == 1 and set(stream[0].producers) == {"c1", "r2"}


def test_reduce_mean_keepdims_and_reshape_head():
    """Dynamo-style head: ReduceMean(axes input) + Reshape with a literal [N, C] shape."""
    inits = {"axes": np.array([-1, -2], np.int64), "shape": np.array([2, 8], np.int64), "fc.w": w(4, 8), "fc.b": w(4)}
    nodes = [conv("c1", "x", 3, 8, inits=inits), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=1),
             helper.make_node("Reshape", ["m", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1)]
    model = make(nodes, inits, [("x", [2, 3, 8, 8])], ["y"], opset=18)
    res = check(model, pruned_groups=1)
    shapes = [numpy_helper.to_array(i).tolist() for i in res["prune"].model.graph.initializer if i.name.startswith("shape")]
    assert shapes == [[2, 4]]


@pytest.mark.parametrize("shape", [[2, 128], [-1, 128], [0, -1], [2, -1]])
def test_flatten_blocks_feed_gemm_through_reshape(shape):
    """Each channel owns HW=16 consecutive columns of the next weight (transB=0 here)."""
    inits = {"shape": np.array(shape, np.int64), "fc.w": w(128, 5), "fc.b": w(5)}
    nodes = [conv("c1", "x", 3, 8, inits=inits), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=0)]
    check(make(nodes, inits, [("x", [2, 3, 8, 8])], ["y"]), pruned_groups=1)


def test_flatten_op_with_spatial_blocks():
    inits = {"fc.w": w(5, 128)}
    nodes = [conv("c1", "x", 3, 8, inits=inits), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.w"], ["y"], transB=1)]
    check(make(nodes, inits, [("x", [2, 3, 8, 8])], ["y"]), pruned_groups=1)


def test_gemm_chain_transb_0_and_1():
    inits = {"w1": w(16, 12), "b1": w(12), "w2": w(10, 12), "b2": w(1, 10), "w3": w(3, 10)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=0),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Tanh", ["h2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "w3"], ["y"], transB=1)]
    check(make(nodes, inits, [("x", [4, 16])], ["y"]), pruned_groups=2)


def test_transformer_style_matmul_mlp_with_bias_add():
    """[B, S, D] tokens: MatMul -> Add bias -> Gelu -> MatMul -> Add; the hidden width is a group."""
    inits = {"w1": w(16, 32), "b1": w(32), "w2": w(32, 16), "b2": w(16)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Gelu", ["hb"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["o"]),
             helper.make_node("Add", ["o", "b2"], ["y"])]
    check(make(nodes, inits, [("x", [2, 5, 16])], ["y"], opset=20), pruned_groups=1)


def test_concat_of_two_branches_feeds_one_consumer():
    """conv2 reads 16 concatenated channels: 6 from branch a, then 10 from branch b."""
    inits = {}
    nodes = [conv("c1", "x", 3, 8, inits=inits), helper.make_node("Relu", ["c1"], ["m_in"]),
             conv("a", "m_in", 8, 6, inits=inits), conv("b", "m_in", 8, 10, inits=inits),
             helper.make_node("Relu", ["a"], ["ar"]), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Concat", ["ar", "br"], ["cat"], axis=-3),
             conv("c2", "cat", 16, 6, inits=inits), helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"])]
    inits["fc.w"], inits["fc.b"] = w(4, 6), w(4)
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], transB=1))
    res = check(make(nodes, inits, [("x", [2, 3, 8, 8])], ["y"]), pruned_groups=4)
    assert sorted(g.channels_after for g in res["prune"].report.pruned_groups) == [3, 3, 4, 5]


def test_unsupported_op_blocks_its_group_with_the_node_named():
    nodes = [helper.make_node("CumSum", ["m_in", "cum_axis"], ["m_out"], name="the_cumsum")]
    model = cnn_with(nodes, extra_inits={"cum_axis": np.array(1, np.int64)})
    res = prune(model, sparsity=0.5, method="prune")
    assert_valid(res.model, model)
    blocked = res.report.blocked_groups
    assert len(blocked) == 1 and blocked[0].channels_after == blocked[0].channels_before == 8
    assert blocked[0].blocked[0]["node"] == "the_cumsum (CumSum)" and "not supported" in blocked[0].blocked[0]["reason"]
    assert len(res.report.pruned_groups) == 1  # conv2 still pruned


def test_intermediate_graph_output_is_never_pruned():
    model = cnn_with([helper.make_node("Relu", ["m_in"], ["m_out"])])
    model.graph.output.append(helper.make_tensor_value_info("m_out", TensorProto.FLOAT, [2, 8, 8, 8]))
    res = prune(model, sparsity=0.5)
    assert_valid(res.model, model)
    statuses = sorted(g.status for g in res.report.groups)
    assert statuses == ["output", "output", "pruned"]


def test_weights_in_constant_nodes_are_pruned():
    inits = {}
    model = cnn_with([helper.make_node("Relu", ["m_in"], ["m_out"])], extra_inits=inits)
    # move every initializer into a Constant node, as paddle2onnx does
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    check(model, pruned_groups=2)


def test_bias_built_by_castlike_is_a_weight():
    """The dynamo exporter without its optimiser writes a bias-free Conv's zero bias as
    Expand(CastLike(0, x), [C]): folded, it is a weight and the Conv's channels are pruned."""
    inits = {"zero": np.array(0.0, np.float32), "bias_shape": np.array([8], np.int64)}
    nodes = [helper.make_node("Constant", [], ["zero_c"], value=numpy_helper.from_array(inits.pop("zero"))),
             helper.make_node("CastLike", ["zero_c", "m_in"], ["zero_like"]),
             helper.make_node("Expand", ["zero_like", "bias_shape"], ["b_mid"]),
             conv("mid", "m_in", 8, 8, bias=False, inits=inits),
             helper.make_node("Relu", ["mid"], ["m_out"])]
    nodes[3].input.append("b_mid")
    model = cnn_with(nodes, extra_inits=inits, opset=17)
    reports = check(model, pruned_groups=3)
    assert not reports["prune"].report.blocked_groups
