"""Stage 1: load, normalise and save ONNX models.

Why this module exists: every later stage wants one canonical in-memory form
(an onnx-graphsurgeon graph whose weights are all constants with known values
and whose tensors carry inferred shapes), whatever exporter wrote the file.
Exporters differ: the dynamo exporter keeps weights in a ``.onnx.data`` file,
paddle2onnx and tf2onnx put them in ``Constant`` nodes, some graphs compute
weights with ``ConstantOfShape``/``Transpose``.  Folding constants once here
lets the coupling analysis treat all of them alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from . import mapped
from .errors import ModelError, OutputError, ValidationError

#: Models whose serialised size passes this are saved with external data
#: (protobuf cannot hold more than 2 GiB in one message).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000

MIN_OPSET = 9


@contextmanager
def quiet_graphsurgeon():
    """Silence onnx-graphsurgeon's own log lines while we fold constants.

    Its warnings ("Inference failed ...", "colored module is not installed")
    describe folds we try on purpose and tolerate (``error_ok=True``); the
    outcome reaches the user through our own report or errors instead.
    """
    logger = gs.logger.G_LOGGER if hasattr(gs, "logger") else None
    if logger is None:
        yield
        return
    previous = logger.severity
    logger.severity = logger.CRITICAL + 1
    try:
        yield
    finally:
        logger.severity = previous


def _fold_ranged_shapes(graph: gs.Graph) -> list[tuple[gs.Variable, list]]:
    """Fold ``Shape`` nodes with ``start``/``end`` ourselves; hide the rest from graphsurgeon.

    graphsurgeon (0.6.x) folds ``Shape`` (and ``Gather``/``Slice`` of it) from
    the input's full shape, ignoring ``start``/``end`` (opset 15): the dynamo
    exporter's ``Shape(x, start=1, end=2)`` (a sequence length) would become
    the whole shape.  Those of a static input are replaced by the correct
    constant; the others get their input's shape hidden (graphsurgeon then
    leaves them alone) and the caller restores it.
    """
    hidden = []
    for node in graph.nodes:
        if node.op != "Shape" or not ({"start", "end"} & set(node.attrs)):
            continue
        tensor = node.inputs[0]
        shape = tensor.shape
        if shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            out = node.outputs[0]
            out.to_constant(np.array(shape[node.attrs.get("start", 0):node.attrs.get("end", len(shape))],
                                     dtype=np.int64))
            out.inputs.clear()
        elif shape is not None:
            hidden.append((tensor, shape))
            tensor.shape = None
    return hidden


def fold(graph: gs.Graph) -> gs.Graph:
    """Fold constant subgraphs in place, quietly; returns the graph."""
    hidden = _fold_ranged_shapes(graph)
    with quiet_graphsurgeon():
        try:
            graph.fold_constants(error_ok=True)
        finally:
            for tensor, shape in hidden:
                if isinstance(tensor, gs.Variable):  # not folded meanwhile
                    tensor.shape = shape
        graph.cleanup().toposort()
    return graph


#: Rounds of shape inference + folding before giving up on sizes computed from sizes.
MAX_FOLD_ROUNDS = 8


def fold_shapes(graph: gs.Graph) -> gs.Graph:
    """Infer shapes and fold again while that folds more ``Shape`` reads; returns the (new) graph.

    Each round makes the shapes computed from the previous round's folds
    static (computed Pad amounts, then the windows of the padded tensor, ...):
    the TorchScript export of Swin needs several.  Stops as soon as a round
    removes no node; reads of dynamic dims stay as they are.
    """
    for _ in range(MAX_FOLD_ROUNDS):
        if not any(n.op == "Shape" for n in graph.nodes):
            break
        before = len(graph.nodes)
        try:  # exported without its large weights: rounds stay cheap and copy nothing
            graph = fold(_reimported(graph, lambda g: infer_shapes_fast(gs.export_onnx(g, do_type_check=False),
                                                                         data_prop=True)))
        except Exception:  # noqa: BLE001 - inference is best effort on exotic graphs
            break
        if len(graph.nodes) == before:
            break
    return graph


_LIBC = None


def release_freed_memory(collect: bool = False) -> None:
    """Give memory freed since the last call back to the operating system.

    ``collect`` first runs Python's full cycle collection, for garbage that
    only it frees (onnx-graphsurgeon's exports leave reference cycles that
    hold a graph's tensors: 27 MB after ResNet-50's rewrite).

    glibc's allocator keeps freed blocks for reuse, and after a large block
    is freed it raises its threshold for mapping new ones separately: an
    onnxruntime session's buffers or a stage's arrays then stay in the
    process after they are gone (about 130 MB after ResNet-50's reference
    run).  ``malloc_trim`` returns them; elsewhere this does nothing.
    """
    if collect:
        import gc

        gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc():
    """The C library through ctypes, or None when it cannot be loaded."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC or None


