"""Calibration-driven recovery (bias / lstsq / ewr), activation importance, calibration input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, SAMPLES, assert_valid, run, sample
from onnx_intrafusion import prune, recovery
from onnx_intrafusion.cli import main as cli_main
from onnx_intrafusion.errors import UsageError


# --------------------------------------------------------------------------- helpers
def _linear_model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x[N, d] -> Gemm(w1, transB) -> Gemm(w2, transB) -> y: linear only."""
    d, h, o = w1.shape[1], w1.shape[0], w2.shape[0]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(h, np.float32), "b1"),
             numpy_helper.from_array(w2.astype(np.float32), "w2"),
             numpy_helper.from_array(np.full(o, 0.1, np.float32), "b2")]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", o])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _stats(x: np.ndarray, t: np.ndarray, keep_rows: int = 0) -> recovery.Stats:
    st = recovery.Stats(1, x.shape[1], t.shape[1], keep_rows=keep_rows)
    for i in range(0, len(x), 100):
        st.add(x[i:i + 100, None, :], t[i:i + 100, None, :])
    return st


# --------------------------------------------------------------------------- solvers
def test_lstsq_recovers_exact_linear_map_from_any_prior():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6))
    w_true, b_true = rng.standard_normal((6, 3)), rng.standard_normal(3)
    st = _stats(x, x @ w_true + b_true)
    truth = np.concatenate([w_true, b_true[None]])[None]
    # The true map is its own fixed point (nothing pruned: nothing changes) ...
    assert np.allclose(recovery.solve_lstsq(st, truth, alpha=1e-3), truth, atol=1e-10)
    # ... and a zero prior is pulled to it by the data.
    assert np.allclose(recovery.solve_lstsq(st, np.zeros_like(truth), alpha=1e-9), truth, atol=1e-5)
    assert st.relative_error(truth) < 1e-6


def test_bias_mode_matches_mean_output():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 4)) + 2.0
    t = x @ rng.standard_normal((4, 2)) + 5.0
    st = _stats(x, t)
    prior = np.concatenate([rng.standard_normal((4, 2)), np.zeros((1, 2))])[None]
    new = recovery.solve_bias(st, prior)
    pred = x @ new[0, :4] + new[0, 4]
    assert np.allclose(pred.mean(axis=0), t.mean(axis=0))
    assert np.array_equal(new[0, :4], prior[0, :4])


def test_ewr_with_diagonal_coupling_is_lstsq():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((600, 5))
    t = x @ rng.standard_normal((5, 3)) + 0.3 * rng.standard_normal((600, 3))
    st = _stats(x, t, keep_rows=512)
    prior = rng.standard_normal((1, 6, 3))
    diagonal = lambda targets, preds: np.eye(len(targets)) / len(targets)  # noqa: E731
    ewr = recovery.solve_ewr(st, prior, alpha=1e-3, coupling=diagonal)
    assert np.allclose(ewr, recovery.solve_lstsq(st, prior, alpha=1e-3), atol=1e-10)


def test_ewr_tends_to_lstsq_as_eps_vanishes_and_to_the_mean_for_large_eps():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 6))
    t = x @ rng.standard_normal((6, 4)) + 2.0
    st = _stats(x, t, keep_rows=512)
    prior = np.zeros((1, 7, 4))
    ls = recovery.solve_lstsq(st, prior, alpha=1e-6)
    sharp = recovery.solve_ewr(st, prior, alpha=1e-6, eps=1e-3)
    assert np.allclose(sharp, ls, atol=1e-3)
    # A flat coupling (uniform plan) transports every target to the mean target of its Sinkhorn
    # block: with one block, the regression onto the mean, slope 0 and bias = mean(t).
    flat = recovery.solve_ewr(st, prior, alpha=1e-6, eps=1e6, block=512)
    np.testing.assert_allclose(flat[0, :6], 0.0, atol=1e-3)
    np.testing.assert_allclose(flat[0, 6], t.mean(axis=0), atol=1e-3)


