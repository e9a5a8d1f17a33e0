"""Large weights read straight from the model file through memory maps.

Why: ``onnx.load`` reads the whole file into one ``bytes`` object and parses
it into a second full copy; the checker, given the path, reads it a third
time.  On a 100 MB model that is 300 MB before any work starts, and the
parsed copy stays for the whole run.  Here the file is scanned at the
protobuf wire level instead: everything but the ``raw_data`` of large
floating-point initializers is parsed (a few MB), and those initializers
become ONNX external-data references (absolute ``location``, ``offset``,
``length``) into the file they are stored in, the model file itself or its
external-data file.  :class:`MappedValues` reads one through a fresh
read-only memory map whenever its values are needed; the map goes when the
array does, so the weights never accumulate in the process's memory (the
operating system's page cache holds the file once, shared, and reclaimable).

Such a model is an in-memory form only: :func:`materialized` turns it into
an ordinary self-contained ModelProto (stages that run the original in
onnxruntime from memory need one), and onnx-graphsurgeon exports read the
values through :attr:`MappedValues.tensor`.  The input file is only ever
opened for reading.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnx
from onnx_graphsurgeon.ir.tensor import LazyValues

#: Floating-point initializers with more elements than this are mapped, not parsed.
MAPPED_MIN_ELEMENTS = 1024

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}

# Field numbers of onnx.proto (stable since IR version 3).
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 1, 2, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5


#: Marks a weight mapped from the model file itself (not from an external-data file).
_INLINE = "onnx_intrafusion_inline"


class WireError(ValueError):
    """The bytes are not a protobuf message this scanner can walk."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, field end, payload start) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, body = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        payload = body
        if wire == _VARINT:
            _, stop = _varint(buf, body, end)
        elif wire == _I64:
            stop = body + 8
        elif wire == _I32:
            stop = body + 4
        elif wire == _LEN:
            size, payload = _varint(buf, body, end)
            stop = payload + size
        else:
            raise WireError(f"unsupported wire type {wire}")
        if stop > end or field == 0:
            raise WireError("field runs past its message")
        yield field, wire, pos, stop, payload
        pos = stop


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:
    return _len_field(_TENSOR_EXTERNAL_DATA, _len_field(1, key.encode()) + _len_field(2, value.encode()))


def _tensor_numel_and_type(buf, start: int, end: int) -> tuple[int, int, tuple[int, int] | None, bool]:
    """(elements, data type, raw_data payload span or None, already external) of a TensorProto."""
    numel, dtype, raw, external = 1, 0, None, False
    for field, wire, _, stop, payload in _fields(buf, start, end):
        if field == _TENSOR_DIMS:
            if wire == _LEN:  # packed
                pos = payload
                while pos < stop:
                    dim, pos = _varint(buf, pos, stop)
                    numel *= dim
            else:
                dim, _ = _varint(buf, payload, stop)
                numel *= dim
        elif field == _TENSOR_DATA_TYPE and wire == _VARINT:
            dtype, _ = _varint(buf, payload, stop)
        elif field == _TENSOR_RAW_DATA and wire == _LEN:
            raw = (payload, stop)
        elif field == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = _varint(buf, payload, stop)[0] == onnx.TensorProto.EXTERNAL
    return numel, dtype, raw, external


def _itemsize(dtype: int) -> int | None:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
    except Exception:  # noqa: BLE001 - exotic element types are never mapped
        return None


def _stripped_tensor(buf, start: int, end: int, file: str) -> bytes:
    """The TensorProto in buf[start:end]: a mapped reference when it is a large float weight, else as is."""
    numel, dtype, raw, external = _tensor_numel_and_type(buf, start, end)
    itemsize = _itemsize(dtype)
    if (raw is None or external or dtype not in _FLOAT_TYPES or numel <= MAPPED_MIN_ELEMENTS
            or itemsize is None or raw[1] - raw[0] != numel * itemsize):
        # Kept in memory; a truncated weight is left for the checker to report.
        return bytes(buf[start:end])
    out = bytearray()
    for field, _, fstart, stop, _ in _fields(buf, start, end):
        if field != _TENSOR_RAW_DATA:
            out += buf[fstart:stop]
    out += _encode_varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _encode_varint(onnx.TensorProto.EXTERNAL)
    out += _entry("location", file) + _entry("offset", str(raw[0])) + _entry("length", str(raw[1] - raw[0]))
    out += _entry(_INLINE, "1")
    return bytes(out)


def _stripped_graph(buf, start: int, end: int, file: str) -> bytes:
    out = bytearray()
    for field, wire, fstart, stop, payload in _fields(buf, start, end):
        if field == _GRAPH_INITIALIZER and wire == _LEN:
            out += _len_field(field, _stripped_tensor(buf, payload, stop, file))
        else:
            out += buf[fstart:stop]
    return bytes(out)


