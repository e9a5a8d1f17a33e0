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
solved on the real inputs of the already-recovered pruned model.  A wave
runs only its slice of the pruned graph (from tensors the previous wave
left, kept within a memory budget) and, batch by batch next to it, its
slice of the original graph for the targets: over all waves the original
model runs once, and target rows go into the statistics as they come
instead of being stored.  Recovery fits on the calibration
batches and is checked on held-back ones, per layer and for the whole
model's outputs; what got worse there is put back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from . import model_io, recovery
from .coupling import CONSUMER, Analysis
from .distortion import measure_name, output_distortion
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


def _run_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # numpy (BLAS) works between runs: idle onnxruntime threads must not spin and starve it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Keep the exposed tensors exactly as the graph computes them.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _session(model: onnx.ModelProto, outputs: list[str]) -> tuple[ort.InferenceSession, list[str]]:
    scratch = onnx.ModelProto()
    scratch.CopyFrom(model)
    have = {o.name for o in scratch.graph.output}
    for name in outputs:
        if name not in have:
            scratch.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    sess = _run_session(scratch)
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
#: Share of the available memory that cached activations and stored targets may take.
MEMORY_FRACTION = 0.25
#: Outputs kept: the re-fitted weights or the weights before recovery.
RECOVERED, UNRECOVERED = "recovered", "unrecovered"


@dataclass
class LayerRecovery:
    """One re-solved layer: relative ``||T - Ŷ||`` of its output on the fit rows and on held-back rows."""

    node: str
    op: str
    rows: int
    error_before: float  # on the rows the fit saw
    error_after: float
    held_back_rows: int = 0
    held_back_before: float | None = None  # on held-back rows (never fitted on)
    held_back_after: float | None = None
    kept: str = RECOVERED  # "unrecovered": the held-back error got worse, the old weights stay
    alpha: float | None = None  # ridge strength used (lstsq picks it on held-back rows)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelRecovery:
    """The whole model's output distortion on held-back samples before and after recovery, and which was kept."""

    measure: str
    held_back_samples: int
    before: float
    after: float
    kept: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryResult:
    layers: list[LayerRecovery] = field(default_factory=list)
    model: ModelRecovery | None = None  # None without held-back samples


def available_memory() -> int:
    """Bytes of memory available to this process now (Linux ``MemAvailable``; 4 GiB when unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


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


def _bias_add(node: gs.Node, graph_outputs: set[str]) -> tuple[gs.Node, gs.Constant] | None:
    """The ``Add`` of a per-output constant that is a MatMul's only consumer (a Linear layer exported as two ops).

    Its constant is the layer's bias: fitting it with the weights lets the
    re-fit absorb the mean that removed neurons contributed (there is no
    bias slot in MatMul itself).
    """
    out = node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    const = _constant(add.inputs[1] if add.inputs[0] is out else add.inputs[0])
    if const is None or len(const.outputs) != 1:
        return None
    values = np.asarray(const.values)
    n_out = np.asarray(node.inputs[1].values).shape[-1]
    if not np.issubdtype(values.dtype, np.floating) or values.size != n_out or values.ndim < 1 \
            or values.shape[-1] != n_out:
        return None
    return add, const


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


# --------------------------------------------------------------------------- running parts of a graph
def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the subgraphs (If/Loop/Scan bodies) of ``node`` read."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | \
                {t.name for t in g.initializer}
            for n in g.node:
                names |= {i for i in n.input if i and i not in inner}
                names |= _subgraph_inputs(n) - inner
    return names


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    return {i for i in node.input if i} | _subgraph_inputs(node)


def _needed(graph: onnx.GraphProto, wanted: list[str], available: set[str]) -> list[int]:
    """Indices of the nodes that compute ``wanted`` from ``available`` tensors (Constant nodes always rerun)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    initializers = {t.name for t in graph.initializer}
    need: set[int] = set()
    stack = list(wanted)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name in initializers:
            continue
        seen.add(name)
        i = producer.get(name)
        if i is None or i in need or (name in available and graph.node[i].op_type != "Constant"):
            continue
        need.add(i)
        stack.extend(_node_inputs(graph.node[i]))
    return sorted(need)


