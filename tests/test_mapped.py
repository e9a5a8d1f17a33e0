"""Weights read through memory maps of the input file (``mapped``), and the memory-saving paths beside it.

Oracles: onnx's own loader (``onnx.load``, a different reader of the same
bytes) and the in-memory route of the pipeline (a ModelProto argument is
never mapped), which the mapped route must match bit for bit.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import onnx
import pytest
from conftest import sample
from onnx import numpy_helper
from scipy import sparse

from onnx_intrafusion import mapped, model_io, plans, prune, validate

SAMPLES = ["vgg_legacy.onnx", "resnet_legacy.onnx", "mobilenetv2_legacy.onnx", "vgg_dynamo.onnx",
           "resnet_dynamo.onnx"]


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("name", SAMPLES)
def test_mapped_weights_equal_onnx_load(name):
    path = sample(name)
    loaded = model_io.load_model(path, keep_mapped=True).model
    full = onnx.load(str(path))  # onnx's loader, with the external data when there is some
    assert mapped.uses_mapped(loaded)
    expected = _arrays(full)
    # Every large float weight is mapped, and the parsed model holds none of their bytes.
    large = {k for k, v in expected.items() if v.dtype.kind == "f" and v.size > mapped.MAPPED_MIN_ELEMENTS}
    assert large and large == {t.name for t in loaded.graph.initializer if mapped.is_mapped(t)}
    assert loaded.ByteSize() < full.ByteSize() - sum(expected[k].nbytes for k in large) + 200 * len(large)
    got = _arrays(mapped.materialized(loaded))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    graph = model_io.to_graph(loaded)
    for tensor in graph.tensors().values():
        if isinstance(tensor, onnx_graphsurgeon_constant()) and tensor.name in expected:
            values = model_io.constant_values(tensor)
            assert np.array_equal(values, expected[tensor.name]), tensor.name


def onnx_graphsurgeon_constant():
    import onnx_graphsurgeon as gs

    return gs.Constant


@pytest.mark.parametrize("name", ["vgg_legacy.onnx", "resnet_dynamo.onnx"])
@pytest.mark.parametrize("method", ["intrafusion", "prune"])
def test_path_and_model_proto_prune_to_the_same_weights(name, method):
    """A path is mapped, a ModelProto is held in memory: the pruned models are the same, bit for bit."""
    path = sample(name)
    from_path = prune(str(path), 0.5, method).model
    from_proto = prune(onnx.load(str(path)), 0.5, method).model
    assert not mapped.uses_mapped(from_path)  # the output never refers to the input file
    a, b = _arrays(from_path), _arrays(from_proto)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_external_data_input_is_mapped_and_untouched(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("vgg_dynamo.onnx", "vgg_dynamo.onnx.data"):
        shutil.copy(sample(name), folder / name)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    loaded = model_io.load_model(folder / "vgg_dynamo.onnx", keep_mapped=True)
    assert loaded.external_data
    locations = {next(e.value for e in t.external_data if e.key == "location")
                 for t in loaded.model.graph.initializer if mapped.is_mapped(t)}
    assert locations == {str((folder / "vgg_dynamo.onnx.data").resolve())}
    result = prune(str(folder / "vgg_dynamo.onnx"), 0.5)
    model_io.save_model(result.model, tmp_path / "out.onnx", external=result.external_data)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    model = onnx.load(str(sample("vgg_dynamo.onnx")), load_external_data=False)
    (tmp_path / "secret.data").write_bytes(bytes(10_000_000))
    (tmp_path / "in").mkdir()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    path = tmp_path / "in" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(model_io.ModelError, match="outside the model's folder"):
        model_io.load_model(path, keep_mapped=True)


def test_mapped_values_are_read_only_views_released_with_the_array():
    loaded = model_io.load_model(sample("vgg_legacy.onnx"), keep_mapped=True).model
    tensor = next(t for t in loaded.graph.initializer if mapped.is_mapped(t))
    arr = mapped.mapped_array(tensor)
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[...] = 0
    assert np.array_equal(arr, numpy_helper.to_array(mapped.materialized_tensor(tensor)))


def test_channel_maps_store_sparse_matrices_and_give_the_dense_ones():
    rng = np.random.default_rng(0)
    feats = plans.normalised_features([rng.standard_normal((40, 7))])
    kept = np.sort(rng.choice(40, 13, replace=False))
    cmap = plans.fusion_from_cost(plans.cost_matrix(feats, kept), kept)
    assert sparse.issparse(cmap.matrix(consumer=False)) and sparse.issparse(cmap.matrix(consumer=True))
    plan = plans.transport_plan(feats, kept).T  # the dense computation, as the maps were built before
    average = plan / plan.sum(axis=1, keepdims=True)
    total = plan / np.where(plan.sum(axis=0, keepdims=True) > 0, plan.sum(axis=0, keepdims=True), 1.0)
    assert np.array_equal(cmap.average, average) and np.array_equal(cmap.total, total)
    sel = plans.selection(6, np.array([1, 4]))
    assert np.array_equal(sel.average, np.eye(6)[[1, 4]]) and np.array_equal(sel.total, np.eye(6)[[1, 4]])
    assert plans.selection(3, np.arange(3)).is_identity


def test_validation_runs_one_sample_at_a_time_with_the_same_outputs():
    model = onnx.load(str(sample("resnet_legacy.onnx")))
    feeds = validate.random_feeds(model, 0, batch=4)
    split, _ = validate.run(model, [feeds], "cpu", one_sample=True)
    sess = validate.session(model, "cpu")
    whole = sess.run(None, feeds)
    for got, want in zip(split.values(), whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_samples_split_only_when_every_input_shares_the_batch():
    same = validate._samples({"a": np.arange(6).reshape(3, 2), "b": np.arange(3).reshape(3, 1)})
    assert len(same) == 3 and np.array_equal(same[2]["a"], [[4, 5]]) and np.array_equal(same[2]["b"], [[2]])
    differ = {"a": np.zeros((3, 2)), "b": np.zeros((2, 2))}
    assert validate._samples(differ)[0] is differ and len(validate._samples(differ)) == 1


def test_compiled_cost_kernel_only_for_large_runs(monkeypatch):
    monkeypatch.setattr(plans, "_NATIVE_KERNEL", False)  # numba's kernel only: its memory is paid for
    assert not plans.use_compiled(2e10)  # ResNet-50 at 0.5
    assert plans.use_compiled(plans.COMPILED_RUN_WORK)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_cost_matrix_reading_kept_rows_in_place_gives_the_same_distances(p, compiled):
    rng = np.random.default_rng(3)
    feats = plans.normalised_features([rng.standard_normal((300, 90))])
    kept = np.sort(rng.choice(300, 120, replace=False))
    expected = plans.cost_matrix(feats, kept, p, compiled)
    consumed = feats.copy()
    got = plans.cost_matrix(consumed, kept, p, compiled, consume=True)
    assert np.array_equal(got, expected)
    assert np.array_equal(consumed, feats[np.concatenate([kept, np.setdiff1d(np.arange(300), kept)])])
    if compiled and p == 1.0:  # large enough for the kernel (when numba is installed)
        big = plans.normalised_features([rng.standard_normal((700, 500))])
        kept = np.sort(rng.choice(700, 350, replace=False))
        want = plans.cost_matrix(big, kept, p, compiled)
        assert np.array_equal(plans.cost_matrix(big.copy(), kept, p, compiled, consume=True), want)


def test_permute_rows_in_place_equals_fancy_indexing():
    rng = np.random.default_rng(4)
    for n in (1, 2, 7, 50):
        a = rng.standard_normal((n, 3))
        order = rng.permutation(n)
        want = a[order]
        plans._permute_rows(a, order)
        assert np.array_equal(a, want)


def test_light_check_checks_weights_and_structure_like_the_checker():
    model = onnx.load(str(sample("vgg_legacy.onnx")))
    model_io.check_light(model, full_check=True)  # a valid model passes
    short = onnx.ModelProto()
    short.CopyFrom(model)
    init = next(t for t in short.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) > 8000)
    init.raw_data = init.raw_data[:-4]
    with pytest.raises(onnx.checker.ValidationError, match=init.name):
        model_io.check_light(short)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[0] = "not_a_tensor"
    with pytest.raises(onnx.checker.ValidationError):
        model_io.check_light(broken)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(broken)  # the checker agrees


def test_a_written_file_that_does_not_check_is_not_renamed_into_place(tmp_path, monkeypatch):
    model = onnx.load(str(sample("vgg_legacy.onnx")))
    real_save = onnx.save_model

    def corrupt_save(m, path, *args, **kwargs):  # write a model whose node reads a missing tensor
        bad = onnx.ModelProto()
        bad.CopyFrom(m)
        bad.graph.node[0].input[0] = "not_a_tensor"
        real_save(bad, path, *args, **kwargs)

    monkeypatch.setattr(onnx, "save_model", corrupt_save)
    with pytest.raises(model_io.ValidationError, match="written model fails onnx.checker"):
        model_io.save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
def test_every_float_type_reads_back_the_stored_values(tmp_path, dtype):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    values = rng.standard_normal((40, 50)).astype(np.float32)
    if dtype == "bfloat16":
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        tensor = helper.make_tensor("w", TensorProto.BFLOAT16, values.shape, raw, raw=True)
    else:
        tensor = numpy_helper.from_array(values.astype(dtype), "w")
    elem = tensor.data_type
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", elem, list(values.shape))], [tensor])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    loaded = model_io.load_model(path, keep_mapped=True).model
    assert mapped.is_mapped(loaded.graph.initializer[0])
    want = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    got = mapped.mapped_array(loaded.graph.initializer[0])
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    full = mapped.materialized(loaded)
    assert full.graph.initializer[0].SerializeToString() == onnx.load(str(path)).graph.initializer[0].SerializeToString()


def test_a_file_that_cannot_be_memory_mapped_is_read_whole(monkeypatch, tmp_path):
    import errno
    import mmap as mmap_module

    def no_mmap(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap_module, "mmap", no_mmap)
    loaded = model_io.load_model(sample("vgg_legacy.onnx"), keep_mapped=True).model
    assert not mapped.uses_mapped(loaded)
    want = _arrays(onnx.load(str(sample("vgg_legacy.onnx"))))
    got = _arrays(loaded)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    result = prune(str(sample("vgg_legacy.onnx")), 0.5, validate=False)
    assert result.model.graph.node
