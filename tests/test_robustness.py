"""Corrupted inputs never crash the tool; the same input and options give byte-identical output.

Corruption cases: ``ONNX_INTRAFUSION_CORRUPT_CASES`` (default 40) random byte flips,
truncations, deletions and insertions of valid models, run through the CLI in-process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_intrafusion import cli, prune

from conftest import ROOT, assert_valid, sample
from fuzz_models import build

CORRUPT_CASES = int(os.environ.get("ONNX_INTRAFUSION_CORRUPT_CASES", "40"))

#: Exit codes a corrupted input may produce: success (the damage hit weights only) or a user error.
#: 1 (internal error) is a bug.
CLEAN_CODES = {0, 2, 3, 4, 5, 6, 7}

SMALL_SPEC = {"opset": 17, "in_ch": 3, "size": 8, "dyn_batch": True, "head": "gap_gemm", "classes": 4,
              "seed": 7, "aux_out": False, "trans_b": True,
              "blocks": [("conv", 6, 3, 1, True, True, "Relu"), ("res", 3, False), ("se", 2), ("cat", 3, 3)]}


def corrupt(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip", "truncate", "delete", "insert"])
    buf = bytearray(data)
    if kind == "flip":
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(1, len(buf)))]
    elif kind == "delete":
        start = int(rng.integers(0, len(buf)))
        del buf[start:start + int(rng.integers(1, 64))]
    else:
        start = int(rng.integers(0, len(buf)))
        buf[start:start] = rng.bytes(int(rng.integers(1, 64)))
    return str(kind), bytes(buf)


def _sources(tmp_path: Path) -> list[bytes]:
    small = build(SMALL_SPEC).SerializeToString()
    return [small, small, sample("vgg_legacy.onnx").read_bytes()]  # small model twice: structure is hit more


@pytest.mark.parametrize("case", range(CORRUPT_CASES))
def test_corrupted_input_fails_cleanly_or_gives_a_valid_model(tmp_path, capsys, case):
    rng = np.random.default_rng([2024, case])
    sources = _sources(tmp_path)
    data = sources[case % len(sources)]
    kind, bad = corrupt(data, rng)
    src, out = tmp_path / "bad.onnx", tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    src.write_bytes(bad)
    code = cli.main([str(src), str(out), "--sparsity", "0.5", "--quiet"])
    _, err = capsys.readouterr()
    assert code in CLEAN_CODES, f"{kind}: exit {code}: {err}"
    assert "Traceback" not in err
    assert src.read_bytes() == bad  # the input is never modified
    if code == 0:
        assert_valid(onnx.load(str(out)), onnx.load(str(src)))
        assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx"]
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnx-intrafusion: error:"), err
        assert list(out.parent.iterdir()) == []


def test_corruption_mutations_are_real_and_varied(tmp_path):
    """The corruption test is only meaningful if every mutation changes the bytes, of every kind."""
    rng = np.random.default_rng([2024, 0])
    data = _sources(tmp_path)[0]
    kinds = set()
    for _ in range(20):
        kind, bad = corrupt(data, rng)
        kinds.add(kind)
        assert bad != data
    assert kinds == {"flip", "truncate", "delete", "insert"}


# -- determinism ------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_RUNS = {
    "intrafusion": ["--method", "intrafusion"],
    "prune_l2": ["--method", "prune", "--importance", "l2"],
    "random_seed5": ["--method", "intrafusion", "--importance", "random", "--seed", "5"],
}

#: One process runs every option set (process start-up dominates the cost of these small runs).
_DRIVER = """
import json, sys
from onnx_intrafusion import cli
for args in json.loads(sys.argv[1]):
    code = cli.main(args)
    if code:
        sys.exit(code)
