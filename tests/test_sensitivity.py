"""Per-group sensitivity analysis and the sensitivity allocation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, assert_valid
from onnx_intrafusion import allocation, coupling, model_io, plans, prune, rewrite, sensitivity
from onnx_intrafusion.errors import UsageError
from onnx_intrafusion.report import count_macs

MATTER, DUPLICATES = "fc1", "fc2"  # origins of the two groups of the toy model


def _toy(seed: int = 0) -> onnx.ModelProto:
    """x[8] -> fc1 (16 distinct channels) -> fc2 (channels 8..15 copy 0..7, barely read) -> fc3 -> y[10].

    fc1's channels all matter; fc2's second half duplicates its first half
    (same filters) and feeds the output through weights 100x smaller, so
    removing half of fc2 changes the output almost not at all.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(16)).astype(np.float32)
    base = rng.standard_normal((8, 16)).astype(np.float32) / 4
    w2 = np.concatenate([base, base])
    w3 = rng.standard_normal((10, 16)).astype(np.float32)
    w3[:, 8:] *= 0.01
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (np.zeros(16, np.float32), "b2"), (w3, "w3"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1, name=MATTER),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1, name=DUPLICATES),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("Gemm", ["a2", "w3"], ["y"], transB=1, name="fc3")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calib(n: int = 120, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)}


def _by_origin(table: sensitivity.Sensitivity) -> dict[str, sensitivity.GroupSensitivity]:
    return {g.origin: g for g in table.groups}


def _at(group: sensitivity.GroupSensitivity, level: float) -> float:
    return next(p.distortion for p in group.points if p.level == level)


@pytest.mark.parametrize("recover", ["none", "lstsq"])
def test_analysis_ranks_groups_and_allocation_prunes_the_duplicates(recover):
    model = _toy()
    result = prune(model, sparsity=0.3, allocation="sensitivity", calibration=_calib(), recover=recover,
                   workers=1, validate=False)
    groups = _by_origin(result.sensitivity)
    # Halving the duplicated group merges copies into originals: (almost) no distortion.
    assert _at(groups[DUPLICATES], 0.5) < 1e-4
    assert _at(groups[MATTER], 0.5) > 100 * _at(groups[DUPLICATES], 0.5)
    assert _at(groups[MATTER], 0.5) > 1e-2
    rows = {r.producers[0]: r for r in result.report.groups if r.producers}
    assert rows[MATTER].channels_after == 16
    assert 8 <= rows[DUPLICATES].channels_after < 16
    assert rows[DUPLICATES].sensitivity["distortion"] < 1e-4
    before, after = count_macs(model), count_macs(result.model)
    assert 1 - after / before >= 0.3
    assert_valid(result.model, model)


def _sample_files() -> list[str]:
    files = sorted(p.name for p in SAMPLES.glob("*.onnx"))
    files += sorted(f"fashion/{p.name}" for p in (SAMPLES / "fashion").glob("*.onnx"))
    return files


@pytest.mark.parametrize("name", _sample_files())
def test_allocation_meets_the_mac_budget_within_one_channel_step(name):
    """Random distortion curves on every sample: removed MACs >= budget, overshoot < one channel step.

    The MACs are counted independently on the rewritten model (report.count_macs, shape inference).
    """
    original = model_io.load_model(str(SAMPLES / name)).model
    graph = model_io.to_graph(original)
    analysis = coupling.analyse(graph)
    rng = np.random.default_rng(len(name))
    curves = {}
    for g in analysis.groups:
        if g.prunable:
            keeps = np.array([g.size] + [plans.keep_count(g.size, lv) for lv in (0.25, 0.5, 0.75)])
            curves[g.id] = (keeps, np.concatenate([[0.0], np.sort(rng.exponential(1.0, 3))]))
    macs = allocation.node_macs(graph, analysis)
    mac_model = allocation.MacModel(analysis, macs)
    for sparsity in (0.3, 0.5):
        keeps, _, met = allocation.sensitivity_keeps(analysis, curves, sparsity, macs, 0.9, 1)
        assert met
        total = mac_model.total(keeps)
        target = (1 - sparsity) * mac_model.before
        assert total <= target * (1 + 1e-9)
        # One channel more in any pruned group breaks the budget, and costs at most `step` MACs.
        steps = [mac_model.total({**keeps, gid: k + 1}) - total for gid, k in keeps.items() if k < graph_size(analysis, gid)]
        assert all(total + s > target for s in steps)
    maps = {gid: plans.selection(analysis.groups[gid].size, np.arange(k)) for gid, k in keeps.items()
            if k < analysis.groups[gid].size}
    rewrite.apply_maps(graph, analysis, maps)
    pruned = model_io.to_model(graph, original)
    assert count_macs(original) - count_macs(pruned) == pytest.approx(mac_model.before - total, rel=1e-6)


