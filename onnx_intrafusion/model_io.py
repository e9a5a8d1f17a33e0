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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import ModelError, OutputError

#: Models whose serialised size passes this are saved with external data
#: (protobuf cannot hold more than 2 GiB in one message).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000

MIN_OPSET = 9


@dataclass
class LoadedModel:
    """The user's model as loaded, and where it came from."""

    model: onnx.ModelProto
    path: Path | None
    external_data: bool


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Read a model from a path or take a ModelProto; external data is loaded.

    Raises :class:`ModelError` with a one-line reason for anything unreadable.
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
        if not path.exists():
            raise ModelError(f"input model not found: {path}")
        if path.is_dir():
            raise ModelError(f"input model is a directory, not a file: {path}")
        if not os.access(path, os.R_OK):
            raise ModelError(f"input model is not readable: {path}")
        if path.stat().st_size == 0:
            raise ModelError(f"input model is empty: {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
            raise ModelError(f"input is not a readable ONNX model: {path} ({_short(exc)})") from None
        if not model.graph.node and not model.graph.output:
            raise ModelError(f"input is not an ONNX model (no graph): {path}")
        external = _uses_external_data(model)
        if external:
            try:
                onnx.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError) as exc:
                raise ModelError(
                    f"external data of {path} cannot be read: {_short(exc)}"
                ) from None
    _check_supported(model)
    return LoadedModel(model=model, path=path, external_data=external)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def _check_supported(model: onnx.ModelProto) -> None:
    """Refuse, with a reason, models the rest of the pipeline cannot handle."""
    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"input model fails onnx.checker: {_short(exc)}") from None
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"opset {opset} is not supported (need {MIN_OPSET} or newer)")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Normalise a model into an onnx-graphsurgeon graph with inferred shapes.

    Constant nodes and constant subgraphs are folded into constants so that
    every weight is a :class:`gs.Constant`; stale ``value_info`` is dropped and
    shapes are re-inferred with data propagation (for Reshape targets).
    """
    graph = gs.import_onnx(_inferred(model))
    # Shapes first: folding then also evaluates Shape ops on static shapes
    # (the legacy exporter computes chunk/split sizes from Shape).
    graph.fold_constants(error_ok=True).cleanup().toposort()
    if any(n.op == "Shape" for n in graph.nodes):
        # Folding may have made more shapes static (computed Pad amounts): once more.
        graph = gs.import_onnx(_inferred(gs.export_onnx(graph, do_type_check=False)))
        graph.fold_constants(error_ok=True).cleanup().toposort()
    _name_nodes(graph)
    return infer_graph_shapes(graph, model)


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ByteSize() >= 2**31 - 1:
        return model
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort on exotic graphs
        return model


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
    """Re-run ONNX shape inference on a graph; returns a fresh graph."""
    model = to_model(graph, template, infer=True)
    return gs.import_onnx(model)


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
    if infer and model.ByteSize() < 2**31 - 1:
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - inference is best effort on exotic graphs
            pass
    # Graph outputs keep the types the user declared (inference may turn a
    # symbolic dim into a number once computed sizes are folded).
    declared = {o.name: o for o in template.graph.output}
    for out in model.graph.output:
        if out.name in declared:
            out.type.CopyFrom(declared[out.name].type)
    return model


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
        external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = out.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnx_intrafusion-", dir=folder))
    try:
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
        shutil.rmtree(tmpdir, ignore_errors=True)


#: Size used for a dynamic input dimension other than the first (batch) one.
DEFAULT_DYNAMIC_DIM = 32


def concrete_input_shapes(model: onnx.ModelProto, batch: int = 1,
                          fill: int = DEFAULT_DYNAMIC_DIM) -> dict[str, tuple[list[int], int]]:
    """Concrete shape and element type of every real graph input.

    A dynamic first dimension is taken as the batch (``batch``); any other
    dynamic dimension becomes ``fill``.  Inputs that are also initializers
    (old exporters list weights as inputs) are skipped.
    """
    weights = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        ttype = inp.type.tensor_type
        dims = []
        for i, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(batch if i == 0 else fill)
        shapes[inp.name] = (dims, ttype.elem_type)
    return shapes


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
