"""Activations on calibration data with onnxruntime: activation importance and layer-wise recovery.

This module imports onnxruntime (like :mod:`validate`); it is only imported
when calibration data is given.  Intermediate tensors are read by adding
them as graph outputs of a scratch copy of the model (the model we write is
never touched by that).  The calibration set is streamed in batches and only
per-channel sums or per-layer sufficient statistics are kept, so memory stays
bounded; convolutions over large feature maps use a seeded subsample of
spatial positions (at most ``max_rows`` rows per layer).

Recovery runs in *waves* from the input towards the output: a wave holds the
layers none of whose upstream layers are still waiting, so every layer is
solved on the real inputs of the already-recovered pruned model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import model_io, recovery
from .coupling import CONSUMER, Analysis
from .plans import ChannelMap, selection

Progress = Callable[[str], None]
LINEAR_OPS = ("Conv", "Gemm", "MatMul")
#: Calibration rows per layer (images x sampled positions) used for recovery.
DEFAULT_MAX_ROWS = 16384


def _one_blas_thread():
    """Small BLAS products between onnxruntime runs are much faster single-threaded (no thread hand-off)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed matter
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _session(model: onnx.ModelProto, outputs: list[str]) -> tuple[ort.InferenceSession, list[str]]:
    scratch = onnx.ModelProto()
    scratch.CopyFrom(model)
    have = {o.name for o in scratch.graph.output}
    for name in outputs:
        if name not in have:
            scratch.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # numpy (BLAS) works between runs: idle onnxruntime threads must not spin and starve it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Keep the exposed tensors exactly as the graph computes them.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(scratch.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, list(dict.fromkeys(outputs))


# --------------------------------------------------------------------------- activation importance
def activation_scores(original: onnx.ModelProto, graph: gs.Graph, analysis: Analysis, feeds: list[dict],
                      group_ids: list[int]) -> dict[int, np.ndarray]:
    """Per-channel mean |activation| at the group's consumer inputs, aggregated like the weight metrics.

    Each consumer input scores the group's channels; scores are divided by
    their mean and averaged over the consumers.
    """
    nodes = {n.name: n for n in graph.nodes}
    wanted: dict[int, list[tuple[str, int, int, int]]] = {}
    for gid in group_ids:
        group = analysis.groups[gid]
        for m in group.members:
            if m.role != CONSUMER or m.node not in nodes:
                continue
            tensor = nodes[m.node].inputs[0].name
            if tensor in analysis.axes:
                wanted.setdefault(gid, []).append((tensor, analysis.axes[tensor].axis, m.offset, m.block))
    names = sorted({t for entries in wanted.values() for t, *_ in entries})
    if not names:
        return {}
    sess, names = _session(original, names)
    axis_of = {t: a for entries in wanted.values() for t, a, *_ in entries}
    sums: dict[str, np.ndarray] = {}
    count = 0
    for feed in feeds:
        outs = dict(zip(names, sess.run(names, feed)))
        for name, value in outs.items():
            ax = axis_of[name] % value.ndim
            other = tuple(i for i in range(value.ndim) if i != ax)
            s = np.abs(value.astype(np.float64)).mean(axis=other) * value.shape[0]
            sums[name] = sums.get(name, 0) + s
        count += next(iter(feed.values())).shape[0]
    scores = {}
    for gid, entries in wanted.items():
        size = analysis.groups[gid].size
        total = np.zeros(size)
        for tensor, _, offset, block in entries:
            per = (sums[tensor] / max(count, 1))[offset:offset + size * block].reshape(size, block).mean(axis=1)
            mean = per.mean()
            total += per / mean if mean > 0 else per
        scores[gid] = total / len(entries)
    return scores


# --------------------------------------------------------------------------- recovery
@dataclass
class LayerRecovery:
    node: str
    op: str
    rows: int
    error_before: float  # relative ||T - Ŷ|| of the node's output on the calibration rows
    error_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def _constant(t) -> gs.Constant | None:
    return t if isinstance(t, gs.Constant) else None


