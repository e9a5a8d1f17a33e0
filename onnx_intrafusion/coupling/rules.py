"""The rule table and the readers of node operands that rules share.

A rule says how channels pass through one op type and which constants the op
owns along the channel axis.  It returns the indices of the inputs whose
channels it handled; channels on any other input are blocked.
"""

from __future__ import annotations

from typing import Callable, Iterable

import onnx_graphsurgeon as gs

from .spaces import Context

Rule = Callable[[Context, gs.Node], Iterable[int]]
RULES: dict[str, Rule] = {}
#: Rules of ops from other domains, keyed by (domain, op type).
DOMAIN_RULES: dict[tuple[str, str], Rule] = {}


def rule(*ops: str, domain: str = ""):
    def register(fn: Rule) -> Rule:
        for op in ops:
            if domain:
                DOMAIN_RULES[(domain, op)] = fn
            else:
                RULES[op] = fn
        return fn

    return register


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def opset(ctx: Context) -> int:
    return int(getattr(ctx.graph, "opset", None) or 13)


def int_operand(ctx: Context, node: gs.Node, attr: str, index: int,
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


def static(dims: list) -> bool:
    return all(isinstance(d, int) for d in dims)


def slice_params(ctx: Context, node: gs.Node) -> tuple | None:
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
