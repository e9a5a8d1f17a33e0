"""Attention heads are pruned as whole heads, across Q, K, V and the output projection.

The oracles do not use the pruning code: heads that are exact duplicates
(merging them is lossless, dropping one is not) and heads whose output
projection columns are zero (removing exactly them changes nothing).  Each
form torch writes (separate or fused QKV, F.scaled_dot_product_attention, an
additive mask) is exported with both exporters.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import attention_models as am
from conftest import assert_valid, feeds_for, run
from onnx_intrafusion import coupling, model_io, prune
from onnx_intrafusion.errors import UsageError

torch = pytest.importorskip("torch")

_CACHE: dict = {}


#: Forms exported with a dynamic batch axis (fixed sequence length): the batch is then read at run
#: time and multiplied into the Reshape targets (``[S, B * heads, head_dim]``, ``B * windows``).
DYNAMIC_BATCH = ("mha", "swin")
FORMS = (*am.FORMS, *(f"{f}-dynamic-batch" for f in DYNAMIC_BATCH))


def exported(tmp_path_factory, kind: str, form: str, exporter: str):
    """(path, model) of an exported block, built once per test session."""
    key = (kind, form, exporter)
    if key not in _CACHE:
        base, dynamic = form.removesuffix("-dynamic-batch"), form.endswith("-dynamic-batch")
        model = am.duplicated(base) if kind == "dup" else am.dead_heads(base, dead=(1, 3))
        path = am.export(model, tmp_path_factory.mktemp(kind) / f"{form}_{exporter}.onnx", exporter,
                         dynamic=dynamic, dynamic_tokens=False)
        _CACHE[key] = (str(path), onnx.load(str(path)))
    return _CACHE[key]


def head_groups(path: str) -> list[coupling.Group]:
    graph = model_io.to_graph(model_io.load_model(path).model)
    return [g for g in coupling.analyse(graph).groups if g.kind == "head"]


def q_width(model: onnx.ModelProto, node_name: str) -> int:
    """Output width of the projection ``node_name`` (MatMul [in, out] or Gemm transB [out, in])."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    w = inits[node.input[1]]
    trans = any(a.name == "transB" and a.i for a in node.attribute)
    return w.shape[0] if trans else w.shape[1]


