"""Stage 4: one channel map per group.

A :class:`ChannelMap` says how the C old channels of a group become k new
ones, as two k x C matrices applied along the channel axis of every member:

* ``average`` for producers and per-channel parameters: a new channel is the
  transport-weighted *average* of the old channels mapped onto it (rows sum
  to 1);
* ``total`` for consumers: a new channel's input weight is the *sum* of the
  consumer weights of the old channels mapped onto it (columns sum to 1).

Averaging producers and summing consumers is exact on duplicated channels.
The public Intra-Fusion reference sums on both sides, which scales the fused
activations by about C/k; we deliberately do not reproduce that.

Plain pruning is the 0/1 selection; Intra-Fusion is the optimal transport
plan (POT) from all C channels (source) to the k kept ones (target).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist, pdist, squareform

METHODS = ("intrafusion", "prune")
MARGINALS = ("uniform", "importance")
#: How L1 cost matrices are computed: ``auto`` = numba's kernel for runs large enough
#: (:func:`use_compiled`), ``compiled`` = whenever numba is installed, ``scipy`` = never.
COST_KERNELS = ("auto", "compiled", "scipy")


class ChannelMap:
    """How a group's C channels become k: ``kept`` (k,) ascending, and the two k x C matrices.

    ``average`` rows sum to 1, ``total`` columns sum to 1 (see the module
    docstring).  Both are stored sparse when they are (a selection has one 1
    per row, an exact transport plan at most C + k - 1 non-zeros): the dense
    matrices of ResNet-50's plans take 65 MB, kept until the rewrite.  The
    properties give dense arrays; :meth:`matrix` gives the stored form.
    """

    def __init__(self, kept: np.ndarray, average, total):
        self.kept = np.asarray(kept)
        self._average, self._total = _compact(average), _compact(total)

    def matrix(self, consumer: bool):
        """``total`` for consumers, ``average`` otherwise, as stored (sparse or dense)."""
        return self._total if consumer else self._average

    @property
    def average(self) -> np.ndarray:
        return _dense(self._average)

    @property
    def total(self) -> np.ndarray:
        return _dense(self._total)

    @property
    def size(self) -> int:
        return self._average.shape[1]

    @property
    def keep(self) -> int:
        return len(self.kept)

    @property
    def is_identity(self) -> bool:
        return self.keep == self.size and np.array_equal(self.average, np.eye(self.size))


def _compact(matrix):
    """CSR when at most a quarter of the entries are non-zero, else the dense array."""
    if sparse.issparse(matrix):
        return matrix.tocsr()
    matrix = np.asarray(matrix)
    return sparse.csr_matrix(matrix) if np.count_nonzero(matrix) <= 0.25 * matrix.size else matrix


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sparse.issparse(matrix) else matrix


def keep_count(size: int, sparsity: float, round_to: int = 1) -> int:
    """Channels kept: ``max(1, round((1 - sparsity) * size))``, optionally a multiple of ``round_to``.

    With ``round_to`` > 1 the count goes to the nearest of the counts a
    group may keep: a multiple of ``round_to`` (at least one), or all its
    channels (halves up).  Keeping all counts as a candidate because a group
    whose size is not a multiple would otherwise lose far more than asked at
    low sparsity: 24 channels at 0.1 (22 wanted) kept 16, a third fewer.  A
    group narrower than ``round_to`` keeps all of them.  The result is
    always in [1, size] and is ``size`` at sparsity 0.
    """
    keep = max(1, int(np.floor((1.0 - sparsity) * size + 0.5)))
    if round_to > 1 and keep < size:
        multiple = max(round_to, int(np.floor(keep / round_to + 0.5)) * round_to)
        keep = size if size - keep <= abs(multiple - keep) else multiple
    return int(min(size, keep))


def selection(size: int, kept: np.ndarray) -> ChannelMap:
    """Plain pruning: keep ``kept``, drop the rest."""
    sel = sparse.csr_matrix((np.ones(len(kept)), (np.arange(len(kept)), np.asarray(kept))), shape=(len(kept), size))
    return ChannelMap(np.asarray(kept), sel, sel.copy())


def normalised_features(rows: list) -> np.ndarray:
    """Concatenate a group's per-weight channel rows; scale each channel to unit L2 norm.

    ``rows`` holds arrays, or objects with a ``shape`` that ``np.asarray``
    reads (``planning.MemberRows``: read from the weights only when copied).
    Empties ``rows`` as it copies them, so that each member's rows (and
    anything cached with them) can be freed as soon as they are in the
    result (when the caller holds no other reference to them).
    """
    feats = np.empty((rows[0].shape[0], sum(r.shape[1] for r in rows)))
    at = 0
    while rows:  # cast while copying: no float64 copy of each member beside the result
        r = rows.pop(0)
        width = r.shape[1]
        feats[:, at:at + width] = np.asarray(r)
        at += width
        del r
    # In place and by row blocks (each row's norm is the same as over all rows at once):
    # the features of a wide group take 75 MB (ResNet-50), a temporary square of them as much.
    for start in range(0, len(feats), 256):
        block = feats[start:start + 256]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return feats


#: POT's optional array backends; the pruner only ever passes NumPy arrays.
POT_BACKEND_SWITCHES = ("POT_BACKEND_DISABLE_PYTORCH", "POT_BACKEND_DISABLE_JAX",
                        "POT_BACKEND_DISABLE_CUPY", "POT_BACKEND_DISABLE_TENSORFLOW")


#: Optional packages POT imports for features the pruner does not use (k-means starts of
#: low-rank Sinkhorn; graph clustering of quantized Gromov-Wasserstein): 0.13 CPU s and 25 MB.
POT_OPTIONAL_IMPORTS = ("sklearn", "networkx")


def preload_pot() -> None:
    """Import POT without its optional extras (no-op if it is already imported).

    ``import ot`` probes torch, jax, cupy and tensorflow and imports
    scikit-learn and networkx when installed: ~5 s of a ResNet-50 run, and
    torch's memory.  The backend switches are set with ``setdefault``, so a
    user's own environment settings win; a package the process has already
    imported is left visible.
    """
    if "ot" in sys.modules:
        return
    for key in POT_BACKEND_SWITCHES:
        os.environ.setdefault(key, "1")
    hidden = [name for name in POT_OPTIONAL_IMPORTS if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # POT treats it as not installed
    try:
        import ot  # noqa: F401
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_pot():
    """POT, imported the way this package needs it: without its torch/jax/cupy/tensorflow backends.

    Plain ``import ot`` imports torch when it is installed (seconds, and
    hundreds of MB for a data-free run that never uses it); only numpy
    arrays are passed to POT here.  If the caller's process already imported
    POT, that module is used as it is.
    """
    preload_pot()
    import ot

    return ot


#: Cost matrices with more element operations than this are split over threads.
PARALLEL_COST_WORK = 20_000_000


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


#: L1 cost matrices with more element operations than this use the compiled kernel
#: (:func:`_l1_kernel`); smaller ones go to SciPy, where the kept block comes from the
#: symmetric ``pdist`` (half the work) and no threads are started.
COMPILED_COST_WORK = 200_000_000

#: With only numba's kernel (the C extension not built), ``cost_kernel="auto"`` uses it
#: only in runs whose L1 cost matrices add up to at least this many element operations.
#: Loading numba's kernel takes ~0.3 CPU s and ~115 MB of memory for good; SciPy's
#: ``cdist`` costs ~0.4 CPU s more per 1e9 operations (torchvision ResNet-50 at 0.5:
#: 1e10 operations, peak memory 397 vs 294 MB, 3.9x vs 2.9x the file).  From 4e10 on
#: (ViT-B, VGG-16: >14 s saved) the kernel pays for its memory.  The C extension costs
#: no memory to speak of, so ``auto`` uses it for every run.
COMPILED_RUN_WORK = 40_000_000_000


def use_compiled(run_work: float, cost_kernel: str = "auto") -> bool:
    """Whether a run with ``run_work`` L1 element operations in all its cost matrices uses the kernel."""
    if cost_kernel == "compiled":
        return True
    return cost_kernel == "auto" and (_native_kernel() is not None or run_work >= COMPILED_RUN_WORK)


_NATIVE_KERNEL = None
_NUMBA_KERNEL = None


def _l1_kernel():
    """The compiled L1 kernel ``kernel(x, y, out)``: the C extension, else numba's, else None."""
    return _native_kernel() or _numba_kernel()