def _segment(model: onnx.ModelProto, nodes: list[int], inputs: dict[str, np.dtype], outputs: list[str]
             ) -> onnx.ModelProto:
    """A model of ``nodes`` of ``model`` reading ``inputs`` (graph inputs or cached tensors), giving ``outputs``."""
    g = model.graph
    chosen = [g.node[i] for i in nodes]
    used = set().union(*(_node_inputs(n) for n in chosen)) if chosen else set()
    declared = {i.name: i for i in g.input}
    ins = [declared[name] if name in declared else
           onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(dtype), None)
           for name, dtype in inputs.items() if name in used]
    graph = onnx.helper.make_graph(chosen, g.name, ins, [onnx.ValueInfoProto(name=o) for o in outputs],
                                   [t for t in g.initializer if t.name in used])
    out = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(out, name, getattr(model, name))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.CopyFrom(graph)
    return out


class _Runner:
    """Computes tensors of a model on every calibration batch, reusing what earlier calls computed.

    With ``cache`` on, the tensors that later calls may need (outputs of the
    nodes already run that feed nodes not yet run) are kept for all batches
    while they fit in ``budget`` bytes, so each call runs only the part of
    the graph between the previous tensors and the new ones: a wave of
    recovery costs one slice of the model instead of a whole forward pass.
    The nodes already run must not change afterwards (recovery only edits
    layers of later waves, which are never among them).
    """

    def __init__(self, batches: list[dict], budget: Callable[[], int], cache: bool):
        self.batches, self.budget, self.use_cache = batches, budget, cache
        self.cache: dict[str, list[np.ndarray]] = {}
        self.done: set[str] = set()  # outputs of the nodes whose results are cached or consumed
        self.dropped = False  # a cache did not fit in the budget: calls run from the graph inputs again

    def cache_bytes(self) -> int:
        return sum(a.nbytes for arrays in self.cache.values() for a in arrays)

    def run(self, model: onnx.ModelProto, wanted: list[str]):
        """Yield ``(batch index, {name: array})`` for every batch."""
        feeds = set(self.batches[0])
        available = feeds | set(self.cache)
        need = [w for w in dict.fromkeys(wanted) if w not in available]
        idx = _needed(model.graph, need, available)
        frontier: list[str] = []
        if self.use_cache:
            done = self.done | {o for i in idx for o in model.graph.node[i].output}
            constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
            later = set().union(*(_node_inputs(n) for n in model.graph.node if not set(n.output) <= done))
            frontier = sorted((later & done) - constants - feeds)
        outputs = list(dict.fromkeys(need + [f for f in frontier if f not in self.cache]))
        sess = None
        if outputs:
            dtypes = {k: v.dtype for k, v in self.batches[0].items()}
            dtypes.update({k: v[0].dtype for k, v in self.cache.items()})
            seg = _segment(model, idx, dtypes, outputs)
            sess = _run_session(seg)
            inputs = [i.name for i in sess.get_inputs()]
        new_cache: dict[str, list[np.ndarray]] | None = {f: [] for f in frontier} if frontier else None
        for b, feed in enumerate(self.batches):
            have = {**feed, **{k: v[b] for k, v in self.cache.items()}}
            if sess is not None:
                have.update(zip(outputs, sess.run(outputs, {k: have[k] for k in inputs})))
            if new_cache is not None:
                for f in frontier:
                    new_cache[f].append(have[f])
                if b == 0 and sum(have[f].nbytes for f in frontier) * len(self.batches) > self.budget():
                    new_cache = None  # too big to keep: the next call starts from the graph inputs
                    self.dropped = True
            yield b, {w: have[w] for w in wanted}
        if new_cache is None:
            self.cache, self.done = {}, set()
        else:
            self.cache, self.done = new_cache, (done if self.use_cache else set())


