"""How many channels each group keeps: uniform, global or sensitivity allocation.

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

Kinds.  A transformer's groups are of several kinds (``coupling.KINDS``):
in a ``head`` group one channel is a whole attention head, ``head_dim``
positions on each Q/K/V/output axis (the segments' ``block``), so removing it
saves its rows of Q, K, V, its columns of the output projection and its share
of ``Q K^T`` and ``softmax x V`` (batched over heads: counted once, see
:func:`node_macs`); an ``ffn`` neuron saves one row of fc1 and one column of
fc2.  On the trained 4-block ViT one head is worth 44 FFN neurons.  Global
allocation ranks heads and neurons on the same normalised scale (each group
averages 1) and meets the MAC target with each removal's true cost, so a
weak head relative to its block goes before an average neuron; it does not
know that heads are more sensitive than neurons.  The sensitivity allocation
does: it measures every head and FFN group's distortion on held-back data and
is the measured best across kinds (docs/transformers.md).  A kind given its
own sparsity (``--head-sparsity`` etc.) is not allocated (``fixed``): its
groups keep that count and the other groups reach the target for the whole
model.

*Sensitivity* (:func:`sensitivity_keeps`): each group's distortion curve was
measured by pruning it alone at a few levels (:mod:`sensitivity`); between
measured levels the distortion is interpolated linearly in the number of
channels kept (through the unpruned point, distortion 0).  The curves are
taken as measured, not forced monotone: with uniform transport marginals a
group of duplicated channels can be exact at 0.5 (every copy merges into its
original) and lossy at 0.25.  Beyond the largest measured level nothing is
extrapolated: a group never loses more than its largest measured level (nor
more than ``max_group_sparsity``).  We minimise the *summed* distortion
under the MAC budget (``sparsity`` = fraction of MACs removed) as a
multiple-choice knapsack solved by dynamic programming over the MACs saved,
discretised into ``bins`` units of the budget.  Why knapsack and not a
Lagrangian sweep: the measured curves are not convex (a group is often
harmless at 0.25 and 0.5 and breaks at 0.75), and a Lagrangian sweep only
reaches the points on the convex hull of each curve, so it can miss budgets
between them by a whole level of a large group; the DP has no such gap and
costs well under a second (groups x candidates x bins, vectorised).  The DP
counts each group's MACs as if pruned alone; a layer between two pruned
groups saves less than the sum, so when the exact count (:class:`MacModel`)
falls short, the DP is asked for that much more and solved again (a few
rounds; the best result is kept).  Each DP answer is corrected one channel
step at a time with the exact count: steps are taken (least distortion per
MAC) until the budget is met, then given back (most distortion saved first,
never one that adds distortion) while it still holds, so the result is within
one channel step of the budget unless a step back would add distortion.  On a
two-group chain with non-convex curves this finds the brute-force optimum
(tests/test_sensitivity.py).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx_graphsurgeon as gs

from .coupling import Analysis
from .errors import PruneWarning
from .plans import keep_count

TARGETS = ("macs", "channels")
ALLOCATIONS = ("uniform", "global", "sensitivity")


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


def _contracted(analysis: Analysis, node: gs.Node) -> bool:
    """Whether a MatMul's tracked input axis is the one it sums over (its last), not a batch axis."""
    ax = analysis.axes[node.inputs[0].name]
    shape = node.inputs[0].shape
    return shape is not None and ax.axis in (-1, len(shape) - 1) and ax.outer == 1