@pytest.mark.parametrize("exporter", am.EXPORTERS)
@pytest.mark.parametrize("form", FORMS)
def test_duplicate_heads_merge_exactly_and_pruning_does_not(tmp_path_factory, form, exporter):
    path, original = exported(tmp_path_factory, "dup", form, exporter)
    (group,) = head_groups(path)
    assert group.prunable and group.size == am.HEADS
    feeds = feeds_for(original, seed=1)
    ref = run(original, feeds)["logits"]
    fused = prune(path, sparsity=0.5, head_method="intrafusion", groups=[group.id])
    dropped = prune(path, sparsity=0.5, groups=[group.id])  # heads are dropped by default
    for result in (fused, dropped):
        assert_valid(result.model, original)
        (row,) = result.report.pruned_groups
        assert (row.channels_before, row.channels_after) == (am.HEADS, am.HEADS // 2)
        # half the heads: every Q/K/V projection is half as wide
        for producer in row.producers:
            width = q_width(result.model, producer)
            assert width in (am.D // 2, 3 * am.D // 2)
    np.testing.assert_allclose(run(fused.model, feeds)["logits"], ref, atol=1e-4, rtol=0)
    assert np.abs(run(dropped.model, feeds)["logits"] - ref).max() > 1e-3
    if form.endswith("-dynamic-batch"):  # the head count written next to the run-time batch is right for any batch
        feeds = feeds_for(original, seed=3, batch=3)
        np.testing.assert_allclose(run(fused.model, feeds)["logits"], run(original, feeds)["logits"], atol=1e-4,
                                   rtol=0)


def test_transport_options_apply_when_only_heads_are_merged(tmp_path_factory):
    """--method prune with --head-method intrafusion still builds transport plans: their options apply."""
    path, original = exported(tmp_path_factory, "dup", "sdpa", am.EXPORTERS[0])
    (group,) = head_groups(path)
    result = prune(path, sparsity=0.5, method="prune", head_method="intrafusion", ot_p=1.0, groups=[group.id])
    assert (result.report.options["ot_reg"], result.report.options["ot_p"]) == (0.0, 1.0)
    feeds = feeds_for(original, seed=1)
    np.testing.assert_allclose(run(result.model, feeds)["logits"], run(original, feeds)["logits"], atol=1e-4, rtol=0)
    with pytest.raises(UsageError, match="only applies"):
        prune(path, sparsity=0.5, method="prune", ot_p=1.0)


@pytest.mark.parametrize("exporter", am.EXPORTERS)
@pytest.mark.parametrize("form", ["sdpa", "stacked", "mha", "swin", "mha-dynamic-batch", "swin-dynamic-batch"])
def test_removing_heads_with_zero_output_columns_changes_nothing(tmp_path_factory, form, exporter):
    path, original = exported(tmp_path_factory, "dead", form, exporter)
    (group,) = head_groups(path)
    result = prune(path, sparsity=0.5, method="prune", groups=[group.id])
    assert_valid(result.model, original)
    (row,) = result.report.pruned_groups
    assert row.kind == "head"
    assert row.kept == [0, 2]  # exactly the live heads
    feeds = feeds_for(original, seed=2)
    np.testing.assert_allclose(run(result.model, feeds)["logits"], run(original, feeds)["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("exporter", am.EXPORTERS)
@pytest.mark.parametrize("form", ["bert", "stacked"])
def test_dynamic_batch_and_length_head_count_is_rewritten(tmp_path, form, exporter):
    # The Reshape targets are computed from Shape reads; the head count is a constant inside them.
    path = str(am.export(am.duplicated(form), tmp_path / "m.onnx", exporter, dynamic=True))
    original = onnx.load(path)
    (group,) = head_groups(path)
    result = prune(path, sparsity=0.5, head_method="intrafusion", groups=[group.id])
    assert_valid(result.model, original)
    assert [(r.channels_before, r.channels_after) for r in result.report.pruned_groups] == [(4, 2)]
    for batch, tokens in ((3, am.TOKENS), (1, am.TOKENS + 3)):
        feeds = {"tokens": np.random.default_rng(batch).standard_normal((batch, tokens, am.D)).astype(np.float32)}
        np.testing.assert_allclose(run(result.model, feeds)["logits"], run(original, feeds)["logits"], atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("exporter", am.EXPORTERS)
@pytest.mark.parametrize("form", ["bert", "mha-dynamic-batch", "swin-dynamic-batch"])
def test_sparsity_zero_changes_nothing(tmp_path_factory, form, exporter):
    path, original = exported(tmp_path_factory, "dup", form, exporter)
    result = prune(path, sparsity=0.0, allow_unchanged=True)
    assert not result.report.pruned_groups
    feeds = feeds_for(original)
    # the written graph has the shape computations folded (the static ones of a dynamic-batch
    # export): onnxruntime may then round differently in the last bit
    atol = 0.0 if form == "bert" else 1e-6
    np.testing.assert_allclose(run(result.model, feeds)["logits"], run(original, feeds)["logits"], atol=atol, rtol=0)


@pytest.mark.parametrize("exporter", am.EXPORTERS)
def test_group_kinds_and_ffn_neurons_prune(tmp_path_factory, exporter):
    path, original = exported(tmp_path_factory, "dup", "bert", exporter)
    graph = model_io.to_graph(model_io.load_model(path).model)
    groups = coupling.analyse(graph).groups
    kinds = {g.kind for g in groups}
    assert {"head", "ffn", "hidden"} <= kinds
    assert all(g.prunable for g in groups if g.kind in ("head", "ffn"))
    assert all(not g.prunable for g in groups if g.kind == "hidden")  # LayerNorm over the residual stream
    result = prune(path, sparsity=0.5)
    assert_valid(result.model, original)
    assert sorted((r.channels_before, r.channels_after) for r in result.report.pruned_groups) == [
        (am.HEADS, am.HEADS // 2), (2 * am.D, am.D)]


@pytest.mark.parametrize("exporter", ["legacy"])
def test_per_kind_sparsity_and_method_from_the_command_line(tmp_path_factory, tmp_path, exporter):
    import json

    from onnx_intrafusion.cli import main

    path, original = exported(tmp_path_factory, "dup", "bert", exporter)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([path, str(out), "--sparsity", "0.5", "--head-sparsity", "0.75", "--ffn-sparsity", "0.25",
                 "--head-method", "intrafusion", "--report", str(report), "--quiet"])
    assert code == 0
    rows = {r["kind"]: r for r in json.loads(report.read_text())["groups"] if r["status"] == "pruned"}
    assert (rows["head"]["channels_before"], rows["head"]["channels_after"]) == (am.HEADS, 1)
    assert (rows["ffn"]["channels_before"], rows["ffn"]["channels_after"]) == (2 * am.D, 48)
    assert_valid(onnx.load(str(out)), original)
    assert main([path, str(tmp_path / "x.onnx"), "--head-sparsity", "1.5", "--quiet"]) != 0
    # With --global a per-kind sparsity fixes that kind; the other kinds are allocated.
    assert main([path, str(tmp_path / "g.onnx"), "--global", "--sparsity", "0.3", "--ffn-sparsity", "0.25",
                 "--target", "none", "--report", str(report), "--quiet"]) == 0
    rows = {r["kind"]: r for r in json.loads(report.read_text())["groups"]}
    assert (rows["ffn"]["channels_before"], rows["ffn"]["channels_after"]) == (2 * am.D, 48)


def _fused_attention_model(op: str) -> onnx.ModelProto:
    """x -> MatMul, Relu, MatMul (FFN) -> fused attention -> MatMul: the FFN's output group feeds the fused op."""
    rng = np.random.default_rng(0)
    d, s, heads = 8, 4, 2

    def w(name, *shape):
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [w("w1", d, 16), w("w2", 16, d), w("wo", d, 3)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["f"], name="fc1"),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["h"], name="fc2")]
    if op == "com.microsoft.Attention":
        inits += [w("wqkv", d, 3 * d), w("bqkv", 3 * d)]
        nodes.append(helper.make_node("Attention", ["h", "wqkv", "bqkv"], ["a"], name="attn", domain="com.microsoft",
                                      num_heads=heads))
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:  # opset-23 Attention on 3-D Q, K, V
        nodes.append(helper.make_node("Attention", ["h", "h", "h"], ["a"], name="attn", q_num_heads=heads,
                                      kv_num_heads=heads))
        opsets = [helper.make_opsetid("", 23)]
    nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"], name="out_proj"))
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, 3])], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10 if op == "Attention" else 8
    return model


@pytest.mark.parametrize("op", ["com.microsoft.Attention", "Attention"])
def test_fused_attention_is_blocked_with_a_reason(op):
    model = _fused_attention_model(op)
    result = prune(model, sparsity=0.5, validate=False)
    fed = next(r for r in result.report.groups if "fc2" in r.producers)
    assert fed.status == "blocked"
    assert {b["reason"] for b in fed.blocked} == {coupling.FUSED_REASON}
    # the FFN before it is still pruned, and the written model runs
    assert [(r.channels_before, r.channels_after) for r in result.report.pruned_groups] == [(16, 8)]
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)}
    assert run(result.model, feeds)["y"].shape == (1, 4, 3)


