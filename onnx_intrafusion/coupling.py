"""Stage 2: find channel-coupled groups.

A *space* is a set of C channels created by one producer (a Conv, Gemm or
MatMul output axis).  Channels then flow through the graph: every tensor that
carries them records a :class:`ChannelAxis` (which axis, and which segments of
which spaces lie along it, each channel covering ``block`` consecutive
positions: a Flatten after a 4x4 map gives block 16).  Ops that join tensors
element-wise (residual Add, x*sigmoid(x), SE gating) unite their spaces; the
united spaces are a *group*: its channels are kept or removed together.

Each op type has a rule in :data:`RULES` that says how channels pass through
it and which constants it owns along the channel axis (producers, consumers,
per-channel parameters).  An op without a rule, or a rule that cannot prove an
edit safe, *blocks* the spaces it touches with a readable reason; blocked
groups are left exactly as they are.  A wrong model is never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

PRODUCER = "producer"  # weights whose output axis creates the channels (averaged)
CONSUMER = "consumer"  # weights whose input axis reads the channels (summed)
PARAM = "param"  # per-channel parameters along the channels (averaged)

#: Why channels that reach a graph output are kept: expected, not a failure.
OUTPUT_REASON = "channels reach a graph output"


@dataclass(frozen=True)
class Segment:
    """``block`` positions per channel of ``space``; ``space=None``: fixed positions."""

    space: int | None
    block: int


@dataclass(frozen=True)
class ChannelAxis:
    axis: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Member:
    """A constant that is edited when the group is pruned."""

    role: str
    constant: str
    node: str
    axis: int
    offset: int  # first position of this space's channels along ``axis``
    block: int


@dataclass(frozen=True)
class AxisFix:
    """A value that must follow the new size of ``tensor``'s channel axis.

    ``kind`` is ``"shape"`` (entry ``index`` of the shape constant of node
    ``node``), ``"group"`` (the ``group`` attribute of a depthwise Conv),
    ``"split"`` (the split sizes of a Split: one size per entry of ``parts``)
    or ``"slice"`` (entry ``index`` of a Slice's starts/ends: ``parts`` is
    (segments before the slice, segments kept by the slice)).
    """

    kind: str
    node: str
    tensor: str
    index: int = 0
    parts: tuple = ()  # tuple of segment tuples, for "split" and "slice"
    input: int = 1  # for "shape": which input of ``node`` holds the constant (Resize sizes: 3)


@dataclass
class Group:
    """Channels that are kept or removed together."""

    id: int
    size: int
    members: list[Member]
    blocked: list[tuple[str, str]]  # (node name, reason)
    origin: str  # first producer node, for reports

    @property
    def prunable(self) -> bool:
        return not self.blocked

    def nodes(self, role: str) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            if m.role == role:
                seen.setdefault(m.node)
        return list(seen)


@dataclass
class Analysis:
    groups: list[Group]
    axes: dict[str, ChannelAxis]  # tensor name -> channel axis
    fixes: list[AxisFix]
    space_group: dict[int, int]  # space id -> group id

    def group_of(self, space: int) -> Group:
        return self.groups[self.space_group[space]]


class _Context:
    """Mutable state of one analysis pass; rules talk to it."""

    def __init__(self, graph: gs.Graph, cuts: dict[str, frozenset[int]] | None = None):
        self.graph = graph
        # Producer node -> positions where its output is cut into separate
        # spaces (found by earlier passes: Split/Slice, grouped Conv, joins of
        # differently cut tensors).
        self.cuts = cuts or {}
        self.source: list[tuple[str, int]] = []  # space -> (producer node, first position)
        self.requests: list[tuple[int, int]] = []  # (space, position) cuts asked for in this pass
        # Output of a Shape op that includes a channel axis -> (position of
        # the channel count in the vector, the channel axis).  Only reads of
        # other positions are allowed (see the Gather and Slice rules).
        self.shape_vec: dict[str, tuple[int, ChannelAxis]] = {}
        self.axes: dict[str, ChannelAxis] = {}
        self.parent: list[int] = []
        self.size: list[int] = []
        self.origin: list[str] = []
        self.members: list[list[Member]] = []
        self.blocked: list[list[tuple[str, str]]] = []
        self.fixes: list[AxisFix] = []
        self.member_key: dict[tuple[str, int, int], int] = {}  # (constant, axis, offset) -> space
        self.constant_users: dict[str, set[str]] = {}  # constant -> nodes that edit it
        # constant -> node -> (axis, offset, block) slices that node edits
        self.constant_slices: dict[str, dict[str, set[tuple[int, int, int]]]] = {}

    # -- spaces (union-find) -------------------------------------------------
    def new_space(self, size: int, node: gs.Node, base: int = 0) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(node.name)
        self.members.append([])
        self.blocked.append([])
        self.source.append((node.name, base))
        return len(self.parent) - 1

    def new_spaces(self, size: int, node: gs.Node, cuts: Iterable[int] = ()) -> tuple[Segment, ...]:
        """The segments of a producer's output axis: one space per part between cuts."""
        points = sorted({c for c in (*self.cuts.get(node.name, ()), *cuts) if 0 < c < size})
        bounds = [0, *points, size]
        return tuple(Segment(self.new_space(b - a, node, a), 1) for a, b in zip(bounds, bounds[1:]))

    # -- cuts ------------------------------------------------------------------
    def seg_len(self, seg: Segment) -> int:
        return self.size[self.find(seg.space)] * seg.block if seg.space is not None else seg.block

    def align(self, ax: ChannelAxis, positions: Iterable[int]) -> bool | None:
        """Make each position a boundary between the channel segments of ``ax``.

        True: they already are.  False: cuts were requested from the
        producers; this pass is provisional and the analysis runs again.
        None: impossible (a position falls inside one channel's block).
        Fixed positions (``space None``) can be split anywhere.
        """
        ok: bool | None = True
        for p in positions:
            for seg, off in self.segment_offsets(ax):
                if off < p < off + self.seg_len(seg) and seg.space is not None:
                    if (p - off) % seg.block:
                        return None
                    self.requests.append((seg.space, (p - off) // seg.block))
                    ok = False
                    break
        return ok

    def slice_segments(self, ax: ChannelAxis, start: int, end: int) -> tuple[Segment, ...]:
        """The segments covering positions [start, end) of an aligned axis."""
        out = []
        for seg, off in self.segment_offsets(ax):
            a, b = max(start, off), min(end, off + self.seg_len(seg))
            if a >= b:
                continue
            if seg.space is None:
                out.append(Segment(None, b - a))
            else:
                assert a == off and b == off + self.seg_len(seg), "slice_segments on an unaligned axis"
                out.append(seg)
        return tuple(out)

    def boundaries(self, ax: ChannelAxis) -> list[int]:
        return [off for _, off in self.segment_offsets(ax)][1:]

    def propagated_cuts(self) -> dict[str, set[int]]:
        """Cuts requested in this pass, spread to every space united with the cut one."""
        classes: dict[int, list[int]] = {}
        for s in range(len(self.parent)):
            classes.setdefault(self.find(s), []).append(s)
        out: dict[str, set[int]] = {}
        for space, pos in self.requests:
            for t in classes[self.find(space)]:
                node, base = self.source[t]
                out.setdefault(node, set()).add(base + pos)
        return out

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, node: gs.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.block_spaces([ra, rb], node, "joins channel groups of different sizes")
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra] += self.members[rb]
        self.blocked[ra] += self.blocked[rb]

    def block_spaces(self, spaces: Iterable[int], node: gs.Node | str, reason: str) -> None:
        name = node if isinstance(node, str) else f"{node.name} ({node.op})"
        for s in spaces:
            entry = (name, reason)
            r = self.find(s)
            if entry not in self.blocked[r]:
                self.blocked[r].append(entry)

    def block(self, ax: ChannelAxis | None, node: gs.Node, reason: str) -> None:
        if ax is not None:
            self.block_spaces([s.space for s in ax.segments if s.space is not None], node, reason)

    # -- tensors ---------------------------------------------------------------
    def axis_of(self, tensor: gs.Tensor) -> ChannelAxis | None:
        return self.axes.get(tensor.name) if tensor is not None else None

    def set_axis(self, tensor: gs.Tensor, ax: ChannelAxis | None) -> None:
        if ax is not None and ax.segments and any(s.space is not None for s in ax.segments):
            self.axes[tensor.name] = ax

    @staticmethod
    def const(tensor: gs.Tensor) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    @staticmethod
    def shape(tensor: gs.Tensor) -> list | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.values.shape)
        if tensor.shape is None:
            return None
        return [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else None) for d in tensor.shape]

    def rank(self, tensor: gs.Tensor) -> int | None:
        shp = self.shape(tensor)
        return None if shp is None else len(shp)

    def total(self, ax: ChannelAxis) -> int:
        return sum(self.size[self.find(s.space)] * s.block if s.space is not None else s.block for s in ax.segments)

    def segment_offsets(self, ax: ChannelAxis) -> list[tuple[Segment, int]]:
        out, pos = [], 0
        for seg in ax.segments:
            out.append((seg, pos))
            pos += self.size[self.find(seg.space)] * seg.block if seg.space is not None else seg.block
        return out

    # -- members ---------------------------------------------------------------
    def add_members(self, ax: ChannelAxis, role: str, tensor: gs.Tensor, node: gs.Node,
                    axis: int, scale: int = 1) -> None:
        """Register ``tensor`` as edited along ``axis`` for every segment of ``ax``.

        ``scale`` multiplies positions (a depthwise conv with multiplier m
        owns m weight rows per input channel).
        """
        for seg, off in self.segment_offsets(ax):
            if seg.space is not None:
                self.add_member(seg.space, Member(role, tensor.name, node.name, axis, off * scale, seg.block * scale))

    def add_member(self, space: int, member: Member) -> None:
        key = (member.constant, member.axis, member.offset)
        other = self.member_key.get(key)
        if other is not None and member.role != PARAM:
            # The same weight slice edited from two places (shared weights):
            # both places must see the same channels.  Per-channel parameters
            # are often shared only because exporters deduplicate equal
            # values (BatchNorm ones/zeros); the rewrite gives each node its
            # own copy when their edits differ.
            self.union(other, space, member.node)
        elif other is None:
            self.member_key[key] = space
        self.members[self.find(space)].append(member)
        self.constant_users.setdefault(member.constant, set()).add(member.node)
        self.constant_slices.setdefault(member.constant, {}).setdefault(member.node, set()).add(
            (member.axis, member.offset, member.block))