def _native_kernel():
    """The C extension's L1 kernel (``_l1.c``), or None where it was not built.

    Faster than :func:`_numba_kernel` (0.40 vs 0.61 CPU s for 1024 x 1024 x 4608,
    one thread; SciPy 2.6 s), without numba's ~115 MB and start-up.
    """
    global _NATIVE_KERNEL
    if _NATIVE_KERNEL is None:
        try:
            from . import _l1
        except ImportError:  # built without a C compiler
            _NATIVE_KERNEL = False
            return None

        def l1(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
            x, y = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)
            if out.dtype != np.float64 or not out.flags.c_contiguous or out.shape != (len(x), len(y)) \
                    or x.shape[1:] != y.shape[1:]:
                raise ValueError("l1: x (n, f), y (m, f) and a C-contiguous float64 out (n, m)")
            _l1.l1(x, y, out, x.shape[0], y.shape[0], x.shape[1] if x.ndim == 2 else 0)

        _NATIVE_KERNEL = l1
    return _NATIVE_KERNEL or None


def _numba_kernel():
    """numba L1 distance kernel (float64, blocked), or None without numba.

    SciPy's ``cdist("cityblock")`` runs a scalar loop; this one vectorises the
    feature axis, reuses each channel's row for four kept rows and keeps a
    block of kept rows in cache: ~4x faster per core on groups of ResNet-50's
    size (docs/results/plan_scaling.json).  Sums are float64 like SciPy's;
    only the summation order differs (relative differences ~1e-15), so the
    transport plans are the same (tested).  Compiled once per machine
    (numba's cache), released GIL so the row blocks run on all cores.
    """
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is None:
        try:
            import numba
        except Exception:  # noqa: BLE001 - not installed, or broken (e.g. a module shadowing `coverage`)
            _NUMBA_KERNEL = False
            return None

        @numba.njit(fastmath=True, nogil=True, cache=True)
        def l1(x, y, out):  # pragma: no cover - compiled
            n, f = x.shape
            m = y.shape[0]
            for j0 in range(0, m, 32):  # 32 kept rows (~1 MB at 4500 features) stay in L2 for all rows of x
                j1 = min(m, j0 + 32)
                for i in range(n):
                    xi = x[i]
                    j = j0
                    while j + 4 <= j1:
                        y0, y1, y2, y3 = y[j], y[j + 1], y[j + 2], y[j + 3]
                        s0 = s1 = s2 = s3 = 0.0
                        for t in range(f):
                            v = xi[t]
                            s0 += abs(v - y0[t])
                            s1 += abs(v - y1[t])
                            s2 += abs(v - y2[t])
                            s3 += abs(v - y3[t])
                        out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = s0, s1, s2, s3
                        j += 4
                    while j < j1:
                        s = 0.0
                        for t in range(f):
                            s += abs(xi[t] - y[j, t])
                        out[i, j] = s
                        j += 1

        probe = np.zeros((1, 1))
        l1(probe, probe, np.empty((1, 1)))  # compile (or load numba's cache) once, not in the worker threads
        _NUMBA_KERNEL = l1
    return _NUMBA_KERNEL or None


