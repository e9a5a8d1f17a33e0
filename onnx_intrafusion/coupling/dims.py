"""Tensor dimensions as the analysis sees them, and shape vectors computed at run time.

Exporters often build Reshape targets at run time: ``Shape -> Gather ->
Mul/Div -> Unsqueeze -> Concat`` for a dynamic batch (``[B, S, C] -> [S,
B * heads, head_dim]`` in ``nn.MultiheadAttention``) or for sizes the
TorchScript exporter traced as tensors (Swin's window partition).  To follow
channels through them, :func:`dims` gives every tensor's dimensions as plain
ints in which a *symbolic* dimension (a named one like ``batch``, one that
shape inference could not name, one computed from a run-time read) stands for
a distinct prime above :data:`BOUND`.  Products of dimensions are then
compared and divided exactly (unique factorisation): ``B * 4`` equals ``4 *
B`` and nothing else, and no real size (below :data:`BOUND`) is ever divisible
by a symbol.  :func:`fixed` tells sizes known at analysis time from symbolic ones.

:func:`shape_entries` evaluates a computed shape vector entry by entry: a
stored constant (:class:`Entry`, which the rewrite can edit where it is
stored), a run-time read of a dimension, or arithmetic of those
(:class:`Computed`, e.g. ``batch * heads`` where ``heads`` is a stored
constant the rewrite can edit).
"""

from __future__ import annotations

import threading

import onnx_graphsurgeon as gs

from .rules import attr, norm_axis, slice_params
from .spaces import Context

#: Real sizes are below this bound; symbols are primes above it.
BOUND = 2**32


def fixed(d) -> bool:
    """Whether ``d`` is a size known at analysis time (not a symbol, not unknown)."""
    return isinstance(d, int) and 0 <= d < BOUND


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (plenty above BOUND)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


class _Symbols:
    """Name -> prime above BOUND; an unnamed (unknown) dimension gets a fresh prime each time."""

    def __init__(self):
        self._by_name: dict[str, int] = {}
        self._last = BOUND
        self._lock = threading.Lock()

    def _fresh(self) -> int:
        n = self._last + 1
        while not _is_prime(n):
            n += 1
        self._last = n
        return n

    def of(self, name: str | None) -> int:
        with self._lock:
            if name is None:
                return self._fresh()
            if name not in self._by_name:
                self._by_name[name] = self._fresh()
            return self._by_name[name]


_SYMBOLS = _Symbols()


def symbol(name: str | None = None) -> int:
    """The prime standing for dimension ``name``; a new unknown one when ``name`` is None."""
    return _SYMBOLS.of(name)


def _named(d) -> bool:
    """A symbolic dim the user (or the exporter) named, as opposed to one inference made up or lost."""
    return isinstance(d, str) and not d.startswith("unk__")


#: Ops whose output has the shape of their (broadcast) data inputs.
_SAME_SHAPE = frozenset(
    "Add Sub Mul Div Pow Where Relu Gelu Sigmoid Tanh Erf Exp Log Sqrt Neg Abs Cast Identity Dropout Softmax "
    "LogSoftmax Clip LayerNormalization".split())

#: Derivations stop this many producers back (the unknown dims of attention blocks are local).
_MAX_DEPTH = 24


def dims(ctx: Context, tensor: gs.Tensor, depth: int = 0) -> list[int] | None:
    """``tensor``'s dims as ints (symbols as primes, see the module doc); None when its rank is unknown.

    Dims that shape inference left unknown are derived from the producer
    (Reshape targets computed at run time, Transpose, element-wise ops,
    MatMul, Gemm) where it can tell them.
    """
    memo = ctx.dims
    if tensor.name in memo:
        return memo[tensor.name]
    shape = ctx.shape(tensor)
    if shape is None:
        return None
    if all(isinstance(d, int) or _named(d) for d in shape):
        out = [d if isinstance(d, int) else symbol(d) for d in shape]
    else:
        derived = _derived(ctx, tensor, depth) if depth < _MAX_DEPTH else None
        if derived is not None and len(derived) != len(shape):
            derived = None
        out = [d if isinstance(d, int) else
               derived[i] if derived is not None and derived[i] is not None else symbol(d)
               for i, d in enumerate(shape)]
        if depth >= _MAX_DEPTH:
            return out  # not memoised: a later call from closer by may derive more
    memo[tensor.name] = out
    return out


