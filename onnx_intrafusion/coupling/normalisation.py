"""Rules of normalisations: BatchNorm/InstanceNorm (per-channel parameters) and the ones over channels.

LayerNorm over the channel axis (a transformer's residual stream, kind
"hidden"), whether one ``LayerNormalization`` op, ORT's fused
``SkipLayerNormalization`` or the ReduceMean/Sub/Pow/Sqrt/Div arithmetic of
older exports and RMSNorm, lets the channels pass with gamma/beta as
per-channel parameters, and blocks the group softly: its statistics are then
taken over the kept channels, which only calibration data can make up for
(:data:`~.spaces.NEEDS_CALIBRATION`).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .elementwise import join
from .rules import attr, int_operand, norm_axis, opset, rule
from .shape import _reduce
from .spaces import NEEDS_CALIBRATION, PARAM, ChannelAxis, Context


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


def _hidden(ctx: Context, ax: ChannelAxis, node: gs.Node) -> None:
    """``node`` normalises over the channels on ``ax``: the residual width, prunable with calibration data."""
    ctx.mark(ax, "hidden")
    ctx.block(ax, node, NEEDS_CALIBRATION)


def _ranked_input(ctx: Context, node: gs.Node) -> tuple[ChannelAxis, int] | None:
    """(channel axis, rank) of the input; None when it carries no channels or (blocked) has no known rank."""
    ax, rank = ctx.axis_of(node.inputs[0]), ctx.rank(node.inputs[0])
    if ax is not None and rank is None:
        ctx.block(ax, node, f"{node.op} of unknown rank")
    return None if ax is None or rank is None else (ax, rank)


def _stats_used(node: gs.Node, outputs) -> bool:
    return any(i < len(node.outputs) and node.outputs[i].outputs for i in outputs)


@rule("LayerNormalization")
def _layernorm(ctx: Context, node: gs.Node):
    """LayerNorm: over other axes channels pass; over the last axis only (the hidden size) see :func:`_hidden`.

    Normalised over [channel axis, ...more axes] (GroupNorm(1)-style) stays blocked.
    """
    got = _ranked_input(ctx, node)
    if got is None:
        return [0]
    ax, rank = got
    start = norm_axis(int(attr(node, "axis", -1)), rank)
    if _stats_used(node, (1, 2)):
        ctx.block(ax, node, f"{node.op} statistics outputs are used")
        return [0]
    if ax.axis < start:
        ctx.set_axis(node.outputs[0], ax)
        return [0]
    params = [t for t in node.inputs[1:3] if t.name]
    if ax.axis != rank - 1 or start != rank - 1 or ax.outer != 1 or any(ctx.const(t) is None for t in params):
        ctx.mark(ax, "hidden")
        ctx.block(ax, node, f"{node.op} normalises over the channel axis (pruning would change its statistics)")
        return [0]
    handled = _scaled(ctx, node, (0,))
    _hidden(ctx, ax, node)
    return handled


def _scaled(ctx: Context, node: gs.Node, outputs: tuple[int, ...]) -> list[int]:
    """The channels pass to ``outputs``; per-channel gamma/beta/bias become PARAM members.

    That is what an element-wise op does with its channel-carrying inputs
    (united) and its constants along the channels, so :func:`join` does it.
    """
    handled = join(ctx, node)
    ax = ctx.axis_of(node.outputs[0])
    for i in outputs[1:]:
        if i < len(node.outputs):
            ctx.set_axis(node.outputs[i], ax)
    return handled


@rule("SkipLayerNormalization", domain="com.microsoft")
def _skip_layernorm(ctx: Context, node: gs.Node):
    """ORT's fused residual Add + LayerNorm (input, skip, gamma, beta, bias): the sum and the norm of it.

    Outputs: the normalised sum, mean and inverse std (blocked when used), and
    the sum itself (carries the channels like a residual Add).
    """
    for i in (0, 3):  # ONNX shape inference does not know com.microsoft ops: these have the input's shape
        if i < len(node.outputs) and node.outputs[i].shape is None and node.inputs[0].shape is not None:
            node.outputs[i].shape = list(node.inputs[0].shape)
    axes = [ctx.axis_of(t) for t in node.inputs[:2]]
    if all(a is None for a in axes):
        return []
    if _stats_used(node, (1, 2)):
        for a in axes:
            ctx.block(a, node, f"{node.op} statistics outputs are used")
        return [0, 1]
    tracked = [a for a in axes if a is not None]
    rank = next((r for r in (ctx.rank(t) for t in node.inputs[:2]) if r is not None), None)
    if rank is None or any(a.axis != rank - 1 or a.outer != 1 for a in tracked) \
            or any(ctx.const(t) is None for t in node.inputs[2:] if t.name):
        for a in tracked:
            ctx.block(a, node, f"{node.op} over a non-channel axis or with computed parameters")
        return [0, 1]
    handled = _scaled(ctx, node, (0, 3))  # unites input and skip
    _hidden(ctx, tracked[0], node)
    return handled


#: Ops between a ReduceMean over the channels and the op that applies the statistic to the channels.
_STAT_CHAIN = ("Add", "Sqrt", "Reciprocal", "Cast", "Identity")
_STAT_USE = ("Sub", "Div", "Mul")


def _normalises(tensor: gs.Tensor, depth: int = 0) -> bool:
    """The statistic ``tensor`` (mean or mean square over the channels) is only applied back to channels.

    True when every path from it goes through eps-Add/Sqrt/Reciprocal/Cast to
    a Sub, Div or Mul: a decomposed LayerNorm or RMSNorm.
    """
    readers = tensor.outputs
    if not readers or depth > 4:
        return False
    for r in readers:
        if r.op in _STAT_USE:
            continue
        if r.op not in _STAT_CHAIN or not all(_normalises(o, depth + 1) for o in r.outputs):
            return False
    return True


@rule("ReduceMean")
def _reduce_mean(ctx: Context, node: gs.Node):
    """ReduceMean over the last (channel) axis, kept as a size-1 axis, feeding a normalisation.

    The mean of a decomposed LayerNorm (``x - mean(x)``), or the mean square of
    one or of an RMSNorm (``x / sqrt(mean(x^2) + eps)``): after pruning it
    averages over the kept channels, exactly what LayerNormalization of the
    narrower width computes.  Other reductions follow the generic rule.
    """
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is not None and rank is not None and ax.outer == 1 and ax.axis == rank - 1 \
            and int(attr(node, "keepdims", 1)):
        axes = int_operand(ctx, node, "axes", 1, absent=[])
        if axes is not None and [norm_axis(a, rank) for a in axes] == [rank - 1] and _normalises(node.outputs[0]):
            _hidden(ctx, ax, node)
            return [0]  # the statistic itself carries no channels
    return _reduce(ctx, node)


@rule("GroupNormalization", "LpNormalization", "LRN", "Softmax", "LogSoftmax", "Hardmax")
def _normalise(ctx: Context, node: gs.Node):
    """Normalisations over some axes.

    Channels pass untouched when the channel axis is not normalised over
    (each channel's output depends only on itself).  When it is (LayerNorm
    over C in ConvNeXt and transformers, Softmax over channels, GroupNorm,
    LRN), removing a channel changes every other channel's statistics, so the
    group is left unpruned with that reason.
    """
    got = _ranked_input(ctx, node)
    if got is None:
        return [0]
    ax, rank = got
    if node.op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
        default = -1 if node.op == "LpNormalization" or opset(ctx) >= 13 else 1
        axis = norm_axis(int(attr(node, "axis", default)), rank)
        normalised = [axis] if node.op == "LpNormalization" or opset(ctx) >= 13 else range(axis, rank)
    else:
        normalised = [1]
    if ax.axis in normalised:
        ctx.block(ax, node, f"{node.op} normalises over the channel axis (pruning would change its statistics)")
        return [0]
    if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
        ctx.block(ax, node, f"{node.op} statistics outputs are used")
        return [0]
    ctx.set_axis(node.outputs[0], ax)
    return [0]