#: Allocations at least this large get their own memory mapping (see :func:`map_large_allocations`).
MMAP_THRESHOLD = 1 << 20


def map_large_allocations() -> None:
    """Make glibc map every allocation of 1 MB or more separately, for the rest of the process.

    By default glibc raises this threshold (up to 32 MB) each time such a
    block is freed, so later weight-sized arrays come from the heap, where
    freed ones fragment and stay in the process: ResNet-50 at 0.5 peaked at
    372 MB with the default and at 319 MB with a fixed 1 MB threshold, for
    ~0.7 CPU s more of page faults.  Process-wide, so the command line sets
    it (a library user's process keeps its own allocator settings), and only
    for data-free runs: with calibration data, recovery allocates and frees
    batch-sized arrays thousands of times, and a fresh mapping for each costs
    a page fault per 4 kB (torchvision vit_b_16 with 256 images: 99 instead
    of 41 s of system time, 287 (sampled by py-spy) instead of 225 s wall, for 4.45 instead of
    4.63 GB peak).  A no-op outside glibc.
    """
    mallopt = getattr(_libc(), "mallopt", None)  # glibc only
    if mallopt is not None:
        m_mmap_threshold = -3  # <malloc.h>
        mallopt(m_mmap_threshold, MMAP_THRESHOLD)


@dataclass
class LoadedModel:
    """The user's model as loaded, and where it came from."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL and not mapped.is_mapped(t) for t in model.graph.initializer
    )


def _read_mapped(path: Path) -> onnx.ModelProto:
    """The model at ``path`` with its large weights mapped (:mod:`mapped`), or parsed whole when the
    wire scan fails, so that an unreadable file gets onnx's own reason."""
    try:
        return mapped.load_mapped(path)
    except PermissionError:
        raise
    except Exception:  # noqa: BLE001 - not a message the scan can walk, or a file that cannot be
        # memory-mapped (some network or FUSE file systems): onnx.load reads it whole or says why
        return onnx.load(str(path), load_external_data=False)