# ---------------------------------------------------------------------------
# Rules: one function per op family.  A rule returns the indices of the inputs
# whose channels it handled; channels on any other input are blocked.
# ---------------------------------------------------------------------------

Rule = Callable[[_Context, gs.Node], Iterable[int]]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def _attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@rule("Conv")
def _conv(ctx: _Context, node: gs.Node):
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
    group = int(_attr(node, "group", 1))
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


def _grouped_conv(ctx: _Context, node: gs.Node, ax: ChannelAxis | None, group: int, wshape) -> None:
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
            if _unite_parts(ctx, parts, node):
                ctx.add_members(parts[0], CONSUMER, node.inputs[1], node, axis=1)
    out_parts = [ChannelAxis(1, ctx.slice_segments(out, j * out_g, (j + 1) * out_g)) for j in range(group)]
    _unite_parts(ctx, out_parts, node)
    ctx.add_members(out, PRODUCER, node.inputs[1], node, axis=0)
    if bias is not None:
        ctx.add_members(out, PARAM, bias, node, axis=0)
    ctx.set_axis(node.outputs[0], out)


def _unite_parts(ctx: _Context, parts: list[ChannelAxis], node: gs.Node) -> bool:
    """Unite the i-th segment of every part; False (and blocked) if the parts differ in layout."""
    first = parts[0].segments
    for part in parts[1:]:
        if len(part.segments) != len(first) or any(
            (a.space is None) != (b.space is None) or a.block != b.block or ctx.seg_len(a) != ctx.seg_len(b)
            for a, b in zip(part.segments, first)
        ):
            for p in parts:
                ctx.block(p, node, "conv groups do not carry channels in the same layout")
            return False
    for part in parts[1:]:
        for a, b in zip(part.segments, first):
            if a.space is not None:
                ctx.union(a.space, b.space, node)
    return True


