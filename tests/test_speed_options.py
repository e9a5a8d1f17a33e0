"""Fast paths give the same results as the plain ones; speed options (round-to, global allocation)."""

from __future__ import annotations

import numpy as np
import onnx
import ot
import pytest

from onnx_intrafusion import model_io, plans, prune, rewrite
from onnx_intrafusion.plans import keep_count
from onnx_intrafusion.errors import NothingToPrune

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


@pytest.mark.parametrize("size", [1, 3, 8, 15, 16, 17, 24, 40, 100, 144, 2048])
@pytest.mark.parametrize("sparsity", [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("round_to", [1, 8, 16])
def test_keep_count_is_the_nearest_count_a_group_may_keep(size, sparsity, round_to):
    """Oracle by enumeration: multiples of round_to up to the size, and the whole group; ties go up."""
    wanted = max(1, int(np.floor((1 - sparsity) * size + 0.5)))
    allowed = sorted({size, *range(round_to, size + 1, round_to)}) if round_to > 1 else range(1, size + 1)
    want = min(allowed, key=lambda k: (abs(k - wanted), -k))
    assert keep_count(size, sparsity, round_to) == want
    assert keep_count(24, 0.1, 16) == 24 and keep_count(24, 0.3, 16) == 16


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


# -- global allocation -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet_legacy.onnx", "mobilenetv2_dynamo.onnx", "vgg_legacy.onnx"])
@pytest.mark.parametrize("method", ["intrafusion", "prune"])
def test_global_macs_target_is_reached_and_model_valid(name, method, load):
    result = prune(sample(name), sparsity=0.5, method=method, allocation="global")
    assert_valid(result.model, load(name))
    rep = result.report
    assert rep.options["allocation"] == "global" and rep.options["global_target"] == "macs"
    kept = rep.macs_after / rep.macs_before
    assert 0.47 <= kept <= 0.5 + 1e-9
    sizes = sorted({g.channels_after / g.channels_before for g in rep.pruned_groups})
    assert len(sizes) > 1, "global allocation should prune groups by different fractions"
    assert all(g.channels_after >= 0.1 * g.channels_before for g in rep.groups)


@pytest.mark.parametrize("cap", [0.3, 0.6, 0.9])
def test_global_channels_target_and_cap(cap):
    rep = prune(sample("resnet_legacy.onnx"), sparsity=0.5, allocation="global", global_target="channels",
                max_group_sparsity=cap, validate=False).report
    rows = [g for g in rep.groups if g.status in ("pruned", "unchanged")]
    before, after = sum(g.channels_before for g in rows), sum(g.channels_after for g in rows)
    for g in rows:
        assert g.channels_after >= int(np.ceil((1 - cap) * g.channels_before - 1e-9))
    if cap >= 0.5:
        assert after == before - int(np.ceil(0.5 * before - 1e-9))
    else:  # out of reach: everything the cap allows is removed
        assert all(g.channels_after == int(np.ceil((1 - cap) * g.channels_before - 1e-9)) for g in rows)


def test_global_allocation_prefers_weak_channels():
    """Two groups: one with a few strong channels and many weak ones loses more."""
    from onnx_intrafusion.allocation import global_keeps
    from onnx_intrafusion.coupling import Analysis

    uneven = np.array([5.0] * 4 + [0.1] * 12)
    uneven /= uneven.mean()
    even = np.ones(16) + np.linspace(-0.05, 0.05, 16)
    analysis = Analysis(groups=[], axes={}, fixes=[], space_group={})
    keeps = global_keeps(analysis, {0: uneven, 1: even}, 0.5, target="channels", max_group_sparsity=0.9)
    assert keeps[0] < keeps[1] and keeps[0] + keeps[1] == 16
    assert keeps[0] >= 2  # cap: at most 90% of 16 removed -> at least 2 kept
    rounded = global_keeps(analysis, {0: uneven, 1: even}, 0.5, target="channels", round_to=4)
    assert all(k % 4 == 0 for k in rounded.values())


def test_global_sparsity_zero_changes_nothing(load):
    result = prune(sample("resnet_legacy.onnx"), sparsity=0.0, allocation="global", allow_unchanged=True)
    assert not result.report.pruned_groups
    with pytest.raises(NothingToPrune, match="sparsity 0"):
        prune(sample("resnet_legacy.onnx"), sparsity=0.0, allocation="global")


@pytest.mark.parametrize("kwargs, words", [({"allocation": "magic"}, "allocation"),
                                           ({"allocation": "global", "global_target": "flops"}, "global target"),
                                           ({"allocation": "global", "max_group_sparsity": 1.0},
                                            "max-group-sparsity"),
                                           ({"global_target": "macs"}, "only applies to global"),
                                           ({"max_group_sparsity": 0.5}, "only applies to global")])
def test_global_option_errors(kwargs, words):
    from onnx_intrafusion.errors import UsageError

    with pytest.raises(UsageError, match=words):
        prune(sample("vgg_legacy.onnx"), **kwargs)


def test_cli_global(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "onnx_intrafusion", str(sample("resnet_legacy.onnx")), str(out),
                           "--sparsity", "0.4", "--global", "--max-group-sparsity", "0.8", "--report", str(rep),
                           "--quiet", "--target", "none"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    assert report["options"]["allocation"] == "global" and report["options"]["max_group_sparsity"] == 0.8
    assert 0.57 <= report["macs"]["after"] / report["macs"]["before"] <= 0.6 + 1e-9


def test_progress_names_wide_groups(monkeypatch):
    from onnx_intrafusion import planning

    messages: list[str] = []
    prune(sample("resnet_legacy.onnx"), sparsity=0.5, validate=False, progress=messages.append)
    assert [m for m in messages if m.endswith(" ...")] == ["load ...", "groups ...", "plan ...", "rewrite ...",
                                                          "stats ..."]
    monkeypatch.setattr(planning, "PROGRESS_WIDE_GROUP", 16)
    messages.clear()
    rep = prune(sample("resnet_legacy.onnx"), sparsity=0.5, validate=False, progress=messages.append).report
    groups = [m for m in messages if m.startswith("  group ")]
    assert len(groups) == len(rep.pruned_groups) and "-> " in groups[0]


@pytest.mark.parametrize("size, keep", [(50, 25), (50, 35), (50, 5), (9, 9)])
def test_cost_matrix_is_bitwise_plain_cdist(size, keep):
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(size + keep)
    feats = plans.normalised_features([rng.standard_normal((size, 17))])
    kept = np.sort(rng.choice(size, keep, replace=False))
    np.testing.assert_array_equal(plans.cost_matrix(feats, kept), cdist(feats, feats[kept], "cityblock"))
    repeated = np.array([3, 3, 7])  # duplicates: no symmetric shortcut
    np.testing.assert_array_equal(plans.cost_matrix(feats, repeated), cdist(feats, feats[repeated], "cityblock"))


# -- compiled L1 cost matrix (numba): the cdist values, the same transport plans ------------------

@pytest.mark.parametrize("kernel", ["native", "numba"])
@pytest.mark.parametrize("size, keep, dim", [(64, 32, 300), (129, 45, 77), (200, 133, 513)])
def test_compiled_l1_cost_gives_the_cdist_plan(monkeypatch, size, keep, dim, kernel):
    if kernel == "numba":
        pytest.importorskip("numba", reason="numba (the 'fast' extra) not installed: only the SciPy path runs here")
        monkeypatch.setattr(plans, "_NATIVE_KERNEL", False)
    else:
        from test_l1_native import native_or_skip

        native_or_skip()
        monkeypatch.setattr(plans, "_NUMBA_KERNEL", False)
    rng = np.random.default_rng(size + keep)
    feats = plans.normalised_features([rng.standard_normal((size, dim))])
    kept = np.sort(rng.choice(size, keep, replace=False))
    reference = ot.dist(feats, feats[kept], metric="minkowski", p=1)  # POT, independent of both paths
    monkeypatch.setattr(plans, "COMPILED_COST_WORK", 0)
    monkeypatch.setattr(plans, "_threads", lambda: 3)
    fast = plans.cost_matrix(feats, kept)
    np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)
    assert np.all(fast[kept, np.arange(keep)] == 0.0)
    a, b = np.full(size, 1 / size), np.full(keep, 1 / keep)
    np.testing.assert_array_equal(plans.transport_plan(feats, kept), ot.emd(a, b, reference))


def test_compiled_path_is_used_only_for_large_l1_matrices(monkeypatch):
    calls = []
    monkeypatch.setattr(plans, "_compiled_cost", lambda kernel, x, y: calls.append(x.shape) or np.zeros((len(x), len(y))))
    monkeypatch.setattr(plans, "_l1_kernel", lambda: object())
    feats = np.random.default_rng(0).standard_normal((40, 10))
    plans.cost_matrix(feats, np.arange(20))  # small: SciPy
    plans.cost_matrix(feats, np.arange(20), p=2)
    assert calls == []
    monkeypatch.setattr(plans, "COMPILED_COST_WORK", 1)
    plans.cost_matrix(feats, np.arange(20), p=2)  # not L1: SciPy
    plans.cost_matrix(feats, np.arange(20))
    assert calls == [(40, 10)]