def test_ewr_solves_least_squares_against_the_transported_targets():
    """With a coupling that pairs each prediction with another row's target, EWR's step is least
    squares against those targets: a different solution from lstsq, computed here by numpy."""
    rng = np.random.default_rng(6)
    n = 256
    x = rng.standard_normal((n, 4))
    t = x @ rng.standard_normal((4, 2)) + 0.5 * rng.standard_normal((n, 2))
    st = _stats(x, t, keep_rows=n)
    perm = np.roll(np.arange(n), 1)  # prediction j is matched with target j - 1 (within a Sinkhorn block)
    blocks = {}

    def shifted(targets, preds):
        plan = np.zeros((len(targets), len(preds)))
        plan[np.roll(np.arange(len(targets)), 1), np.arange(len(preds))] = 1.0 / len(targets)
        blocks[len(targets)] = blocks.get(len(targets), 0) + 1
        return plan

    prior = np.zeros((1, 5, 2))
    ewr = recovery.solve_ewr(st, prior, alpha=1e-9, coupling=shifted, block=n)
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    want = np.linalg.lstsq(xa, t[perm], rcond=None)[0]
    np.testing.assert_allclose(ewr[0], want, atol=1e-6)
    ls = np.linalg.lstsq(xa, t, rcond=None)[0]
    assert np.abs(want - ls).max() > 0.05  # the coupling matters here
    assert blocks == {n: recovery.EWR_ITERS}


def test_conv_rows_match_onnxruntime_convolution():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # grouped: 2 groups
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, pads=[1, 0, 1, 2], strides=[2, 1])
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    y = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), {"x": x})["y"]
    lin = recovery.from_node("Conv", w, None, {"group": 2, "pads": [1, 0, 1, 2], "strides": [2, 1]})
    pos = np.array([0, 3, 5, y.shape[2] * y.shape[3] - 1])
    xr, yr = recovery.conv_rows(x, y, lin, pos, (3, 3))
    pred = np.einsum("ngd,gdo->ngo", xr, lin.weight).reshape(len(yr), -1)
    assert np.allclose(pred, yr, atol=1e-4)
    assert np.array_equal(recovery.to_weight(lin, lin.weight), w)


# --------------------------------------------------------------------------- pipeline
def test_activation_importance_keeps_the_loudest_channels_where_weight_norms_disagree():
    """Hidden channels 0 and 1 read inputs with large spread through small weights; channels 2 and 3
    read near-constant-zero inputs through large weights.  With no recovery, activation importance
    keeps 0 and 1, l1 keeps 2 and 3, and only the former stays close to the original."""
    rng = np.random.default_rng(8)
    w1 = np.diag([0.2, 0.3, 4.0, 5.0])
    w2 = rng.choice([-1.0, 1.0], size=(3, 4))  # equal consumer norms
    model = _linear_model(w1, w2)
    model.graph.node.insert(1, helper.make_node("Relu", ["h"], ["h_relu"]))
    model.graph.node[2].input[0] = "h_relu"
    x = (rng.standard_normal((256, 4)) * np.array([10.0, 10.0, 0.01, 0.01])).astype(np.float32)
    kwargs = dict(sparsity=0.5, method="prune", validate=False)
    by_activation = prune(model, importance="activation", calibration={"x": x}, recover="none", **kwargs)
    by_weights = prune(model, importance="l1", **kwargs)
    assert by_activation.report.options["recover"] == "none" and not by_activation.report.recovery
    assert by_activation.report.groups[0].kept == [0, 1]
    assert by_weights.report.groups[0].kept == [2, 3]
    test = {"x": x[:64]}
    want = run(model, test)["y"]
    err = {k: np.abs(run(r.model, test)["y"] - want).max() for k, r in (("act", by_activation), ("l1", by_weights))}
    assert err["act"] < 0.05 * err["l1"], err


def test_lstsq_restores_linear_model_after_pruning_duplicates():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((4, 6))
    base /= np.abs(base).sum(axis=1, keepdims=True)  # equal producer norms: the consumer decides
    w1 = np.concatenate([base, base])  # channels 4..7 duplicate 0..3
    head = rng.standard_normal((3, 4))
    head /= np.abs(head).sum(axis=0, keepdims=True)
    w2 = np.concatenate([head, 0.5 * head], axis=1)  # the duplicates matter less: channels 0..3 are kept
    model = _linear_model(w1, w2)
    x = rng.standard_normal((256, 6)).astype(np.float32)
    plain = prune(model, 0.5, "prune", validate=False).model
    fixed = prune(model, 0.5, "prune", calibration={"x": x}, recover="lstsq", recover_alpha=1e-8, validate=False)
    test = {"x": rng.standard_normal((32, 6)).astype(np.float32)}
    want = run(model, test)["y"]
    assert not np.allclose(run(plain, test)["y"], want, atol=1e-2)  # plain pruning loses the duplicates
    assert np.allclose(run(fixed.model, test)["y"], want, atol=1e-3)
    assert fixed.report.groups[0].kept == [0, 1, 2, 3]
    assert fixed.report.recovery and fixed.report.recovery[-1]["error_after"] < 1e-3
    assert_valid(fixed.model, model)


