"""The pipeline holds one copy of the weights, and the memory-saving paths give the same results.

The loaded ModelProto is the only full copy: graph constants read it lazily,
shape inference and checks run on weightless copies, and the original model
is validated from its file.  Each saving is checked against the plain way of
doing the same thing (export and re-import, ``ByteSize()``, a session on the
serialised model), so a saving that changed a result fails here.
"""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from conftest import SAMPLE_FILES, sample
from onnx_intrafusion import coupling, model_io, prune, validate


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_byte_size_bounds_protobuf_byte_size(name):
    model = onnx.load(str(sample(name)))
    exact = model.ByteSize()
    estimate = model_io.byte_size(model)
    assert exact <= estimate <= exact + 16 * len(model.graph.initializer)


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_shapes_inferred_in_place_equal_an_export_and_reimport(name):
    """infer_graph_shapes lends placeholders to the export; the plain round trip is the oracle."""
    model = onnx.load(str(sample(name)))
    graph = model_io.fold(gs.import_onnx(model))  # not to_graph: it uses infer_graph_shapes itself
    plain = gs.import_onnx(model_io.to_model(graph.copy(), model, infer=True))
    fresh = model_io.infer_graph_shapes(graph, model)
    ours = model_io.to_model(fresh, model, infer=False)
    theirs = model_io.to_model(plain, model, infer=False)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert {i.name for i in ours.graph.initializer} >= {i.name for i in model.graph.initializer} - {
        n for node in model.graph.node for n in node.output}  # every weight kept, with its data:
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for init in ours.graph.initializer:
        if init.name in weights:
            np.testing.assert_array_equal(numpy_helper.to_array(init), weights[init.name])


def test_graph_constants_read_the_loaded_model_without_copies():
    """Loading, analysing and reading every group's weights decodes no lasting copy of them."""
    model = onnx.load(str(sample("fashion/resnet18_legacy.onnx")))
    weights = _weight_bytes(model)
    assert weights > 1_000_000  # big enough for the bound below to mean something
    tracemalloc.start()
    try:
        graph = model_io.to_graph(model)
        analysis = coupling.analyse(graph)
        names = {m.constant for g in analysis.groups for m in g.members}
        values = model_io.WeightValues(graph, names)
        largest = 0
        for name in values:
            arr = values[name]
            largest = max(largest, arr.nbytes)
            del arr
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The graph, analysis and every group's arrays once read: far less than one more copy.
    assert held < 0.25 * weights
    lazy = [t for t in graph.tensors().values() if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues)]
    assert sum(t._values.nbytes for t in lazy) > 0.9 * weights
    # And what is read is the model's own data.
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in names & set(inits):
        np.testing.assert_array_equal(values[name], inits[name])
    assert largest > 0


def test_reference_from_the_file_equals_the_reference_from_the_proto():
    path = sample("resnet_legacy.onnx")
    model = onnx.load(str(path))
    by_file = validate.reference(model, "cpu", original_file=path)
    by_proto = validate.reference(model, "cpu")
    assert list(by_file.outputs) == list(by_proto.outputs)
    for name, value in by_file.outputs.items():
        np.testing.assert_array_equal(value, by_proto.outputs[name])


@pytest.mark.parametrize("name", ["resnet_dynamo.onnx", "mobilenetv2_legacy.onnx"])
def test_pruning_a_file_equals_pruning_its_modelproto(name, tmp_path):
    """A path input takes the lean route (validation reads the file, the loaded weights are freed);
    a ModelProto input keeps the proto: the written model and the drift are the same."""
    src = tmp_path / name
    shutil.copy(sample(name), src)
    data = sample(name + ".data")
    if data.exists():
        shutil.copy(data, tmp_path / data.name)
    from_file = prune(str(src), sparsity=0.5, provider="cpu")
    from_proto = prune(onnx.load(str(src)), sparsity=0.5, provider="cpu")
    assert from_file.model.SerializeToString() == from_proto.model.SerializeToString()
    assert from_file.report.validation == from_proto.report.validation
    assert "reference" in from_file.report.timings


def test_check_reads_the_file_and_still_refuses_an_invalid_model(tmp_path):
    """The checker runs on the file for path inputs: an invalid file is still refused with its reason."""
    model = onnx.load(str(sample("vgg_legacy.onnx")))
    model.graph.node[0].input[0] = "no_such_tensor"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(model_io.ModelError, match="onnx.checker"):
        model_io.load_model(bad)