def load_model(source: str | os.PathLike | onnx.ModelProto, keep_mapped: bool = False) -> LoadedModel:
    """Read a model from a path or take a ModelProto.

    From a path, large float weights are mapped (:mod:`mapped`): with
    ``keep_mapped`` they stay in the file (or its external data) and are
    read on demand, so the caller holds no copy of the original weights
    (graphs from :func:`to_graph` read them; onnxruntime needs
    :func:`mapped.materialized` or the file); otherwise they are read in once at
    the end, an ordinary self-contained ModelProto.  Raises
    :class:`ModelError` with a one-line reason for anything unreadable.
    The input file is only ever opened for reading.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        path = None
        if _uses_external_data(model):
            raise ModelError(
                "the ModelProto refers to external data that is not loaded; "
                "pass the file path instead"
            )
        external = False
    else:
        path = Path(source)
        try:
            if not path.exists():
                raise ModelError(f"input model not found: {path}")
            if path.is_dir():
                raise ModelError(f"input model is a directory, not a file: {path}")
            if not os.access(path, os.R_OK):
                raise ModelError(f"input model is not readable (permission denied): {path}")
            if path.stat().st_size == 0:
                raise ModelError(f"input model is empty: {path}")
        except OSError as exc:
            raise ModelError(f"input model cannot be accessed: {path} ({_short(exc)})") from None
        try:
            model = _read_mapped(path)
        except PermissionError:
            raise ModelError(f"input model is not readable (permission denied): {path}") from None
        except Exception as exc:  # noqa: BLE001 - any parse failure means: not a model we can read
            raise ModelError(f"input is not a readable ONNX model: {path} ({_short(exc)})") from None
        if not model.graph.node and not model.graph.output:
            raise ModelError(f"input is not an ONNX model (no graph): {path}")
        external = _uses_external_data(model)
        if external:
            try:
                mapped.map_external(model, path.parent)
            except Exception as exc:  # noqa: BLE001 - missing, unreadable or outside the model's folder
                raise ModelError(
                    f"external data of {path} is missing or cannot be read: {_short(exc)}"
                ) from None
    _check_supported(model, path)
    if not keep_mapped:
        try:
            model = mapped.materialized(model)
        except OSError as exc:
            raise ModelError(f"input model cannot be read: {path} ({_short(exc)})") from None
    return LoadedModel(model=model, path=path, external_data=external)


def input_files(path: str | os.PathLike) -> list[Path]:
    """``path`` and the external data files it refers to (best effort: [path] if unreadable).

    These are the files a run must never write to.
    """
    path = Path(path)
    files = [path]
    try:
        if path.is_file():
            model = _read_mapped(path)
            for init in model.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    for entry in init.external_data:
                        if entry.key == "location" and entry.value:
                            data = path.parent / entry.value
                            if data not in files:
                                files.append(data)
    except Exception:  # noqa: BLE001 - an unreadable input is reported by load_model
        pass
    return files


def _short(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line (error messages are printed as one line)."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


#: Ops of quantized graphs: their weights are integers with scales, not float channels.
QUANTIZED_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QGemm", "QAttention",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
})

#: Domain of training ops (Gradient, Momentum, Adam, Adagrad).
TRAINING_DOMAIN = "ai.onnx.preview.training"


def _raw_sizes_ok(model: onnx.ModelProto) -> str | None:
    """Name of an initializer whose stored bytes do not match its shape (truncated data), or None."""
    for init in model.graph.initializer:
        if not init.HasField("raw_data") or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except Exception:  # noqa: BLE001 - exotic element types: not checked here
            continue
        if init.data_type in _PACKED_TYPES:
            continue
        if len(init.raw_data) != int(np.prod(init.dims, dtype=np.int64)) * itemsize:
            return init.name
    return None


def _non_utf8_field(msg) -> str | None:
    """Name of a text field that holds bytes that are not UTF-8 (a corrupt file), or None.

    proto2 parsing accepts such bytes and the python protobuf returns ``bytes``
    where ``str`` is expected, which breaks every later stage.  Tensor payloads
    are not visited (only their names), so this stays cheap on large models.
    """
    desc = msg.DESCRIPTOR
    if desc.name == "TensorProto":
        items = [(desc.fields_by_name[n], getattr(msg, n)) for n in ("name", "doc_string", "external_data")]
    else:
        items = msg.ListFields()
    for field, value in items:
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        if field.type == field.TYPE_STRING:
            if any(not isinstance(v, str) for v in values):
                return f"{desc.name}.{field.name}"
        elif field.type == field.TYPE_MESSAGE:
            for v in values:
                bad = _non_utf8_field(v)
                if bad:
                    return bad
    return None


_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                 if hasattr(onnx.TensorProto, n)} | {onnx.TensorProto.STRING}


def _check_supported(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Refuse, with a reason, models that are invalid or that the pipeline cannot handle.

    Invalid: fails onnx.checker (with strict shape inference), or weights whose
    stored bytes do not match their shape.  Refused: opset < 9, training
    graphs, quantized graphs.  The checker and shape inference run on
    copies without the mapped weights (:func:`_checkable`,
    :func:`weightless`): no copy of the weights is made.
    """
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"opset {opset} is not supported (need {MIN_OPSET} or newer); "
                         f"convert it first, e.g. with onnx.version_converter")
    bad_text = _non_utf8_field(model)
    if bad_text:
        raise ModelError(f"input model is corrupt: text field {bad_text} is not valid UTF-8")
    small = byte_size(model) < 2**31 - 1
    try:
        if small:
            onnx.checker.check_model(_checkable(model))
    except Exception as exc:  # noqa: BLE001 - ValidationError and C++ failures alike
        raise ModelError(f"input model fails onnx.checker: {_short(exc)}") from None
    bad = _raw_sizes_ok(model)
    if bad is not None:
        raise ModelError(f"input model is truncated or corrupt: weight '{bad}' does not hold as many "
                         f"values as its shape says")
    if model.training_info:
        raise ModelError("training graphs are not supported (the model has training_info); "
                         "export the model in inference (eval) mode")
    for node in model.graph.node:
        if node.domain == TRAINING_DOMAIN:
            raise ModelError(f"training graphs are not supported (found {node.op_type} node '{node.name}'); "
                             f"export the model in inference (eval) mode")
        if node.op_type == "BatchNormalization" and any(
                a.name == "training_mode" and a.i for a in node.attribute):
            raise ModelError(f"training-mode graphs are not supported (BatchNormalization '{node.name}' has "
                             f"training_mode=1); export the model in inference (eval) mode")
        if node.op_type in QUANTIZED_OPS:
            raise ModelError(f"quantized models are not supported (found {node.op_type} node '{node.name}'); "
                             f"prune the float model, then quantize it")
    if small:
        try:
            onnx.shape_inference.infer_shapes(weightless(model), check_type=True, strict_mode=True)
        except Exception as exc:  # noqa: BLE001 - InferenceError and C++ failures alike
            raise ModelError(f"input model fails ONNX shape inference: {_short(exc)}") from None


