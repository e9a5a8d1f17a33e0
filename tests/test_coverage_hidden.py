"""Rules that open the residual stream of vit_b_16/swin_t: Expand (a class token broadcast to a dynamic
batch, a channel-carrying Expand) and a Gather that takes every channel in order (dynamo's as_strided).

Oracles built by the tests, not by the tool:

* a ViT-style front (linear patch projection, class token ``cls.expand(n, ...)``
  concatenated to the tokens, position embedding, LayerNorm, classifier on the
  class token) exported by torch with a dynamic batch, both exporters.  Some
  hidden channels are dead (zero in every weight that writes or reads them); a
  LayerNorm over fewer channels computes other statistics, so the reference is
  the same module built by hand with those channels sliced out of every weight;
* hand-built ONNX graphs that Expand a channel-carrying tensor to a shape
  computed at run time, or Gather every channel in order: dead channels
  removed leave the outputs unchanged; a run-time channel entry or a
  reordering Gather stays blocked.

Every written model passes onnx.checker, strict shape inference and runs in
onnxruntime at two batch sizes.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import io_signature, run

from onnx_intrafusion import coupling, model_io, prune

C, T, D_IN, K = 16, 5, 6, 3
DEAD = [2, 7, 9, 13]
LIVE = [c for c in range(C) if c not in DEAD]
BATCHES = (2, 5)


def _valid(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True, data_prop=True)
    assert io_signature(pruned) == io_signature(original)


# ---------------------------------------------------------------- class token expanded to a dynamic batch

def _cls_module(c: int, expand_count: bool):
    import torch
    from torch import nn

    class ClsToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.ln, self.fc = nn.Linear(D_IN, c), nn.LayerNorm(c), nn.Linear(c, K)
            self.cls = nn.Parameter(torch.zeros(1, 1, c))
            self.pos = nn.Parameter(torch.zeros(1, T + 1, c))

        def forward(self, x):
            # -1 keeps the token's own size; the channel count written out is stored in the target
            cls = self.cls.expand(x.shape[0], 1, c) if expand_count else self.cls.expand(x.shape[0], -1, -1)
            h = torch.cat([cls, self.proj(x)], dim=1) + self.pos
            return self.fc(self.ln(h)[:, 0])

    return ClsToken().eval()


def _cls_weights() -> dict[str, np.ndarray]:
    """Random weights whose hidden channels DEAD are zero wherever they are written or read."""
    rng = np.random.default_rng(0)
    w = {"proj.weight": rng.standard_normal((C, D_IN)), "proj.bias": rng.standard_normal(C),
         "cls": rng.standard_normal((1, 1, C)), "pos": rng.standard_normal((1, T + 1, C)),
         "ln.weight": 1 + 0.3 * rng.standard_normal(C), "ln.bias": 0.3 * rng.standard_normal(C),
         "fc.weight": rng.standard_normal((K, C)), "fc.bias": rng.standard_normal(K)}
    for name, axis in AXES.items():
        idx = [slice(None)] * w[name].ndim
        idx[axis] = DEAD
        w[name][tuple(idx)] = 0.0
    return {k: v.astype(np.float32) for k, v in w.items()}


#: The hidden axis of every weight of the module.
AXES = {"proj.weight": 0, "proj.bias": 0, "cls": 2, "pos": 2, "ln.weight": 0, "ln.bias": 0, "fc.weight": 1}


def _loaded(c: int, expand_count: bool, weights: dict[str, np.ndarray]):
    import torch

    module = _cls_module(c, expand_count)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return module


def _export(module, exporter: str, path) -> onnx.ModelProto:
    import torch

    x = torch.randn(2, T, D_IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes={"x": {0: torch.export.Dim("n")}}, verbose=False)
    return onnx.load(str(path))


@pytest.mark.parametrize("expand_count", [False, True], ids=["minus_one", "count"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_class_token_expanded_to_dynamic_batch_prunes_as_hand_sliced(exporter, expand_count, tmp_path):
    torch = pytest.importorskip("torch")
    w = _cls_weights()
    model = _export(_loaded(C, expand_count, w), exporter, tmp_path / "m.onnx")
    assert any(n.op_type == "Expand" for n in model.graph.node)  # the pattern under test is there
    rng = np.random.default_rng(1)
    result = prune(model, sparsity=0.0, hidden_sparsity=len(DEAD) / C, method="prune",
                   calibration={"x": rng.standard_normal((32, T, D_IN)).astype(np.float32)}, recover="none")
    (row,) = [g for g in result.report.groups if g.kind == "hidden"]
    assert row.status == "pruned" and row.kept == LIVE
    _valid(result.model, model)
    sliced = {k: (np.take(v, LIVE, axis=AXES[k]) if k in AXES else v) for k, v in w.items()}
    reference = _loaded(len(LIVE), expand_count, sliced)
    full = _loaded(C, expand_count, w)
    for batch in BATCHES:
        x = rng.standard_normal((batch, T, D_IN)).astype(np.float32)
        got = run(result.model, {"x": x})["y"]
        with torch.no_grad():
            want, orig = reference(torch.from_numpy(x)).numpy(), full(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, K)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert np.abs(want - orig).max() > 1e-3  # the narrower LayerNorm does change the outputs


# ---------------------------------------------------------------- Expand of a channel-carrying tensor

REPEAT = 2


def _expand_model(target: str, w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x [n, T, D] @ W1 -> Relu -> Unsqueeze(1) -> Expand([n, 2, 1, ?]) -> @ W2 -> ReduceSum(1) -> y [n, T, K].

    ``target``: the Expand target's channel entry is ``one`` (1), ``count`` (C, a constant stored in the
    Concat that builds the target) or ``read`` (a size read at run time from another input, which may be
    1 or C: nothing the rewrite could fix).
    """
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([REPEAT, 1], np.int64), "mid"),
             numpy_helper.from_array(np.array([C if target == "count" else 1], np.int64), "last"),
             ]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Unsqueeze", ["r", "ax1"], ["u"]),
             helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["n"], axis=0)]
    last, inputs = "last", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", T, D_IN])]
    if target == "read":
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", "c"]))
        nodes += [helper.make_node("Shape", ["z"], ["zs"]), helper.make_node("Gather", ["zs", "ax1"], ["c"], axis=0)]
        last = "c"
    nodes += [helper.make_node("Concat", ["n", "mid", last], ["target"], axis=0),
              helper.make_node("Expand", ["u", "target"], ["e"]),
              helper.make_node("MatMul", ["e", "W2"], ["m"]),
              helper.make_node("ReduceSum", ["m", "ax1"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "expand", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", T, K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _expand_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((D_IN, C)).astype(np.float32), rng.standard_normal((C, K)).astype(np.float32)
    w1[:, DEAD] = 0.0  # dead after Relu: removing them changes nothing
    return w1, w2


@pytest.mark.parametrize("target", ["one", "count"])
def test_channel_carrying_expand_removes_dead_channels_exactly(target):
    model = _expand_model(target, *_expand_weights())
    result = prune(model, sparsity=len(DEAD) / C, method="prune")
    (row,) = [g for g in result.report.groups if g.channels_before == C]
    assert row.status == "pruned" and row.kept == LIVE
    _valid(result.model, model)
    rng = np.random.default_rng(4)
    for batch in BATCHES:
        x = rng.standard_normal((batch, T, D_IN)).astype(np.float32)
        np.testing.assert_allclose(run(result.model, {"x": x})["y"], run(model, {"x": x})["y"], atol=1e-5, rtol=0)
    if target == "count":  # the stored channel count follows the pruning
        consts = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
        assert any(v.tolist() == [len(LIVE)] for k, v in consts.items() if k.startswith("last"))


def test_expand_with_a_channel_entry_read_at_run_time_stays_blocked():
    graph = _graph(_expand_model("read", *_expand_weights()))
    analysis = coupling.analyse(graph)
    (group,) = [g for g in analysis.groups if g.size == C]
    assert not group.prunable
    assert [r for _, r in group.blocked] == [coupling.shape.EXPAND_REASON]


def _graph(model: onnx.ModelProto):
    return model_io.to_graph(model)


# ---------------------------------------------------------------- Gather that takes every channel in order

def _gather_model(indices: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x [1, T, D] @ W1 -> Relu -> mean over T -> flatten -> Gather(indices [1, C, 1, 1]) -> [1, C] @ W2.

    With ``indices`` = 0..C-1 this is how dynamo writes the ``as_strided`` after an adaptive pool.
    """
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(indices.astype(np.int64), "idx"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, C], np.int64), "two_d")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["m"], axes=[1], keepdims=0),
             helper.make_node("Reshape", ["m", "flat"], ["f"]), helper.make_node("Gather", ["f", "idx"], ["g"], axis=0),
             helper.make_node("Reshape", ["g", "two_d"], ["v"]), helper.make_node("MatMul", ["v", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D_IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_gather_of_every_channel_in_order_removes_dead_channels_exactly():
    model = _gather_model(np.arange(C).reshape(1, C, 1, 1), *_expand_weights())
    result = prune(model, sparsity=len(DEAD) / C, method="prune")
    (row,) = [g for g in result.report.groups if g.channels_before == C]
    assert row.status == "pruned" and row.kept == LIVE
    _valid(result.model, model)
    x = np.random.default_rng(5).standard_normal((1, T, D_IN)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})["y"], run(model, {"x": x})["y"], atol=1e-5, rtol=0)
    (gather,) = [n for n in result.model.graph.node if n.op_type == "Gather"]
    consts = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    np.testing.assert_array_equal(consts[gather.input[1]], np.arange(len(LIVE)).reshape(1, len(LIVE), 1, 1))


def test_gather_that_reorders_channels_stays_blocked():
    order = np.arange(C)
    order[[0, 1]] = order[[1, 0]]
    analysis = coupling.analyse(_graph(_gather_model(order.reshape(1, C, 1, 1), *_expand_weights())))
    (group,) = [g for g in analysis.groups if g.size == C]
    assert [r for _, r in group.blocked] == ["Gather along the channel axis (or with computed indices)"]