# --------------------------------------------------------------------------- one layer
@dataclass
class _Layer:
    index: int
    node: gs.Node
    lin: recovery.Linear
    bias: gs.Constant | None  # the bias tensor written back (node input or the fused Add's constant)
    target: str  # tensor whose original value is the target: the node's output or its bias Add's
    fit_bias: bool
    out_map: np.ndarray | None
    fit: recovery.Stats | None  # made by ``stats`` when the layer's wave starts: the Gram matrices of all
    held: recovery.Stats | None  # layers at once would take gigabytes on a transformer
    selected: dict[int, tuple] = field(default_factory=dict)  # batch -> (rows or positions, target rows, out hw)
    rng: np.random.Generator | None = None
    stats: Callable[[], tuple[recovery.Stats, recovery.Stats]] | None = None  # makes (fit, held)

    def open(self) -> None:
        if self.fit is None:
            self.fit, self.held = self.stats()

    def close(self) -> None:
        self.fit = self.held = None

    def __post_init__(self):
        # A 0/1 selection map (plain pruning, target "kept") picks columns: stored targets are only the
        # kept columns (half the memory at 0.5) and need no float64 product with the map.
        self.cols = _selected_columns(self.out_map)
        if self.cols is not None:
            self.out_map = None  # (kept x all) float64, tens of MB per wide layer: the columns say the same

    def _targets(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.cols is None else rows[:, self.cols]

    def select(self, b: int, y: np.ndarray, feed: dict, per_image: int, masks: list[str]) -> None:
        """Choose and store this batch's target rows (batches come in order: any schedule picks the same rows)."""
        rng = self.rng
        if self.lin.kind == "Conv":
            positions = y.shape[2] * y.shape[3]
            pos = None if per_image >= positions else np.sort(rng.choice(positions, per_image, replace=False))
            self.selected[b] = (pos, self._targets(recovery.conv_targets(y, pos)), y.shape[2:])
            return
        rows = _valid_rows(y, feed, masks)
        # images in this batch from the feed, not y.shape[0]: sequence-first layouts ([tokens, batch,
        # features], as nn.MultiheadAttention exports) would otherwise lift the cap tokens/batch-fold
        cap = per_image * next(iter(feed.values())).shape[0]
        count = y.size // y.shape[-1] if rows is None else len(rows)
        if count > cap:
            pick = np.sort(rng.choice(count, cap, replace=False))
            rows = pick if rows is None else rows[pick]
        flat = y.reshape(-1, y.shape[-1])
        self.selected[b] = (rows, self._targets(flat if rows is None else flat[rows]), None)

    def add(self, b: int, x: np.ndarray, held: bool) -> None:
        rows, yr, out_hw = self.selected.pop(b)
        if self.lin.kind == "Conv":
            xr = recovery.conv_patches(x, self.lin, rows, tuple(self.lin.weight_shape[2:]), out_hw)
        else:
            xr = x.reshape(-1, 1, x.shape[-1])
            xr = xr if rows is None else xr[rows]
        t = yr  # float32 as computed; a mixing map is applied in float64
        if self.out_map is not None and self.cols is None:
            t = t.astype(np.float64) @ self.out_map.T
        (self.held if held else self.fit).add(xr, t.reshape(t.shape[0], self.lin.groups, -1))

    def target_bytes(self, rows: int) -> int:
        if self.cols is not None:
            return rows * len(self.cols) * 4
        return rows * (self.out_map.shape[1] if self.out_map is not None else self.lin.out_channels) * 4


def _selected_columns(out_map: np.ndarray | None) -> np.ndarray | None:
    """The column of the single 1 in each row of a 0/1 selection map; None for any other map.

    Gathering these columns gives exactly ``t @ out_map.T`` (each output is one input times 1 plus zeros).
    """
    if out_map is None:
        return None
    nonzero = out_map != 0
    if not np.all(nonzero.sum(axis=1) == 1):
        return None
    cols = nonzero.argmax(axis=1)
    return cols if np.all(out_map[np.arange(len(cols)), cols] == 1.0) else None


def _valid_rows(y: np.ndarray, feed: dict, masks: list[str]) -> np.ndarray | None:
    """Flat rows of a ``[batch, sequence, features]`` tensor whose token is not padding (None: all rows).

    A graph input named like an attention mask, of shape ``[batch, sequence]``
    matching the tensor, marks padding with 0: those positions are read by
    nobody downstream (the mask removes them from attention and pooling), so
    fitting them would spend the fit on rows that do not matter.
    """
    if y.ndim != 3:
        return None
    for name in masks:
        mask = feed[name]
        if mask.shape == y.shape[:2]:
            return np.flatnonzero(mask.reshape(-1) != 0)
    return None


def _mask_inputs(batches: list[dict]) -> list[str]:
    return [k for k, v in batches[0].items() if "mask" in k.lower() and v.ndim == 2
            and all(np.isin(f[k], (0, 1)).all() for f in batches)]


def _make_layer(index: int, node: gs.Node, analysis: Analysis, maps: dict, sizes: dict, graph_outputs: set[str],
                mode: str, seed: int) -> _Layer:
    w = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    target = node.outputs[0].name
    fused = _bias_add(node, graph_outputs) if node.op == "MatMul" else None
    if fused is not None:
        add, bias = fused
        target = add.outputs[0].name
    lin = recovery.from_node(node.op, np.asarray(w.values), None if bias is None else np.asarray(bias.values).reshape(-1),
                             dict(node.attrs))
    out_axis = analysis.axes.get(node.outputs[0].name)
    out_map = None if out_axis is None else recovery.output_map(out_axis.segments, analysis.space_group, maps, sizes)
    fit_bias = node.op != "MatMul" or fused is not None
    args = (lin.groups, lin.weight.shape[1], lin.weight.shape[2])

    def stats() -> tuple[recovery.Stats, recovery.Stats]:
        keep = recovery.EWR_ROWS if mode == "ewr" else 0
        return (recovery.Stats(*args, fit_bias=fit_bias, keep_rows=keep, seed=seed),
                recovery.Stats(*args, fit_bias=fit_bias))

    return _Layer(index, node, lin, bias, target, fit_bias, out_map, None, None, stats=stats)


def _write(layer: _Layer, new: np.ndarray) -> None:
    node, lin = layer.node, layer.lin
    w = node.inputs[1]
    dtype = np.asarray(w.values).dtype
    w.values = np.ascontiguousarray(recovery.to_weight(lin, new[:, :lin.weight.shape[1], :]).astype(dtype))
    if not layer.fit_bias:
        return
    b = new[:, -1, :].reshape(-1)
    if layer.bias is not None:
        old = np.asarray(layer.bias.values)
        layer.bias.values = np.ascontiguousarray(b.reshape(old.shape).astype(old.dtype))
    elif np.any(b != 0):
        const = gs.Constant(f"{node.name}__recovered_bias", np.ascontiguousarray(b.astype(dtype)))
        if len(node.inputs) > 2:
            node.inputs[2] = const
        else:
            node.inputs.append(const)


class _Undo:
    """The weights and inputs of re-solved nodes as they were, to put back if recovery made the model worse."""

    def __init__(self):
        self.values: list[tuple[gs.Constant, np.ndarray]] = []
        self.inputs: list[tuple[gs.Node, list]] = []

    def save(self, layer: _Layer) -> None:
        self.values += [(c, c.values) for c in (layer.node.inputs[1], layer.bias) if c is not None]
        self.inputs.append((layer.node, list(layer.node.inputs)))

    def restore(self) -> None:
        for const, values in self.values:
            const.values = values
        for node, inputs in self.inputs:  # a bias input the fit added goes again
            while len(node.inputs) > len(inputs):
                node.inputs.pop()
            for i, tensor in enumerate(inputs):
                if node.inputs[i] is not tensor:
                    node.inputs[i] = tensor


def _outputs(model: onnx.ModelProto, batches: list[dict]) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    sess = _run_session(model)
    runs = [sess.run(names, feed) for feed in batches]
    return {name: np.concatenate([r[i] for r in runs]) for i, name in enumerate(names)}


# --------------------------------------------------------------------------- recover
def recover(graph: gs.Graph, original: onnx.ModelProto, analysis: Analysis, maps: dict[int, ChannelMap],
            feeds: list[dict], mode: str, *, holdback: list[dict] | None = None,
            alpha: float = recovery.DEFAULT_ALPHA, eps: float = recovery.DEFAULT_EWR_EPS,
            max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0, target: str = "kept",
            memory_budget: int | None = None, one_at_a_time: bool = False, store_targets: bool = False,
            check_layers: bool = True,
            progress: Progress | None = None) -> RecoveryResult:
    """Re-solve, in place in ``graph`` (already rewritten by the maps), every pruned or downstream linear layer.

    Fits use ``feeds`` only.  With ``holdback`` (batches never fitted on),
    every layer is also scored on held-back rows and keeps its old weights
    when its held-back error grew; then the whole model's output distortion
    (:mod:`distortion`, against the original model) on the held-back
    samples is measured before and after recovery, and the recovery is
    undone if it made the model worse.  The result reports both.
    ``check_layers=False`` skips the per-layer check (the whole-model one
    stays).

    ``target="kept"`` (default) regresses a pruned layer's output channels onto
    the original outputs of the *kept* channels; ``"fused"`` onto the
    transport-weighted averages the fused weights aim at (``average @ y``).
    Measured on the digits and Fashion-MNIST VGG models, ``kept`` is better:
    averaged pre-activations lose information through the next ReLU.  The
    fused weights stay the ridge prior either way.

    Statistics of a whole wave come from one slice of the pruned graph and
    one of the original graph, run in lockstep (see :class:`_Runner`); the
    tensors the next slices start from are kept while they fit in
    ``memory_budget`` bytes (default: a quarter of the available memory).
    When the original's do not, the target rows of as many layers as fit
    come from one whole pass and are stored (``store_targets`` does so from
    the start).  ``one_at_a_time`` solves one layer per pass over the whole
    graphs instead (both are references for tests).
    """
    maps = {gid: m for gid, m in maps.items() if not m.is_identity}
    if mode == "none" or not maps or not feeds:
        return RecoveryResult()
    edited = {m.constant for gid in maps for m in analysis.groups[gid].members}
    changed = _changed_tensors(graph, edited)
    graph_outputs = {t.name for t in graph.outputs}
    # Layers whose input changed, and the pruned producers themselves (their
    # fused filters are re-fitted to the kept channels' real outputs).
    nodes = [n for n in graph.nodes if n.op in LINEAR_OPS and len(n.inputs) > 1
             and (n.inputs[0].name in changed or n.inputs[1].name in edited) and _candidate(n) is None]
    if mode == "bias":  # a MatMul has no bias slot to shift unless a bias Add follows it
        nodes = [n for n in nodes if n.op != "MatMul" or _bias_add(n, graph_outputs) is not None]
    if not nodes:
        return RecoveryResult()
    sizes = {g.id: g.size for g in analysis.groups}
    if target == "kept":
        maps = {gid: selection(m.size, m.kept) for gid, m in maps.items()}
    pending = [_make_layer(i, n, analysis, maps, sizes, graph_outputs, mode, seed) for i, n in enumerate(nodes)]
    anc = _ancestors(graph)
    for i, layer in enumerate(_wave_order(pending, anc)):  # row samples seeded by the order layers are solved in
        layer.rng = np.random.default_rng([seed, i])
    holdback = list(holdback or [])
    batches = list(feeds) + holdback
    n_fit = len(feeds)
    masks = _mask_inputs(batches)
    n_images = sum(next(iter(f.values())).shape[0] for f in feeds)
    per_image = max(1, math.ceil(max_rows / max(n_images, 1)))
    n_all = sum(next(iter(f.values())).shape[0] for f in batches)
    budget_total = int(available_memory() * MEMORY_FRACTION) if memory_budget is None else int(memory_budget)

    reference = before = None
    if holdback:
        reference = _outputs(original, holdback)
        before = output_distortion(reference, _outputs(model_io.to_model(graph, original, infer=False), holdback))
    stored: list[_Layer] = []  # layers whose targets are in memory (only once the original's slices do not fit)
    rows = per_image * n_all

    def stored_bytes() -> int:
        return sum(l.target_bytes(rows) for l in stored)

    runner = _Runner(batches, lambda: budget_total - stored_bytes() - targets.cache_bytes(), cache=not one_at_a_time)
    targets = _Runner(batches, lambda: budget_total - stored_bytes() - runner.cache_bytes(), cache=not one_at_a_time)
    targets.dropped = store_targets
    undo = _Undo()
    results: list[LayerRecovery] = []
    done = 0
    model, written = None, []
    while pending:
        wave = _next_wave(pending, anc)
        wave = wave[:1] if one_at_a_time else wave
        pending = [l for l in pending if l not in wave]
        missing = [l for l in wave if l not in stored]
        if missing and targets.dropped:
            _collect_targets(original, batches, missing, pending, stored, budget_total, rows, per_image, masks)
            missing = []
        if model is None or not _refresh(model, written):
            model = model_io.to_model(graph, original, infer=False)
        for layer in wave:
            layer.open()
        with _one_blas_thread():
            for b, xs, ys in _lockstep(runner.run(model, [l.node.inputs[0].name for l in wave]),
                                       targets.run(original, [l.target for l in missing]) if missing else None):
                for layer in missing:
                    layer.select(b, ys[layer.target], batches[b], per_image, masks)
                for layer in wave:
                    layer.add(b, xs[layer.node.inputs[0].name], b >= n_fit)
        written = []
        for layer in wave:
            if layer in stored:
                stored.remove(layer)
            inputs = list(layer.node.inputs)
            results.append(_solve(layer, mode, alpha, eps, undo, check_layers))
            written += [c for c in (layer.node.inputs[1], layer.bias) if c is not None]
            if list(layer.node.inputs) != inputs:  # a bias input was added: the next wave re-exports
                written.append(None)
            layer.close()
        done += len(wave)
        if progress:
            progress(f"  recovered {done} layers")
    model_record = None
    if holdback:
        after = output_distortion(reference, _outputs(model_io.to_model(graph, original, infer=False), holdback))
        kept = RECOVERED if after <= before else UNRECOVERED
        if kept == UNRECOVERED:
            undo.restore()
        model_record = ModelRecovery(measure_name(reference), n_all - n_images, round(before, 8), round(after, 8), kept)
    return RecoveryResult(results, model_record)


def _refresh(model: onnx.ModelProto, written: list) -> bool:
    """Put the values of the constants the last wave wrote into ``model``'s initializers, in place.

    What each wave changes is a few weights and biases; exporting the whole
    graph again for every wave copied every weight each time (vit_b_16: 48
    exports of 175 MB, ~10% of the recovery's time).  False (nothing
    changed) when a constant is not an initializer of ``model`` or a node
    gained an input (``None`` in ``written``): the caller then exports anew.
    """
    if any(c is None for c in written):
        return False
    index = {init.name: i for i, init in enumerate(model.graph.initializer)}
    if any(c.name not in index for c in written):
        return False
    for const in written:
        init = model.graph.initializer[index[const.name]]
        init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(const.values), const.name))
    return True


