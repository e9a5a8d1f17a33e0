"""Rules of ops that move or reduce the axes around the channels.

Pooling and reductions, Reshape/Flatten (channels become blocks of positions),
Transpose, Squeeze/Unsqueeze, Pad, Resize, and reads of the channel count
through Shape/Gather (which block: the count would change at run time).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .attention import request_heads, takes_stack_apart
from .rules import attr, int_operand, norm_axis, rule, slice_params, static
from .spaces import AxisFix, ChannelAxis, Context, Segment


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is not None and ax.axis != 1:
        ctx.block(ax, node, "pooling input channels are not on axis 1")
        return [0]
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        ctx.block(ax, node, "MaxPool indices output is used (indices encode channel offsets)")
        return [0]
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
      "ReduceProd", "ReduceSumSquare")
def _reduce(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    axes = int_operand(ctx, node, "axes", 1, absent=[])
    if axes is None or rank is None:
        ctx.block(ax, node, "reduction axes are not known")
        return [0]
    axes = [norm_axis(a, rank) for a in axes]
    if not axes and not int(attr(node, "noop_with_empty_axes", 0)):
        axes = list(range(rank))
    if ax.axis in axes:
        ctx.block(ax, node, "reduces over the channel axis")
        return [0]
    keep = int(attr(node, "keepdims", 1))
    new_axis = ax.axis if keep else ax.axis - sum(1 for a in axes if a < ax.axis)
    ctx.set_axis(node.outputs[0], ChannelAxis(new_axis, ax.segments))
    return [0]


def _tail_block(ax: ChannelAxis, tail: int, new_tail: int) -> tuple[Segment, ...] | None:
    """Segments after moving ``tail``/``new_tail`` inner positions into the axis."""
    segs = []
    for s in ax.segments:
        if (s.block * tail) % new_tail:
            return None
        segs.append(Segment(s.space, s.block * tail // new_tail))
    return tuple(segs)


@rule("Flatten")
def _flatten(ctx: Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    shape = ctx.shape(x)
    if ax is None:
        return [0]
    if shape is None:
        ctx.block(ax, node, "Flatten input shape is unknown")
        return [0]
    split = norm_axis(int(attr(node, "axis", 1)), len(shape))
    inner = shape[ax.axis + 1:]
    between = shape[split:ax.axis]
    if ax.axis < split or not static(inner) or not static(between) or any(d != 1 for d in between):
        ctx.block(ax, node, "Flatten does not keep channels in contiguous blocks")
        return [0]
    segs = _tail_block(ax, int(np.prod(inner)) if inner else 1, 1)
    ctx.set_axis(node.outputs[0], ChannelAxis(1, segs))
    return [0]


def _same_leading(a: list, b: list) -> bool:
    if a == b:
        return True
    return static(a) and static(b) and int(np.prod(a)) == int(np.prod(b))


def _outer(lead_in: list, lead_out: list, outer: int) -> int | None:
    """Repeats of the channels on the output axis whose leading dims are ``lead_out``.

    The same as ``outer`` when the leading dims hold the same elements;
    more when a Reshape folds leading dims into the channel axis (``[B, h, S,
    d] -> [B*h, S, d]``), fewer when it unfolds them again.  None when the
    leading dims do not line up.
    """
    if _same_leading(lead_in, lead_out):
        return outer
    if not (static(lead_in) and static(lead_out)):
        return None
    size_in, size_out = int(np.prod(lead_in)) * outer, int(np.prod(lead_out))
    return size_in // size_out if size_out and size_in % size_out == 0 else None


@rule("Reshape")
def _reshape(ctx: Context, node: gs.Node):
    x, target = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    ax = ctx.axis_of(x)
    if ax is None:
        return [0]
    ishape, oshape = ctx.shape(x), ctx.shape(y)
    tval = ctx.const(target)
    computed = tval is None
    # x.view(x.size(0), -1) with a dynamic batch: the target is built from
    # Shape reads of non-channel dims and constants; the inferred output
    # shape may then have unknown dims that the target itself tells.
    entries = _shape_entries(ctx, target, 0, node, 1)
    resolved = None if entries is None or ishape is None else _resolve_target(ctx, entries, x, ishape)
    if computed:
        tval = None if resolved is None else np.array(resolved[0])
    if resolved is not None and (oshape is None or len(oshape) != len(resolved[1]) or not static(oshape)):
        if int(attr(node, "allowzero", 0)) and 0 in resolved[0]:
            resolved = None
        else:
            oshape = [r if r is not None else o for o, r in zip(oshape or resolved[1], resolved[1])]
    if ishape is None or oshape is None or tval is None:
        ctx.block(ax, node, "Reshape target shape is computed at run time")
        return [0]
    inner = ishape[ax.axis + 1:]
    total = ctx.total(ax)
    if not static(inner):
        ctx.block(ax, node, "Reshape of a tensor with dynamic inner dimensions")
        return [0]
    tail = int(np.prod(inner)) if inner else 1
    tval = [int(v) for v in tval.reshape(-1)]
    allowzero = int(attr(node, "allowzero", 0))
    for j in range(len(oshape)):
        otail = oshape[j + 1:]
        if not static(otail) or not isinstance(oshape[j], int):
            continue
        new_tail = int(np.prod(otail)) if otail else 1
        outer = _outer(ishape[:ax.axis], oshape[:j], ax.outer)
        if outer is None or oshape[j] * new_tail != outer * total * tail:
            continue
        segs = _tail_block(ax, tail, new_tail)
        if segs is None and tail == 1 and request_heads(ctx, ax, new_tail, y, j):
            ctx.block(ax, node, "waiting for head blocks")
            return [0]
        if segs is None:
            continue
        if j >= len(tval):
            break
        entry = tval[j]
        zero_refs = [i for i, v in enumerate(tval) if v == 0 and not allowzero]
        if ax.axis in zero_refs and ax.axis != j:
            break
        if entry == 0 and not allowzero and not (j == ax.axis and tail == new_tail):
            break
        if entry == DYNAMIC:
            break
        out = ChannelAxis(j, segs, outer)
        if entry > 0 and not fix_entry(ctx, node, out, y, j, entries if computed else None):
            return [0]
        ctx.set_axis(y, out)
        return [0]
    if tail == 1 and stack_split(ctx, node, ax, ishape, oshape, tval, entries if computed else None):
        return [0]
    ctx.block(ax, node, SPLIT_REASON)
    return [0]


def stack_split(ctx: Context, node: gs.Node, ax: ChannelAxis, ishape: list, oshape: list, tval: list,
                entries: list | None) -> bool:
    """Reshape of a fused QKV projection ``[..., k*P] -> [..., k, <P as one or two axes>]``.

    The k parts (Q, K, V) are cut apart and united; the output carries the
    first part's channels with the stack (one segment tuple per index).
    True when handled (possibly provisionally, waiting for cuts or heads).
    """
    if ax.outer != 1 or ax.stack is not None:
        return False
    y = node.outputs[0]
    total = ctx.total(ax)
    for s in range(len(oshape) - 1):
        k, rest = oshape[s], oshape[s + 1:]
        if not isinstance(k, int) or k < 2 or not static(rest) or total % k or int(np.prod(rest)) != total // k:
            continue
        if not _same_leading(ishape[:ax.axis], oshape[:s]) or not takes_stack_apart(ctx, y, s):
            continue
        size = total // k
        ok = ctx.align(ax, [i * size for i in range(1, k)])
        if ok is None:
            return False
        if not ok:
            ctx.block(ax, node, "waiting for cuts")
            return True
        parts = [ChannelAxis(ax.axis, ctx.slice_segments(ax, i * size, (i + 1) * size)) for i in range(k)]
        if not ctx.unite_parts(parts, node, "fused Q/K/V parts do not carry channels in the same layout"):
            return True
        j = s + 1 + next((i for i, d in enumerate(rest) if d != 1), 0)  # the channel axis: first non-1 dim
        new_tail = int(np.prod(oshape[j + 1:]))
        segs = [_tail_block(p, 1, new_tail) for p in parts]
        if segs[0] is None:
            if request_heads(ctx, parts[0], new_tail, y, j):
                ctx.block(ax, node, "waiting for head blocks")
                return True
            return False
        entry = tval[j] if j < len(tval) else None
        if entry is None or entry == 0 or entry < -1:
            return False
        out = ChannelAxis(j, segs[0], 1, (s, tuple(segs)))
        if entry > 0 and not fix_entry(ctx, node, out, y, j, entries):
            return True
        ctx.set_axis(y, out)
        return True
    return False


#: A Reshape that takes the channel axis apart in a way that is not followed.
#: Attention heads ([B, S, C] -> [B, S, heads, C/heads]) become head groups
#: (see :mod:`.attention`); channel shuffles (ShuffleNet) and heads whose
#: blocks do not line up with the producers' channels are left as they are.
SPLIT_REASON = "Reshape splits the channel axis into several axes (attention heads, channel shuffle)"

#: An entry of a computed shape that is read at run time from a non-channel dim.
DYNAMIC = -(2**62)


class Entry(int):
    """A constant entry of a computed shape and where it is stored: ``source`` = (reader node, input, element)."""

    source: tuple


def _entry(value: int, source: tuple) -> Entry:
    e = Entry(value)
    e.source = source
    return e


def fix_entry(ctx: Context, node: gs.Node, ax: ChannelAxis, y: gs.Tensor, j: int, entries: list | None) -> bool:
    """Register the fix of entry ``j`` of Reshape ``node``'s target (the channel count of ``y``).

    A constant target is edited in place.  A computed one (``entries``, a
    dynamic batch or sequence) is edited where the constant entry is stored,
    e.g. an input of the Concat that builds the target; every Reshape that
    reads that stored value must then be edited alike (checked at the end
    of the pass, :func:`check_stored_entries`).  False (and blocked) when the
    entry is not a stored constant.
    """
    if entries is None:
        ctx.fixes.append(AxisFix("shape", node.name, y.name, j))
        return True
    if j < len(entries) and isinstance(entries[j], tuple):
        return True  # the input's own channel count, read at run time (_resolve_target): follows by itself
    source = getattr(entries[j], "source", None) if j < len(entries) else None
    if source is None or source[0] is None:
        ctx.block(ax, node, "channel count is hard-coded in a computed Reshape target")
        return False
    reader, index, element = source
    ctx.fixes.append(AxisFix("shape", reader.name, y.name, element, input=index))
    ctx.stored_entries.setdefault((reader.name, index, element), []).append((node, ax))
    return True


#: Ops between a stored shape entry and the Reshape that reads it.
_SHAPE_CHAIN = ("Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Gather", "Slice", "Reshape")


def _target_readers(node: gs.Node, depth: int = 0) -> set[str] | None:
    """Reshapes whose target is computed from ``node``'s output; None if anything else reads it."""
    out: set[str] = set()
    for t in node.outputs:
        for r in t.outputs:
            if r.op == "Reshape" and len(r.inputs) > 1 and r.inputs[1] is t:
                out.add(r.name)
            elif r.op in _SHAPE_CHAIN and depth < 8:
                sub = _target_readers(r, depth + 1)
                if sub is None:
                    return None
                out |= sub
            else:
                return None
    return out


