"""Shared helpers: sample paths, running models, the validity checks every pruned model must pass."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent

try:  # before test modules put benchmarks/ on sys.path: its coverage.py would shadow the package numba reads
    import numba  # noqa: F401
except ImportError:
    pass
SAMPLES = ROOT / "samples"
sys.path.insert(0, str(ROOT / "samples"))

SAMPLE_FILES = sorted(p.name for p in SAMPLES.glob("*.onnx"))


def sample(name: str) -> Path:
    return SAMPLES / name


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def feeds_for(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        dims = [d.dim_value if d.dim_value > 0 else batch for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def io_signature(model: onnx.ModelProto):
    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in values]

    weights = {i.name for i in model.graph.initializer}
    return sig([i for i in model.graph.input if i.name not in weights]), sig(model.graph.output)


def assert_valid(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The contract for every model we write."""
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    assert io_signature(pruned) == io_signature(original)
    assert [o.version for o in pruned.opset_import] == [o.version for o in original.opset_import]
    feeds = feeds_for(original)
    a, b = run(original, feeds), run(pruned, feeds)
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape
        assert np.all(np.isfinite(b[name]))


@pytest.fixture(scope="session")
def load():
    cache: dict[str, onnx.ModelProto] = {}

    def _load(name: str) -> onnx.ModelProto:
        if name not in cache:
            cache[name] = onnx.load(str(sample(name)))
        return cache[name]

    return _load


#: A progress line as the CLI writes it to a non-terminal stderr ("[   0.3s] load ...").
PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\ds\] ")


def message_lines(stderr: str) -> list[str]:
    """stderr without the progress lines: the errors and warnings a user must read."""
    return [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]


def rewrite_all_groups(model: onnx.ModelProto, method: str, order: str = "identity") -> onnx.ModelProto:
    """``model`` after a plan that keeps every channel of every prunable group, through the real rewrite.

    The maps come from the functions a real plan uses (``plans.selection`` for
    prune, ``plans.fusion`` with every channel kept for intrafusion), are applied
    by ``rewrite.apply_maps`` and exported by ``model_io.to_model``: what the
    pipeline does after planning.  ``order="reversed"`` keeps every channel in
    reverse order (a permutation): still exact, but only if producers, consumers
    and parameters of a group are all permuted alike.
    """
    from onnx_intrafusion import coupling, model_io, plans, rewrite

    graph = model_io.to_graph(model)
    analysis = coupling.analyse(graph)
    values = {name: np.asarray(t.values) for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    maps = {}
    for group in analysis.groups:
        if not group.prunable:
            continue
        kept = np.arange(group.size)
        if order == "reversed":
            maps[group.id] = plans.selection(group.size, kept[::-1])
        elif method == "prune":
            maps[group.id] = plans.selection(group.size, kept)
        else:
            features = plans.normalised_features(
                [coupling.channel_rows(values[m.constant], m, group.size) for m in group.members])
            maps[group.id] = plans.fusion(features, kept)
    assert maps, "no prunable group: the rewrite would not be exercised"
    rewrite.apply_maps(graph, analysis, maps)
    return model_io.to_model(graph, model)


def assert_same_outputs(model: onnx.ModelProto, reference: onnx.ModelProto, atol: float = 1e-5,
                        seed: int = 3, rtol: float = 0.0) -> None:
    """Same outputs on random inputs (``rtol`` for float sums taken in another order, e.g. permuted channels)."""
    feeds = feeds_for(reference, seed=seed)
    a, b = run(reference, feeds), run(model, feeds)
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=atol, rtol=rtol, err_msg=key)


def assert_plans_keeping_every_channel_are_exact(model: onnx.ModelProto, methods=("intrafusion", "prune"),
                                                 atol: float = 1e-5, seed: int = 3) -> None:
    """Identity plans (each method) and the reversed permutation reproduce ``model``'s outputs."""
    feeds = feeds_for(model, seed=seed)
    want = run(model, feeds)
    for method, order in [(m, "identity") for m in methods] + [("prune", "reversed")]:
        rewritten = rewrite_all_groups(model, method, order)
        onnx.checker.check_model(rewritten, full_check=True)
        assert io_signature(rewritten) == io_signature(model)
        got = run(rewritten, feeds)
        assert list(got) == list(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=1e-5 if order == "reversed" else 0.0,
                                       err_msg=f"{method} {order}: {key}")


