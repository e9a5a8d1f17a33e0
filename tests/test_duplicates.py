"""The math the public reference cannot pass: merging exact duplicates is lossless.

Every prunable channel of this model has an exact twin (same producer filter,
same bias); consumers split their weight between the twins 9:1 so the heavier
copy is clearly the more important one (3:1 is not enough with group-mean
normalised l1: the spread of scores across pairs exceeds the gap).  Pruning 50% with Intra-Fusion must
fold each light copy into its twin (average of equal producers, sum of the
consumer weights) and reproduce the outputs; plain pruning loses the light
copy's 10% share.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from onnx_intrafusion import prune

from conftest import assert_valid, feeds_for, run


def _duplicate_rows(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w, w], dim=0)


def _split_inputs(w: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Consumer weight for duplicated inputs: 90% to the first copy, 10% to the second."""
    cols = w.shape[1] // block
    w = w.reshape(w.shape[0], cols, block, *w.shape[2:])
    out = torch.cat([0.9 * w, 0.1 * w], dim=1)
    return out.reshape(w.shape[0], 2 * cols * block, *w.shape[3:])


class DuplicatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(y) + y)  # residual: conv2 and conv3 outputs are one group
        x = torch.flatten(self.pool(x), 1)  # Flatten: each channel owns 4 columns of fc1
        return self.fc2(torch.relu(self.fc1(x)))


def build_duplicated() -> nn.Module:
    torch.manual_seed(0)
    base = DuplicatedNet().eval()
    small = {  # the unique halves
        "conv1": nn.Conv2d(3, 8, 3, padding=1), "conv2": nn.Conv2d(8, 8, 3, padding=1),
        "conv3": nn.Conv2d(8, 8, 3, padding=1), "fc1": nn.Linear(8 * 4, 16),
    }
    with torch.no_grad():
        base.conv1.weight.copy_(_duplicate_rows(small["conv1"].weight))
        base.conv1.bias.copy_(_duplicate_rows(small["conv1"].bias))
        for name in ("conv2", "conv3"):
            layer = getattr(base, name)
            layer.weight.copy_(_duplicate_rows(_split_inputs(small[name].weight)))
            layer.bias.copy_(_duplicate_rows(small[name].bias))
        base.fc1.weight.copy_(_duplicate_rows(_split_inputs(small["fc1"].weight, block=4)))
        base.fc1.bias.copy_(_duplicate_rows(small["fc1"].bias))
        base.fc2.weight.copy_(_split_inputs(base.fc2.weight[:, :16]))
    return base


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def duplicated_onnx(request, tmp_path_factory):
    model = build_duplicated()
    path = tmp_path_factory.mktemp("dup") / f"dup_{request.param}.onnx"
    x = torch.randn(1, 3, 8, 8)
    kwargs = dict(input_names=["input"], output_names=["logits"])
    if request.param == "legacy":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, **kwargs)
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, **kwargs)
    import onnx

    return path, onnx.load(str(path))


def test_intrafusion_is_exact_on_duplicates_and_pruning_is_not(duplicated_onnx):
    path, original = duplicated_onnx
    feeds = feeds_for(original, seed=1)
    ref = run(original, feeds)["logits"]
    fused = prune(path, sparsity=0.5, method="intrafusion")
    pruned = prune(path, sparsity=0.5, method="prune")
    for result in (fused, pruned):
        assert_valid(result.model, original)
        # all three groups (conv1, conv2+conv3 residual stream, fc1) go from 16/32 to half
        assert sorted((g.channels_before, g.channels_after) for g in result.report.pruned_groups) == [
            (16, 8), (16, 8), (32, 16)]
    np.testing.assert_allclose(run(fused.model, feeds)["logits"], ref, atol=1e-4, rtol=0)
    assert np.abs(run(pruned.model, feeds)["logits"] - ref).max() > 1e-2
