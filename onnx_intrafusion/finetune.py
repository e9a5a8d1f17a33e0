"""Gradient-based steps on unlabelled data: distillation recovery, Taylor and ProsPr importance.

All three differentiate a loss against the *original* model's outputs
(computed once with onnxruntime) through :class:`differentiable.GraphModule`;
no labels are ever needed.  torch is imported here (and only here and in
:mod:`differentiable`); the pipeline imports this module only when an option
asks for it.

* :func:`distill` fine-tunes the pruned model's weights to reproduce the
  original's outputs: KL divergence at a temperature for class scores (the
  student learns the teacher's whole distribution, the "dark knowledge" of
  Hinton et al.), relative MSE otherwise.  Adam with a cosine schedule.  The
  output distortion (:mod:`distortion`) on the held-back samples is measured
  before training and after every epoch, and the weights with the lowest one
  are returned, the starting weights included: distillation never makes the
  held-back distortion worse.
* :func:`taylor_scores` and :func:`prospr_scores` score the channels of every
  group of the *unpruned* model.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from . import calibration, distortion, validate
from .coupling import CONSUMER, Analysis
from .differentiable import GraphModule

#: progress(epoch, epochs, mean training loss, held-back distortion)
EpochProgress = Callable[[int, int, float, float], None]

DEFAULT_EPOCHS = 10
DEFAULT_TEMPERATURE = 4.0
DEFAULT_LR = 3e-4
DEFAULT_BATCH = 64
PROSPR_STEPS = 3
PROSPR_LR = 1e-3
#: Samples of the fit split used by the importances (enough for a stable ranking, bounded cost).
IMPORTANCE_SAMPLES = 2048


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def _deterministic(seed: int):
    """Seeded torch; cuDNN pinned to deterministic kernels on a GPU (restored afterwards).

    The CPU kernels used here are deterministic already.
    ``torch.use_deterministic_algorithms`` is not used: it imports torch's
    compiler stack, ~10 s on the 2-core CI machine, for no change on CPU.
    """
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    torch.manual_seed(seed)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


def _trim(arrays: dict[str, np.ndarray], model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], int]:
    """The arrays cut to a multiple of a fixed batch size (if the model has one) and that batch size."""
    fixed = {dims[0] for dims, _ in calibration.input_specs(model).values() if dims and dims[0] is not None}
    n = calibration.sample_count(arrays)
    if not fixed:
        return arrays, 0
    size = fixed.pop()
    return {k: v[:n - n % size] for k, v in arrays.items()}, size


def teacher_outputs(original: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original model's outputs on ``arrays`` (onnxruntime, once)."""
    outs, _ = validate.run(original, calibration.batches(arrays, original, 256))
    return outs


def _index_batches(n: int, size: int, fixed: bool, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Sample indices per batch (shuffled when ``rng``); a fixed batch size drops the remainder."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % size if fixed else n
    return [order[i:i + size] for i in range(0, stop, size)]


def _to(arrays: dict[str, np.ndarray], idx, dev) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(dev) for k, v in arrays.items()}


def _float_outputs(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]):
    """(name, student, teacher, class scores?) per float output (class scores as :func:`distortion.is_class_scores`)."""
    for name, t in teacher.items():
        if t.is_floating_point():
            yield name, student[name], t, t.dim() == 2 and t.shape[1] >= 2


