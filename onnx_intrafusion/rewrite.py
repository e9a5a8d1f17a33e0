"""Stage 5: apply channel maps to the graph.

One mechanism serves every plan and every member: along the member's axis,
the positions of the group's channels are multiplied by the map's k x C matrix
(``total`` for consumers, ``average`` for producers and per-channel
parameters).  Plain pruning is the special case of a 0/1 matrix.  Afterwards
the values that store a channel count (Reshape shape constants, the ``group``
attribute of depthwise Convs) are set to the new axis sizes.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
from scipy import sparse

from .coupling import CONSUMER, Analysis
from .plans import ChannelMap


def _span(values: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    """``values[start:stop]`` along ``axis``, as a view (no copy)."""
    index = [slice(None)] * values.ndim
    index[axis] = slice(start, stop)
    return values[tuple(index)]


#: Weights larger than this (as float64) are mixed in blocks (see :func:`_mix`).
MIX_BLOCK_BYTES = 64 * 2**20


def _mix(matrix: np.ndarray, part: np.ndarray) -> np.ndarray:
    """``matrix @ part`` in float64 over the first axis of ``part``.

    Channel maps are sparse (a selection has one 1 per row; an exact OT plan
    has at most C + k - 1 non-zeros), so a sparse product does O(nnz) work per
    column instead of O(k C) of a dense one.  The sums are the same up to the
    order of float64 additions.  A large ``part`` is mixed in blocks along its
    longest other axis: no float64 copy of the whole weight (VGG-16's first
    classifier layer: 822 MB) besides the result; every output value is the
    same sum as without blocks.
    """
    if part.ndim < 2 or part.size * 8 <= MIX_BLOCK_BYTES:
        return _mix_whole(matrix, part)
    if not sparse.issparse(matrix) and np.count_nonzero(matrix) <= 0.25 * matrix.size:
        matrix = sparse.csr_matrix(matrix)
    axis = 1 + int(np.argmax(part.shape[1:]))
    step = max(1, MIX_BLOCK_BYTES // (part.size // part.shape[axis] * 8))
    out = np.empty((matrix.shape[0], *part.shape[1:]))
    for start in range(0, part.shape[axis], step):
        index = [slice(None)] * part.ndim
        index[axis] = slice(start, start + step)
        out[tuple(index)] = _mix_whole(matrix, part[tuple(index)])
    return out


def _mix_whole(matrix: np.ndarray, part: np.ndarray) -> np.ndarray:
    flat = part.reshape(part.shape[0], -1)
    if sparse.issparse(matrix):
        out = np.asarray(matrix @ flat.astype(np.float64, copy=False))
    elif np.count_nonzero(matrix) <= 0.25 * matrix.size:
        out = np.asarray(sparse.csr_matrix(matrix) @ flat.astype(np.float64, copy=False))
    else:
        out = matrix @ flat.astype(np.float64, copy=False)
    return out.reshape(matrix.shape[0], *part.shape[1:])


def _apply_axis(values: np.ndarray, axis: int, pieces: list[tuple[int, int, np.ndarray]]) -> np.ndarray:
    """Replace each (offset, block, matrix) piece of ``axis`` by ``matrix`` applied to its channels."""
    chunks, pos = [], 0
    length = values.shape[axis]
    for offset, block, matrix in sorted(pieces, key=lambda p: p[0]):
        if offset < pos:
            raise AssertionError("overlapping channel ranges on one constant")  # analysis bug
        if offset > pos:
            chunks.append(_span(values, axis, pos, offset))
        size = matrix.shape[1]
        part = np.moveaxis(_span(values, axis, offset, offset + size * block), axis, 0)
        rest = part.shape[1:]
        part = part.reshape(size, block, *rest)
        mixed = _mix(matrix, part).reshape(matrix.shape[0] * block, *rest)
        chunks.append(np.moveaxis(mixed, 0, axis))
        pos = offset + size * block
    if pos < length:
        chunks.append(_span(values, axis, pos, length))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=axis)


def new_axis_size(analysis: Analysis, maps: dict[int, ChannelMap], tensor: str) -> int:
    """Size of ``tensor``'s channel axis after the maps are applied."""
    ax = analysis.axes[tensor]
    return segments_size(analysis, maps, ax.segments) * ax.outer


def segments_size(analysis: Analysis, maps: dict[int, ChannelMap], segments) -> int:
    """Positions taken by ``segments`` after the maps are applied."""
    total = 0
    for seg in segments:
        if seg.space is None:
            total += seg.block
        else:
            gid = analysis.space_group[seg.space]
            keep = maps[gid].keep if gid in maps else analysis.groups[gid].size
            total += keep * seg.block
    return total