def _count_read_model(own: bool) -> onnx.ModelProto:
    """b = x @ wb is reshaped with a target whose last entry is a channel count read at run time:
    b's own (``own``), which follows any pruning, or that of a = x @ wa, which would not."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    read = "b" if own else "a"
    inits = [w("wa", 6, 8), w("wb", 6, 8), w("wc", 8, 3), w("wd", 8, 3),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([3], np.int64), "end")]
    # target = shape(read)[0:3] = [n, 4, channels]: with the dynamic n it is not folded away
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="fa"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="fb"),
             helper.make_node("Shape", [read], ["s"], name="shape"),
             helper.make_node("Slice", ["s", "start", "end"], ["target"], name="count"),
             helper.make_node("Reshape", ["b", "target"], ["br"], name="reshape"),
             helper.make_node("MatMul", ["br", "wc"], ["yc"], name="fc"),
             helper.make_node("MatMul", ["a", "wd"], ["yd"], name="fd"),
             helper.make_node("Add", ["yc", "yd"], ["y"], name="add")]
    return _model(nodes, inits, ["n", 4, 6], ["n", 4, 3])


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    """An opset-17 model from ``x`` to ``y``."""
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_channel_count_read_at_run_time_is_safe_only_as_its_own_count():
    model = _count_read_model(own=True)
    groups = {g.origin: g for g in coupling.analyse(model_io.to_graph(model)).groups}
    assert groups["fb"].prunable and groups["fa"].prunable  # b's count read by b's own Reshape follows the pruning
    result = prune(model, sparsity=0.5, method="prune")
    assert_valid(result.model, model)
    other = _count_read_model(own=False)
    groups = {g.origin: g for g in coupling.analyse(model_io.to_graph(other)).groups}
    # a's count would change under b's Reshape: both stay
    assert not groups["fa"].prunable and not groups["fb"].prunable
    assert any("read at run time" in r for _, r in groups["fa"].blocked)


def test_a_projection_blocked_before_any_reader_is_not_labelled_ffn():
    # x @ w1 (per token) -> CumSum along the neurons (no rule) -> output: no FFN hidden layer
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w3"),
             numpy_helper.from_array(np.array(2, np.int64), "axis")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
             helper.make_node("CumSum", ["h", "axis"], ["c"], name="cumsum"),
             helper.make_node("MatMul", ["c", "w2"], ["f"], name="fc1"),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w3"], ["y"], name="fc2")]
    model = _model(nodes, inits, [1, 4, 6], [1, 4, 3])
    groups = {g.origin: g for g in coupling.analyse(model_io.to_graph(model)).groups}
    assert not groups["proj"].prunable and groups["proj"].kind == "channel"
    assert groups["fc1"].prunable and groups["fc1"].kind == "ffn"
