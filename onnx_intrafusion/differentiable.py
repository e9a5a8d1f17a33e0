"""Run an ONNX graph as a torch module, so that gradients flow through it.

Distillation and the gradient importances need derivatives of the model's
outputs with respect to its weights and to its intermediate tensors.  Existing
ONNX-to-torch converters failed on this project's exports (weights listed as
graph inputs, ReduceMean-18 with an axes input, Constant-node weights, encoder
exports) and name parameters after nodes.  So the graph we already hold (an
onnx-graphsurgeon graph from :func:`model_io.to_graph`) is executed directly:
one small torch function per op, in graph order.

* Every float weight constant is an ``nn.Parameter`` keyed by its constant
  (initializer) name; ``GraphModule.key[name]`` is its key in ``params``
  (``ParameterDict`` keys cannot hold dots).  Integer and shape constants, and
  float constants in operand slots that are not weights (Clip bounds, Resize
  scales, Pad values) are buffers.
* :meth:`GraphModule.weights` returns the trained values in the constants'
  own dtypes and :func:`assign` writes them into the same constants, so the
  model written afterwards is the same graph with new weight values; weights
  that did not change are not touched (zero steps give byte-identical
  initializers).

This module imports torch at import time; it is only imported when an option
that needs gradients is used (``pip install onnx-intrafusion[torch]``).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

Hook = Callable[[torch.Tensor], torch.Tensor]

#: (op, input index) operands that are hyper-parameters, never trained even when float.
NOT_WEIGHTS = {("Clip", 1), ("Clip", 2), ("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Pad", 2),
               ("Pow", 1), ("Dropout", 1), ("ConstantOfShape", 0)}


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    if key[0].isdigit():
        key = "_" + key
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _trainable(tensor: gs.Constant) -> bool:
    """Float constants are weights unless every use is a hyper-parameter slot or they are scalars."""
    values = tensor.values
    if not np.issubdtype(np.dtype(values.dtype), np.floating):
        return False
    if int(np.prod(tensor.shape)) <= 1:
        return False  # scale factors such as sqrt(head dim), epsilon, clip bounds
    return not all((node.op, node.inputs.index(tensor)) in NOT_WEIGHTS for node in tensor.outputs)


class GraphModule(nn.Module):
    """An onnx-graphsurgeon graph executed op by op in torch.

    ``forward(feeds)`` takes a dict of input tensors (or arrays) and returns a
    dict of output tensors.  ``hooks`` (tensor name -> function) replaces an
    intermediate tensor by ``fn(tensor)`` as soon as it is computed (masks
    for ProsPr); ``keep`` names intermediate tensors to return as well.
    ``params`` overrides parameters by constant name (functional use, for
    meta-gradients).
    """

    def __init__(self, graph: gs.Graph, dtype: torch.dtype | None = None):
        super().__init__()
        self.graph = graph
        self.nodes = list(graph.nodes)
        for node in self.nodes:
            if node.op not in OPS or node.domain not in ("", "ai.onnx", None):
                raise UsageError(f"the differentiable executor cannot run op '{node.op}' (node '{node.name}'); "
                                 f"gradient options (distill, taylor, prospr) need every op supported")
        self.params = nn.ParameterDict()
        self.key: dict[str, str] = {}  # constant name -> params key
        self.dtypes: dict[str, np.dtype] = {}
        self._buffers_by_name: dict[str, str] = {}
        taken: set[str] = set()
        float_dtype = dtype
        for name, tensor in graph.tensors().items():
            if not isinstance(tensor, gs.Constant):
                continue
            values = np.asarray(tensor.values)
            key = _sanitize(name, taken)
            if _trainable(tensor):
                self.dtypes[name] = values.dtype
                t = torch.from_numpy(np.array(values))
                if float_dtype is not None:
                    t = t.to(float_dtype)
                self.params[key] = nn.Parameter(t)
                self.key[name] = key
            else:
                t = torch.from_numpy(np.array(values))
                if float_dtype is not None and t.is_floating_point():
                    t = t.to(float_dtype)
                self.register_buffer("c_" + key, t, persistent=False)
                self._buffers_by_name[name] = "c_" + key
        self.float_dtype = float_dtype
        self.inputs = [t.name for t in graph.inputs]
        self.outputs = [t.name for t in graph.outputs]

    # -- running -------------------------------------------------------------------------------
    def forward(self, feeds: dict, hooks: dict[str, Hook] | None = None, keep: tuple[str, ...] = (),
                params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        device = self._device()
        env: dict[str, torch.Tensor] = {}
        for name in self.inputs:
            value = feeds[name]
            value = torch.as_tensor(value, device=device)
            if self.float_dtype is not None and value.is_floating_point():
                value = value.to(self.float_dtype)
            env[name] = value
        hooks = hooks or {}
        for name, fn in hooks.items():
            if name in env:
                env[name] = fn(env[name])
        for node in self.nodes:
            args = [self._value(t, env, params) for t in node.inputs]
            try:
                outs = OPS[node.op](self, node, *args)
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001 - an op we run wrongly is reported with its node
                raise UsageError(f"the differentiable executor failed on op '{node.op}' (node '{node.name}'): "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            if not isinstance(outs, (tuple, list)):
                outs = (outs,)
            for tensor, value in zip(node.outputs, outs):
                if tensor.name in hooks:
                    value = hooks[tensor.name](value)
                env[tensor.name] = value
        wanted = list(dict.fromkeys([*self.outputs, *keep]))
        return {name: env[name] for name in wanted}

    def _device(self) -> torch.device:
        for p in self.params.values():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _value(self, tensor, env, params):
        if tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name):
            return None  # an omitted optional input
        name = tensor.name
        if name in env:
            return env[name]
        if params is not None and name in params:
            return params[name]
        if name in self.key:
            return self.params[self.key[name]]
        if name in self._buffers_by_name:
            return getattr(self, self._buffers_by_name[name])
        raise UsageError(f"tensor '{name}' is used before it is computed (the graph is not in order)")

    # -- weights ---------------------------------------------------------------------------------
    def named_weights(self) -> dict[str, nn.Parameter]:
        """Parameters by constant (initializer) name."""
        return {name: self.params[key] for name, key in self.key.items()}

    def weights(self, only_changed: bool = True) -> dict[str, np.ndarray]:
        """Current weight values in their constants' own dtypes (by default only those that changed)."""
        consts = self.graph.tensors()
        out = {}
        for name, key in self.key.items():
            value = self.params[key].detach().cpu().numpy().astype(self.dtypes[name], copy=False)
            if only_changed and np.array_equal(value, np.asarray(consts[name].values)):
                continue
            out[name] = np.ascontiguousarray(value)
        return out


