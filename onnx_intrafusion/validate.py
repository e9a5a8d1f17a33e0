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


def _session_options(threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures are reported as one-line errors, not logged
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def session(model: onnx.ModelProto | str | os.PathLike, provider: str = "auto",
            threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session on the requested provider (``auto``: CUDA if it works, else CPU).

    ``model`` is a ModelProto or the path of a model file, which onnxruntime
    then reads itself (no serialised copy of the weights in this process).
    ``threads`` fixes onnxruntime's intra-op threads (default: its own choice);
    parallel callers (sensitivity workers) run one thread per process.
    """
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    available = ort.get_available_providers()
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    if provider in ("auto", "cuda") and _CUDA in available:
        try:
            sess = ort.InferenceSession(data, _session_options(threads), providers=[_CUDA, _CPU])
            if sess.get_providers()[0] == _CUDA:
                return sess
        except Exception as exc:  # noqa: BLE001 - a broken GPU setup falls back or is reported
            if provider == "cuda":
                raise ProviderError(f"CUDA provider failed to start: {str(exc).splitlines()[0]}") from None
    if provider == "cuda":
        raise ProviderError(
            "--provider cuda: no usable CUDA provider here (install onnxruntime-gpu on a machine with a GPU)"
        )
    return ort.InferenceSession(data, _session_options(threads), providers=[_CPU])


def check_provider(provider: str) -> None:
    """Fail early, before any work, when ``provider`` cannot be used."""
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    if provider == "cuda" and _CUDA not in ort.get_available_providers():
        raise ProviderError(
            "--provider cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu on a machine with a GPU)"
        )


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = VALIDATION_SAMPLES) -> dict[str, np.ndarray]:
    """Reproducible inputs for every graph input (normal floats, zero integers).

    ``batch`` fills a dynamic first dimension; a fixed one is kept.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dims, elem_type) in concrete_input_shapes(model, batch=batch).items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[name] = np.zeros(dims, dtype=dtype)
    return feeds


def run(model: onnx.ModelProto | str | os.PathLike, feeds: list[dict[str, np.ndarray]], provider: str = "auto",
        threads: int | None = None) -> tuple[dict, str]:
    """Outputs of ``model`` (a ModelProto or a file) on each feed, concatenated on the first axis,
    and the provider used."""
    sess = session(model, provider, threads)
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, feed) for feed in feeds]
    used = sess.get_providers()[0]
    del sess  # its weights and buffers go before the next session starts
    outs = {n: np.concatenate([r[i] for r in runs]) if runs[0][i].ndim else runs[0][i] for i, n in enumerate(names)}
    return outs, used


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
        ref, _ = run(original if original_file is None else original_file, feeds, provider)
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
        out, used = run(pruned, feeds, provider)
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
