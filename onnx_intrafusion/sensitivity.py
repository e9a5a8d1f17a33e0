"""Per-group sensitivity: how much the model's outputs move when one group alone is pruned.

For every prunable (and selected) group and every level (fraction of the
group's channels removed; default 0.25 / 0.5 / 0.75) the group alone is
pruned with the run's own channel maps (method, importance, transport
options) and, when the run recovers, recovered as the run would; the
distortion of the final outputs (:func:`distortion.output_distortion`: KL for
class scores, relative squared error otherwise) is measured on the
*held-back* calibration samples (:func:`calibration.split_holdback`), which
recovery never fits on (recovery checks itself on them as in the real run and
is undone when it makes the outputs worse).  The MACs each run saves come from
:func:`allocation.total_macs` (exact for Conv/Gemm/MatMul at batch 1).

What is computed once and what per run.  The coupling analysis, the scores
and the channel maps are computed once, in the calling process: the caller
hands in ``plan(group id, channels kept) -> ChannelMap`` (the pipeline passes
its own planning step, so this module needs neither importance nor the
pipeline and stages keep importing only downwards).  A run is then only
rewrite (+ recovery) + an onnxruntime evaluation on a fresh copy of the
analysed graph (``gs.Graph.copy`` shares the weight arrays, which the rewrite
replaces rather than edits).

Where runs execute.  ``workers=1``: in this process.  ``workers=N``: a
``ProcessPoolExecutor`` with ``forkserver`` (``spawn`` where unavailable);
each worker receives the model, the analysed graph and the calibration
arrays once (pool initializer) and then only (group, level, channel map)
tasks.  ``ray_address``: Ray tasks on a cluster (``ray`` is an optional
extra, imported here only); model, graph and arrays go into the object store
once (``ray.put``) and each task receives the references, so a Ray worker
process deserialises them once and caches them.  Every evaluation session
uses one onnxruntime thread and every run the same seed, so the table is the
same whichever way it ran (the parallelism is across runs).

The table is saved as JSON with a fingerprint of the model (graph structure
and weights); loading it for another model is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import allocation, calibration as calibration_mod, distortion, model_io, rewrite
from .coupling import Analysis
from .errors import OutputError, UsageError
from .plans import ChannelMap, keep_count
from .progress import Progress, as_progress

DEFAULT_LEVELS = (0.25, 0.5, 0.75)
FORMAT = "onnx-intrafusion sensitivity 1"
#: Memory assumed per worker besides its model copies (Python, onnxruntime, numpy).
WORKER_BASE_BYTES = 400 * 2**20

Plan = Callable[[int, int], ChannelMap]


# --------------------------------------------------------------------------- the table
@dataclass
class Point:
    """One run: a group pruned alone to ``keep`` channels."""

    level: float  # requested fraction of the group's channels removed
    keep: int
    macs_saved: float  # MACs removed by this run alone (batch 1)
    distortion: float  # of the final outputs on the held-back samples (after recovery, if the run recovers)
    distortion_unrecovered: float | None = None  # before recovery (None when the run does not recover)


@dataclass
class GroupSensitivity:
    id: int
    channels: int
    origin: str
    points: list[Point] = field(default_factory=list)

    def __post_init__(self):
        self.points = [p if isinstance(p, Point) else Point(**p) for p in self.points]

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(channels kept, distortion) of the measured points plus the unpruned point, keep descending."""
        keeps = [self.channels] + [p.keep for p in self.points]
        values = [0.0] + [p.distortion for p in self.points]
        order = np.argsort(keeps, kind="stable")[::-1]
        return np.asarray(keeps, dtype=np.int64)[order], np.asarray(values, dtype=np.float64)[order]


