"""Full-size benchmark CNNs (random weights), exported once and cached.

torchvision is not a dependency, so the two architectures are defined here:

* ``resnet50``: bottleneck blocks 3-4-6-3, widths 64..2048, ~25.6M params,
  ~4.1 GMACs at 224x224 (the torchvision ResNet-50 layout);
* ``mobilenetv2``: inverted residuals, width 1.0, ~3.5M params, ~0.3 GMACs;
* ``vit``: ViT-S/16 (12 blocks, width 384, 6 heads, MLP 1536), ~22M params,
  ~4.6 GMACs.

BatchNorm gets non-trivial statistics and the model is exported in eval mode
with the legacy (TorchScript) exporter, opset 17, 224x224 input and a dynamic
batch dimension, so BN is folded into the convs as users get it.

    python benchmarks/models.py            # exports into results/models/

torchvision architectures (``TORCHVISION``, e.g. ``vit_b_16``) are exported the
same way with random weights (no download) by a Python that has torchvision;
torchvision is never installed into the project's environment, so export them
once from the separate venv that benchmarks/coverage.py describes:

    /work/tv-venv/bin/python benchmarks/models.py vit_b_16
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "results" / "models"
MODELS = ("resnet50", "mobilenetv2", "vit")
#: torchvision models (random weights), exported only where torchvision is importable: name ->
#: (architecture, fixed batch or None for a dynamic batch axis).  torchvision's ViT exported by the
#: legacy exporter with a dynamic batch computes its attention reshape targets from the batch size at
#: run time, which keeps its heads unprunable; the fixed-batch export (batch 8) has constant targets.
TORCHVISION_MODELS = {"vit_b_16": ("vit_b_16", 8), "vit_b_16_dynbatch": ("vit_b_16", None)}
TORCHVISION = tuple(TORCHVISION_MODELS)


def _torch():
    import torch
    import torch.nn as nn

    return torch, nn


def build(name: str, seed: int = 0):
    torch, nn = _torch()
    torch.manual_seed(seed)

    def conv_bn(cin, cout, k=1, stride=1, groups=1, act=True, act_fn=nn.ReLU):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(act_fn(inplace=True))
        return layers

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(*conv_bn(cin, width, 1), *conv_bn(width, width, 3, stride),
                                      *conv_bn(width, cout, 1, act=False))
            self.short = (nn.Sequential(*conv_bn(cin, cout, 1, stride, act=False))
                          if stride != 1 or cin != cout else nn.Identity())
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.body(x) + self.short(x))

    class ResNet50(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            layers = [*conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
            cin = 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(blocks):
                    layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = width * 4
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [] if expand == 1 else conv_bn(cin, hidden, 1, act_fn=nn.ReLU6)
            layers += conv_bn(hidden, hidden, 3, stride, groups=hidden, act_fn=nn.ReLU6)
            layers += conv_bn(hidden, cout, 1, act=False)
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    class MobileNetV2(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            layers = conv_bn(3, 32, 3, 2, act_fn=nn.ReLU6)
            cin = 32
            for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)):
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers += conv_bn(cin, 1280, 1, act_fn=nn.ReLU6)
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(1280, classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self, dim, heads, hidden):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        """ViT-S/16: 12 blocks, width 384, 6 heads, MLP 1536 (22 M params, 4.6 GMACs at 224x224)."""

        def __init__(self, dim=384, depth=12, heads=6, hidden=1536, classes=1000):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 16, 16)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, 197, dim) * 0.02)
            self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
            return self.head(self.norm(self.blocks(x))[:, 0])

    model = {"resnet50": ResNet50, "mobilenetv2": MobileNetV2, "vit": ViT}[name]()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _torchvision_model(name: str):
    try:
        import torchvision
    except ImportError:
        sys.exit(f"{name} is not exported yet ({CACHE / (name + '.onnx')}) and torchvision is not importable here; "
                 f"export it once with a Python that has torchvision:\n"
                 f"  /work/tv-venv/bin/python benchmarks/models.py {name}")
    torch, _ = _torch()
    torch.manual_seed(0)
    return torchvision.models.get_model(TORCHVISION_MODELS[name][0], weights=None).eval()


def export(name: str, out: Path | None = None) -> Path:
    """Path of the exported model, exporting it on first use."""
    out = out or CACHE / f"{name}.onnx"
    if out.exists():
        return out
    torch, _ = _torch()
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _torchvision_model(name) if name in TORCHVISION else build(name)
    batch = TORCHVISION_MODELS[name][1] if name in TORCHVISION else None
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if batch is None else None
    tmp = out.with_suffix(".tmp.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(batch or 1, 3, 224, 224), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes=dynamic)
    tmp.replace(out)
    return out


def all_models() -> dict[str, Path]:
    return {name: export(name) for name in MODELS}


if __name__ == "__main__":
    names = sys.argv[1:] or MODELS
    for name in names:
        if name not in MODELS + TORCHVISION:
            sys.exit(f"unknown model {name!r} (choose from {', '.join(MODELS + TORCHVISION)})")
    for name in names:
        path = export(name)
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stdout)
