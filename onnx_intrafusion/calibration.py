"""Calibration data: a few hundred unlabelled inputs for data-aware recovery.

Accepted forms (labels are never needed):

* a path to an ``.npz`` file whose keys are the model's input names (a
  single-input model may use any one key), first axis = samples;
* a dict ``{input name: array}`` with the same convention;
* an iterable of feed dicts ``{input name: array}`` (each a batch), which is
  concatenated.

Everything that can be checked without the model (missing file, unreadable
file, no arrays, empty arrays) is checked by :func:`read`; the check against
the model's inputs (names, rank, fixed dimensions, dtype) by :func:`match`.
Both raise :class:`~onnx_intrafusion.errors.UsageError` with one line, before
any pruning work.  Pure numpy; no onnxruntime.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import model_io
from .errors import UsageError

def read(source, limit: int | None = None) -> dict[str, np.ndarray]:
    """Calibration arrays by key, at most ``limit`` samples each (model not yet known)."""
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise UsageError(f"calibration-samples must be a positive integer, got {limit}")
    if isinstance(source, (str, os.PathLike)):
        arrays = _read_npz(Path(source))
        where = str(source)
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        where = "calibration dict"
    elif isinstance(source, Iterable):
        arrays = _concat_feeds(source)
        where = "calibration feeds"
    else:
        raise UsageError(f"calibration must be an .npz path, a dict of arrays or an iterable of feed dicts, "
                         f"got {type(source).__name__}")
    if not arrays:
        raise UsageError(f"{where}: no calibration arrays")
    counts = set()
    for key, arr in arrays.items():
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise UsageError(f"{where}: calibration array '{key}' is not numeric (dtype {arr.dtype})")
        if arr.ndim == 0:
            raise UsageError(f"{where}: calibration array '{key}' is a scalar; the first axis must be samples")
        if arr.shape[0] == 0:
            raise UsageError(f"{where}: calibration array '{key}' is empty (0 samples)")
        counts.add(arr.shape[0])
    if len(counts) > 1:
        raise UsageError(f"{where}: calibration arrays have different sample counts {sorted(counts)}")
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UsageError(f"calibration file not found: {path}")
    if path.is_dir():
        raise UsageError(f"calibration path is a directory, not an .npz file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UsageError(f"calibration file is a single .npy array, not an .npz of named inputs: {path}")
        with data:
            return {k: np.asarray(data[k]) for k in data.files}
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"calibration file is not a readable .npz: {path} ({first})") from None


def _concat_feeds(feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    keys = None
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise UsageError(f"calibration feed {i} is a {type(feed).__name__}, not a dict of input arrays")
        if keys is None:
            keys = set(feed)
        elif set(feed) != keys:
            raise UsageError(f"calibration feed {i} has keys {sorted(feed)}, expected {sorted(keys)}")
        for k, v in feed.items():
            parts.setdefault(str(k), []).append(np.asarray(v))
    try:
        return {k: np.concatenate(v) for k, v in parts.items()}
    except ValueError as exc:
        raise UsageError(f"calibration feeds cannot be stacked: {str(exc).splitlines()[0]}") from None


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[list[int | None], np.dtype]]:
    """Real graph inputs: dims (None when dynamic) and numpy dtype."""
    return {name: (dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
            for name, (dims, elem_type) in model_io.input_specs(model).items()}


def match(arrays: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays keyed and typed as the model's inputs; one-line UsageError otherwise."""
    specs = input_specs(model)
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {next(iter(specs)): next(iter(arrays.values()))}
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise UsageError(f"calibration data lacks model input(s) {missing} (has keys {sorted(arrays)})")
    out = {}
    for name, (dims, dtype) in specs.items():
        arr = arrays[name]
        if arr.ndim != len(dims):
            raise UsageError(f"calibration input '{name}' has shape {list(arr.shape)}; the model expects rank "
                             f"{len(dims)} ({_fmt(dims)})")
        for i, (have, want) in enumerate(zip(arr.shape, dims)):
            if i > 0 and want is not None and have != want:
                raise UsageError(f"calibration input '{name}' has shape {list(arr.shape)}; the model expects "
                                 f"{_fmt(dims)}")
        if np.issubdtype(dtype, np.floating):
            if not np.issubdtype(arr.dtype, np.floating):
                raise UsageError(f"calibration input '{name}' has dtype {arr.dtype}; the model expects {dtype}")
            arr = arr.astype(dtype, copy=False)
            if not np.all(np.isfinite(arr)):
                raise UsageError(f"calibration input '{name}' contains NaN or Inf")
        elif arr.dtype != dtype:
            raise UsageError(f"calibration input '{name}' has dtype {arr.dtype}; the model expects {dtype}")
        out[name] = np.ascontiguousarray(arr)
    return out