def _next_wave(pending: list[_Layer], anc: dict[str, set[str]]) -> list[_Layer]:
    """The pending layers none of whose upstream layers are pending."""
    names = {l.node.name for l in pending}
    return [l for l in pending if not (anc[l.node.name] & names)]


def _wave_order(layers: list[_Layer], anc: dict[str, set[str]]) -> list[_Layer]:
    order, pending = [], list(layers)
    while pending:
        wave = _next_wave(pending, anc)
        order += wave
        pending = [l for l in pending if l not in wave]
    return order


def _lockstep(inputs, targets):
    """``(b, inputs of batch b, original tensors of batch b or None)``, running both generators to their end.

    The original model's slice of a wave runs batch by batch next to the
    pruned one, so a target row goes into the statistics as soon as it is
    computed: targets are never stored for all batches.
    """
    for b, xs in inputs:
        ys = None if targets is None else next(targets)[1]
        yield b, xs, ys
    for _ in targets or ():  # let the runner keep its cache
        pass


def _collect_targets(original: onnx.ModelProto, batches: list[dict], needed: list[_Layer], more: list[_Layer],
                     stored: list[_Layer],
                     budget: int, rows: int, per_image: int, masks: list[str]) -> None:
    """One pass of the original model storing the target rows of ``needed`` and of as many ``more`` as fit.

    The fallback when the original model's slices cannot be cached (huge
    feature maps): stored target rows are sub-sampled, so many layers fit in
    the memory a slice's input tensors would take.
    """
    chunk = list(needed)
    used = sum(l.target_bytes(rows) for l in stored + chunk)
    for layer in more:
        if layer in stored:
            continue
        size = layer.target_bytes(rows)
        if used + size > budget:
            break
        chunk.append(layer)
        used += size
    wanted = list(dict.fromkeys(l.target for l in chunk))
    runner = _Runner(batches, lambda: 0, cache=False)
    for b, ys in runner.run(original, wanted):
        for layer in chunk:
            layer.select(b, ys[layer.target], batches[b], per_image, masks)
    stored.extend(chunk)