def test_a_fixed_batch_model_holds_back_whole_batches_and_recovery_is_checked():
    """A model exported with batch 8 and 64 samples: 10% would be 6 samples, less than one batch."""
    from onnx_intrafusion import calibration

    rng = np.random.default_rng(7)
    model = _linear_model(rng.standard_normal((8, 6)), rng.standard_normal((3, 8)))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 8  # clears the symbolic batch
    x = {"x": rng.standard_normal((64, 6)).astype(np.float32)}
    split = calibration.Holdback.of(x, model, seed=0)
    assert split.held is not None and len(split.held["x"]) == 8 and len(split.fit["x"]) == 56
    result = prune(model, 0.5, "prune", calibration=x, recover="lstsq", validate=False)
    assert result.report.recovery_model is not None  # the never-worse check ran on the held-back batch
    assert result.report.recovery_model["held_back_samples"] == 8
    # Dynamic batch: the usual 10% (rounded), no rounding to batches.
    assert len(calibration.split_holdback(x, seed=0)[1]["x"]) == 6


@pytest.mark.parametrize("mode", ["bias", "lstsq", "ewr"])
def test_recovery_on_degenerate_calibration_fits_that_data(mode):
    """Constant calibration inputs (all zero, all 1e4): the Gram matrices are rank one.  Recovery
    must stay finite and, on those very inputs, be at least as close to the original as no recovery."""
    src = sample("vgg_dynbatch_legacy.onnx")
    model = onnx.load(str(src))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    plain = prune(src, 0.5, validate=False).model
    for x in (np.zeros([8, *shape], np.float32), np.full([8, *shape], 1e4, np.float32)):
        result = prune(src, 0.5, calibration={"any": x}, recover=mode, validate=False)
        for init in result.model.graph.initializer:
            assert np.all(np.isfinite(numpy_helper.to_array(init)))
        assert_valid(result.model, model)
        feeds = {model.graph.input[0].name: x[:2]}
        want = next(iter(run(model, feeds).values()))
        err = {name: np.abs(next(iter(run(m, feeds).values())) - want).max()
               for name, m in (("recovered", result.model), ("plain", plain))}
        assert err["recovered"] <= err["plain"] * 1.01 + 1e-3 * np.abs(want).max(), err


DIGITS = SAMPLES / "digits" / "digits_cnn.onnx"


def test_calibration_beats_data_free_on_real_digits():
    sys.path.insert(0, str(ROOT))
    from benchmarks.datasets import load_digits_split

    x_train = load_digits_split("train")[0]
    x_test, y_test = load_digits_split("test")
    name = onnx.load(str(DIGITS)).graph.input[0].name

    def accuracy(model):
        return float((next(iter(run(model, {name: x_test}).values())).argmax(1) == y_test).mean())

    base = accuracy(onnx.load(str(DIGITS)))
    free = accuracy(prune(DIGITS, 0.5, validate=False).model)
    calib = {"images": x_train[:256]}
    acc = {mode: accuracy(prune(DIGITS, 0.5, calibration=calib, recover=mode, validate=False).model)
           for mode in ("lstsq", "ewr")}
    # activation importance together with the default lstsq recovery (alone: see the constructed test above)
    act = accuracy(prune(DIGITS, 0.5, importance="activation", calibration=calib, recover="lstsq",
                         validate=False).model)
    assert base > 0.9
    gap = 0.3  # the bundled model collapses without data (~10-20%)
    assert acc["lstsq"] > free + gap and acc["lstsq"] > 0.8, (base, free, acc)
    assert acc["ewr"] > free + gap, (free, acc)
    assert act > free + gap, (free, act)