def graph_size(analysis, gid: int) -> int:
    return analysis.groups[gid].size


def _table(model, calib, **kwargs) -> sensitivity.Sensitivity:
    return prune(model, calibration=calib, analyse_only=True, **kwargs).sensitivity


def _points(table: sensitivity.Sensitivity) -> list:
    return [(g.id, p.keep, p.macs_saved, p.distortion, p.distortion_unrecovered) for g in table.groups for p in g.points]


def test_worker_processes_give_the_in_process_result():
    model, calib = _toy(), _calib()
    local = _table(model, calib, recover="lstsq", workers=1)
    pooled = _table(model, calib, recover="lstsq", workers=2)
    assert local.backend == "in-process" and pooled.backend == "2 workers"
    assert _points(pooled) == _points(local)


def test_ray_tasks_give_the_in_process_result():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'onnx-intrafusion[ray]')")
    model, calib = _toy(), _calib()
    local = _table(model, calib, recover="lstsq", workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = _table(model, calib, recover="lstsq", ray_address="local")
    finally:
        ray.shutdown()
    assert remote.backend == "ray"
    assert _points(remote) == _points(local)


def test_reused_analysis_gives_the_same_model(tmp_path):
    model, calib = _toy(), _calib()
    path = tmp_path / "sens.json"
    fresh = prune(model, sparsity=0.4, allocation="sensitivity", calibration=calib, sensitivity=str(path),
                  workers=1, validate=False)
    assert path.exists() and fresh.report.sensitivity["source"].startswith("measured")
    reused = prune(model, sparsity=0.4, allocation="sensitivity", calibration=calib, sensitivity=str(path),
                   workers=1, validate=False)
    assert reused.report.sensitivity["source"].startswith("read")
    assert reused.model.SerializeToString() == fresh.model.SerializeToString()


def test_analysis_of_another_model_is_refused_with_one_line(tmp_path):
    path = tmp_path / "sens.json"
    _table(_toy(seed=0), _calib(), workers=1).save(path)
    with pytest.raises(UsageError) as err:
        prune(_toy(seed=1), sparsity=0.3, allocation="sensitivity", calibration=_calib(), sensitivity=str(path),
              workers=1, validate=False)
    assert "another model" in str(err.value) and "\n" not in str(err.value)


def test_fingerprint_ignores_storage_and_names_of_nodes_but_not_weights():
    model = _toy()
    renamed = onnx.ModelProto.FromString(model.SerializeToString())
    for node in renamed.graph.node:
        node.name += "_x"
    raw = numpy_helper.to_array(renamed.graph.initializer[0])
    renamed.graph.initializer[0].CopyFrom(helper.make_tensor("w1", TensorProto.FLOAT, raw.shape, raw.ravel().tolist()))
    assert sensitivity.fingerprint(renamed) == sensitivity.fingerprint(model)
    renamed.graph.initializer[0].float_data[0] += 1e-3
    assert sensitivity.fingerprint(renamed) != sensitivity.fingerprint(model)


def test_table_round_trips_through_json(tmp_path):
    table = _table(_toy(), _calib(), workers=1, sensitivity_levels=(0.5, 0.25))
    assert table.levels == [0.25, 0.5]
    path = table.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["format"] == sensitivity.FORMAT
    again = sensitivity.Sensitivity.load(path, table.fingerprint)
    assert _points(again) == _points(table)
    assert "fc2" in table.to_text()


@pytest.mark.parametrize("kwargs, message", [
    (dict(allocation="sensitivity"), "needs calibration"),
    (dict(analyse_only=True), "needs calibration"),
    (dict(allocation="sensitivity", calibration=_calib(), sensitivity_levels=(0.5, 1.2)), "levels"),
    (dict(allocation="sensitivity", calibration=_calib(), workers=0), "workers"),
    (dict(calibration=_calib(), sensitivity="x.json"), "--sensitivity"),
])
def test_bad_sensitivity_options_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as err:
        prune(_toy(), sparsity=0.3, validate=False, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def _cli(*args) -> int:
    from onnx_intrafusion.cli import main

    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.fixture()
def toy_files(tmp_path):
    model, calib = tmp_path / "toy.onnx", tmp_path / "calib.npz"
    onnx.save(_toy(), str(model))
    np.savez(calib, **_calib())
    return model, calib


def test_cli_analyse_only_then_reuse(tmp_path, toy_files, capsys):
    model, calib = toy_files
    sens, out = tmp_path / "sens.json", tmp_path / "small.onnx"
    plot = tmp_path / "sens.png"
    # --target none: exact channel counts (the toy's groups are narrower than a CPU channel multiple)
    assert _cli(model, sens, "--analyse-only", "--calibration", calib, "--workers", 1, "--target", "none",
                "--sensitivity-levels", "0.25,0.5", "--sensitivity-plot", plot) == 0
    assert not out.exists() and sensitivity.Sensitivity.load(sens).levels == [0.25, 0.5]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not plot.exists()
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fc2" in capsys.readouterr().out
    assert _cli(model, out, "--allocation", "sensitivity", "--sensitivity", sens, "--sparsity", 0.3,
                "--calibration", calib, "--target", "none") == 0
    assert "read from" in capsys.readouterr().out
    assert_valid(onnx.load(str(out)), _toy())


@pytest.mark.parametrize("extra, message", [
    (["--allocation", "sensitivity"], "needs calibration data"),
    (["--workers", "2", "--calibration", "{calib}"], "--workers only applies to --allocation sensitivity"),
    (["--analyse-only", "--calibration", "{calib}"], "OUT is the analysis (JSON)"),
    (["--allocation", "sensitivity", "--calibration", "{calib}", "--workers", "2", "--ray", "auto"], "exclude"),
    (["--allocation", "sensitivity", "--calibration", "{calib}", "--global-target", "macs"], "only applies to global"),
    (["--allocation", "sensitivity", "--calibration", "{calib}", "--sensitivity-levels", "a,b"], "comma-separated"),
    (["--allocation", "sensitivity", "--calibration", "{calib}", "--sensitivity", "{other}"], "another model"),
])
def test_cli_sensitivity_usage_errors_are_one_line(tmp_path, toy_files, capsys, extra, message):
    model, calib = toy_files
    other = tmp_path / "other.json"
    _table(_toy(seed=3), _calib(), workers=1, sensitivity_levels=(0.5,)).save(other)
    out = tmp_path / "out.onnx"
    code = _cli(model, out, "--quiet", *[e.format(calib=calib, other=other) for e in extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("sparsity", [0.2, 0.35, 0.5, 0.6])
def test_knapsack_finds_the_brute_force_optimum_on_non_convex_curves(sparsity):
    """Toy chain x[8] -> fc1 (k1) -> fc2 (k2) -> y[10]: MACs = 8*k1 + k1*k2 + 10*k2, every (k1, k2) tried."""
    graph = model_io.to_graph(_toy())
    analysis = coupling.analyse(graph)
    a, b = (next(g.id for g in analysis.groups if g.origin == o) for o in (MATTER, DUPLICATES))
    keeps = np.array([16, 12, 8, 4])
    curves = {a: (keeps, np.array([0.0, 0.5, 0.6, 3.0])),  # non-convex: cheap 12 -> 8, expensive 8 -> 4
              b: (keeps, np.array([0.0, 0.05, 1.0, 1.1]))}
    chosen, predicted, met = allocation.sensitivity_keeps(analysis, curves, sparsity,
                                                          allocation.node_macs(graph, analysis))
    macs = lambda k1, k2: 8 * k1 + k1 * k2 + 10 * k2  # noqa: E731
    budget = (1 - sparsity) * macs(16, 16)
    best = min(np.interp(k1, keeps[::-1], curves[a][1][::-1]) + np.interp(k2, keeps[::-1], curves[b][1][::-1])
               for k1 in range(4, 17) for k2 in range(4, 17) if macs(k1, k2) <= budget)
    assert met and macs(chosen[a], chosen[b]) <= budget
    assert sum(predicted.values()) == pytest.approx(best, rel=1e-9, abs=1e-12)