# -- an oracle for plain pruning that does not use the channel analysis ------------------------


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor by name: initializers and Constant nodes' values."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


def _weight_axes(node: onnx.NodeProto) -> tuple[int, int] | None:
    """(output axis, input axis) of the weight (second input) of a Conv, Gemm or MatMul."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "Gemm":
        return (0, 1) if attrs.get("transB", 0) else (1, 0)
    if node.op_type == "MatMul":
        return 1, 0
    return None


def _matched(new: np.ndarray, old: np.ndarray, key) -> list[int]:
    """Ascending indices ``i`` of ``old``'s first axis such that ``new[j]`` is found in ``old[i_j]``."""
    out, start = [], 0
    for j in range(new.shape[0]):
        i = next((i for i in range(start, old.shape[0]) if key(new[j], old[i])), None)
        assert i is not None, f"pruned weight slice {j} is not a slice of the original weight"
        out.append(i)
        start = i + 1
    return out


def selection_of(old: np.ndarray, new: np.ndarray, out_axis: int, in_axis: int) -> tuple[list[int], list[int]]:
    """(rows, columns) of ``old`` that plain pruning kept in ``new``: ``new == old[rows][:, columns]``.

    Found by value (a selection copies weights bit for bit, and random weights
    do not repeat), so nothing of the package's own bookkeeping is used.
    """
    o, n = np.moveaxis(old, (out_axis, in_axis), (0, 1)), np.moveaxis(new, (out_axis, in_axis), (0, 1))
    cols = _matched(np.moveaxis(n, 1, 0), np.moveaxis(o, 1, 0), lambda a, b: np.isin(a, b).all())
    rows = _matched(n, o[:, cols], np.array_equal)
    np.testing.assert_array_equal(n, o[rows][:, cols])
    return rows, cols


def zeroed_original(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The original with the input slices that plain pruning removed from each Conv/Gemm/MatMul set to zero.

    The removed slices are found by comparing each layer's weight before and
    after (:func:`selection_of`).  A removed channel reaches the outputs only
    through such slices (element-wise ops, pools and per-channel parameters keep
    it in its own channel), so the pruned model must compute exactly what this
    model computes.  Also returns {node: kept output rows}, for comparison with
    the report's kept indices.
    """
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    old_w, new_w = _weights(reference), _weights(pruned)
    new_nodes = {n.output[0]: n for n in pruned.graph.node if n.output}  # names may be given on the way
    kept_rows, zeroed_by = {}, {}
    for node in reference.graph.node:
        axes = _weight_axes(node)
        if axes is None or len(node.input) < 2 or node.input[1] not in old_w:
            continue
        new_node = new_nodes.get(node.output[0])
        assert new_node is not None and new_node.op_type == node.op_type, f"layer {node.name} is missing"
        old = onnx.numpy_helper.to_array(old_w[node.input[1]])
        new = onnx.numpy_helper.to_array(new_w[new_node.input[1]])
        rows, cols = selection_of(old, new, *axes)
        kept_rows[new_node.name] = (rows, old.shape[axes[0]])
        dropped = sorted(set(range(old.shape[axes[1]])) - set(cols))
        if not dropped:
            continue
        zeroed = old.copy()
        np.moveaxis(zeroed, axes[1], 0)[dropped] = 0
        name = node.input[1]
        if zeroed_by.setdefault(name, node.output[0]) != node.output[0]:  # a weight shared by layers: a copy each
            name = f"{name}__{node.output[0]}"
            reference.graph.initializer.append(onnx.numpy_helper.from_array(zeroed, name))
            node.input[1] = name
        else:
            old_w[name].CopyFrom(onnx.numpy_helper.from_array(zeroed, name))
    return reference, kept_rows


def assert_pruning_equals_zeroed_original(original: onnx.ModelProto, result, atol: float = 1e-4) -> None:
    """Plain pruning computes what the original computes with the removed input slices zeroed,
    and every producer that owns a pruned group's channels kept the rows the report names."""
    reference, kept_rows = zeroed_original(original, result.model)
    for row in result.report.pruned_groups:
        for producer in row.producers:
            rows, size = kept_rows.get(producer, (None, None))
            if size == row.channels_before:
                assert rows == row.kept, (producer, rows, row.kept)
    assert_same_outputs(result.model, reference, atol=atol, rtol=1e-4, seed=11)
