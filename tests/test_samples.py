"""Every bundled sample (both torch exporters), both methods, several sparsities."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_intrafusion import prune
from onnx_intrafusion.report import count_macs

from onnx_intrafusion.model_io import params_count

from conftest import (SAMPLE_FILES, SAMPLES, assert_same_outputs, assert_valid, rewrite_all_groups, sample)


#: Every bundled model: the random-weight samples and the trained ones.
ALL_SAMPLES = SAMPLE_FILES + sorted(str(p.relative_to(SAMPLES)) for d in ("fashion", "digits")
                                    for p in (SAMPLES / d).glob("*.onnx"))


@pytest.mark.parametrize("order", ["identity", "reversed"])
@pytest.mark.parametrize("method", ["intrafusion", "prune"])
@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_plan_keeping_every_channel_reproduces_outputs(name, method, order, load):
    """Every prunable group rewritten with all channels kept (in order, or reversed): outputs unchanged."""
    original = load(name)
    rewritten = rewrite_all_groups(original, method, order)
    assert_valid(rewritten, original)
    assert params_count(rewritten) == params_count(original)
    assert_same_outputs(rewritten, original, atol=1e-5, rtol=1e-5 if order == "reversed" else 0.0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("method", ["intrafusion", "prune"])
@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_pruned_sample_is_valid_and_smaller(name, method, sparsity, load):
    original = load(name)
    result = prune(sample(name), sparsity=sparsity, method=method)
    assert_valid(result.model, original)
    rep = result.report
    assert rep.params_after < rep.params_before
    assert 0 < rep.macs_after < rep.macs_before
    assert count_macs(result.model) == rep.macs_after
    assert rep.pruned_groups, "at least one group must be pruned"
    for g in rep.pruned_groups:
        expected = max(1, int(np.floor((1 - sparsity) * g.channels_before + 0.5)))
        assert g.channels_after == expected
    # Only the classifier's output group is left as it is in these CNNs.
    assert [g.status for g in rep.groups if g.status != "pruned"] == ["output"]
    assert rep.validation is not None and rep.validation["outputs"][0]["shape"][-1] == 10


def test_both_exporters_give_the_same_groups():
    for arch in ("vgg", "resnet", "mobilenetv2"):
        legacy = prune(sample(f"{arch}_legacy.onnx"), sparsity=0.5, validate=False).report
        dynamo = prune(sample(f"{arch}_dynamo.onnx"), sparsity=0.5, validate=False).report
        shape = lambda rep: sorted((g.channels_before, g.channels_after, g.status) for g in rep.groups)
        assert shape(legacy) == shape(dynamo), arch
        assert legacy.macs_after == dynamo.macs_after


def test_resnet_residual_stream_is_one_group():
    rep = prune(sample("resnet_legacy.onnx"), sparsity=0.5, validate=False).report
    # stage widths 16/32/64: each residual stream ties the stage's last convs and its shortcut.
    streams = [g for g in rep.groups if len(g.producers) > 1]
    assert sorted(len(g.producers) for g in streams) == [3, 3, 3]
    assert sorted(g.channels_before for g in streams) == [16, 32, 64]


def test_intrafusion_moves_outputs_less_than_pruning_on_average():
    """Not a law for random weights, but it must hold on average over the samples."""
    cos = {"intrafusion": [], "prune": []}
    for name in ("vgg_legacy.onnx", "resnet_legacy.onnx", "mobilenetv2_legacy.onnx", "vgg_unfolded_bn.onnx"):
        for method in cos:
            rep = prune(sample(name), sparsity=0.3, method=method).report
            cos[method].append(rep.validation["outputs"][0]["cosine"])
    assert np.mean(cos["intrafusion"]) > np.mean(cos["prune"])


def test_fresh_exports_from_the_installed_torch(tmp_path):
    """Re-export the samples with the torch installed now (both exporters) and prune them.

    Guards against exporter changes: the committed files were made by one torch version.
    """
    import make_samples

    paths = make_samples.export_all(tmp_path)
    assert any(str(p).endswith("_dynamo.onnx") for p in paths.values())
    for name, path in paths.items():
        original = onnx.load(str(path))
        result = prune(path, sparsity=0.5, method="intrafusion")
        assert_valid(result.model, original)
        assert result.report.macs_after < result.report.macs_before, name
        assert [g.status for g in result.report.groups if g.status != "pruned"] == ["output"], name