def check_light(model: onnx.ModelProto, full_check: bool = False) -> None:
    """``onnx.checker.check_model(model, full_check)`` without a serialised copy of the weights.

    Checking a ModelProto serialises it whole and parses it again in C++
    (+2x the weights: 55 MB at the end of ResNet-50's rewrite).  Here the
    byte count of every raw weight is checked against its shape in Python,
    and the checker runs on a copy whose large float weights are graph
    inputs of the same type and shape (:func:`_checkable`).  Raises what
    the checker raises.
    """
    bad = _raw_sizes_ok(model)
    if bad is not None:
        raise onnx.checker.ValidationError(f"weight '{bad}': its raw_data size does not match its shape")
    onnx.checker.check_model(_checkable(model, large=True), full_check=full_check)


def _checkable(model: onnx.ModelProto, large: bool = False) -> onnx.ModelProto:
    """``model`` for onnx.checker: mapped weights (and with ``large`` every large float weight)
    become graph inputs of their type and shape.

    The checker would read a mapped weight's file relative to the working
    directory; its size was checked when it was mapped (a large one's by
    the caller), and as an input it still defines the name every node reads.
    """
    if not large and not mapped.uses_mapped(model):
        return model
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    listed = {i.name for i in light.graph.input}
    for init in model.graph.initializer:
        if not (mapped.is_mapped(init) or (large and _left_out(init) and init.HasField("raw_data"))):
            light.graph.initializer.append(init)
        elif init.name not in listed:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx(model)``, with mapped weights read through :class:`mapped.MappedValues`."""
    graph = gs.import_onnx(model)
    if mapped.uses_mapped(model):
        for tensor in graph.tensors().values():
            if (isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues)
                    and not isinstance(tensor._values, SparseValues) and mapped.is_mapped(tensor._values.tensor)):
                stored = tensor._values.tensor
                tensor._values = mapped.MappedValues(stored)
                # Values written from here on are stored in the model (marked as onnx's loader
                # marks loaded external data, so the output is the same as from a loaded model).
                tensor.data_location = onnx.TensorProto.DEFAULT if mapped.from_external_file(stored) else None
    return graph


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Normalise a model into an onnx-graphsurgeon graph with inferred shapes.

    Constant nodes and constant subgraphs are folded into constants so that
    every weight is a :class:`gs.Constant`; stale ``value_info`` is dropped and
    shapes are re-inferred with data propagation (for Reshape targets).

    The weights are not copied: constants the model stores as initializers
    stay :class:`gs.LazyValues` that read ``model``'s tensors on demand (see
    :func:`constant_values`), so ``model`` must stay alive and unchanged while
    the graph is used.  Shapes are inferred on data-free copies.
    """
    graph = _import_inferred(model)
    # Shapes first: folding then also evaluates Shape ops on static shapes
    # (the legacy exporter computes chunk/split sizes from Shape).
    fold(graph)
    if _cast_like_to_cast(graph):
        fold(graph)
    graph = fold_shapes(graph)
    _name_nodes(graph)
    return infer_graph_shapes(graph, model)