def check_stored_entries(ctx: Context, graph: gs.Graph) -> None:
    """A stored shape entry edited for some Reshapes must be read by no other node.

    Reshapes that share it (dynamo reuses one target for Q, K and V) must
    keep the same count, so their channels are united.
    """
    nodes = {n.name: n for n in graph.nodes}
    for (reader, _, _), users in ctx.stored_entries.items():
        readers = _target_readers(nodes[reader])
        if readers is None or readers - {n.name for n, _ in users}:
            for node, ax in users:
                ctx.block(ax, node, "the channel count is stored in a shape shared with other nodes")
        elif len(users) > 1:
            ctx.unite_parts([ax for _, ax in users], users[0][0], "Reshapes sharing a channel count differ")


def _shape_entries(ctx: Context, tensor: gs.Tensor, depth: int = 0, reader: gs.Node | None = None,
                   index: int = 0) -> list | None:
    """Entries of a 1-D int tensor computed from constants and Shape reads.

    Each entry is an :class:`Entry` (a constant, read by input ``index`` of
    ``reader``) or ``(tensor, dim)``: the size of ``tensor``'s dimension
    ``dim`` read at run time.  None when the computation is not understood.
    """
    val = ctx.const(tensor)
    if val is not None:
        return [_entry(int(v), (reader, index, i)) for i, v in enumerate(val.reshape(-1))]
    if depth > 8 or not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "Concat" and int(attr(node, "axis", 0)) in (0, -1):
        out: list = []
        for k, t in enumerate(node.inputs):
            part = _shape_entries(ctx, t, depth + 1, node, k)
            if part is None:
                return None
            out += part
        return out
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape") and node.inputs:
        return _shape_entries(ctx, node.inputs[0], depth + 1, node, 0)
    if node.op == "Shape":
        rank = ctx.rank(node.inputs[0])
        if rank is None:
            return None
        start = norm_axis(int(attr(node, "start", 0)), rank)
        end = attr(node, "end")
        end = rank if end is None else min(norm_axis(int(end), rank), rank)
        return [(node.inputs[0], d) for d in range(start, end)]
    if node.op == "Gather" and int(attr(node, "axis", 0)) == 0:
        src, idx = _shape_entries(ctx, node.inputs[0], depth + 1, node, 0), ctx.const(node.inputs[1])
        if src is None or idx is None or idx.ndim > 1:
            return None
        return [src[int(i)] for i in idx.reshape(-1)]
    if node.op == "Slice":
        src, params = _shape_entries(ctx, node.inputs[0], depth + 1, node, 0), slice_params(ctx, node)
        if src is None or params is None or len(params[0]) != 1:
            return None
        return src[slice(params[0][0], params[1][0], params[3][0])]
    return None


