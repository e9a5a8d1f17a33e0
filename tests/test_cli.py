"""The command line end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from conftest import ROOT, assert_valid, message_lines, sample


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_intrafusion", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)


def test_cli_prunes_and_writes_report(tmp_path):
    out, rep = tmp_path / "pruned.onnx", tmp_path / "report.json"
    src = sample("resnet_dynamo.onnx")
    before = src.read_bytes(), (src.parent / (src.name + ".data")).read_bytes()
    proc = cli(src, out, "--sparsity", "0.5", "--report", rep)
    assert proc.returncode == 0, proc.stderr
    assert "MACs" in proc.stdout and "pruned" in proc.stdout
    report = json.loads(rep.read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert {"load", "groups", "plan", "rewrite", "validate"} <= set(report["timings_s"])
    pruned_rows = [g for g in report["groups"] if g["status"] == "pruned"]
    assert pruned_rows and all(g["producers"] and g["consumers"] for g in pruned_rows)
    assert report["validation"]["outputs"][0]["name"] == "logits"
    assert_valid(onnx.load(str(out)), onnx.load(str(src)))
    assert (src.read_bytes(), (src.parent / (src.name + ".data")).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx", "report.json"]


def test_cli_options_and_quiet(tmp_path):
    out = tmp_path / "p.onnx"
    proc = cli(sample("vgg_legacy.onnx"), out, "--sparsity", "0.3", "--method", "prune", "--importance", "l2",
               "--no-validate", "--quiet", "--provider", "cpu", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert out.exists()


@pytest.mark.parametrize("args, code, words", [
    (["missing.onnx", "o.onnx"], 3, "not found"),
    (["samples/vgg_legacy.onnx", "o.onnx", "--sparsity", "1.0"], 2, "sparsity"),
    (["samples/vgg_legacy.onnx", "o.onnx", "--method", "magic"], 2, "invalid choice"),
    (["samples/vgg_legacy.onnx", "samples/vgg_legacy.onnx"], 2, "differ"),
    (["samples/vgg_legacy.onnx", "no/such/dir/o.onnx"], 6, "does not exist"),
    (["samples/vgg_legacy.onnx", "o.onnx", "--provider", "cuda"], 7, "cuda"),
])
def test_cli_errors_are_one_line(tmp_path, args, code, words):
    args = [a if not a.startswith("samples/") else str(ROOT / a) for a in args]
    args = [str(tmp_path / a) if a.endswith("o.onnx") and "/" not in a else a for a in args]
    proc = cli(*args)
    assert proc.returncode == code, proc.stderr
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and words in lines[0].lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_help_lists_options():
    proc = cli("--help")
    assert proc.returncode == 0
    for opt in ("--sparsity", "--method", "--importance", "--report", "--no-validate", "--provider", "--seed"):
        assert opt in proc.stdout
    assert "examples:" in proc.stdout