def _import_inferred(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx(model)`` with the shapes inferred (data propagation on), without copying the weights.

    The shapes are inferred on a :func:`weightless` copy and lent to
    ``model`` for the import only (its ``value_info`` and outputs are put back
    afterwards), so the graph's constants refer to ``model``'s own tensors.
    """
    if byte_size(model) >= 2**31 - 1:
        return import_graph(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort on exotic graphs
        return import_graph(model)
    saved = {}
    for field in ("value_info", "output"):
        saved[field] = [_copied(v) for v in getattr(model.graph, field)]
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(getattr(inferred.graph, field))
    try:
        return import_graph(model)
    finally:
        for field, items in saved.items():
            del getattr(model.graph, field)[:]
            getattr(model.graph, field).extend(items)


def _copied(msg):
    copy = type(msg)()
    copy.CopyFrom(msg)
    return copy


def _tensor_dtype(values) -> int | None:
    """ONNX element type of a constant's values (LazyValues or array), None if it has none."""
    if isinstance(values, mapped.MappedValues):
        return values.data_type
    if isinstance(values, LazyValues):
        return values.tensor.data_type
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype)
    except (KeyError, TypeError, ValueError):
        return None


def _reimported(graph: gs.Graph, export) -> gs.Graph:
    """``gs.import_onnx(export(graph))``, where the export holds no large weights.

    Large floating-point constants are swapped for data-free placeholders
    while ``export`` runs (exporting and shape inference only read their
    names, types and dims) and the fresh graph gets the very same values
    back: no copy of the weights is serialised, parsed or kept.
    """
    swapped = {}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, SparseValues):
            continue
        values = tensor._values
        dtype = _tensor_dtype(values)
        if dtype in _FLOAT_TYPES and int(np.prod(values.shape)) > WEIGHTLESS_LIMIT:
            holder = onnx.TensorProto(name=tensor.name, dims=list(values.shape), data_type=dtype)
            if tensor.data_location is not None:
                holder.data_location = tensor.data_location
            swapped[tensor.name] = values
            tensor._values = LazyValues(holder)
    try:
        model = export(graph)
    finally:
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name in swapped:
                tensor._values = swapped[tensor.name]
    fresh = gs.import_onnx(model)
    for tensor in fresh.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.name in swapped:
            tensor._values = swapped[tensor.name]
    return fresh


