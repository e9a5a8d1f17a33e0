"""The data-aware stages wired together: importance from data, recovery, distillation.

Everything here needs calibration data and works on one
:class:`~onnx_intrafusion.calibration.Holdback` split made once per run, so
recovery, distillation, validation and int8 calibration never judge a step
on samples another step fitted on.  The gradient stages (torch) are imported
only when an option asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from . import calibration as calibration_mod
from .coupling import Analysis
from .errors import UsageError
from .options import GRADIENT_IMPORTANCES, Options
from .progress import Progress


def gradients():
    """The torch-based stages (:mod:`finetune`), or a one-line error telling how to get them."""
    try:
        from . import finetune
    except ImportError as exc:
        if "torch" not in str(exc):
            raise
        raise UsageError("--recover distill and --importance taylor/prospr need torch: "
                         "pip install onnx-intrafusion[torch]") from None
    return finetune


def data_scores(graph, original: onnx.ModelProto, analysis: Analysis, calib: dict[str, np.ndarray],
                opts: Options, ids: list[int]) -> dict[int, np.ndarray]:
    """Per-channel scores of groups ``ids`` from data: activation norms, Taylor or ProsPr."""
    if opts.importance == "activation":
        from .activations import activation_scores

        return activation_scores(original, graph, analysis, calibration_mod.batches(calib, original), ids)
    assert opts.importance in GRADIENT_IMPORTANCES
    return gradients().IMPORTANCES[opts.importance](graph, original, analysis, calib, ids, seed=opts.seed)


@dataclass
class Recovered:
    """What the recovery stages did (records for the report)."""
    layers: list
    model: dict | None  # the whole-model never-worse check (RecoveryModel.to_dict())
    distill: dict | None = None


def recover(graph, original: onnx.ModelProto, analysis: Analysis, maps: dict, split: calibration_mod.Holdback,
            opts: Options, timer, progress: Progress) -> Recovered:
    """Re-fit the pruned graph's weights in place (``opts.recover``), each step checked on ``split.held``.

    Distillation starts from the least-squares re-fit, on the same split.
    ``timer.stage(name)`` times each step as its own stage.
    """
    from .activations import recover as recover_layers

    with timer.stage("recover"):
        start = "lstsq" if opts.recover == "distill" else opts.recover
        held = None if split.held is None else calibration_mod.batches(split.held, original)
        # Options.resolve leaves alpha/eps None where the mode does not use them.
        given = {k: v for k, v in (("alpha", opts.recover_alpha), ("eps", opts.ewr_eps)) if v is not None}
        result = recover_layers(graph, original, analysis, maps, calibration_mod.batches(split.fit, original),
                                start, holdback=held, seed=opts.seed, progress=progress, **given)
    out = Recovered(result.layers, None if result.model is None else result.model.to_dict())
    if opts.recover == "distill":
        with timer.stage("distill"):
            out.distill = _distill(graph, original, split, opts, progress)
    return out


def _distill(graph, original: onnx.ModelProto, split: calibration_mod.Holdback, opts: Options,
             progress: Progress) -> dict:
    """Fine-tune the pruned graph's weights in place towards the original's outputs; returns the record."""
    from .differentiable import assign

    if split.held is None:
        raise UsageError("--recover distill needs calibration samples to hold back (give at least 2, and at "
                         "least the model's fixed batch size per held-back part)")
    with progress.steps("distillation epochs", opts.finetune_epochs) as steps:
        def epoch_done(epoch: int, total: int, loss: float, held_back: float) -> None:
            steps.advance(detail=f"loss {loss:.4g}, held-back distortion {held_back:.4g}")

        weights, record = gradients().distill(graph, original, split.fit, split.held, epochs=opts.finetune_epochs,
                                              time_budget=opts.finetune_time, seed=opts.seed,
                                              progress=epoch_done)
    assign(graph, weights)
    record["weights_changed"] = len(weights)
    return record
