"""Channel spaces, segments, cuts and the results of the analysis.

:class:`Context` is the mutable state of one analysis pass, in four parts:
:class:`Spaces` (union-find of channel spaces and their blocked reasons),
:class:`Cuts` (producer outputs cut into several spaces, aligning segments),
:class:`Members` (the constants each space edits) and, on top, the per-tensor
view (the channel axis of every tensor, Shape reads, values a rule needs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from ..model_io import constant_values

PRODUCER = "producer"  # weights whose output axis creates the channels (averaged)
CONSUMER = "consumer"  # weights whose input axis reads the channels (summed)
PARAM = "param"  # per-channel parameters along the channels (averaged)

#: Why channels that reach a graph output are kept: expected, not a failure.
OUTPUT_REASON = "channels reach a graph output"

#: Why a residual stream (kind "hidden") is left alone without calibration data: a LayerNorm (or
#: RMSNorm) over the pruned axis computes its statistics over the kept channels only, so every
#: kept channel changes too.  The least-squares re-fit of the layers that read the norm's outputs
#: (``--recover lstsq``) needs real inputs to undo that; with data the block is lifted.
NEEDS_CALIBRATION = "needs calibration data (LayerNorm over the hidden size)"
#: Block reasons that calibration data lifts (see :meth:`Analysis.lift_data_blocks`).
DATA_REASONS = frozenset({NEEDS_CALIBRATION})

#: What a group's channels are: conv channels or plain neurons, attention heads
#: (blocks of head_dim Q/K/V rows and output-projection columns), neurons of a
#: linear layer applied per token (transformer FFN), the residual width.
KINDS = ("channel", "head", "ffn", "hidden")

#: Ops whose rules handle a channel axis with ``outer`` > 1 (attention with
#: heads folded into the batch axis); any other op reading one blocks.
FOLDED_OK = frozenset({"Transpose", "Reshape", "Mul", "Div", "Add", "Sub", "Where", "MatMul", "Softmax", "Cast",
                       "Identity", "Dropout"})


@dataclass(frozen=True)
class Segment:
    """``block`` positions per channel of ``space``; ``space=None``: fixed positions."""

    space: int | None
    block: int


@dataclass(frozen=True)
class ChannelAxis:
    """The channels on ``axis``: ``segments`` in order, repeated ``outer`` times.

    ``outer`` > 1 when a Reshape folded leading dims into the channel axis
    (``[B, heads, ...] -> [B * heads, ...]``, as exporters write attention);
    only the ops in :data:`FOLDED_OK` may read such an axis.
    """

    axis: int
    segments: tuple[Segment, ...]
    outer: int = 1
    #: (axis, segments per index) when a fused QKV was reshaped to ``[..., 3, C]``: index i along
    #: that axis carries the i-th part; ``segments`` is the first part (all parts are united).
    stack: tuple | None = None


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
    ``"split"`` (the split sizes of a Split: one size per entry of ``parts``),
    ``"slice"`` (entry ``index`` of a Slice's starts/ends: ``parts`` is
    (segments before the slice, segments kept by the slice)) or ``"iota"``
    (the indices of a Gather that takes every channel in order: ``0..n-1``
    along axis ``index`` of the indices).
    """

    kind: str
    node: str
    tensor: str
    index: int = 0
    parts: tuple = ()  # tuple of segment tuples, for "split" and "slice"
    input: int = 1  # for "shape": which input of ``node`` holds the constant (Resize sizes: 3)
    #: for "shape": a count the run time multiplies (``batch * heads``): the value written is the
    #: new size of the axis' segments times ``scale`` (0: the whole new axis size)
    scale: int = 0


@dataclass
class Group:
    """Channels that are kept or removed together."""

    id: int
    size: int
    members: list[Member]
    blocked: list[tuple[str, str]]  # (node name, reason)
    origin: str  # first producer node, for reports
    kind: str = "channel"  # one of KINDS

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def needs_data(self) -> bool:
        """Blocked only for reasons that calibration data lifts."""
        return bool(self.blocked) and all(r in DATA_REASONS for _, r in self.blocked)

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

    def lift_data_blocks(self) -> None:
        """Calibration data is given: drop the block reasons it lifts (:data:`DATA_REASONS`) from every group."""
        for g in self.groups:
            g.blocked = [(n, r) for n, r in g.blocked if r not in DATA_REASONS]

    def prunable(self, selected=None) -> list[Group]:
        """The groups a run may prune: prunable ones, restricted to the ``selected`` ids when given."""
        return [g for g in self.groups if g.prunable and (selected is None or g.id in selected)]