def node_macs(graph: gs.Graph, analysis: Analysis) -> list[tuple[int, str | None, str | None]]:
    """(MACs, channel-tracked input, channel-tracked output) of every Conv/Gemm/MatMul.

    Dynamic dimensions count as 1 (batch 1).  A depthwise Conv lists no
    input: its input channels are its output channels.  Nor does a MatMul
    whose tracked input axis is a batch axis (the head axis of attention's
    ``Q K^T`` and ``softmax x V``): removing a head removes its share of that
    product once, not once per side (counting it twice overestimated the
    saving of heads: a MAC-targeted global allocation of the trained ViT at
    0.5 removed 48.1% instead of 50%).
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
        if inp is not None and outp is not None and node.op == "MatMul" and not _contracted(analysis, node):
            inp = None  # a batch axis (the heads of Q K^T and of softmax x V): it is the output's axis
        rows.append((macs, inp, outp))
    return rows


class MacModel:
    """Exact MACs of the counted nodes for any channel counts, precomputed per node axis.

    An axis of size ``n`` holding ``b[g]`` positions per channel of group g
    has ``n - sum_g (size_g - keep_g) * b[g]`` positions after pruning.
    """

    def __init__(self, analysis: Analysis, macs: list[tuple[int, str | None, str | None]]):
        self.sizes = {g.id: g.size for g in analysis.groups}
        self.rows = []
        for base, inp, outp in macs:
            axes = []
            for t in (inp, outp):
                if t is None:
                    continue
                before = _axis_size(analysis, {}, t)
                blocks: dict[int, int] = {}
                for seg in analysis.axes[t].segments:
                    if seg.space is not None:
                        gid = analysis.space_group[seg.space]
                        blocks[gid] = blocks.get(gid, 0) + seg.block
                if before and blocks:
                    axes.append((before, blocks))
            self.rows.append((float(base), axes))
        self.before = self.total({})

    def total(self, keeps: dict[int, int]) -> float:
        total = 0.0
        for base, axes in self.rows:
            f = 1.0
            for before, blocks in axes:
                f *= (before - sum((self.sizes[g] - keeps[g]) * b for g, b in blocks.items() if g in keeps)) / before
            total += base * f
        return total


def total_macs(analysis: Analysis, macs: list[tuple[int, str | None, str | None]], keeps: dict[int, int]) -> float:
    return MacModel(analysis, macs).total(keeps)


def multiple(group, round_to: int) -> int:
    """The channel multiple of a group: ``round_to``, except for head groups.

    A head group counts heads, each ``head_dim`` channels wide; the runtime's
    channel multiple is about the channels, so the head count is not rounded.
    """
    return 1 if group.kind == "head" else round_to


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
                 max_group_sparsity: float = 0.9, round_to: int = 1,
                 fixed: dict[int, int] | None = None) -> dict[int, int]:
    """Channels kept per group (``scores``: group id -> normalised channel scores).

    Reaches the target as closely as the ranking allows (one channel past it
    at most, less after :func:`_give_back`, before ``round_to``), or removes
    every channel the cap allows when the target is out of reach.  ``fixed``
    (group id -> channels kept) are groups whose count was set by the user
    (a per-kind sparsity): not ranked, but their MACs count towards the target.
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

    fixed = dict(fixed or {})

    def keeps_after(n: int) -> dict[int, int]:
        removed = np.bincount(gids[:n], minlength=max(sizes, default=0) + 1) if n else None
        return {**fixed, **{gid: size - (int(removed[gid]) if removed is not None else 0)
                            for gid, size in sizes.items()}}

    if target == "channels":
        total = sum(sizes.values()) + sum(analysis.groups[gid].size for gid in fixed)
        done = sum(analysis.groups[gid].size - k for gid, k in fixed.items())
        need = lambda n: done + n >= sparsity * total - 1e-9  # noqa: E731
    else:
        if macs is None:
            raise ValueError("target 'macs' needs the MACs of the model's nodes")
        model = MacModel(analysis, macs)
        need = lambda n: model.total(keeps_after(n)) <= (1.0 - sparsity) * model.before * (1 + 1e-12)  # noqa: E731
    lo, hi = 0, len(items)
    if not need(hi):
        lo = hi
        fixed_note = " and the kinds given their own sparsity" if fixed else ""
        warnings.warn(PruneWarning(f"sparsity {sparsity:g} of the {target} cannot be removed within "
                                   f"max-group-sparsity {max_group_sparsity:g}{fixed_note}: removing what they allow"),
                      stacklevel=3)
    while lo < hi:
        mid = (lo + hi) // 2
        if need(mid):
            hi = mid
        else:
            lo = mid + 1
    keeps = keeps_after(lo)
    if target == "macs" and lo:
        keeps = _give_back(model, keeps, items[:lo], sparsity)
    groups = {g.id: g for g in analysis.groups}
    return {gid: k if gid in fixed else _rounded(sizes[gid], k, multiple(groups[gid], round_to) if gid in groups
                                                 else round_to, floors[gid])
            for gid, k in keeps.items()}


