"""prune(): the stages in order, timed.

load -> groups -> importance -> plans -> rewrite -> validate.  The pipeline
owns no pruning logic of its own; it moves data between the stage modules and
fills the report.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx

from . import allocation as allocation_mod, coupling, importance as importance_mod, model_io, plans, rewrite
from . import sensitivity as sensitivity_mod
from .coupling import CONSUMER, PARAM, PRODUCER, Analysis, Group
from .errors import NothingToPrune, PruneWarning, UsageError, ValidationError
from .report import GroupRow, Report, model_stats

Progress = Callable[[str], None]


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    external_data: bool = False  # the input kept its weights in an external file
    sensitivity: sensitivity_mod.Sensitivity | None = None  # the analysis behind a sensitivity allocation


def check_options(sparsity: float, method: str, importance: str, ot_reg: float = 0.0, ot_p: float = 1.0,
                  marginals: str = "uniform", round_to: int = 1, allocation: str = "uniform",
                  global_target: str = "macs", max_group_sparsity: float = 0.9) -> None:
    """Raise :class:`UsageError` for an option out of range, before any work."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0 or np.isnan(sparsity):
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")
    if method not in plans.METHODS:
        raise UsageError(f"unknown method '{method}' (choose from {', '.join(plans.METHODS)})")
    if importance not in importance_mod.IMPORTANCES:
        raise UsageError(f"unknown importance '{importance}' (choose from {', '.join(importance_mod.IMPORTANCES)})")
    if marginals not in plans.MARGINALS:
        raise UsageError(f"unknown marginals '{marginals}' (choose from {', '.join(plans.MARGINALS)})")
    if not ot_reg >= 0:
        raise UsageError(f"ot-reg must be >= 0, got {ot_reg}")
    if not ot_p >= 1:
        raise UsageError(f"ot-p must be >= 1, got {ot_p}")
    if int(round_to) < 1:
        raise UsageError(f"round-to must be >= 1, got {round_to}")
    if allocation not in allocation_mod.ALLOCATIONS:
        raise UsageError(f"unknown allocation '{allocation}' (choose from {', '.join(allocation_mod.ALLOCATIONS)})")
    if global_target not in allocation_mod.TARGETS:
        raise UsageError(f"unknown global target '{global_target}' (choose from {', '.join(allocation_mod.TARGETS)})")
    if not isinstance(max_group_sparsity, (int, float)) or not 0.0 < float(max_group_sparsity) < 1.0:
        raise UsageError(f"max-group-sparsity must be in (0, 1), got {max_group_sparsity}")


class _Timer:
    def __init__(self, progress: Progress | None):
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str):
        if self.progress:
            self.progress(f"{name} ...")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 4)


