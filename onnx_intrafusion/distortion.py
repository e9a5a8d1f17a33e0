"""How far a model's outputs moved: one number that every data-aware step compares.

Recovery (keep the better of before/after), distillation (keep the best
epoch) and sensitivity analysis (rank groups) all need the same answer to
"how much worse is this model than the original on held-back inputs", so it
is defined once, here, in pure numpy.

* Class scores (an output of shape ``[N, C]`` with ``C >= 2``): the mean
  KL divergence ``KL(softmax(reference) || softmax(candidate))`` over samples,
  which is what a classifier's user feels (agreement of the predicted
  distribution) and is insensitive to a constant shift of the logits.
* Anything else (embeddings, feature maps, regression outputs): the relative
  squared error ``||candidate - reference||^2 / ||reference||^2``.

Several outputs: the mean of the per-output numbers.  Non-float outputs
(indices, masks) are compared exactly (fraction of differing entries).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def is_class_scores(arr: np.ndarray) -> bool:
    """``[N, C]`` float outputs with C >= 2 are read as logits (or probabilities)."""
    return arr.ndim == 2 and arr.shape[1] >= 2 and np.issubdtype(arr.dtype, np.floating)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(candidate)), in nats."""
    lp, lq = _log_softmax(reference), _log_softmax(candidate)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def relative_squared_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.astype(np.float64, copy=False)
    diff = candidate.astype(np.float64, copy=False) - ref
    denom = float(np.sum(ref * ref))
    num = float(np.sum(diff * diff))
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def output_distortion(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    """Distortion of ``candidate`` outputs against ``reference`` ones (same keys); 0 = identical."""
    if set(reference) != set(candidate):
        raise ValueError(f"outputs differ: {sorted(reference)} vs {sorted(candidate)}")
    if not reference:
        return 0.0
    values = []
    for name, ref in reference.items():
        ref, cand = np.asarray(ref), np.asarray(candidate[name])
        if ref.shape != cand.shape:
            raise ValueError(f"output '{name}' has shape {list(cand.shape)}, expected {list(ref.shape)}")
        if not np.issubdtype(ref.dtype, np.floating):
            values.append(float(np.mean(ref != cand)) if ref.size else 0.0)
        elif not np.all(np.isfinite(cand)):
            values.append(float("inf"))
        elif is_class_scores(ref):
            values.append(kl_divergence(ref, cand))
        else:
            values.append(relative_squared_error(ref, cand))
    return float(np.mean(values))


def measure_name(reference: Mapping[str, np.ndarray]) -> str:
    """What :func:`output_distortion` computes for these outputs, for reports."""
    kinds = {"KL" if is_class_scores(np.asarray(v)) else "relative squared error" for v in reference.values()}
    return " / ".join(sorted(kinds)) or "none"