def _resolve_target(ctx: Context, entries: list, x: gs.Tensor, ishape: list) -> tuple[list, list] | None:
    """(target values with run-time reads as DYNAMIC, output shape) of a computed Reshape target."""
    tval, oshape = [], []
    for i, e in enumerate(entries):
        if isinstance(e, tuple):
            t, d = e
            ax = ctx.axis_of(t)
            shp = ctx.shape(t)
            if ax is not None and ax.axis == d:
                if t is not x or i != d or shp is None:
                    return None  # reads a channel count
                tval.append(shp[d])  # x's own count at the same axis (see _own_count): no fix needed
                oshape.append(shp[d])
                continue
            tval.append(DYNAMIC)
            oshape.append(shp[d] if shp is not None and d < len(shp) else None)
        else:
            tval.append(e)
            oshape.append(ishape[i] if e == 0 and i < len(ishape) else (None if e == -1 else e))
    if tval.count(-1) == 1:
        num = [d for d in ishape]
        den = [d for d in oshape if d is not None]
        for d in list(den):
            if d in num:
                num.remove(d)
                den.remove(d)
        sym = [d for d in num if not isinstance(d, int)]
        n_static = int(np.prod([d for d in num if isinstance(d, int)] or [1]))
        d_static = int(np.prod(den or [1])) if static(den) else 0
        if d_static and not sym and n_static % d_static == 0:
            oshape[tval.index(-1)] = n_static // d_static
        elif d_static and len(sym) == 1 and sym[0] is not None and n_static == d_static:
            oshape[tval.index(-1)] = sym[0]  # e.g. the batch: [-1, C*H*W]
    return tval, oshape