def cost_matrix(features: np.ndarray, kept: np.ndarray, p: float = 1.0, compiled: bool = True,
                consume: bool = False, removed_only: bool = False) -> np.ndarray:
    """Minkowski-p distances (C x k) from every channel to the kept ones, float64.

    The same values as ``ot.dist(features, features[kept], "minkowski", p=p)``
    (which loops over the feature axis in Python in POT 0.9 and took two
    minutes on ResNet-50), computed by SciPy's C ``cdist``.  The k x k block
    between kept channels is symmetric, so it comes from ``pdist`` (half the
    work, bitwise the same distances); the other rows from ``cdist``.  SciPy
    releases the GIL, so large matrices are split by rows over the available
    cores; each row is computed exactly as without splitting.  Large L1
    matrices use the compiled kernel instead when numba is installed and
    ``compiled`` (:func:`_l1_kernel`, same values up to summation order;
    see :func:`use_compiled`).

    ``consume=True`` lets the function reorder the rows of ``features`` (a
    float64 C-contiguous array the caller no longer needs) so that the kept
    rows come first: they are then read in place instead of copied, and row
    blocks are views (37 MB less for ResNet-50's widest group); the
    distances are the same.  ``removed_only=True`` gives only the rows of
    the channels not in ``kept`` ((C - k) x k, ascending channel order),
    all an exact plan needs (:func:`plan_from_removed_cost`).
    """
    x = np.ascontiguousarray(features, dtype=np.float64)
    kept = np.asarray(kept)
    symmetric = len(np.unique(kept)) == len(kept)
    order = None
    if consume and symmetric and x is features and x.flags.writeable:
        order = np.concatenate([kept, np.setdiff1d(np.arange(len(x)), kept)])
        _permute_rows(x, order)
        kept = np.arange(len(kept))
        y = x[:len(kept)]
    else:
        y = np.ascontiguousarray(x[kept])
    out = _costs(x, y, kept, symmetric, p, compiled, removed_only)
    if order is not None and not removed_only:  # removed rows come out in ascending order either way
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        _permute_rows(out, inverse)
    return out