def _give_back(model: MacModel, keeps: dict[int, int], removed: list[tuple[float, int, int]],
               sparsity: float) -> dict[int, int]:
    """Channels given back while the MAC target still holds, the strongest removed one of each group first.

    The shortest prefix of the ranking overshoots by at most its last
    channel, but one channel can be costly (an attention head is head_dim
    channels plus its share of the attention products: 3.6% of the trained
    ViT's MACs); a group whose removed channels cost less each can then take
    some back.  Groups are tried in the order of their strongest removed
    channel (highest score first), one check per group and per channel given back.
    """
    limit = (1.0 - sparsity) * model.before * (1 + 1e-12)
    strongest: dict[int, float] = {}
    for score, gid, _ in removed:
        strongest[gid] = score
    keeps = dict(keeps)
    for gid in sorted(strongest, key=lambda g: -strongest[g]):
        while keeps[gid] < model.sizes[gid] and model.total({**keeps, gid: keeps[gid] + 1}) <= limit:
            keeps[gid] += 1
    return keeps


#: Candidates per group in the dynamic programme (the exact correction then works channel by channel).
DP_CANDIDATES = 256


def _candidates(size: int, measured_min: int, max_group_sparsity: float, round_to: int) -> np.ndarray:
    """Channel counts a group may keep, descending: the full size, then every allowed count down to the floor."""
    floor = max(_min_keep(size, max_group_sparsity), measured_min)
    if round_to > 1:
        ks = [k for k in range(size - 1, floor - 1, -1) if k % round_to == 0 and k >= round_to]
    else:
        ks = list(range(size - 1, floor - 1, -1))
    return np.asarray([size] + ks, dtype=np.int64)


