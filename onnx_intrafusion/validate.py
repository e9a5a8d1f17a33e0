"""Stage 6: run original and pruned models in onnxruntime and measure drift.

The only module that imports onnxruntime.  The CUDA provider is used when
onnxruntime-gpu is installed and a GPU answers; otherwise the CPU provider.
Sessions run the graph we wrote; onnxruntime's optimised graph stays in
memory and is never fed back into the rewriter.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import ModelError, ProviderError, ValidationError
from .model_io import concrete_input_shapes

PROVIDERS = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"

#: Random samples per validation (several runs when the batch size is fixed).
VALIDATION_SAMPLES = 8


@dataclass
class OutputDrift:
    name: str
    shape: list[int]
    max_abs_diff: float
    cosine: float
    top1_agreement: float | None  # only for [N, classes] outputs


@dataclass
class Drift:
    provider: str
    samples: int
    outputs: list[OutputDrift]
    inputs: str = "random"  # "random" or "calibration" (real inputs: top-1 agreement is meaningful)

    def to_dict(self) -> dict:
        return asdict(self)


def quiet_runtime_logs() -> None:
    """Keep onnxruntime's own log lines (optimizer notes such as "UnsqueezeElimination cannot remove
    node") off the user's terminal: some graph transformers log through the process-wide default
    logger, which per-session ``log_severity_level`` does not reach.  Called by the command line
    (not on import: a library user's process keeps its own logging settings)."""
    ort.set_default_logger_severity(3)


def _session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are reported as one-line errors, not logged
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def session(model: onnx.ModelProto | str | os.PathLike, provider: str = "auto",
            threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    """An onnxruntime session on the requested provider (``auto``: CUDA if it works, else CPU).

    ``model`` is a ModelProto or the path of a model file, which onnxruntime
    then reads itself (no serialised copy of the weights in this process).
    ``threads`` fixes onnxruntime's intra-op threads (default: its own choice);
    parallel callers (sensitivity workers) run one thread per process.
    ``optimize=False`` stops at onnxruntime's basic graph optimisations: no
    layout transforms, whose reordered copies of the weights take ~1.5x the
    model (263 vs 113 MB for ResNet-50's session).
    """
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    available = ort.get_available_providers()
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    if provider in ("auto", "cuda") and _CUDA in available:
        try:
            sess = ort.InferenceSession(data, _session_options(threads, optimize), providers=[_CUDA, _CPU])
            if sess.get_providers()[0] == _CUDA:
                return sess
        except Exception as exc:  # noqa: BLE001 - a broken GPU setup falls back or is reported
            if provider == "cuda":
                raise ProviderError(f"CUDA provider failed to start: {str(exc).splitlines()[0]}") from None
    if provider == "cuda":
        raise ProviderError(
            "--provider cuda: no usable CUDA provider here (install onnxruntime-gpu on a machine with a GPU)"
        )
    return ort.InferenceSession(data, _session_options(threads, optimize), providers=[_CPU])


def check_provider(provider: str) -> None:
    """Fail early, before any work, when ``provider`` cannot be used."""
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    if provider == "cuda" and _CUDA not in ort.get_available_providers():
        raise ProviderError(
            "--provider cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu on a machine with a GPU)"
        )


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph inputs that index a constant table (an embedding ``Gather``, possibly through
    Cast/Unsqueeze/Squeeze/Reshape/Flatten), mapped to the smallest such table's size along the gathered
    axis: random ids must stay below it.  Read from the graph, not from input names."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer if t.dims}
    tables |= {n.output[0]: list(n.attribute[0].t.dims) for n in model.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and n.attribute[0].t.dims}
    ints = {i.name for i in model.graph.input if i.name not in tables
            and i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    producer = {o: n for n in model.graph.node for o in n.output}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        shape = tables[node.input[0]]
        size = shape[axis]
        stack, seen = [node.input[1]], set()
        while stack:  # the int inputs that reach the indices through value-preserving ops
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in ints:
                bounds[t] = min(bounds.get(t, size), size)
            n = producer.get(t)
            if n is not None and n.op_type in ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten"):
                stack.append(n.input[0])
    return bounds


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = VALIDATION_SAMPLES) -> dict[str, np.ndarray]:
    """Reproducible inputs for every graph input: normal floats; integers that index a constant table
    (token ids, see :func:`index_bounds`) drawn below its row count; other integers zero.

    ``batch`` fills a dynamic first dimension; a fixed one is kept.
    """
    rng = np.random.default_rng(seed)
    bounds = index_bounds(model)
    feeds = {}
    for name, (dims, elem_type) in concrete_input_shapes(model, batch=batch).items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif name in bounds:
            feeds[name] = rng.integers(0, bounds[name], dims).astype(dtype)
        else:
            feeds[name] = np.zeros(dims, dtype=dtype)
    return feeds


def run(model: onnx.ModelProto | str | os.PathLike, feeds: list[dict[str, np.ndarray]], provider: str = "auto",
        threads: int | None = None, optimize: bool = True, one_sample: bool = False) -> tuple[dict, str]:
    """Outputs of ``model`` (a ModelProto or a file) on each feed, concatenated on the first axis,
    and the provider used.

    With ``one_sample``, a feed whose inputs and outputs all have a dynamic first (batch)
    dimension runs one sample at a time: the same outputs, with the activations of one
    sample in memory instead of the whole batch's (~100 MB for 8 ResNet-50 images), for
    the few samples of a validation (slower for many).
    """
    sess = session(model, provider, threads, optimize)
    names = [o.name for o in sess.get_outputs()]
    split = one_sample and all(t.shape and not isinstance(t.shape[0], int)
                               for t in [*sess.get_inputs(), *sess.get_outputs()])
    runs = [sess.run(names, part) for feed in feeds for part in (_samples(feed) if split else [feed])]
    used = sess.get_providers()[0]
    del sess  # its weights and buffers go before the next session starts
    outs = {n: np.concatenate([r[i] for r in runs]) if runs[0][i].ndim else runs[0][i] for i, n in enumerate(names)}
    return outs, used


def _samples(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``feed`` split into single-sample feeds along the first axis (itself if the inputs disagree on it)."""
    sizes = {v.shape[0] if np.ndim(v) else None for v in feed.values()}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= 1:
        return [feed]
    return [{k: v[i:i + 1] for k, v in feed.items()} for i in range(next(iter(sizes)))]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


@dataclass
class Reference:
    """The original model's outputs on the validation inputs."""

    feeds: list[dict[str, np.ndarray]]
    outputs: dict[str, np.ndarray]
    real: bool  # the feeds are held-back calibration samples, not random inputs


def reference(original: onnx.ModelProto, provider: str = "auto", seed: int = 0,
              samples: int = VALIDATION_SAMPLES, feeds: list[dict[str, np.ndarray]] | None = None,
              original_file: str | os.PathLike | None = None) -> Reference:
    """Run the original model on the validation inputs (see :func:`compare`).

    The pipeline calls this before planning, while memory holds little but
    the loaded model: onnxruntime's session for a large model needs about
    2.5x its size while it optimises the graph.  ``original_file``, the file
    ``original`` was loaded from, is what onnxruntime then runs (no
    serialised copy; ``original`` is only read for its inputs).
    """
    real = bool(feeds)
    if not real:
        feeds = [random_feeds(original, seed, batch=samples)]
        batch = next(iter(feeds[0].values())).shape[0] if feeds[0] and next(iter(feeds[0].values())).ndim else 1
        feeds += [random_feeds(original, seed + i, batch=samples) for i in range(1, -(-samples // max(batch, 1)))]
    try:
        # Basic optimisations: the original's outputs are the same up to rounding, and its session
        # (the largest one of a run) needs no layout-transformed copy of every weight.
        ref, _ = run(original if original_file is None else original_file, feeds, provider, optimize=False,
                     one_sample=True)
    except ProviderError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. custom ops onnxruntime does not know
        raise ModelError(
            "cannot validate: the input model itself does not run in onnxruntime "
            f"({' '.join(str(exc).split())[:200]}); rerun with --no-validate to skip validation"
        ) from None
    return Reference(feeds, ref, real)


def compare(original: onnx.ModelProto, pruned: onnx.ModelProto, provider: str = "auto", seed: int = 0,
            samples: int = VALIDATION_SAMPLES, feeds: list[dict[str, np.ndarray]] | None = None,
            original_file: str | os.PathLike | None = None, ref: Reference | None = None) -> Drift:
    """Run both models on the same inputs; raise if the pruned one is unusable.

    ``feeds`` are real inputs (held-back calibration samples); without them,
    random inputs are used and top-1 agreement is not reported, because on
    random inputs it measures nothing a user cares about.  ``ref``, the
    original's outputs computed earlier by :func:`reference`, replaces
    running ``original`` here (``seed``, ``samples``, ``feeds`` and
    ``original_file`` are then unused).
    """
    if ref is None:
        ref = reference(original, provider, seed, samples, feeds, original_file)
    feeds, real = ref.feeds, ref.real
    ref = ref.outputs
    try:
        out, used = run(pruned, feeds, provider, one_sample=True)
    except ProviderError:
        raise
    except Exception as exc:  # noqa: BLE001 - any onnxruntime failure means: do not write
        raise ValidationError(f"pruned model does not run in onnxruntime: {str(exc).splitlines()[0]}") from None
    if list(ref) != list(out):
        raise ValidationError(f"output names changed: {list(ref)} -> {list(out)}")
    drifts = []
    for name, a in ref.items():
        b = out[name]
        if a.shape != b.shape:
            raise ValidationError(f"output '{name}' changed shape: {list(a.shape)} -> {list(b.shape)}")
        if not np.all(np.isfinite(b)) and np.all(np.isfinite(a)):
            raise ValidationError(f"output '{name}' of the pruned model has NaN or Inf values")
        top1 = None
        if real and a.ndim == 2 and a.shape[1] > 1 and np.issubdtype(a.dtype, np.floating):
            top1 = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        drifts.append(OutputDrift(name, list(a.shape), float(diff.max()) if diff.size else 0.0, _cosine(a, b), top1))
    count = sum(next(iter(f.values())).shape[0] if f and next(iter(f.values())).ndim else 1 for f in feeds)
    return Drift(provider=used, samples=int(count), outputs=drifts, inputs="calibration" if real else "random")