class Spaces:
    """Union-find of channel spaces: size, origin, members and blocked reasons per class.

    A channel of a space covers ``unit`` consecutive positions of its
    producer's output: 1 for a channel or neuron, ``head_dim`` for an
    attention head (the Q/K/V rows of one head are kept or removed together).
    ``kind`` says what a channel is (see :data:`KINDS`).
    """

    def __init__(self):
        self.source: list[tuple[str, int]] = []  # space -> (producer node, first position)
        self.unit: list[int] = []  # space -> producer positions per channel
        self.kind: list[str] = []  # space -> kind of its producer ("channel", "ffn")
        self.parent: list[int] = []
        self.size: list[int] = []
        self.origin: list[str] = []
        self.members: list[list[Member]] = []
        self.blocked: list[list[tuple[str, str]]] = []

    def new_space(self, size: int, node: gs.Node, base: int = 0, unit: int = 1, kind: str = "channel") -> int:
        self.unit.append(unit)
        self.kind.append(kind)
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.origin.append(node.name)
        self.members.append([])
        self.blocked.append([])
        self.source.append((node.name, base))
        return len(self.parent) - 1

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

    def mark(self, ax: ChannelAxis, kind: str) -> None:
        """Record that the channels on ``ax`` are of ``kind`` (e.g. normalised by a LayerNorm: hidden)."""
        for s in ax.segments:
            if s.space is not None:
                self.kind[s.space] = kind

    # -- segments of a channel axis -------------------------------------------
    def seg_len(self, seg: Segment) -> int:
        return self.size[self.find(seg.space)] * seg.block if seg.space is not None else seg.block

    def total(self, ax: ChannelAxis) -> int:
        return sum(self.size[self.find(s.space)] * s.block if s.space is not None else s.block for s in ax.segments)

    def segment_offsets(self, ax: ChannelAxis) -> list[tuple[Segment, int]]:
        out, pos = [], 0
        for seg in ax.segments:
            out.append((seg, pos))
            pos += self.size[self.find(seg.space)] * seg.block if seg.space is not None else seg.block
        return out


