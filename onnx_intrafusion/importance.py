"""Stage 3: per-channel importance of a group.

Pure functions on arrays.  A group's channels live in several weights
(producers' output filters, consumers' input slices); each weight scores every
channel, the scores of one weight are divided by their mean so that a wide
layer does not outvote a narrow one, and the group score is the mean over
weights (as Torch-Pruning's group importance and the Intra-Fusion reference).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Metric = Callable[[np.ndarray], np.ndarray]


def _l1(rows: np.ndarray) -> np.ndarray:
    return np.abs(rows).sum(axis=1)


def _l2(rows: np.ndarray) -> np.ndarray:
    return np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1))


def _linf(rows: np.ndarray) -> np.ndarray:
    return np.abs(rows).max(axis=1)


#: Weight-based metrics: (channels, features) matrix -> score per channel.
METRICS: dict[str, Metric] = {"l1": _l1, "l2": _l2, "linf": _linf}

#: Every name accepted by :func:`group_scores`.
IMPORTANCES = (*METRICS, "random")


def group_scores(rows: Sequence[np.ndarray], importance: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Score each channel of a group from the per-weight channel matrices ``rows``.

    ``rows[i]`` has shape (channels, features_i): an array, or an object that
    ``np.asarray`` turns into one and that can also give its columns in
    blocks (``.blocks()``, ``.nbytes64``; wide ones are scored block by
    block).  ``random`` draws from ``rng`` (seeded by the caller, so results
    are reproducible).
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance '{importance}' (choose from {', '.join(IMPORTANCES)})")
    size = rows[0].shape[0]
    if importance == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        return rng.random(size)
    metric = METRICS[importance]
    total = np.zeros(size, dtype=np.float64)
    for r in rows:
        s = _blockwise(r, importance) if _too_wide(r) else metric(np.asarray(r, dtype=np.float64))
        mean = s.mean()
        total += s / mean if mean > 0 else s
    return total / len(rows)


#: Rows larger than this (as float64) are scored block by block when they can give blocks.
BLOCKWISE_BYTES = 32 * 2**20


def _too_wide(rows) -> bool:
    return hasattr(rows, "blocks") and getattr(rows, "nbytes64", 0) > BLOCKWISE_BYTES


def _blockwise(rows, importance: str) -> np.ndarray:
    """A metric over column blocks (``rows.blocks()``): sums and maxima combine across blocks."""
    acc = None
    for block in rows.blocks():
        block = np.asarray(block, dtype=np.float64)
        part = np.square(block).sum(axis=1) if importance == "l2" else METRICS[importance](block)
        acc = part if acc is None else (np.maximum(acc, part) if importance == "linf" else acc + part)
    return np.sqrt(acc) if importance == "l2" else acc


def top_k(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` highest scores, in ascending channel order.

    Ties go to the lower index (stable sort), so results are deterministic.
    """
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:keep])
