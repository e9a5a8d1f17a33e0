"""Random CNN graphs from the supported vocabulary, built directly with onnx.helper.

A model is described by a small, printable *spec* (opset, input, a list of
blocks, a head) so that hypothesis shrinks failures to readable examples and a
failing spec can be pasted into a regression test.  :func:`build` turns a spec
into an ``onnx.ModelProto`` with reproducible random weights.

Blocks (each reads the current feature map ``x`` of width ``c``):

* ``("conv", width, kernel, stride, bias, bn, act)``: Conv [+ BatchNormalization] [+ activation]
* ``("res", kernel, proj)``: x + conv(relu(conv(x))) (proj: the shortcut is a 1x1 Conv)
* ``("cat", w1, w2)``: Concat(conv1x1(x), conv3x3(x)) on the channel axis
* ``("dense", w)``: Concat(relu(conv3x3(x)), x) (DenseNet style; x may be the graph input)
* ``("dw", mult, kernel, stride)``: depthwise Conv (channel multiplier) + Relu + pointwise Conv
* ``("se", reduced)``: x * sigmoid(conv(relu(conv(GlobalAveragePool(x)))))
* ``("pool", kind)``: MaxPool / AveragePool 2x2
* ``("swish",)``: x * sigmoid(x)
* ``("shared", k)``: relu(conv_w(relu(conv_w(x)))): one weight used by two Convs
* ``("nhwc", width)``: Transpose to NHWC, MatMul + Add bias on the last axis, Transpose back
* ``("bn",)``: a standalone BatchNormalization (not folded into a Conv)
* ``("unary", op)``: Identity / Dropout / Relu / Softplus

Heads: ``gap_gemm`` (GlobalAveragePool, Flatten, Gemm with random transB), ``flatten_gemm``
(Flatten of the spatial map, Gemm), ``reshape_gemm`` (Reshape of the spatial map to 2-D, Gemm),
``mean_matmul`` (ReduceMean, MatMul, Add), ``conv_out`` (the last feature map is the graph
output).  ``aux_out`` also makes the first block's output a graph output;
``weights_as_inputs`` also lists every initializer as a graph input (old exporters, and
torch.onnx.export(keep_initializers_as_inputs=True)).
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSETS = list(range(13, 22))
ACTS = ("Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip", None)
HEADS = ("gap_gemm", "flatten_gemm", "reshape_gemm", "mean_matmul", "conv_out")


def ir_version_for(opset: int) -> int:
    """The IR version that goes with ``opset`` (what exporters write)."""
    if opset >= 21:
        return 10
    if opset >= 19:
        return 9
    return 8


# -- strategies ---------------------------------------------------------------

widths = st.integers(1, 12)
kernels = st.sampled_from([1, 3, 5])

block = st.one_of(
    st.tuples(st.just("conv"), widths, kernels, st.sampled_from([1, 1, 2]), st.booleans(), st.booleans(),
              st.sampled_from(ACTS)),
    st.tuples(st.just("res"), st.sampled_from([1, 3]), st.booleans()),
    st.tuples(st.just("cat"), widths, widths),
    st.tuples(st.just("dense"), widths),
    st.tuples(st.just("dw"), st.sampled_from([1, 1, 2]), st.sampled_from([3, 5]), st.sampled_from([1, 2])),
    st.tuples(st.just("se"), st.integers(1, 6)),
    st.tuples(st.just("pool"), st.sampled_from(["MaxPool", "AveragePool"])),
    st.tuples(st.just("swish")),
    st.tuples(st.just("shared"), st.sampled_from([1, 3])),
    st.tuples(st.just("nhwc"), widths),
    st.tuples(st.just("bn")),
    st.tuples(st.just("unary"), st.sampled_from(["Identity", "Dropout", "Relu", "Softplus"])),
)

specs = st.fixed_dictionaries({
    "opset": st.sampled_from(OPSETS),
    "in_ch": st.integers(1, 4),
    "size": st.sampled_from([6, 8, 12]),
    "dyn_batch": st.booleans(),
    "blocks": st.lists(block, min_size=1, max_size=6),
    "head": st.sampled_from(HEADS),
    "classes": st.integers(2, 10),
    "seed": st.integers(0, 2**16),
    "aux_out": st.booleans(),
    "trans_b": st.booleans(),
    "weights_as_inputs": st.booleans(),
})


# -- builder --------------------------------------------------------------------


class _Builder:
    def __init__(self, spec: dict):
        self.spec = spec
        self.rng = np.random.default_rng(spec["seed"])
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, prefix: str, values: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"n_{op}"), **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, *shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) or 1
        return (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, bias: bool = True,
             group: int = 1) -> str:
        w = self.const("w", self.weight(c_out, c_in // group, k, k))
        inputs = [x, w]
        if bias:
            inputs.append(self.const("b", (0.1 * self.rng.standard_normal(c_out)).astype(np.float32)))
        p = k // 2
        return self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p],
                         group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        scale = self.const("bn_s", (1 + 0.1 * r.standard_normal(c)).astype(np.float32))
        shift = self.const("bn_b", (0.1 * r.standard_normal(c)).astype(np.float32))
        mean = self.const("bn_m", (0.1 * r.standard_normal(c)).astype(np.float32))
        var = self.const("bn_v", (1 + 0.1 * r.random(c)).astype(np.float32))
        return self.node("BatchNormalization", [x, scale, shift, mean, var], epsilon=1e-5)

    def act(self, x: str, kind: str | None) -> str:
        if kind is None:
            return x
        if kind == "LeakyRelu":
            return self.node(kind, [x], alpha=0.1)
        if kind == "Clip":
            lo = self.const("lo", np.array(0.0, dtype=np.float32))
            hi = self.const("hi", np.array(6.0, dtype=np.float32))
            return self.node(kind, [x, lo, hi])
        return self.node(kind, [x])


def _spatial(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def build(spec: dict) -> onnx.ModelProto:
    """The ONNX model described by ``spec`` (see the module docstring)."""
    b = _Builder(spec)
    c, hw = spec["in_ch"], spec["size"]
    x = "input"
    aux = None
    for blk in spec["blocks"]:
        kind = blk[0]
        if kind == "conv":
            _, width, k, stride, bias, bn, act = blk
            if hw < 2:
                stride = 1
            x = b.conv(x, c, width, k, stride, bias)
            c, hw = width, _spatial(hw, stride)
            if bn:
                x = b.bn(x, c)
            x = b.act(x, act)
        elif kind == "res":
            _, k, proj = blk
            y = b.node("Relu", [b.conv(x, c, c, k)])
            y = b.conv(y, c, c, k)
            short = b.conv(x, c, c, 1, bias=False) if proj else x
            x = b.node("Relu", [b.node("Add", [y, short])])
        elif kind == "cat":
            _, w1, w2 = blk
            y1 = b.node("Relu", [b.conv(x, c, w1, 1)])
            y2 = b.node("Relu", [b.conv(x, c, w2, 3)])
            x, c = b.node("Concat", [y1, y2], axis=1), w1 + w2
        elif kind == "dense":
            y = b.node("Relu", [b.conv(x, c, blk[1], 3)])
            x, c = b.node("Concat", [y, x], axis=1), blk[1] + c
        elif kind == "dw":
            _, mult, k, stride = blk
            if hw < 2:
                stride = 1
            y = b.node("Relu", [b.conv(x, c, c * mult, k, stride, group=c)])
            hw = _spatial(hw, stride)
            x = b.conv(y, c * mult, c, 1)
        elif kind == "se":
            _, reduced = blk
            s = b.node("GlobalAveragePool", [x])
            s = b.node("Relu", [b.conv(s, c, reduced, 1)])
            s = b.node("Sigmoid", [b.conv(s, reduced, c, 1)])
            x = b.node("Mul", [x, s])
        elif kind == "pool":
            if hw >= 2:
                x = b.node(blk[1], [x], kernel_shape=[2, 2], strides=[2, 2])
                hw = hw // 2
        elif kind == "shared":
            k = blk[1]
            weight = b.const("w_shared", b.weight(c, c, k, k))
            for _ in range(2):
                x = b.node("Relu", [b.node("Conv", [x, weight], kernel_shape=[k, k], pads=[k // 2] * 4)])
        elif kind == "swish":
            x = b.node("Mul", [x, b.node("Sigmoid", [x])])
        elif kind == "nhwc":
            width = blk[1]
            t = b.node("Transpose", [x], perm=[0, 2, 3, 1])
            t = b.node("MatMul", [t, b.const("lin_w", b.weight(width, c).T.copy())])
            t = b.node("Add", [t, b.const("lin_b", (0.1 * b.rng.standard_normal(width)).astype(np.float32))])
            x, c = b.node("Transpose", [b.node("Relu", [t])], perm=[0, 3, 1, 2]), width
        elif kind == "bn":
            x = b.bn(x, c)
        elif kind == "unary":
            x = b.node(blk[1], [x])
        else:  # pragma: no cover - spec typo
            raise ValueError(kind)
        if aux is None and x != "input":
            aux = (x, c, hw)
    batch = "N" if spec["dyn_batch"] else 2
    head, classes = spec["head"], spec["classes"]
    if head == "gap_gemm":
        f = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        fc = b.weight(classes, c)
        w = b.const("fc_w", fc if spec.get("trans_b", True) else fc.T.copy())
        out = b.node("Gemm", [f, w, b.const("fc_b", np.zeros(classes, np.float32))],
                     transB=int(spec.get("trans_b", True)))
        out_shape = [batch, classes]
    elif head == "reshape_gemm":
        target = [0, -1] if spec["dyn_batch"] else [2, c * hw * hw]
        f = b.node("Reshape", [x, b.const("shape", np.array(target, np.int64))])
        w = b.const("fc_w", b.weight(classes, c * hw * hw).T.copy())
        out = b.node("Gemm", [f, w])
        out_shape = [batch, classes]
    elif head == "flatten_gemm":
        f = b.node("Flatten", [x], axis=1)
        w = b.const("fc_w", b.weight(c * hw * hw, classes).reshape(c * hw * hw, classes))
        out = b.node("Gemm", [f, w])
        out_shape = [batch, classes]
    elif head == "mean_matmul":
        if spec["opset"] >= 18:
            m = b.node("ReduceMean", [x, b.const("axes", np.array([2, 3], np.int64))], keepdims=0)
        else:
            m = b.node("ReduceMean", [x], axes=[2, 3], keepdims=0)
        w = b.const("fc_w", b.weight(classes, c).T.copy())
        out = b.node("Add", [b.node("MatMul", [m, w]), b.const("fc_b", np.zeros(classes, np.float32))])
        out_shape = [batch, classes]
    else:
        out, out_shape = x, [batch, c, hw, hw]
    # Rename the last tensor to a stable graph-output name.
    for node in b.nodes:
        node.output[:] = ["output" if o == out else o for o in node.output]
        node.input[:] = ["output" if i == out else i for i in node.input]
    if out == "input":  # no node at all: cannot happen (min 1 block), guard anyway
        raise ValueError("empty model")
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)]
    if spec.get("aux_out") and aux is not None and aux[0] != out:
        outputs.append(helper.make_tensor_value_info(aux[0], TensorProto.FLOAT, [batch, aux[1], aux[2], aux[2]]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, spec["in_ch"], spec["size"],
                                                                          spec["size"]])]
    if spec.get("weights_as_inputs"):
        inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in b.inits]
    graph = helper.make_graph(b.nodes, "fuzz", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec["opset"])],
                              producer_name="fuzz")
    model.ir_version = ir_version_for(spec["opset"])
    return model