@dataclass
class Sensitivity:
    """The analysis: one row per group, one point per level."""

    fingerprint: str
    measure: str
    samples: int
    levels: list[float]
    macs: float  # the unpruned model's MACs as the allocation counts them
    options: dict
    groups: list[GroupSensitivity]
    seconds: float = 0.0
    backend: str = "in-process"

    def __post_init__(self):
        self.groups = [g if isinstance(g, GroupSensitivity) else GroupSensitivity(**g) for g in self.groups]

    def to_dict(self) -> dict:
        data = asdict(self)
        return {"format": FORMAT, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(self.to_json() + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write sensitivity analysis {path}: {exc.strerror}") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None) -> "Sensitivity":
        """Read a saved analysis; with ``fingerprint``, refuse one made for another model."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"sensitivity file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"sensitivity file is not readable JSON: {path} ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"{path} is not a sensitivity analysis of this tool (format '{FORMAT}' expected)")
        if fingerprint is not None and data.get("fingerprint") != fingerprint:
            raise UsageError(f"{path} was measured on another model (graph or weights differ); "
                             "rerun the analysis for this model")
        data.pop("format")
        try:
            return cls(**data)
        except (TypeError, KeyError, ValueError) as exc:
            raise UsageError(f"sensitivity file {path} is malformed ({exc})") from None

    def by_id(self) -> dict[int, GroupSensitivity]:
        return {g.id: g for g in self.groups}

    def to_text(self, max_rows: int = 60) -> str:
        """Groups as rows, levels as columns: distortion (and % of MACs saved); most fragile first."""
        levels = sorted({p.level for g in self.groups for p in g.points})
        head = f"{'group':>5} {'channels':>8}  " + "".join(f"{f'@{lv:g}':>18}" for lv in levels) + "  origin"
        lines = [f"sensitivity: {self.measure} of the outputs on {self.samples} held-back samples, "
                 f"one group pruned at a time ({self.options.get('method')}, recover "
                 f"{self.options.get('recover')}); cell = distortion (MACs saved)", head]

        def worst(g: GroupSensitivity) -> float:
            return max((p.distortion for p in g.points), default=0.0)

        rows = sorted(self.groups, key=worst, reverse=True)
        for g in rows[:max_rows]:
            cells = {p.level: p for p in g.points}
            text = ""
            for lv in levels:
                p = cells.get(lv)
                text += f"{'-':>18}" if p is None else f"{_fmt(p.distortion):>10} ({100 * p.macs_saved / max(self.macs, 1):4.1f}%)"
            lines.append(f"{g.id:>5} {g.channels:>8}  {text}  {g.origin}")
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more groups (see the JSON file)")
        lines.append(f"{sum(len(g.points) for g in self.groups)} runs in {self.seconds:.1f}s ({self.backend})")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path | None:
        """Heat map group x level of log10 distortion; None when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        levels = sorted({p.level for g in self.groups for p in g.points})
        groups = self.groups
        grid = np.full((len(groups), len(levels)), np.nan)
        for i, g in enumerate(groups):
            for p in g.points:
                grid[i, levels.index(p.level)] = np.log10(min(max(p.distortion, 1e-8), 1e8))  # inf: broken
        fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(levels), 1.5 + 0.22 * len(groups)))
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest")
        ax.set_xticks(range(len(levels)), [f"{lv:g}" for lv in levels])
        ax.set_yticks(range(len(groups)), [f"{g.id}: {g.origin[:28]} ({g.channels})" for g in groups], fontsize=7)
        ax.set_xlabel("fraction of the group's channels removed")
        ax.set_title(f"sensitivity: log10 {self.measure} of the outputs\n(one group pruned at a time)", fontsize=9)
        fig.colorbar(im, ax=ax, label=f"log10 {self.measure}")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.3g}"


def fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 of what the model computes: nodes (op, domain, tensors, attributes), weights, inputs, outputs.

    Node names, doc strings and how weights are stored (raw bytes, typed
    fields, external data) do not count; tensor names do (the analysis refers
    to groups by the tensors they edit).
    """
    h = hashlib.sha256()

    def put(*parts) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

    graph = model.graph
    for vi in list(graph.input) + list(graph.output):
        put("io", vi.name, vi.type.SerializeToString(deterministic=True))
    for node in graph.node:
        put("node", node.op_type, node.domain, *node.input, "->", *node.output)
        for attr in node.attribute:
            attr = onnx.AttributeProto.FromString(attr.SerializeToString())
            attr.ClearField("doc_string")
            put(attr.SerializeToString(deterministic=True))
    for init in graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        put("init", init.name, arr.dtype.str, arr.shape, np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- runs
@dataclass
class _Payload:
    """Everything a run needs besides its channel map; sent to each worker once."""

    original: bytes  # the input model (recovery's targets, metadata of written models)
    graph: bytes  # the analysed graph, exported (node names as the analysis knows them)
    analysis: Analysis
    fit: list[dict[str, np.ndarray]]  # calibration batches recovery fits on
    held: list[dict[str, np.ndarray]]  # held-back batches the distortion is measured on
    reference: dict[str, np.ndarray]  # the original model's outputs on ``held``
    recover: str
    alpha: float
    eps: float
    seed: int
    provider: str = "cpu"


class _State:
    """A payload unpacked once per process."""

    def __init__(self, payload: _Payload):
        self.p = payload
        self.original = onnx.ModelProto.FromString(payload.original)
        self.graph = gs.import_onnx(onnx.ModelProto.FromString(payload.graph))

    def run(self, cmap: tuple[int, ChannelMap]) -> tuple[float, float | None]:
        """(distortion, distortion before recovery or None) with group ``gid`` mapped by ``cmap``."""
        from .validate import run as ort_run

        gid, m = cmap
        p = self.p
        graph = self.graph.copy()
        maps = {gid: m}
        rewrite.apply_maps(graph, p.analysis, maps)

        def measure() -> float:
            outs, _ = ort_run(model_io.to_model(graph, self.original, infer=False), p.held, p.provider, threads=1)
            return distortion.output_distortion(p.reference, outs)

        before = measure()
        if p.recover == "none":
            return before, None
        from .activations import recover

        # As the real run: fitted on ``fit``, each layer and the whole model checked on ``held``
        # (a recovery that makes the outputs worse there is undone).
        recover(graph, self.original, p.analysis, maps, p.fit, p.recover, holdback=p.held, alpha=p.alpha,
                eps=p.eps, seed=p.seed)
        return measure(), before


_WORKER_STATE: dict[str, _State] = {}


def _worker_init(payload: _Payload) -> None:
    from .plans import preload_pot

    preload_pot()  # a worker only prunes: POT without probing torch/jax/sklearn (seconds per worker)
    _WORKER_STATE["state"] = _State(payload)


def _worker_run(task: tuple[int, ChannelMap]) -> tuple[float, float | None]:
    return _WORKER_STATE["state"].run(task)


def _ray_run(refs: list, task: tuple[int, ChannelMap]) -> tuple[float, float | None]:
    """A Ray task: unpack the payload once per Ray worker process (cached by object id)."""
    import ray

    key = refs[0].hex()
    if key not in _WORKER_STATE:
        from .plans import preload_pot

        preload_pot()
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = _State(ray.get(refs[0]))
    return _WORKER_STATE[key].run(task)


def default_workers(payload_bytes: int) -> int:
    """Cores, bounded by memory: each worker holds its own copy of the model and data (about 3x the payload)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return max(1, cores)
    per_worker = 3 * payload_bytes + WORKER_BASE_BYTES
    return max(1, min(cores, int(0.8 * available // per_worker)))


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _execute(payload: _Payload, tasks: list[tuple[int, ChannelMap]], workers: int, ray_address: str | None,
             progress: Progress) -> tuple[list[tuple[float, float | None]], str]:
    with progress.steps("sensitivity runs", len(tasks)) as steps:
        if ray_address is not None:
            return _execute_ray(payload, tasks, ray_address, steps), "ray"
        if workers <= 1 or len(tasks) <= 1:
            state = _State(payload)
            results = []
            for gid, cmap in tasks:
                results.append(state.run((gid, cmap)))
                steps.advance(detail=f"group {gid}: {cmap.size}->{cmap.keep}")
            return results, "in-process"
        workers = min(workers, len(tasks))
        with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_worker_init,
                                 initargs=(payload,)) as pool:
            results = []
            for (gid, cmap), result in zip(tasks, pool.map(_worker_run, tasks)):
                results.append(result)
                steps.advance(detail=f"group {gid}: {cmap.size}->{cmap.keep}")
        return results, f"{workers} workers"


def _execute_ray(payload: _Payload, tasks, address: str, steps):
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'onnx-intrafusion[ray]'") from None
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - connection refused, bad address, ...
            raise UsageError(f"cannot connect to the Ray cluster at '{address}': "
                             f"{' '.join(str(exc).split())[:200]}") from None
        started = True
    try:
        refs = [ray.put(payload)]  # once; every task gets the reference
        remote = ray.remote(num_cpus=1)(_ray_run)
        pending = [remote.remote(refs, task) for task in tasks]
        results = []
        for ref in pending:
            results.append(ray.get(ref))
            steps.advance()
        return results
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- analysis
def check_levels(levels: Iterable[float]) -> list[float]:
    """Sorted distinct levels in (0, 1); one-line UsageError otherwise."""
    try:
        out = sorted({float(lv) for lv in levels})
    except (TypeError, ValueError):
        raise UsageError(f"sensitivity levels must be numbers, got {levels!r}") from None
    if not out or any(not 0.0 < lv < 1.0 for lv in out):
        raise UsageError(f"sensitivity levels must be in (0, 1), got {out}")
    return out


def analyse(original: onnx.ModelProto, graph: gs.Graph, analysis: Analysis, plan: Plan,
            arrays: dict[str, np.ndarray], *, levels: Iterable[float] = DEFAULT_LEVELS,
            group_ids: Iterable[int] | None = None, round_to: int = 1, recover: str = "none",
            recover_alpha: float = 1e-3, ewr_eps: float = 0.05, seed: int = 0, workers: int | None = 1,
            ray_address: str | None = None, options: dict | None = None,
            progress: Progress | Callable[[str], None] | None = None) -> Sensitivity:
    """Measure every prunable (and selected) group alone at each level.

    ``graph`` is the graph ``analysis`` was made on (not modified);
    ``arrays`` the calibration arrays matched to the model's inputs;
    ``plan(gid, keep)`` the channel map the real run would use.
    ``workers=None``: :func:`default_workers`.
    """
    start = time.perf_counter()
    progress = as_progress(progress)
    levels = check_levels(levels)
    selected = None if group_ids is None else set(group_ids)
    todo = analysis.prunable(selected)
    fit, held = calibration_mod.split_holdback(arrays, seed=seed, multiple=calibration_mod.fixed_batch(original) or 1)
    fit_feeds, held_feeds = calibration_mod.batches(fit, original), calibration_mod.batches(held, original)
    from .validate import run as ort_run

    reference, _ = ort_run(original, held_feeds, "cpu", threads=1)
    macs_rows = allocation.node_macs(graph, analysis)
    before = allocation.total_macs(analysis, macs_rows, {})

    # Channel maps once per (group, distinct channel count), here; only the runs are distributed.
    tasks: list[tuple[int, ChannelMap]] = []
    index: dict[tuple[int, int], int] = {}
    rows = []
    for g in todo:
        row = GroupSensitivity(g.id, g.size, g.origin)
        for lv in levels:
            keep = keep_count(g.size, lv, allocation.multiple(g, round_to))
            if keep == g.size:
                continue
            if (g.id, keep) not in index:
                index[(g.id, keep)] = len(tasks)
                tasks.append((g.id, plan(g.id, keep)))
            saved = before - allocation.total_macs(analysis, macs_rows, {g.id: keep})
            row.points.append(Point(lv, keep, float(saved), float("nan")))
        rows.append(row)
    payload = _Payload(original.SerializeToString(), gs.export_onnx(graph, do_type_check=False).SerializeToString(),
                       analysis, fit_feeds, held_feeds, reference, recover, recover_alpha, ewr_eps, seed)
    if workers is None:
        size = len(payload.original) + len(payload.graph) + sum(a.nbytes for a in arrays.values())
        workers = default_workers(size)
    progress.note(f"  sensitivity: {len(tasks)} runs ({len(todo)} groups x {len(levels)} levels) on "
                  f"{calibration_mod.sample_count(held)} held-back samples")
    results, backend = _execute(payload, tasks, workers, ray_address, progress)
    for row in rows:
        for p in row.points:
            p.distortion, p.distortion_unrecovered = results[index[(row.id, p.keep)]]
    opts = dict(options or {})
    opts.update(recover=recover, round_to=round_to, seed=seed)
    return Sensitivity(fingerprint(original), distortion.measure_name(reference),
                       calibration_mod.sample_count(held), levels, float(before), opts, rows,
                       round(time.perf_counter() - start, 3), backend)
