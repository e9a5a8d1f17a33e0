"""The exact transport plan solved on the removed channels only equals the plan of the whole problem.

Oracle: ``ot.emd`` on the full C x k cost matrix (the textbook problem, no
reduction), on random features and on features with exact duplicates.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnx_intrafusion import plans
from onnx_intrafusion.errors import UsageError
from onnx_intrafusion.options import Options


def _full_plan(feats, kept, mass=None, p=1.0):
    ot = plans.import_pot()
    size = len(feats)
    a = np.full(size, 1.0 / size) if mass is None else mass / mass.sum()
    b = np.full(len(kept), 1.0 / len(kept)) if mass is None else a[kept] / a[kept].sum()
    cost = plans.cost_matrix(feats, kept, p)
    return ot.emd(a, b, cost), cost


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("marginals", ["uniform", "importance"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_reduced_plan_has_the_optimal_cost_and_is_the_full_plan(seed, marginals, p):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(6, 60))
    keep = int(rng.integers(1, size))
    dims = int(rng.integers(2, 30))
    feats = plans.normalised_features([rng.standard_normal((size, dims))])
    kept = np.sort(rng.choice(size, keep, replace=False))
    mass = rng.random(size) + 0.05 if marginals == "importance" else None
    full, cost = _full_plan(feats, kept, mass, p)
    removed = plans.cost_matrix(feats, kept, p, removed_only=True)
    others = np.setdiff1d(np.arange(size), kept)
    assert np.array_equal(removed, cost[others])
    reduced = plans.plan_from_removed_cost(removed, kept, size, mass)
    np.testing.assert_allclose(reduced.sum(axis=1), full.sum(axis=1), atol=1e-12)  # source marginals
    np.testing.assert_allclose(reduced.sum(axis=0), full.sum(axis=0), atol=1e-12)  # target marginals
    assert abs((reduced * cost).sum() - (full * cost).sum()) <= 1e-12 * max(1.0, (full * cost).sum())
    assert np.allclose(np.diag(reduced[kept]), (mass / mass.sum() if mass is not None else np.full(size, 1 / size))[kept])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_reduced_plan_is_the_full_plan_on_wide_features(seed, p):
    """Channel features are long (hundreds of weights): the optimum is unique and both solvers find it.
    (In a few dimensions L1 has ties, where the reduced plan is another optimal one: see above.)"""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(10, 80))
    kept = np.sort(rng.choice(size, int(rng.integers(1, size)), replace=False))
    feats = plans.normalised_features([rng.standard_normal((size, 200))])
    full, cost = _full_plan(feats, kept, None, p)
    cmap = plans.fusion(feats, kept, p=p)
    np.testing.assert_allclose(cmap.average, plans.fusion_from_cost(cost, kept).average, atol=1e-12)
    np.testing.assert_allclose(cmap.total, plans.fusion_from_cost(cost, kept).total, atol=1e-12)


def test_duplicated_channels_merge_into_their_kept_twin():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((5, 8))
    feats = plans.normalised_features([np.concatenate([base, base])])  # channel i + 5 duplicates channel i
    kept = np.arange(5)
    cmap = plans.fusion(feats, kept)
    np.testing.assert_allclose(cmap.average, np.hstack([np.eye(5), np.eye(5)]) / 2, atol=1e-12)
    np.testing.assert_allclose(cmap.total, np.hstack([np.eye(5), np.eye(5)]), atol=1e-12)


def test_sinkhorn_still_uses_the_whole_cost_matrix():
    rng = np.random.default_rng(2)
    feats = plans.normalised_features([rng.standard_normal((20, 6))])
    kept = np.arange(0, 20, 2)
    cost = plans.cost_matrix(feats, kept)
    got = plans.fusion(feats, kept, reg=0.05)
    np.testing.assert_allclose(got.average, plans.fusion_from_cost(cost, kept, None, 0.05).average)


def test_cost_kernel_choice(monkeypatch):
    monkeypatch.setattr(plans, "_NATIVE_KERNEL", False)  # only numba's kernel: large runs only
    assert not plans.use_compiled(1e10) and plans.use_compiled(5e10)
    monkeypatch.setattr(plans, "_NATIVE_KERNEL", lambda x, y, out: None)  # the C extension: every run
    assert plans.use_compiled(0) and not plans.use_compiled(1e12, "scipy")
    assert plans.use_compiled(0, "compiled") and not plans.use_compiled(1e12, "scipy")
    assert Options(cost_kernel="scipy").resolve(False).cost_kernel == "scipy"
    assert Options().resolve(False).cost_kernel == "auto"
    assert Options(method="prune").resolve(False).cost_kernel is None
    with pytest.raises(UsageError, match="cost-kernel"):
        Options(method="prune", cost_kernel="compiled").resolve(False)
    with pytest.raises(UsageError):
        Options(cost_kernel="gpu").resolve(False)


def test_compiled_kernel_asked_for_without_numba_warns_and_uses_scipy(monkeypatch):
    from conftest import sample

    from onnx_intrafusion import prune
    from onnx_intrafusion.errors import PruneWarning

    monkeypatch.setattr(plans, "_NATIVE_KERNEL", False)  # as when the C extension was not built
    monkeypatch.setattr(plans, "_NUMBA_KERNEL", False)  # and numba does not import
    with pytest.warns(PruneWarning, match="numba is not installed"):
        got = prune(str(sample("vgg_legacy.onnx")), 0.5, cost_kernel="compiled", validate=False)
    want = prune(str(sample("vgg_legacy.onnx")), 0.5, cost_kernel="scipy", validate=False)
    assert got.model.SerializeToString() == want.model.SerializeToString()


def test_pot_is_imported_without_torch_sklearn_or_networkx_and_they_stay_importable():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from onnx_intrafusion import plans\n"
        "ot = plans.import_pot()\n"
        "assert hasattr(ot, 'emd') and hasattr(ot, 'sinkhorn')\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'networkx') if sys.modules.get(m) is not None))\n"
        "import importlib.util\n"
        "print(all(sys.modules.get(m, 0) is not None for m in ('sklearn', 'networkx')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # none of them was imported by POT
    assert out[1] == "True"  # and none is left marked as missing for the user's own imports
