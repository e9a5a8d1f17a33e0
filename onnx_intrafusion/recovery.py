"""Data-aware recovery of a pruned layer: bias shift, ridge least squares, entropic Wasserstein regression.

Pure numpy + POT (no onnxruntime): the activations come from
:mod:`onnx_intrafusion.activations`, which drives this module layer by layer.

Every linear node (Conv, Gemm, MatMul) is brought to one canonical form:
``G`` independent blocks (conv groups; 1 otherwise), each ``y = x @ W + b``
with ``x`` a row of ``d`` inputs (the im2col patch for a Conv) and ``W`` of
shape ``(d, out)``.  For a node we stream calibration rows ``(x, t)`` where
``x`` is the node's input in the *pruned* model (already-recovered upstream
layers included, so errors do not compound) and ``t`` the original node's
output mapped onto the pruned output channels (``t = y_orig @ M.T``, ``M``
the output group's ``average`` map: exactly what the fused weights would
produce from the original inputs).  :class:`Stats` keeps sufficient
statistics (Gram ``XᵀX``, cross term ``XᵀT``, sums) plus a bounded seeded
row sample for EWR; memory does not grow with the calibration set.

Modes
-----
``bias``   closed form: ``b = mean(t) - mean(x) @ W_fused`` (mean output matches).
``lstsq``  ``min ||T - X W - b||² + λ||[W; b] - [W_fused; b_fused]||²`` with the
           bias solved jointly; ``λ = alpha * mean(diag(XᵀX))`` (scale-free).
``ewr``    SWAP's entropic Wasserstein regression (You & Cheng, ICLR 2024) in
           the same layer-wise setting: the squared loss pairs target row i
           with prediction row i (identity coupling); EWR replaces that by an
           entropic OT coupling ``π`` between targets and predictions
           (``ot.sinkhorn``, uniform marginals, cost ``||t_i - ŷ_j||²`` scaled to
           mean 1, regulariser ``eps``), and alternates: coupling with W fixed,
           then the weighted least-squares step, which with uniform marginals
           is lstsq against the barycentric targets ``t̃_j = n Σ_i π_ij t_i``.
           A diagonal coupling gives ``t̃ = t``, i.e. exactly lstsq; ``eps → 0``
           on consistent data gives the identity OT plan, i.e. lstsq too;
           ``eps → ∞`` gives the uniform plan (regression onto the mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .plans import import_pot

MODES = ("none", "bias", "lstsq", "ewr")

#: Default ridge strength relative to the mean input energy.
DEFAULT_ALPHA = 1e-3
#: Default EWR entropic regulariser (relative to the mean transport cost).
DEFAULT_EWR_EPS = 0.05
#: Rows per Sinkhorn block and row sample kept for EWR.
EWR_BLOCK = 256
EWR_ROWS = 2048
EWR_ITERS = 2


# --------------------------------------------------------------------------- canonical form
@dataclass
class Linear:
    """A node's weights in canonical form and how to write them back."""

    kind: str  # Conv | Gemm | MatMul
    groups: int
    weight: np.ndarray  # (G, d, out_g) float64
    bias: np.ndarray | None  # (G, out_g) float64
    attrs: dict = field(default_factory=dict)
    weight_shape: tuple = ()

    @property
    def out_channels(self) -> int:
        return self.groups * self.weight.shape[2]


def from_node(kind: str, weight: np.ndarray, bias: np.ndarray | None, attrs: dict) -> Linear:
    w = np.asarray(weight, dtype=np.float64)
    if kind == "Conv":
        groups = int(attrs.get("group", 1))
        og = w.shape[0] // groups
        can = w.reshape(groups, og, -1).transpose(0, 2, 1)
    elif kind == "Gemm":
        groups = 1
        can = (w.T if int(attrs.get("transB", 0)) else w)[None]
    elif kind == "MatMul":
        groups = 1
        can = w[None]
    else:
        raise ValueError(f"no canonical form for {kind}")
    b = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(groups, -1)
    return Linear(kind, groups, np.ascontiguousarray(can), b, dict(attrs), tuple(w.shape))


def to_weight(lin: Linear, weight: np.ndarray) -> np.ndarray:
    """Canonical ``(G, d, out_g)`` back to the node's weight layout."""
    if lin.kind == "Conv":
        return weight.transpose(0, 2, 1).reshape(lin.weight_shape)
    if lin.kind == "Gemm":
        return weight[0].T if int(lin.attrs.get("transB", 0)) else weight[0]
    return weight[0]


