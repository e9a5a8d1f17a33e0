"""Architecture patterns from real models, each as a tiny torch model exported by both exporters.

Every test checks: the pruned model is valid (checker, shape inference,
onnxruntime, same I/O), sparsity 0 reproduces the outputs, and the group the
pattern is about is really pruned (or blocked with the expected reason).
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from onnx_intrafusion import coupling, prune

from conftest import assert_plans_keeping_every_channel_are_exact, assert_valid

EXPORTERS = ["legacy", "dynamo"]


def export(model: nn.Module, tmp_path, exporter: str, shape=(1, 3, 16, 16), dynamic_batch=False) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(2 if dynamic_batch else shape[0], *shape[1:])
    path = tmp_path / f"m_{exporter}.onnx"
    kwargs = dict(input_names=["input"], output_names=["out"])
    if exporter == "legacy":
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "out": {0: "batch"}}
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, **kwargs)
    else:
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=2, max=64)},)
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, **kwargs)
    return onnx.load(str(path))


def check(model: onnx.ModelProto, sparsity: float = 0.5, method: str = "intrafusion"):
    """A plan keeping every channel is exact, pruning at ``sparsity`` is valid; returns the latter's result."""
    assert_plans_keeping_every_channel_are_exact(model, (method,), seed=2)
    result = prune(model, sparsity=sparsity, method=method, validate=False)
    assert_valid(result.model, model)
    rep = result.report
    assert rep.macs_after < rep.macs_before
    return result


def pruned_sizes(rep) -> list[tuple[int, int]]:
    return sorted((g.channels_before, g.channels_after) for g in rep.pruned_groups)


def reasons(rep) -> set[str]:
    return {b["reason"] for g in rep.blocked_groups for b in g.blocked}


def statuses(rep) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in rep.groups:
        out[g.status] = out.get(g.status, 0) + 1
    return out


class Head(nn.Module):
    def __init__(self, c: int, n: int = 5):
        super().__init__()
        self.fc = nn.Linear(c, n)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------- grouped conv
class ResNeXtBlock(nn.Module):
    def __init__(self, groups: int = 4, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.conv1 = nn.Conv2d(12, width, 1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(width, 12, 1)
        self.head = Head(12)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.conv3(y) + x))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_grouped_conv_keeps_equal_channels_per_conv_group(tmp_path, exporter):
    result = check(export(ResNeXtBlock(), tmp_path, exporter))
    # conv1's 16 channels become 4 conv groups of 4 (one group of size 4), same for conv2's output
    assert pruned_sizes(result.report) == [(4, 2), (4, 2), (12, 6)]
    conv2 = [n for n in result.model.graph.node if n.op_type == "Conv"
             and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(conv2) == 1 and [a.i for a in conv2[0].attribute if a.name == "group"] == [4]


class GroupedFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = Head(8)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)))


def test_grouped_conv_on_graph_input_prunes_its_output(tmp_path):
    result = check(export(GroupedFromInput(), tmp_path, "legacy", shape=(1, 4, 8, 8)))
    assert pruned_sizes(result.report) == [(4, 2)]


