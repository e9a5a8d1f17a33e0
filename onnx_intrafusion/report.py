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
from .model_io import (concrete_input_shapes, fold, import_graph, fold_shapes, params_count, quiet_graphsurgeon, weightless,
                       with_input_shapes)


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


@dataclass
class MacCount:
    """Multiply-accumulates, or why they are not known (``total`` is then None)."""

    total: int | None
    unknown: list[str] = field(default_factory=list)  # MAC nodes whose shapes could not be inferred
    reason: str = ""


def _shape_inferred(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        return with_input_shapes(model, concrete_input_shapes(model, batch=1))
    except Exception:  # noqa: BLE001 - shape inference can fail on exotic graphs
        return None


def _folded(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shapes computed from Shape ops (legacy chunk/split, attention reshapes), folded on the real weights."""
    try:
        graph = import_graph(with_input_shapes(model, concrete_input_shapes(model, batch=1)))
        graph = fold_shapes(fold(graph))
        return onnx.shape_inference.infer_shapes(gs.export_onnx(graph, do_type_check=False), data_prop=True)
    except Exception:  # noqa: BLE001
        return None


def _unknown_mac_nodes(model: onnx.ModelProto) -> list[str]:
    shapes = _shapes(model)
    return [n.name or n.output[0] for n in model.graph.node
            if n.op_type in _MAC_OPS and not (_known(shapes.get(n.output[0])) and _known(shapes.get(n.input[1]))
                                               and _known(shapes.get(n.input[0])))]


def count_macs(model: onnx.ModelProto) -> int | None:
    """Multiply-accumulates (None when unknown; :func:`mac_count` says why)."""
    return mac_count(model).total


def mac_count(model: onnx.ModelProto) -> MacCount:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul at the input shape with batch 1.

    Dynamic dimensions other than the batch take ``DEFAULT_DYNAMIC_DIM``.
    Shapes are inferred on a weightless copy first (fast); when some are
    still unknown (sizes computed at run time from ``Shape`` ops), constants
    are folded on the real model with every graph input static and shapes
    inferred again: the dynamo exporter reads dynamic dims with ranged
    ``Shape(x, start, end)`` ops, which :func:`model_io.fold` folds to the
    concrete sizes, so attention reshapes and masks get static shapes.  A count that
    still misses nodes is reported as unknown with the reason, never as a
    silently smaller number.
    """
    with quiet_graphsurgeon():
        inferred = _shape_inferred(weightless(model))
        if inferred is None or _unknown_mac_nodes(inferred):
            inferred = _folded(model) or inferred
    if inferred is None:
        return MacCount(None, reason="shape inference failed on this graph")
    unknown = _unknown_mac_nodes(inferred)
    if unknown:
        more = f" and {len(unknown) - 2} more" if len(unknown) > 2 else ""
        return MacCount(None, unknown, f"shapes unknown at {', '.join(unknown[:2])}{more}")
    shapes = _shapes(inferred)
    total = 0
    for node in inferred.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        out, w, a = shapes[node.output[0]], shapes[node.input[1]], shapes[node.input[0]]
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            total += int(np.prod(a)) * int(np.prod(w[1:]))
        else:
            k = a[-1]
            if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            total += int(np.prod(out)) * int(k)
    return MacCount(total)


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
    kind: str = "channel"  # channel | head | ffn | hidden (coupling.KINDS); a head = head_dim channels
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
            kind=group.kind,
        )


@dataclass
class Report:
    options: dict  # every option as used (Options.to_dict(); None = does not apply)
    input: str | None = None  # the model's path (None when given as a ModelProto)
    output: str | None = None  # set by whoever writes the model (the CLI)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = 0  # None: unknown, ``macs_note`` says why
    macs_after: int | None = 0
    macs_note: str = ""
    groups: list[GroupRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    validation: dict | None = None
    calibration: dict | None = None  # {"samples": N} when calibration data was given
    recovery: list[dict] = field(default_factory=list)  # one row per re-solved layer
    sensitivity: dict | None = None  # the analysis behind a sensitivity allocation (summary)
    quantization: dict | None = None  # deploy.Quantization, with --quantize
    # Whole-model output distortion on held-back calibration samples before/after recovery, and which was kept.
    recovery_model: dict | None = None
    distill: dict | None = None  # held-back distortion before/after distillation, epochs, seconds, device

    def set_stats(self, params_before: int, macs_before: MacCount, params_after: int, macs_after: MacCount) -> None:
        self.params_before, self.params_after = params_before, params_after
        self.macs_before, self.macs_after = macs_before.total, macs_after.total
        self.macs_note = macs_before.reason or macs_after.reason

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
        from . import __version__

        return {
            "tool": {"name": "onnx-intrafusion", "version": __version__},
            "input": self.input,
            "output": self.output,
            "options": self.options,
            **({"calibration": self.calibration} if self.calibration else {}),
            "params": {"before": self.params_before, "after": self.params_after},
            "macs": {"before": self.macs_before, "after": self.macs_after,
                     **({"unknown_because": self.macs_note} if self.macs_note else {})},
            "kinds": self.kinds(),
            "groups": [vars(g) for g in self.groups],
            "timings_s": self.timings,
            "validation": self.validation,
            **({"recovery": self.recovery} if self.recovery else {}),
            **({"sensitivity": self.sensitivity} if self.sensitivity else {}),
            **({"quantization": self.quantization} if self.quantization else {}),
            **({"recovery_model": self.recovery_model} if self.recovery_model else {}),
            **({"distill": self.distill} if self.distill else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def kinds(self) -> dict[str, dict]:
        """Per group kind (channel, head, ffn, hidden): groups, groups pruned, channels before and after.

        A head group counts heads, so ``head`` totals are heads (each head_dim channels wide).
        """
        out: dict[str, dict] = {}
        for g in self.groups:
            k = out.setdefault(g.kind, {"groups": 0, "pruned": 0, "blocked": 0, "before": 0, "after": 0})
            k["groups"] += 1
            k["pruned"] += g.status == "pruned"
            k["blocked"] += g.status == "blocked"
            k["before"] += g.channels_before
            k["after"] += g.channels_after
        return out

    @property
    def pruned_groups(self) -> list[GroupRow]:
        return [g for g in self.groups if g.status == "pruned"]

    @property
    def blocked_groups(self) -> list[GroupRow]:
        return [g for g in self.groups if g.status == "blocked"]

    def to_text(self, max_rows: int = 40) -> str:
        lines = []
        o = self.options
        lines.append(f"method={o.get('method')} importance={o.get('importance')} sparsity={o.get('sparsity')} "
                     f"target={o.get('target')} round-to={o.get('round_to')}")
        lines.append(f"params  {self.params_before:>14,} -> {self.params_after:>14,}  ({_ratio(self.params_after, self.params_before)})")
        if self.macs_before is None or self.macs_after is None:
            lines.append(f"MACs    unknown ({self.macs_note})")
        else:
            lines.append(f"MACs    {self.macs_before:>14,} -> {self.macs_after:>14,}  "
                         f"({_ratio(self.macs_after, self.macs_before)})")
        lines.append(f"groups  {len(self.pruned_groups)} pruned, {len(self.blocked_groups)} blocked, {len(self.groups)} total")
        kinds = self.kinds()
        if set(kinds) != {"channel"}:  # a transformer: kept/total per kind (heads count heads)
            unit = {"head": "heads", "ffn": "neurons"}
            lines.append("kinds   " + ", ".join(f"{kind} {k['after']}/{k['before']} {unit.get(kind, 'channels')} "
                                                 f"({k['pruned']}/{k['groups']} groups pruned)"
                                                 for kind, k in kinds.items()))
        lines.append("")
        lines.append(f"{'group':>5}  {'channels':>11}  {'status':<9} producers / reason")
        for g in self.groups[:max_rows]:
            what = ", ".join(g.producers[:3]) + (" ..." if len(g.producers) > 3 else "")
            if g.blocked:
                b = g.blocked[0]
                what = f"{b['node']}: {b['reason']}" + (f" (+{len(g.blocked) - 1} more)" if len(g.blocked) > 1 else "")
            if g.kind != "channel":
                what = f"[{g.kind}] {what}"
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
            samples = (self.calibration or {}).get("samples", o.get("calibration_samples"))
            lines.append(f"recovery {o.get('recover')} on {samples} calibration samples: "
                         f"{len(self.recovery)} layers re-solved, worst relative output error "
                         f"{before:.3f} -> {after:.3f}")
            rejected = sum(r.get("kept") == "unrecovered" for r in self.recovery)
            if rejected:
                lines.append(f"  {rejected} layer(s) kept their old weights (worse on held-back samples)")
        if self.recovery_model:
            m = self.recovery_model
            lines.append(f"  output distortion ({m['measure']}) on {m['held_back_samples']} held-back samples: "
                         f"{m['before']:.4g} without recovery, {m['after']:.4g} with; kept {m['kept']}")
        if self.distill:
            d = self.distill
            lines.append(f"  distillation: held-back {d['measure']} {d['held_back_before']:.4g} -> "
                         f"{d['held_back_after']:.4g} (best of {d['epochs']} epochs: epoch {d['best_epoch']}, "
                         f"{d['seconds']:.1f}s on {d['device']})")
        if self.sensitivity:
            s = self.sensitivity
            lines.append("")
            lines.append(f"sensitivity allocation: {s['runs']} one-group runs ({s['source']}, {s['seconds']:.1f}s), "
                         f"predicted summed {s['measure']} {s['predicted_distortion']:.3g}"
                         + ("" if s["budget_met"] else "; MAC budget NOT reachable within the measured levels"))
        if self.validation:
            v = self.validation
            lines.append("")
            if v.get("inputs") == "calibration":
                lines.append(f"validation on {v['provider']}, {v['samples']} held-back calibration samples "
                             f"(real inputs, never fitted on):")
            else:
                lines.append(f"validation on {v['provider']}, {v['samples']} random inputs (drift only: random "
                             f"inputs say nothing about accuracy; give --calibration for top-1 agreement):")
            for out in v["outputs"]:
                top1 = "" if out["top1_agreement"] is None else f"  top-1 agreement {out['top1_agreement']:.3f}"
                lines.append(f"  {out['name']}: max|diff| {out['max_abs_diff']:.3g}  cosine {out['cosine']:.4f}{top1}")
        q = self.quantization
        if q:
            lines.append("")
            top1 = "" if q["top1_agreement_int8"] is None else f", top-1 agreement {q['top1_agreement_int8']:.3f}"
            lines.append(f"int8 ({q['format']}): {q['bytes_fp32'] / 1e6:.2f} MB -> {q['bytes_int8'] / 1e6:.2f} MB; "
                         f"drift vs original on {q['held_back_samples']} held-back samples: fp32 "
                         f"{q['drift_fp32']:.4g}, int8 {q['drift_int8']:.4g} (int8 vs fp32 {q['drift_int8_vs_fp32']:.4g}){top1}")
        if self.timings:
            lines.append("")
            lines.append("time: " + "  ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _ratio(after: int, before: int) -> str:
    if not before:
        return "n/a"
    return f"{100.0 * after / before:.1f}%"


def model_stats(model: onnx.ModelProto) -> tuple[int, int | None]:
    """(parameters, MACs or None when unknown) of a model."""
    return params_count(model), count_macs(model)