def assign(graph: gs.Graph, weights: dict[str, np.ndarray]) -> None:
    """Write new weight values into the graph's constants of the same names (shapes and dtypes kept)."""
    consts = graph.tensors()
    for name, value in weights.items():
        tensor = consts[name]
        old = np.asarray(tensor.values)
        if old.shape != value.shape:
            raise ValueError(f"weight '{name}' has shape {list(value.shape)}, expected {list(old.shape)}")
        tensor.values = np.ascontiguousarray(value.astype(old.dtype, copy=False))


# ------------------------------------------------------------------------------------------- ops
OPS: dict[str, Callable] = {}


def op(*names: str):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _ints(t) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]


def _attr(node, name, default=None):
    return node.attrs.get(name, default)


def _int_input_or_attr(node, args, index, attr):
    """An int-list operand given as input ``index`` (newer opsets) or attribute ``attr``."""
    if len(args) > index and args[index] is not None:
        return _ints(args[index])
    value = _attr(node, attr)
    return None if value is None else [int(v) for v in value]


_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def _float(mod, x):
    return x.to(mod.float_dtype) if mod.float_dtype is not None and x.is_floating_point() else x


# elementwise ------------------------------------------------------------------------------------
def _binary(fn):
    def run(mod, node, a, b):
        return fn(a, b)
    return run