"""


def _run_all(src: Path, folder: Path, hash_seed: str) -> dict[str, str]:
    import json

    folder.mkdir()
    runs = [[str(src), str(folder / f"{name}.onnx"), "--quiet", "--no-validate", *opts] for name, opts in _RUNS.items()]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(runs)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {name: _sha(folder / f"{name}.onnx") for name in _RUNS}


def test_same_input_and_options_give_identical_bytes(tmp_path, capsys):
    src = sample("resnet_dynamo.onnx")
    inputs = [src, src.with_name(src.name + ".data")]
    before = [_sha(p) for p in inputs]
    first = _run_all(src, tmp_path / "a", "1")
    second = _run_all(src, tmp_path / "b", "2")  # another process, another hash seed
    assert first == second
    assert len(set(first.values())) == len(first)  # the option sets really differ
    assert [_sha(p) for p in inputs] == before  # the input and its external data are untouched
    # The seed matters for random importance: the comparison above could fail.
    out = tmp_path / "seed6.onnx"
    assert cli.main([str(src), str(out), "--quiet", "--no-validate", *_RUNS["random_seed5"][:-1], "6"]) == 0
    assert _sha(out) != first["random_seed5"]


# -- weights listed as graph inputs (found by the fuzzer) ----------------------------------


def _io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def test_weights_listed_as_inputs_stay_listed_ir3():
    """IR 3 requires every initializer to be a graph input; the pruned model must still pass the checker."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])] + [
        helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                 [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    result = prune(model, sparsity=0.5)
    assert_valid(result.model, model)
    assert _io_names(result.model) == _io_names(model)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input}
    assert shapes["w1"] == [4, 3, 3, 3] and shapes["w2"] == [4, 4, 3, 3]  # listed with the pruned shapes


def test_torch_keep_initializers_as_inputs(tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), torch.randn(1, 3, 4, 4), str(path), dynamo=False, opset_version=13,
                      keep_initializers_as_inputs=True, input_names=["x"], output_names=["logits"])
    model = onnx.load(str(path))
    assert len(model.graph.input) > 1  # the weights really are listed
    result = prune(path, sparsity=0.5)
    assert_valid(result.model, model)
    assert _io_names(result.model) == _io_names(model)
    assert result.report.pruned_groups


# -- a weight shared by two Convs (found by the fuzzer) -------------------------------------


def _shared_weight_model(first_reads_input: bool) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda n, *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)  # noqa: E731
    conv = lambda x, wt, y: helper.make_node("Conv", [x, wt], [y], pads=[1, 1, 1, 1])  # noqa: E731
    relu = lambda x, y: helper.make_node("Relu", [x], [y])  # noqa: E731
    inits = [w("w", 8, 8, 3, 3), w("w_out", 4, 8, 3, 3)]
    nodes = [conv("x", "w", "a"), relu("a", "ra"), conv("ra", "w", "b"), relu("b", "rb"), conv("rb", "w_out", "y")]
    in_ch = 8
    if not first_reads_input:
        inits.append(w("w_in", 8, 3, 3, 3))
        nodes.insert(0, conv("x", "w_in", "x0"))
        nodes.insert(1, relu("x0", "rx"))
        nodes[2].input[0] = "rx"
        in_ch = 3
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shared_weight_read_from_the_graph_input_is_not_pruned(tmp_path, capsys):
    model = _shared_weight_model(first_reads_input=True)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    # Even without validation (which used to catch the broken result), nothing wrong is written.
    code = cli.main([str(src), str(tmp_path / "o.onnx"), "--no-validate"])
    err = capsys.readouterr().err
    assert code == 4, err
    assert "constant 'w' is shared" in err
    assert not (tmp_path / "o.onnx").exists()


def test_shared_weight_between_prunable_convs_is_still_pruned():
    model = _shared_weight_model(first_reads_input=False)
    result = prune(model, sparsity=0.5)
    assert_valid(result.model, model)
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert shapes["w"] == [4, 4, 3, 3] and shapes["w_in"] == [4, 3, 3, 3] and shapes["w_out"] == [4, 4, 3, 3]
