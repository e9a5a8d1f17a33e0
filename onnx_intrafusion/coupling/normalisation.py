"""Rules of normalisations: BatchNorm/InstanceNorm (per-channel parameters) and the ones over channels."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .rules import attr, norm_axis, opset, rule
from .spaces import PARAM, Context


@rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is None:
        return [0]
    params = [t for t in node.inputs[1:] if t.name]
    extra_outputs = [o for o in node.outputs[1:] if o.outputs]
    if ax.axis != 1 or any(ctx.const(t) is None for t in params) or extra_outputs \
            or int(attr(node, "training_mode", 0)):
        ctx.block(ax, node, "normalisation in training mode or with computed parameters")
        return [0]
    for t in params:
        ctx.add_members(ax, PARAM, t, node, axis=0)
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("LayerNormalization", "GroupNormalization", "LpNormalization", "LRN", "Softmax", "LogSoftmax", "Hardmax")
def _normalise(ctx: Context, node: gs.Node):
    """Normalisations over some axes.

    Channels pass untouched when the channel axis is not normalised over
    (each channel's output depends only on itself).  When it is (LayerNorm
    over C in ConvNeXt and transformers, Softmax over channels, GroupNorm,
    LRN), removing a channel changes every other channel's statistics, so the
    group is left unpruned with that reason.
    """
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    if rank is None:
        ctx.block(ax, node, f"{node.op} of unknown rank")
        return [0]
    if node.op == "LayerNormalization":
        start = norm_axis(int(attr(node, "axis", -1)), rank)
        normalised = range(start, rank)
    elif node.op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
        default = -1 if node.op == "LpNormalization" or opset(ctx) >= 13 else 1
        axis = norm_axis(int(attr(node, "axis", default)), rank)
        normalised = [axis] if node.op == "LpNormalization" or opset(ctx) >= 13 else range(axis, rank)
    else:
        normalised = [1]
    if ax.axis in normalised:
        if node.op == "LayerNormalization":
            ctx.mark(ax, "hidden")  # the residual stream of a transformer (or a ConvNeXt stage)
        ctx.block(ax, node, f"{node.op} normalises over the channel axis (pruning would change its statistics)")
        return [0]
    if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
        ctx.block(ax, node, f"{node.op} statistics outputs are used")
        return [0]
    ctx.set_axis(node.outputs[0], ax)
    return [0]