def load_mapped(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at ``path`` with its large float initializers mapped (see the module docstring).

    Raises :class:`WireError` (or ``DecodeError``) when the file is not a
    protobuf message; the caller then reports it as it would any unreadable model.
    Initializers already stored as external data are left as they are
    (:func:`map_external` maps them once the folder is known to be safe).
    """
    path = Path(path)
    file = str(path.resolve())
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise WireError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out = bytearray()
            for field, wire, fstart, stop, payload in _fields(buf, 0, size):
                if field == _MODEL_GRAPH and wire == _LEN:
                    out += _len_field(field, _stripped_graph(buf, payload, stop, file))
                else:
                    out += buf[fstart:stop]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(out))
    return model


def map_external(model: onnx.ModelProto, folder: Path) -> None:
    """Turn the model's external-data initializers into mapped ones (absolute, checked locations).

    Large float ones get an absolute ``location`` and an explicit ``length``;
    the others are read into the model (shape inference needs small and
    integer values).  Raises ``ValueError`` with a reason for a location
    outside ``folder``, a missing file or data past its end.
    """
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor

    root = folder.resolve()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(init)
        if os.path.isabs(info.location):
            raise ValueError(f"'{init.name}' has an absolute location {info.location}")
        file = (root / info.location).resolve()
        if root not in file.parents:
            raise ValueError(f"'{init.name}' is stored outside the model's folder ({info.location})")
        if not file.is_file():
            raise ValueError(f"'{init.name}' should be in {info.location}, which does not exist")
        offset = int(info.offset or 0)
        itemsize = _itemsize(init.data_type)
        numel = int(np.prod(init.dims, dtype=np.int64))
        length = int(info.length) if info.length else (numel * itemsize if itemsize else file.stat().st_size - offset)
        if offset + length > file.stat().st_size:
            raise ValueError(f"'{init.name}' needs bytes {offset}-{offset + length} of {info.location}, "
                             f"which has {file.stat().st_size}")
        if (init.data_type in _FLOAT_TYPES and numel > MAPPED_MIN_ELEMENTS and itemsize
                and length == numel * itemsize):
            del init.external_data[:]
            for key, value in (("location", str(file)), ("offset", str(offset)), ("length", str(length))):
                init.external_data.add(key=key, value=value)
        else:
            load_external_data_for_tensor(init, str(root))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """A tensor this module mapped: external data at an absolute location."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    return os.path.isabs(location)


def from_external_file(tensor: onnx.TensorProto) -> bool:
    """A mapped tensor stored in an external-data file (not in the model file)."""
    return is_mapped(tensor) and not any(e.key == _INLINE for e in tensor.external_data)


def uses_mapped(model: onnx.ModelProto) -> bool:
    return any(is_mapped(t) for t in model.graph.initializer)


def _where(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def mapped_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A read-only array over a mapped tensor's bytes (a fresh map, released with the array)."""
    location, offset, length = _where(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    if tensor.data_type == onnx.TensorProto.BFLOAT16:  # stored as 16-bit words, as numpy_helper gives them
        dtype = np.dtype("<u2")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(location, "rb") as f:
        buf = mmap.mmap(f.fileno(), offset + length - start, access=mmap.ACCESS_READ, offset=start)
    arr = np.frombuffer(buf, dtype=dtype, count=length // dtype.itemsize, offset=offset - start)
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        return onnx.numpy_helper.to_array(_with_raw(tensor, arr.tobytes()))
    return arr.reshape(tuple(tensor.dims))


def _with_raw(tensor: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
    out = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type, raw_data=raw)
    if tensor.HasField("doc_string"):
        out.doc_string = tensor.doc_string
    if from_external_file(tensor):
        # As onnx.load_external_data_for_model leaves it (set explicitly): the same bytes when saved.
        out.data_location = onnx.TensorProto.DEFAULT
    return out


def materialized_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A self-contained copy of a mapped tensor (its bytes read from the file, unchanged)."""
    location, offset, length = _where(tensor)
    with open(location, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise OSError(f"{location} ended before byte {offset + length}")
    return _with_raw(tensor, raw)


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when nothing is mapped, else a copy with every mapped weight read in."""
    if not uses_mapped(model):
        return model
    full = onnx.ModelProto()
    full.CopyFrom(model)
    for init in full.graph.initializer:
        if is_mapped(init):
            init.CopyFrom(materialized_tensor(init))
    return full


class MappedValues(LazyValues):
    """onnx-graphsurgeon's lazy constant values for a mapped tensor.

    ``load()`` gives a read-only array over a fresh memory map; ``tensor``
    (what the graphsurgeon exporter writes) is a self-contained copy, so an
    exported model never refers to the input file.
    """

    def __init__(self, tensor: onnx.TensorProto):  # noqa: D107 - LazyValues' own __init__ sets `tensor`
        from onnx_graphsurgeon.importers.onnx_importer import get_itemsize, get_onnx_tensor_dtype

        self._mapped = tensor
        self.shape = tuple(int(d) for d in tensor.dims)
        self.dtype = get_onnx_tensor_dtype(tensor)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * get_itemsize(self.dtype)

    @property
    def data_type(self) -> int:
        return self._mapped.data_type

    @property
    def tensor(self) -> onnx.TensorProto:
        return materialized_tensor(self._mapped)

    def load(self) -> np.ndarray:
        return mapped_array(self._mapped)

    def __str__(self):
        return f"MappedValues (shape={self.shape}, dtype={self.dtype})"
