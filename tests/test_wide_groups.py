"""Wide groups without whole copies: rows in column blocks, streamed L1 costs, weights mixed in blocks.

Oracles: the whole-matrix computations these replace (``coupling.channel_rows``,
``plans.cost_matrix`` on ``plans.normalised_features``, the unblocked mix),
run by the test on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import sample
from scipy import sparse

from onnx_intrafusion import coupling, importance, model_io, planning, plans, rewrite


def _graph_values(name: str):
    loaded = model_io.load_model(sample(name), keep_mapped=True)
    graph = model_io.to_graph(loaded.model)
    analysis = coupling.analyse(graph)
    values = model_io.WeightValues(graph, {m.constant for g in analysis.groups for m in g.members})
    return analysis, values


@pytest.mark.parametrize("name", ["vgg_legacy.onnx", "resnet_dynamo.onnx"])
def test_member_rows_in_blocks_hold_the_whole_rows(monkeypatch, name):
    monkeypatch.setattr(planning, "BLOCK_BYTES", 4096)  # many blocks even on small samples
    analysis, values = _graph_values(name)
    for group in analysis.prunable():
        scored, features = planning.group_rows(group, values)
        for rows in features:
            whole = coupling.channel_rows(values[rows.member.constant], rows.member, group.size)
            assert np.array_equal(np.asarray(rows), whole)
            blocks = list(rows.blocks())
            assert sum(b.shape[1] for b in blocks) == whole.shape[1] == rows.shape[1]
            # the same columns, in another order: per-channel sums and sorted values agree
            joined = np.concatenate(blocks, axis=1)
            assert np.array_equal(np.sort(joined, axis=1), np.sort(whole, axis=1))
        for metric in ("l1", "l2", "linf"):
            monkeypatch.setattr(importance, "BLOCKWISE_BYTES", 0)
            blockwise = importance.group_scores(scored, metric)
            monkeypatch.setattr(importance, "BLOCKWISE_BYTES", 2**62)
            np.testing.assert_allclose(blockwise, importance.group_scores(scored, metric), rtol=1e-12)


def test_streamed_costs_equal_the_feature_matrix_costs():
    rng = np.random.default_rng(0)
    members = [rng.standard_normal((40, w)).astype(np.float32) for w in (7, 300, 64)]
    kept = np.sort(rng.choice(40, 15, replace=False))
    want = plans.cost_matrix(plans.normalised_features(list(members)), kept, removed_only=True)

    def blocks():
        for m in members:
            for start in range(0, m.shape[1], 50):
                yield m[:, start:start + 50]

    got = plans.removed_cost_in_blocks(blocks, kept, 40)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_streamed_plans_equal_the_whole_matrix_plans(monkeypatch):
    analysis, values = _graph_values("vgg_legacy.onnx")
    whole = planning.plan_groups(analysis, values, 0.5, "intrafusion", "l1")
    monkeypatch.setattr(planning, "STREAM_FEATURE_BYTES", 0)
    monkeypatch.setattr(planning, "BLOCK_BYTES", 8192)
    streamed = planning.plan_groups(analysis, values, 0.5, "intrafusion", "l1")
    assert whole.keys() == streamed.keys()
    for gid in whole:
        np.testing.assert_allclose(streamed[gid].average, whole[gid].average, atol=1e-12)
        np.testing.assert_allclose(streamed[gid].total, whole[gid].total, atol=1e-12)


@pytest.mark.parametrize("kind", ["selection", "sparse_plan", "dense"])
def test_mixing_in_blocks_gives_the_same_weights(monkeypatch, kind):
    rng = np.random.default_rng(1)
    part = rng.standard_normal((30, 1, 40, 3, 3)).astype(np.float32)
    if kind == "selection":
        matrix = plans.selection(30, np.arange(0, 30, 2)).matrix(consumer=False)
    elif kind == "sparse_plan":
        feats = plans.normalised_features([rng.standard_normal((30, 12))])
        matrix = plans.fusion(feats, np.arange(0, 30, 2)).matrix(consumer=True)
    else:
        matrix = rng.random((15, 30))
    want = rewrite._mix(matrix, part)
    monkeypatch.setattr(rewrite, "MIX_BLOCK_BYTES", 1000)
    got = rewrite._mix(matrix, part)
    if kind == "dense":
        np.testing.assert_allclose(got, want, rtol=1e-12)
    else:
        assert sparse.issparse(matrix) and np.array_equal(got, want)


def test_a_pruned_model_is_the_same_with_blocked_rewrites(monkeypatch):
    model = onnx.load(str(sample("vgg_legacy.onnx")))
    from onnx_intrafusion import prune

    want = prune(model, 0.5).model.SerializeToString()
    monkeypatch.setattr(rewrite, "MIX_BLOCK_BYTES", 1000)
    assert prune(model, 0.5).model.SerializeToString() == want


def test_features_read_lazy_rows_once_and_free_each_after_copying():
    """``normalised_features`` takes objects that read their rows only when copied and lets
    each go before reading the next (oracle: concatenation and row norms written here)."""
    import weakref

    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((12, w)).astype(np.float32) for w in (3, 7, 5)]
    alive, reads = [], []

    class Lazy:
        def __init__(self, i):
            self.i, self.shape = i, arrays[i].shape

        def __array__(self, dtype=None, copy=None):
            reads.append((self.i, sum(ref() is not None for ref in alive)))
            return arrays[self.i]

    rows = [Lazy(i) for i in range(3)]
    alive.extend(weakref.ref(r) for r in rows)
    feats = plans.normalised_features(rows)
    assert rows == [] and all(ref() is None for ref in alive)
    assert reads == [(0, 3), (1, 2), (2, 1)]  # read once each, the earlier ones already freed
    want = np.concatenate(arrays, axis=1).astype(np.float64)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(feats, want, rtol=1e-12)