def _broadcast(shapes: list[list[int]]) -> list[int | None]:
    rank = max(len(s) for s in shapes)
    out: list[int | None] = []
    for i in range(rank):
        ds = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {1}
        out.append(ds.pop() if len(ds) == 1 else (1 if not ds else None))
    return out


def _derived(ctx: Context, tensor: gs.Tensor, depth: int) -> list[int | None] | None:
    """The output dims of ``tensor``'s producer, from its inputs' dims (None entries: not known)."""
    if not tensor.inputs:
        return None
    node = tensor.inputs[0]
    op = node.op

    def d(i: int) -> list[int] | None:
        return dims(ctx, node.inputs[i], depth + 1) if len(node.inputs) > i and node.inputs[i].name else None

    if op == "Reshape":
        x = d(0)
        entries = shape_entries(ctx, node.inputs[1])
        return None if x is None or entries is None else target_dims(ctx, entries, x,
                                                                    bool(int(attr(node, "allowzero", 0))))
    if op == "Transpose":
        x = d(0)
        if x is None:
            return None
        perm = list(attr(node, "perm", range(len(x))[::-1]))
        return [x[p] for p in perm]
    if op in _SAME_SHAPE:
        ins = [s for i in range(len(node.inputs)) if (s := d(i)) is not None]
        return _broadcast(ins) if ins and len(ins) == len([t for t in node.inputs if t.name]) else None
    if op == "MatMul":
        a, b = d(0), d(1)
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        return [*_broadcast([a[:-2], b[:-2]]), a[-2], b[-1]] if len(a) > 2 or len(b) > 2 else [a[-2], b[-1]]
    if op in ("Concat", "Slice", "Gather", "Squeeze", "Unsqueeze"):
        return _moved(ctx, node, [d(i) for i in range(len(node.inputs))])
    if op == "Gemm":
        a, b = d(0), d(1)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        return [a[1] if int(attr(node, "transA", 0)) else a[0], b[0] if int(attr(node, "transB", 0)) else b[1]]
    return None


def _moved(ctx: Context, node: gs.Node, ins: list) -> list[int | None] | None:
    """Output dims of Concat, Slice, Gather, Squeeze and Unsqueeze (constant operands) from the input dims."""
    x = ins[0]
    if x is None:
        return None
    rank = len(x)
    if node.op == "Concat":
        axis = norm_axis(int(attr(node, "axis", 0)), rank)
        if any(s is None or len(s) != rank for s in ins):
            return None
        return [sum(s[axis] for s in ins) if i == axis else x[i] for i in range(rank)]
    if node.op == "Slice":
        params = slice_params(ctx, node)
        if params is None:
            return None
        out: list[int | None] = list(x)
        for start, end, axis, step in zip(*params):
            a = norm_axis(axis, rank)
            out[a] = len(range(*slice(start, end, step).indices(x[a]))) if fixed(x[a]) else None
        return out
    if node.op == "Gather":
        idx = ctx.const(node.inputs[1])
        if idx is None:
            return None
        axis = norm_axis(int(attr(node, "axis", 0)), rank)
        return [*x[:axis], *idx.shape, *x[axis + 1:]]
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        val = ctx.const(node.inputs[1])
        axes = None if val is None else val.reshape(-1).tolist()
    if axes is None:
        return None
    if node.op == "Squeeze":
        gone = {norm_axis(int(a), rank) for a in axes}
        return [v for i, v in enumerate(x) if i not in gone]
    out_rank = rank + len(axes)
    added = {norm_axis(int(a), out_rank) for a in axes}
    rest = iter(x)
    return [1 if i in added else next(rest) for i in range(out_rank)]


class Entry(int):
    """A constant entry of a computed shape and where it is stored: ``source`` = (reader node, input, element)."""

    source: tuple


