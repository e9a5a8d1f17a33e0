"""What a run did: parameters, MACs, one row per channel group, timings, drift.

The report is plain data (``to_dict`` is the ``--report`` JSON) with a text
rendering for the terminal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .coupling import CONSUMER, PARAM, PRODUCER, Group
from .model_io import concrete_input_shapes, params_count, weightless, with_input_shapes


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    graph = model.graph
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _known(shape) -> bool:
    return bool(shape) and all(d is not None for d in shape)


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul at the input shape with batch 1.

    Dynamic dimensions other than the batch take ``DEFAULT_DYNAMIC_DIM``.
    """
    try:
        inferred = with_input_shapes(weightless(model), concrete_input_shapes(model, batch=1))
    except Exception:  # noqa: BLE001 - shape inference can fail on exotic graphs
        return 0
    shapes = _shapes(inferred)
    if any(n.op_type in _MAC_OPS and not _known(shapes.get(n.output[0])) for n in inferred.graph.node):
        # Sizes computed from Shape ops (legacy chunk/split): fold them and retry.
        try:
            folded = gs.import_onnx(inferred)
            folded.fold_constants(error_ok=True).cleanup()
            inferred = onnx.shape_inference.infer_shapes(gs.export_onnx(folded, do_type_check=False), data_prop=True)
            shapes = _shapes(inferred)
        except Exception:  # noqa: BLE001
            pass
    total = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if not out or any(d is None for d in out):
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            w = shapes.get(node.input[1])
            if not w or any(d is None for d in w):
                continue
            if node.op_type == "Conv":
                total += int(np.prod(out)) * int(np.prod(w[1:]))
            else:
                inp = shapes.get(node.input[0])
                if inp and all(d is not None for d in inp):
                    total += int(np.prod(inp)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if not a or a[-1] is None:
                continue
            k = a[-1]
            if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            total += int(np.prod(out)) * int(k)
    return total


@dataclass
class GroupRow:
    id: int
    channels_before: int
    channels_after: int
    status: str  # pruned | unchanged (not selected, or nothing to remove) | output (feeds a graph output) | blocked
    producers: list[str]
    consumers: list[str]
    params: list[str]
    blocked: list[dict] = field(default_factory=list)
    kept: list[int] | None = None  # indices of the kept channels (pruned groups)
    # Relative reconstruction error of the consumers' outputs on the calibration
    # data, before/after recovery (worst consumer); None without recovery.
    recovery_error: dict | None = None
    # With sensitivity allocation: the level chosen (fraction of channels removed)
    # and the distortion the analysis measured (interpolated) for it, this group alone.
    sensitivity: dict | None = None

    @classmethod
    def from_group(cls, group: Group, after: int, status: str, kept=None) -> "GroupRow":
        return cls(
            id=group.id,
            channels_before=group.size,
            channels_after=after,
            status=status,
            producers=group.nodes(PRODUCER),
            consumers=group.nodes(CONSUMER),
            params=group.nodes(PARAM),
            blocked=[{"node": n, "reason": r} for n, r in group.blocked],
            kept=None if kept is None else [int(i) for i in kept],
        )


@dataclass
class Report:
    options: dict
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    groups: list[GroupRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    validation: dict | None = None
    recovery: list[dict] = field(default_factory=list)  # one row per re-solved layer
    sensitivity: dict | None = None  # the analysis behind a sensitivity allocation (summary)

    def attach_recovery(self, layers, analysis) -> None:
        """Record per-layer recovery rows and, per group, its consumers' worst errors."""
        self.recovery = [layer.to_dict() for layer in layers]
        by_node = {r["node"]: r for r in self.recovery}
        for row in self.groups:
            hits = [by_node[n] for n in row.consumers if n in by_node]
            if row.status == "pruned" and hits:
                row.recovery_error = {"before": max(h["error_before"] for h in hits),
                                      "after": max(h["error_after"] for h in hits)}

    def to_dict(self) -> dict:
        return {
            "options": self.options,
            "params": {"before": self.params_before, "after": self.params_after},
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "groups": [vars(g) for g in self.groups],
            "timings_s": self.timings,
            "validation": self.validation,
            **({"recovery": self.recovery} if self.recovery else {}),
            **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def pruned_groups(self) -> list[GroupRow]:
        return [g for g in self.groups if g.status == "pruned"]

    @property
    def blocked_groups(self) -> list[GroupRow]:
        return [g for g in self.groups if g.status == "blocked"]

    def to_text(self, max_rows: int = 40) -> str:
        lines = []
        o = self.options
        lines.append(f"method={o.get('method')} importance={o.get('importance')} sparsity={o.get('sparsity')}")
        lines.append(f"params  {self.params_before:>14,} -> {self.params_after:>14,}  ({_ratio(self.params_after, self.params_before)})")
        lines.append(f"MACs    {self.macs_before:>14,} -> {self.macs_after:>14,}  ({_ratio(self.macs_after, self.macs_before)})")
        lines.append(f"groups  {len(self.pruned_groups)} pruned, {len(self.blocked_groups)} blocked, {len(self.groups)} total")
        lines.append("")
        lines.append(f"{'group':>5}  {'channels':>11}  {'status':<9} producers / reason")
        for g in self.groups[:max_rows]:
            what = ", ".join(g.producers[:3]) + (" ..." if len(g.producers) > 3 else "")
            if g.blocked:
                b = g.blocked[0]
                what = f"{b['node']}: {b['reason']}" + (f" (+{len(g.blocked) - 1} more)" if len(g.blocked) > 1 else "")
            rec = g.recovery_error
            if rec:
                what += f"  [recon. error {rec['before']:.3f} -> {rec['after']:.3f}]"
            if g.sensitivity and g.status == "pruned":
                what += f"  [level {g.sensitivity['level']:.2f}, distortion {g.sensitivity['distortion']:.3g}]"
            lines.append(f"{g.id:>5}  {g.channels_before:>5}->{g.channels_after:<5}  {g.status:<9} {what}")
        if len(self.groups) > max_rows:
            lines.append(f"  ... {len(self.groups) - max_rows} more groups (see --report JSON)")
        if self.recovery:
            o = self.options
            before = max(r["error_before"] for r in self.recovery)
            after = max(r["error_after"] for r in self.recovery)
            lines.append("")
            lines.append(f"recovery {o.get('recover')} on {o.get('calibration_samples')} calibration samples: "
                         f"{len(self.recovery)} layers re-solved, worst relative output error "
                         f"{before:.3f} -> {after:.3f}")
        if self.sensitivity:
            s = self.sensitivity
            lines.append("")
            lines.append(f"sensitivity allocation: {s['runs']} one-group runs ({s['source']}, {s['seconds']:.1f}s), "
                         f"predicted summed {s['measure']} {s['predicted_distortion']:.3g}"
                         + ("" if s["budget_met"] else "; MAC budget NOT reachable within the measured levels"))
        if self.validation:
            lines.append("")
            lines.append(f"validation on {self.validation['provider']} ({self.validation['samples']} random samples):")
            for out in self.validation["outputs"]:
                top1 = "" if out["top1_agreement"] is None else f"  top-1 agreement {out['top1_agreement']:.3f}"
                lines.append(f"  {out['name']}: max|diff| {out['max_abs_diff']:.3g}  cosine {out['cosine']:.4f}{top1}")
        if self.timings:
            lines.append("")
            lines.append("time: " + "  ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _ratio(after: int, before: int) -> str:
    if not before:
        return "n/a"
    return f"{100.0 * after / before:.1f}%"


def model_stats(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, MACs) of a model."""
    return params_count(model), count_macs(model)
