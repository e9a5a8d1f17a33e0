"""Shared helpers: sample paths, running models, the validity checks every pruned model must pass."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
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
    from onnx_intrafusion.pipeline import _group_rows

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
            features = plans.normalised_features(_group_rows(group, values)[1])
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
    for method, order in [(m, "identity") for m in methods] + [("prune", "reversed")]:
        rewritten = rewrite_all_groups(model, method, order)
        assert_valid(rewritten, model)
        assert_same_outputs(rewritten, model, atol=atol, seed=seed, rtol=1e-5 if order == "reversed" else 0.0)
