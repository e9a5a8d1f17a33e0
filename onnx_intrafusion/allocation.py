"""How many channels each group keeps: uniform or global allocation.

*Uniform* (the default): every group loses the same fraction of its channels
(:func:`plans.keep_count`).

*Global*: the channels of all groups are ranked together by importance and
the least important ones are removed until ``sparsity`` of the model's MACs
(``target="macs"``, default) or of its prunable channels
(``target="channels"``) is gone.  No group loses more than
``max_group_sparsity`` of its channels, so none collapses.

Comparable scores.  :func:`importance.group_scores` divides each weight's
channel scores by their mean, so every group's scores average exactly 1.  We
rank on these normalised scores on purpose: raw l1/l2 magnitudes depend on
fan-in and on how each layer was scaled (folded BatchNorm), so a global rank
on raw norms mostly prunes whole layers that happen to have small weights.
With the mean normalisation a channel is removed when it is weak *relative to
its own group*; groups whose importance is uneven (a few strong channels, many
weak ones) lose more, groups whose channels all matter alike lose less.  The
same choice as Torch-Pruning's global pruning with group-normalised importance.

MACs.  A Conv/Gemm/MatMul costs ``base * f_in * f_out``, ``f`` being the
kept fraction of its input and output channel axes (depthwise Convs: ``f_out``
only); this is exact for the ops :func:`report.count_macs` counts.  The
allocation removes channels in rank order and finds by bisection the shortest
prefix of the ranking that reaches the target.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .coupling import Analysis
from .plans import keep_count

TARGETS = ("macs", "channels")
ALLOCATIONS = ("uniform", "global")


def _axis_size(analysis: Analysis, keeps: dict[int, int], tensor: str) -> int:
    total = 0
    for seg in analysis.axes[tensor].segments:
        if seg.space is None:
            total += seg.block
        else:
            gid = analysis.space_group[seg.space]
            total += keeps.get(gid, analysis.groups[gid].size) * seg.block
    return total


def _dims(shape) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def node_macs(graph: gs.Graph, analysis: Analysis) -> list[tuple[int, str | None, str | None]]:
    """(MACs, channel-tracked input, channel-tracked output) of every Conv/Gemm/MatMul.

    Dynamic dimensions count as 1 (batch 1).  A depthwise Conv lists no
    input: its input channels are its output channels.
    """
    rows = []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not node.outputs:
            continue
        out = _dims(node.outputs[0].shape)
        w = _dims(node.inputs[1].shape) if len(node.inputs) > 1 else None
        x = _dims(node.inputs[0].shape)
        if not out or not w or not x:
            continue
        if node.op == "Conv":
            macs = int(np.prod(out[1:])) * int(np.prod(w[1:]))
            depthwise = int(node.attrs.get("group", 1)) > 1
        else:
            k = x[0] if node.op == "Gemm" and int(node.attrs.get("transA", 0)) else x[-1]
            macs = int(np.prod(out[1:])) * k if len(out) > 1 else k * out[0]
            depthwise = False
        inp = node.inputs[0].name if node.inputs[0].name in analysis.axes and not depthwise else None
        outp = node.outputs[0].name if node.outputs[0].name in analysis.axes else None
        rows.append((macs, inp, outp))
    return rows


def total_macs(analysis: Analysis, macs: list[tuple[int, str | None, str | None]], keeps: dict[int, int]) -> float:
    total = 0.0
    for base, inp, outp in macs:
        f = 1.0
        for t in (inp, outp):
            if t is not None:
                before = _axis_size(analysis, {}, t)
                f *= _axis_size(analysis, keeps, t) / before if before else 1.0
        total += base * f
    return total


def _min_keep(size: int, max_group_sparsity: float) -> int:
    return max(1, math.ceil((1.0 - max_group_sparsity) * size - 1e-9))


def _rounded(size: int, keep: int, round_to: int, floor: int) -> int:
    if round_to <= 1 or keep >= size:
        return keep
    keep = keep_count(size, 1.0 - keep / size, round_to)
    while keep < floor:  # never below the per-group cap
        keep = min(size, keep + round_to)
    return keep


def global_keeps(analysis: Analysis, scores: dict[int, np.ndarray], sparsity: float,
                 macs: list[tuple[int, str | None, str | None]] | None = None, target: str = "macs",
                 max_group_sparsity: float = 0.9, round_to: int = 1) -> dict[int, int]:
    """Channels kept per group (``scores``: group id -> normalised channel scores).

    Reaches the target as closely as the ranking allows (one channel past it
    at most, before ``round_to``), or removes every channel the cap allows
    when the target is out of reach.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown global target '{target}' (choose from {', '.join(TARGETS)})")
    sizes = {gid: len(s) for gid, s in scores.items()}
    floors = {gid: _min_keep(n, max_group_sparsity) for gid, n in sizes.items()}
    # Eligible removals: each group's weakest (size - floor) channels; within a
    # group channels always go weakest first, so a prefix of this ranking is a
    # valid removal set.  Ties: lower group id, then lower channel index.
    items = []
    for gid, s in scores.items():
        order = np.argsort(s, kind="stable")[: sizes[gid] - floors[gid]]
        items.extend((float(s[c]), gid, int(c)) for c in order)
    items.sort()
    gids = np.array([gid for _, gid, _ in items], dtype=np.int64)

    def keeps_after(n: int) -> dict[int, int]:
        removed = np.bincount(gids[:n], minlength=max(sizes, default=0) + 1) if n else None
        return {gid: size - (int(removed[gid]) if removed is not None else 0) for gid, size in sizes.items()}

    if target == "channels":
        total = sum(sizes.values())
        need = lambda n: n >= sparsity * total - 1e-9  # noqa: E731
    else:
        if macs is None:
            raise ValueError("target 'macs' needs the MACs of the model's nodes")
        before = total_macs(analysis, macs, {})
        need = lambda n: total_macs(analysis, macs, keeps_after(n)) <= (1.0 - sparsity) * before * (1 + 1e-12)  # noqa: E731
    lo, hi = 0, len(items)
    if not need(hi):
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if need(mid):
            hi = mid
        else:
            lo = mid + 1
    keeps = keeps_after(lo)
    return {gid: _rounded(sizes[gid], k, round_to, floors[gid]) for gid, k in keeps.items()}
