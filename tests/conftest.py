"""Shared helpers: sample paths, running models, the validity checks every pruned model must pass."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
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


#: A progress line as the CLI writes it to a non-terminal stderr ("[   0.3s] load ...").
PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\ds\] ")


def message_lines(stderr: str) -> list[str]:
    """stderr without the progress lines: the errors and warnings a user must read."""
    return [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