def _candidate(node: gs.Node) -> str | None:
    """Why ``node`` cannot be re-solved, or None."""
    if node.op not in LINEAR_OPS or len(node.inputs) < 2:
        return "not a linear node"
    w = _constant(node.inputs[1])
    if w is None:
        return "weight computed at run time"
    if len(w.outputs) != 1:
        return "weight shared with another node"
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and (_constant(bias) is None or len(bias.outputs) != 1):
        return "bias computed at run time or shared"
    values = np.asarray(w.values)
    if not np.issubdtype(values.dtype, np.floating):
        return "non-float weight"
    if node.op == "Conv" and values.ndim != 4:
        return "only 2-D convolutions"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0 \
                or float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with transA/alpha/beta"
        if bias is not None and np.asarray(bias.values).size != values.shape[0 if node.attrs.get("transB", 0) else 1]:
            return "Gemm bias is not per output"
    if node.op == "MatMul" and values.ndim != 2:
        return "MatMul weight is not 2-D"
    return None


def _changed_tensors(graph: gs.Graph, edited: set[str]) -> set[str]:
    changed: set[str] = set()
    for node in graph.nodes:  # toposorted
        if any(t.name in edited or t.name in changed for t in node.inputs):
            changed.update(t.name for t in node.outputs)
    return changed


def _ancestors(graph: gs.Graph) -> dict[str, set[str]]:
    producer = {t.name: n for n in graph.nodes for t in n.outputs}
    anc: dict[str, set[str]] = {}
    for node in graph.nodes:
        s: set[str] = set()
        for t in node.inputs:
            p = producer.get(t.name)
            if p is not None:
                s.add(p.name)
                s |= anc[p.name]
        anc[node.name] = s
    return anc


def recover(graph: gs.Graph, original: onnx.ModelProto, analysis: Analysis, maps: dict[int, ChannelMap],
            feeds: list[dict], mode: str, *, alpha: float = recovery.DEFAULT_ALPHA,
            eps: float = recovery.DEFAULT_EWR_EPS, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0,
            target: str = "kept", progress: Progress | None = None) -> list[LayerRecovery]:
    """Re-solve, in place in ``graph`` (already rewritten by the maps), every pruned or downstream linear layer.

    ``target="kept"`` (default) regresses a pruned layer's output channels onto
    the original outputs of the *kept* channels; ``"fused"`` onto the
    transport-weighted averages the fused weights aim at (``average @ y``).
    Measured on the digits and Fashion-MNIST VGG models, ``kept`` is better:
    averaged pre-activations lose information through the next ReLU.  The
    fused weights stay the ridge prior either way.
    """
    maps = {gid: m for gid, m in maps.items() if not m.is_identity}
    if mode == "none" or not maps or not feeds:
        return []
    edited = {m.constant for gid in maps for m in analysis.groups[gid].members}
    changed = _changed_tensors(graph, edited)
    # Layers whose input changed, and the pruned producers themselves (their
    # fused filters are re-fitted to the kept channels' real outputs).
    pending = [n for n in graph.nodes if n.op in LINEAR_OPS and len(n.inputs) > 1
               and (n.inputs[0].name in changed or n.inputs[1].name in edited) and _candidate(n) is None]
    if mode == "bias":
        pending = [n for n in pending if n.op != "MatMul"]  # no bias slot to shift
    if not pending:
        return []
    anc = _ancestors(graph)
    sizes = {g.id: g.size for g in analysis.groups}
    if target == "kept":
        maps = {gid: selection(m.size, m.kept) for gid, m in maps.items()}
    n_images = sum(next(iter(f.values())).shape[0] for f in feeds)
    results: list[LayerRecovery] = []
    done = 0
    while pending:
        names = {n.name for n in pending}
        wave = [n for n in pending if not (anc[n.name] & names)]
        in_wave = {n.name for n in wave}
        pending = [n for n in pending if n.name not in in_wave]
        pruned = model_io.to_model(graph, original, infer=False)
        sess_p, xin = _session(pruned, [n.inputs[0].name for n in wave])
        sess_o, yout = _session(original, [n.outputs[0].name for n in wave])
        state = []
        for k, node in enumerate(wave):
            w = node.inputs[1]
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            lin = recovery.from_node(node.op, np.asarray(w.values), None if bias is None else np.asarray(bias.values),
                                     dict(node.attrs))
            out_axis = analysis.axes.get(node.outputs[0].name)
            m = None if out_axis is None else recovery.output_map(out_axis.segments, analysis.space_group, maps, sizes)
            fit_bias = node.op != "MatMul"
            st = recovery.Stats(lin.groups, lin.weight.shape[1], lin.weight.shape[2], fit_bias=fit_bias,
                                keep_rows=recovery.EWR_ROWS if mode == "ewr" else 0, seed=seed)
            state.append((node, lin, m, st, np.random.default_rng([seed, done + k])))
        with _one_blas_thread():
            _collect(feeds, sess_p, xin, sess_o, yout, state, max_rows, n_images)
        for node, lin, m, st, _ in state:
            prior = recovery.augment(lin, st.fit_bias)
            before = st.relative_error(prior)
            with _one_blas_thread():
                new = recovery.solve(mode, st, prior, alpha, eps)
            after = st.relative_error(new)
            _write(node, lin, new, st.fit_bias)
            results.append(LayerRecovery(node.name, node.op, st.n, round(before, 6), round(after, 6)))
        done += len(wave)
        if progress:
            progress(f"  recovered {done} layers")
    return results