def entry(value: int, source: tuple) -> Entry:
    e = Entry(value)
    e.source = source
    return e


class Computed:
    """An entry computed at run time: its ``value`` (symbols as primes; None if not known).

    ``stored``/``factor``: the entry is ``stored * factor`` where ``stored``
    is a constant :class:`Entry` the rewrite can edit and ``factor`` is read at
    run time (``batch * heads``); None otherwise.
    """

    def __init__(self, value: int | None, reads: tuple = (), stored: Entry | None = None, factor: int | None = None):
        self.value, self.reads, self.stored, self.factor = value, reads, stored, factor


def reads(e) -> tuple:
    """The run-time reads ``(tensor, dim)`` that shape entry ``e`` depends on."""
    if isinstance(e, Computed):
        return e.reads
    return () if isinstance(e, Entry) else (e,)


#: Ops of shape arithmetic on scalars or 1-D int tensors.
_ARITH = ("Mul", "Div", "Add", "Sub", "Mod")


def shape_entries(ctx: Context, tensor: gs.Tensor, depth: int = 0, reader: gs.Node | None = None,
                  index: int = 0) -> list | None:
    """Entries of a 1-D int tensor computed from constants, Shape reads and arithmetic.

    Each entry is an :class:`Entry` (a constant, read by input ``index`` of
    ``reader``), ``(tensor, dim)``: the size of ``tensor``'s dimension ``dim``
    read at run time, or a :class:`Computed` value.  None when the
    computation is not understood.
    """
    val = ctx.const(tensor)
    if val is not None:
        return [entry(int(v), (reader, index, i)) for i, v in enumerate(val.reshape(-1))]
    if depth > 12 or not tensor.inputs:
        return None
    node = tensor.inputs[0]
    if node.op == "Concat" and int(attr(node, "axis", 0)) in (0, -1):
        out: list = []
        for k, t in enumerate(node.inputs):
            part = shape_entries(ctx, t, depth + 1, node, k)
            if part is None:
                return None
            out += part
        return out
    if node.op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape") and node.inputs:
        return shape_entries(ctx, node.inputs[0], depth + 1, node, 0)
    if node.op == "Shape":
        rank = ctx.rank(node.inputs[0])
        if rank is None:
            return None
        start = norm_axis(int(attr(node, "start", 0)), rank)
        end = attr(node, "end")
        end = rank if end is None else min(norm_axis(int(end), rank), rank)
        return [(node.inputs[0], d) for d in range(start, end)]
    if node.op == "Gather" and int(attr(node, "axis", 0)) == 0:
        src, idx = shape_entries(ctx, node.inputs[0], depth + 1, node, 0), ctx.const(node.inputs[1])
        if src is None or idx is None or idx.ndim > 1:
            return None
        return [src[int(i)] for i in idx.reshape(-1)]
    if node.op == "Slice":
        src, params = shape_entries(ctx, node.inputs[0], depth + 1, node, 0), slice_params(ctx, node)
        if src is None or params is None or len(params[0]) != 1:
            return None
        return src[slice(params[0][0], params[1][0], params[3][0])]
    if node.op == "ConstantOfShape":
        return _constant_of_shape(ctx, node, depth)
    if node.op == "Where" and len(node.inputs) == 3:
        return _where(ctx, node, depth)
    if node.op in _ARITH and len(node.inputs) == 2:
        a, b = (shape_entries(ctx, t, depth + 1, node, k) for k, t in enumerate(node.inputs))
        if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        n = max(len(a), len(b))
        a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
        return [_arith(ctx, node, x, y) for x, y in zip(a, b)]
    return None


def _constant_of_shape(ctx: Context, node: gs.Node, depth: int) -> list | None:
    """A 1-D fill of known length (``ConstantOfShape(Shape(v))``): constants stored nowhere the rewrite could edit."""
    n = shape_entries(ctx, node.inputs[0], depth + 1, node, 0)
    length = value(ctx, n[0]) if n is not None and len(n) == 1 else None
    if not fixed(length):
        return None
    fill = node.attrs.get("value")
    v = 0 if fill is None else int(getattr(fill, "values", fill).reshape(-1)[0])
    return [entry(v, (None, 0, 0)) for _ in range(length)]