class Cuts(Spaces):
    """Producer outputs cut into several spaces, and the alignment of segments to positions.

    ``cuts`` (producer node -> positions where its output is cut into
    separate spaces) were found by earlier passes: Split/Slice, grouped Conv,
    joins of differently cut tensors.  ``requests`` are the cuts asked for in
    this pass.
    """

    def __init__(self, cuts: dict[str, frozenset[int]] | None = None, units: dict[str, int] | None = None):
        super().__init__()
        self.cuts = cuts or {}
        self.units = units or {}  # producer node -> positions per channel (attention heads)
        self.requests: list[tuple[int, int]] = []  # (space, position) cuts asked for in this pass
        self.unit_requests: list[tuple[int, int]] = []  # (space, factor) coarser channels asked for

    def new_spaces(self, size: int, node: gs.Node, cuts: Iterable[int] = (),
                   kind: str = "channel") -> tuple[Segment, ...]:
        """The segments of a producer's output axis: one space per part between cuts.

        With a unit u asked for by an earlier pass (heads of ``u`` positions),
        each space has size/u channels of block u; a unit that does not divide
        every part is ignored (the op that asked for it then blocks).
        """
        points = sorted({c for c in (*self.cuts.get(node.name, ()), *cuts) if 0 < c < size})
        bounds = [0, *points, size]
        unit = self.units.get(node.name, 1)
        if any(b % unit for b in bounds):
            unit = 1
        return tuple(Segment(self.new_space((b - a) // unit, node, a, unit, kind), unit)
                     for a, b in zip(bounds, bounds[1:]))

    def request_unit(self, space: int, factor: int) -> None:
        """Ask the producers of ``space``'s class for channels of ``factor`` times their current unit."""
        self.unit_requests.append((space, factor))

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

    def aligned(self, ax: ChannelAxis, positions: Iterable[int], node: gs.Node) -> bool:
        """:meth:`align`, blocking ``ax`` (for ``node``) unless the positions already are boundaries."""
        ok = self.align(ax, positions)
        if not ok:
            self.block(ax, node, f"{node.op} cuts through the positions of one channel" if ok is None
                       else "waiting for cuts")
        return bool(ok)

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
                out.setdefault(node, set()).add(base + pos * self.unit[t])
        return out

    def propagated_units(self) -> dict[str, int]:
        """Units requested in this pass, spread to every space united with the requesting one."""
        classes: dict[int, list[int]] = {}
        for s in range(len(self.parent)):
            classes.setdefault(self.find(s), []).append(s)
        out: dict[str, int] = {}
        for space, factor in self.unit_requests:
            for t in classes[self.find(space)]:
                node = self.source[t][0]
                out[node] = math.lcm(out.get(node, 1), self.unit[t] * factor)
        return out


class Members(Cuts):
    """The constants edited for each space, and who edits which slice of each constant."""

    def __init__(self, cuts: dict[str, frozenset[int]] | None = None, units: dict[str, int] | None = None):
        super().__init__(cuts, units)
        self.member_key: dict[tuple[str, int, int], int] = {}  # (constant, axis, offset) -> space
        self.constant_users: dict[str, set[str]] = {}  # constant -> nodes that edit it
        # constant -> node -> (axis, offset, block) slices that node edits
        self.constant_slices: dict[str, dict[str, set[tuple[int, int, int]]]] = {}

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


class Context(Members):
    """Mutable state of one analysis pass; rules talk to it.

    Adds to the spaces, cuts and members the per-tensor view: the channel axis
    of every tensor, Shape outputs that hold a channel count, and the fixes.
    """

    def __init__(self, graph: gs.Graph, cuts: dict[str, frozenset[int]] | None = None,
                 units: dict[str, int] | None = None):
        super().__init__(cuts, units)
        self.graph = graph
        # Output of a Shape op that includes a channel axis -> (position of
        # the channel count in the vector, the channel axis).  Only reads of
        # other positions are allowed (see the Gather and Slice rules).
        self.shape_vec: dict[str, tuple[int, ChannelAxis]] = {}
        self.axes: dict[str, ChannelAxis] = {}
        self.fixes: list[AxisFix] = []
        # (node, input, element) of a stored shape entry -> the Reshapes (and axes) whose count it holds
        self.stored_entries: dict[tuple[str, int, int], list] = {}
        self.dims: dict[str, list[int]] = {}  # tensor -> its dims, symbols as primes (see coupling.dims)
        # Gather/Slice nodes that read a channel count from a Shape, and the Reshapes whose
        # target takes such a read as their own channel count (it then follows the pruning)
        self.count_reads: list[tuple[gs.Node, ChannelAxis]] = []
        self.count_users: set[str] = set()

    def unite_parts(self, parts: list[ChannelAxis], node: gs.Node,
                    reason: str = "conv groups do not carry channels in the same layout") -> bool:
        """Unite the i-th segment of every part; False (and blocked) if the parts differ in layout."""
        first = parts[0].segments
        for part in parts[1:]:
            if len(part.segments) != len(first) or any(
                (a.space is None) != (b.space is None) or a.block != b.block or self.seg_len(a) != self.seg_len(b)
                for a, b in zip(part.segments, first)
            ):
                for p in parts:
                    self.block(p, node, reason)
                return False
        for part in parts[1:]:
            for a, b in zip(part.segments, first):
                if a.space is not None:
                    self.union(a.space, b.space, node)
        return True

    def axis_of(self, tensor: gs.Tensor) -> ChannelAxis | None:
        return self.axes.get(tensor.name) if tensor is not None else None

    def set_axis(self, tensor: gs.Tensor, ax: ChannelAxis | None) -> None:
        if ax is not None and ax.segments and any(s.space is not None for s in ax.segments):
            self.axes[tensor.name] = ax

    @staticmethod
    def const(tensor: gs.Tensor) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            return constant_values(tensor)  # not cached in the graph: the loaded model keeps the one copy
        return None

    @staticmethod
    def shape(tensor: gs.Tensor) -> list | None:
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        if tensor.shape is None:
            return None
        return [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else None) for d in tensor.shape]

    def rank(self, tensor: gs.Tensor) -> int | None:
        shp = self.shape(tensor)
        return None if shp is None else len(shp)


def channel_rows(values: np.ndarray, member: Member, size: int) -> np.ndarray:
    """The member's slice of ``values`` as a (channels, features) matrix.

    Row c holds everything the constant stores for channel c: a producer's
    output filter, a consumer's input slice (all blocks), a bias value.
    """
    length = size * member.block
    piece = np.take(values, np.arange(member.offset, member.offset + length), axis=member.axis)
    piece = np.moveaxis(piece, member.axis, 0)
    return piece.reshape(size, -1)
