"""Stages 3-4 wired together: scores, allocation and a channel map per group.

The pipeline hands this module the analysis, the original weights and the
resolved options; it returns channel maps.  Sensitivity allocation gets
:func:`plan_groups` as a callable, so :mod:`sensitivity` measures exactly the
maps the real run would write without importing the pipeline.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import onnx

from . import allocation as allocation_mod, coupling, importance as importance_mod, model_io, plans
from . import sensitivity as sensitivity_mod
from .coupling import CONSUMER, PARAM, PRODUCER, Analysis, Group
from .errors import PruneWarning
from .options import DATA_IMPORTANCES, Options
from .progress import Progress, as_progress


#: Column blocks of a member's rows hold at most this many bytes (as float64).
BLOCK_BYTES = 32 * 2**20

#: Groups whose transport features would take more than this (float64) get their L1 costs
#: accumulated block by block instead of from one feature matrix (VGG-16's first classifier
#: layer: 4096 channels x 29 184 weights = 960 MB).
STREAM_FEATURE_BYTES = 256 * 2**20


def _constant_shape(values, name: str) -> tuple[int, ...]:
    """A constant's shape without reading it (``values`` is :class:`model_io.WeightValues` or a dict of arrays)."""
    return tuple(values.shape(name)) if isinstance(values, model_io.WeightValues) else np.shape(values[name])


