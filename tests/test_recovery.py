"""Recovery is checked on held-back samples (per layer and whole model) and scheduled in waves without changing results."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run, sample
from onnx import TensorProto, helper, numpy_helper

from onnx_intrafusion import activations, coupling, model_io, rewrite
from onnx_intrafusion.planning import plan_groups


def _prepared(model: onnx.ModelProto, sparsity: float, method: str = "prune"):
    """(graph rewritten by the plans, analysis, maps): what the pipeline hands to the recover stage."""
    graph = model_io.to_graph(model)
    analysis = coupling.analyse(graph)
    values = {name: np.asarray(t.values) for name, t in graph.tensors().items()
              if name in {m.constant for g in analysis.groups for m in g.members}}
    maps = plan_groups(analysis, values, sparsity, method, "l1")
    rewrite.apply_maps(graph, analysis, maps)
    return graph, analysis, maps


# --------------------------------------------------------------------------- a layer that cannot generalise
def _shortcut_model() -> onnx.ModelProto:
    """x (4) -> Gemm h = diag(3, 0.3, 3, 0.3) x -> Gemm y = (1, 2, -1) * sum of h.

    l1 pruning at 0.5 removes the two small channels (h1 = 0.3 b, h3 = 0.3 d).
    On data with b = a and d = c, least squares folds them into the kept
    channels (weight 1.1 instead of 1); on data with b = -a and d = -c that
    fold doubles the error of plain pruning.
    """
    w1 = np.diag([3.0, 0.3, 3.0, 0.3]).astype(np.float32)
    w2 = np.ones((4, 1), np.float32) * np.array([[1.0, 2.0, -1.0]], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "shortcut", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _shortcut_data(n: int, sign: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, c = rng.standard_normal(n), rng.standard_normal(n)
    noise = 1e-3 * rng.standard_normal((2, n))
    return {"x": np.stack([a, sign * a + noise[0], c, sign * c + noise[1]], 1).astype(np.float32)}


def _recover_shortcut(held_sign: float, **kwargs):
    model = _shortcut_model()
    graph, analysis, maps = _prepared(model, 0.5)
    pruned_w2 = np.asarray(next(n for n in graph.nodes if n.name == "fc2").inputs[1].values).copy()
    result = activations.recover(graph, model, analysis, maps, [_shortcut_data(64, 1.0, 0)], "lstsq",
                                 holdback=[_shortcut_data(16, held_sign, 1)], alpha=1e-9, **kwargs)
    fc2 = next(n for n in graph.nodes if n.name == "fc2")
    return result, pruned_w2, np.asarray(fc2.inputs[1].values), graph, model


def test_layer_that_gets_worse_on_held_back_rows_keeps_its_old_weights():
    result, pruned_w2, w2, _, _ = _recover_shortcut(-1.0)
    row = next(r for r in result.layers if r.node == "fc2")
    assert row.error_after < 0.01 * row.error_before  # on the fit rows the shortcut looks perfect ...
    assert row.held_back_after > 1.5 * row.held_back_before  # ... and doubles the error on held-back rows
    assert row.kept == "unrecovered"
    assert np.array_equal(w2, pruned_w2)
    assert result.model.kept == "recovered" and result.model.after == pytest.approx(result.model.before)


def test_whole_model_that_gets_worse_on_held_back_samples_is_put_back():
    result, pruned_w2, w2, graph, model = _recover_shortcut(-1.0, check_layers=False)
    assert result.model.after > result.model.before > 0
    assert result.model.kept == "unrecovered" and result.model.held_back_samples == 16
    assert result.model.measure == "KL"
    assert np.array_equal(w2, pruned_w2)
    # The graph that is written is the unrecovered one: same outputs as plain pruning.
    plain, *_ = _prepared(model, 0.5)
    x = _shortcut_data(8, -1.0, 2)
    out = run(model_io.to_model(graph, model), x)["y"]
    assert np.array_equal(out, run(model_io.to_model(plain, model), x)["y"])


def test_recovery_that_generalises_is_kept():
    result, pruned_w2, w2, _, _ = _recover_shortcut(+1.0)
    row = next(r for r in result.layers if r.node == "fc2")
    assert row.kept == "recovered" and row.held_back_after < 0.05 * row.held_back_before
    assert not np.array_equal(w2, pruned_w2)
    assert result.model.kept == "recovered" and result.model.after < 0.01 * result.model.before


# --------------------------------------------------------------------------- bias of MatMul + Add
def test_matmul_bias_add_absorbs_a_constant_neuron():
    """A hidden neuron that is constant (relu(0 x + 5)) is removed: its contribution is exactly a bias shift."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w1[:, 3] = 0.0  # neuron 3: weights zero, bias 5 -> always 5; lowest l1 norm of the producer rows
    b1 = rng.uniform(0.5, 1.0, 8).astype(np.float32)
    b1[3] = 5.0
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    w2[3] *= 0.01 / np.abs(w2[3]).max()  # and small consumer weights: l1 pruning removes it first
    b2 = np.zeros(4, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    g, analysis, maps = _prepared(model, 0.125)  # 8 -> 7 neurons
    assert list(maps.values())[0].keep == 7 and 3 not in list(maps.values())[0].kept
    x = {"x": rng.standard_normal((64, 5, 6)).astype(np.float32)}
    held = {"x": rng.standard_normal((16, 5, 6)).astype(np.float32)}
    result = activations.recover(g, model, analysis, maps, [x], "lstsq", holdback=[held], alpha=1e-9)
    assert {r.node: r.kept for r in result.layers}["mm2"] == "recovered"
    out, ref = run(model_io.to_model(g, model), held)["y"], run(model, held)["y"]
    assert np.abs(out - ref).max() < 1e-3 * np.abs(ref).max()  # the constant 5 * w2[3] went into b2


# --------------------------------------------------------------------------- padding rows
def test_padding_tokens_are_not_fitted():
    """Rows of [batch, sequence, hidden] activations whose attention-mask entry is 0 are left out of the fit."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
             helper.make_node("Cast", ["attention_mask"], ["mf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axis"], ["m3"], name="unsq"),
             helper.make_node("Mul", ["m", "m3"], ["y"], name="masked")]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 6]),
                          helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    g, analysis, maps = _prepared(model, 0.5)
    mask = (np.arange(7)[None] < rng.integers(1, 8, 20)[:, None]).astype(np.int64)
    feed = {"x": rng.standard_normal((20, 7, 6)).astype(np.float32), "attention_mask": mask}
    result = activations.recover(g, model, analysis, maps, [feed], "lstsq")
    assert {r.node: r.rows for r in result.layers} == {"mm1": int(mask.sum()), "mm2": int(mask.sum())}
    assert mask.sum() < mask.size


# --------------------------------------------------------------------------- wave scheduling
@pytest.mark.parametrize("name", ["resnet_legacy.onnx", "mobilenetv2_legacy.onnx"])
def test_waves_give_the_same_weights_as_one_layer_at_a_time(name):
    model = model_io.load_model(sample(name)).model
    x = np.random.default_rng(0).standard_normal((12, *[d.dim_value for d in
                                                         model.graph.input[0].type.tensor_type.shape.dim[1:]]))
    feeds = [{model.graph.input[0].name: x[i:i + 1].astype(np.float32)} for i in range(12)]  # batch fixed to 1
    feeds, held = feeds[:9], feeds[9:]
    out = {}
    for label, kwargs in {"waves": {}, "one": dict(one_at_a_time=True),
                          "no cache": dict(memory_budget=1)}.items():
        graph, analysis, maps = _prepared(model, 0.5, "intrafusion")
        result = activations.recover(graph, model, analysis, maps, feeds, "lstsq", holdback=held, max_rows=512,
                                     **kwargs)
        weights = {n.name: np.asarray(n.inputs[1].values) for n in graph.nodes if n.name in
                   {r.node for r in result.layers}}
        out[label] = (weights, result)
    waves, one, lean = out["waves"], out["one"], out["no cache"]
    assert len(waves[0]) > 5 and waves[0].keys() == one[0].keys() == lean[0].keys()
    for node, w in waves[0].items():
        np.testing.assert_allclose(w, one[0][node], rtol=1e-5, atol=1e-6, err_msg=node)
        np.testing.assert_allclose(w, lean[0][node], rtol=1e-5, atol=1e-6, err_msg=node)
    assert [r.kept for r in waves[1].layers] == [r.kept for r in one[1].layers]
    assert waves[1].model.after == pytest.approx(one[1].model.after, rel=1e-4)


def test_prune_reports_held_back_distortion_and_what_was_kept():
    from onnx_intrafusion import prune

    data = _shortcut_data(80, 1.0, 0)
    data["x"][::2, [1, 3]] *= -1  # half the samples anti-correlated: the shortcut fold cannot hold
    report = prune(_shortcut_model(), 0.5, method="prune", calibration=data, recover_alpha=1e-9,
                   validate=False).report.to_dict()
    whole = report["recovery_model"]
    assert whole["held_back_samples"] == 8 and whole["measure"] == "KL"
    assert whole["kept"] == ("recovered" if whole["after"] <= whole["before"] else "unrecovered")
    rows = {r["node"]: r for r in report["recovery"]}
    assert rows["fc2"]["held_back_rows"] == 8 and rows["fc2"]["rows"] == 72
    assert rows["fc2"]["kept"] in ("recovered", "unrecovered")
