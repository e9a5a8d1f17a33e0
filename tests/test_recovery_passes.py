"""Recovery runs the original model once: its slices go in lockstep with the pruned model's waves.

Counted with a wrapper around the segment builder: over a whole recovery,
every node of the original model is in at most one segment (one pass over
the calibration batches), where storing the targets of a few layers per
whole pass (the fallback for feature maps too big to cache, forced here
with a small budget) runs the whole original several times.  Both ways
must give the same recovered weights, the same per-layer decisions and the
same held-back distortion.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from conftest import sample
from test_recovery import _prepared

from onnx_intrafusion import activations, model_io


def _recover(monkeypatch, model, feeds, held, **kwargs):
    runs: collections.Counter = collections.Counter()  # original node index -> segments it was in
    segment = activations._segment

    def counting(m, nodes, inputs, outputs):
        if m is model:
            runs.update(i for i in nodes if m.graph.node[i].op_type != "Constant")
        return segment(m, nodes, inputs, outputs)

    monkeypatch.setattr(activations, "_segment", counting)
    graph, analysis, maps = _prepared(model, 0.5, "intrafusion")
    result = activations.recover(graph, model, analysis, maps, feeds, "lstsq", holdback=held, max_rows=512,
                                 **kwargs)
    monkeypatch.setattr(activations, "_segment", segment)
    solved = {r.node for r in result.layers}
    weights = {n.name: np.asarray(n.inputs[1].values, np.float64) for n in graph.nodes if n.name in solved}
    return weights, result, runs


def _data(name):
    model = model_io.load_model(sample(name)).model
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    batch = shape[0]
    x = np.random.default_rng(0).standard_normal((12 * batch, *shape[1:])).astype(np.float32)
    feeds = [{model.graph.input[0].name: x[i:i + batch]} for i in range(0, len(x), batch)]
    return model, feeds[:9], feeds[9:]


def _same(lockstep, stored):
    weights, result, _ = lockstep
    ref_weights, ref_result, _ = stored
    assert len(weights) > 5 and weights.keys() == ref_weights.keys()
    for node, w in weights.items():
        ref = ref_weights[node]
        assert np.linalg.norm(w - ref) <= 1e-6 * np.linalg.norm(ref) + 1e-9, node
    assert [(r.node, r.kept) for r in result.layers] == [(r.node, r.kept) for r in ref_result.layers]
    assert result.model.kept == ref_result.model.kept
    assert result.model.after == pytest.approx(ref_result.model.after, rel=1e-6, abs=1e-9)


def test_original_runs_once_where_stored_targets_need_more_passes(monkeypatch):
    """A 3 MB budget holds the slices' input tensors but not every layer's target rows."""
    model, feeds, held = _data("transformers/vit_legacy.onnx")
    lockstep = _recover(monkeypatch, model, feeds, held, memory_budget=3_000_000)
    stored = _recover(monkeypatch, model, feeds, held, store_targets=True, memory_budget=3_000_000)
    assert max(lockstep[2].values()) == 1, "an original node ran in two passes"
    assert max(stored[2].values()) >= 2  # the counter sees repeated passes
    assert len(stored[2]) == len(lockstep[2])  # the same part of the original graph is run
    _same(lockstep, stored)


@pytest.mark.parametrize("name", ["transformers/vit_legacy.onnx", "resnet_legacy.onnx"])
def test_lockstep_gives_the_stored_targets_weights(monkeypatch, name):
    model, feeds, held = _data(name)
    lockstep = _recover(monkeypatch, model, feeds, held)
    assert max(lockstep[2].values()) == 1
    _same(lockstep, _recover(monkeypatch, model, feeds, held, store_targets=True))


@pytest.mark.parametrize("name", ["transformers/vit_legacy.onnx", "resnet_legacy.onnx"])
def test_waves_patch_the_written_weights_into_one_export_as_a_fresh_export_would(monkeypatch, name):
    """Oracle: the same recovery with the whole graph exported again for every wave."""
    model, feeds, held = _data(name)
    refreshed = []
    refresh = activations._refresh
    monkeypatch.setattr(activations, "_refresh", lambda m, w: refreshed.append(refresh(m, w)) or refreshed[-1])
    patched = _recover(monkeypatch, model, feeds, held)
    assert any(refreshed), "no wave reused the export"
    monkeypatch.setattr(activations, "_refresh", lambda m, w: False)
    exported = _recover(monkeypatch, model, feeds, held)
    weights, result, _ = patched
    ref_weights, ref_result, _ = exported
    assert weights.keys() == ref_weights.keys() and len(weights) > 5
    for node, w in weights.items():
        np.testing.assert_array_equal(w, ref_weights[node], err_msg=node)
    assert [(r.node, r.kept, r.error_after) for r in result.layers] == \
        [(r.node, r.kept, r.error_after) for r in ref_result.layers]


def test_refresh_refuses_what_it_cannot_patch():
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w]))
    assert activations._refresh(model, [gs.Constant("w", np.full((2, 2), 3, np.float32))])
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.full((2, 2), 3))
    assert not activations._refresh(model, [gs.Constant("other", np.zeros(2, np.float32))])
    assert not activations._refresh(model, [None])
