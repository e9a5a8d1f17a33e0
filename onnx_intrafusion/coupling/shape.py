"""Rules of ops that move or reduce the axes around the channels.

Pooling and reductions, Reshape/Flatten (channels become blocks of positions),
Transpose, Squeeze/Unsqueeze, Pad, Resize, and reads of the channel count
through Shape/Gather (which block: the count would change at run time, unless
the read only gives a Reshape its own channel count).  Reshape targets
computed at run time are evaluated with the symbolic dims of :mod:`.dims`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from .attention import request_heads, takes_stack_apart
from .dims import Computed, Entry, dims, fixed, reads, shape_entries, value
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
    """Whether leading dims ``a`` and ``b`` (symbols as primes) hold the same number of elements."""
    return a == b or math.prod(a) == math.prod(b)


def _outer(lead_in: list, lead_out: list, outer: int) -> int | None:
    """Repeats of the channels on the output axis whose leading dims are ``lead_out``.

    The same as ``outer`` when the leading dims hold the same elements;
    more when a Reshape folds leading dims into the channel axis (``[B, h, S,
    d] -> [B*h, S, d]``), fewer when it unfolds them again.  None when the
    leading dims do not line up.  Symbolic dims are primes (:mod:`.dims`), so
    a folded dynamic batch gives a symbolic ``outer``.
    """
    size_in, size_out = math.prod(lead_in) * outer, math.prod(lead_out)
    return size_in // size_out if size_out and size_in % size_out == 0 else None


@rule("Reshape")
def _reshape(ctx: Context, node: gs.Node):
    x, target = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    ax = ctx.axis_of(x)
    if ax is None:
        return [0]
    # The target may be built at run time from Shape reads, arithmetic and
    # constants (a dynamic batch, the legacy exporter's traced sizes): its
    # entries are evaluated symbolically.  Reads of other dims need no edit;
    # a read of a channel count blocks that count's group (the Shape/Gather
    # rules), so it stays what it is now.
    ishape, oshape = dims(ctx, x), dims(ctx, y)
    entries = shape_entries(ctx, target, 0, node, 1)
    if ishape is None or oshape is None or entries is None or len(entries) != len(oshape):
        ctx.block(ax, node, "Reshape target shape is computed at run time")
        return [0]
    computed = ctx.const(target) is None
    tval = [int(e) if isinstance(e, Entry) else DYNAMIC for e in entries]
    inner = ishape[ax.axis + 1:]
    total = ctx.total(ax)
    tail = math.prod(inner)
    allowzero = int(attr(node, "allowzero", 0))
    for j in range(len(oshape)):
        new_tail = math.prod(oshape[j + 1:])
        outer = _outer(ishape[:ax.axis], oshape[:j], ax.outer)
        if outer is None or oshape[j] * new_tail != outer * total * tail:
            continue
        segs = _tail_block(ax, tail, new_tail)
        if segs is None and tail == 1 and fixed(new_tail) and request_heads(ctx, ax, new_tail, y, j):
            ctx.block(ax, node, "waiting for head blocks")
            return [0]
        if segs is None:
            continue
        entry = tval[j]
        zero_refs = [i for i, v in enumerate(tval) if v == 0 and not allowzero]
        if ax.axis in zero_refs and ax.axis != j:
            break
        if entry == 0 and not allowzero and not (j == ax.axis and tail == new_tail):
            break
        out = ChannelAxis(j, segs, outer)
        if entry == DYNAMIC:
            if _reads_own_count(ctx, out, entries, j):
                ctx.count_users.add(node.name)
            elif not fix_scaled(ctx, node, out, y, j, entries[j]):
                break
        elif entry > 0 and not fix_entry(ctx, node, out, y, j, entries if computed else None):
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
        if not fixed(k) or k < 2 or not all(fixed(d) for d in rest) or total % k or math.prod(rest) != total // k:
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
        new_tail = math.prod(oshape[j + 1:])
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

#: An entry of a computed shape that is not a stored constant (read or computed at run time).
DYNAMIC = -(2**62)


def fix_entry(ctx: Context, node: gs.Node, ax: ChannelAxis, y: gs.Tensor, j: int, entries: list | None) -> bool:
    """Register the fix of entry ``j`` of Reshape ``node``'s target (the channel count of ``y``).

    A constant target is edited in place.  A computed one (``entries``, a
    dynamic batch or sequence) is edited where the constant entry is stored,
    e.g. an input of the Concat that builds the target; every Reshape that
    reads that stored value must then be edited alike (checked at the end
    of the pass, :func:`check_stored_entries`).  False (and blocked) when the
    entry is not a stored constant.
    """
    if not fixed(ax.outer):
        ctx.block(ax, node, "channel count is hard-coded next to a dimension read at run time")
        return False
    if entries is None:
        ctx.fixes.append(AxisFix("shape", node.name, y.name, j))
        return True
    source = getattr(entries[j], "source", None) if j < len(entries) else None
    if source is None or source[0] is None:
        ctx.block(ax, node, "channel count is hard-coded in a computed Reshape target")
        return False
    return _fix_stored(ctx, node, ax, y, source)


def _reads_own_count(ctx: Context, out: ChannelAxis, entries: list, j: int) -> bool:
    """Entry ``j`` is the channel count of ``out`` read at run time from a tensor with the same channels.

    Such a read follows the pruning by itself (dynamo's decomposed attention
    reshapes K with the head count read from K's own shape).  No other entry
    may read a channel count.
    """
    e = entries[j]
    if not isinstance(e, tuple):
        return False
    src = ctx.axis_of(e[0])
    if src is None or src.axis != e[1] or src.segments != out.segments or src.outer != out.outer or src.stack:
        return False
    return not any(_reads_a_count(ctx, r) for i, other in enumerate(entries) if i != j for r in reads(other))


def _reads_a_count(ctx: Context, read: tuple) -> bool:
    ax = ctx.axis_of(read[0])
    return ax is not None and ax.axis == read[1]


def check_count_reads(ctx: Context) -> None:
    """A channel count read at run time blocks its channels, unless only Reshapes read it as their own count."""
    for node, ax in ctx.count_reads:
        readers = _target_readers(node)
        if readers is None or not readers <= ctx.count_users:
            ctx.block(ax, node, "the channel count is read at run time (Shape)")


def fix_scaled(ctx: Context, node: gs.Node, ax: ChannelAxis, y: gs.Tensor, j: int, e) -> bool:
    """Entry ``j`` is computed at run time as ``stored * factor`` (``batch * heads``): edit ``stored``.

    The axis holds ``ax.outer`` repeats of its channels; the stored count
    must be the channels times ``outer / factor``, a known number (heads
    folded into a dynamic batch: the batch is both the factor and the
    repeats).  False when the entry is not of that form: the caller blocks.
    """
    if not isinstance(e, Computed) or e.stored is None or e.factor is None:
        return False
    scale, rem = divmod(ax.outer, e.factor)
    if rem or not fixed(scale) or int(e.stored) != ctx.total(ax) * scale:
        return False
    return _fix_stored(ctx, node, ax, y, e.stored.source, scale)


def _fix_stored(ctx: Context, node: gs.Node, ax: ChannelAxis, y: gs.Tensor, source: tuple, scale: int = 0) -> bool:
    reader, index, element = source
    ctx.fixes.append(AxisFix("shape", reader.name, y.name, element, input=index, scale=scale))
    ctx.stored_entries.setdefault((reader.name, index, element), []).append((node, ax))
    return True


#: Ops between a stored shape entry and the Reshape that reads it.
_SHAPE_CHAIN = ("Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Gather", "Slice", "Reshape", "Mul", "Div",
                "Add", "Sub", "Mod", "Shape", "ConstantOfShape", "Equal", "Where")


def _target_readers(node: gs.Node, depth: int = 0) -> set[str] | None:
    """Reshapes (or Expands) whose target is computed from ``node``'s output; None if anything else reads it."""
    out: set[str] = set()
    for t in node.outputs:
        for r in t.outputs:
            if r.op in ("Reshape", "Expand") and len(r.inputs) > 1 and r.inputs[1] is t:
                out.add(r.name)
            elif r.op in _SHAPE_CHAIN and depth < 12:
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



#: An Expand that repeats along the channel axis (its target's entry there is not 1 or the channel count).
EXPAND_REASON = "Expand broadcasts along the channel axis"


def expand_keeps_axis(ctx: Context, node: gs.Node, axis: int, out_rank: int, ax: ChannelAxis, y: gs.Tensor) -> bool:
    """Expand ``node`` leaves channel axis ``axis`` (of ``out_rank``) of its output as its input has it.

    True when the target's entry for that axis is 1 (no repeat) or the
    channel count itself, which is then rewritten like a Reshape target
    (``y`` is a tensor with ``ax``'s channels, whose new size is written).
    The other entries may be read at run time (a class token expanded to
    the batch: ``cls.expand(batch, -1, -1)``).
    """
    const = ctx.const(node.inputs[1]) is not None
    entries = shape_entries(ctx, node.inputs[1], reader=node, index=1)
    if entries is None:
        return False
    j = axis - (out_rank - len(entries))
    if j < 0:
        return True
    v = value(ctx, entries[j])
    if v == 1:
        return True
    if v != ctx.total(ax) or ax.outer != 1:
        return False
    return fix_entry(ctx, node, ax, y, j, None if const else entries)


@rule("Expand")
def _expand(ctx: Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is None:
        return [0]
    rank, out_rank = ctx.rank(node.inputs[0]), ctx.rank(node.outputs[0])
    if rank is None or out_rank is None:
        ctx.block(ax, node, "Expand of unknown rank")
        return [0]
    out = ChannelAxis(ax.axis + out_rank - rank, ax.segments)
    if not expand_keeps_axis(ctx, node, out.axis, out_rank, out, node.outputs[0]):
        ctx.block(ax, node, EXPAND_REASON)
        return [0]
    ctx.set_axis(node.outputs[0], out)
    return [0]


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
    """A Gather/Slice of a Shape output: reading the channel count blocks the channels.

    Unless every use of the read is a Reshape that takes it as its own
    channel count (decided at the end of the pass, :func:`check_count_reads`).
    """
    pos, ax = ctx.shape_vec[node.inputs[0].name]
    if picked is None:
        ctx.block(ax, node, "the channel count is read at run time (Shape)")
    elif pos in picked:
        ctx.count_reads.append((node, ax))


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
    if axis is not None and axis == ax.axis and _identity_gather(ctx, node, ax, axis, ival):
        return [0]
    if axis is None or axis == ax.axis or ival is None:
        ctx.block(ax, node, "Gather along the channel axis (or with computed indices)")
        return [0]
    new_axis = ax.axis if ax.axis < axis else ax.axis - 1 + ival.ndim
    ctx.set_axis(node.outputs[0], ChannelAxis(new_axis, ax.segments))
    return [0]


def _identity_gather(ctx: Context, node: gs.Node, ax: ChannelAxis, axis: int, ival) -> bool:
    """A Gather that takes every channel in order along one axis of its indices (dynamo writes the
    ``as_strided`` of an adaptive pool to ``[N, C, 1, 1]`` so): the channels move to that axis, and the
    indices are rewritten to ``0..kept-1``."""
    total = ctx.total(ax)
    if ival is None or ax.outer != 1 or ax.stack is not None or ival.size != total:
        return False
    along = [k for k, d in enumerate(ival.shape) if d != 1]
    if len(along) > 1 or not np.array_equal(ival.reshape(-1), np.arange(total)):
        return False
    k = along[0] if along else 0
    out = ChannelAxis(axis + k, ax.segments)
    ctx.fixes.append(AxisFix("iota", node.name, node.outputs[0].name, k))
    ctx.set_axis(node.outputs[0], out)
    return True


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