# --------------------------------------------------------------------------- options and errors
def test_calibration_forms_are_equivalent(tmp_path):
    src = sample("vgg_dynbatch_legacy.onnx")
    shape = [d.dim_value for d in onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(0).standard_normal([12, *shape]).astype(np.float32)
    np.savez(tmp_path / "c.npz", whatever=x)
    a = prune(src, 0.5, calibration=tmp_path / "c.npz", validate=False)
    b = prune(src, 0.5, calibration=[{"input": x[:6]}, {"input": x[6:]}], recover="lstsq", validate=False)
    c = prune(src, 0.5, calibration={"x": x.astype(np.float64)}, calibration_samples=12, validate=False)
    assert a.report.options["recover"] == "lstsq" and a.report.calibration["samples"] == 12
    weights = [{i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer} for r in (a, b, c)]
    for name, value in weights[0].items():
        assert np.allclose(value, weights[1][name], atol=1e-5) and np.allclose(value, weights[2][name], atol=1e-5)
    assert any(g.recovery_error for g in a.report.groups)
    assert "recon. error" in a.report.to_text()


def _bad_calibration(tmp_path):
    src = sample("vgg_dynbatch_legacy.onnx")
    shape = [d.dim_value for d in onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim][1:]
    good = np.zeros([4, *shape], np.float32)
    np.save(tmp_path / "single.npy", good)
    (tmp_path / "junk.npz").write_text("not a zip")
    return src, [
        (tmp_path / "missing.npz", "not found"),
        (tmp_path / "junk.npz", "not a readable .npz"),
        (tmp_path / "single.npy", "single .npy"),
        ({"input": good[:0]}, "empty"),
        ({"input": good[:, :, :3]}, "has shape"),
        ({"input": good[0]}, "rank"),
        ({"input": good.astype(np.int32)}, "dtype"),
        ({"a": good, "b": good}, "lacks model input"),
        ({"input": np.full_like(good, np.nan)}, "NaN"),
        ({"input": good, "other": good[:2]}, "different sample counts"),
    ]


def test_bad_calibration_is_a_one_line_usage_error(tmp_path):
    src, cases = _bad_calibration(tmp_path)
    for calib, needle in cases:
        with pytest.raises(UsageError, match=needle) as info:
            prune(src, 0.5, calibration=calib, validate=False)
        assert "\n" not in str(info.value)
    for kwargs, needle in [(dict(recover="lstsq"), "needs calibration"),
                           (dict(importance="activation"), "needs calibration"),
                           (dict(calibration={"x": np.zeros((2, 3))}, recover="magic"), "unknown recovery"),
                           (dict(calibration={"x": np.zeros((2, 3))}, calibration_samples=0), "positive"),
                           (dict(calibration={"x": np.zeros((2, 3))}, ewr_eps=0), "ewr-eps")]:
        with pytest.raises(UsageError, match=needle):
            prune(src, 0.5, validate=False, **kwargs)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnx_intrafusion", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_cli_calibration_options(tmp_path, capsys):
    src = sample("vgg_dynbatch_legacy.onnx")
    shape = [d.dim_value for d in onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim][1:]
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal([16, *shape]).astype(np.float32))
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    proc = _cli(src, out, "--calibration", tmp_path / "calib.npz", "--calibration-samples", 8, "--recover", "ewr",
                "--importance", "activation", "--report", rep, "--no-validate")
    assert proc.returncode == 0, proc.stderr
    assert "recovery ewr on 8 calibration samples" in proc.stdout
    report = json.loads(rep.read_text())
    assert report["options"]["recover"] == "ewr" and report["recovery"]
    assert_valid(onnx.load(str(out)), onnx.load(str(src)))
    for args, needle in [(("--calibration", tmp_path / "nope.npz"), "calibration file not found"),
                         (("--recover", "lstsq"), "needs calibration data"),
                         (("--importance", "activation"), "needs calibration data")]:
        code = cli_main([str(a) for a in (src, tmp_path / "x.onnx", *args)])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "x.onnx").exists()


def test_cli_maps_large_allocations_only_in_data_free_runs(tmp_path, monkeypatch):
    """A 1 MB mmap threshold lowers a data-free run's peak; with calibration data it only adds page faults."""
    from onnx_intrafusion import model_io

    calls = []
    monkeypatch.setattr(model_io, "map_large_allocations", lambda: calls.append(1))
    src = sample("vgg_dynbatch_legacy.onnx")
    shape = [d.dim_value for d in onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim][1:]
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal([8, *shape]).astype(np.float32))
    assert cli_main([str(src), str(tmp_path / "a.onnx"), "--no-validate", "--quiet"]) == 0
    assert calls == [1]
    assert cli_main([str(src), str(tmp_path / "b.onnx"), "--calibration", str(tmp_path / "calib.npz"),
                     "--no-validate", "--quiet"]) == 0
    assert calls == [1]
