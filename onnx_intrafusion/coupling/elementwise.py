"""Rules of element-wise ops: activations, binary ops that join channels, per-channel constants."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .dims import dims
from .spaces import PARAM, ChannelAxis, Context
from .rules import rule


UNARY = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Gelu Elu Selu Celu Softplus Softsign Mish "
    "Erf Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Sin Cos ThresholdedRelu Identity "
    "Cast Swish Relu6 IsNaN IsInf Not"
).split()


@rule(*UNARY)
def _unary(ctx: Context, node: gs.Node):
    ctx.set_axis(node.outputs[0], ctx.axis_of(node.inputs[0]))
    return [0]


@rule("Dropout")
def _dropout(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        ctx.block(ax, node, "Dropout mask output is used")
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("Clip")
def _clip(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    for bound in node.inputs[1:]:
        if bound.name and (ctx.const(bound) is None or ctx.const(bound).size != 1):
            ctx.block(ax, node, "Clip bounds are not scalar constants")
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("PRelu")
def _prelu(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is not None:
        _elementwise_constant(ctx, node, ax, node.inputs[1], ctx.rank(node.inputs[0]))
    ctx.set_axis(node.outputs[0], ax)
    return [0]


def _elementwise_constant(ctx: Context, node: gs.Node, ax: ChannelAxis, tensor: gs.Tensor,
                          out_rank: int | None) -> None:
    """Handle a non-channel-carrying operand of an element-wise op.

    Broadcast along the channel axis (size 1) needs no edit; a constant with a
    value per channel becomes a PARAM member; anything else blocks.
    """
    shape = ctx.shape(tensor)
    if shape is None or out_rank is None:
        ctx.block(ax, node, "element-wise operand of unknown shape")
        return
    pos = ax.axis - (out_rank - len(shape))
    if pos < 0 or shape[pos] == 1:
        return
    if not isinstance(shape[pos], int) and _derived_one(ctx, tensor, pos):
        return  # e.g. an attention mask Expand-ed to [batch, 1, q, k] by a target computed at run time
    if ctx.const(tensor) is not None and shape[pos] == ctx.total(ax) and ax.outer == 1:
        ctx.add_members(ax, PARAM, tensor, node, axis=pos)
        return
    if _expanded_constant(ctx, node, ax, tensor, len(shape), pos):
        return
    ctx.block(ax, node, f"element-wise operand '{tensor.name}' has its own values along the channel axis")


def _derived_one(ctx: Context, tensor: gs.Tensor, pos: int) -> bool:
    """Dim ``pos`` of ``tensor``, unknown to shape inference, is 1 as derived from its producers."""
    d = dims(ctx, tensor)
    return d is not None and d[pos] == 1


def _expanded_constant(ctx: Context, node: gs.Node, ax: ChannelAxis, tensor: gs.Tensor, rank: int, pos: int) -> bool:
    """``tensor`` is a constant broadcast by Expand to a shape computed at run time (a class token expanded
    to the batch): the constant is sliced per channel, and the Expand must leave the channel axis alone."""
    from .shape import expand_keeps_axis  # shape imports attention, which imports this module

    expand = tensor.inputs[0] if tensor.inputs else None
    data = expand.inputs[0] if expand is not None and expand.op == "Expand" else None
    values = None if data is None else ctx.const(data)
    if values is None or ax.outer != 1:
        return False
    dpos = pos - (rank - values.ndim)
    per_channel = dpos >= 0 and values.shape[dpos] != 1
    if per_channel and values.shape[dpos] != ctx.total(ax):
        return False
    if not expand_keeps_axis(ctx, expand, pos, rank, ax, node.outputs[0]):
        return False
    if per_channel:
        ctx.add_members(ax, PARAM, data, expand, axis=dpos)
    return True


@rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where")
def join(ctx: Context, node: gs.Node):
    out_rank = ctx.rank(node.outputs[0])
    ranks = [ctx.rank(t) for t in node.inputs]
    if out_rank is None and all(r is not None for r in ranks):
        out_rank = max(ranks)
    tracked = [(i, ctx.axis_of(t)) for i, t in enumerate(node.inputs) if ctx.axis_of(t) is not None]
    if not tracked:
        return []
    if out_rank is None or any(ranks[i] is None for i, _ in tracked):
        for _, ax in tracked:
            ctx.block(ax, node, "element-wise op on tensors of unknown rank")
        return [i for i, _ in tracked]
    first_i, first = tracked[0]
    out_axis = first.axis + out_rank - ranks[first_i]
    if any(ax.axis + out_rank - ranks[i] != out_axis or ax.outer != first.outer for i, ax in tracked[1:]):
        for _, other in tracked:
            ctx.block(other, node, "element-wise op joins channels on different axes")
        return [i for i, _ in tracked]
    # Tensors cut differently (e.g. a Concat joined with one producer's
    # output) are cut at every boundary of each other, then united piecewise.
    cuts = sorted({b for _, ax in tracked for b in ctx.boundaries(ax)})
    aligned = [ctx.align(ax, cuts) for _, ax in tracked]
    if None in aligned or len({ctx.total(ax) for _, ax in tracked}) > 1:
        for _, other in tracked:
            ctx.block(other, node, "element-wise op joins channels that do not line up")
        return [i for i, _ in tracked]
    if not all(aligned):
        for _, other in tracked:
            ctx.block(other, node, "waiting for cuts")
        return [i for i, _ in tracked]
    bounds = [0, *cuts, ctx.total(first)]
    pieces = [[ctx.slice_segments(ax, a, b) for a, b in zip(bounds, bounds[1:])] for _, ax in tracked]
    for other in pieces[1:]:
        for pa, pb in zip(other, pieces[0]):
            (sa,), (sb,) = pa, pb
            if (sa.space is None) != (sb.space is None) or sa.block != sb.block:
                for _, ax in tracked:
                    ctx.block(ax, node, "element-wise op joins channels that do not line up")
                return [i for i, _ in tracked]
    for other in pieces[1:]:
        for (sa,), (sb,) in zip(other, pieces[0]):
            if sa.space is not None:
                ctx.union(sa.space, sb.space, node)
    out = ChannelAxis(out_axis, tuple(seg for (seg,) in pieces[0]), first.outer)
    for i, t in enumerate(node.inputs):
        if all(i != j for j, _ in tracked):
            _elementwise_constant(ctx, node, out, t, out_rank)
    ctx.set_axis(node.outputs[0], out)
    return [i for i, _ in tracked]
