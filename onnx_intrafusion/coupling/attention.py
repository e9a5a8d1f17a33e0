"""Attention heads.

Multi-head attention as exporters write it: Q, K and V projections (separate,
or one fused projection cut by Split/Slice), each reshaped ``[..., C] ->
[..., heads, head_dim]``, transposed, ``softmax(Q K^T) V`` as two batched
MatMuls, transposed back, reshaped to ``[..., C]`` and read by the output
projection.  No special pattern is matched: the generic rules follow it once

* the head-splitting Reshape asks the projections for channels of
  ``head_dim`` positions (:func:`request_heads`; a space *unit*, found by the
  same fixpoint as cuts), so a channel of those groups is a head: its Q, K and
  V rows and its output-projection columns are kept or removed together, and
  the Reshape constants that hold the head count are rewritten;
* a MatMul between two computed tensors that carry heads on the same batch
  axis joins them like an element-wise op (:func:`batched_matmul`): Q, K and V
  heads of one attention are one group;
* a fused QKV projection reshaped to ``[..., 3, C]`` or ``[..., 3, heads,
  head_dim]`` (``nn.MultiheadAttention``, timm/Swin blocks) is cut into its
  three parts, which are united, and carried as a *stacked* axis until a
  Gather or Split takes the parts apart (``shape.stack_split``, :func:`stacked`);
* heads folded into the batch axis (``[B * heads, S, head_dim]``) are an axis
  with ``outer`` > 1, read only by the ops in ``FOLDED_OK``.

Fused attention ops hold all heads inside one node with packed weights; they
are left as they are, with :data:`FUSED_REASON`.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from .dims import dims
from .elementwise import join
from .rules import int_operand, norm_axis, rule, slice_params
from .spaces import ChannelAxis, Context

#: Why channels read by a fused attention op are not pruned.
FUSED_REASON = "fused attention op: its heads are packed inside one node (not pruned)"

#: onnxruntime's contrib attention ops (packed QKV weights, head count as an attribute).
ORT_FUSED = ("Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention",
             "GroupQueryAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
             "DecoderAttention", "QAttention", "LongformerAttention", "SparseAttention")


def request_heads(ctx: Context, ax: ChannelAxis, head_dim: int, y: gs.Tensor, axis: int) -> bool:
    """Ask for channels of ``head_dim`` positions on every space of ``ax``.

    Called by the Reshape rule for ``[..., C] -> [..., heads, head_dim]``
    (output ``y``, heads on ``axis``) when the heads reach an attention
    MatMul.  False when they do not, or cannot be made whole channels: a head
    would straddle two spaces (or a fixed part), or a space is not a whole
    number of heads.
    """
    if not _reaches_attention(ctx, y, axis):
        return False
    requests = []
    for seg, off in ctx.segment_offsets(ax):
        if seg.space is None or head_dim % seg.block or off % head_dim:
            return False
        factor = head_dim // seg.block
        if ctx.size[ctx.find(seg.space)] % factor:
            return False
        requests.append((seg.space, factor))
    for space, factor in requests:
        ctx.request_unit(space, factor)
    return True


#: Ops between the head split and the attention MatMul that keep each head's values apart.
_PER_HEAD = ("Mul", "Div", "Add", "Sub", "Cast", "Identity", "Dropout", "Softmax", "Where")


def _reaches_attention(ctx: Context, tensor: gs.Tensor, axis: int, depth: int = 0) -> bool:
    """Whether ``axis`` of ``tensor`` becomes a batch axis of a MatMul of two computed tensors.

    A look ahead that tells heads (``[.., heads, head_dim]`` fed to ``Q K^T``)
    from other splits of the channel axis (a fused ``[.., 3, C]`` QKV, a
    channel shuffle), which the generic rules block.
    """
    rank = ctx.rank(tensor)
    if depth > 8 or rank is None:
        return False
    for node in tensor.outputs:
        out = node.outputs[0] if node.outputs else None
        if node.op == "Transpose" and node.attrs.get("perm") is not None:
            if _reaches_attention(ctx, out, list(node.attrs["perm"]).index(axis), depth + 1):
                return True
        elif node.op == "MatMul" and all(ctx.const(t) is None for t in node.inputs):
            if axis < rank - 2:
                return True
        elif node.op in ("Gather", "Squeeze", "Unsqueeze", "Split", "Slice") and out is not None:
            moved = _moved_axis(ctx, node, axis, rank)
            if moved is not None and any(_reaches_attention(ctx, o, moved, depth + 1) for o in node.outputs):
                return True
        elif node.op == "Reshape" and out is not None:
            j = _reshaped_axis(dims(ctx, tensor), dims(ctx, out), axis)
            if j is not None and _reaches_attention(ctx, out, j, depth + 1):
                return True
        elif node.op in _PER_HEAD and out is not None:
            out_rank = ctx.rank(out)
            if out_rank is not None and _reaches_attention(ctx, out, axis + out_rank - rank, depth + 1):
                return True
    return False


def _moved_axis(ctx: Context, node: gs.Node, axis: int, rank: int) -> int | None:
    """Where ``axis`` goes through a Gather/Squeeze/Unsqueeze/Split that does not touch it."""
    if node.op == "Gather":
        idx = ctx.const(node.inputs[1])
        g = norm_axis(int(node.attrs.get("axis", 0)), rank)
        if idx is None or g == axis:
            return None
        return axis if axis < g else axis - 1 + idx.ndim
    if node.op == "Split":
        return None if norm_axis(int(node.attrs.get("axis", 0)), rank) == axis else axis
    if node.op == "Slice":
        params = slice_params(ctx, node)
        return None if params is None or axis in [norm_axis(a, rank) for a in params[2]] else axis
    axes = int_operand(ctx, node, "axes", 1, absent=None)
    if axes is None:
        return None
    if node.op == "Squeeze":
        axes = [norm_axis(a, rank) for a in axes]
        return None if axis in axes else axis - sum(1 for a in axes if a < axis)
    out_rank = rank + len(axes)
    pos = axis
    for a in sorted(norm_axis(a, out_rank) for a in axes):
        if a <= pos:
            pos += 1
    return pos


def _reshaped_axis(ishape: list | None, oshape: list | None, axis: int) -> int | None:
    """The output axis that holds input ``axis`` innermost (alone or folded with leading dims; symbols as primes)."""
    if ishape is None or oshape is None or not all(isinstance(d, int) for d in (*ishape, *oshape)):
        return None
    lead, tail = math.prod(ishape[:axis + 1]), math.prod(ishape[axis + 1:])
    for j in range(len(oshape)):
        if math.prod(oshape[j + 1:]) == tail and math.prod(oshape[:j + 1]) == lead:
            return j
    return None


def batched_matmul(ctx: Context, node: gs.Node):
    """MatMul of two computed tensors: heads on a batch axis pass, matched by index.

    ``Q K^T`` and ``softmax(.) V`` multiply per head; removing head h from
    both operands removes it from the product.  Channels on the two matrix
    axes (contracted or not) mix and block.
    """
    y = node.outputs[0]
    axes = [ctx.axis_of(t) for t in node.inputs]
    ranks = [ctx.rank(t) for t in node.inputs]
    out_rank = ctx.rank(y)
    tracked = [i for i in (0, 1) if axes[i] is not None]
    if not tracked:
        return []
    if out_rank is None or any(r is None for r in ranks):
        for i in tracked:
            ctx.block(axes[i], node, "MatMul of tensors of unknown rank")
        return [0, 1]
    if any(axes[i].axis >= ranks[i] - 2 for i in tracked):
        for i in tracked:
            ctx.block(axes[i], node, "MatMul between two computed tensors mixes channels")
        return [0, 1]
    if len(tracked) == 1:
        (i,) = tracked
        out_axis = axes[i].axis + out_rank - ranks[i]
        other = ctx.shape(node.inputs[1 - i])
        pos = out_axis - (out_rank - ranks[1 - i])
        if other is None or (pos >= 0 and other[pos] != 1):
            ctx.block(axes[i], node, "MatMul with an operand that has its own values per head")
            return [0, 1]
        ctx.set_axis(y, ChannelAxis(out_axis, axes[i].segments, axes[i].outer))
        return [0, 1]
    return join(ctx, node)


def takes_stack_apart(ctx: Context, tensor: gs.Tensor, axis: int, depth: int = 0) -> bool:
    """Whether ``axis`` reaches a Gather or Split along it (through Unsqueeze/Transpose/Squeeze)."""
    rank = ctx.rank(tensor)
    if depth > 6 or rank is None:
        return False
    for node in tensor.outputs:
        if node.op in ("Gather", "Split") and norm_axis(int(node.attrs.get("axis", 0)), rank) == axis:
            return True
        if node.op == "Slice" and _stack_slice(ctx, node, axis, rank) is not None:
            return True
        if node.op == "Transpose" and node.attrs.get("perm") is not None:
            moved = list(node.attrs["perm"]).index(axis)
        elif node.op in ("Squeeze", "Unsqueeze"):
            moved = _moved_axis(ctx, node, axis, rank)
        else:
            continue
        if moved is not None and takes_stack_apart(ctx, node.outputs[0], moved, depth + 1):
            return True
    return False


#: Ops that take a stacked Q/K/V axis through or apart.
STACKED_OK = frozenset({"Transpose", "Unsqueeze", "Squeeze", "Gather", "Split", "Slice"})


def stacked(ctx: Context, node: gs.Node):
    """Rule for a tensor whose channel axis is stacked (see :func:`stack_split`)."""
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    rank = ctx.rank(x)
    s, parts = ax.stack
    if rank is None or any(ctx.axis_of(t) is not None for t in node.inputs[1:]):
        return []
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm", range(rank)[::-1]))
        ctx.set_axis(node.outputs[0], ChannelAxis(perm.index(ax.axis), ax.segments, ax.outer, (perm.index(s), parts)))
        return [0]
    if node.op in ("Squeeze", "Unsqueeze"):
        axis, stack_axis = _moved_axis(ctx, node, ax.axis, rank), None
        if node.op == "Squeeze" and len(parts) == 1 and s in _squeezed(ctx, node, rank):
            stack_axis = -1  # squeezing a stack of one part (after a Split) ends the stack
        else:
            stack_axis = _moved_axis(ctx, node, s, rank)
            if stack_axis is None:
                return []
        if axis is None:
            return []
        stack = None if stack_axis == -1 else (stack_axis, parts)
        ctx.set_axis(node.outputs[0], ChannelAxis(axis, ax.segments, ax.outer, stack))
        return [0]
    if node.op == "Slice":
        picked = _stack_slice(ctx, node, s, rank)
        if picked is None:
            return []
        kept = parts[picked]
        if not kept:
            return []
        ctx.set_axis(node.outputs[0], ChannelAxis(ax.axis, kept[0], ax.outer, (s, kept)))
        return [0]
    along = norm_axis(int(node.attrs.get("axis", 0)), rank)
    if along != s:
        return []
    if node.op == "Gather":
        idx = ctx.const(node.inputs[1])
        if idx is None or idx.ndim != 0:
            return []
        i = int(idx) + len(parts) if int(idx) < 0 else int(idx)
        ctx.set_axis(node.outputs[0], ChannelAxis(ax.axis - (1 if s < ax.axis else 0), parts[i], ax.outer))
        return [0]
    sizes = int_operand(ctx, node, "split", 1, absent=[1] * len(node.outputs))
    if sizes is None or list(sizes) != [1] * len(parts) or len(node.outputs) != len(parts):
        return []
    for y, part in zip(node.outputs, parts):
        ctx.set_axis(y, ChannelAxis(ax.axis, part, ax.outer, (s, (part,))))
    return [0]


def _stack_slice(ctx: Context, node: gs.Node, s: int, rank: int) -> slice | None:
    """The parts a Slice keeps along stack axis ``s`` (only that axis, step 1), else None."""
    params = slice_params(ctx, node)
    if params is None:
        return None
    starts, ends, axes, steps = params
    if [norm_axis(a, rank) for a in axes] != [s] or steps != [1]:
        return None
    return slice(starts[0], ends[0])


def _squeezed(ctx: Context, node: gs.Node, rank: int) -> list[int]:
    axes = int_operand(ctx, node, "axes", 1, absent=None) or []
    return [norm_axis(a, rank) for a in axes]


def _fused(ctx: Context, node: gs.Node):
    for t in node.inputs:
        ctx.block(ctx.axis_of(t), node, FUSED_REASON)
    return range(len(node.inputs))


rule("Attention")(_fused)  # opset 23
rule(*ORT_FUSED, domain="com.microsoft")(_fused)