#: A re-fitted layer is rejected when its held-back error grew by more than this (relative; float noise).
WORSE_TOLERANCE = 1e-6


def _solve(layer: _Layer, mode: str, alpha: float, eps: float, undo: _Undo, check: bool) -> LayerRecovery:
    """Fit on the fit rows; keep the old weights when the held-back rows say the fit is worse."""
    prior = recovery.augment(layer.lin, layer.fit_bias)
    with _one_blas_thread():  # every error below is computed once (each is a product with a Gram matrix)
        new, used, held_after = recovery.solve_validated(mode, layer.fit, layer.held if check else None, prior,
                                                         alpha, eps)
        row = LayerRecovery(layer.node.name, layer.node.op, layer.fit.n, round(layer.fit.relative_error(prior), 6),
                            round(layer.fit.relative_error(new), 6), alpha=used)
        if layer.held.n:
            held_before = layer.held.relative_error(prior)
            held_after = layer.held.relative_error(new) if held_after is None else held_after
    if layer.held.n:
        row.held_back_rows = layer.held.n
        row.held_back_before = round(held_before, 6)
        row.held_back_after = round(held_after, 6)
        if check and held_after > held_before * (1 + WORSE_TOLERANCE) + 1e-12:
            row.kept = UNRECOVERED
            return row
    undo.save(layer)
    _write(layer, new)
    return row
