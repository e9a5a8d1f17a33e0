"""Fast paths give the same results as the plain ones; speed options (round-to, global allocation)."""

from __future__ import annotations

import numpy as np
import onnx
import ot
import pytest

from onnx_intrafusion import model_io, plans, prune, rewrite
from onnx_intrafusion.plans import keep_count

from conftest import assert_valid, sample


# -- exact OT: the fast cost matrix gives the plan of plain POT ----------------------------------

@pytest.mark.parametrize("size, keep, dim, p", [(12, 6, 5, 1), (40, 13, 30, 1), (64, 32, 200, 1),
                                                (30, 21, 7, 2), (25, 10, 9, 3)])
def test_fast_cost_gives_the_plain_pot_plan(size, keep, dim, p):
    rng = np.random.default_rng(size * keep + dim)
    feats = plans.normalised_features([rng.standard_normal((size, dim))])
    kept = np.sort(rng.choice(size, keep, replace=False))
    reference_cost = ot.dist(feats, feats[kept], metric="minkowski", p=p)
    np.testing.assert_allclose(plans.cost_matrix(feats, kept, p), reference_cost, rtol=1e-12, atol=1e-12)
    a, b = np.full(size, 1 / size), np.full(keep, 1 / keep)
    expected = ot.emd(a, b, reference_cost)
    np.testing.assert_array_equal(plans.transport_plan(feats, kept, p=p), expected)


def test_threaded_cost_matrix_is_bitwise_the_serial_one(monkeypatch):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 50))
    kept = np.arange(0, 300, 3)
    serial = plans.cost_matrix(feats, kept)
    monkeypatch.setattr(plans, "PARALLEL_COST_WORK", 0)
    monkeypatch.setattr(plans, "_threads", lambda: 3)
    np.testing.assert_array_equal(plans.cost_matrix(feats, kept), serial)


def test_sparse_rewrite_matches_dense_product():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((6, 10, 3)).astype(np.float32)
    feats = plans.normalised_features([rng.standard_normal((10, 4))])
    cmap = plans.fusion(feats, np.array([1, 4, 7, 8]))
    out = rewrite._apply_axis(values, 1, [(0, 1, cmap.average)])
    dense = np.einsum("kc,acb->akb", cmap.average, values.astype(np.float64))
    np.testing.assert_allclose(out, dense, rtol=1e-12, atol=1e-12)


def test_weightless_shape_inference_equals_full_inference():
    model = onnx.load(str(sample("resnet_legacy.onnx")))
    full = onnx.shape_inference.infer_shapes(model, data_prop=True)
    fast = model_io.infer_shapes_fast(onnx.load(str(sample("resnet_legacy.onnx"))), data_prop=True)
    assert [v.SerializeToString() for v in fast.graph.value_info] == \
        [v.SerializeToString() for v in full.graph.value_info]
    assert fast.graph.initializer[0].SerializeToString() == model.graph.initializer[0].SerializeToString()


# -- round-to --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 15, 16, 17, 64, 100, 2048])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("round_to", [1, 2, 8, 16, 64])
def test_keep_count_is_in_range_and_a_multiple(size, sparsity, round_to):
    keep = keep_count(size, sparsity, round_to)
    assert 1 <= keep <= size
    if sparsity == 0:
        assert keep == size
    # A multiple of round_to whenever the group has room for one (else the whole group).
    if size >= round_to:
        assert keep % round_to == 0 or keep == size
    else:
        assert keep == size or round_to == 1


def test_round_to_prunes_to_multiples():
    result = prune(sample("resnet_legacy.onnx"), sparsity=0.5, round_to=8)
    assert_valid(result.model, onnx.load(str(sample("resnet_legacy.onnx"))))
    for g in result.report.pruned_groups:
        assert g.channels_after % 8 == 0 or g.channels_after == g.channels_before


def test_cli_round_to(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "onnx_intrafusion", str(sample("vgg_legacy.onnx")), str(out),
                           "--sparsity", "0.4", "--round-to", "16", "--report", str(rep), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert report["options"]["round_to"] == 16
    after = [g["channels_after"] for g in report["groups"] if g["status"] == "pruned"]
    assert after and all(n % 16 == 0 for n in after)
    bad = subprocess.run([sys.executable, "-m", "onnx_intrafusion", str(sample("vgg_legacy.onnx")), str(out),
                          "--round-to", "0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "round-to" in bad.stderr