def _linear_out(ctx: _Context, node: gs.Node, weight: gs.Tensor, out_axis_of_weight: int,
                y: gs.Tensor, y_axis: int, n_out: int) -> ChannelAxis:
    out = ChannelAxis(y_axis, ctx.new_spaces(n_out, node))
    ctx.add_members(out, PRODUCER, weight, node, axis=out_axis_of_weight)
    return out


@rule("Gemm")
def _gemm(ctx: _Context, node: gs.Node):
    a, b = node.inputs[0], node.inputs[1]
    ax = ctx.axis_of(a)
    weight = ctx.const(b)
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if weight is None or ctx.const(a) is not None or int(_attr(node, "transA", 0)):
        ctx.block(ax, node, "Gemm without a constant weight B (or with transA) is not supported")
        return [0]
    trans_b = int(_attr(node, "transB", 0))
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    if ax is not None:
        if ax.axis != 1:
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
def _matmul(ctx: _Context, node: gs.Node):
    a, b = node.inputs
    ax = ctx.axis_of(a)
    weight = ctx.const(b)
    rank = ctx.rank(a)
    if weight is None or weight.ndim != 2 or ctx.const(a) is not None or rank is None:
        ctx.block(ax, node, "MatMul without a constant 2-D right operand is not supported")
        ctx.block(ctx.axis_of(b), node, "MatMul between two computed tensors mixes channels")
        return [0, 1]
    if ax is not None:
        if ax.axis != rank - 1:
            ctx.block(ax, node, "MatMul reads channels on a non-contracted axis")
        else:
            ctx.add_members(ax, CONSUMER, b, node, axis=0)
    y_rank = ctx.rank(node.outputs[0]) or max(rank, 2)
    out = _linear_out(ctx, node, b, 1, node.outputs[0], y_rank - 1, weight.shape[1])
    ctx.set_axis(node.outputs[0], out)
    return [0]


@rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is None:
        return [0]
    params = [t for t in node.inputs[1:] if t.name]
    extra_outputs = [o for o in node.outputs[1:] if o.outputs]
    if ax.axis != 1 or any(ctx.const(t) is None for t in params) or extra_outputs \
            or int(_attr(node, "training_mode", 0)):
        ctx.block(ax, node, "normalisation in training mode or with computed parameters")
        return [0]
    for t in params:
        ctx.add_members(ax, PARAM, t, node, axis=0)
    ctx.set_axis(node.outputs[0], ax)
    return [0]