# --------------------------------------------------------------------- split / slice
class ChunkNet(nn.Module):
    """ShuffleNetV2-like: half the channels pass, half go through a branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 12, 1)
        self.head = Head(12)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], dim=1)
        return self.head(F.relu(self.mix(x)))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_chunk_cuts_the_producer_into_two_groups(tmp_path, exporter):
    result = check(export(ChunkNet(), tmp_path, exporter))
    assert pruned_sizes(result.report) == [(8, 4), (8, 4), (8, 4), (12, 6)]


class UnevenSplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(12, 6, 1)
        self.head = Head(6)

    def forward(self, x):
        x = F.relu(self.stem(x))
        p, q, r = torch.split(x, [8, 12, 4], dim=1)
        return self.head(self.a(p) + self.b(q) * r.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_uneven_split(tmp_path, exporter):
    result = check(export(UnevenSplitNet(), tmp_path, exporter))
    # the third part is reduced over channels (blocked); the other two are pruned
    assert pruned_sizes(result.report) == [(6, 3), (8, 4), (12, 6)]
    assert "reduces over the channel axis" in reasons(result.report)


class SliceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(4, 6, 1)
        self.head = Head(6)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head(self.a(x[:, 4:12]) + self.b(x[:, -4:]))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_slice_along_channels(tmp_path, exporter):
    result = check(export(SliceNet(), tmp_path, exporter))
    # stem is cut at 4 and 12: [0:4] is read by nobody (no consumer, still pruned), [4:12], [12:16]
    assert pruned_sizes(result.report) == [(4, 2), (4, 2), (6, 3), (8, 4)]


# --------------------------------------------------------------------- concat
class DenseNet(nn.Module):
    def __init__(self, growth: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, growth, 3, padding=1))
        self.l2 = nn.Sequential(nn.BatchNorm2d(8 + growth), nn.ReLU(), nn.Conv2d(8 + growth, growth, 3, padding=1))
        self.trans = nn.Conv2d(8 + 2 * growth, 10, 1)
        self.head = Head(10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], -3)  # negative axis
        return self.head(F.avg_pool2d(self.trans(x), 2))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dense_concat(tmp_path, exporter):
    model = DenseNet()
    with torch.no_grad():
        for bn in (model.l1[0], model.l2[0]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    result = check(export(model, tmp_path, exporter))
    assert pruned_sizes(result.report) == [(6, 3), (6, 3), (8, 4), (10, 5)]


class Fire(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.e1 = nn.Conv2d(4, 6, 1)
        self.e3 = nn.Conv2d(4, 6, 3, padding=1)
        self.e5 = nn.Conv2d(4, 2, 3, padding=1)
        self.final = nn.Conv2d(14, 5, 1)

    def forward(self, x):
        s = F.relu(self.squeeze(F.relu(self.stem(x))))
        x = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s)), F.relu(self.e5(s))], 1)
        return torch.flatten(F.adaptive_avg_pool2d(self.final(x), 1), 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fire_concat_of_three(tmp_path, exporter):
    result = check(export(Fire(), tmp_path, exporter))
    assert pruned_sizes(result.report) == [(2, 1), (4, 2), (6, 3), (6, 3), (8, 4)]


# --------------------------------------------------------------------- squeeze-and-excitation
class SE(nn.Module):
    def __init__(self, c: int, hidden: int, hard: bool):
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class SENet(nn.Module):
    def __init__(self, hard: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se = SE(16, 8, hard)
        self.proj = nn.Conv2d(16, 12, 1)
        self.head = Head(12)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        x = self.se(F.silu(self.dw(x)))
        return self.head(self.proj(x))


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_squeeze_excitation(tmp_path, exporter, hard):
    result = check(export(SENet(hard), tmp_path, exporter))
    # the gated map (stem + depthwise + SE fc2, 16) and the SE hidden width (8) are both pruned
    rows = {(g.channels_before, g.channels_after): g for g in result.report.pruned_groups}
    assert sorted(rows) == [(8, 4), (12, 6), (16, 8)]
    assert len(rows[(16, 8)].producers) == 2  # stem and the SE expansion conv


# --------------------------------------------------------------------- channel shuffle
class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return torch.flatten(F.adaptive_avg_pool2d(self.out(x), 1), 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_channel_shuffle(tmp_path, exporter):
    result = check(export(ShuffleNet(), tmp_path, exporter))
    # The shuffle interleaves the two halves: they stay as they are, with a reason.
    assert pruned_sizes(result.report) == [(8, 4)]
    assert reasons(result.report) == {coupling.SPLIT_REASON}


# --------------------------------------------------------------------- dynamic batch, pad, resize
class FlattenView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 4)
        x = x.view(x.size(0), -1)  # Shape -> Gather -> Concat -> Reshape with a dynamic batch
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_batch_view_reads_only_the_batch_dim(tmp_path, exporter):
    model = export(FlattenView(), tmp_path, exporter, dynamic_batch=True)
    assert any(n.op_type == "Shape" for n in model.graph.node) or exporter == "dynamo"
    result = check(model)
    assert pruned_sizes(result.report) == [(8, 4), (16, 8)]


class PadResize(nn.Module):
    def __init__(self, sizes: bool):
        super().__init__()
        self.sizes = sizes
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.head = Head(6)

    def forward(self, x):
        x = F.pad(F.relu(self.conv1(x)), (1, 2, 1, 0), mode="reflect")
        x = F.interpolate(x, size=(20, 20)) if self.sizes else F.interpolate(x, scale_factor=2.0, mode="bilinear")
        return self.head(self.conv2(x))


@pytest.mark.parametrize("sizes", [False, True])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_pad_and_resize(tmp_path, exporter, sizes):
    result = check(export(PadResize(sizes), tmp_path, exporter))
    assert pruned_sizes(result.report) == [(6, 3), (8, 4)]


# --------------------------------------------------------------------- ConvNeXt / transformers
class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)  # NHWC
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_convnext_block_mlp_pruned_layernorm_stream_kept(tmp_path, exporter):
    result = check(export(ConvNeXtBlock(), tmp_path, exporter))
    assert pruned_sizes(result.report) == [(32, 16)]
    assert coupling.NEEDS_CALIBRATION in reasons(result.report)  # the LayerNorm'd stream: only with data


class Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4, tokens: int = 6):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, 5)

    def forward(self, x):
        b, n, _ = x.shape
        x = self.embed(x)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.out(x[:, 0])  # class token: Gather on the token axis


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_transformer_mlp_hidden_is_pruned(tmp_path, exporter):
    result = check(export(Attention(), tmp_path, exporter, shape=(1, 6, 8)))
    assert (32, 16) in pruned_sizes(result.report)
    # attention heads (fused QKV, [B, N, 3, heads, head_dim]) are pruned as whole heads;
    # the residual stream passes a LayerNorm and is kept
    assert (4, 2) in pruned_sizes(result.report)
    assert coupling.SPLIT_REASON not in reasons(result.report)
