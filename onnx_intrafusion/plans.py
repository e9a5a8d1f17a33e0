"""Stage 4: one channel map per group.

A :class:`ChannelMap` says how the C old channels of a group become k new
ones, as two k x C matrices applied along the channel axis of every member:

* ``average`` for producers and per-channel parameters: a new channel is the
  transport-weighted *average* of the old channels mapped onto it (rows sum
  to 1);
* ``total`` for consumers: a new channel's input weight is the *sum* of the
  consumer weights of the old channels mapped onto it (columns sum to 1).

Averaging producers and summing consumers is exact on duplicated channels.
The public Intra-Fusion reference sums on both sides, which scales the fused
activations by about C/k; we deliberately do not reproduce that.

Plain pruning is the 0/1 selection; Intra-Fusion is the optimal transport
plan (POT) from all C channels (source) to the k kept ones (target).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot

METHODS = ("intrafusion", "prune")
MARGINALS = ("uniform", "importance")


@dataclass
class ChannelMap:
    kept: np.ndarray  # (k,) indices of the kept channels, ascending
    average: np.ndarray  # (k, C), rows sum to 1
    total: np.ndarray  # (k, C), columns sum to 1

    @property
    def size(self) -> int:
        return self.average.shape[1]

    @property
    def keep(self) -> int:
        return len(self.kept)

    @property
    def is_identity(self) -> bool:
        return self.keep == self.size and np.array_equal(self.average, np.eye(self.size))


def keep_count(size: int, sparsity: float, round_to: int = 1) -> int:
    """Channels kept: ``max(1, round((1 - sparsity) * size))``, optionally a multiple of ``round_to``."""
    keep = int(np.floor((1.0 - sparsity) * size + 0.5))
    if round_to > 1:
        keep = int(round(keep / round_to)) * round_to
    return int(min(size, max(1, keep)))


def selection(size: int, kept: np.ndarray) -> ChannelMap:
    """Plain pruning: keep ``kept``, drop the rest."""
    sel = np.zeros((len(kept), size), dtype=np.float64)
    sel[np.arange(len(kept)), kept] = 1.0
    return ChannelMap(np.asarray(kept), sel, sel.copy())


def normalised_features(rows: list[np.ndarray]) -> np.ndarray:
    """Concatenate a group's per-weight channel rows; scale each channel to unit L2 norm."""
    feats = np.concatenate([np.asarray(r, dtype=np.float64) for r in rows], axis=1)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def transport_plan(features: np.ndarray, kept: np.ndarray, source_mass: np.ndarray | None = None,
                   reg: float = 0.0, p: float = 1.0) -> np.ndarray:
    """Optimal transport plan (C x k) from every channel to the kept channels.

    Ground cost: Minkowski-p distance between the normalised features (p=1 is
    the reference's L1).  ``reg == 0`` solves exactly with ``ot.emd``;
    ``reg > 0`` uses entropic ``ot.sinkhorn`` with the cost scaled to [0, 1],
    so ``reg`` is relative to the largest cost.
    """
    size, keep = features.shape[0], len(kept)
    a = np.full(size, 1.0 / size) if source_mass is None else source_mass / source_mass.sum()
    b = a[kept] / a[kept].sum() if source_mass is not None else np.full(keep, 1.0 / keep)
    cost = ot.dist(features, features[kept], metric="minkowski", p=p)
    if reg > 0:
        scale = cost.max() if cost.max() > 0 else 1.0
        return ot.sinkhorn(a, b, cost / scale, reg, numItermax=10000, warn=False)
    return ot.emd(a, b, cost, numItermax=max(100_000, 20 * size * keep))


def fusion(features: np.ndarray, kept: np.ndarray, source_mass: np.ndarray | None = None,
           reg: float = 0.0, p: float = 1.0) -> ChannelMap:
    """Intra-Fusion: merge every channel into the kept ones along the transport plan."""
    size = features.shape[0]
    if len(kept) == size:
        return selection(size, kept)
    plan = transport_plan(features, kept, source_mass, reg, p).T  # (k, C)
    target_mass = plan.sum(axis=1, keepdims=True)
    source_mass_out = plan.sum(axis=0, keepdims=True)
    average = plan / np.where(target_mass > 0, target_mass, 1.0)
    total = plan / np.where(source_mass_out > 0, source_mass_out, 1.0)
    # A kept channel that received no mass (possible only with Sinkhorn
    # underflow) keeps its own values instead of becoming zero; a source with
    # no mass (zero importance) is dropped on both sides, as in plain pruning.
    for e in np.flatnonzero(target_mass[:, 0] <= 0):
        average[e] = 0.0
        average[e, kept[e]] = 1.0
    return ChannelMap(np.asarray(kept), average, total)