_UNARY = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Gelu Elu Selu Celu Softplus Softsign Mish "
    "Erf Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Sin Cos ThresholdedRelu Identity "
    "Cast Swish Relu6"
).split()


@rule(*_UNARY)
def _unary(ctx: _Context, node: gs.Node):
    ctx.set_axis(node.outputs[0], ctx.axis_of(node.inputs[0]))
    return [0]


@rule("Dropout")
def _dropout(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        ctx.block(ax, node, "Dropout mask output is used")
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("Clip")
def _clip(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    for bound in node.inputs[1:]:
        if bound.name and (ctx.const(bound) is None or ctx.const(bound).size != 1):
            ctx.block(ax, node, "Clip bounds are not scalar constants")
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is not None and ax.axis != 1:
        ctx.block(ax, node, "pooling input channels are not on axis 1")
        return [0]
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        ctx.block(ax, node, "MaxPool indices output is used (indices encode channel offsets)")
        return [0]
    ctx.set_axis(node.outputs[0], ax)
    return [0]


@rule("PRelu")
def _prelu(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is not None:
        _elementwise_constant(ctx, node, ax, node.inputs[1], ctx.rank(node.inputs[0]))
    ctx.set_axis(node.outputs[0], ax)
    return [0]


def _elementwise_constant(ctx: _Context, node: gs.Node, ax: ChannelAxis, tensor: gs.Tensor,
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
    if ctx.const(tensor) is not None and shape[pos] == ctx.total(ax):
        ctx.add_members(ax, PARAM, tensor, node, axis=pos)
        return
    ctx.block(ax, node, f"element-wise operand '{tensor.name}' has its own values along the channel axis")


@rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow")
def _elementwise(ctx: _Context, node: gs.Node):
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
    if any(ax.axis + out_rank - ranks[i] != out_axis for i, ax in tracked[1:]):
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
    out = ChannelAxis(out_axis, tuple(seg for (seg,) in pieces[0]))
    for i, t in enumerate(node.inputs):
        if all(i != j for j, _ in tracked):
            _elementwise_constant(ctx, node, out, t, out_rank)
    ctx.set_axis(node.outputs[0], out)
    return [i for i, _ in tracked]


def _int_operand(ctx: _Context, node: gs.Node, attr: str, index: int,
                 absent: list[int] | None) -> list[int] | None:
    """An int list that old opsets store as attribute ``attr`` and new ones as input ``index``
    (Reduce/Squeeze/Unsqueeze ``axes``, Split ``split``, Pad ``pads``).

    None when it is computed at run time; ``absent`` when neither is given.
    """
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        val = ctx.const(node.inputs[index])
        return None if val is None else [int(v) for v in val.reshape(-1)]
    return absent


@rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
      "ReduceProd", "ReduceSumSquare")
def _reduce(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    axes = _int_operand(ctx, node, "axes", 1, absent=[])
    if axes is None or rank is None:
        ctx.block(ax, node, "reduction axes are not known")
        return [0]
    axes = [_norm_axis(a, rank) for a in axes]
    if not axes and not int(_attr(node, "noop_with_empty_axes", 0)):
        axes = list(range(rank))
    if ax.axis in axes:
        ctx.block(ax, node, "reduces over the channel axis")
        return [0]
    keep = int(_attr(node, "keepdims", 1))
    new_axis = ax.axis if keep else ax.axis - sum(1 for a in axes if a < ax.axis)
    ctx.set_axis(node.outputs[0], ChannelAxis(new_axis, ax.segments))
    return [0]


def _static(dims: list) -> bool:
    return all(isinstance(d, int) for d in dims)


def _tail_block(ax: ChannelAxis, tail: int, new_tail: int) -> tuple[Segment, ...] | None:
    """Segments after moving ``tail``/``new_tail`` inner positions into the axis."""
    segs = []
    for s in ax.segments:
        if (s.block * tail) % new_tail:
            return None
        segs.append(Segment(s.space, s.block * tail // new_tail))
    return tuple(segs)


@rule("Flatten")
def _flatten(ctx: _Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    shape = ctx.shape(x)
    if ax is None:
        return [0]
    if shape is None:
        ctx.block(ax, node, "Flatten input shape is unknown")
        return [0]
    split = _norm_axis(int(_attr(node, "axis", 1)), len(shape))
    inner = shape[ax.axis + 1:]
    between = shape[split:ax.axis]
    if ax.axis < split or not _static(inner) or not _static(between) or any(d != 1 for d in between):
        ctx.block(ax, node, "Flatten does not keep channels in contiguous blocks")
        return [0]
    segs = _tail_block(ax, int(np.prod(inner)) if inner else 1, 1)
    ctx.set_axis(node.outputs[0], ChannelAxis(1, segs))
    return [0]


def _same_leading(a: list, b: list) -> bool:
    if a == b:
        return True
    return _static(a) and _static(b) and int(np.prod(a)) == int(np.prod(b))


@rule("Reshape")
def _reshape(ctx: _Context, node: gs.Node):
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
    entries = _shape_entries(ctx, target)
    resolved = None if entries is None or ishape is None else _resolve_target(ctx, entries, x, ishape)
    if computed:
        tval = None if resolved is None else np.array(resolved[0])
    if resolved is not None and (oshape is None or len(oshape) != len(resolved[1]) or not _static(oshape)):
        if int(_attr(node, "allowzero", 0)) and 0 in resolved[0]:
            resolved = None
        else:
            oshape = [r if r is not None else o for o, r in zip(oshape or resolved[1], resolved[1])]
    if ishape is None or oshape is None or tval is None:
        ctx.block(ax, node, "Reshape target shape is computed at run time")
        return [0]
    inner = ishape[ax.axis + 1:]
    total = ctx.total(ax)
    if not _static(inner):
        ctx.block(ax, node, "Reshape of a tensor with dynamic inner dimensions")
        return [0]
    tail = int(np.prod(inner)) if inner else 1
    tval = [int(v) for v in tval.reshape(-1)]
    allowzero = int(_attr(node, "allowzero", 0))
    for j in range(len(oshape)):
        otail = oshape[j + 1:]
        if not _static(otail) or not isinstance(oshape[j], int):
            continue
        new_tail = int(np.prod(otail)) if otail else 1
        if oshape[j] * new_tail != total * tail or not _same_leading(ishape[:ax.axis], oshape[:j]):
            continue
        segs = _tail_block(ax, tail, new_tail)
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
        if entry > 0:
            if computed:
                ctx.block(ax, node, "channel count is hard-coded in a computed Reshape target")
                return [0]
            ctx.fixes.append(AxisFix("shape", node.name, y.name, j))
        ctx.set_axis(y, ChannelAxis(j, segs))
        return [0]
    ctx.block(ax, node, SPLIT_REASON)
    return [0]


#: A Reshape that takes the channel axis apart.  Attention heads ([B, S, C]
#: -> [B, S, heads, C/heads]) and channel shuffles (ShuffleNet) do this; a
#: head-level group would need the head count in the Reshape constants to
#: follow, which is not implemented: such channels are left as they are.
SPLIT_REASON = "Reshape splits the channel axis into several axes (attention heads, channel shuffle)"

#: An entry of a computed shape that is read at run time from a non-channel dim.
DYNAMIC = -(2**62)


def _shape_entries(ctx: _Context, tensor: gs.Tensor, depth: int = 0) -> list | None:
    """Entries of a 1-D int tensor computed from constants and Shape reads.

    Each entry is an int (a constant) or ``(tensor, dim)``: the size of
    ``tensor``'s dimension ``dim`` read at run time.  None when the
    computation is not understood.
    """
    val = ctx.const(tensor)
    if val is not None:
        return [int(v) for v in val.reshape(-1)]
    if depth > 8 or not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "Concat" and int(_attr(node, "axis", 0)) in (0, -1):
        out: list = []
        for t in node.inputs:
            part = _shape_entries(ctx, t, depth + 1)
            if part is None:
                return None
            out += part
        return out
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape") and node.inputs:
        return _shape_entries(ctx, node.inputs[0], depth + 1)
    if node.op == "Shape":
        rank = ctx.rank(node.inputs[0])
        if rank is None:
            return None
        start = _norm_axis(int(_attr(node, "start", 0)), rank)
        end = _attr(node, "end")
        end = rank if end is None else min(_norm_axis(int(end), rank), rank)
        return [(node.inputs[0], d) for d in range(start, end)]
    if node.op == "Gather" and int(_attr(node, "axis", 0)) == 0:
        src, idx = _shape_entries(ctx, node.inputs[0], depth + 1), ctx.const(node.inputs[1])
        if src is None or idx is None or idx.ndim > 1:
            return None
        return [src[int(i)] for i in idx.reshape(-1)]
    if node.op == "Slice":
        src, params = _shape_entries(ctx, node.inputs[0], depth + 1), _slice_params(ctx, node)
        if src is None or params is None or len(params[0]) != 1:
            return None
        return src[slice(params[0][0], params[1][0], params[3][0])]
    return None


def _resolve_target(ctx: _Context, entries: list, x: gs.Tensor, ishape: list) -> tuple[list, list] | None:
    """(target values with run-time reads as DYNAMIC, output shape) of a computed Reshape target."""
    tval, oshape = [], []
    for i, e in enumerate(entries):
        if isinstance(e, tuple):
            t, d = e
            ax = ctx.axis_of(t)
            if ax is not None and ax.axis == d:
                return None  # reads a channel count
            shp = ctx.shape(t)
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
        d_static = int(np.prod(den or [1])) if _static(den) else 0
        if d_static and not sym and n_static % d_static == 0:
            oshape[tval.index(-1)] = n_static // d_static
        elif d_static and len(sym) == 1 and sym[0] is not None and n_static == d_static:
            oshape[tval.index(-1)] = sym[0]  # e.g. the batch: [-1, C*H*W]
    return tval, oshape


@rule("Shape")
def _shape(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    if rank is None:
        ctx.block(ax, node, "Shape of a tensor of unknown rank")
        return [0]
    start = _norm_axis(int(_attr(node, "start", 0)), rank)
    end = _attr(node, "end")
    end = rank if end is None else min(_norm_axis(int(end), rank), rank)
    if start <= ax.axis < end:
        ctx.shape_vec[node.outputs[0].name] = (ax.axis - start, ax)
    return [0]


def _shape_read(ctx: _Context, node: gs.Node, picked: list[int] | None) -> None:
    """A Gather/Slice of a Shape output: reading the channel count blocks the channels."""
    pos, ax = ctx.shape_vec[node.inputs[0].name]
    if picked is None or pos in picked:
        ctx.block(ax, node, "the channel count is read at run time (Shape)")


@rule("Gather")
def _gather(ctx: _Context, node: gs.Node):
    data, idx = node.inputs[0], node.inputs[1]
    ival = ctx.const(idx)
    if data.name in ctx.shape_vec:
        n = len(ctx.shape(data) or []) and (ctx.shape(data)[0] or 0)
        picked = None if ival is None else [int(i) + n if i < 0 else int(i) for i in ival.reshape(-1)]
        _shape_read(ctx, node, picked)
        return [0]
    ax = ctx.axis_of(data)
    rank = ctx.rank(data)
    if ax is None:
        return [0]
    axis = _norm_axis(int(_attr(node, "axis", 0)), rank) if rank is not None else None
    if axis is None or axis == ax.axis or ival is None:
        ctx.block(ax, node, "Gather along the channel axis (or with computed indices)")
        return [0]
    new_axis = ax.axis if ax.axis < axis else ax.axis - 1 + ival.ndim
    ctx.set_axis(node.outputs[0], ChannelAxis(new_axis, ax.segments))
    return [0]


@rule("Pad")
def _pad(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    pads = _int_operand(ctx, node, "pads", 1, absent=None)
    axes = list(range(rank)) if rank is not None else None
    if len(node.inputs) > 3 and node.inputs[3].name:
        aval = ctx.const(node.inputs[3])
        axes = None if aval is None or rank is None else [_norm_axis(int(a), rank) for a in aval.reshape(-1)]
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
def _resize(ctx: _Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    if ax is None:
        return [0]
    if "axes" in node.attrs and ax.axis not in [_norm_axis(int(a), ctx.rank(x) or 0) for a in node.attrs["axes"]]:
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


@rule("LayerNormalization", "GroupNormalization", "LpNormalization", "LRN", "Softmax", "LogSoftmax", "Hardmax")
def _normalise(ctx: _Context, node: gs.Node):
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
        start = _norm_axis(int(_attr(node, "axis", -1)), rank)
        normalised = range(start, rank)
    elif node.op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
        default = -1 if node.op == "LpNormalization" or _opset(ctx) >= 13 else 1
        axis = _norm_axis(int(_attr(node, "axis", default)), rank)
        normalised = [axis] if node.op == "LpNormalization" or _opset(ctx) >= 13 else range(axis, rank)
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


@rule("Transpose")
def _transpose(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    if ax is None:
        return [0]
    perm = _attr(node, "perm")
    rank = ctx.rank(node.inputs[0])
    if perm is None:
        if rank is None:
            ctx.block(ax, node, "Transpose of unknown rank")
            return [0]
        perm = list(range(rank))[::-1]
    perm = list(perm)
    ctx.set_axis(node.outputs[0], ChannelAxis(perm.index(ax.axis), ax.segments))
    return [0]


@rule("Squeeze")
def _squeeze(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.inputs[0])
    if ax is None:
        return [0]
    axes = _int_operand(ctx, node, "axes", 1, absent=None)
    if axes is None or rank is None:
        ctx.block(ax, node, "Squeeze axes are not known")
        return [0]
    axes = [_norm_axis(a, rank) for a in axes]
    if ax.axis in axes:
        ctx.block(ax, node, "Squeeze removes the channel axis")
        return [0]
    ctx.set_axis(node.outputs[0], ChannelAxis(ax.axis - sum(1 for a in axes if a < ax.axis), ax.segments))
    return [0]


@rule("Unsqueeze")
def _unsqueeze(ctx: _Context, node: gs.Node):
    ax = ctx.axis_of(node.inputs[0])
    rank = ctx.rank(node.outputs[0])
    if ax is None:
        return [0]
    axes = _int_operand(ctx, node, "axes", 1, absent=None)
    if axes is None or rank is None:
        ctx.block(ax, node, "Unsqueeze axes are not known")
        return [0]
    axes = sorted(_norm_axis(a, rank) for a in axes)
    pos = ax.axis
    for a in axes:
        if a <= pos:
            pos += 1
    ctx.set_axis(node.outputs[0], ChannelAxis(pos, ax.segments))
    return [0]


@rule("Concat")
def _concat(ctx: _Context, node: gs.Node):
    rank = ctx.rank(node.outputs[0])
    tracked = [(i, ctx.axis_of(t)) for i, t in enumerate(node.inputs) if ctx.axis_of(t) is not None]
    if not tracked:
        return []
    if rank is None:
        for _, ax in tracked:
            ctx.block(ax, node, "Concat of unknown rank")
        return [i for i, _ in tracked]
    cat = _norm_axis(int(_attr(node, "axis")), rank)
    if any(ax.axis != cat for _, ax in tracked):
        # Concatenation along another axis joins channels like an element-wise op.
        return _elementwise(ctx, node)
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


def _opset(ctx: _Context) -> int:
    return int(getattr(ctx.graph, "opset", None) or 13)


@rule("Split")
def _split(ctx: _Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    rank = ctx.rank(x)
    if ax is None:
        return [0]
    if rank is None:
        ctx.block(ax, node, "Split of unknown rank")
        return [0]
    axis = _norm_axis(int(_attr(node, "axis", 0)), rank)
    if axis != ax.axis:
        for y in node.outputs:
            ctx.set_axis(y, ax)
        return [0]
    total = ctx.total(ax)
    n = len(node.outputs)
    chunk = -(-total // n)  # no sizes given (opset 18 num_outputs): equal parts, the last may be smaller
    sizes = _int_operand(ctx, node, "split", 1, absent=[chunk] * (n - 1) + [total - chunk * (n - 1)])
    if sizes is None or sum(sizes) != total or len(sizes) != len(node.outputs):
        ctx.block(ax, node, "Split sizes along the channel axis are not known")
        return [0]
    bounds = [int(v) for v in np.cumsum([0, *sizes])]
    ok = ctx.align(ax, bounds[1:-1])
    if ok is None:
        ctx.block(ax, node, "Split cuts through the positions of one channel")
        return [0]
    if not ok:
        ctx.block(ax, node, "waiting for cuts")
        return [0]
    parts = tuple(ctx.slice_segments(ax, a, b) for a, b in zip(bounds, bounds[1:]))
    ctx.fixes.append(AxisFix("split", node.name, x.name, parts=parts))
    for y, segs in zip(node.outputs, parts):
        ctx.set_axis(y, ChannelAxis(ax.axis, segs))
    return [0]


def _slice_params(ctx: _Context, node: gs.Node) -> tuple | None:
    """(starts, ends, axes, steps) as int lists, from attributes (opset < 10) or constant inputs."""
    if "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    vals = []
    for i in range(1, 5):
        t = node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None
        if t is None:
            vals.append(None)
            continue
        v = ctx.const(t)
        if v is None:
            return None
        vals.append([int(e) for e in v.reshape(-1)])
    starts, ends, axes, steps = vals
    if starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


@rule("Slice")
def _slice(ctx: _Context, node: gs.Node):
    x = node.inputs[0]
    ax = ctx.axis_of(x)
    rank = ctx.rank(x)
    params = _slice_params(ctx, node)
    if x.name in ctx.shape_vec:
        n = (ctx.shape(x) or [None])[0]
        picked = None
        if params is not None and isinstance(n, int) and len(params[0]) == 1:
            picked = list(range(n))[slice(params[0][0], params[1][0], params[3][0])]
        _shape_read(ctx, node, picked)
        return [0]
    if ax is None:
        return [0]
    if params is None or rank is None:
        ctx.block(ax, node, "Slice parameters are computed at run time")
        return [0]
    starts, ends, axes, steps = params
    axes = [_norm_axis(a, rank) for a in axes]
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
    ok = ctx.align(ax, [p for p in (start, end) if 0 < p < total])
    if ok is None:
        ctx.block(ax, node, "Slice cuts through the positions of one channel")
        return [0]
    if not ok:
        ctx.block(ax, node, "waiting for cuts")
        return [0]
    kept = ctx.slice_segments(ax, start, end)
    ctx.fixes.append(AxisFix("slice", node.name, x.name, i, parts=(ctx.slice_segments(ax, 0, start), kept)))
    ctx.set_axis(node.outputs[0], ChannelAxis(ax.axis, kept))
    return [0]


# ---------------------------------------------------------------------------


def _subgraph_tensor_names(node: gs.Node) -> set[str]:
    names: set[str] = set()
    for value in node.attrs.values():
        graphs = value if isinstance(value, list) else [value]
        for g in graphs:
            if isinstance(g, gs.Graph):
                for n in g.nodes:
                    names.update(t.name for t in n.inputs)
    return names


#: Analysis passes before giving up on cuts that keep spreading.
MAX_PASSES = 12


def analyse(graph: gs.Graph) -> Analysis:
    """Find every channel group of ``graph`` (which must be toposorted and shape-inferred).

    Ops that take a channel axis apart (Split, Slice, grouped Conv, a join of
    differently cut tensors) ask for *cuts*: the producers of the spaces
    involved must create one space per part.  Cuts spread to every space
    united with a cut one, so the analysis is repeated with the cuts found so
    far until no new cut appears (a fixpoint; cuts only grow).
    """
    cuts: dict[str, frozenset[int]] = {}
    for _ in range(MAX_PASSES):
        ctx = _analyse_pass(graph, cuts)
        found = ctx.propagated_cuts()
        if all(found[n] <= cuts.get(n, frozenset()) for n in found):
            break
        cuts = {n: frozenset(cuts.get(n, frozenset()) | found.get(n, set())) for n in set(cuts) | set(found)}
    else:
        for space, _ in ctx.requests:
            ctx.block_spaces([space], ctx.origin[space], "channel ranges could not be aligned (too many cuts)")
    return _collect(ctx)


def _analyse_pass(graph: gs.Graph, cuts: dict[str, frozenset[int]]) -> _Context:
    ctx = _Context(graph, cuts)
    for node in graph.nodes:
        rule_fn = RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None
        if rule_fn is None:
            handled: Iterable[int] = []
            reason = (
                f"op {node.op} from domain '{node.domain}' is not understood"
                if node.domain not in ("", "ai.onnx", None)
                else f"op {node.op} is not supported on a channel axis yet"
            )
        else:
            handled = rule_fn(ctx, node)
            reason = f"input used by {node.op} in a way that is not supported"
        handled = set(handled)
        for i, t in enumerate(node.inputs):
            if i not in handled:
                ctx.block(ctx.axis_of(t), node, reason)
            if t.name in ctx.shape_vec and not (i == 0 and node.op in ("Gather", "Slice")):
                ctx.block(ctx.shape_vec[t.name][1], node, "the channel count is read at run time (Shape)")
        for name in _subgraph_tensor_names(node):
            ctx.block(ctx.axes.get(name), node, f"channels are used inside a {node.op} subgraph")
    for out in graph.outputs:
        ctx.block(ctx.axes.get(out.name), f"graph output '{out.name}'", OUTPUT_REASON)
    _check_constant_users(ctx, graph)
    return ctx


def _check_constant_users(ctx: _Context, graph: gs.Graph) -> None:
    """A constant we edit must not also be read by a node that does not expect the edit."""
    tensors = graph.tensors()
    spaces_of: dict[str, set[int]] = {}
    for (constant, _, _), space in ctx.member_key.items():
        spaces_of.setdefault(constant, set()).add(space)
    weights = {m.constant for members in ctx.members for m in members if m.role != PARAM}
    for constant, editors in ctx.constant_users.items():
        tensor = tensors.get(constant)
        readers = {n.name for n in tensor.outputs} if tensor is not None else set()
        if constant not in weights:
            # Per-channel parameters shared by value (dynamo dedupes zero biases
            # into LayerNorm inputs too): the rewrite gives editors private copies.
            continue
        strangers = readers - editors
        # A node that reads a shared weight must expect every slice edited in it: a weight
        # shared by two Convs, one reading channels that cannot be pruned (e.g. the graph
        # input), must not lose input columns because the other Conv's input is pruned.
        slices = ctx.constant_slices.get(constant, {})
        edited = set().union(*slices.values())
        strangers |= {node for node in editors if slices.get(node, set()) != edited}
        if strangers or (tensor is not None and tensor in graph.outputs):
            who = sorted(strangers)[0] if strangers else "graph output"
            ctx.block_spaces(spaces_of[constant], who, f"constant '{constant}' is shared with a node that would not be edited")


def _collect(ctx: _Context) -> Analysis:
    roots: dict[int, int] = {}
    groups: list[Group] = []
    space_group: dict[int, int] = {}
    for s in range(len(ctx.parent)):
        r = ctx.find(s)
        if r not in roots:
            roots[r] = len(groups)
            members = list(dict.fromkeys(ctx.members[r]))
            groups.append(Group(len(groups), ctx.size[r], members, list(ctx.blocked[r]), ctx.origin[r]))
        space_group[s] = roots[r]
    for g in groups:
        if not any(m.role == PRODUCER for m in g.members) and not g.blocked:
            g.blocked.append((g.origin, "no producer weight to edit"))
    return Analysis(groups=groups, axes=dict(ctx.axes), fixes=list(ctx.fixes), space_group=space_group)


def channel_rows(values: np.ndarray, member: Member, size: int) -> np.ndarray:
    """The member's slice of ``values`` as a (channels, features) matrix.

    Row c holds everything the constant stores for channel c: a producer's
    output filter, a consumer's input slice (all blocks), a bias value.
    """
    length = size * member.block
    piece = np.take(values, np.arange(member.offset, member.offset + length), axis=member.axis)
    piece = np.moveaxis(piece, member.axis, 0)
    return piece.reshape(size, -1)