def apply_maps(graph: gs.Graph, analysis: Analysis, maps: dict[int, ChannelMap]) -> None:
    """Edit ``graph`` in place so that each group in ``maps`` has its new channels.

    Every map given is applied, an identity map too: the planner leaves
    unchanged groups out, and an identity plan on every group is how the tests
    check that the rewrite itself is exact.
    """
    tensors = graph.tensors()
    # constant -> node -> axis -> offset -> (offset, block, matrix)
    edits: dict[str, dict[str, dict[int, dict[int, tuple]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for gid, cmap in maps.items():
        group = analysis.groups[gid]
        if not group.prunable:
            raise AssertionError(f"group {gid} is blocked and cannot be rewritten")
        for m in group.members:
            matrix = cmap.matrix(consumer=m.role == CONSUMER)
            edits[m.constant][m.node][m.axis][m.offset] = (m.offset, m.block, matrix)
    for name, by_node in edits.items():
        tensor = tensors[name]
        readers = list(dict.fromkeys(n.name for n in tensor.outputs))
        variants = [_edit_key(by_node.get(r, {})) for r in readers]
        if len(set(variants)) <= 1:
            tensor.values = _edited(tensor, next(iter(by_node.values())))
            continue
        # A constant shared by nodes whose edits differ: a private copy each.
        for reader in list({id(n): n for n in tensor.outputs}.values()):
            private = gs.Constant(f"{name}__{reader.name}", _edited(tensor, by_node.get(reader.name, {})))
            for i, t in enumerate(reader.inputs):
                if t is tensor:
                    reader.inputs[i] = private

    nodes = {n.name: n for n in graph.nodes}
    for fix in analysis.fixes:
        if not _touches(analysis, maps, fix.tensor):
            continue
        node = nodes[fix.node]
        size = (segments_size(analysis, maps, analysis.axes[fix.tensor].segments) * fix.scale if fix.scale
                else new_axis_size(analysis, maps, fix.tensor))
        if fix.kind == "group":
            node.attrs["group"] = size
        elif fix.kind == "shape":
            old = node.inputs[fix.input]
            shape = np.array(old.values, copy=True)
            shape.reshape(-1)[fix.index] = size
            # A private copy: exporters share shape constants between Reshapes.
            node.inputs[fix.input] = gs.Constant(f"{old.name}__pruned_{node.name}", shape)
        elif fix.kind == "iota":
            old = node.inputs[1]
            shape = list(old.values.shape)
            shape[fix.index] = size
            node.inputs[1] = gs.Constant(f"{old.name}__pruned_{node.name}",
                                         np.arange(size, dtype=old.values.dtype).reshape(shape))
        elif fix.kind == "split":
            _fix_split(graph, node, [segments_size(analysis, maps, p) for p in fix.parts])
        elif fix.kind == "slice":
            start = segments_size(analysis, maps, fix.parts[0])
            _fix_slice(node, fix.index, start, start + segments_size(analysis, maps, fix.parts[1]))
    graph.cleanup().toposort()


def _fix_split(graph: gs.Graph, node: gs.Node, sizes: list[int]) -> None:
    """Write explicit split sizes (attribute before opset 13, input from 13; drops ``num_outputs``)."""
    if "split" in node.attrs or (graph.opset or 13) < 13:
        node.attrs["split"] = sizes
        return
    node.attrs.pop("num_outputs", None)
    const = gs.Constant(f"{node.name}__split_pruned", np.array(sizes, dtype=np.int64))
    if len(node.inputs) > 1:
        node.inputs[1] = const
    else:
        node.inputs.append(const)


def _fix_slice(node: gs.Node, index: int, start: int, end: int) -> None:
    """Set entry ``index`` of a Slice's starts and ends (attributes before opset 10, else inputs)."""
    if "starts" in node.attrs:
        for name, value in (("starts", start), ("ends", end)):
            vals = list(node.attrs[name])
            vals[index] = value
            node.attrs[name] = vals
        return
    for i, value in ((1, start), (2, end)):
        old = node.inputs[i]
        vals = np.array(old.values, copy=True)
        vals.reshape(-1)[index] = value
        node.inputs[i] = gs.Constant(f"{old.name}__pruned_{node.name}_{i}", vals)


def _edit_key(by_axis: dict) -> tuple:
    return tuple(sorted((axis, off, piece[1], id(piece[2])) for axis, pieces in by_axis.items()
                        for off, piece in pieces.items()))


def _edited(tensor: gs.Constant, by_axis: dict) -> np.ndarray:
    original = np.asarray(tensor.values)
    values = original
    for axis, pieces in by_axis.items():
        values = _apply_axis(values, axis, list(pieces.values()))
    return np.ascontiguousarray(values, dtype=original.dtype)


def _touches(analysis: Analysis, maps: dict[int, ChannelMap], tensor: str) -> bool:
    return any(
        seg.space is not None and analysis.space_group[seg.space] in maps
        for seg in analysis.axes[tensor].segments
    )
