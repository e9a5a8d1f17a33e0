"""Rules that join or take apart the channel axis: Concat, Split, Slice."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .elementwise import join
from .rules import attr, int_operand, norm_axis, rule, slice_params
from .shape import shape_read
from .spaces import AxisFix, ChannelAxis, Context, Segment


@rule("Concat")
def _concat(ctx: Context, node: gs.Node):
    rank = ctx.rank(node.outputs[0])
    tracked = [(i, ctx.axis_of(t)) for i, t in enumerate(node.inputs) if ctx.axis_of(t) is not None]
    if not tracked:
        return []
    if rank is None:
        for _, ax in tracked:
            ctx.block(ax, node, "Concat of unknown rank")
        return [i for i, _ in tracked]
    cat = norm_axis(int(attr(node, "axis")), rank)
    if any(ax.axis != cat for _, ax in tracked):
        # Concatenation along another axis joins channels like an element-wise op.
        return join(ctx, node)
    segs: list[Segment] = []
    for t in node.inputs:
        ax = ctx.axis_of(t)
        if ax is not None:
            segs.extend(ax.segments)
        else:
            shape = ctx.shape(t)
            if shape is None or not isinstance(shape[cat], int):
                for _, other in tracked:
                    ctx.block(other, node, "Concat operand of unknown size")
                return [i for i, _ in tracked]
            segs.append(Segment(None, shape[cat]))
    ctx.set_axis(node.outputs[0], ChannelAxis(cat, tuple(segs)))
    return [i for i, _ in tracked]


@rule("Split")
def _split(ctx: Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    rank = ctx.rank(x)
    if ax is None:
        return [0]
    if rank is None:
        ctx.block(ax, node, "Split of unknown rank")
        return [0]
    axis = norm_axis(int(attr(node, "axis", 0)), rank)
    if axis != ax.axis:
        for y in node.outputs:
            ctx.set_axis(y, ax)
        return [0]
    total = ctx.total(ax)
    n = len(node.outputs)
    chunk = -(-total // n)  # no sizes given (opset 18 num_outputs): equal parts, the last may be smaller
    sizes = int_operand(ctx, node, "split", 1, absent=[chunk] * (n - 1) + [total - chunk * (n - 1)])
    if sizes is None or sum(sizes) != total or len(sizes) != len(node.outputs):
        ctx.block(ax, node, "Split sizes along the channel axis are not known")
        return [0]
    bounds = [int(v) for v in np.cumsum([0, *sizes])]
    if not ctx.aligned(ax, bounds[1:-1], node):
        return [0]
    parts = tuple(ctx.slice_segments(ax, a, b) for a, b in zip(bounds, bounds[1:]))
    ctx.fixes.append(AxisFix("split", node.name, x.name, parts=parts))
    for y, segs in zip(node.outputs, parts):
        ctx.set_axis(y, ChannelAxis(ax.axis, segs))
    return [0]


@rule("Slice")
def _slice(ctx: Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    rank = ctx.rank(x)
    params = slice_params(ctx, node)
    if x.name in ctx.shape_vec:
        n = (ctx.shape(x) or [None])[0]
        picked = None
        if params is not None and isinstance(n, int) and len(params[0]) == 1:
            picked = list(range(n))[slice(params[0][0], params[1][0], params[3][0])]
        shape_read(ctx, node, picked)
        return [0]
    if ax is None:
        return [0]
    if params is None or rank is None:
        ctx.block(ax, node, "Slice parameters are computed at run time")
        return [0]
    starts, ends, axes, steps = params
    axes = [norm_axis(a, rank) for a in axes]
    if ax.axis not in axes:
        ctx.set_axis(node.outputs[0], ax)
        return [0]
    i = axes.index(ax.axis)
    total = ctx.total(ax)
    if steps[i] != 1:
        ctx.block(ax, node, "Slice with a step along the channel axis")
        return [0]
    start = min(max(starts[i] + total if starts[i] < 0 else starts[i], 0), total)
    end = min(max(ends[i] + total if ends[i] < 0 else ends[i], 0), total)
    if end <= start:
        ctx.block(ax, node, "empty Slice along the channel axis")
        return [0]
    if not ctx.aligned(ax, [p for p in (start, end) if 0 < p < total], node):
        return [0]
    kept = ctx.slice_segments(ax, start, end)
    ctx.fixes.append(AxisFix("slice", node.name, x.name, i, parts=(ctx.slice_segments(ax, 0, start), kept)))
    ctx.set_axis(node.outputs[0], ChannelAxis(ax.axis, kept))
    return [0]
