"""Hidden-size (residual stream) pruning: blocked without calibration data, exact with it.

The oracle is a small pre-LN transformer block the test builds with
onnx.helper, in four normalisation forms (LayerNormalization, the
ReduceMean/Sub/Pow/Sqrt/Div arithmetic of older exports, RMSNorm, ORT's
SkipLayerNormalization) and with a text-style embedding table or a linear
projection in front.  Some residual channels are provably dead (zero in every
producer, parameter and consumer).  A LayerNorm over fewer channels computes
other statistics, so the outputs cannot stay the same; instead the test
builds by hand the model with those channels sliced out of every weight, and
the tool's rewrite must reproduce it.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, SAMPLES, assert_valid, io_signature, run
from test_cli import cli

from onnx_intrafusion import coupling, model_io, prune

C, F, T, K, VOCAB, D_IN = 16, 24, 5, 3, 30, 6
DEAD = [1, 6, 11, 14]
LIVE = [c for c in range(C) if c not in DEAD]
EPS = 1e-5
NORMS = ("op", "decomposed", "rms", "skip")


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights whose residual channels DEAD are zero everywhere they are written or read."""
    rng = np.random.default_rng(seed)
    w = {
        "E": rng.standard_normal((VOCAB, C)), "P": rng.standard_normal((1, T, C)),
        "Win": rng.standard_normal((D_IN, C)), "bin": rng.standard_normal(C),
        "g1": 1 + 0.3 * rng.standard_normal(C), "b1": 0.3 * rng.standard_normal(C),
        "W1": rng.standard_normal((C, F)) / 4, "c1": 0.1 * rng.standard_normal(F),
        "W2": rng.standard_normal((F, C)) / 4, "c2": 0.1 * rng.standard_normal(C),
        "g2": 1 + 0.3 * rng.standard_normal(C), "b2": 0.3 * rng.standard_normal(C),
        "Wh": rng.standard_normal((C, K)),
    }
    for name, axis in (("E", 1), ("P", 2), ("Win", 1), ("bin", 0), ("g1", 0), ("b1", 0), ("W1", 0), ("W2", 1),
                       ("c2", 0), ("g2", 0), ("b2", 0), ("Wh", 0)):
        idx = [slice(None)] * w[name].ndim
        idx[axis] = DEAD
        w[name][tuple(idx)] = 0.0
    return {k: v.astype(np.float32) for k, v in w.items()}