def _interpolate(keeps: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Distortion at ``at`` channels: linear between the measured counts (inf, a broken model, as 1e30)."""
    order = np.argsort(keeps, kind="stable")
    k, d = keeps[order].astype(np.float64), values[order]
    return np.interp(at.astype(np.float64), k, np.where(np.isfinite(d), d, 1e30))


def sensitivity_keeps(analysis: Analysis, curves: dict[int, tuple[np.ndarray, np.ndarray]], sparsity: float,
                      macs: list[tuple[int, str | None, str | None]], max_group_sparsity: float = 0.9,
                      round_to: int = 1, bins: int = 1000, fixed: dict[int, int] | None = None
                      ) -> tuple[dict[int, int], dict[int, float], bool]:
    """(channels kept, predicted distortion per group, budget met) minimising the summed distortion.

    ``curves``: group id -> (channel counts, distortion) measured with the
    group pruned alone, including the unpruned count with distortion 0.
    Groups without a curve keep all channels.  ``fixed`` (group id ->
    channels kept, set by the user) are groups with that one choice (their
    distortion is not predicted: 0); their MACs count towards the budget.
    """
    model = MacModel(analysis, macs)
    target = (1.0 - sparsity) * model.before
    need = model.before - target
    fixed = dict(fixed or {})
    cands = {gid: _candidates(analysis.groups[gid].size, int(k.min()), max_group_sparsity,
                              multiple(analysis.groups[gid], round_to))
             for gid, (k, _) in curves.items() if gid not in fixed}
    dist = {gid: _interpolate(*curves[gid], cands[gid]) for gid in cands}
    for gid, k in fixed.items():
        cands[gid], dist[gid] = np.asarray([k], dtype=np.int64), np.zeros(1)
    if need <= 0 or not cands:
        return {gid: int(c[0]) for gid, c in cands.items()}, {gid: 0.0 for gid in cands}, True
    # The knapsack counts MACs additively; where that overestimates the saving, ask it for more (by the
    # shortfall) and try again; keep the best corrected solution.
    best = None
    ask = need
    for _ in range(KNAPSACK_ROUNDS):
        start = _knapsack(model, cands, dist, ask, bins)
        keeps, met = _correct(model, cands, dist, start, target)
        score = sum(float(dist[gid][np.flatnonzero(cands[gid] == k)[0]]) for gid, k in keeps.items())
        if best is None or (met, -score) > (best[2], -best[1]):
            best = (keeps, score, met)
        short = need - (model.before - model.total(start))
        if short <= 1e-9 * need:
            break
        ask += short
    keeps, _, met = best
    return keeps, {gid: float(dist[gid][np.flatnonzero(cands[gid] == k)[0]]) for gid, k in keeps.items()}, met


#: Knapsack solutions tried (each asking for more MACs when the exact count fell short).
KNAPSACK_ROUNDS = 8


def _correct(model: MacModel, cands: dict[int, np.ndarray], dist: dict[int, np.ndarray], keeps: dict[int, int],
             target: float) -> tuple[dict[int, int], bool]:
    """Exact MAC count: take channel steps until the budget holds, then give back steps while it still does."""
    keeps = dict(keeps)
    pos = {gid: int(np.flatnonzero(cands[gid] == k)[0]) for gid, k in keeps.items()}
    limit = target * (1 + 1e-12)

    def step_total(gid: int, to: int) -> float:
        return model.total({**keeps, gid: int(cands[gid][to])})

    current = model.total(keeps)
    while current > limit:  # least distortion per MAC first
        best = None
        for gid, i in pos.items():
            if i + 1 < len(cands[gid]):
                t = step_total(gid, i + 1)
                cost = (dist[gid][i + 1] - dist[gid][i]) / max(current - t, 1e-12)
                if best is None or cost < best[0]:
                    best = (cost, gid, t)
        if best is None:
            break  # every group at its floor: the budget cannot be met
        _, gid, current = best
        pos[gid] += 1
        keeps[gid] = int(cands[gid][pos[gid]])
    met = current <= limit
    while met:  # most distortion saved first; never a step that adds distortion
        best = None
        for gid, i in pos.items():
            if i > 0:
                t = step_total(gid, i - 1)
                gain = dist[gid][i] - dist[gid][i - 1]
                if t <= limit and gain >= 0 and (best is None or gain > best[0]):
                    best = (gain, gid, t)
        if best is None:
            break
        _, gid, current = best
        pos[gid] -= 1
        keeps[gid] = int(cands[gid][pos[gid]])
    return keeps, met


def _knapsack(model: MacModel, cands: dict[int, np.ndarray], dist: dict[int, np.ndarray], need: float,
              bins: int) -> dict[int, int]:
    """Multiple-choice knapsack: one count per group, MACs saved (each group alone) >= need, least distortion."""
    unit = need / bins
    gids = list(cands)
    table = []  # per group: (candidate indices, weights in units, distortions)
    for gid in gids:
        c = cands[gid]
        idx = np.unique(np.linspace(0, len(c) - 1, min(len(c), DP_CANDIDATES)).round().astype(np.int64))
        saved = np.array([model.before - model.total({gid: int(c[i])}) for i in idx])
        table.append((idx, np.minimum(np.floor(saved / unit + 1e-9), bins).astype(np.int64), dist[gid][idx]))
    inf = np.inf
    dp = np.full(bins + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((len(gids), bins + 1), dtype=np.int64)
    prev = np.zeros((len(gids), bins + 1), dtype=np.int64)
    j = np.arange(bins + 1)
    for n, (idx, weight, d) in enumerate(table):
        new = np.full(bins + 1, inf)
        for ci, (w, dv) in enumerate(zip(weight, d)):
            if w < bins:  # sources j -> j + w, below the cap
                t = j[w:bins]
                cand = dp[:bins - w] + dv
                better = cand < new[t]
                new[t[better]] = cand[better]
                choice[n, t[better]] = ci
                prev[n, t[better]] = t[better] - w
            lo = bins - w  # sources j >= bins - w all reach the cap (the budget)
            src = lo + int(np.argmin(dp[lo:]))
            if dp[src] + dv < new[bins]:
                new[bins] = dp[src] + dv
                choice[n, bins] = ci
                prev[n, bins] = src
        dp = new
    at = bins if np.isfinite(dp[bins]) else int(np.flatnonzero(np.isfinite(dp)).max())
    keeps = {}
    for n in range(len(gids) - 1, -1, -1):
        idx = table[n][0]
        keeps[gids[n]] = int(cands[gids[n]][idx[choice[n, at]]])
        at = int(prev[n, at])
    return keeps
