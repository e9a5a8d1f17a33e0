"""Deployment: the channel multiple per target, int8 quantization, the ORT format, GPU."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_intrafusion import deploy, prune
from onnx_intrafusion.cli import main
from onnx_intrafusion.errors import UsageError

from conftest import ROOT, assert_valid, feeds_for, run, sample

sys.path.insert(0, str(ROOT / "benchmarks"))
from datasets import load_digits_split  # noqa: E402

DIGITS = ROOT / "samples" / "digits" / "digits_cnn.onnx"

AVX512 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
NEON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"
CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


# -- the table (docs/deploy.md) ------------------------------------------------------------------

@pytest.mark.parametrize("target, provider, available, cpuinfo, quantize, expected", [
    ("auto", "auto", CPU_ONLY, AVX512, "none", 16),  # ORT CPU, AVX-512: NCHWc block 16
    ("auto", "auto", CPU_ONLY, AVX2, "none", 8),  # AVX2: block 8
    ("auto", "cpu", WITH_CUDA, AVX512, "none", 16),  # validation forced onto CPU
    ("auto", "auto", WITH_CUDA, AVX512, "none", 8),  # CUDA: tensor cores
    ("auto", "cuda", CPU_ONLY, AVX2, "none", 8),
    ("auto", "auto", CPU_ONLY, NEON, "none", 4),
    ("auto", "auto", CPU_ONLY, NEON, "int8", 8),  # int8 kernels: at least 8
    ("ort-cpu", "auto", WITH_CUDA, AVX2, "none", 8),
    ("openvino", "auto", CPU_ONLY, AVX512, "none", 16),
    ("ort-cuda", "auto", CPU_ONLY, AVX512, "none", 8),
    ("tflite", "auto", CPU_ONLY, AVX512, "none", 8),
    ("ncnn", "auto", CPU_ONLY, AVX512, "none", 8),
    ("mnn", "auto", CPU_ONLY, AVX512, "none", 4),
    ("mnn", "auto", CPU_ONLY, AVX512, "int8", 8),
    ("none", "auto", CPU_ONLY, AVX512, "none", 1),
    ("none", "auto", CPU_ONLY, AVX512, "int8", 1),  # "none" means no rounding, whatever else
])
def test_target_picks_the_documented_multiple(target, provider, available, cpuinfo, quantize, expected):
    assert deploy.channel_multiple(target, provider, quantize, cpuinfo=cpuinfo, available=available) == expected


def test_cpu_flags_read_x86_and_arm_and_nothing():
    assert "avx512f" in deploy.cpu_flags(AVX512)
    assert "asimd" in deploy.cpu_flags(NEON)
    assert deploy.cpu_flags("") == set()


def test_reduce_range_only_on_x86_without_vnni():
    assert deploy.needs_reduce_range(deploy.cpu_flags(AVX2))
    assert not deploy.needs_reduce_range(deploy.cpu_flags(AVX512))  # has avx512_vnni
    assert not deploy.needs_reduce_range(deploy.cpu_flags(NEON))


def test_unknown_target_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown target"):
        prune(sample("resnet_legacy.onnx"), 0.5, target="tpu", validate=False)


def test_explicit_round_to_overrides_the_target():
    report = prune(sample("resnet_legacy.onnx"), 0.5, method="prune", target="ort-cpu", round_to=3,
                   validate=False).report
    assert report.options["round_to"] == 3
    assert all(g.channels_after % 3 == 0 for g in report.pruned_groups)


def test_command_line_default_is_the_machine_multiple(tmp_path):
    report = tmp_path / "r.json"
    assert main([str(sample("resnet_legacy.onnx")), str(tmp_path / "o.onnx"), "--method", "prune", "--quiet",
                 "--no-validate", "--report", str(report)]) == 0
    options = json.loads(report.read_text())["options"]
    assert options["target"] == "auto"
    assert options["round_to"] == deploy.channel_multiple("auto", "auto")
    # the library default keeps exact counts
    assert prune(sample("resnet_legacy.onnx"), 0.5, method="prune", validate=False).report.options["round_to"] == 1


@pytest.mark.parametrize("name", ["resnet_legacy.onnx", "resnet_dynamo.onnx", "mobilenetv2_legacy.onnx",
                                  "mobilenetv2_dynamo.onnx", "vgg_legacy.onnx", "vgg_dynamo.onnx"])
@pytest.mark.parametrize("target", ["ort-cpu", "mnn", "ort-cuda"])
def test_every_rounded_group_is_a_multiple_and_the_model_valid(load, name, target):
    multiple = deploy.channel_multiple(target, cpuinfo=AVX512, available=CPU_ONLY)
    result = prune(sample(name), 0.3, round_to=multiple, validate=False)
    assert result.report.options["round_to"] == multiple
    for g in result.report.groups:
        if g.status == "pruned":
            assert g.channels_after % multiple == 0 and 0 < g.channels_after < g.channels_before, vars(g)
        else:  # narrower than the multiple, or rounding would keep all: left whole
            assert g.channels_after == g.channels_before
    assert_valid(result.model, load(name))


# -- int8 ------------------------------------------------------------------------------------------

def _accuracy(model, x, y) -> float:
    out = run(model, {model.graph.input[0].name: x})
    return float(np.mean(next(iter(out.values())).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory):
    x_train, _ = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    calib = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(calib, x=x_train[:200])
    result = prune(DIGITS, 0.3, target="none", calibration=calib, recover="bias", quantize="int8", validate=False)
    return result, x_test, y_test


def test_int8_is_a_valid_qdq_model_close_to_the_pruned_fp32(digits_int8):
    result, x, y = digits_int8
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    assert deploy.is_qdq(model)
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    inits = {i.name: i for i in model.graph.initializer}
    # every weight is stored as int8 (fed through DequantizeLinear), per channel for convs
    deq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in convs:
        w = deq[node.input[1]]
        assert inits[w.input[0]].data_type == onnx.TensorProto.INT8
    q = result.report.quantization
    assert q["bytes_int8"] < q["bytes_fp32"] == result.fp32.ByteSize()  # tiny model: QDQ nodes weigh in
    fp32_weights = {i.name: i for i in result.fp32.graph.initializer}
    fp32_nodes = [n for n in result.fp32.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    weight_elements = sum(int(np.prod(fp32_weights[n.input[1]].dims)) for n in fp32_nodes)
    int8_bytes = sum(len(i.raw_data) for i in inits.values() if i.data_type == onnx.TensorProto.INT8)
    assert int8_bytes == weight_elements  # one byte per weight, 4x smaller than float32
    # accuracy oracle on the labelled test split, computed here, not by the tool
    acc_fp32, acc_int8 = _accuracy(result.fp32, x, y), _accuracy(model, x, y)
    assert acc_fp32 > 0.8  # the pruned model still works before quantization (99% unpruned)
    assert acc_int8 >= acc_fp32 - 0.02, (acc_fp32, acc_int8)
    assert q["drift_int8_vs_fp32"] < 0.05 and q["drift_int8"] < q["drift_fp32"] + 0.05, q


def test_quantize_without_calibration_is_refused(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main([str(sample("resnet_legacy.onnx")), str(out), "--quantize", "int8", "--quiet"])
    assert code == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- ORT format ----------------------------------------------------------------------------------

def test_ort_format_is_written_and_loads_with_the_same_outputs(tmp_path, load):
    out = tmp_path / "small.onnx"
    assert main([str(sample("resnet_legacy.onnx")), str(out), "--ort-format", "--quiet", "--method", "prune"]) == 0
    ort_file = tmp_path / "small.ort"
    assert ort_file.exists()
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.load_model_format", "ORT")
    sess = ort.InferenceSession(str(ort_file), opts, providers=["CPUExecutionProvider"])
    feeds = feeds_for(load("resnet_legacy.onnx"))
    expected = run(onnx.load(str(out)), feeds)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx", "small.ort"]


# -- GPU (runs only where onnxruntime-gpu sees a GPU) ---------------------------------------------

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA execution provider here (needs onnxruntime-gpu and a GPU)")
def test_cuda_validation_and_multiple():
    result = prune(sample("resnet_legacy.onnx"), 0.5, provider="cuda")
    assert result.report.validation["provider"] == "CUDAExecutionProvider"
    assert result.report.options["round_to"] == 8


def test_groups_narrower_than_the_multiple_are_left_whole_and_the_cli_says_why(tmp_path, capsys):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(n, TensorProto.FLOAT, shape, rng.standard_normal(shape).astype(np.float32).ravel())
               for n, shape in (("w1", [8, 3, 3, 3]), ("w2", [4, 8, 3, 3]))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    src = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out = tmp_path / "out.onnx"
    code = main([str(src), str(out), "--target", "ort-cuda", "--quiet"])  # multiple 8: both groups too narrow
    assert code == 4 and not out.exists()
    assert "at most round-to=8 channels (the channel multiple of --target ort-cuda" in capsys.readouterr().err
    assert main([str(src), str(out), "--target", "none", "--quiet"]) == 0  # 8 -> 4 channels
    assert [i.dims[0] for i in onnx.load(str(out)).graph.initializer if i.name == "w1"] == [4]
