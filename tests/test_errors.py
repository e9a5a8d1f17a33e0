"""Bad input, bad options, failures mid-run: one-line errors, documented exit codes, nothing written.

Most cases run ``cli.main`` in-process (fast, and failures can be injected with
monkeypatch); a few run the real command in a subprocess (signals, --help,
a real traceback-free exit).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_intrafusion import cli, model_io, prune
from onnx_intrafusion.errors import (ModelError, NothingToPrune, OutputError, ProviderError, PruneWarning,
                                     UsageError, ValidationError)

from conftest import ROOT, assert_valid, message_lines, sample

# -- helpers ---------------------------------------------------------------------


def main(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *words: str) -> str:
    lines = message_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("onnx-intrafusion:"), err
    for w in words:
        assert w.lower() in lines[0].lower(), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Files a failed run must not leave: anything but what the test put there."""
    return sorted(p.name for p in folder.iterdir())


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def tiny(nodes, inits, out_shape=(1, 4, 8, 8), opset=17, domains=(), in_shape=(1, 3, 8, 8),
         in_type=TensorProto.FLOAT, out_type=TensorProto.FLOAT, ir=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", in_type, list(in_shape))],
                              [helper.make_tensor_value_info("y", out_type, list(out_shape))], inits)
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = ir
    return model