def removed_cost_in_blocks(blocks, kept: np.ndarray, size: int, compiled: bool = True) -> np.ndarray:
    """The L1 costs of :func:`cost_matrix` (``removed_only``) from the features in column blocks.

    ``blocks()`` yields the group's (channels x some features) blocks, together
    every feature once, in the same order each time it is called (twice: the
    channel norms, then the distances).  L1 distances add up over blocks, so
    no full feature matrix is ever built: memory is one block, its removed and
    kept rows, and the (C - k) x k result.  The values equal the whole-matrix
    ones up to the order of the float64 sums (the channel norms too).
    """
    kept = np.asarray(kept)
    removed = np.setdiff1d(np.arange(size), kept)
    squares = np.zeros(size)
    for block in blocks():
        block = np.asarray(block, dtype=np.float64)
        squares += np.einsum("ij,ij->i", block, block)
    scale = 1.0 / np.maximum(np.sqrt(squares), 1e-12)
    out = np.zeros((len(removed), len(kept)))
    none = np.array([], dtype=np.int64)
    for block in blocks():
        block = np.asarray(block, dtype=np.float64)
        x = block[removed] * scale[removed, None]
        y = block[kept] * scale[kept, None]
        del block
        out += _costs(x, y, none, False, 1.0, compiled)
    return out