# --------------------------------------------------------------------------- rows
def _conv_pads(attrs: dict, in_hw: tuple[int, int], kernel: tuple[int, int], strides, dilations) -> list[int]:
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    pads = [0, 0, 0, 0]
    for i in range(2):
        out = -(-in_hw[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_hw[i])
        small, big = total // 2, total - total // 2
        pads[i], pads[i + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return pads


def conv_rows(x: np.ndarray, y: np.ndarray, lin: Linear, positions: np.ndarray | None,
              kernel: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """im2col patches ``(n, G, d)`` of input ``x`` (N, C, H, W) and the matching rows of ``y`` (n, Cout).

    ``positions`` are flat output positions to keep per image (``None``: all).
    """
    return conv_patches(x, lin, positions, kernel, y.shape[2:]), conv_targets(y, positions)


def conv_targets(y: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """Rows ``(n, Cout)`` of a conv output ``y`` (N, Cout, Ho, Wo) at the flat ``positions`` of every image."""
    n_img, c_out = y.shape[:2]
    flat = y.reshape(n_img, c_out, -1)
    if positions is not None:
        flat = flat[:, :, positions]
    return flat.transpose(0, 2, 1).reshape(-1, c_out)


def conv_patches(x: np.ndarray, lin: Linear, positions: np.ndarray | None, kernel: tuple[int, int],
                 out_hw: tuple[int, int]) -> np.ndarray:
    """im2col patches ``(n, G, d)`` of ``x`` (N, C, H, W) at the flat output ``positions`` (``None``: all).

    A 1x1 stride-1 unpadded conv takes the fast path (no patches).
    """
    n_img, c_in, h, w = x.shape
    attrs = lin.attrs
    strides = list(attrs.get("strides", [1, 1]))
    dil = list(attrs.get("dilations", [1, 1]))
    pads = _conv_pads(attrs, (h, w), kernel, strides, dil)
    ho, wo = out_hw
    pos = np.arange(ho * wo) if positions is None else positions
    oy, ox = pos // wo, pos % wo
    if kernel == (1, 1) and strides == [1, 1] and not any(pads):
        xr = x.reshape(n_img, c_in, h * w)[:, :, oy * w + ox].transpose(0, 2, 1)
        return xr.reshape(-1, lin.groups, c_in // lin.groups)
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = kernel
    iy = oy[:, None] * strides[0] + np.arange(kh)[None, :] * dil[0]  # (P, kh)
    ix = ox[:, None] * strides[1] + np.arange(kw)[None, :] * dil[1]  # (P, kw)
    patches = xp[:, :, iy[:, :, None], ix[:, None, :]]  # (N, C, P, kh, kw)
    patches = patches.transpose(0, 2, 1, 3, 4)  # (N, P, C, kh, kw)
    return patches.reshape(n_img * len(pos), lin.groups, (c_in // lin.groups) * kh * kw)


def linear_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gemm/MatMul rows: the last axis is the feature axis."""
    return x.reshape(-1, 1, x.shape[-1]), y.reshape(-1, y.shape[-1])


# --------------------------------------------------------------------------- statistics
class Stats:
    """Streaming sufficient statistics of one node (inputs augmented with a 1 for the bias)."""

    def __init__(self, groups: int, d: int, out_g: int, fit_bias: bool = True, keep_rows: int = 0, seed: int = 0):
        self.groups, self.d, self.out_g, self.fit_bias = groups, d, out_g, fit_bias
        da = d + int(fit_bias)
        self.gram = np.zeros((groups, da, da))
        self.cross = np.zeros((groups, da, out_g))
        self.tt = np.zeros(groups)
        self.n = 0
        self.keep_rows = keep_rows
        self.rng = np.random.default_rng(seed)
        self.sample_x: list[np.ndarray] = []
        self.sample_t: list[np.ndarray] = []
        self.kept = 0

    def add(self, x: np.ndarray, t: np.ndarray) -> None:
        """``x`` (n, G, d) inputs, ``t`` (n, G, out_g) targets."""
        n = x.shape[0]
        # (G, n, d [+1]) in one float64 copy: one BLAS product per group.
        xg = np.empty((self.groups, n, self.d + int(self.fit_bias)))
        xg[:, :, :self.d] = x.transpose(1, 0, 2)
        if self.fit_bias:
            xg[:, :, self.d] = 1.0
        tg = np.ascontiguousarray(t.transpose(1, 0, 2), dtype=np.float64)
        xt = xg.transpose(0, 2, 1)
        self.gram += np.matmul(xt, xg)
        self.cross += np.matmul(xt, tg)
        self.tt += np.einsum("gno,gno->g", tg, tg)
        self.n += n
        if self.keep_rows and self.kept < self.keep_rows:
            take = min(n, self.keep_rows - self.kept)
            idx = self.rng.choice(n, take, replace=False) if take < n else np.arange(n)
            self.sample_x.append(xg.transpose(1, 0, 2)[idx])
            self.sample_t.append(tg.transpose(1, 0, 2)[idx])
            self.kept += take

    def residual(self, w_aug: np.ndarray) -> np.ndarray:
        """Per group ``Σ||t - [x,1] W||²`` from the statistics alone."""
        quad = np.einsum("gio,gij,gjo->g", w_aug, self.gram, w_aug, optimize=True)
        lin = np.einsum("gio,gio->g", w_aug, self.cross)
        return np.maximum(self.tt - 2 * lin + quad, 0.0)

    def relative_error(self, w_aug: np.ndarray) -> float:
        return float(np.sqrt(self.residual(w_aug).sum() / max(self.tt.sum(), 1e-30)))


def augment(lin: Linear, fit_bias: bool = True) -> np.ndarray:
    """``[W; b]`` of shape (G, d+1, out_g) (zero bias row when the node has none); ``W`` alone without ``fit_bias``."""
    if not fit_bias:
        return lin.weight.copy()
    b = np.zeros((lin.groups, lin.weight.shape[2])) if lin.bias is None else lin.bias
    return np.concatenate([lin.weight, b[:, None, :]], axis=1)


# --------------------------------------------------------------------------- solvers
Coupling = Callable[[np.ndarray, np.ndarray], np.ndarray]


def solve_bias(stats: Stats, prior: np.ndarray) -> np.ndarray:
    """Keep W, shift b so the mean output over the calibration rows matches the target's."""
    if not stats.fit_bias:
        return prior.copy()
    n = max(stats.n, 1)
    mean_x = stats.gram[:, -1, :-1] / n  # (G, d): Σx / n (the ones column)
    mean_t = stats.cross[:, -1, :] / n  # (G, out): Σt / n
    out = prior.copy()
    out[:, -1, :] = mean_t - np.einsum("gi,gio->go", mean_x, prior[:, :-1, :])
    return out


def _ridge(stats: Stats, prior: np.ndarray, alpha: float, cross: np.ndarray | None = None) -> np.ndarray:
    cross = stats.cross if cross is None else cross
    out = np.empty_like(prior)
    for g in range(stats.groups):
        gram = stats.gram[g]
        lam = alpha * max(float(np.mean(np.diag(gram))), 1e-12)
        a = gram + lam * np.eye(gram.shape[0])
        rhs = cross[g] + lam * prior[g]
        try:
            out[g] = np.linalg.solve(a, rhs)
        except np.linalg.LinAlgError:
            out[g] = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return out


def solve_lstsq(stats: Stats, prior: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Ridge least squares towards ``prior`` ([W; b] of the fused/pruned layer)."""
    return _ridge(stats, prior, alpha)


def sinkhorn_coupling(eps: float) -> Coupling:
    """Entropic OT plan between target rows and predicted rows (uniform marginals)."""

    def coupling(targets: np.ndarray, preds: np.ndarray) -> np.ndarray:
        ot = import_pot()
        n = targets.shape[0]
        cost = ot.dist(targets, preds)  # squared Euclidean
        scale = float(cost.mean())
        if not np.isfinite(scale) or scale <= 0:
            return np.eye(n) / n
        u = np.full(n, 1.0 / n)
        plan = ot.sinkhorn(u, u, cost / scale, eps, numItermax=500, stopThr=1e-6, warn=False)
        if not np.all(np.isfinite(plan)) or plan.sum() < 0.5:  # kernel underflow: stable log domain
            plan = ot.sinkhorn(u, u, cost / scale, eps, method="sinkhorn_log", numItermax=200, stopThr=1e-6,
                               warn=False)
        return plan if np.all(np.isfinite(plan)) else np.eye(n) / n

    return coupling


def solve_ewr(stats: Stats, prior: np.ndarray, alpha: float = DEFAULT_ALPHA, eps: float = DEFAULT_EWR_EPS,
              iters: int = EWR_ITERS, block: int = EWR_BLOCK, coupling: Coupling | None = None) -> np.ndarray:
    """Entropic Wasserstein regression, starting from the lstsq solution.

    The Gram matrix (uniform marginals) is unchanged; the cross term's
    contribution of the sampled rows is replaced by their barycentric
    targets, extrapolated to all rows.  Grouped convolutions (G > 1) keep
    the lstsq solution.
    """
    w = _ridge(stats, prior, alpha)
    if stats.groups != 1 or not stats.sample_x:
        return w
    coupling = coupling or sinkhorn_coupling(eps)
    xs = np.concatenate(stats.sample_x)[:, 0, :]
    ts = np.concatenate(stats.sample_t)[:, 0, :]
    scale = stats.n / xs.shape[0]
    for _ in range(iters):
        delta = np.zeros_like(stats.cross[0])
        for start in range(0, xs.shape[0], block):
            xb, tb = xs[start:start + block], ts[start:start + block]
            if xb.shape[0] < 2:
                continue
            plan = coupling(tb, xb @ w[0])
            t_bar = xb.shape[0] * plan.T @ tb  # row j: its transported target
            delta += xb.T @ (t_bar - tb)
        w = _ridge(stats, prior, alpha, cross=stats.cross + scale * delta[None])
    return w


def solve(mode: str, stats: Stats, prior: np.ndarray, alpha: float = DEFAULT_ALPHA,
          eps: float = DEFAULT_EWR_EPS) -> np.ndarray:
    if mode == "bias":
        new = solve_bias(stats, prior)
    elif mode == "lstsq":
        new = solve_lstsq(stats, prior, alpha)
    elif mode == "ewr":
        new = solve_ewr(stats, prior, alpha, eps)
    else:
        raise ValueError(f"unknown recovery mode '{mode}'")
    # Never write NaN/Inf: fall back to the prior for a non-finite block.
    bad = ~np.all(np.isfinite(new), axis=(1, 2))
    new[bad] = prior[bad]
    return new


#: Ridge strengths tried, as multiples of ``alpha``, when held-back rows can choose between them.
ALPHA_STEPS = (1.0, 10.0, 100.0)


def solve_validated(mode: str, stats: Stats, held: Stats | None, prior: np.ndarray, alpha: float = DEFAULT_ALPHA,
                    eps: float = DEFAULT_EWR_EPS) -> tuple[np.ndarray, float, float | None]:
    """(weights, ridge used, their held-back relative error or None when not computed).

    With held-back statistics, lstsq keeps the ``ALPHA_STEPS`` ridge that
    predicts them best.  A fixed ridge relative to the mean input energy is
    too weak when a layer has few informative rows for its width (short
    sequences, wide FFN inputs): the fit then follows noise.  The held-back
    rows pick the strength per layer; the first (weakest) wins ties.  The
    error is returned so the caller's never-worse check need not compute it
    again (each costs a product with the Gram matrix).
    """
    if mode != "lstsq" or held is None or not held.n:
        return solve(mode, stats, prior, alpha, eps), alpha, None
    best = None
    for step in ALPHA_STEPS:
        new = solve(mode, stats, prior, alpha * step, eps)
        err = held.relative_error(new)
        if best is None or err < best[0]:
            best = (err, new, alpha * step)
    return best[1], best[2], best[0]


def output_map(segments, space_group: dict[int, int], maps: dict, sizes: dict[int, int]) -> np.ndarray | None:
    """``M`` (C_new x C_old) of a channel axis: block-diagonal ``average ⊗ I_block`` per segment.

    ``None`` when no segment's group is mapped (identity).
    """
    blocks, touched = [], False
    for seg in segments:
        gid = None if seg.space is None else space_group[seg.space]
        if gid is not None and gid in maps and not maps[gid].is_identity:
            blocks.append(np.kron(maps[gid].average, np.eye(seg.block)))
            touched = True
        else:
            size = seg.block if seg.space is None else sizes[gid] * seg.block
            blocks.append(np.eye(size))
    if not touched:
        return None
    rows = sum(b.shape[0] for b in blocks)
    cols = sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols))
    r = c = 0
    for b in blocks:
        out[r:r + b.shape[0], c:c + b.shape[1]] = b
        r += b.shape[0]
        c += b.shape[1]
    return out
