"""On real data (scikit-learn's bundled digits), Intra-Fusion keeps more accuracy than plain pruning.

The paper's protocol: one group at a time, the group nearest the output,
50% of its channels removed, no fine-tuning.  The model was trained here
(samples/train.py) and reaches 99.1% on the fixed test split.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from onnx_intrafusion import prune

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from datasets import load_digits_split  # noqa: E402

MODEL = ROOT / "samples" / "digits" / "digits_cnn.onnx"


def accuracy(model, x, y) -> float:
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(logits.argmax(axis=1) == y))


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("test")


def test_intrafusion_beats_plain_pruning_on_the_last_group(digits):
    x, y = digits
    base = accuracy(MODEL, x, y)
    assert base > 0.97
    groups = prune(MODEL, sparsity=0.5, validate=False).report.pruned_groups
    last = groups[-1].id  # the prunable group nearest the output
    acc = {m: accuracy(prune(MODEL, sparsity=0.5, method=m, groups=[last]).model, x, y)
           for m in ("prune", "intrafusion")}
    assert acc["intrafusion"] > acc["prune"] + 0.05, acc
    assert acc["intrafusion"] > 0.95, acc


def test_groups_option_leaves_other_groups_untouched(digits):
    rep = prune(MODEL, sparsity=0.5, groups=[0], validate=False).report
    assert [g.status for g in rep.groups] == ["pruned", "unchanged", "unchanged", "output"]
