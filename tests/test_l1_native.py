"""The compiled C kernel for L1 cost matrices (``onnx_intrafusion/_l1.c``).

Oracle: ``np.abs(x[:, None] - y[None]).sum(-1)``, written here, on shapes that
exercise every branch of the loop (blocks of 32 rows of y, groups of four and
the remainder, empty axes).
"""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest

from onnx_intrafusion import plans


def native_or_skip():
    """The kernel; a failure where a C compiler exists (the optional build should then have worked)."""
    kernel = plans._native_kernel()
    if kernel is None:
        compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
        if shutil.which(compiler):
            pytest.fail(f"the C extension onnx_intrafusion._l1 was not built although {compiler} exists: "
                        "see the output of pip install -e . for the compiler error")
        pytest.skip("no C compiler here: the C extension is not built, numba or SciPy compute the costs")
    return kernel


@pytest.mark.parametrize("n, m, f", [(1, 1, 1), (3, 4, 5), (7, 33, 17), (40, 70, 129), (9, 5, 33), (5, 3, 0), (0, 9, 4),
                                     (6, 0, 4)])
def test_native_l1_is_the_sum_of_absolute_differences(n, m, f):
    kernel = native_or_skip()
    rng = np.random.default_rng(n * 100 + m * 10 + f)
    x, y = rng.standard_normal((n, f)), rng.standard_normal((m, f))
    out = np.full((n, m), np.nan)
    kernel(x, y, out)
    np.testing.assert_allclose(out, np.abs(x[:, None, :] - y[None, :, :]).sum(-1), rtol=1e-13, atol=1e-13)


def test_native_l1_reads_non_contiguous_inputs_and_refuses_a_wrong_output():
    kernel = native_or_skip()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 12))[:, ::2]  # strided
    y = rng.standard_normal((12, 6)).astype(np.float32)  # other dtype
    out = np.empty((10, 12))
    kernel(x, y, out)
    np.testing.assert_allclose(out, np.abs(x[:, None] - y[None].astype(np.float64)).sum(-1), rtol=1e-13)
    for bad in (np.empty((10, 11)), np.empty((10, 12), np.float32), np.empty((12, 10)).T):
        with pytest.raises(ValueError):
            kernel(x, y, bad)
    with pytest.raises(ValueError):
        kernel(x, rng.standard_normal((12, 7)), out)


def test_native_extension_checks_buffer_sizes():
    native_or_skip()
    from onnx_intrafusion import _l1

    x, y, out = np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2))
    with pytest.raises(ValueError, match="smaller"):
        _l1.l1(x, y, out, 3, 2, 3)  # more rows than x holds
    with pytest.raises(TypeError):
        _l1.l1(x, y, out.tobytes(), 2, 2, 3)  # read-only output


def test_native_kernel_is_the_default_and_costs_match_scipy(monkeypatch):
    kernel = native_or_skip()
    assert plans._l1_kernel() is kernel and plans.use_compiled(0.0)
    calls = []
    monkeypatch.setattr(plans, "_native_kernel", lambda: (lambda x, y, out: calls.append(1) or kernel(x, y, out)))
    monkeypatch.setattr(plans, "COMPILED_COST_WORK", 0)
    rng = np.random.default_rng(3)
    feats = plans.normalised_features([rng.standard_normal((90, 50))])
    kept = np.sort(rng.choice(90, 40, replace=False))
    fast = plans.cost_matrix(feats, kept, removed_only=True)
    assert calls
    slow = plans.cost_matrix(feats, kept, compiled=False, removed_only=True)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-13)