def _collect(feeds, sess_p, xin, sess_o, yout, state, max_rows: int, n_images: int) -> None:
    """Stream the calibration batches through both models and feed each layer's statistics."""
    per_image = max(1, math.ceil(max_rows / max(n_images, 1)))
    for feed in feeds:
        xs = dict(zip(xin, sess_p.run(xin, feed)))
        ys = dict(zip(yout, sess_o.run(yout, feed)))
        for node, lin, m, st, rng in state:
            x, y = xs[node.inputs[0].name], ys[node.outputs[0].name]
            if lin.kind == "Conv":
                positions = y.shape[2] * y.shape[3]
                pos = None if per_image >= positions else np.sort(rng.choice(positions, per_image, replace=False))
                xr, yr = recovery.conv_rows(x, y, lin, pos, tuple(lin.weight_shape[2:]))
            else:
                xr, yr = recovery.linear_rows(x, y)
                cap = per_image * x.shape[0]
                if xr.shape[0] > cap:
                    idx = np.sort(rng.choice(xr.shape[0], cap, replace=False))
                    xr, yr = xr[idx], yr[idx]
            t = yr.astype(np.float64) if m is None else yr.astype(np.float64) @ m.T
            st.add(xr, t.reshape(t.shape[0], lin.groups, -1))


def _write(node: gs.Node, lin: recovery.Linear, new: np.ndarray, fit_bias: bool) -> None:
    w = node.inputs[1]
    dtype = np.asarray(w.values).dtype
    w.values = np.ascontiguousarray(recovery.to_weight(lin, new[:, :lin.weight.shape[1], :]).astype(dtype))
    if not fit_bias:
        return
    b = new[:, -1, :].reshape(-1)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None:
        shape = np.asarray(bias.values).shape
        bias.values = np.ascontiguousarray(b.reshape(shape).astype(np.asarray(bias.values).dtype))
    elif np.any(b != 0):
        const = gs.Constant(f"{node.name}__recovered_bias", np.ascontiguousarray(b.astype(dtype)))
        if len(node.inputs) > 2:
            node.inputs[2] = const
        else:
            node.inputs.append(const)