def _group_rows(group: Group, values: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(rows for importance, rows for transport features) of a group.

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
        rows = coupling.channel_rows(values[m.constant], m, group.size)
        if m.role in (PRODUCER, CONSUMER):
            scored.append(rows)
            features.append(rows)
        elif m.role == PARAM and (m.node in producers or rows.shape[1] > 1):
            features.append(rows)
    return scored, features


#: Progress (on a terminal) names every group at least this wide before planning it,
#: and any group when the last message is older than PROGRESS_EVERY_S.
PROGRESS_WIDE_GROUP = 512
PROGRESS_EVERY_S = 1.0


def _scores(group: Group, scored: list[np.ndarray], importance: str, seed: int,
            given: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Scores of a group: ``given`` ones (e.g. activation importance) or a weight metric."""
    if given is not None and group.id in given:
        return given[group.id]
    rng = np.random.default_rng([seed, group.id])
    return importance_mod.group_scores(scored, "l1" if importance == "activation" else importance, rng)


def global_keeps(graph, analysis: Analysis, values: dict[str, np.ndarray], sparsity: float, importance: str,
                 seed: int = 0, selected: set[int] | None = None, target: str = "macs",
                 max_group_sparsity: float = 0.9, round_to: int = 1,
                 given_scores: dict[int, np.ndarray] | None = None) -> dict[int, int]:
    """Channels kept per group under global allocation (see :mod:`allocation`)."""
    todo = [g for g in analysis.groups if g.prunable and (selected is None or g.id in selected)]
    scores = {g.id: _scores(g, _group_rows(g, values)[0], importance, seed, given_scores) for g in todo}
    macs = allocation_mod.node_macs(graph, analysis) if target == "macs" else None
    return allocation_mod.global_keeps(analysis, scores, sparsity, macs, target, max_group_sparsity, round_to)


def plan_groups(analysis: Analysis, values: dict[str, np.ndarray], sparsity: float, method: str,
                importance: str, seed: int = 0, selected: set[int] | None = None, ot_reg: float = 0.0,
                ot_p: float = 1.0, marginals: str = "uniform", round_to: int = 1,
                progress: Progress | None = None, keeps: dict[int, int] | None = None,
                given_scores: dict[int, np.ndarray] | None = None) -> dict[int, plans.ChannelMap]:
    """A channel map for every prunable (and selected) group.

    ``keeps`` (group id -> channels kept, from :func:`global_keeps`) replaces
    the uniform ``sparsity``; groups missing from it are left unchanged.
    ``given_scores`` (group id -> per-channel scores, e.g. activation
    importance) replaces the weight-based ``importance`` for those groups.
    """
    maps = {}
    todo = [g for g in analysis.groups if g.prunable and (selected is None or g.id in selected)]
    last = time.perf_counter()
    for n, group in enumerate(todo, 1):
        if keeps is None:
            keep = plans.keep_count(group.size, sparsity, round_to)
        else:
            keep = keeps.get(group.id, group.size)
        if keep == group.size:
            continue
        if progress and (group.size >= PROGRESS_WIDE_GROUP or time.perf_counter() - last > PROGRESS_EVERY_S):
            # Before the work: a wide group can take seconds (its cost matrix is C x k x features).
            progress(f"  group {group.id}: {group.size} -> {keep} channels ({n}/{len(todo)})")
            last = time.perf_counter()
        scored, features = _group_rows(group, values)
        scores = _scores(group, scored, importance, seed, given_scores)
        kept = importance_mod.top_k(scores, keep)
        if method == "prune":
            maps[group.id] = plans.selection(group.size, kept)
        else:
            mass = scores if marginals == "importance" else None
            maps[group.id] = plans.fusion(plans.normalised_features(features), kept, mass, ot_reg, ot_p)
    return maps


def _sensitivity(original: onnx.ModelProto, graph, analysis: Analysis, values: dict[str, np.ndarray],
                 calib: dict[str, np.ndarray], selected: set[int] | None,
                 given_scores: dict[int, np.ndarray] | None, source, levels, workers: int | None,
                 ray_address: str | None, progress: Progress | None, *, method: str, importance: str, seed: int,
                 ot_reg: float, ot_p: float, marginals: str, round_to: int, recover: str, recover_alpha: float,
                 ewr_eps: float) -> tuple[sensitivity_mod.Sensitivity, str]:
    """(the analysis, where it came from): loaded from ``source`` when that file exists, else measured.

    A measured analysis is written to ``source`` when it is a path.  The
    channel maps come from :func:`plan_groups`, i.e. exactly the run's own.
    """
    if isinstance(source, sensitivity_mod.Sensitivity):
        if source.fingerprint != sensitivity_mod.fingerprint(original):
            raise UsageError("the sensitivity analysis was measured on another model (graph or weights differ)")
        return source, "given"
    if source is not None and os.path.exists(source):
        table = sensitivity_mod.Sensitivity.load(source, sensitivity_mod.fingerprint(original))
        now = dict(method=method, importance=importance, recover=recover, round_to=round_to)
        differ = [f"{k} {table.options.get(k)} (now {v})" for k, v in now.items() if table.options.get(k) != v]
        if differ:
            warnings.warn(PruneWarning(f"{source} was measured with {', '.join(differ)}; using it as it is"),
                          stacklevel=3)
        return table, f"read from {source}"

    def plan(gid: int, keep: int) -> plans.ChannelMap:
        return plan_groups(analysis, values, 0.0, method, importance, seed, {gid}, ot_reg, ot_p, marginals,
                           keeps={gid: keep}, given_scores=given_scores)[gid]

    from . import calibration as calibration_mod

    table = sensitivity_mod.analyse(
        original, graph, analysis, plan, calibration_mod.match(calib, original), levels=levels,
        group_ids=selected, round_to=round_to, recover=recover, recover_alpha=recover_alpha, ewr_eps=ewr_eps,
        seed=seed, workers=workers, ray_address=ray_address, progress=progress,
        options=dict(method=method, importance=importance, ot_reg=ot_reg, ot_p=ot_p, marginals=marginals))
    if source is not None:
        table.save(source)
        return table, f"measured, written to {source}"
    return table, "measured"


def sensitivity_keeps(graph, analysis: Analysis, table: sensitivity_mod.Sensitivity, sparsity: float,
                      selected: set[int] | None, max_group_sparsity: float, round_to: int
                      ) -> tuple[dict[int, int], dict[int, float], bool]:
    """Channels kept per group under the sensitivity allocation (see :mod:`allocation`)."""
    measured = table.by_id()
    curves = {gid: measured[gid].curve() for gid in measured
              if gid < len(analysis.groups) and analysis.groups[gid].prunable
              and analysis.groups[gid].size == measured[gid].channels and (selected is None or gid in selected)}
    missing = [g.id for g in analysis.groups if g.prunable and (selected is None or g.id in selected)
               and g.id not in curves]
    if missing:
        warnings.warn(PruneWarning(f"{len(missing)} prunable group(s) have no sensitivity measurement and are "
                                   f"left unpruned (e.g. group {missing[0]})"), stacklevel=3)
    return allocation_mod.sensitivity_keeps(analysis, curves, sparsity, allocation_mod.node_macs(graph, analysis),
                                            max_group_sparsity, round_to)


def _warn_custom_ops(graph, analysis: Analysis) -> None:
    """Custom-domain ops that touch channels leave their groups unpruned: say so (not an error)."""
    custom = {f"{n.name} ({n.op})" for n in graph.nodes if n.domain not in ("", "ai.onnx", None)}
    touched = [g for g in analysis.groups if any(node in custom for node, _ in g.blocked)]
    if touched:
        nodes = sorted({node for g in touched for node, _ in g.blocked if node in custom})
        more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
        warnings.warn(PruneWarning(
            f"{len(nodes)} custom-domain op(s) read pruned channels ({', '.join(nodes[:3])}{more}): "
            f"the {len(touched)} channel group(s) they touch are left unpruned"), stacklevel=3)


def prune(
    model: str | os.PathLike | onnx.ModelProto,
    sparsity: float = 0.5,
    method: str = "intrafusion",
    importance: str = "l1",
    *,
    seed: int = 0,
    groups: Iterable[int] | None = None,
    ot_reg: float = 0.0,
    ot_p: float = 1.0,
    marginals: str = "uniform",
    round_to: int = 1,
    allocation: str = "uniform",
    global_target: str = "macs",
    max_group_sparsity: float = 0.9,
    validate: bool = True,
    provider: str = "auto",
    progress: Progress | None = None,
    calibration=None,
    calibration_samples: int | None = None,
    recover: str | None = None,
    recover_alpha: float = 1e-3,
    ewr_eps: float = 0.05,
    sensitivity=None,
    sensitivity_levels: Iterable[float] = sensitivity_mod.DEFAULT_LEVELS,
    workers: int | None = None,
    ray_address: str | None = None,
    analyse_only: bool = False,
) -> PruneResult:
    """Prune every prunable channel group of ``model`` by ``sparsity``.

    ``model`` is a path or an ``onnx.ModelProto``.  ``groups`` restricts the
    pruning to those group ids (as listed in the report; others untouched).
    Returns the pruned model and a :class:`Report`; raises a
    :class:`~onnx_intrafusion.errors.UserError` subclass for bad input.

    ``calibration`` (an .npz path, a dict of arrays or an iterable of feed
    dicts; no labels) enables data-aware recovery ``recover`` in
    none/bias/lstsq/ewr (default lstsq with calibration, none without) and
    ``importance="activation"``; see :mod:`onnx_intrafusion.recovery`.
    ``allocation="global"`` ranks channels across all groups instead of
    removing ``sparsity`` of every group: ``sparsity`` of the MACs
    (``global_target="macs"``) or of the prunable channels (``"channels"``)
    is removed, no group losing more than ``max_group_sparsity`` of its
    channels (see :mod:`onnx_intrafusion.allocation`).

    ``allocation="sensitivity"`` (needs ``calibration``) first measures every
    group pruned alone at ``sensitivity_levels`` (:mod:`sensitivity`; in
    ``workers`` local processes, default: cores bounded by memory, or as Ray
    tasks on the cluster at ``ray_address``), then removes ``sparsity`` of the
    MACs with the least summed distortion.  ``sensitivity`` is a saved
    analysis to reuse (a path, loaded when the file exists and written there
    otherwise, or a :class:`~onnx_intrafusion.sensitivity.Sensitivity`).
    ``analyse_only=True`` stops after the analysis: the result has
    ``model=None`` and the analysis in ``result.sensitivity``.
    """
    from . import calibration as calibration_mod

    check_options(sparsity, method, "l1" if importance == "activation" else importance, ot_reg, ot_p, marginals,
                  round_to, allocation, global_target, max_group_sparsity)
    calib, recover = calibration_mod.resolve_options(calibration, calibration_samples, recover, importance,
                                                     recover_alpha, ewr_eps)
    wants_table = allocation == "sensitivity" or analyse_only
    if calib is None and (wants_table or sensitivity is not None):
        what = "--analyse-only" if analyse_only else ("--allocation sensitivity" if wants_table else "--sensitivity")
        raise UsageError(f"{what} needs calibration data (--calibration FILE.npz)")
    if sensitivity is not None and not wants_table:
        raise UsageError("--sensitivity FILE is used by --allocation sensitivity or --analyse-only")
    levels = sensitivity_mod.check_levels(sensitivity_levels)
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"workers must be a positive integer, got {workers}")
    if validate and not analyse_only:
        from .validate import check_provider

        check_provider(provider)
    timer = _Timer(progress)
    options = dict(sparsity=sparsity, method=method, importance=importance, seed=seed, ot_reg=ot_reg,
                   ot_p=ot_p, marginals=marginals, round_to=round_to, allocation=allocation,
                   groups=None if groups is None else sorted(groups))
    if allocation == "global":
        options.update(global_target=global_target, max_group_sparsity=max_group_sparsity)
    if wants_table:
        options.update(max_group_sparsity=max_group_sparsity, sensitivity_levels=levels)
    if calib is not None:
        options.update(recover=recover, calibration_samples=calibration_mod.sample_count(calib))

    with timer.stage("load"):
        loaded = model_io.load_model(model)
        original = loaded.model
        feeds = None if calib is None else calibration_mod.batches(calibration_mod.match(calib, original), original)
        graph = model_io.to_graph(original)
    with timer.stage("groups"):
        analysis = coupling.analyse(graph)
        values = {name: np.asarray(t.values) for name, t in graph.tensors().items()
                  if name in {m.constant for g in analysis.groups for m in g.members}}
    _warn_custom_ops(graph, analysis)
    if not any(g.prunable for g in analysis.groups):
        reasons = sorted({r for g in analysis.groups for _, r in g.blocked})
        detail = f"; reasons: {'; '.join(reasons[:3])}" if reasons else ""
        raise NothingToPrune(f"no channel group can be pruned safely ({len(analysis.groups)} groups found{detail})")
    selected = None if groups is None else set(groups)
    given_scores = None
    if importance == "activation":
        from .activations import activation_scores

        with timer.stage("activations"):
            ids = [g.id for g in analysis.groups if g.prunable and (selected is None or g.id in selected)]
            given_scores = activation_scores(original, graph, analysis, feeds, ids)
    table = None
    if wants_table:
        with timer.stage("sensitivity"):
            table, source = _sensitivity(
                original, graph, analysis, values, calib, selected, given_scores, sensitivity, levels, workers,
                ray_address, progress, method=method, importance=importance, seed=seed, ot_reg=ot_reg, ot_p=ot_p,
                marginals=marginals, round_to=round_to, recover=recover, recover_alpha=recover_alpha,
                ewr_eps=ewr_eps)
        if analyse_only:
            report = Report(options=options, timings=timer.timings)
            return PruneResult(model=None, report=report, external_data=loaded.external_data, sensitivity=table)
    with timer.stage("plan"):
        keeps = None
        if allocation == "global":
            keeps = global_keeps(graph, analysis, values, sparsity, importance, seed, selected, global_target,
                                 max_group_sparsity, round_to, given_scores)
        elif allocation == "sensitivity":
            keeps, predicted, met = sensitivity_keeps(graph, analysis, table, sparsity, selected,
                                                      max_group_sparsity, round_to)
            if not met:
                warnings.warn(PruneWarning(
                    f"--sparsity {sparsity} of the MACs cannot be removed within the measured levels (largest "
                    f"{max(levels)}) and --max-group-sparsity {max_group_sparsity}: removing what they allow"),
                    stacklevel=2)
        maps = plan_groups(analysis, values, sparsity, method, importance, seed, selected, ot_reg, ot_p,
                           marginals, round_to, progress, keeps, given_scores)
    del values  # the original weights' arrays: free them before the rewrite copies
    with timer.stage("rewrite"):
        rewrite.apply_maps(graph, analysis, maps)
        pruned = model_io.to_model(graph, original)
        if recover == "none":
            del graph  # the pruned model holds its own copy: keep peak memory down in validate
        try:
            # = check_model(full_check=True), whose strict shape inference
            # runs on a weightless copy (seconds faster on big models).
            if pruned.ByteSize() < 2**31 - 1:
                onnx.checker.check_model(pruned)
            onnx.shape_inference.infer_shapes(model_io.weightless(pruned), check_type=True, strict_mode=True)
        except Exception as exc:  # noqa: BLE001
            raise ValidationError(f"pruned model fails onnx.checker (please report this bug): "
                                  f"{str(exc).splitlines()[0]}") from None
    layers = []
    if recover != "none":
        from .activations import recover as recover_layers

        with timer.stage("recover"):
            layers = recover_layers(graph, original, analysis, maps, feeds, recover, alpha=recover_alpha,
                                    eps=ewr_eps, seed=seed, progress=progress)
            pruned = model_io.to_model(graph, original)
            if pruned.ByteSize() < 2**31 - 1:
                onnx.checker.check_model(pruned, full_check=True)

    report = Report(options=options)
    for g in analysis.groups:
        if not g.prunable:
            only_outputs = all(r == coupling.OUTPUT_REASON for _, r in g.blocked)
            report.groups.append(GroupRow.from_group(g, g.size, "output" if only_outputs else "blocked"))
        elif g.id in maps:
            report.groups.append(GroupRow.from_group(g, maps[g.id].keep, "pruned", maps[g.id].kept))
        else:
            report.groups.append(GroupRow.from_group(g, g.size, "unchanged"))
    if table is not None:
        for row in report.groups:
            if row.id in keeps and row.status == "pruned":
                row.sensitivity = {"level": round(1.0 - keeps[row.id] / row.channels_before, 4),
                                   "distortion": predicted[row.id]}
        report.sensitivity = {"source": source, "measure": table.measure, "samples": table.samples,
                              "levels": table.levels, "runs": sum(len(g.points) for g in table.groups),
                              "seconds": table.seconds, "backend": table.backend,
                              "predicted_distortion": float(sum(predicted.values())), "budget_met": met}
    if layers:
        report.attach_recovery(layers, analysis)
    with timer.stage("stats"):
        report.params_before, report.macs_before = model_stats(original)
        report.params_after, report.macs_after = model_stats(pruned)
    if validate:
        from .validate import compare

        with timer.stage("validate"):
            report.validation = compare(original, pruned, provider, seed).to_dict()
    report.timings = timer.timings
    return PruneResult(model=pruned, report=report, external_data=loaded.external_data, sensitivity=table)
