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
from typing import Callable

import numpy as np
import onnx

from . import allocation as allocation_mod, coupling, importance as importance_mod, model_io, plans, rewrite
from . import sensitivity as sensitivity_mod
from .coupling import CONSUMER, PARAM, PRODUCER, Analysis, Group
from .errors import NothingToPrune, PruneWarning, UsageError, ValidationError
from .options import DATA_IMPORTANCES, FEW_CALIBRATION_SAMPLES, GRADIENT_IMPORTANCES, Options
from .progress import Progress, as_progress
from .report import GroupRow, Report, mac_count, params_count



@dataclass
class PruneResult:
    model: onnx.ModelProto | None  # None with analyse_only
    report: Report
    external_data: bool = False  # the input kept its weights in an external file
    sensitivity: sensitivity_mod.Sensitivity | None = None  # the analysis behind a sensitivity allocation
    fp32: onnx.ModelProto | None = None  # with quantize="int8": the pruned model before quantization


class _Timer:
    def __init__(self, progress: Progress):
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str):
        self.progress.stage(name)
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
    fixed = _fixed_keeps(analysis, selected, kind_sparsity, round_to)
    todo = [g for g in analysis.prunable(selected) if g.id not in fixed]
    scores = {g.id: _scores(g, _group_rows(g, values)[0], importance, seed, given_scores) for g in todo}
    macs = allocation_mod.node_macs(graph, analysis) if target == "macs" else None
    return allocation_mod.global_keeps(analysis, scores, sparsity, macs, target, max_group_sparsity, round_to, fixed)


def _fixed_keeps(analysis: Analysis, selected: set[int] | None, kind_sparsity: dict[str, float] | None,
                 round_to: int) -> dict[int, int]:
    """Channels kept by the groups whose kind has its own sparsity (uniform within the kind)."""
    return {g.id: plans.keep_count(g.size, kind_sparsity[g.kind], allocation_mod.multiple(g, round_to))
            for g in analysis.prunable(selected) if g.kind in (kind_sparsity or {})}


def plan_groups(analysis: Analysis, values: dict[str, np.ndarray], sparsity: float, method: str,
                importance: str, seed: int = 0, selected: set[int] | None = None, ot_reg: float = 0.0,
                ot_p: float = 1.0, marginals: str = "uniform", round_to: int = 1,
                progress: Progress | None = None, keeps: dict[int, int] | None = None,
                given_scores: dict[int, np.ndarray] | None = None, kind_sparsity: dict[str, float] | None = None,
                kind_method: dict[str, str] | None = None) -> dict[int, plans.ChannelMap]:
    """A channel map for every prunable (and selected) group.

    ``kind_sparsity`` / ``kind_method`` override ``sparsity`` / ``method`` for
    groups of a kind (``Group.kind``: attention heads, FFN neurons).

    ``keeps`` (group id -> channels kept, from :func:`global_keeps`) replaces
    the uniform ``sparsity``; groups missing from it are left unchanged.
    ``given_scores`` (group id -> per-channel scores, e.g. activation
    importance) replaces the weight-based ``importance`` for those groups.
    """
    progress = as_progress(progress)
    maps = {}
    todo = analysis.prunable(selected)
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
            scored, features = _group_rows(group, values)
            scores = _scores(group, scored, importance, seed, given_scores)
            kept = importance_mod.top_k(scores, keep)
            if (kind_method or {}).get(group.kind, method) == "prune":
                maps[group.id] = plans.selection(group.size, kept)
            else:
                mass = scores if marginals == "importance" else None
                maps[group.id] = plans.fusion(plans.normalised_features(features), kept, mass, ot_reg, ot_p)
            steps.advance(detail=f"group {group.id}: {group.size}->{keep}")
    return maps