def w(name, *shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def conv(x, wname, y, **kw):
    return helper.make_node("Conv", [x, wname], [y], pads=[1, 1, 1, 1], kernel_shape=[3, 3], name=f"conv_{y}", **kw)


def two_convs(mid_op=None, mid_domain=""):
    """x -> conv(8) -> [mid op] -> conv(4) -> y: one prunable group of 8 channels."""
    nodes = [conv("x", "w1", "a")]
    src = "a"
    if mid_op:
        nodes.append(helper.make_node(mid_op, ["a"], ["b"], domain=mid_domain, name="mid"))
        src = "b"
    nodes += [helper.make_node("Relu", [src], ["r"], name="relu"), conv("r", "w2", "y")]
    return nodes, [w("w1", 8, 3, 3, 3), w("w2", 4, 8, 3, 3, seed=1)]


@pytest.fixture()
def vgg(tmp_path) -> Path:
    """A private copy of a sample (tests must not depend on the real file staying writable)."""
    dst = tmp_path / "in" / "vgg.onnx"
    dst.parent.mkdir()
    shutil.copy(sample("vgg_legacy.onnx"), dst)
    return dst


@pytest.fixture()
def dynamo(tmp_path) -> Path:
    """A private copy of a sample with its external data file."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name in ("vgg_dynamo.onnx", "vgg_dynamo.onnx.data"):
        shutil.copy(sample(name), folder / name)
    return folder / "vgg_dynamo.onnx"


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# -- unreadable or invalid input (exit 3) ------------------------------------------


def _make_bad_input(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.onnx"
    good = sample("vgg_legacy.onnx").read_bytes()
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated_weights":
        # cut inside the last initializer's raw bytes, then repair the length prefix is not possible:
        # instead shorten one weight's raw_data while keeping its dims.
        model = onnx.load(str(sample("vgg_legacy.onnx")))
        init = model.graph.initializer[0]
        init.raw_data = init.raw_data[: len(init.raw_data) // 2]
        save(model, path)
    elif kind == "invalid_utf8":
        # Found by the corrupted-input run: one flipped bit made a node name invalid UTF-8, which
        # protobuf accepts (proto2) and onnx-graphsurgeon then crashed on (exit 1).
        model = onnx.load(str(sample("vgg_legacy.onnx")))
        model.graph.node[0].name = "nQConv"
        path.write_bytes(model.SerializeToString().replace(b"nQConv", b"n\xdfConv"))
    elif kind == "fails_checker":
        model = onnx.load(str(sample("vgg_legacy.onnx")))
        model.graph.node[0].input[0] = "not_a_tensor"
        save(model, path)
    elif kind == "fails_shape_inference":
        model = onnx.load(str(sample("vgg_legacy.onnx")))
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        weight = next(i for i in model.graph.initializer if i.name == gemm.input[1])
        weight.dims[1] += 1  # inner dimension no longer matches the flattened features
        weight.raw_data = weight.raw_data + bytes(4 * weight.dims[0])
        save(model, path)
    elif kind == "does_not_run":
        model = onnx.load(str(sample("vgg_legacy.onnx")))
        conv_node = next(n for n in model.graph.node if n.op_type == "Conv")
        weight = next(i for i in model.graph.initializer if i.name == conv_node.input[1])
        weight.dims[1] += 1  # channel count no longer matches the input
        weight.raw_data = weight.raw_data + bytes(4 * int(np.prod(weight.dims[2:])) * weight.dims[0])
        save(model, path)
    elif kind == "missing_external_data":
        shutil.copy(sample("vgg_dynamo.onnx"), path.with_name("vgg_dynamo.onnx"))
        return path.with_name("vgg_dynamo.onnx")
    elif kind == "truncated_external_data":
        for name in ("vgg_dynamo.onnx", "vgg_dynamo.onnx.data"):
            shutil.copy(sample(name), folder / name)
        data = folder / "vgg_dynamo.onnx.data"
        data.write_bytes(data.read_bytes()[:1000])
        return folder / "vgg_dynamo.onnx"
    else:
        raise ValueError(kind)
    return path


BAD_INPUTS = {
    "missing": "not found",
    "directory": "directory",
    "empty": "empty",
    "random_bytes": "not a readable onnx model",
    "text": "not a readable onnx model",
    "truncated": "not a readable onnx model",
    "truncated_weights": "too small",
    "fails_checker": "onnx.checker",
    "invalid_utf8": "not valid utf-8",
    "fails_shape_inference": "shape inference",
    "does_not_run": "does not run in onnxruntime",
    "missing_external_data": "external data",
    "truncated_external_data": "external data",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_a_one_line_model_error(tmp_path, capsys, kind):
    folder = tmp_path / "work"
    folder.mkdir()
    src = _make_bad_input(kind, folder)
    before = leftovers(folder)
    out = tmp_path / "out.onnx"
    code, _, err = main(capsys, src, out)
    assert code == 3, err
    one_line_error(err, BAD_INPUTS[kind])
    assert not out.exists() and leftovers(folder) == before
    with pytest.raises(ModelError):
        prune(src)


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    src = _make_bad_input("random_bytes", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onnx_intrafusion", str(src), str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 3
    one_line_error(proc.stderr, "not a readable onnx model")
    assert not (tmp_path / "o.onnx").exists()


def test_unreadable_input(tmp_path, capsys, vgg, monkeypatch):
    out = tmp_path / "o.onnx"
    if os.geteuid() != 0:
        vgg.chmod(0)
        try:
            code, _, err = main(capsys, vgg, out)
        finally:
            vgg.chmod(0o644)
    else:
        # root reads any file: simulate what a normal user sees.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == vgg and mode == os.R_OK
                            else real_access(p, mode, **kw))
        code, _, err = main(capsys, vgg, out)
    assert code == 3
    one_line_error(err, "not readable")
    assert not out.exists()


def test_permission_error_while_reading_is_a_model_error(tmp_path, capsys, vgg, monkeypatch):
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    from onnx_intrafusion import mapped

    monkeypatch.setattr(onnx, "load", deny)
    monkeypatch.setattr(mapped, "load_mapped", deny)  # how the model file is read
    code, _, err = main(capsys, vgg, tmp_path / "o.onnx")
    assert code == 3
    one_line_error(err, "not readable")


def test_model_proto_with_unloaded_external_data_is_refused():
    model = onnx.load(str(sample("vgg_dynamo.onnx")), load_external_data=False)
    with pytest.raises(ModelError, match="external data"):
        prune(model)


# -- unsupported models --------------------------------------------------------------


def test_opset_below_9_is_refused(tmp_path, capsys):
    nodes, inits = two_convs()
    model = tiny(nodes, inits, opset=8, ir=3)
    src = save(model, tmp_path / "old.onnx")
    code, _, err = main(capsys, src, tmp_path / "o.onnx")
    assert code == 3
    one_line_error(err, "opset 8", "not supported")
    assert not (tmp_path / "o.onnx").exists()


def test_opset_9_is_accepted(tmp_path):
    nodes, inits = two_convs()
    model = tiny(nodes, inits, opset=9, ir=4)
    result = prune(model, sparsity=0.5)
    assert_valid(result.model, model)
    assert result.report.pruned_groups


@pytest.mark.parametrize("validate", [True, False])
def test_known_custom_op_leaves_its_group_unpruned_with_a_warning(tmp_path, capsys, validate):
    """com.microsoft::Gelu runs in onnxruntime, so the result can be validated."""
    nodes = [conv("x", "w1", "a"), helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft", name="gelu"),
             conv("g", "w2", "b"), helper.make_node("Relu", ["b"], ["r"], name="relu"), conv("r", "w3", "y")]
    inits = [w("w1", 8, 3, 3, 3), w("w2", 6, 8, 3, 3, seed=1), w("w3", 4, 6, 3, 3, seed=2)]
    model = tiny(nodes, inits, domains=["com.microsoft"])
    src, out = save(model, tmp_path / "custom.onnx"), tmp_path / "o.onnx"
    args = [src, out, "--sparsity", "0.5", "--target", "none"] + ([] if validate else ["--no-validate"])
    code, stdout, err = main(capsys, *args)
    assert code == 0, err
    line = one_line_error(err, "warning", "gelu", "left unpruned")
    assert "1 channel group" in line
    pruned = onnx.load(str(out))
    assert_valid(pruned, model)
    shapes = {i.name: list(i.dims) for i in pruned.graph.initializer}
    assert shapes["w1"] == [8, 3, 3, 3]  # the group read by Gelu is untouched
    assert shapes["w2"][0] == 3  # the next group is pruned
    # The API raises a Python warning of its own category.
    with pytest.warns(PruneWarning, match="custom-domain"):
        prune(model, validate=False)
    # --quiet silences it.
    out.unlink()
    code, stdout, err = main(capsys, *args, "--quiet")
    assert code == 0 and err == "" and stdout == ""


def test_unknown_custom_op_needs_no_validate(tmp_path, capsys):
    nodes, inits = two_convs("MyOp", "my.domain")
    inits.append(w("w3", 4, 4, 3, 3, seed=3))
    nodes.append(conv("y0", "w3", "y"))
    nodes[-2].output[0] = "y0"
    model = tiny(nodes, inits, domains=["my.domain"])
    src, out = save(model, tmp_path / "custom.onnx"), tmp_path / "o.onnx"
    code, _, err = main(capsys, src, out, "--target", "none")  # 4- and 8-channel groups: exact counts
    assert code == 3
    lines = message_lines(err)
    assert "warning" in lines[0] and "MyOp" in lines[0]
    assert "does not run in onnxruntime" in lines[-1] and "--no-validate" in lines[-1]
    assert not out.exists()
    code, _, err = main(capsys, src, out, "--no-validate", "--target", "none")
    assert code == 0, err
    assert {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}["w1"] == [8, 3, 3, 3]


def _bn_training_model() -> onnx.ModelProto:
    nodes = [conv("x", "w1", "a"),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["bn"], training_mode=1, name="bn"),
             helper.make_node("Relu", ["bn"], ["r"]), conv("r", "w2", "y")]
    c = 8
    inits = [w("w1", c, 3, 3, 3), w("w2", 4, c, 3, 3)] + [
        numpy_helper.from_array(np.ones(c, np.float32), n) for n in ("s", "b", "m", "v")]
    return tiny(nodes, inits)


def _training_info_model() -> onnx.ModelProto:
    nodes, inits = two_convs()
    model = tiny(nodes, inits)
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph([helper.make_node("Identity", ["w1"], ["w1_new"])], "train", [], [
        helper.make_tensor_value_info("w1_new", TensorProto.FLOAT, [8, 3, 3, 3])]))
    binding = info.update_binding.add()
    binding.key, binding.value = "w1", "w1_new"
    return model


def _qlinearconv_model() -> onnx.ModelProto:
    u8 = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.uint8), name)  # noqa: E731
    f = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.float32), name)  # noqa: E731
    inits = [f("xs", 0.1), u8("xz", 128), u8("wq", np.full((4, 3, 3, 3), 130)), f("ws", 0.01), u8("wz", 128),
             f("ys", 0.2), u8("yz", 128)]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1],
                            name="qconv")
    return tiny([node], inits, in_type=TensorProto.UINT8, out_type=TensorProto.UINT8)


def _qdq_model() -> onnx.ModelProto:
    """Float activations, int8 weights dequantized in the graph (QDQ format)."""
    nodes = [helper.make_node("DequantizeLinear", ["w1q", "s1"], ["w1"], name="dq1", axis=0),
             conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "w2", "y")]
    inits = [numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "w1q"),
             numpy_helper.from_array(np.full(8, 0.1, np.float32), "s1"), w("w2", 4, 8, 3, 3)]
    return tiny(nodes, inits)


@pytest.mark.parametrize("make, words", [
    (_bn_training_model, "training_mode=1"),
    (_training_info_model, "training_info"),
    (_qlinearconv_model, "quantized"),
    (_qdq_model, "quantized"),
])
def test_training_and_quantized_graphs_are_refused(tmp_path, capsys, make, words):
    model = make()
    onnx.checker.check_model(model)  # the test model itself is valid ONNX
    src, out = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx"
    code, _, err = main(capsys, src, out)
    assert code == 3
    one_line_error(err, words)
    assert not out.exists()
    with pytest.raises(ModelError, match=words.split("=")[0]):
        prune(model)


# -- nothing prunable (exit 4) -------------------------------------------------------


def test_nothing_prunable_exits_4_and_writes_nothing(tmp_path, capsys):
    model = tiny([conv("x", "w1", "y")], [w("w1", 4, 3, 3, 3)])  # its only channels are the output
    src, out = save(model, tmp_path / "m.onnx"), tmp_path / "o.onnx"
    code, _, err = main(capsys, src, out)
    assert code == 4
    one_line_error(err, "no channel group can be pruned", "graph output")
    assert leftovers(tmp_path) == ["m.onnx"]
    with pytest.raises(NothingToPrune):
        prune(model)


# -- bad options (exit 2 / 7) ----------------------------------------------------------


@pytest.mark.parametrize("opts, words", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--sparsity", "nan"], "sparsity"),
    (["--sparsity", "inf"], "sparsity"),
    (["--sparsity", "half"], "sparsity"),
    (["--method", "magic"], "invalid choice"),
    (["--importance", "fisher"], "invalid choice"),
    (["--provider", "tpu"], "invalid choice"),
    (["--marginals", "odd"], "invalid choice"),
    (["--ot-reg", "-1"], "ot-reg"),
    (["--ot-p", "0.5"], "ot-p"),
    (["--seed", "x"], "seed"),
    (["--no-such-option"], "unrecognized"),
])
def test_bad_options_exit_2(tmp_path, capsys, vgg, opts, words):
    code, _, err = main(capsys, vgg, tmp_path / "o.onnx", *opts)
    assert code == 2, err
    one_line_error(err, words)
    assert not (tmp_path / "o.onnx").exists()


def test_missing_arguments_exit_2(capsys):
    code, _, err = main(capsys)
    assert code == 2
    one_line_error(err, "required")


@pytest.mark.parametrize("kwargs, error", [
    (dict(sparsity=1.0), UsageError),
    (dict(sparsity=float("nan")), UsageError),
    (dict(sparsity=-0.5), UsageError),
    (dict(sparsity="0.5"), UsageError),
    (dict(method="magic"), UsageError),
    (dict(importance="fisher"), UsageError),
    (dict(provider="tpu"), ProviderError),
])
def test_bad_api_options_raise_before_any_work(kwargs, error, monkeypatch):
    def must_not_load(*a, **k):
        raise AssertionError("options must be checked before the model is loaded")

    monkeypatch.setattr(model_io, "load_model", must_not_load)
    with pytest.raises(error):
        prune(sample("vgg_legacy.onnx"), **kwargs)


def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys, vgg):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is installed here")
    code, _, err = main(capsys, vgg, tmp_path / "o.onnx", "--provider", "cuda")
    assert code == 7
    one_line_error(err, "cuda", "onnxruntime-gpu")
    assert not (tmp_path / "o.onnx").exists()


# -- output paths (exit 2 / 6) ---------------------------------------------------------


def test_out_equal_to_in_in_any_spelling(tmp_path, capsys, vgg, monkeypatch):
    before = digest(vgg)
    monkeypatch.chdir(vgg.parent)
    link = tmp_path / "link.onnx"
    link.symlink_to(vgg)
    hard = tmp_path / "hard.onnx"
    os.link(vgg, hard)
    for out in (vgg, "vgg.onnx", "./vgg.onnx", f"../in/vgg.onnx", f"{vgg.parent}//vgg.onnx", link, hard):
        code, _, err = main(capsys, vgg, out)
        assert code == 2, (out, err)
        one_line_error(err, "must differ")
    # IN given through the symlink, OUT the real file
    code, _, err = main(capsys, link, vgg)
    assert code == 2
    assert digest(vgg) == before


def test_out_must_not_clobber_the_input_external_data(tmp_path, capsys, dynamo):
    data = dynamo.with_name("vgg_dynamo.onnx.data")
    before = digest(dynamo, data)
    for out in (data, dynamo):  # OUT = IN.data, or OUT whose OUT.data would be IN.data
        code, _, err = main(capsys, dynamo, out)
        assert code == 2, err
        one_line_error(err, "must differ")
    weird = dynamo.parent / "vgg_dynamo"  # OUT.data == IN? no; but OUT="x" with IN="x.data" style:
    code, _, err = main(capsys, dynamo, weird, "--report", data)
    assert code == 2
    one_line_error(err, "report")
    assert digest(dynamo, data) == before
    assert not weird.exists()


@pytest.mark.parametrize("case", ["missing_folder", "is_directory", "report_folder_missing"])
def test_output_path_problems_exit_6(tmp_path, capsys, vgg, case):
    args = {"missing_folder": [tmp_path / "no" / "such" / "o.onnx"],
            "is_directory": [tmp_path],
            "report_folder_missing": [tmp_path / "o.onnx", "--report", tmp_path / "no" / "r.json"]}[case]
    code, _, err = main(capsys, vgg, *args)
    assert code == 6
    one_line_error(err)
    assert not (tmp_path / "o.onnx").exists()


def test_output_folder_not_writable(tmp_path, capsys, vgg, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    else:  # root writes anywhere: simulate the check a normal user hits
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder and mode == os.W_OK
                            else real_access(p, mode, **kw))
    try:
        code, _, err = main(capsys, vgg, folder / "o.onnx")
    finally:
        folder.chmod(0o755)
    assert code == 6
    one_line_error(err, "not writable")
    assert leftovers(folder) == []


def test_write_permission_error_at_save_is_an_output_error(tmp_path, capsys, vgg, monkeypatch):
    """The folder looked writable but the write fails (read-only mount, ACL, quota)."""
    import tempfile

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", deny)
    code, _, err = main(capsys, vgg, tmp_path / "o.onnx", "--no-validate")
    assert code == 6
    one_line_error(err, "cannot write", "permission denied")
    assert leftovers(tmp_path) == ["in"]


# -- failures in the middle of a run -----------------------------------------------------


def _failing_save(exc: BaseException):
    real = onnx.save_model

    def save_then_fail(model, path, *args, **kwargs):
        real(model, path, *args, **kwargs)  # a complete temporary file exists now ...
        assert Path(path).exists()
        raise exc  # ... and the run dies before the rename

    return save_then_fail


@pytest.mark.parametrize("exc, code, words", [
    (OSError(28, "No space left on device"), 6, "no space left"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (RuntimeError("boom"), 1, "internal error, please report"),
    (MemoryError(), 1, "internal error, please report"),
])
def test_failure_during_save_leaves_no_output(tmp_path, capsys, dynamo, monkeypatch, exc, code, words):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = out_dir / "o.onnx"
    old.write_bytes(b"previous result")  # an earlier OUT survives a failed run unchanged
    before = digest(dynamo, dynamo.with_name("vgg_dynamo.onnx.data"))
    monkeypatch.setattr(onnx, "save_model", _failing_save(exc))
    got, _, err = main(capsys, dynamo, old, "--no-validate")
    assert got == code, err
    one_line_error(err, words)
    assert leftovers(out_dir) == ["o.onnx"] and old.read_bytes() == b"previous result"
    assert digest(dynamo, dynamo.with_name("vgg_dynamo.onnx.data")) == before


def test_failure_in_written_file_check_leaves_no_output(tmp_path, capsys, vgg, monkeypatch):
    def reject(path):
        raise ValidationError("the written model fails onnx.checker (please report this bug): simulated")

    monkeypatch.setattr(model_io, "_check_written", reject)
    code, _, err = main(capsys, vgg, tmp_path / "o.onnx", "--no-validate")
    assert code == 5
    one_line_error(err, "simulated")
    assert leftovers(tmp_path) == ["in"]


def test_written_file_is_checked_before_the_rename(tmp_path, vgg, monkeypatch):
    seen = []
    real = model_io._check_written

    def spy(path):
        seen.append((Path(path).parent.name.startswith(".onnx_intrafusion-"), (tmp_path / "o.onnx").exists()))
        real(path)

    monkeypatch.setattr(model_io, "_check_written", spy)
    model_io.save_model(onnx.load(str(vgg)), tmp_path / "o.onnx")
    assert seen == [(True, False)]
    assert (tmp_path / "o.onnx").exists()


def test_external_data_output_is_atomic(tmp_path, vgg, monkeypatch):
    model = onnx.load(str(vgg))
    written = model_io.save_model(model, tmp_path / "o.onnx", external=True)
    assert [p.name for p in written] == ["o.onnx", "o.onnx.data"]
    assert leftovers(tmp_path) == ["in", "o.onnx", "o.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "o.onnx"))
    monkeypatch.setattr(onnx, "save_model", _failing_save(OSError(5, "I/O error")))
    with pytest.raises(OutputError):
        model_io.save_model(model, tmp_path / "p.onnx", external=True)
    assert leftovers(tmp_path) == ["in", "o.onnx", "o.onnx.data"]


@pytest.mark.parametrize("debug", ["flag", "env", None])
def test_internal_error_is_one_line_unless_debug(tmp_path, capsys, vgg, monkeypatch, debug):
    from onnx_intrafusion import rewrite

    def broken(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(rewrite, "apply_maps", broken)
    args = [vgg, tmp_path / "o.onnx"]
    if debug == "flag":
        args.append("--debug")
    if debug == "env":
        monkeypatch.setenv(cli.DEBUG_ENV, "1")
    else:
        monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    code, _, err = main(capsys, *args)
    assert code == 1
    assert not (tmp_path / "o.onnx").exists() and leftovers(tmp_path) == ["in"]
    if debug:
        assert "Traceback" in err and "ZeroDivisionError: simulated bug" in err
        assert err.strip().splitlines()[-1].startswith("onnx-intrafusion: internal error, please report")
    else:
        line = one_line_error(err, "internal error, please report", "ZeroDivisionError", "simulated bug",
                              "--debug")
        assert "nothing written" in line


def test_report_write_failure_removes_the_output(tmp_path, capsys, vgg, monkeypatch):
    def fail(path, text):
        raise OutputError(f"cannot write report {path}: simulated")

    monkeypatch.setattr(cli, "_write_text", fail)
    code, _, err = main(capsys, vgg, tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--no-validate")
    assert code == 6
    one_line_error(err, "report")
    assert leftovers(tmp_path) == ["in"]


_SLOW_SAVE = textwrap.dedent("""
    import sys, time, onnx
    from onnx_intrafusion import cli
    real = onnx.save_model
    def slow_save(model, path, *a, **k):
        real(model, path, *a, **k)
        print("SAVING", flush=True)
        time.sleep(60)
    onnx.save_model = slow_save
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_signal_during_save_leaves_no_output(tmp_path, vgg, sig, code, words):
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(vgg), str(out), "--no-validate", "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        assert any(p.name.startswith(".onnx_intrafusion-") for p in out.parent.iterdir())  # mid-write
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    one_line_error(err, words, "nothing written")
    assert leftovers(out.parent) == []


# -- --help ------------------------------------------------------------------------------


def test_help_lists_every_option_and_examples():
    proc = subprocess.run([sys.executable, "-m", "onnx_intrafusion", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0
    parser = cli.build_parser()
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert len(options) >= 12
    for opt in options:
        assert opt in proc.stdout, opt
    assert "examples:" in proc.stdout and "onnx-intrafusion model.onnx" in proc.stdout
    for code in ("0 ok", "1 internal error", "2 bad option", "3 ", "4 nothing prunable", "5 ", "6 ", "7 ",
                 "130", "143"):
        assert code in proc.stdout, code
