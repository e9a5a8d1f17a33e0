"""Recovery samples at most ``per_image`` target rows per image, whatever the axis order of the layer's output."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_intrafusion import activations, recovery


def _matmul_layer(features: int) -> activations._Layer:
    lin = recovery.from_node("MatMul", np.eye(features, dtype=np.float32), None, {})
    stats = recovery.Stats(1, features, features, fit_bias=False)
    layer = activations._Layer(0, None, lin, None, "y", False, None, stats, stats)
    layer.rng = np.random.default_rng(0)
    return layer


@pytest.mark.parametrize("layout", ["batch_first", "sequence_first"])
def test_rows_per_image_cap_holds_for_both_layouts(layout):
    images, tokens, features, per_image = 2, 50, 4, 10
    shape = (images, tokens, features) if layout == "batch_first" else (tokens, images, features)
    y = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    feed = {"pixels": np.zeros((images, 3, 8, 8), np.float32)}
    layer = _matmul_layer(features)
    layer.select(0, y, feed, per_image, masks=[])
    rows, targets, _ = layer.selected[0]
    assert len(rows) == images * per_image == targets.shape[0]
    # the chosen rows are real rows of the flattened output, each once
    flat = y.reshape(-1, features)
    assert len(set(rows.tolist())) == len(rows)
    np.testing.assert_array_equal(targets, flat[rows])


def test_all_rows_kept_below_the_cap():
    layer = _matmul_layer(4)
    y = np.ones((30, 2, 4), np.float32)  # 60 rows, cap 2 images x 40
    layer.select(0, y, {"pixels": np.zeros((2, 3), np.float32)}, 40, masks=[])
    rows, targets, _ = layer.selected[0]
    assert rows is None and targets.shape == (60, 4)


def test_selection_map_targets_are_the_kept_columns_exactly():
    rng = np.random.default_rng(1)
    kept = np.array([4, 0, 7, 2])
    sel = np.zeros((4, 9))
    sel[np.arange(4), kept] = 1.0
    y = rng.standard_normal((50, 9)).astype(np.float32)
    cols = activations._selected_columns(sel)
    np.testing.assert_array_equal(cols, kept)
    # bitwise the product the fit used before: one 1 per row, zeros elsewhere
    assert np.array_equal(y[:, cols].astype(np.float64), y.astype(np.float64) @ sel.T)


@pytest.mark.parametrize("kind", ["average", "scaled", "identity_none"])
def test_other_maps_are_not_treated_as_selections(kind):
    if kind == "identity_none":
        assert activations._selected_columns(None) is None
        return
    m = np.zeros((2, 4))
    if kind == "average":  # Intra-Fusion's transport average mixes channels
        m[0, :2] = 0.5
        m[1, 2] = 1.0
    else:
        m[0, 1], m[1, 3] = 2.0, 1.0
    assert activations._selected_columns(m) is None


def test_stored_targets_hold_only_kept_columns():
    sel = np.zeros((2, 6))
    sel[[0, 1], [5, 1]] = 1.0
    lin = recovery.from_node("MatMul", np.eye(4, dtype=np.float32), None, {})
    stats = recovery.Stats(1, 4, 2, fit_bias=False)
    layer = activations._Layer(0, None, lin, None, "y", False, sel, stats, stats)
    layer.rng = np.random.default_rng(0)
    y = np.arange(3 * 6, dtype=np.float32).reshape(1, 3, 6)
    layer.select(0, y, {"x": np.zeros((1, 3, 4), np.float32)}, 10, masks=[])
    rows, targets, _ = layer.selected[0]
    np.testing.assert_array_equal(targets, y[0][:, [5, 1]])
    assert layer.target_bytes(10) == 10 * 2 * 4
