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

import math
from typing import Iterable

import onnx_graphsurgeon as gs

# The op-family modules register their rules in RULES on import.
from . import attention, concat, elementwise, linear, normalisation, shape  # noqa: F401
from .attention import FUSED_REASON
from .rules import DOMAIN_RULES, RULES, Rule, rule
from .shape import DYNAMIC, SPLIT_REASON, check_count_reads, check_stored_entries
from .spaces import (CONSUMER, DATA_REASONS, FOLDED_OK, KINDS, NEEDS_CALIBRATION, OUTPUT_REASON, PARAM, PRODUCER,
                     Analysis, AxisFix, ChannelAxis, Context, Group, Member, Segment, channel_rows)

__all__ = ["CONSUMER", "DATA_REASONS", "NEEDS_CALIBRATION", "DOMAIN_RULES", "DYNAMIC", "FUSED_REASON", "KINDS", "OUTPUT_REASON", "PARAM", "PRODUCER", "RULES", "SPLIT_REASON", "Analysis", "AxisFix",
           "ChannelAxis", "Context", "Group", "MAX_PASSES", "Member", "Rule", "Segment", "analyse", "channel_rows",
           "rule"]


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
    far until no new cut appears (a fixpoint; cuts only grow).  Attention
    heads work the same way: a Reshape that splits channels into
    ``[heads, head_dim]`` asks the producers for *units* of head_dim
    positions, and the next pass creates spaces whose channels are heads.
    """
    cuts: dict[str, frozenset[int]] = {}
    units: dict[str, int] = {}
    for _ in range(MAX_PASSES):
        ctx = _analyse_pass(graph, cuts, units)
        found = ctx.propagated_cuts()
        new_units = dict(units)
        for n, u in ctx.propagated_units().items():
            new_units[n] = math.lcm(new_units.get(n, 1), u)
        if all(found[n] <= cuts.get(n, frozenset()) for n in found) and new_units == units:
            break
        cuts = {n: frozenset(cuts.get(n, frozenset()) | found.get(n, set())) for n in set(cuts) | set(found)}
        units = new_units
    else:
        for space, _ in (*ctx.requests, *ctx.unit_requests):
            ctx.block_spaces([space], ctx.origin[space], "channel ranges could not be aligned (too many cuts)")
    return _collect(ctx)


def _rule_for(node: gs.Node):
    if node.domain in ("", "ai.onnx", None):
        return RULES.get(node.op)
    return DOMAIN_RULES.get((node.domain, node.op))


def _analyse_pass(graph: gs.Graph, cuts: dict[str, frozenset[int]], units: dict[str, int] | None = None) -> Context:
    ctx = Context(graph, cuts, units)
    for node in graph.nodes:
        rule_fn = _rule_for(node)
        special = [ax for t in node.inputs if (ax := ctx.axis_of(t)) is not None and (ax.outer > 1 or ax.stack)]
        if any(ax.stack for ax in special):
            handled = attention.stacked(ctx, node) if node.op in attention.STACKED_OK else []
            reason = f"{node.op} reads a fused Q/K/V tensor in a way that is not supported"
        elif special and node.op not in FOLDED_OK:
            handled, reason = [], f"{node.op} reads heads folded into a batch axis"
        elif rule_fn is None:
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
    check_stored_entries(ctx, graph)
    check_count_reads(ctx)
    for out in graph.outputs:
        ctx.block(ctx.axes.get(out.name), f"graph output '{out.name}'", OUTPUT_REASON)
    _check_constant_users(ctx, graph)
    return ctx


def _check_constant_users(ctx: Context, graph: gs.Graph) -> None:
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


def _collect(ctx: Context) -> Analysis:
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
    kinds: dict[int, set[str]] = {}
    for s, gid in space_group.items():
        kinds.setdefault(gid, set()).add("head" if ctx.unit[s] > 1 else ctx.kind[s])
    for g in groups:
        found = kinds[g.id]
        # FFN neurons are read by the next linear layer; a per-token projection whose
        # output was blocked before any reader (e.g. an attention output projection cut
        # off from the residual stream) is no FFN hidden layer.
        ffn = found == {"ffn"} and any(m.role == CONSUMER for m in g.members)
        g.kind = next((k for k in ("head", "hidden") if k in found), "ffn" if ffn else "channel")
    for g in groups:
        if not any(m.role == PRODUCER for m in g.members) and all(r in DATA_REASONS for _, r in g.blocked):
            g.blocked.append((g.origin, "no producer weight to edit"))
    return Analysis(groups=groups, axes=dict(ctx.axes), fixes=list(ctx.fixes), space_group=space_group)
