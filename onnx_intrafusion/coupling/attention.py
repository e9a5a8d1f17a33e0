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
  heads of one attention are one group.

Fused attention ops hold all heads inside one node with packed weights; they
are left as they are, with :data:`FUSED_REASON`.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from .rules import rule
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
        elif node.op == "Reshape" and out is not None:
            j = _reshaped_axis(ctx.shape(tensor), ctx.shape(out), axis)
            if j is not None and _reaches_attention(ctx, out, j, depth + 1):
                return True
        elif node.op in _PER_HEAD and out is not None:
            out_rank = ctx.rank(out)
            if out_rank is not None and _reaches_attention(ctx, out, axis + out_rank - rank, depth + 1):
                return True
    return False


def _reshaped_axis(ishape: list | None, oshape: list | None, axis: int) -> int | None:
    """The output axis that holds input ``axis`` innermost (alone or folded with leading dims)."""
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
    from .elementwise import join

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


def _fused(ctx: Context, node: gs.Node):
    for t in node.inputs:
        ctx.block(ctx.axis_of(t), node, FUSED_REASON)
    return range(len(node.inputs))


rule("Attention")(_fused)  # opset 23
rule(*ORT_FUSED, domain="com.microsoft")(_fused)