def _permute_rows(a: np.ndarray, order: np.ndarray) -> None:
    """``a[:] = a[order]`` in place, with one row of scratch memory (follows the cycles of ``order``)."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start]:
            continue
        done[start] = True
        if order[start] == start:
            continue
        scratch = a[start].copy()
        j = start
        while True:
            src = int(order[j])
            done[j] = True
            if src == start:
                a[j] = scratch
                break
            a[j] = a[src]
            j = src


def _rows_of(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``x[idx]``: a view when ``idx`` is a run of consecutive rows, else a copy."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and np.all(np.diff(idx) == 1):
        return x[int(idx[0]):int(idx[-1]) + 1]
    return x[idx]


def _costs(x: np.ndarray, y: np.ndarray, kept: np.ndarray, symmetric: bool, p: float,
           compiled: bool, removed_only: bool = False) -> np.ndarray:
    """Distances from the rows of ``x`` (all, or with ``removed_only`` those not in ``kept``) to ``y``."""
    if removed_only:
        x = _rows_of(x, np.setdiff1d(np.arange(len(x)), kept))
        kept, symmetric = np.array([], dtype=np.int64), False
    kernel = (_l1_kernel() if compiled and p == 1 and x.shape[0] * y.shape[0] * x.shape[1] >= COMPILED_COST_WORK
              else None)
    if kernel is not None:
        return _compiled_cost(kernel, x, y)
    if p == 1:
        metric, kwargs = "cityblock", {}
    elif p == 2:
        metric, kwargs = "euclidean", {}
    else:
        metric, kwargs = "minkowski", {"p": p}
    out = np.empty((len(x), len(y)))
    others = np.setdiff1d(np.arange(len(x)), kept)
    if not symmetric:
        others = np.arange(len(x))

    def block_of_kept() -> None:
        out[kept] = squareform(pdist(y, metric, **kwargs))

    def rows(idx: np.ndarray) -> None:
        out[idx] = cdist(_rows_of(x, idx), y, metric, **kwargs)

    threads = min(_threads(), max(1, len(x) // 64))
    if threads == 1 or x.shape[0] * y.shape[0] * max(x.shape[1], 1) < PARALLEL_COST_WORK:
        if symmetric:
            block_of_kept()
        if len(others):
            rows(others)
        return out
    tasks = [block_of_kept] if symmetric else []
    tasks += [lambda idx=idx: rows(idx) for idx in np.array_split(others, threads * 4) if len(idx)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda task: task(), tasks))
    return out


def _compiled_cost(kernel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Full C x k L1 matrix from the compiled kernel, row blocks spread over the cores."""
    out = np.empty((len(x), len(y)))
    blocks = [b for b in np.array_split(np.arange(len(x)), _threads() * 4) if len(b)]

    def run(idx: np.ndarray) -> None:
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        kernel(x[lo:hi], y, out[lo:hi])

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(run, blocks))
    return out


def transport_plan(features: np.ndarray, kept: np.ndarray, source_mass: np.ndarray | None = None,
                   reg: float = 0.0, p: float = 1.0, compiled: bool = True) -> np.ndarray:
    """Optimal transport plan (C x k) from every channel to the kept channels.

    Ground cost: Minkowski-p distance between the normalised features (p=1 is
    the reference's L1).  ``reg == 0`` solves exactly with ``ot.emd``;
    ``reg > 0`` uses entropic ``ot.sinkhorn`` with the cost scaled to [0, 1],
    so ``reg`` is relative to the largest cost.
    """
    return plan_from_cost(cost_matrix(features, kept, p, compiled), kept, source_mass, reg)


def plan_from_cost(cost: np.ndarray, kept: np.ndarray, source_mass: np.ndarray | None = None,
                   reg: float = 0.0) -> np.ndarray:
    """:func:`transport_plan` from its cost matrix (C x k): the features can be freed before solving."""
    ot = import_pot()

    size, keep = cost.shape[0], len(kept)
    a, b = _marginals(size, kept, source_mass)
    if reg > 0:
        scale = cost.max() if cost.max() > 0 else 1.0
        return ot.sinkhorn(a, b, cost / scale, reg, numItermax=10000, warn=False)
    return ot.emd(a, b, cost, numItermax=max(100_000, 20 * size * keep))


