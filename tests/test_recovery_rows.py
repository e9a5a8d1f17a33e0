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
