"""The command line as a careless user drives it: special files, closed pipes, meaningless options."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_intrafusion import prune
from onnx_intrafusion.errors import NothingToPrune, PruneWarning, UsageError
from onnx_intrafusion.options import Options
from onnx_intrafusion.report import mac_count

from conftest import ROOT, PROGRESS_LINE, assert_valid, message_lines, sample


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_intrafusion", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, **kwargs)


# -- output paths ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null on this system")
def test_device_as_out_is_refused_and_left_alone():
    proc = cli(sample("vgg_legacy.onnx"), "/dev/null")
    assert proc.returncode == 6, proc.stderr
    assert "device" in message_lines(proc.stderr)[0]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("which", ["out", "report"])
def test_fifo_is_refused_before_any_work(tmp_path, which):
    fifo = tmp_path / "f.onnx"
    os.mkfifo(fifo)
    args = [fifo] if which == "out" else [tmp_path / "o.onnx", "--report", fifo]
    proc = cli(sample("vgg_legacy.onnx"), *args)  # would block forever if the FIFO were opened
    assert proc.returncode == 6, proc.stderr
    assert "FIFO" in message_lines(proc.stderr)[0]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not (tmp_path / "o.onnx").exists()
    assert not [p for p in message_lines(proc.stderr) if "load" in p]


def test_directory_as_report_is_refused(tmp_path):
    proc = cli(sample("vgg_legacy.onnx"), tmp_path / "o.onnx", "--report", tmp_path)
    assert proc.returncode == 6 and "directory" in message_lines(proc.stderr)[0]
    assert not (tmp_path / "o.onnx").exists()


def test_symlink_out_replaces_its_target_and_stays_a_link(tmp_path):
    target = tmp_path / "real" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    proc = cli(sample("vgg_legacy.onnx"), link, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert_valid(onnx.load(str(target)), onnx.load(str(sample("vgg_legacy.onnx"))))


# -- closed pipes ---------------------------------------------------------------------------------------------


def test_closed_stdout_never_fails_a_written_run(tmp_path):
    """`... | head -1`: stdout closes early; exit 0 and a complete OUT, every time."""
    for i in range(4):
        out = tmp_path / f"o{i}.onnx"
        proc = subprocess.Popen([sys.executable, "-m", "onnx_intrafusion", str(sample("vgg_legacy.onnx")), str(out)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader went away before anything was printed
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 0, err
        assert "Traceback" not in err and "internal error" not in err
        assert_valid(onnx.load(str(out)), onnx.load(str(sample("vgg_legacy.onnx"))))


def test_closed_stdout_on_a_failing_run_leaves_no_out(tmp_path):
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnx_intrafusion", str(sample("vgg_legacy.onnx")), str(out),
                             "--sparsity", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 4
    assert not out.exists()


# -- options that mean nothing are refused ---------------------------------------------------------------------


@pytest.mark.parametrize("args, code, words", [
    (["--seed", "-1"], 2, "non-negative"),
    (["--round-to", "0"], 2, "positive"),
    (["--sparsity", "0"], 4, "sparsity 0"),
    (["--round-to", "1000"], 4, "round-to=1000"),
    (["--max-group-sparsity", "0.5"], 2, "only applies to global"),
    (["--global-target", "channels"], 2, "only applies to global"),
    (["--method", "prune", "--ot-reg", "0.1"], 2, "only applies to --method intrafusion"),
    (["--recover", "lstsq"], 2, "needs calibration data"),
    (["--recover-alpha", "0.1"], 2, "needs calibration data"),
])
def test_meaningless_options_are_one_line_errors(tmp_path, args, code, words):
    out = tmp_path / "o.onnx"
    proc = cli(sample("vgg_legacy.onnx"), out, *args)
    assert proc.returncode == code, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not out.exists()


def test_allow_unchanged_writes_a_copy(tmp_path):
    out = tmp_path / "o.onnx"
    proc = cli(sample("vgg_legacy.onnx"), out, "--sparsity", "0", "--allow-unchanged", "--quiet")
    assert proc.returncode == 0, proc.stderr
    original = onnx.load(str(sample("vgg_legacy.onnx")))
    assert_valid(onnx.load(str(out)), original)


def test_api_refuses_unknown_groups_and_unknown_options():
    with pytest.raises(UsageError, match="no group 99"):
        prune(sample("vgg_legacy.onnx"), groups=[99], validate=False)
    with pytest.raises(UsageError, match="unknown option"):
        prune(sample("vgg_legacy.onnx"), sparsty=0.5)
    with pytest.raises(UsageError, match="not both"):
        prune(sample("vgg_legacy.onnx"), 0.3, options=Options())


def test_options_only_with_their_partner():
    assert Options(method="prune").resolve(False).ot_reg is None
    assert Options().resolve(False).ot_reg == 0.0
    assert Options(allocation="global").resolve(False).max_group_sparsity == 0.9
    assert Options().resolve(True).recover == "lstsq" and Options().resolve(False).recover == "none"
    with pytest.raises(UsageError, match="ewr-eps only applies"):
        Options(ewr_eps=0.1).resolve(True)


def test_few_calibration_samples_warn():
    x = np.random.default_rng(0).standard_normal([3, 3, 32, 32]).astype(np.float32)
    with pytest.warns(PruneWarning, match="only 3 calibration sample"):
        prune(sample("vgg_legacy.onnx"), calibration={"input": x}, validate=False)


# -- what the user reads ----------------------------------------------------------------------------------------


def test_random_input_validation_does_not_claim_top1(tmp_path):
    proc = cli(sample("vgg_legacy.onnx"), tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("validation on"))
    assert "random inputs" in lines[header] and "say nothing about accuracy" in lines[header]
    assert lines[header + 1].strip().startswith("logits:") and "top-1" not in lines[header + 1]


def test_calibration_validation_reports_top1_on_held_back_samples(tmp_path):
    x = np.random.default_rng(0).standard_normal([40, 3, 32, 32]).astype(np.float32)
    result = prune(sample("vgg_dynbatch_legacy.onnx"), calibration={"input": x})
    v = result.report.validation
    assert v["inputs"] == "calibration" and v["samples"] == 4  # 10% of 40 held back
    assert v["outputs"][0]["top1_agreement"] is not None
    assert "held-back calibration samples" in result.report.to_text()


def test_progress_lines_on_a_log_and_silence_with_quiet(tmp_path):
    proc = cli(sample("vgg_legacy.onnx"), tmp_path / "o.onnx")
    stages = [line for line in proc.stderr.splitlines() if PROGRESS_LINE.match(line)]
    assert any("load" in s for s in stages) and any("validate" in s for s in stages)
    quiet = cli(sample("vgg_legacy.onnx"), tmp_path / "q.onnx", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_report_to_stdout_is_pure_json_and_complete(tmp_path):
    out = tmp_path / "o.onnx"
    proc = cli(sample("resnet_dynamo.onnx"), out, "--report", "-", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    from onnx_intrafusion import __version__

    assert report["tool"] == {"name": "onnx-intrafusion", "version": __version__}
    assert report["input"].endswith("resnet_dynamo.onnx") and report["output"] == str(out)
    assert set(report["options"]) == {f for f in Options.__dataclass_fields__}
    assert report["options"]["seed"] == 3 and report["options"]["recover"] == "none"
    assert report["validation"]["provider"] == "CPUExecutionProvider"
    assert "MACs" in proc.stderr  # the table went to stderr


# -- numbers in the report ----------------------------------------------------------------------------------------


def _attention_model(path, seq: int, hidden: int, heads: int) -> None:
    """A BERT-style block exported by torch: head reshapes computed from Shape ops at run time."""
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))

        def forward(self, x):
            b, s, _ = x.shape
            split = lambda t: t.view(b, s, heads, hidden // heads).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            return self.o((att @ v).transpose(1, 2).reshape(b, s, hidden))

    torch.manual_seed(0)
    torch.onnx.export(Block().eval(), (torch.randn(1, seq, hidden),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}})


def test_macs_of_an_attention_export_match_the_formula(tmp_path):
    from onnx_intrafusion.model_io import DEFAULT_DYNAMIC_DIM

    hidden, heads = 16, 4
    _attention_model(tmp_path / "att.onnx", 8, hidden, heads)
    s = DEFAULT_DYNAMIC_DIM  # the dynamic sequence length is counted as this
    expected = 4 * s * hidden * hidden + 2 * s * s * hidden  # 4 projections + QK^T + AV (summed over heads)
    count = mac_count(onnx.load(str(tmp_path / "att.onnx")))
    assert count.total == expected, count


def test_unknown_macs_are_reported_as_unknown_not_zero():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [helper.make_node("MyOp", ["x"], ["h"], domain="my.domain"), helper.make_node("MatMul", ["h", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    count = mac_count(model)
    assert count.total is None and "unknown" in count.reason


def test_data_free_run_never_imports_torch():
    code = ("import sys; from onnx_intrafusion import prune; "
            f"prune(r'{sample('resnet_legacy.onnx')}', 0.5); print('torch' in sys.modules, 'ot' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


def test_nothing_to_prune_is_its_own_error():
    with pytest.raises(NothingToPrune, match="round-to=1000"):
        prune(sample("vgg_legacy.onnx"), round_to=1000, validate=False)


def test_no_library_chatter_on_a_transformer_export(tmp_path):
    """onnx-graphsurgeon's fold warnings and onnxruntime's optimizer notes never reach a --quiet run."""
    vit = ROOT / "samples" / "transformers" / "vit_legacy.onnx"
    proc = cli(vit, tmp_path / "v.onnx", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    loud = cli(vit, tmp_path / "w.onnx")
    assert "onnxruntime" not in loud.stdout and "[W" not in loud.stdout + loud.stderr