def _sliced(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights with the DEAD residual channels removed, by hand."""
    axes = {"E": 1, "P": 2, "Win": 1, "bin": 0, "g1": 0, "b1": 0, "W1": 0, "W2": 1, "c2": 0, "g2": 0, "b2": 0, "Wh": 0}
    return {k: (np.take(v, LIVE, axis=axes[k]) if k in axes else v) for k, v in w.items()}


def _norm(nodes: list, inits: list, kind: str, x: str, g: str, b: str, out: str) -> None:
    width = next(i for i in inits if i.name == g).dims[0]
    if kind in ("op", "skip"):
        nodes.append(helper.make_node("LayerNormalization", [x, g, b], [out], axis=-1, epsilon=EPS))
        return
    eps, two = f"{out}_eps", f"{out}_two"
    inits += [numpy_helper.from_array(np.array(EPS, np.float32), eps),
              numpy_helper.from_array(np.array(2.0, np.float32), two)]
    if kind == "decomposed":  # what torch's legacy exporter writes for nn.LayerNorm before opset 17
        nodes += [helper.make_node("ReduceMean", [x], [f"{out}_m"], axes=[-1]),
                  helper.make_node("Sub", [x, f"{out}_m"], [f"{out}_d"]),
                  helper.make_node("Pow", [f"{out}_d", two], [f"{out}_sq"]),
                  helper.make_node("ReduceMean", [f"{out}_sq"], [f"{out}_v"], axes=[-1]),
                  helper.make_node("Add", [f"{out}_v", eps], [f"{out}_ve"]),
                  helper.make_node("Sqrt", [f"{out}_ve"], [f"{out}_s"]),
                  helper.make_node("Div", [f"{out}_d", f"{out}_s"], [f"{out}_n"]),
                  helper.make_node("Mul", [f"{out}_n", g], [f"{out}_gn"]),
                  helper.make_node("Add", [f"{out}_gn", b], [out])]
    else:  # RMSNorm: x / sqrt(mean(x*x) + eps) * g, no beta
        nodes += [helper.make_node("Mul", [x, x], [f"{out}_sq"]),
                  helper.make_node("ReduceMean", [f"{out}_sq"], [f"{out}_v"], axes=[-1]),
                  helper.make_node("Add", [f"{out}_v", eps], [f"{out}_ve"]),
                  helper.make_node("Sqrt", [f"{out}_ve"], [f"{out}_s"]),
                  helper.make_node("Reciprocal", [f"{out}_s"], [f"{out}_r"]),
                  helper.make_node("Mul", [x, f"{out}_r"], [f"{out}_n"]),
                  helper.make_node("Mul", [f"{out}_n", g], [out])]
    assert width


def _block(w: dict[str, np.ndarray], norm: str, embed: bool) -> onnx.ModelProto:
    """Embedding (or projection) -> pre-LN FFN block with a residual Add -> LN -> per-token head."""
    width = w["g1"].shape[0]
    front = ("E", "P") if embed else ("Win", "bin")
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()
             if k not in ("E", "P", "Win", "bin") or k in front]
    if embed:
        inp = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", T])
        nodes = [helper.make_node("Gather", ["E", "ids"], ["tok"], axis=0),
                 helper.make_node("Add", ["tok", "P"], ["h0"])]
    else:
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, D_IN])
        nodes = [helper.make_node("MatMul", ["x", "Win"], ["proj"]), helper.make_node("Add", ["proj", "bin"], ["h0"])]
    _norm(nodes, inits, norm, "h0", "g1", "b1", "n1")
    nodes += [helper.make_node("MatMul", ["n1", "W1"], ["a"]), helper.make_node("Add", ["a", "c1"], ["ab"]),
              helper.make_node("Relu", ["ab"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["f"]),
              helper.make_node("Add", ["f", "c2"], ["fb"])]
    value_info = []
    if norm == "skip":  # the residual Add and the second LayerNorm fused, as ORT's optimizer writes them
        nodes.append(helper.make_node("SkipLayerNormalization", ["fb", "h0", "g2", "b2"], ["n2"],
                                      domain="com.microsoft", epsilon=EPS))
        value_info.append(helper.make_tensor_value_info("n2", TensorProto.FLOAT, ["batch", T, width]))
    else:
        nodes.append(helper.make_node("Add", ["h0", "fb"], ["h1"]))
        _norm(nodes, inits, norm, "h1", "g2", "b2" if norm != "rms" else "", "n2")
    nodes.append(helper.make_node("MatMul", ["n2", "Wh"], ["y"]))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", T, K])
    graph = helper.make_graph(nodes, "block", [inp], [out], inits, value_info=value_info)
    opsets = [helper.make_opsetid("", 17 if norm in ("op", "skip") else 13)]
    if norm == "skip":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _inputs(embed: bool, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if embed:
        return {"ids": rng.integers(0, VOCAB, size=(n, T)).astype(np.int64)}
    return {"x": rng.standard_normal((n, T, D_IN)).astype(np.float32)}


def _hidden(report) -> list:
    return [g for g in report.groups if g.kind == "hidden"]


@pytest.mark.parametrize("embed", [True, False], ids=["embedding", "projection"])
@pytest.mark.parametrize("norm", NORMS)
def test_dead_hidden_channels_removed_as_the_hand_sliced_model(norm, embed):
    w = _weights()
    model = _block(w, norm, embed)
    result = prune(model, sparsity=0.0, hidden_sparsity=len(DEAD) / C, method="prune",
                   calibration=_inputs(embed, 64, 1), recover="none")
    (row,) = _hidden(result.report)
    assert row.status == "pruned" and row.kept == LIVE
    onnx.checker.check_model(result.model, full_check=True)
    onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    assert io_signature(result.model) == io_signature(model)
    reference = _block(_sliced(w), norm, embed)
    feeds = _inputs(embed, 8, 2)
    got, want, full = run(result.model, feeds)["y"], run(reference, feeds)["y"], run(model, feeds)["y"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - full).max() > 1e-3  # the narrower LayerNorm does change the outputs: no free pass


@pytest.mark.parametrize("norm", NORMS)
def test_hidden_group_blocked_without_calibration(norm):
    model = _block(_weights(), norm, embed=True)
    result = prune(model, sparsity=0.5, validate=False)
    (row,) = _hidden(result.report)
    assert row.status == "blocked"
    assert {b["reason"] for b in row.blocked} == {coupling.NEEDS_CALIBRATION}
    assert row.channels_after == C
    assert any(g.status == "pruned" for g in result.report.groups)  # the FFN neurons still are


def test_decomposed_reduce_mean_elsewhere_still_blocks():
    """A mean over the channels that is not applied back to them (e.g. a pooled output) is no LayerNorm."""
    model = _block(_weights(), "op", embed=False)
    g = model.graph
    g.node.append(helper.make_node("ReduceMean", ["h0"], ["pooled"], axes=[-1]))
    g.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", T, 1]))
    analysis = coupling.analyse(model_io.to_graph(model))
    (group,) = [grp for grp in analysis.groups if grp.kind == "hidden"]
    assert "reduces over the channel axis" in {r for _, r in group.blocked}
    assert not group.needs_data


# --------------------------------------------------------------------------- the trained samples
EXPORTERS = ("legacy", "dynamo")


@pytest.mark.parametrize("stem", ["vit", "textenc"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_samples_hidden_group_spans_the_residual_stream(stem, exporter):
    model = onnx.load(str(SAMPLES / "transformers" / f"{stem}_{exporter}.onnx"))
    result = prune(model, sparsity=0.3, validate=False)
    (row,) = _hidden(result.report)
    assert row.status == "blocked" and {b["reason"] for b in row.blocked} == {coupling.NEEDS_CALIBRATION}
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 9 and {n.name for n in norms} <= set(row.params)
    # 4 blocks: the patch or word embedding, 4 attention output projections, 4 fc2 write the stream;
    # Q, K, V, fc1 of 4 blocks and the head (ViT) or pooler (text) read it
    assert len(row.producers) == 9 and len(row.consumers) == 17
    first = row.producers[0]
    assert next(n for n in model.graph.node if n.name == first).op_type == ("Conv" if stem == "vit" else "Gather")


def _fashion(split: str, n: int):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    datasets = pytest.importorskip("datasets", reason="benchmarks/datasets.py")
    try:
        return datasets.calibration_arrays("vit", n, split=split)
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_trained_vit_hidden_03_keeps_cosine(exporter):
    path = SAMPLES / "transformers" / f"vit_{exporter}.onnx"
    calib, held = _fashion("train", 512), _fashion("test", 256)
    result = prune(str(path), sparsity=0.0, hidden_sparsity=0.3, calibration=calib)
    (row,) = _hidden(result.report)
    assert row.status == "pruned" and row.channels_after == 45
    original = onnx.load(str(path))
    assert_valid(result.model, original)
    assert result.report.macs_after < result.report.macs_before
    # the least-squares re-fit ran on the layers reading the narrower LayerNorms, under the whole-model check
    model_check = result.report.recovery_model
    assert model_check["kept"] == ("recovered" if model_check["after"] <= model_check["before"] else "unrecovered")
    assert set(row.consumers) <= {r["node"] for r in result.report.recovery}
    a, b = run(original, held)["logits"], run(result.model, held)["logits"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() >= 0.9, cosine.mean()


def test_hidden_sparsity_without_calibration_is_a_usage_error(tmp_path):
    out = tmp_path / "out.onnx"
    proc = cli(SAMPLES / "transformers" / "vit_legacy.onnx", out, "--hidden-sparsity", "0.3")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--calibration" in lines[0] and "hidden-sparsity" in lines[0]
    assert not out.exists()


def _flatten_model(count_last: bool) -> onnx.ModelProto:
    """Conv -> Reshape(x, target from Shape(x)[:2] = [batch, C]) -> Transpose -> MatMul.

    ``[batch, C, -1]`` is a legacy ``flatten(2)``; ``count_last``: ``[-1, batch, C]`` puts the count on
    another axis than the channels' (an odd reshape, whose channel count would then be stale).
    """
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 2, 2)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2], np.int64), "s1"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    parts, perm = (["minus1", "lead"], [1, 0, 2]) if count_last else (["lead", "minus1"], [0, 2, 1])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2]),
             helper.make_node("Shape", ["c"], ["shp"]),
             helper.make_node("Slice", ["shp", "s0", "s1"], ["lead"]),
             helper.make_node("Concat", parts, ["target"], axis=0),
             helper.make_node("Reshape", ["c", "target"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["tok"], perm=perm),
             helper.make_node("MatMul", ["tok", "head"], ["y"])]
    graph = helper.make_graph(nodes, "flatten", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_legacy_flatten_reads_its_own_channel_count():
    """The count read from the Conv output's own shape and put back on the same axis follows the pruning."""
    model = _flatten_model(count_last=False)
    result = prune(model, sparsity=0.5, method="prune")
    conv = next(g for g in result.report.groups if g.producers == ["Conv_0"])
    assert (conv.status, conv.channels_after) == ("pruned", 4)
    assert_valid(result.model, model)


def test_channel_count_read_into_another_axis_still_blocks():
    groups = coupling.analyse(model_io.to_graph(_flatten_model(count_last=True))).groups
    conv = next(g for g in groups if g.origin == "Conv_0")
    assert not conv.prunable
