"""Allocation across group kinds on a transformer: ``--global`` prunes heads and FFN neurons to a MAC target.

The oracle is the trained Fashion-MNIST ViT's architecture, written out here
from its sample description (samples/README.md), not from the tool's MAC
model: patch embedding 1->64 channels on 7x7 patches of 4x4 pixels (49
tokens), 4 pre-LayerNorm blocks of 4 heads x 16 and an MLP 64->128->64,
mean pooling, a 64->10 classifier.  Given the heads and FFN neurons each
block keeps (read from the report's groups), it counts the MACs of every
Conv/MatMul/Gemm: Q, K, V and the output projection are 49 x 64 x 16 per
kept head each, ``Q K^T`` and ``softmax x V`` 49 x 49 x 16 per kept head
each, fc1 and fc2 49 x 64 per kept neuron each.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from onnx_intrafusion import prune
from onnx_intrafusion.errors import UsageError

VIT = Path(__file__).resolve().parent.parent / "samples" / "transformers" / "vit_legacy.onnx"
TOKENS, HIDDEN, HEAD_DIM, LAYERS = 49, 64, 16, 4


def oracle_macs(heads: list[int], neurons: list[int]) -> int:
    patch = TOKENS * HIDDEN * 16  # Conv 1->64, kernel 4x4, 7x7 outputs
    per_head = 4 * TOKENS * HIDDEN * HEAD_DIM + 2 * TOKENS * TOKENS * HEAD_DIM
    per_neuron = 2 * TOKENS * HIDDEN
    return patch + sum(per_head * h + per_neuron * f for h, f in zip(heads, neurons)) + HIDDEN * 10


def _kept(report: dict, kind: str) -> list[int]:
    return [g["channels_after"] for g in report["groups"] if g["kind"] == kind]


def _run(**kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(str(VIT), target="none", **kw).report.to_dict()


def test_oracle_matches_the_unpruned_model():
    rep = _run(sparsity=0.0, allow_unchanged=True)
    assert _kept(rep, "head") == [4] * LAYERS and _kept(rep, "ffn") == [128] * LAYERS
    assert rep["macs"]["before"] == oracle_macs([4] * LAYERS, [128] * LAYERS)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_global_prunes_heads_and_ffn_to_the_mac_target(sparsity):
    rep = _run(sparsity=sparsity, allocation="global")
    heads, neurons = _kept(rep, "head"), _kept(rep, "ffn")
    assert sum(heads) < 4 * LAYERS and sum(neurons) < 128 * LAYERS  # both kinds pruned
    before, after = oracle_macs([4] * LAYERS, [128] * LAYERS), oracle_macs(heads, neurons)
    assert rep["macs"]["after"] == after  # the report's count agrees with the architecture
    removed = 1 - after / before
    # Met, and not overshot by more than a few FFN neurons (one head alone is 3.6% of the MACs).
    assert sparsity - 1e-9 <= removed <= sparsity + 0.005, removed
    kinds = rep["kinds"]
    assert (kinds["head"]["before"], kinds["head"]["after"]) == (4 * LAYERS, sum(heads))
    assert (kinds["ffn"]["before"], kinds["ffn"]["after"]) == (128 * LAYERS, sum(neurons))


def test_global_with_a_fixed_kind_allocates_the_others():
    rep = _run(sparsity=0.3, allocation="global", head_sparsity=0.0)
    heads, neurons = _kept(rep, "head"), _kept(rep, "ffn")
    assert heads == [4] * LAYERS  # fixed by --head-sparsity 0
    removed = 1 - oracle_macs(heads, neurons) / oracle_macs([4] * LAYERS, [128] * LAYERS)
    assert 0.3 - 1e-9 <= removed <= 0.305, removed

    rep = _run(sparsity=0.3, allocation="global", ffn_sparsity=0.25)
    assert _kept(rep, "ffn") == [96] * LAYERS  # fixed: 25% of every FFN
    heads = _kept(rep, "head")
    removed = 1 - oracle_macs(heads, [96] * LAYERS) / oracle_macs([4] * LAYERS, [128] * LAYERS)
    assert removed >= 0.3 - 1e-9 and sum(heads) < 4 * LAYERS


def test_head_counts_ignore_the_channel_multiple():
    # round_to=8 applies to channels; a head group of 4 heads must still lose heads under --global.
    rep = _run(sparsity=0.5, allocation="global", round_to=8)
    assert sum(_kept(rep, "head")) < 4 * LAYERS
    assert all(n % 8 == 0 for n in _kept(rep, "ffn"))


def test_per_kind_sparsity_out_of_range_is_refused():
    with pytest.raises(UsageError, match="head-sparsity"):
        _run(sparsity=0.3, allocation="global", head_sparsity=1.0)


def test_sensitivity_allocation_meets_the_mac_target_across_kinds():
    # Made-up curves (every group: distortion grows linearly with the fraction removed, heads 10x
    # steeper): the knapsack must still meet the MAC target by the oracle's count, with or without
    # the heads fixed.
    import numpy as np
    import onnx

    from onnx_intrafusion import allocation, coupling, model_io

    graph = model_io.to_graph(onnx.load(str(VIT)))
    analysis = coupling.analyse(graph)
    macs = allocation.node_macs(graph, analysis)
    curves = {}
    for g in analysis.prunable():
        k = np.arange(g.size, 0, -1)
        curves[g.id] = (k, (10.0 if g.kind == "head" else 1.0) * (1 - k / g.size))
    heads = [g.id for g in analysis.groups if g.kind == "head"]
    ffns = [g.id for g in analysis.groups if g.kind == "ffn"]
    before = oracle_macs([4] * LAYERS, [128] * LAYERS)
    for fixed in (None, {gid: 4 for gid in heads}):
        keeps, _, met = allocation.sensitivity_keeps(analysis, curves, 0.3, macs, fixed=fixed)
        assert met
        removed = 1 - oracle_macs([keeps[g] for g in heads], [keeps[g] for g in ffns]) / before
        assert 0.3 - 1e-9 <= removed <= 0.305, removed
        if fixed:
            assert [keeps[g] for g in heads] == [4] * LAYERS


def test_sensitivity_allocation_keeps_a_fixed_kind_end_to_end():
    # --allocation sensitivity --head-sparsity 0: the heads stay, the FFNs take the whole budget.
    import numpy as np

    calib = {"input": np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)}
    rep = _run(sparsity=0.15, allocation="sensitivity", head_sparsity=0.0, calibration=calib, recover="none",
               sensitivity_levels=(0.5,), workers=1, validate=False)
    heads, neurons = _kept(rep, "head"), _kept(rep, "ffn")
    assert heads == [4] * LAYERS and sum(neurons) < 128 * LAYERS
    removed = 1 - oracle_macs(heads, neurons) / oracle_macs([4] * LAYERS, [128] * LAYERS)
    assert 0.15 - 1e-9 <= removed <= 0.155, removed


def test_global_target_out_of_reach_is_said():
    # Heads fixed at 0: the FFNs hold 41.6% of the MACs, at most 90% of them can go (37.4%).
    from onnx_intrafusion.errors import PruneWarning

    with pytest.warns(PruneWarning, match="cannot be removed within max-group-sparsity 0.9 and the kinds"):
        result = prune(str(VIT), target="none", sparsity=0.45, allocation="global", head_sparsity=0.0,
                       validate=False)
    rep = result.report.to_dict()
    assert _kept(rep, "ffn") == [13] * LAYERS  # every FFN at its cap: ceil(0.1 x 128)


def test_terminal_summary_lists_kept_over_total_per_kind():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(str(VIT), target="none", sparsity=0.0, head_sparsity=0.5, ffn_sparsity=0.25,
                       validate=False).report
    line = next(s for s in report.to_text().splitlines() if s.startswith("kinds"))
    assert "head 8/16 heads (4/4 groups pruned)" in line and "ffn 384/512 neurons (4/4 groups pruned)" in line


def test_hidden_size_is_not_allocated_unless_given():
    # With calibration data the residual width is prunable; under --global it keeps its default 0
    # (not ranked), and --hidden-sparsity fixes it while heads and FFN reach the MAC target.
    import numpy as np

    calib = {"input": np.random.default_rng(0).random((40, 1, 28, 28), dtype=np.float32)}
    rep = _run(sparsity=0.3, allocation="global", calibration=calib, recover="none", validate=False)
    assert rep["kinds"]["hidden"]["blocked"] == 0 and rep["kinds"]["hidden"]["after"] == HIDDEN
    rep = _run(sparsity=0.4, allocation="global", hidden_sparsity=0.25, calibration=calib, recover="none",
               validate=False)
    assert rep["kinds"]["hidden"]["after"] == 48
    assert sum(_kept(rep, "head")) < 4 * LAYERS and sum(_kept(rep, "ffn")) < 128 * LAYERS
    assert 0.4 - 1e-9 <= 1 - rep["macs"]["after"] / rep["macs"]["before"] <= 0.41