def _where(ctx: Context, node: gs.Node, depth: int) -> list | None:
    """``Where(Equal(a, b), x, y)`` entry by entry, when every comparison is decided at analysis time.

    The TorchScript exporter writes ``expand(n, -1, -1)`` as ``Where(target == -1, 1, target)``.
    """
    cond = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if cond is None or cond.op != "Equal":
        return None
    parts = [shape_entries(ctx, t, depth + 1, cond, k) for k, t in enumerate(cond.inputs)]
    parts += [shape_entries(ctx, node.inputs[k], depth + 1, node, k) for k in (1, 2)]
    if any(p is None for p in parts):
        return None
    n = max(len(p) for p in parts)
    if any(len(p) not in (1, n) for p in parts):
        return None
    out = []
    for a, b, x, y in zip(*(p * n if len(p) == 1 else p for p in parts)):
        same = _equal(value(ctx, a), value(ctx, b))
        if same is None:
            return None
        out.append(x if same else y)
    return out


def _equal(a: int | None, b: int | None) -> bool | None:
    """Whether two shape entries are equal at run time; None when it depends on the input.

    Equal values are equal (the same symbol is the same dimension); two sizes
    known at analysis time, or a dimension (never negative) and a negative
    constant, are not; a dimension and a size may be either.
    """
    if a is None or b is None:
        return None
    if a == b:
        return True
    if a < BOUND and b < BOUND:
        return False
    return False if min(a, b) < 0 else None


def value(ctx: Context, e) -> int | None:
    """The value of a shape entry at analysis time (symbols as primes), None if not known."""
    if isinstance(e, Entry):
        return int(e)
    if isinstance(e, Computed):
        return e.value
    t, d = e
    shp = dims(ctx, t)
    return shp[d] if shp is not None and d < len(shp) else None


def _arith(ctx: Context, node: gs.Node, x, y):
    a, b = value(ctx, x), value(ctx, y)
    if isinstance(x, Entry) and isinstance(y, Entry) and a is not None and b is not None:
        # both constant: the result is a constant, but not stored anywhere the rewrite could edit
        v = _apply(node.op, a, b)
        return entry(v, (None, 0, 0)) if v is not None else Computed(None)
    out = None if a is None or b is None else _apply(node.op, a, b)
    read = reads(x) + reads(y)
    if node.op == "Mul" and out is not None:
        for stored, factor in ((x, b), (y, a)):
            if isinstance(stored, Entry) and stored.source[0] is not None:
                return Computed(out, read, stored, factor)
    return Computed(out, read)


def _apply(op: str, a: int, b: int) -> int | None:
    """``a op b`` as ONNX integer arithmetic; None when a symbol makes the result unknown."""
    if op == "Mul":
        return a * b
    if op == "Div":
        if b == 0:
            return None
        if a % b == 0:
            return a // b  # exact, symbols included
        if fixed(a) and fixed(b):
            return a // b
        return None
    if not (fixed(a) and fixed(b)):
        return None  # a sum with a symbol is no product of dims
    if op == "Add":
        return a + b
    if op == "Sub":
        return a - b
    return a % b if b else None  # Mod


def target_dims(ctx: Context, entries: list, ishape: list[int], allowzero: bool = False) -> list[int | None]:
    """The output dims of a Reshape of a tensor of dims ``ishape`` to ``entries`` (None: not known)."""
    out: list[int | None] = []
    for i, e in enumerate(entries):
        v = value(ctx, e)
        if isinstance(e, Entry) and v == 0 and not allowzero:
            v = ishape[i] if i < len(ishape) else None
        out.append(None if v is not None and v < 0 else v)
    unknown = [i for i, v in enumerate(out) if v is None]
    if len(unknown) == 1 and isinstance(entries[unknown[0]], Entry) and int(entries[unknown[0]]) == -1:
        total, rest = 1, 1
        for d in ishape:
            total *= d
        for v in out:
            rest *= v if v is not None else 1
        if rest and total % rest == 0:
            out[unknown[0]] = total // rest
    return out