def constant_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's array; one still backed by the loaded model is decoded, not cached in the graph.

    ``tensor.values`` would keep the decoded array in the graph, a second
    full copy of the weights beside the loaded model's; this one is freed by
    the caller once used.
    """
    if isinstance(tensor._values, LazyValues):
        return tensor._values.load()
    return np.asarray(tensor.values)


class WeightValues(Mapping):
    """Arrays of a graph's constants by name, read with :func:`constant_values` (not cached)."""

    def __init__(self, graph: gs.Graph, names):
        tensors = graph.tensors()
        self._tensors = {n: tensors[n] for n in names if n in tensors}

    def __getitem__(self, name: str) -> np.ndarray:
        return constant_values(self._tensors[name])

    def shape(self, name: str) -> tuple[int, ...]:
        """The constant's shape, without reading its values."""
        values = self._tensors[name]._values
        return tuple(values.shape)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _cast_like_to_cast(graph: gs.Graph) -> bool:
    """``CastLike(constant, x)`` -> ``Cast(constant, to=dtype of x)``, which constant folding can evaluate.

    CastLike reads only the element type of ``x``, yet a folder sees a
    non-constant input and keeps it.  The dynamo exporter without its optimiser
    builds the zero bias of every bias-free Conv this way; left unfolded, the
    bias is not a weight and the Conv's channels could not be pruned.
    Returns whether a node changed.
    """
    changed = False
    for node in graph.nodes:
        if node.op != "CastLike" or len(node.inputs) != 2 or not isinstance(node.inputs[0], gs.Constant):
            continue
        dtype = node.inputs[1].dtype
        if dtype is None:
            continue
        try:
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) if not isinstance(dtype, int) else dtype
        except (TypeError, KeyError, ValueError):
            continue
        node.op = "Cast"
        node.attrs = {"to": int(to), **{k: v for k, v in node.attrs.items() if k == "saturate"}}
        node.inputs = [node.inputs[0]]
        changed = True
    return changed


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique name: reports and rewrites refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def infer_graph_shapes(graph: gs.Graph, template: onnx.ModelProto) -> gs.Graph:
    """Re-run ONNX shape inference on a graph; returns a fresh graph (sharing the weights' arrays)."""
    return _reimported(graph, lambda g: to_model(g, template, infer=True))