def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                 temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """KL(teacher || student) at ``temperature`` (times T^2) for class scores, relative MSE otherwise."""
    total = 0.0
    for _, s, t, classes in _float_outputs(student, teacher):
        if classes:
            lp_t = torch.log_softmax(t / temperature, dim=1)
            lp_s = torch.log_softmax(s / temperature, dim=1)
            total = total + (lp_t.exp() * (lp_t - lp_s)).sum(dim=1).mean() * temperature ** 2
        else:
            total = total + ((s - t) ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
    return total / max(len(teacher), 1)


def _predict(student: GraphModule, arrays: dict[str, np.ndarray], size: int, fixed: bool, dev) -> dict:
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for idx in _index_batches(calibration.sample_count(arrays), size, fixed, None):
            for name, value in student(_to(arrays, idx, dev)).items():
                parts.setdefault(name, []).append(value.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def distill(graph: gs.Graph, original: onnx.ModelProto, fit: dict[str, np.ndarray], held: dict[str, np.ndarray],
            *, epochs: int = DEFAULT_EPOCHS, time_budget: float | None = None, lr: float = DEFAULT_LR,
            batch_size: int = DEFAULT_BATCH, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
            progress: EpochProgress | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Fine-tune ``graph``'s weights (the pruned model) to reproduce ``original`` on ``fit``.

    Returns (new weight values by constant name, only those that changed;
    record).  The graph is not modified: write the weights with
    :func:`differentiable.assign`.  The record holds the held-back
    distortion before and after (``held_back_before``/``held_back_after``),
    the epochs run, the seconds spent and the device.  ``time_budget``
    (seconds) stops training after the step that exceeds it; the held-back
    check of that partial epoch still runs.
    """
    start = time.perf_counter()
    dev = device()
    fit, fixed_size = _trim(fit, original)
    held, _ = _trim(held, original)
    size = fixed_size or batch_size
    fixed = bool(fixed_size)
    with _deterministic(seed):
        student = GraphModule(graph).to(dev)
        teacher_fit = teacher_outputs(original, fit)
        teacher_held = teacher_outputs(original, held)

        def held_back() -> float:
            return distortion.output_distortion(teacher_held, _predict(student, held, size, fixed, dev))

        weights = student.named_weights()
        best_value = held_back()
        record = {"held_back_before": best_value, "held_back_after": best_value, "epochs": 0, "best_epoch": 0,
                  "device": str(dev), "measure": distortion.measure_name(teacher_held)}
        best = {k: p.detach().clone() for k, p in weights.items()}  # the starting weights win ties
        n = calibration.sample_count(fit)
        steps_per_epoch = len(_index_batches(n, size, fixed, None))
        if epochs > 0 and steps_per_epoch and weights:
            opt = torch.optim.Adam(weights.values(), lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
            rng = np.random.default_rng([seed, 0xD157])
            out_of_time = False
            for epoch in range(1, epochs + 1):
                losses = []
                for idx in _index_batches(n, size, fixed, rng):
                    loss = distill_loss(student(_to(fit, idx, dev)), _to(teacher_fit, idx, dev), temperature)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    if time_budget is not None and time.perf_counter() - start > time_budget:
                        out_of_time = True
                        break
                value = held_back()
                record["epochs"] = epoch
                if value < best_value:
                    best_value, best = value, {k: p.detach().clone() for k, p in weights.items()}
                    record["best_epoch"] = epoch
                if progress:
                    progress(epoch, epochs, float(np.mean(losses)) if losses else float("nan"), value)
                if out_of_time:
                    record["stopped_by_time"] = True
                    break
        with torch.no_grad():
            for k, p in weights.items():
                p.copy_(best[k])
        record["held_back_after"] = best_value
        record["seconds"] = round(time.perf_counter() - start, 3)
        return student.weights(only_changed=True), record


# ------------------------------------------------------------------------------------ importance
def consumer_sites(graph: gs.Graph, analysis: Analysis, group_ids) -> dict[int, list[tuple[str, int, int, int]]]:
    """Per group: (tensor, channel axis, offset, block) of every consumer's data input.

    A group's channels are removed exactly where its consumers read them, so
    masks and activation x gradient products are taken there (after any
    BatchNorm shift or activation between producer and consumer, which a
    removal also removes).
    """
    nodes = {n.name: n for n in graph.nodes}
    sites: dict[int, list[tuple[str, int, int, int]]] = {}
    for gid in group_ids:
        for m in analysis.groups[gid].members:
            if m.role != CONSUMER or m.node not in nodes:
                continue
            data = [t for t in nodes[m.node].inputs if t.name != m.constant and isinstance(t, gs.Variable)]
            if data and data[0].name in analysis.axes:
                entry = (data[0].name, analysis.axes[data[0].name].axis, m.offset, m.block)
                if entry not in sites.setdefault(gid, []):
                    sites[gid].append(entry)
    return sites


def _group_scores(per_tensor: dict[str, np.ndarray], sites, analysis: Analysis) -> dict[int, np.ndarray]:
    """Per-position scores of the site tensors -> per-channel group scores (mean-normalised per site)."""
    scores = {}
    for gid, entries in sites.items():
        size = analysis.groups[gid].size
        total = np.zeros(size)
        for tensor, _, offset, block in entries:
            per = per_tensor[tensor][offset:offset + size * block].reshape(size, block).sum(axis=1)
            mean = per.mean()
            total += per / mean if mean > 0 else per
        scores[gid] = total / len(entries)
    return scores


def importance_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The label-free "data loss" whose gradients rank channels.

    The distillation loss is exactly 0, with a zero gradient, while the
    student is the unpruned teacher, so its gradients say nothing.  As the
    substitute for the labelled task loss of the Taylor and ProsPr papers:
    class scores use cross-entropy against the teacher's predicted class (a
    pseudo-label; soft labels at any common temperature would again give a
    zero gradient at the start), other outputs (embeddings, feature maps)
    half their energy relative to the teacher's, ``||f||^2 / (2 ||t||^2)``,
    whose first-order change when a channel is removed is the part of the
    output that channel carries.  (A random projection of the output was
    tried first: it is linear, so ProsPr's SGD steps move every channel's
    consumer weights a lot and a channel nothing reads no longer ranks last.)
    """
    total = 0.0
    for _, s, t, classes in _float_outputs(student, teacher):
        if classes:
            total = total + torch.nn.functional.cross_entropy(s, t.argmax(dim=1))
        else:
            total = total + 0.5 * (s ** 2).mean() / (t ** 2).mean().clamp_min(1e-12)
    return total


def _importance_setup(graph, original, analysis, fit, group_ids, seed):
    dev = device()
    sites = consumer_sites(graph, analysis, group_ids)
    n = min(calibration.sample_count(fit), IMPORTANCE_SAMPLES)
    fit = {k: v[:n] for k, v in fit.items()}
    fit, fixed_size = _trim(fit, original)
    module = GraphModule(graph).to(dev)
    for p in module.params.values():
        p.requires_grad_(False)
    teacher = teacher_outputs(original, fit)
    return dev, sites, fit, fixed_size, module, teacher


def _mask_shape(value: torch.Tensor, axis: int, per_sample: bool) -> list[int]:
    axis %= value.dim()
    return [value.shape[i] if (i == axis or (per_sample and i == 0)) else 1 for i in range(value.dim())]


def taylor_scores(graph: gs.Graph, original: onnx.ModelProto, analysis: Analysis, fit: dict[str, np.ndarray],
                  group_ids, *, batch_size: int = DEFAULT_BATCH, seed: int = 0) -> dict[int, np.ndarray]:
    """First-order Taylor importance (Molchanov et al., 2019) of every group's channels.

    Per sample, ``|sum over positions of activation x d loss / d activation|``
    at each consumer input, summed over the calibration samples (at most
    :data:`IMPORTANCE_SAMPLES`), the loss being :func:`importance_loss`.
    This is the first-order estimate of the loss change when the channel is
    removed.  ``graph`` is the unpruned model (``model_io.to_graph``).
    """
    with _deterministic(seed):
        dev, sites, fit, fixed_size, module, teacher = _importance_setup(
            graph, original, analysis, fit, group_ids, seed)
        axes = {t: a for entries in sites.values() for t, a, *_ in entries}
        sums: dict[str, torch.Tensor] = {}
        lengths: dict[str, int] = {}
        size = fixed_size or batch_size
        for idx in _index_batches(calibration.sample_count(fit), size, bool(fixed_size), None):
            masks: dict[str, torch.Tensor] = {}

            def hook(name):
                def apply(value):
                    lengths[name] = value.shape[axes[name] % value.dim()]
                    masks[name] = torch.ones(_mask_shape(value, axes[name], True), device=value.device,
                                             dtype=value.dtype, requires_grad=True)
                    return value * masks[name]
                return apply

            out = module(_to(fit, idx, dev), hooks={t: hook(t) for t in axes})
            loss = importance_loss(out, _to(teacher, idx, dev)) * len(idx)
            names = list(masks)
            grads = torch.autograd.grad(loss, [masks[t] for t in names], allow_unused=True)
            for t, g in zip(names, grads):
                if g is None:
                    continue
                per = g.abs().reshape(g.shape[0], -1).sum(dim=0) if axes[t] % g.dim() else g.abs().reshape(-1)
                sums[t] = sums.get(t, 0) + per.double()
        # A tensor that got no gradient at all (nothing downstream reaches the loss) scores 0.
        per_tensor = {t: sums[t].cpu().numpy() if t in sums else np.zeros(lengths[t]) for t in axes}
        return _group_scores(per_tensor, sites, analysis)


def prospr_scores(graph: gs.Graph, original: onnx.ModelProto, analysis: Analysis, fit: dict[str, np.ndarray],
                  group_ids, *, steps: int = PROSPR_STEPS, lr: float = PROSPR_LR, batch_size: int = DEFAULT_BATCH,
                  seed: int = 0) -> dict[int, np.ndarray]:
    """ProsPr importance (Alizadeh et al., ICLR 2022) of every group's channels.

    Multiplicative masks, initialised at 1, sit on every channel where the
    consumers read it; ``steps`` SGD steps (learning rate ``lr``) on
    :func:`importance_loss` are taken through the masked model, each on its
    own batch, and the importance is ``|d loss after the steps / d mask|``
    on a further batch: the meta-gradient through the steps
    (``create_graph=True``), which ranks channels by how much the network
    can still learn with them, not only by their effect now.  The fit
    samples (at most :data:`IMPORTANCE_SAMPLES`) are cut into rounds of
    ``steps + 1`` batches that each start from the original weights; the
    meta-gradients of the rounds are summed before the absolute value.
    """
    with _deterministic(seed):
        dev, sites, fit, fixed_size, module, teacher = _importance_setup(
            graph, original, analysis, fit, group_ids, seed)
        axes = {t: a for entries in sites.values() for t, a, *_ in entries}
        size = fixed_size or batch_size
        n = calibration.sample_count(fit)
        if not fixed_size:
            size = min(size, max(1, n // (steps + 1)))
        batches = _index_batches(n, size, True, None)
        masks: dict[str, torch.Tensor] = {}

        def hook(name):
            def apply(value):
                shape = _mask_shape(value, axes[name], False)
                if name not in masks:
                    masks[name] = torch.ones(value.shape[axes[name] % value.dim()], device=value.device,
                                             dtype=value.dtype, requires_grad=True)
                return value * masks[name].reshape(shape)
            return apply

        hooks = {t: hook(t) for t in axes}
        base = {name: p.detach() for name, p in module.named_weights().items()}
        total: dict[str, torch.Tensor] = {}
        rounds = [batches[i:i + steps + 1] for i in range(0, len(batches) - steps, steps + 1)] or [batches]
        for chunk in rounds:
            weights = {k: v.clone().requires_grad_(True) for k, v in base.items()}
            for idx in chunk[:-1]:
                loss = importance_loss(module(_to(fit, idx, dev), hooks=hooks, params=weights),
                                       _to(teacher, idx, dev))
                grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True, allow_unused=True)
                weights = {k: (w - lr * g if g is not None else w) for (k, w), g in zip(weights.items(), grads)}
            idx = chunk[-1]
            loss = importance_loss(module(_to(fit, idx, dev), hooks=hooks, params=weights),
                                   _to(teacher, idx, dev))
            names = list(masks)
            grads = torch.autograd.grad(loss, [masks[t] for t in names], allow_unused=True)
            for t, g in zip(names, grads):
                if g is not None:
                    total[t] = total.get(t, 0) + g.double()
        per_tensor = {t: total[t].abs().cpu().numpy() if t in total else np.zeros(masks[t].numel()) for t in axes}
        return _group_scores(per_tensor, sites, analysis)


IMPORTANCES = {"taylor": taylor_scores, "prospr": prospr_scores}

__all__ = ["distill", "distill_loss", "taylor_scores", "prospr_scores", "consumer_sites", "importance_loss",
           "teacher_outputs", "device", "IMPORTANCES"]