def _marginals(size: int, kept: np.ndarray, source_mass: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) masses: uniform, or the importance normalised over all and over the kept channels."""
    a = np.full(size, 1.0 / size) if source_mass is None else source_mass / source_mass.sum()
    b = a[kept] / a[kept].sum() if source_mass is not None else np.full(len(kept), 1.0 / len(kept))
    return a, b


def plan_from_removed_cost(removed_cost: np.ndarray, kept: np.ndarray, size: int,
                           source_mass: np.ndarray | None = None) -> np.ndarray:
    """The exact plan (C x k) from the costs of the removed channels only ((C - k) x k).

    With a metric cost (every Minkowski-p distance, p >= 1) there is an
    optimal plan in which each kept channel keeps all of its own mass (its
    source mass is at most its target mass): moving part of it elsewhere
    while another channel fills its place never costs less (triangle
    inequality).  So only the removed channels' mass is transported, into
    what the kept channels have room for: the same optimal cost, from a
    (C - k) x k cost matrix instead of C x k (a third of the distance work at
    sparsity 0.5, more than half at 0.3).  Where several plans are optimal
    (exact ties) this one keeps the kept channels in place.
    """
    ot = import_pot()

    keep = len(kept)
    a, b = _marginals(size, kept, source_mass)
    removed = np.setdiff1d(np.arange(size), kept)
    plan = np.zeros((size, keep))
    plan[kept, np.arange(keep)] = a[kept]
    room = np.maximum(b - a[kept], 0.0)
    if len(removed) and a[removed].sum() > 0:
        plan[removed] = ot.emd(a[removed], room * (a[removed].sum() / room.sum()), removed_cost,
                               numItermax=max(100_000, 20 * len(removed) * keep))
    return plan


def fusion(features: np.ndarray, kept: np.ndarray, source_mass: np.ndarray | None = None,
           reg: float = 0.0, p: float = 1.0, compiled: bool = True, consume: bool = False) -> ChannelMap:
    """Intra-Fusion: merge every channel into the kept ones along the transport plan.

    The exact plan (``reg == 0``) is solved on the removed channels only
    (:func:`plan_from_removed_cost`); Sinkhorn needs the whole cost matrix.
    ``consume`` as in :func:`cost_matrix`.
    """
    size = features.shape[0]
    if len(kept) == size:
        return selection(size, kept)
    cost = cost_matrix(features, kept, p, compiled, consume, removed_only=not reg)
    return fusion_from_costs(cost, kept, size, source_mass, reg)


def fusion_from_costs(cost: np.ndarray, kept: np.ndarray, size: int, source_mass: np.ndarray | None = None,
                      reg: float = 0.0) -> ChannelMap:
    """:func:`fusion` from the costs it needs: the removed channels' rows for the exact plan
    (``reg == 0``, ``cost_matrix(..., removed_only=True)``), all C rows for Sinkhorn."""
    if reg > 0:
        return fusion_from_cost(cost, kept, source_mass, reg)
    return fusion_from_plan(plan_from_removed_cost(cost, kept, size, source_mass).T, kept)


def fusion_from_cost(cost: np.ndarray, kept: np.ndarray, source_mass: np.ndarray | None = None,
                     reg: float = 0.0) -> ChannelMap:
    """:func:`fusion` from the cost matrix (C x k)."""
    if len(kept) == cost.shape[0]:
        return selection(cost.shape[0], kept)
    return fusion_from_plan(plan_from_cost(cost, kept, source_mass, reg).T, kept)


def fusion_from_plan(plan: np.ndarray, kept: np.ndarray) -> ChannelMap:
    """The channel map of a transport plan (k x C)."""
    target_mass = plan.sum(axis=1, keepdims=True)
    source_mass_out = plan.sum(axis=0, keepdims=True)
    average = plan / np.where(target_mass > 0, target_mass, 1.0)
    total = plan / np.where(source_mass_out > 0, source_mass_out, 1.0)
    # A kept channel that received no mass (possible only with Sinkhorn
    # underflow) keeps its own values instead of becoming zero; a source with
    # no mass (zero importance) is dropped on both sides, as in plain pruning.
    for e in np.flatnonzero(target_mass[:, 0] <= 0):
        average[e] = 0.0
        average[e, kept[e]] = 1.0
    return ChannelMap(np.asarray(kept), average, total)
