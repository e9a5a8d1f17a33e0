"""Rules of the weight ops: Conv (plain, depthwise, grouped), Gemm and MatMul producers/consumers, embeddings."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .attention import batched_matmul
from .rules import attr, norm_axis, rule
from .shape import _gather
from .spaces import CONSUMER, PARAM, PRODUCER, AxisFix, ChannelAxis, Context, Segment


@rule("Conv")
def _conv(ctx: Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    weight = ctx.const(node.inputs[1])
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    y = node.outputs[0]
    if weight is None or (bias is not None and ctx.const(bias) is None):
        ctx.block(ax, node, "Conv weight or bias is computed at run time")
        return [0]
    if ax is not None and ax.axis != 1:
        ctx.block(ax, node, "Conv input channels are not on axis 1")
        return [0]
    group = int(attr(node, "group", 1))
    c_out = weight.shape[0]
    if group == 1:
        if ax is not None:
            ctx.add_members(ax, CONSUMER, node.inputs[1], node, axis=1)
        out = ChannelAxis(1, ctx.new_spaces(c_out, node))
        ctx.add_members(out, PRODUCER, node.inputs[1], node, axis=0)
        if bias is not None:
            ctx.add_members(out, PARAM, bias, node, axis=0)
        ctx.set_axis(y, out)
    elif weight.shape[1] == 1 and c_out % group == 0:
        # Depthwise: output channel c*m+j reads only input channel c, so the
        # output carries the input's channels with m positions each.
        mult = c_out // group
        if ax is None:
            space = ctx.new_space(c_out, node)
            ctx.block_spaces([space], node,
                             "depthwise Conv reads channels that are not pruned (a graph input or after a blocking op)")
            return [0]
        ctx.add_members(ax, PARAM, node.inputs[1], node, axis=0, scale=mult)
        if bias is not None:
            ctx.add_members(ax, PARAM, bias, node, axis=0, scale=mult)
        ctx.fixes.append(AxisFix("group", node.name, x.name))
        ctx.set_axis(y, ChannelAxis(1, tuple(Segment(s.space, s.block * mult) for s in ax.segments)))
    else:
        _grouped_conv(ctx, node, ax, group, weight.shape)
    return [0]


def _grouped_conv(ctx: Context, node: gs.Node, ax: ChannelAxis | None, group: int, wshape) -> None:
    """Grouped Conv (ResNeXt, RegNet): every conv group keeps the same channels.

    Input and output are cut into ``group`` equal parts; corresponding parts
    are united, so all conv groups keep the same number of channels (the same
    positions in each), the ``group`` attribute stays and the weight
    ``[C_out, C_in/group, ...]`` loses rows in every part and columns of axis 1.
    """
    c_out, c_in_g = wshape[0], wshape[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    out_g = c_out // group
    segs = ctx.new_spaces(c_out, node, [j * out_g for j in range(1, group)])
    out = ChannelAxis(1, segs)
    if c_out % group:
        ctx.block(out, node, f"grouped Conv (group={group}) with {c_out} outputs")
    if ax is not None:
        ok = ctx.align(ax, [j * c_in_g for j in range(1, group)])
        if ok is None or ctx.total(ax) != c_in_g * group:
            ctx.block(ax, node, f"grouped Conv (group={group}) input cannot be cut into equal conv groups")
        elif not ok:
            ctx.block(ax, node, "waiting for cuts")
        else:
            parts = [ChannelAxis(1, ctx.slice_segments(ax, j * c_in_g, (j + 1) * c_in_g)) for j in range(group)]
            if ctx.unite_parts(parts, node):
                ctx.add_members(parts[0], CONSUMER, node.inputs[1], node, axis=1)
    out_parts = [ChannelAxis(1, ctx.slice_segments(out, j * out_g, (j + 1) * out_g)) for j in range(group)]
    ctx.unite_parts(out_parts, node)
    ctx.add_members(out, PRODUCER, node.inputs[1], node, axis=0)
    if bias is not None:
        ctx.add_members(out, PARAM, bias, node, axis=0)
    ctx.set_axis(node.outputs[0], out)


def _linear_out(ctx: Context, node: gs.Node, weight: gs.Tensor, out_axis_of_weight: int,
                y: gs.Tensor, y_axis: int, n_out: int, kind: str = "channel") -> ChannelAxis:
    out = ChannelAxis(y_axis, ctx.new_spaces(n_out, node, kind=kind))
    ctx.add_members(out, PRODUCER, weight, node, axis=out_axis_of_weight)
    return out


@rule("Gemm")
def _gemm(ctx: Context, node: gs.Node):
    a, b = node.inputs[0], node.inputs[1]
    ax = ctx.axis_of(a)
    weight = ctx.const(b)
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or ctx.const(a) is not None or int(attr(node, "transA", 0)):
        ctx.block(ax, node, "Gemm without a constant weight B (or with transA) is not supported")
        return [0]
    trans_b = int(attr(node, "transB", 0))
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    if ax is not None:
        if ax.axis != 1 or ax.outer != 1:
            ctx.block(ax, node, "Gemm input channels are not on axis 1")
        else:
            ctx.add_members(ax, CONSUMER, b, node, axis=in_axis)
    n_out = weight.shape[out_axis]
    out = _linear_out(ctx, node, b, out_axis, node.outputs[0], 1, n_out)
    if c is not None:
        cval = ctx.const(c)
        if cval is None:
            ctx.block(out, node, "Gemm bias C is computed at run time")
        elif cval.ndim >= 1 and cval.shape[-1] == n_out and n_out > 1:
            if cval.ndim == 2 and cval.shape[0] != 1:
                ctx.block(out, node, "Gemm bias C is a full matrix")
            else:
                ctx.add_members(out, PARAM, c, node, axis=cval.ndim - 1)
    ctx.set_axis(node.outputs[0], out)
    return [0]


@rule("MatMul")
def _matmul(ctx: Context, node: gs.Node):
    a, b = node.inputs
    ax = ctx.axis_of(a)
    weight = ctx.const(b)
    rank = ctx.rank(a)
    if weight is None and ctx.const(a) is None:
        return batched_matmul(ctx, node)
    if weight is None or weight.ndim != 2 or ctx.const(a) is not None or rank is None:
        ctx.block(ax, node, "MatMul without a constant 2-D right operand is not supported")
        ctx.block(ctx.axis_of(b), node, "MatMul between two computed tensors mixes channels")
        return [0, 1]
    if ax is not None:
        if ax.axis != rank - 1 or ax.outer != 1:
            ctx.block(ax, node, "MatMul reads channels on a non-contracted axis")
        else:
            ctx.add_members(ax, CONSUMER, b, node, axis=0)
    y_rank = ctx.rank(node.outputs[0]) or max(rank, 2)
    # Neurons of a linear layer applied to every token ([batch, tokens, features]): transformer FFNs.
    kind = "ffn" if rank >= 3 else "channel"
    out = _linear_out(ctx, node, b, 1, node.outputs[0], y_rank - 1, weight.shape[1], kind)
    ctx.set_axis(node.outputs[0], out)
    return [0]


@rule("Gather")
def _gather_rule(ctx: Context, node: gs.Node):
    """An embedding lookup (a constant ``[vocab, width]`` table indexed by computed ids) produces channels.

    Word, position and token-type embeddings of a text transformer: the
    table's columns are the output channels (last axis of the output), like a
    Linear layer's output rows.  Every other Gather is a shape op (:func:`.shape._gather`).
    """
    data, idx = node.inputs[0], node.inputs[1]
    table = ctx.const(data)
    if table is None or table.ndim != 2 or ctx.const(idx) is not None \
            or norm_axis(int(attr(node, "axis", 0)), 2) != 0 or ctx.rank(idx) is None:
        return _gather(ctx, node)
    y_rank = ctx.rank(idx) + 1
    ctx.set_axis(node.outputs[0], _linear_out(ctx, node, data, 1, node.outputs[0], y_rank - 1, table.shape[1]))
    return [0]