OPS["Add"] = _binary(torch.add)
OPS["Sub"] = _binary(torch.sub)
OPS["Mul"] = _binary(torch.mul)
OPS["Equal"] = _binary(torch.eq)
OPS["Less"] = _binary(torch.lt)
OPS["LessOrEqual"] = _binary(torch.le)
OPS["Greater"] = _binary(torch.gt)
OPS["GreaterOrEqual"] = _binary(torch.ge)
OPS["And"] = _binary(torch.logical_and)
OPS["Or"] = _binary(torch.logical_or)
OPS["Pow"] = _binary(lambda a, b: torch.pow(a, b.to(a.dtype) if a.is_floating_point() else b))


@op("Div")
def _div(mod, node, a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Mod")
def _mod(mod, node, a, b):
    return torch.fmod(a, b) if _attr(node, "fmod", 0) else torch.remainder(a, b)


def _unary(fn):
    def run(mod, node, x):
        return fn(x)
    return run


for _name, _fn in {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
                   "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
                   "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
                   "Not": torch.logical_not, "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus,
                   "Sign": torch.sign, "IsNaN": torch.isnan, "Round": torch.round}.items():
    OPS[_name] = _unary(_fn)


@op("Identity", "Dropout")
def _identity(mod, node, x, *rest):
    return (x, torch.ones_like(x, dtype=torch.bool)) if len(node.outputs) > 1 else x


@op("LeakyRelu")
def _leaky(mod, node, x):
    return F.leaky_relu(x, float(_attr(node, "alpha", 0.01)))


@op("Elu")
def _elu(mod, node, x):
    return F.elu(x, float(_attr(node, "alpha", 1.0)))


@op("PRelu")
def _prelu(mod, node, x, slope):
    return torch.where(x >= 0, x, x * slope)


@op("HardSigmoid")
def _hardsigmoid(mod, node, x):
    return torch.clamp(float(_attr(node, "alpha", 0.2)) * x + float(_attr(node, "beta", 0.5)), 0.0, 1.0)


@op("HardSwish")
def _hardswish(mod, node, x):
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@op("Gelu")
def _gelu(mod, node, x):
    return F.gelu(x, approximate="tanh" if _attr(node, "approximate", "none") == "tanh" else "none")


@op("Clip")
def _clip(mod, node, x, lo=None, hi=None):
    if lo is None and "min" in node.attrs:
        lo = node.attrs["min"]
    if hi is None and "max" in node.attrs:
        hi = node.attrs["max"]
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return torch.clamp(x, lo, hi)


@op("Where")
def _where(mod, node, cond, a, b):
    return torch.where(cond.bool(), a, b)


@op("Max", "Min", "Sum", "Mean")
def _variadic(mod, node, *xs):
    fn = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[node.op]
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out / len(xs) if node.op == "Mean" else out


@op("Cast")
def _cast(mod, node, x):
    dtype = _ONNX_TO_TORCH.get(int(_attr(node, "to")))
    if dtype is None:
        raise UsageError(f"the differentiable executor cannot cast to ONNX type {_attr(node, 'to')} "
                         f"(node '{node.name}')")
    if dtype.is_floating_point and mod.float_dtype is not None:
        dtype = mod.float_dtype
    return x.to(dtype)


@op("CastLike")
def _castlike(mod, node, x, like):
    return x.to(like.dtype)


# linear -----------------------------------------------------------------------------------------
def _pads(node, rank: int, args_pads=None) -> list[int]:
    pads = [int(p) for p in _attr(node, "pads", [0] * (2 * rank))]
    return pads


def _auto_pad(node, x, kernel, strides, dilations) -> list[int] | None:
    mode = _attr(node, "auto_pad", "NOTSET")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode in ("NOTSET", ""):
        return None
    rank = len(kernel)
    if mode == "VALID":
        return [0] * (2 * rank)
    begin, end = [], []
    for i in range(rank):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small = total // 2
        big = total - small
        if mode == "SAME_UPPER":
            begin.append(small), end.append(big)
        else:
            begin.append(big), end.append(small)
    return begin + end


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] (leading axes first) -> torch (last axis first) pairs."""
    rank = len(pads) // 2
    out = []
    for i in reversed(range(rank)):
        out += [pads[i], pads[rank + i]]
    return out


def _spatial(node, x, kernel):
    rank = len(kernel)
    strides = [int(s) for s in _attr(node, "strides", [1] * rank)]
    dilations = [int(d) for d in _attr(node, "dilations", [1] * rank)]
    pads = _auto_pad(node, x, kernel, strides, dilations)
    if pads is None:
        pads = [int(p) for p in _attr(node, "pads", [0] * (2 * rank))]
    return strides, dilations, pads


@op("Conv")
def _conv(mod, node, x, w, b=None):
    rank = w.dim() - 2
    kernel = list(w.shape[2:])
    strides, dilations, pads = _spatial(node, x, kernel)
    group = int(_attr(node, "group", 1))
    if pads[:rank] == pads[rank:]:
        padding = pads[:rank]
    else:
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * rank
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return fn(x, w, b, strides, padding, dilations, group)


@op("ConvTranspose")
def _conv_transpose(mod, node, x, w, b=None):
    rank = w.dim() - 2
    strides = [int(s) for s in _attr(node, "strides", [1] * rank)]
    dilations = [int(d) for d in _attr(node, "dilations", [1] * rank)]
    pads = [int(p) for p in _attr(node, "pads", [0] * (2 * rank))]
    out_pad = [int(p) for p in _attr(node, "output_padding", [0] * rank)]
    if pads[:rank] != pads[rank:] or "output_shape" in node.attrs:
        raise UsageError(f"the differentiable executor cannot run ConvTranspose with asymmetric pads or "
                         f"output_shape (node '{node.name}')")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    return fn(x, w, b, strides, pads[:rank], out_pad, int(_attr(node, "group", 1)), dilations)


@op("Gemm")
def _gemm(mod, node, a, b, c=None):
    if _attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(node, "transB", 0):
        b = b.transpose(0, 1)
    out = float(_attr(node, "alpha", 1.0)) * (a @ b)
    if c is not None:
        out = out + float(_attr(node, "beta", 1.0)) * c
    return out


@op("MatMul")
def _matmul(mod, node, a, b):
    return torch.matmul(a, b)


@op("Einsum")
def _einsum(mod, node, *xs):
    eq = _attr(node, "equation")
    return torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *xs)


# normalisation ------------------------------------------------------------------------------------
def _channel_shape(x, size):
    return [1, size] + [1] * (x.dim() - 2)


@op("BatchNormalization")
def _batchnorm(mod, node, x, scale, bias, mean, var):
    eps = float(_attr(node, "epsilon", 1e-5))
    shape = _channel_shape(x, x.shape[1])
    inv = scale / torch.sqrt(var + eps)
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


@op("InstanceNormalization")
def _instancenorm(mod, node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(_attr(node, "epsilon", 1e-5)))


@op("LayerNormalization")
def _layernorm(mod, node, x, scale, bias=None):
    axis = int(_attr(node, "axis", -1)) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (x - mean) / torch.sqrt(var + float(_attr(node, "epsilon", 1e-5))) * scale
    out = out if bias is None else out + bias
    return (out, mean, torch.rsqrt(var)) if len(node.outputs) > 1 else out


@op("Softmax", "LogSoftmax")
def _softmax(mod, node, x):
    axis = int(_attr(node, "axis", -1))
    return torch.softmax(x, axis) if node.op == "Softmax" else torch.log_softmax(x, axis)


# pooling / reductions ---------------------------------------------------------------------------
@op("MaxPool", "AveragePool")
def _pool(mod, node, x):
    kernel = [int(k) for k in _attr(node, "kernel_shape")]
    rank = len(kernel)
    strides, dilations, pads = _spatial(node, x, kernel)
    ceil = bool(_attr(node, "ceil_mode", 0))
    if node.op == "MaxPool":
        if pads[:rank] != pads[rank:] or any(p > k // 2 for p, k in zip(pads, kernel * 2)):
            x = F.pad(x, _torch_pad(pads), value=-math.inf)
            padding = [0] * rank
        else:
            padding = pads[:rank]
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
        out = fn(x, kernel, strides, padding, dilations, ceil_mode=ceil)
        return (out, torch.zeros_like(out, dtype=torch.int64)) if len(node.outputs) > 1 else out
    include = bool(_attr(node, "count_include_pad", 0))
    if pads[:rank] != pads[rank:] or any(p > k // 2 for p, k in zip(pads, kernel * 2)):
        if not include and any(pads):
            raise UsageError(f"the differentiable executor cannot run AveragePool with asymmetric pads "
                             f"excluded from the count (node '{node.name}')")
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * rank
    else:
        padding = pads[:rank]
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
    return fn(x, kernel, strides, padding, ceil_mode=ceil, count_include_pad=include)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(mod, node, x):
    dims = tuple(range(2, x.dim()))
    return x.mean(dim=dims, keepdim=True) if node.op == "GlobalAveragePool" else x.amax(dim=dims, keepdim=True)


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin,
           "ReduceProd": None, "ReduceL2": None, "ReduceSumSquare": None}


@op(*_REDUCE)
def _reduce(mod, node, x, axes=None):
    axes = _int_input_or_attr(node, [x, axes], 1, "axes")
    keep = bool(_attr(node, "keepdims", 1))
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    dims = tuple(a % x.dim() for a in axes)
    if node.op == "ReduceL2":
        return torch.sqrt((x * x).sum(dim=dims, keepdim=keep))
    if node.op == "ReduceSumSquare":
        return (x * x).sum(dim=dims, keepdim=keep)
    if node.op == "ReduceProd":
        out = x
        for d in sorted(dims, reverse=True):
            out = out.prod(dim=d, keepdim=keep)
        return out
    return _REDUCE[node.op](x, dim=dims, keepdim=keep)


@op("ArgMax", "ArgMin")
def _arg(mod, node, x):
    fn = torch.argmax if node.op == "ArgMax" else torch.argmin
    return fn(x, dim=int(_attr(node, "axis", 0)), keepdim=bool(_attr(node, "keepdims", 1)))


# shape ----------------------------------------------------------------------------------------------
@op("Flatten")
def _flatten(mod, node, x):
    axis = int(_attr(node, "axis", 1)) % max(x.dim(), 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


@op("Reshape")
def _reshape(mod, node, x, shape):
    shape = _ints(shape)
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(mod, node, x):
    perm = _attr(node, "perm")
    perm = list(reversed(range(x.dim()))) if perm is None else [int(p) for p in perm]
    return x.permute(perm)


@op("Shape")
def _shape(mod, node, x):
    dims = list(x.shape)
    start, end = int(_attr(node, "start", 0)), _attr(node, "end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@op("Size")
def _size(mod, node, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Gather")
def _gather(mod, node, x, idx):
    axis = int(_attr(node, "axis", 0)) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


@op("GatherElements")
def _gather_elements(mod, node, x, idx):
    axis = int(_attr(node, "axis", 0)) % x.dim()
    idx = idx.long()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@op("Unsqueeze")
def _unsqueeze(mod, node, x, axes=None):
    axes = _int_input_or_attr(node, [x, axes], 1, "axes")
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Squeeze")
def _squeeze(mod, node, x, axes=None):
    axes = _int_input_or_attr(node, [x, axes], 1, "axes")
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@op("Concat")
def _concat(mod, node, *xs):
    xs = [x for x in xs if x is not None]
    dtype = torch.promote_types(xs[0].dtype, xs[-1].dtype)
    return torch.cat([x.to(dtype) for x in xs], dim=int(_attr(node, "axis")))


@op("Split")
def _split(mod, node, x, split=None):
    axis = int(_attr(node, "axis", 0))
    sizes = _int_input_or_attr(node, [x, split], 1, "split")
    if sizes is None:
        n = int(_attr(node, "num_outputs", len(node.outputs)))
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(mod, node, x, starts=None, ends=None, axes=None, steps=None):
    if starts is None:  # opset < 10: attributes
        starts, ends, axes = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        dim = x.shape[a]
        if st > 0:
            s = max(0, min(dim, s + dim if s < 0 else s))
            e = max(0, min(dim, e + dim if e < 0 else e))
            index[a] = slice(s, max(s, e), st)
        else:
            # Negative step: indices s, s+st, ... > e, gathered explicitly.
            s = max(0, min(dim - 1, s + dim if s < 0 else s))
            e = max(-1, min(dim - 1, e + dim if e < 0 else e))
            flips.append((a, torch.arange(s, e, st, device=x.device)))
    out = x[tuple(index)]
    for a, idx in flips:
        out = torch.index_select(out, a, idx)
    return out


@op("Expand")
def _expand(mod, node, x, shape):
    shape = _ints(shape)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


@op("Tile")
def _tile(mod, node, x, repeats):
    return x.repeat(_ints(repeats))


@op("ConstantOfShape")
def _constant_of_shape(mod, node, shape):
    value = _attr(node, "value")
    arr = np.zeros(1, np.float32) if value is None else np.asarray(value.values).reshape(-1)
    t = _float(mod, torch.from_numpy(np.array(arr)).to(shape.device))
    return t.expand(_ints(shape)).clone()


@op("Constant")
def _constant(mod, node):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            arr = np.asarray(value.values if isinstance(value, gs.Constant) else value)
            return _float(mod, torch.from_numpy(np.array(arr)).to(mod._device()))
    raise UsageError(f"the differentiable executor cannot read Constant node '{node.name}'")


@op("Range")
def _range(mod, node, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@op("Trilu")
def _trilu(mod, node, x, k=None):
    k = 0 if k is None else int(k.item())
    return torch.triu(x, k) if _attr(node, "upper", 1) else torch.tril(x, k)


@op("Pad")
def _pad(mod, node, x, pads=None, value=None, axes=None):
    pads = _int_input_or_attr(node, [x, pads], 1, "pads")
    rank = x.dim()
    if axes is not None:
        full = [0] * (2 * rank)
        ax = [a % rank for a in _ints(axes)]
        for i, a in enumerate(ax):
            full[a], full[rank + a] = pads[i], pads[len(ax) + i]
        pads = full
    mode = _attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    fill = float(value.item()) if value is not None else float(_attr(node, "value", 0.0))
    # Trailing all-zero pairs can be skipped, torch pads the last axes first.
    torch_pads = _torch_pad(pads)
    while torch_pads and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    if not torch_pads:
        return x
    if mode == "constant":
        return F.pad(x, torch_pads, value=fill)
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


@op("Resize", "Upsample")
def _resize(mod, node, x, roi=None, scales=None, sizes=None):
    if node.op == "Upsample":
        scales, roi = roi, None
    mode = _attr(node, "mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
    coord = coord.decode() if isinstance(coord, bytes) else coord
    spatial = x.dim() - 2
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        scale = None
    else:
        scale = [float(s) for s in scales.reshape(-1).tolist()][2:]
        size = [int(math.floor(d * s)) for d, s in zip(x.shape[2:], scale)]
    if mode == "nearest":
        nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
        if coord == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=size, mode="nearest")
        if coord in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor") \
                and scale and all(float(s).is_integer() for s in scale):
            return F.interpolate(x, size=size, mode="nearest")
        if coord == "half_pixel" and nearest == "floor":
            return F.interpolate(x, size=size, mode="nearest-exact")
    elif mode == "linear" and spatial in (1, 2, 3):
        kind = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
        if coord == "align_corners":
            return F.interpolate(x, size=size, mode=kind, align_corners=True)
        if coord in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=size, mode=kind, align_corners=False)
    raise UsageError(f"the differentiable executor cannot run Resize mode={mode} "
                     f"coordinate_transformation_mode={coord} (node '{node.name}')")


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(mod, node, x):
    b = int(_attr(node, "blocksize"))
    if node.op == "SpaceToDepth":
        return F.pixel_unshuffle(x, b)
    mode = _attr(node, "mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "CRD":
        return F.pixel_shuffle(x, b)
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


__all__ = ["GraphModule", "assign", "OPS"]
