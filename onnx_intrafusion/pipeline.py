"""prune(): the stages in order, timed.

load -> groups -> reference -> [data importance] -> [sensitivity] -> plan ->
rewrite -> [recover] -> stats -> validate -> [quantize].  The pipeline owns no
pruning logic of its own; it moves data between the stage modules
(:mod:`planning` wires allocation and plans, :mod:`calibrated` the
data-aware stages) and fills the report.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import onnx

from . import calibrated, coupling, model_io, planning, rewrite
from . import sensitivity as sensitivity_mod
from .coupling import Analysis
from .errors import NothingToPrune, PruneWarning, UsageError, ValidationError
from .options import FEW_CALIBRATION_SAMPLES, GRADIENT_IMPORTANCES, Options
from .progress import Progress, as_progress
from .report import GroupRow, Report, mac_count, params_count



@dataclass
class PruneResult:
    model: onnx.ModelProto | None  # None with analyse_only
    report: Report
    external_data: bool = False  # the input kept its weights in an external file
    sensitivity: sensitivity_mod.Sensitivity | None = None  # the analysis behind a sensitivity allocation
    fp32: onnx.ModelProto | None = None  # with quantize="int8": the pruned model before quantization


#: Models at least this large get Python's full cycle collection before the onnxruntime stages.
COLLECT_CYCLES_BYTES = 32 * 2**20


class _Timer:
    def __init__(self, progress: Progress):
        self.timings: dict[str, float] = {}
        self.progress = progress
        # A full collection frees the rewritten graph's leftovers (27 MB for ResNet-50) but takes
        # ~0.1 s in a process full of objects: set for models large enough to be worth it.
        self.collect_cycles = False

    @contextmanager
    def stage(self, name: str):
        # What the last stage and the dels since freed; cycles too before the stages that run
        # onnxruntime sessions (the memory peaks of a run).
        model_io.release_freed_memory(collect=self.collect_cycles and name in ("reference", "validate"))
        self.progress.stage(name)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 4)


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
        calibrated.gradients()  # torch missing: say so before any work
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
        # Data-free runs leave the original weights in the file (read per group); the
        # data-aware stages run the original in onnxruntime from memory and get them loaded.
        loaded = model_io.load_model(model, keep_mapped=calib is None)
        split = None
        original = loaded.model
        timer.collect_cycles = model_io.byte_size(original) >= COLLECT_CYCLES_BYTES
        if calib is not None:
            calib = calibration_mod.match(calib, original)
            split = calibration_mod.Holdback.of(calib, original, opts.seed)
        graph = model_io.to_graph(original)
    with timer.stage("groups"):
        analysis = coupling.analyse(graph)
        if calib is not None:
            analysis.lift_data_blocks()  # e.g. the hidden size under LayerNorm: recovery re-fits its readers
        # Read on demand: the loaded model stays the one full copy of the weights.
        values = model_io.WeightValues(graph, {m.constant for g in analysis.groups for m in g.members})
    _warn_custom_ops(graph, analysis)
    if not any(g.prunable for g in analysis.groups):
        reasons = sorted({r for g in analysis.groups for _, r in g.blocked})
        detail = f"; reasons: {'; '.join(reasons[:3])}" if reasons else ""
        raise NothingToPrune(f"no channel group can be pruned safely ({len(analysis.groups)} groups found{detail})")
    selected = _selected_groups(analysis, opts.groups)
    reference = None
    if opts.validate and not opts.analyse_only:
        from .validate import reference as run_reference

        with timer.stage("reference"):
            # The original's outputs now, while memory holds little but the loaded model
            # (the graph reads its weights lazily): onnxruntime's session needs ~2.5x the
            # model while it optimises.  It reads the input file itself when there is one.
            real = None if split is None else calibration_mod.batches(split.validation(VALIDATION_REAL_SAMPLES),
                                                                      original)
            reference = run_reference(original, opts.provider, opts.seed, feeds=real, original_file=loaded.path)
    given_scores = None
    if opts.importance == "activation" or opts.importance in GRADIENT_IMPORTANCES:
        with timer.stage("activations" if opts.importance == "activation" else opts.importance):
            ids = [g.id for g in analysis.prunable(selected)]
            given_scores = calibrated.data_scores(graph, original, analysis, calib, opts, ids)
    table = None
    if opts.allocation == "sensitivity" or opts.analyse_only:
        with timer.stage("sensitivity"):
            table, source = planning.sensitivity_table(original, graph, analysis, values, calib, selected,
                                                       given_scores, opts, progress)
        if opts.analyse_only:
            report = Report(options=opts.to_dict(), input=None if loaded.path is None else str(loaded.path))
            report.timings = timer.timings
            return PruneResult(model=None, report=report, external_data=loaded.external_data, sensitivity=table)
    with timer.stage("plan"):
        allocated = planning.plan_run(graph, analysis, values, opts, selected, given_scores, table, progress)
        maps = allocated.maps
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
            model_io.check_light(pruned)
            onnx.shape_inference.infer_shapes(model_io.weightless(pruned), check_type=True, strict_mode=True)
        except Exception as exc:  # noqa: BLE001
            raise ValidationError(f"pruned model fails onnx.checker (please report this bug): "
                                  f"{str(exc).splitlines()[0]}") from None
    recovered = None
    if opts.recover != "none":
        recovered = calibrated.recover(graph, original, analysis, maps, split, opts, timer, progress)
        pruned = model_io.to_model(graph, original)
        model_io.check_light(pruned, full_check=True)

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
        keeps, predicted = allocated.keeps, allocated.predicted
        for row in report.groups:
            if row.id in keeps and row.status == "pruned":
                row.sensitivity = {"level": round(1.0 - keeps[row.id] / row.channels_before, 4),
                                   "distortion": predicted[row.id]}
        report.sensitivity = {"source": source, "measure": table.measure, "samples": table.samples,
                              "levels": table.levels, "runs": sum(len(g.points) for g in table.groups),
                              "seconds": table.seconds, "backend": table.backend,
                              "predicted_distortion": float(sum(predicted.values())),
                              "budget_met": allocated.budget_met}
    if recovered is not None:
        if recovered.layers:
            report.attach_recovery(recovered.layers, analysis)
        report.recovery_model = recovered.model
        report.distill = recovered.distill
    with timer.stage("stats"):
        report.set_stats(params_count(original), mac_count(original), params_count(pruned), mac_count(pruned))
    del maps  # dense transport plans (tens of MB on ResNet-50): not needed past the report rows
    if opts.validate:
        from .validate import compare

        with timer.stage("validate"):
            if opts.quantize == "none":
                # Only the inputs of the original are read from here on: its weights go
                # before the pruned model's session starts (the graph that read them is gone
                # unless recovery ran).
                original, loaded.model = model_io.weightless(original), None
            report.validation = compare(original, pruned, opts.provider, ref=reference).to_dict()
    fp32 = None
    if opts.quantize == "int8":
        from .deploy import quantize_checked

        with timer.stage("quantize"):
            fp32 = pruned
            pruned, info = quantize_checked(original, fp32, split, opts.provider)
            report.quantization = info.to_dict()
    report.timings = timer.timings
    return PruneResult(model=pruned, report=report, external_data=loaded.external_data, fp32=fp32,
                       sensitivity=table)


#: At most this many held-back calibration samples are used to validate.
VALIDATION_REAL_SAMPLES = 64


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