def to_model(graph: gs.Graph, template: onnx.ModelProto, infer: bool = True) -> onnx.ModelProto:
    """Export a graph, keeping the template's model-level metadata.

    Shapes of intermediate tensors are cleared first so that no stale
    ``value_info`` survives a rewrite; shape inference then recomputes them.
    """
    io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in io:
            tensor.shape = None
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.functions[:]
    model.functions.extend(template.functions)
    model.graph.name = template.graph.name
    _keep_weight_inputs(model, template)
    if infer:
        try:
            model = infer_shapes_fast(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort on exotic graphs
            pass
    # Graph outputs keep the types the user declared (inference may turn a
    # symbolic dim into a number once computed sizes are folded).
    declared = {o.name: o for o in template.graph.output}
    for out in model.graph.output:
        if out.name in declared:
            out.type.CopyFrom(declared[out.name].type)
    return model


def _keep_weight_inputs(model: onnx.ModelProto, template: onnx.ModelProto) -> None:
    """Keep the template's graph inputs that are initializers, in the template's order.

    Old exporters (IR < 4, where this is required) and
    ``torch.onnx.export(keep_initializers_as_inputs=True)`` list weights as
    graph inputs; onnx-graphsurgeon drops them on import.  They are put back
    with their (possibly pruned) shapes so the graph keeps its input names, and
    for IR < 4 every initializer is listed, as the checker requires.
    """
    current = {vi.name: vi for vi in model.graph.input}
    weights = {init.name: init for init in model.graph.initializer}
    template_weights = {init.name: init for init in template.graph.initializer}
    wanted = [vi.name for vi in template.graph.input]
    if template.ir_version < 4:
        wanted += [name for name in weights if name not in wanted]
    if all(name in current for name in wanted if name in weights or name in template_weights):
        return
    inputs = []
    for name in wanted:
        if name in current:
            inputs.append(current.pop(name))
            continue
        init = weights.get(name)
        if init is None and name in template_weights:
            # A listed weight that the rewrite replaced (e.g. a shared Reshape shape): keep the
            # original, unused, so that the input name survives.
            init = template_weights[name]
            model.graph.initializer.append(mapped.materialized_tensor(init) if mapped.is_mapped(init) else init)
        if init is not None:
            inputs.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    inputs.extend(current.values())
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def params_count(model: onnx.ModelProto) -> int:
    """Number of weight values stored in the model (initializers and Constant nodes)."""
    total = 0
    for init in model.graph.initializer:
        total += int(np.prod(init.dims)) if init.dims else 1
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    total += int(np.prod(attr.t.dims)) if attr.t.dims else 1
    return total


def save_model(model: onnx.ModelProto, out: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Write ``model`` to ``out`` atomically; returns the files written.

    Everything is written into a temporary folder beside ``out`` and renamed
    into place at the end, so an interrupted run leaves no partial output.
    Large models (or ``external=True``) get their weights in ``OUT.data``.
    """
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    if external is None:
        external = byte_size(model) > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    tmpdir = None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnx_intrafusion-", dir=folder))
        tmp_model = tmpdir / out.name
        if external:
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(tmp_model))
        _check_written(tmp_model)
        written = []
        if external and (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, folder / data_name)
            written.append(folder / data_name)
        os.replace(tmp_model, out)
        written.insert(0, out)
        return written
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {_short(exc)}") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _check_written(path: Path) -> None:
    """The file we are about to rename into place must load and pass onnx.checker."""
    try:
        # The file as a later run reads it (large weights mapped, not read), checked without them.
        written = mapped.load_mapped(path)
        if _uses_external_data(written):
            mapped.map_external(written, path.parent)
        onnx.checker.check_model(_checkable(written))
    except Exception as exc:  # noqa: BLE001
        raise ValidationError(f"the written model fails onnx.checker (please report this bug): "
                              f"{_short(exc)}") from None


#: Size used for a dynamic input dimension other than the first (batch) one.
DEFAULT_DYNAMIC_DIM = 32


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[list[int | None], int]]:
    """Dims (None when dynamic) and element type of every real graph input.

    Inputs that are also initializers (old exporters list weights as inputs) are skipped.
    """
    weights = {i.name for i in model.graph.initializer}
    specs = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        ttype = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim]
        specs[inp.name] = (dims, ttype.elem_type)
    return specs


def concrete_input_shapes(model: onnx.ModelProto, batch: int = 1,
                          fill: int = DEFAULT_DYNAMIC_DIM) -> dict[str, tuple[list[int], int]]:
    """Concrete shape and element type of every real graph input.

    A dynamic first dimension is taken as the batch (``batch``); any other
    dynamic dimension becomes ``fill``.
    """
    return {
        name: ([d if d is not None else (batch if i == 0 else fill) for i, d in enumerate(dims)], elem_type)
        for name, (dims, elem_type) in input_specs(model).items()
    }


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[list[int], int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the given static shapes, shapes re-inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, value in zip(dims, shapes[inp.name][0]):
                d.Clear()
                d.dim_value = value
    del fixed.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)


#: Floating-point initializers with more elements than this are left out of
#: :func:`weightless` copies.
WEIGHTLESS_LIMIT = 1024

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # message field
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def weightless(model: onnx.ModelProto, limit: int = WEIGHTLESS_LIMIT) -> onnx.ModelProto:
    """A copy of ``model`` without the data of its large floating-point weights.

    Names, types and dims of every initializer are kept (small and integer
    ones, such as Reshape shapes, keep their values too), which is all that
    shape inference reads.  Inferring shapes on this copy is ~100x faster on
    a 100 MB model than on the model itself, which protobuf would serialise
    and parse in full.  Not a valid model: never save or run it.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for init in model.graph.initializer:
        if _left_out(init, limit):
            light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        else:
            light.graph.initializer.append(init)
    return light


def _left_out(init: onnx.TensorProto, limit: int = WEIGHTLESS_LIMIT) -> bool:
    return init.data_type in _FLOAT_TYPES and int(np.prod(init.dims)) > limit


def byte_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()`` (an upper bound, at most 16 bytes per weight over), without its cost.

    The python protobuf (upb) computes ``ByteSize()`` by serialising the
    whole message: a transient full copy of the weights (+250 MB peak on
    ResNet-50).  Here the large weights are counted from their shapes and
    the rest is measured on a :func:`weightless` copy.
    """
    size = weightless(model).ByteSize()
    for init in model.graph.initializer:
        if _left_out(init):
            size += int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize + 16
    return size


def infer_shapes_fast(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model, **kwargs)`` computed on :func:`weightless`.

    Returns ``model`` (edited in place) with the inferred ``value_info`` and
    graph outputs, exactly as inference on the full model gives them.
    """
    inferred = onnx.shape_inference.infer_shapes(weightless(model), **kwargs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model