def _sensitivity(original: onnx.ModelProto, graph, analysis: Analysis, values: dict[str, np.ndarray],
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
    fixed = _fixed_keeps(analysis, selected, opts.kind_sparsity(), opts.round_to or 1)
    allocated = [g.id for g in analysis.prunable(selected) if g.id not in fixed]

    def plan(gid: int, keep: int) -> plans.ChannelMap:
        return plan_groups(analysis, values, 0.0, opts.method, opts.importance, opts.seed, {gid},
                           opts.ot_reg or 0.0, opts.ot_p or 1.0, opts.marginals or "uniform",
                           keeps={gid: keep}, given_scores=given_scores)[gid]

    table = sensitivity_mod.analyse(
        original, graph, analysis, plan, calib, levels=opts.sensitivity_levels, group_ids=allocated,
        round_to=opts.round_to, recover="lstsq" if opts.recover == "distill" else opts.recover,  # no fine-tuning per run
        recover_alpha=opts.recover_alpha or 1e-3,
        ewr_eps=opts.ewr_eps or 0.05, seed=opts.seed, workers=opts.workers, ray_address=opts.ray_address,
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
    fixed = _fixed_keeps(analysis, selected, kind_sparsity, round_to)
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


def _warn_custom_ops(graph, analysis: Analysis) -> None:
    """Custom-domain ops that touch channels leave their groups unpruned: say so (not an error)."""
    custom = {f"{n.name} ({n.op})" for n in graph.nodes if n.domain not in ("", "ai.onnx", None)}
    touched = [g for g in analysis.groups
               if any(node in custom and reason not in coupling.DATA_REASONS for node, reason in g.blocked)]
    if touched:
        nodes = sorted({node for g in touched for node, _ in g.blocked if node in custom})
        more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
        warnings.warn(PruneWarning(
            f"{len(nodes)} custom-domain op(s) read pruned channels ({', '.join(nodes[:3])}{more}): "
            f"the {len(touched)} channel group(s) they touch are left unpruned"), stacklevel=3)


def _gradients():
    """The torch-based stages (:mod:`finetune`), or a one-line error telling how to get them."""
    try:
        from . import finetune
    except ImportError as exc:
        if "torch" not in str(exc):
            raise
        raise UsageError("--recover distill and --importance taylor/prospr need torch: "
                         "pip install onnx-intrafusion[torch]") from None
    return finetune


def _distill(graph, original: onnx.ModelProto, calib: dict[str, np.ndarray], opts: Options,
             progress: Progress) -> dict:
    """Fine-tune the pruned graph's weights in place towards the original's outputs; returns the record."""
    from . import calibration as calibration_mod
    from .differentiable import assign

    fit, held = calibration_mod.split_holdback(calib, seed=opts.seed)
    with progress.steps("distillation epochs", opts.finetune_epochs) as steps:
        def epoch_done(epoch: int, total: int, loss: float, held_back: float) -> None:
            steps.advance(detail=f"loss {loss:.4g}, held-back distortion {held_back:.4g}")

        weights, record = _gradients().distill(graph, original, fit, held, epochs=opts.finetune_epochs,
                                               time_budget=opts.finetune_time, seed=opts.seed,
                                               progress=epoch_done)
    assign(graph, weights)
    record["weights_changed"] = len(weights)
    return record


def prune(
    model: str | os.PathLike | onnx.ModelProto,
    sparsity: float = 0.5,
    method: str = "intrafusion",
    importance: str = "l1",
    *,
    calibration=None,
    progress: Progress | Callable[[str], None] | None = None,
    options: Options | None = None,
    **option_fields,
) -> PruneResult:
    """Prune every prunable channel group of ``model`` by ``sparsity``.

    ``model`` is a path or an ``onnx.ModelProto``.  Every other option is a
    field of :class:`~onnx_intrafusion.options.Options`, given either as
    keywords (``prune(path, 0.5, seed=1, groups=[3])``) or as one
    ``options=Options(...)``.  ``groups`` restricts the pruning to those group
    ids (as listed in the report; others untouched).  Returns the pruned model
    and a :class:`Report`; raises a
    :class:`~onnx_intrafusion.errors.UserError` subclass for bad input.

    ``calibration`` (an .npz path, a dict of arrays or an iterable of feed
    dicts; no labels) enables data-aware recovery ``recover`` in
    none/bias/lstsq/ewr (default lstsq with calibration, none without) and
    ``importance="activation"``; see :mod:`onnx_intrafusion.recovery`.
    ``allocation="global"`` ranks channels across all groups instead of
    removing ``sparsity`` of every group: ``sparsity`` of the MACs
    (``global_target="macs"``) or of the prunable channels (``"channels"``)
    is removed, no group losing more than ``max_group_sparsity`` of its
    channels (see :mod:`onnx_intrafusion.allocation`).  ``head_sparsity`` /
    ``ffn_sparsity`` set the sparsity of one group kind of a transformer;
    with global or sensitivity allocation that kind is fixed at it and the
    other kinds are allocated to reach ``sparsity`` of the whole model's MACs.  ``target``
    (auto/ort-cpu/ort-cuda/openvino/tflite/ncnn/mnn/none) makes every pruned
    group keep a multiple of the channels that runtime's fast kernels need
    (:mod:`onnx_intrafusion.deploy`; ``round_to`` overrides it; the library
    default ``none`` keeps exact counts, the command line's is ``auto``).
    ``quantize="int8"`` (needs ``calibration``) quantizes the pruned model
    statically: ``model`` is then the int8 model, ``fp32`` the one before.  A run that would
    prune nothing raises :class:`NothingToPrune` unless
    ``allow_unchanged=True``.

    ``allocation="sensitivity"`` (needs ``calibration``) first measures every
    group pruned alone at ``sensitivity_levels`` (:mod:`sensitivity`; in
    ``workers`` local processes, default: cores bounded by memory, or as Ray
    tasks on the cluster at ``ray_address``), then removes ``sparsity`` of the
    MACs with the least summed distortion.  ``sensitivity`` is the path of a
    saved analysis to reuse (read when it exists, written there otherwise).
    ``analyse_only=True`` stops after the analysis: the result has
    ``model=None`` and the analysis in ``result.sensitivity``.

    Gradient options (the ``torch`` extra): ``recover="distill"`` runs
    lstsq and then fine-tunes the pruned weights towards the original
    model's outputs for ``finetune_epochs`` epochs (at most
    ``finetune_time`` seconds), keeping the weights with the lowest
    distortion on held-back calibration samples; ``importance="taylor"`` or
    ``"prospr"`` scores channels from gradients (see
    :mod:`onnx_intrafusion.finetune`).
    """
    from . import calibration as calibration_mod

    if options is None:
        options = Options.from_kwargs(sparsity=sparsity, method=method, importance=importance, **option_fields)
    elif option_fields or (sparsity, method, importance) != (0.5, "intrafusion", "l1"):
        raise UsageError("give the options either as keywords or as options=Options(...), not both")
    opts = options.resolve(has_calibration=calibration is not None)
    if opts.recover == "distill" or opts.importance in GRADIENT_IMPORTANCES:
        _gradients()  # torch missing: say so before any work
    calib = None if calibration is None else calibration_mod.read(calibration, opts.calibration_samples)
    if calib is not None and calibration_mod.sample_count(calib) < FEW_CALIBRATION_SAMPLES:
        warnings.warn(PruneWarning(
            f"only {calibration_mod.sample_count(calib)} calibration sample(s): recovery and data-driven "
            f"importance need a few hundred to be reliable"), stacklevel=2)
    if opts.validate and not opts.analyse_only:
        from .validate import check_provider

        check_provider(opts.provider)
    progress = as_progress(progress)
    timer = _Timer(progress)

    with timer.stage("load"):
        loaded = model_io.load_model(model)
        original = loaded.model
        if calib is not None:
            calib = calibration_mod.match(calib, original)
        feeds = None if calib is None else calibration_mod.batches(calib, original)
        graph = model_io.to_graph(original)
    with timer.stage("groups"):
        analysis = coupling.analyse(graph)
        if calib is not None:
            analysis.lift_data_blocks()  # e.g. the hidden size under LayerNorm: recovery re-fits its readers
        values = {name: np.asarray(t.values) for name, t in graph.tensors().items()
                  if name in {m.constant for g in analysis.groups for m in g.members}}
    _warn_custom_ops(graph, analysis)
    if not any(g.prunable for g in analysis.groups):
        reasons = sorted({r for g in analysis.groups for _, r in g.blocked})
        detail = f"; reasons: {'; '.join(reasons[:3])}" if reasons else ""
        raise NothingToPrune(f"no channel group can be pruned safely ({len(analysis.groups)} groups found{detail})")
    selected = _selected_groups(analysis, opts.groups)
    given_scores = None
    if opts.importance == "activation":
        from .activations import activation_scores

        with timer.stage("activations"):
            ids = [g.id for g in analysis.prunable(selected)]
            given_scores = activation_scores(original, graph, analysis, feeds, ids)
    elif opts.importance in GRADIENT_IMPORTANCES:
        with timer.stage(opts.importance):
            ids = [g.id for g in analysis.prunable(selected)]
            given_scores = _gradients().IMPORTANCES[opts.importance](graph, original, analysis, calib, ids,
                                                                     seed=opts.seed)
    table = None
    if opts.allocation == "sensitivity" or opts.analyse_only:
        with timer.stage("sensitivity"):
            table, source = _sensitivity(original, graph, analysis, values, calib, selected, given_scores, opts,
                                         progress)
        if opts.analyse_only:
            report = Report(options=opts.to_dict(), input=None if loaded.path is None else str(loaded.path))
            report.timings = timer.timings
            return PruneResult(model=None, report=report, external_data=loaded.external_data, sensitivity=table)
    with timer.stage("plan"):
        keeps = None
        if opts.allocation == "global":
            keeps = global_keeps(graph, analysis, values, opts.sparsity, opts.importance, opts.seed, selected,
                                 opts.global_target, opts.max_group_sparsity, opts.round_to, given_scores,
                                 opts.kind_sparsity())
        elif opts.allocation == "sensitivity":
            keeps, predicted, met = sensitivity_keeps(graph, analysis, table, opts.sparsity, selected,
                                                      opts.max_group_sparsity, opts.round_to, opts.kind_sparsity())
            if not met:
                warnings.warn(PruneWarning(
                    f"sparsity {opts.sparsity:g} of the MACs cannot be removed within the measured levels "
                    f"(largest {max(table.levels):g}) and max-group-sparsity {opts.max_group_sparsity:g}: "
                    f"removing what they allow"), stacklevel=2)
        maps = plan_groups(analysis, values, opts.sparsity, opts.method, opts.importance, opts.seed, selected,
                           opts.ot_reg or 0.0, opts.ot_p or 1.0, opts.marginals or "uniform", opts.round_to,
                           progress, keeps, given_scores, opts.kind_sparsity(), opts.kind_method())
    del values  # the original weights' arrays: free them before the rewrite copies
    if not maps and not opts.allow_unchanged:
        raise NothingToPrune(_nothing_pruned_reason(analysis, selected, opts))
    with timer.stage("rewrite"):
        rewrite.apply_maps(graph, analysis, maps)
        pruned = model_io.to_model(graph, original)
        if opts.recover == "none":
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
    layers, result, distilled = [], None, None
    if opts.recover != "none":
        from .activations import recover as recover_layers

        with timer.stage("recover"):
            start = "lstsq" if opts.recover == "distill" else opts.recover  # distillation starts from lstsq
            fit, held = _recovery_split(calib, original, opts.seed)
            result = recover_layers(graph, original, analysis, maps, fit, start, holdback=held,
                                    alpha=opts.recover_alpha or 1e-3, eps=opts.ewr_eps or 0.05, seed=opts.seed,
                                    progress=progress)
            layers = result.layers
        if opts.recover == "distill":
            with timer.stage("distill"):  # on the same split of the calibration samples
                distilled = _distill(graph, original, calib, opts, progress)
        pruned = model_io.to_model(graph, original)
        if pruned.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(pruned, full_check=True)

    report = Report(options=opts.to_dict(), input=None if loaded.path is None else str(loaded.path))
    if calib is not None:
        report.calibration = {"samples": calibration_mod.sample_count(calib)}
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
    if result is not None and result.model is not None:
        report.recovery_model = result.model.to_dict()
    report.distill = distilled
    with timer.stage("stats"):
        report.set_stats(params_count(original), mac_count(original), params_count(pruned), mac_count(pruned))
    if opts.validate:
        from .validate import compare

        with timer.stage("validate"):
            real = None if calib is None else _validation_feeds(calib, original, opts.seed)
            report.validation = compare(original, pruned, opts.provider, opts.seed, feeds=real).to_dict()
    fp32 = None
    if opts.quantize == "int8":
        from .deploy import quantize_checked

        with timer.stage("quantize"):
            fp32 = pruned
            pruned, info = quantize_checked(original, fp32, calib, calibration_mod.batches, opts.provider, opts.seed)
            report.quantization = info.to_dict()
    report.timings = timer.timings
    return PruneResult(model=pruned, report=report, external_data=loaded.external_data, fp32=fp32,
                       sensitivity=table)


def _recovery_split(calib: dict[str, np.ndarray], model: onnx.ModelProto, seed: int
                    ) -> tuple[list[dict], list[dict] | None]:
    """(fit batches, held-back batches): recovery fits on the first and is checked on the second.

    The split is the one validation uses.  With a single sample, or fewer
    held-back samples than a fixed batch size, nothing can be held back.
    """
    from . import calibration as calibration_mod

    if calibration_mod.sample_count(calib) < 2:
        return calibration_mod.batches(calib, model), None
    fit, held = calibration_mod.split_holdback(calib, seed=seed)
    try:
        held_batches = calibration_mod.batches(held, model)
    except UsageError:
        return calibration_mod.batches(calib, model), None
    return calibration_mod.batches(fit, model), held_batches


#: At most this many held-back calibration samples are used to validate.
VALIDATION_REAL_SAMPLES = 64


def _validation_feeds(calib: dict[str, np.ndarray], model: onnx.ModelProto, seed: int) -> list[dict]:
    """Real inputs for validation: the held-back calibration samples (never fitted on), capped."""
    from . import calibration as calibration_mod

    if calibration_mod.sample_count(calib) < 2:
        held = calib
    else:
        held = calibration_mod.split_holdback(calib, seed=seed)[1]
    held = {k: v[:VALIDATION_REAL_SAMPLES] for k, v in held.items()}
    return calibration_mod.batches(held, model)


def _selected_groups(analysis: Analysis, groups: tuple[int, ...] | None) -> set[int] | None:
    """The groups the user asked for: unknown ids are an error, unprunable ones a warning."""
    if groups is None:
        return None
    by_id = {g.id: g for g in analysis.groups}
    missing = [i for i in groups if i not in by_id]
    if missing:
        raise UsageError(f"no group {', '.join(map(str, missing))} in this model (it has groups 0-{len(by_id) - 1}; "
                         f"run once without groups and read the report)")
    blocked = [i for i in groups if not by_id[i].prunable]
    if blocked:
        warnings.warn(PruneWarning(f"selected group(s) {', '.join(map(str, blocked))} cannot be pruned "
                                   f"(see their reason in the report); they are left unchanged"), stacklevel=3)
    return set(groups)


def _nothing_pruned_reason(analysis: Analysis, selected: set[int] | None, opts: Options) -> str:
    todo = analysis.prunable(selected)
    if not todo:
        why = "none of the selected groups can be pruned"
    elif opts.sparsity == 0:
        why = "sparsity 0 keeps every channel"
    elif opts.round_to > 1 and all(g.size <= opts.round_to for g in todo):
        why = f"every prunable group has at most round-to={opts.round_to} channels"
        from .deploy import channel_multiple

        if opts.target != "none" and channel_multiple(opts.target, opts.provider, opts.quantize) == opts.round_to:
            why += f" (the channel multiple of --target {opts.target}; --target none prunes exact counts)"
    else:
        why = f"every prunable group keeps all its channels at sparsity {opts.sparsity:g} (round-to {opts.round_to})"
    return (f"nothing to prune: {why}; no copy is written (use --allow-unchanged / allow_unchanged=True to "
            f"write an unchanged copy anyway)")