class MemberRows:
    """A member's (channels x features) rows: the whole matrix (``np.asarray``), or column blocks.

    Blocks are read from the constant afresh each time (a mapped weight is read through a
    new memory map per block), so that a wide member, such as a classifier's input slices,
    never exists as one more copy.  ``np.asarray`` gives exactly
    :func:`coupling.channel_rows`.
    """

    def __init__(self, values, member, size: int):
        self.values, self.member, self.size = values, member, size
        shape = _constant_shape(values, member.constant)
        self.shape = (size, int(np.prod(shape, dtype=np.int64)) // max(shape[member.axis], 1) * member.block)
        self._whole = None

    @property
    def nbytes64(self) -> int:
        return self.shape[0] * self.shape[1] * 8

    def __array__(self, dtype=None, copy=None):
        rows = self._whole
        if rows is None:
            rows = coupling.channel_rows(self.values[self.member.constant], self.member, self.size)
            if self.nbytes64 <= BLOCK_BYTES:  # read once for the scores and the features
                self._whole = rows
        return rows if dtype is None else rows.astype(dtype)

    def blocks(self):
        """The rows in column blocks of at most :data:`BLOCK_BYTES` (as float64), in a fixed order."""
        first = self._piece()
        if first.ndim == 1:
            yield np.asarray(self)
            return
        per_index = self.nbytes64 // first.shape[1]
        step = max(1, BLOCK_BYTES // max(per_index, 1))
        count = first.shape[1]
        del first
        for j in range(0, count, step):
            piece = self._piece()
            yield np.ascontiguousarray(piece[:, j:j + step]).reshape(self.size, -1)
            del piece

    def _piece(self) -> np.ndarray:
        """The member's channels moved to axis 0 (a view of the constant)."""
        m = self.member
        values = self.values[m.constant]
        index = [slice(None)] * values.ndim
        index[m.axis] = slice(m.offset, m.offset + self.size * m.block)
        return np.moveaxis(values[tuple(index)], m.axis, 0)


def group_rows(group: Group, values: dict[str, np.ndarray]) -> tuple[list[MemberRows], list[MemberRows]]:
    """(rows for importance, rows for transport features) of a group, as :class:`MemberRows`.

    Importance reads producers' output filters and consumers' input slices;
    the transport features add the producers' biases and every multi-value
    parameter row (depthwise filters inside the group): matching channels
    whose depthwise filters differ merges two different functions, which
    measured worse on MobileNetV2 (Fashion-MNIST, one group at 0.3: 82.6% ->
    87.8% and 88.1% -> 90.3% on two inverted-residual groups).
    """
    producers = set(group.nodes(PRODUCER))
    scored, features = [], []
    for m in group.members:
        rows = MemberRows(values, m, group.size)
        if m.role in (PRODUCER, CONSUMER):
            scored.append(rows)
            features.append(rows)
        elif m.role == PARAM and (m.node in producers or rows.shape[1] > 1):
            features.append(rows)
    return scored, features


#: Progress names every group at least this wide before planning it (it can take seconds).
PROGRESS_WIDE_GROUP = 512


def _scores(group: Group, scored: list[np.ndarray], importance: str, seed: int,
            given: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Scores of a group: ``given`` ones (e.g. activation importance) or a weight metric."""
    if given is not None and group.id in given:
        return given[group.id]
    rng = np.random.default_rng([seed, group.id])
    return importance_mod.group_scores(scored, "l1" if importance in DATA_IMPORTANCES else importance, rng)


def global_keeps(graph, analysis: Analysis, values: dict[str, np.ndarray], sparsity: float, importance: str,
                 seed: int = 0, selected: set[int] | None = None, target: str = "macs",
                 max_group_sparsity: float = 0.9, round_to: int = 1,
                 given_scores: dict[int, np.ndarray] | None = None,
                 kind_sparsity: dict[str, float] | None = None) -> dict[int, int]:
    """Channels kept per group under global allocation (see :mod:`allocation`).

    Groups of a kind in ``kind_sparsity`` keep that kind's uniform count and
    are not ranked; the others are ranked to reach the target for the whole model.
    """
    fixed = fixed_keeps(analysis, selected, kind_sparsity, round_to)
    todo = [g for g in analysis.prunable(selected) if g.id not in fixed]
    scores = {g.id: _scores(g, group_rows(g, values)[0], importance, seed, given_scores) for g in todo}
    macs = allocation_mod.node_macs(graph, analysis) if target == "macs" else None
    return allocation_mod.global_keeps(analysis, scores, sparsity, macs, target, max_group_sparsity, round_to, fixed)


def fixed_keeps(analysis: Analysis, selected: set[int] | None, kind_sparsity: dict[str, float] | None,
                 round_to: int) -> dict[int, int]:
    """Channels kept by the groups whose kind has its own sparsity (uniform within the kind)."""
    return {g.id: plans.keep_count(g.size, kind_sparsity[g.kind], allocation_mod.multiple(g, round_to))
            for g in analysis.prunable(selected) if g.kind in (kind_sparsity or {})}


def plan_groups(analysis: Analysis, values: dict[str, np.ndarray], sparsity: float, method: str,
                importance: str, seed: int = 0, selected: set[int] | None = None, ot_reg: float | None = 0.0,
                ot_p: float | None = 1.0, marginals: str | None = "uniform", round_to: int = 1,
                progress: Progress | None = None, keeps: dict[int, int] | None = None,
                given_scores: dict[int, np.ndarray] | None = None, kind_sparsity: dict[str, float] | None = None,
                kind_method: dict[str, str] | None = None, cost_kernel: str | None = "auto") -> dict[int, plans.ChannelMap]:
    """A channel map for every prunable (and selected) group.

    ``kind_sparsity`` / ``kind_method`` override ``sparsity`` / ``method`` for
    groups of a kind (``Group.kind``: attention heads, FFN neurons).

    ``keeps`` (group id -> channels kept, from :func:`global_keeps`) replaces
    the uniform ``sparsity``; groups missing from it are left unchanged.
    ``given_scores`` (group id -> per-channel scores, e.g. activation
    importance) replaces the weight-based ``importance`` for those groups.
    ``ot_reg``/``ot_p``/``marginals``/``cost_kernel`` only matter to transport plans (None
    when no group is merged, as :meth:`Options.resolve` leaves them).
    """
    progress = as_progress(progress)
    maps = {}
    todo = analysis.prunable(selected)
    compiled = plans.use_compiled(sum(_fusion_work(g, values, (kind_sparsity or {}).get(g.kind, sparsity), round_to,
                                                   keeps) for g in todo
                                      if (kind_method or {}).get(g.kind, method) != "prune"), cost_kernel or "auto")
    if cost_kernel == "compiled" and plans._l1_kernel() is None:
        warnings.warn(PruneWarning("--cost-kernel compiled: the C extension was not built (no C compiler at "
                                   "install) and numba is not installed (pip install 'onnx-intrafusion[fast]'); "
                                   "the cost matrices use SciPy"), stacklevel=3)
    with progress.steps("groups planned", len(todo)) as steps:
        for group in todo:
            group_sparsity = (kind_sparsity or {}).get(group.kind, sparsity)
            keep = (plans.keep_count(group.size, group_sparsity, allocation_mod.multiple(group, round_to))
                    if keeps is None
                    else keeps.get(group.id, group.size))
            if keep == group.size:
                steps.advance()
                continue
            if group.size >= PROGRESS_WIDE_GROUP:
                # Before the work: a wide group can take seconds (its cost matrix is C x k x features).
                progress.note(f"  group {group.id}: {group.size} -> {keep} channels")
            scored, features = group_rows(group, values)
            scores = _scores(group, scored, importance, seed, given_scores)
            kept = importance_mod.top_k(scores, keep)
            if (kind_method or {}).get(group.kind, method) == "prune":
                maps[group.id] = plans.selection(group.size, kept)
            else:
                mass = scores if marginals == "importance" else None
                # Each input goes as soon as the next step has what it needs: the members' rows
                # before the cost matrix, the features (75 MB for ResNet-50's widest group)
                # before the solver's own memory.
                del scored
                if not ot_reg and ot_p == 1 and sum(r.nbytes64 for r in features) > STREAM_FEATURE_BYTES:
                    cost = plans.removed_cost_in_blocks(lambda: (b for r in features for b in r.blocks()), kept,
                                                        group.size, compiled)
                else:
                    # The list itself: emptied as copied, so each member's rows (cached for its
                    # scores) are freed before the next is read (38 MB for ResNet-50's widest group).
                    feats = plans.normalised_features(features)
                    # = plans.fusion(feats, ...), with the features freed before the solver runs.
                    cost = plans.cost_matrix(feats, kept, ot_p, compiled, consume=True, removed_only=not ot_reg)
                    del feats
                del features
                maps[group.id] = plans.fusion_from_costs(cost, kept, group.size, mass, ot_reg)
                del cost
            model_io.release_freed_memory()  # the group's features and solver memory, before the next one
            steps.advance(detail=f"group {group.id}: {group.size}->{keep}")
    return maps


def _fusion_work(group: Group, values, sparsity: float, round_to: int, keeps: dict[int, int] | None) -> int:
    """Element operations of the group's cost matrix (removed x kept channels x feature width), from shapes only."""
    keep = (plans.keep_count(group.size, sparsity, allocation_mod.multiple(group, round_to)) if keeps is None
            else keeps.get(group.id, group.size))
    width = sum(int(np.prod(_constant_shape(values, m.constant))) // max(group.size, 1) for m in group.members)
    return (group.size - keep) * keep * width


def sensitivity_table(original: onnx.ModelProto, graph, analysis: Analysis, values: dict[str, np.ndarray],
                 calib: dict[str, np.ndarray], selected: set[int] | None,
                 given_scores: dict[int, np.ndarray] | None, opts: Options,
                 progress: Progress) -> tuple[sensitivity_mod.Sensitivity, str]:
    """(the analysis, where it came from): read from ``opts.sensitivity`` when that file exists, else measured.

    A measured analysis is written to ``opts.sensitivity`` when given.  The
    channel maps come from :func:`plan_groups`, i.e. exactly the run's own;
    handing :mod:`sensitivity` this callable keeps it free of the pipeline.
    """
    source = opts.sensitivity
    if source is not None and os.path.exists(source):
        table = sensitivity_mod.Sensitivity.load(source, sensitivity_mod.fingerprint(original))
        now = dict(method=opts.method, importance=opts.importance, recover=opts.recover, round_to=opts.round_to)
        differ = [f"{k} {table.options.get(k)} (now {v})" for k, v in now.items() if table.options.get(k) != v]
        if differ:
            warnings.warn(PruneWarning(f"{source} was measured with {', '.join(differ)}; using it as it is"),
                          stacklevel=3)
        return table, f"read from {source}"

    # Groups of a kind with its own sparsity (the hidden size: 0 unless given) are not allocated: not measured.
    fixed = fixed_keeps(analysis, selected, opts.kind_sparsity(), opts.round_to)
    allocated = [g.id for g in analysis.prunable(selected) if g.id not in fixed]

    def plan(gid: int, keep: int) -> plans.ChannelMap:
        return plan_groups(analysis, values, 0.0, opts.method, opts.importance, opts.seed, {gid},
                           opts.ot_reg, opts.ot_p, opts.marginals, keeps={gid: keep},
                           given_scores=given_scores, cost_kernel=opts.cost_kernel)[gid]

    table = sensitivity_mod.analyse(
        original, graph, analysis, plan, calib, levels=opts.sensitivity_levels, group_ids=allocated,
        round_to=opts.round_to, recover="lstsq" if opts.recover == "distill" else opts.recover,  # no fine-tuning per run
        recover_alpha=opts.recover_alpha, ewr_eps=opts.ewr_eps, seed=opts.seed, workers=opts.workers, ray_address=opts.ray_address,
        progress=progress,
        options=dict(method=opts.method, importance=opts.importance, ot_reg=opts.ot_reg, ot_p=opts.ot_p,
                     marginals=opts.marginals))
    if source is not None:
        table.save(source)
        return table, f"measured, written to {source}"
    return table, "measured"


def sensitivity_keeps(graph, analysis: Analysis, table: sensitivity_mod.Sensitivity, sparsity: float,
                      selected: set[int] | None, max_group_sparsity: float, round_to: int,
                      kind_sparsity: dict[str, float] | None = None
                      ) -> tuple[dict[int, int], dict[int, float], bool]:
    """Channels kept per group under the sensitivity allocation (see :mod:`allocation`).

    Groups of a kind in ``kind_sparsity`` keep that kind's uniform count (as in :func:`global_keeps`).
    """
    fixed = fixed_keeps(analysis, selected, kind_sparsity, round_to)
    measured = table.by_id()
    curves = {gid: measured[gid].curve() for gid in measured
              if gid < len(analysis.groups) and analysis.groups[gid].prunable
              and analysis.groups[gid].size == measured[gid].channels and (selected is None or gid in selected)}
    missing = [g.id for g in analysis.prunable(selected) if g.id not in curves and g.id not in fixed]
    if missing:
        warnings.warn(PruneWarning(f"{len(missing)} prunable group(s) have no sensitivity measurement and are "
                                   f"left unpruned (e.g. group {missing[0]})"), stacklevel=3)
    return allocation_mod.sensitivity_keeps(analysis, curves, sparsity, allocation_mod.node_macs(graph, analysis),
                                            max_group_sparsity, round_to, fixed=fixed)


@dataclass
class Allocation:
    """What the plan stage decided: channel maps, and where a budgeted allocation came from."""
    maps: dict[int, plans.ChannelMap]
    keeps: dict[int, int] | None = None  # channels kept per group under global/sensitivity allocation
    predicted: dict[int, float] | None = None  # sensitivity: predicted distortion per group
    budget_met: bool = True


def plan_run(graph, analysis: Analysis, values, opts: Options, selected: set[int] | None,
             given_scores: dict[int, np.ndarray] | None, table: sensitivity_mod.Sensitivity | None,
             progress: Progress) -> Allocation:
    """The plan stage of one run: allocation by ``opts.allocation``, then a channel map per group."""
    out = Allocation(maps={})
    if opts.allocation == "global":
        out.keeps = global_keeps(graph, analysis, values, opts.sparsity, opts.importance, opts.seed, selected,
                                 opts.global_target, opts.max_group_sparsity, opts.round_to, given_scores,
                                 opts.kind_sparsity())
    elif opts.allocation == "sensitivity":
        out.keeps, out.predicted, out.budget_met = sensitivity_keeps(
            graph, analysis, table, opts.sparsity, selected, opts.max_group_sparsity, opts.round_to,
            opts.kind_sparsity())
        if not out.budget_met:
            warnings.warn(PruneWarning(
                f"sparsity {opts.sparsity:g} of the MACs cannot be removed within the measured levels "
                f"(largest {max(table.levels):g}) and max-group-sparsity {opts.max_group_sparsity:g}: "
                f"removing what they allow"), stacklevel=3)
    out.maps = plan_groups(analysis, values, opts.sparsity, opts.method, opts.importance, opts.seed, selected,
                           opts.ot_reg, opts.ot_p, opts.marginals, opts.round_to, progress, out.keeps,
                           given_scores, opts.kind_sparsity(), opts.kind_method(), opts.cost_kernel)
    return out