def _fmt(dims: list[int | None]) -> str:
    return "[" + ", ".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + "]"


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix (an exported ``[8, 3, 224, 224]``), or None when it is dynamic."""
    fixed = {dims[0] for dims, _ in input_specs(model).values() if dims and dims[0] is not None}
    return fixed.pop() if fixed else None


def batches(arrays: dict[str, np.ndarray], model: onnx.ModelProto, batch: int = 64) -> list[dict[str, np.ndarray]]:
    """Feed dicts of ``batch`` samples (or the model's fixed batch size; a remainder is dropped then)."""
    n = next(iter(arrays.values())).shape[0]
    size = fixed_batch(model)
    if size is not None:
        if n < size:
            raise UsageError(f"the model has a fixed batch size {size} but only {n} calibration samples were given")
        stop = n - n % size
    else:
        size, stop = batch, n
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, stop, size)]


def sample_count(arrays: dict[str, np.ndarray]) -> int:
    return int(next(iter(arrays.values())).shape[0])


#: Fraction of the calibration samples held back to check every data-aware step (never fitted on).
HOLDBACK_FRACTION = 0.1
#: At least this many samples are held back (when there are at least twice as many).
HOLDBACK_MIN = 4


def split_holdback(arrays: dict[str, np.ndarray], fraction: float = HOLDBACK_FRACTION, seed: int = 0,
                   multiple: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(fit, held back): a deterministic random split of the calibration samples.

    Every fitted step (recovery, distillation, sensitivity) is judged on the
    held-back part, which it never sees, so "keep the better of before and
    after" is an honest comparison.  The split is random (seeded) rather than
    the last samples, because users often concatenate data sorted by class.
    With fewer than ``2 * HOLDBACK_MIN`` samples, half are held back.
    ``multiple`` (a model's fixed batch size) rounds the held-back count up
    to whole batches.
    """
    n = sample_count(arrays)
    if n < 2:
        raise UsageError(f"at least 2 calibration samples are needed to hold some back, got {n}")
    held = max(int(round(n * fraction)), min(HOLDBACK_MIN, n // 2), 1)
    if multiple > 1 and n >= 2 * multiple:
        # A fixed-batch model runs whole batches only: hold back whole batches, or the
        # remainder would be dropped (and fewer than one batch would disable every check).
        held = min(-(-held // multiple) * multiple, (n // multiple - 1) * multiple)
    order = np.random.default_rng([seed, 0x401DBAC]).permutation(n)
    back, fit = np.sort(order[:held]), np.sort(order[held:])
    return ({k: v[fit] for k, v in arrays.items()}, {k: v[back] for k, v in arrays.items()})


@dataclass(frozen=True)
class Holdback:
    """The calibration samples of one run, split once: every fitted step fits on ``fit``, is judged on ``held``.

    Recovery, distillation, validation and int8 calibration all use this one
    split, so no step is ever judged on samples another step fitted on.
    ``held`` is None when there are too few samples to hold any back (one
    sample, or less than two batches of a fixed batch size): then
    ``fit`` is every sample and fitted steps run unchecked.
    """
    fit: dict[str, np.ndarray]
    held: dict[str, np.ndarray] | None

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray], model: onnx.ModelProto, seed: int = 0) -> "Holdback":
        multiple = fixed_batch(model) or 1
        if sample_count(arrays) < 2 * multiple:  # one sample, or less than two whole batches
            return cls(arrays, None)
        return cls(*split_holdback(arrays, seed=seed, multiple=multiple))

    def validation(self, cap: int) -> dict[str, np.ndarray]:
        """At most ``cap`` samples to validate on: held-back ones (never fitted on) when there are any."""
        chosen = self.fit if self.held is None else self.held
        return {k: v[:cap] for k, v in chosen.items()}


__all__ = ["Holdback", "fixed_batch", "read", "match", "batches", "input_specs", "sample_count", "split_holdback"]