@rule("Shape")
def _shape(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    if rank is None:
        ctx.block(ax, node, "Shape of a tensor of unknown rank")
        return [0]
    start = norm_axis(int(attr(node, "start", 0)), rank)
    end = attr(node, "end")
    end = rank if end is None else min(norm_axis(int(end), rank), rank)
    if start <= ax.axis < end:
        ctx.shape_vec[node.outputs[0].name] = (ax.axis - start, ax)
    return [0]


def shape_read(ctx: Context, node: gs.Node, picked: list[int] | None) -> None:
    """A Gather/Slice of a Shape output: reading the channel count blocks the channels."""
    pos, ax = ctx.shape_vec[node.inputs[0].name]
    if (picked is None or pos in picked) and not _own_count(node):
        ctx.block(ax, node, "the channel count is read at run time (Shape)")


def _own_count(node: gs.Node) -> bool:
    """The shape read by ``node`` only builds Reshape targets of the tensor it was read from.

    ``x.flatten(2)`` in a legacy export: ``Reshape(x, Concat(Shape(x)[:2], [-1]))``.
    The count then follows the pruned width at run time; the Reshape checks
    that it lands on the same axis (:func:`_resolve_target`).
    """
    src = node.inputs[0].inputs[0].inputs[0]
    readers = _target_readers(node)
    return bool(readers) and readers <= {r.name for r in src.outputs if r.op == "Reshape" and r.inputs[0] is src}


def _gather(ctx: Context, node: gs.Node):
    data, idx = node.inputs[0], node.inputs[1]
    ival = ctx.const(idx)
    if data.name in ctx.shape_vec:
        n = len(ctx.shape(data) or []) and (ctx.shape(data)[0] or 0)
        picked = None if ival is None else [int(i) + n if i < 0 else int(i) for i in ival.reshape(-1)]
        shape_read(ctx, node, picked)
        return [0]
    ax = ctx.axis_of(data)
    rank = ctx.rank(data)
    if ax is None:
        return [0]
    axis = norm_axis(int(attr(node, "axis", 0)), rank) if rank is not None else None
    if axis is None or axis == ax.axis or ival is None:
        ctx.block(ax, node, "Gather along the channel axis (or with computed indices)")
        return [0]
    new_axis = ax.axis if ax.axis < axis else ax.axis - 1 + ival.ndim
    ctx.set_axis(node.outputs[0], ChannelAxis(new_axis, ax.segments))
    return [0]


@rule("Pad")
def _pad(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    pads = int_operand(ctx, node, "pads", 1, absent=None)
    axes = list(range(rank)) if rank is not None else None
    if len(node.inputs) > 3 and node.inputs[3].name:
        aval = ctx.const(node.inputs[3])
        axes = None if aval is None or rank is None else [norm_axis(int(a), rank) for a in aval.reshape(-1)]
    if pads is None or axes is None or len(pads) != 2 * len(axes):
        ctx.block(ax, node, "Pad amounts are not known")
        return [0]
    if ax.axis in axes:
        i = axes.index(ax.axis)
        if pads[i] or pads[i + len(axes)]:
            ctx.block(ax, node, "Pad adds positions along the channel axis")
            return [0]
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("Resize", "Upsample")
def _resize(ctx: Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    if ax is None:
        return [0]
    if "axes" in node.attrs and ax.axis not in [norm_axis(int(a), ctx.rank(x) or 0) for a in node.attrs["axes"]]:
        ctx.set_axis(node.outputs[0], ax)
        return [0]
    named = [t if t.name else None for t in node.inputs[1:]]
    scales = node.attrs.get("scales")
    sizes = None
    if scales is None:
        # Upsample/Resize-10: (X, scales); Resize-11+: (X, roi, scales, sizes)
        scale_t = named[0] if len(node.inputs) == 2 else (named[1] if len(named) > 1 else None)
        size_t = named[2] if len(named) > 2 else None
        if scale_t is not None:
            scales = ctx.const(scale_t)
            if scales is not None and scales.size == 0:
                scales = None
        if size_t is not None:
            sizes = ctx.const(size_t)
            if sizes is None:
                ctx.block(ax, node, "Resize sizes are computed at run time")
                return [0]
    if sizes is not None and sizes.size:
        if int(sizes.reshape(-1)[ax.axis]) != ctx.total(ax):
            ctx.block(ax, node, "Resize changes the number of channels")
            return [0]
        ctx.fixes.append(AxisFix("shape", node.name, node.outputs[0].name, ax.axis, input=3))
    elif scales is None or float(np.asarray(scales).reshape(-1)[ax.axis]) != 1.0:
        ctx.block(ax, node, "Resize scale along the channel axis is not 1 (or not known)")
        return [0]
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("Transpose")
def _transpose(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is None:
        return [0]
    perm = attr(node, "perm")
    rank = ctx.rank(node.inputs[0])
    if perm is None:
        if rank is None:
            ctx.block(ax, node, "Transpose of unknown rank")
            return [0]
        perm = list(range(rank))[::-1]
    perm = list(perm)
    ctx.set_axis(node.outputs[0], ChannelAxis(perm.index(ax.axis), ax.segments, ax.outer))
    return [0]


@rule("Squeeze")
def _squeeze(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    axes = int_operand(ctx, node, "axes", 1, absent=None)
    if axes is None or rank is None:
        ctx.block(ax, node, "Squeeze axes are not known")
        return [0]
    axes = [norm_axis(a, rank) for a in axes]
    if ax.axis in axes:
        ctx.block(ax, node, "Squeeze removes the channel axis")
        return [0]
    ctx.set_axis(node.outputs[0], ChannelAxis(ax.axis - sum(1 for a in axes if a < ax.axis), ax.segments))
    return [0]


@rule("Unsqueeze")
def _unsqueeze(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.outputs[0])
    if ax is None:
        return [0]
    axes = int_operand(ctx, node, "axes", 1, absent=None)
    if axes is None or rank is None:
        ctx.block(ax, node, "Unsqueeze axes are not known")
        return [0]
    axes = sorted(norm_axis(a, rank) for a in axes)
    pos = ax.axis
    for a in axes:
        if a <= pos:
            pos += 1
    ctx.set_axis(node.outputs[0], ChannelAxis(pos, ax.segments))
    return [0]
