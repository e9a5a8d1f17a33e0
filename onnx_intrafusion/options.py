"""Every option of a run: one dataclass, validated once, passed down, written into the report.

The command line builds :class:`Options` from its arguments (argparse
``dest`` = field name), the API from ``prune(**fields)``.  :meth:`Options.resolve`
checks ranges and which options need which (before any work) and fills the
defaults that depend on other options (e.g. ``recover`` is ``lstsq`` with
calibration data and ``none`` without).  Options that only make sense
together default to ``None`` so that "given but meaningless" can be told from
"left at its default" and refused instead of silently ignored.

Adding an option: a field here (with its default), its check in
:meth:`resolve`, a flag in ``cli.py`` whose ``dest`` is the field name, and a
line in README's usage block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from .allocation import ALLOCATIONS, TARGETS as GLOBAL_TARGETS
from .errors import ProviderError, UsageError
from .importance import IMPORTANCES as WEIGHT_IMPORTANCES
from .plans import COST_KERNELS, MARGINALS, METHODS

#: Importances computed from calibration data (need --calibration); the gradient ones need torch.
GRADIENT_IMPORTANCES = ("taylor", "prospr")
DATA_IMPORTANCES = ("activation", *GRADIENT_IMPORTANCES)
#: Recovery modes (``recovery.MODES``, plus distill = lstsq then gradient fine-tuning; listed here so
#: that checking options does not import POT or torch).
RECOVERIES = ("none", "bias", "lstsq", "ewr", "distill")
#: Distillation epochs when finetune_epochs is not given.
DEFAULT_FINETUNE_EPOCHS = 10
PROVIDERS = ("auto", "cpu", "cuda")
#: Deployment targets (``deploy.channel_multiple`` maps them to a channel multiple) and quantizations.
DEPLOY_TARGETS = ("auto", "ort-cpu", "ort-cuda", "openvino", "tflite", "ncnn", "mnn", "none")
QUANTIZATIONS = ("none", "int8")

#: Fewer calibration samples than this get a warning (a few hundred are recommended).
FEW_CALIBRATION_SAMPLES = 32


@dataclass(frozen=True)
class Options:
    """What to prune and how.

    Defaults are the documented CLI defaults, with one exception: ``target``
    is ``"none"`` here (exact channel counts, the same on every machine, which
    API users and tests rely on) and ``auto`` on the command line (a channel
    multiple that the machine's runtime is fast with; see :mod:`deploy`).

    The hidden size (``hidden_sparsity``) is the one kind that does not
    default to ``sparsity``: it needs calibration data, and at equal MACs it
    was not reliably better than heads + FFN alone, so it is 0 unless given.
    """

    sparsity: float = 0.5
    method: str = "intrafusion"
    # Per group kind (see coupling.KINDS): overrides of sparsity and method.  With --global or
    # --allocation sensitivity a kind's sparsity is fixed (uniform within the kind, not allocated) and
    # the allocation reaches the MAC target for the whole model with the other kinds.
    head_sparsity: float | None = None
    ffn_sparsity: float | None = None
    # The residual width (kind "hidden", needs calibration data).  Default 0 = off: at equal MACs with
    # lstsq, adding it to heads + FFN helped the Fashion-MNIST ViT at 50% fewer MACs (+1.3 points) but
    # not at 30% (-0.2) and cost the text encoder 0.2-1.1 points (docs/results/transformers_hidden.json).
    hidden_sparsity: float | None = None
    head_method: str | None = None  # default "prune": merging heads measured worse (docs/results/attention_heads.json)
    hidden_method: str | None = None  # default "prune": merging measured worse with lstsq (transformers_hidden.json)
    importance: str = "l1"
    seed: int = 0
    groups: tuple[int, ...] | None = None
    # Intra-Fusion transport (only with method="intrafusion")
    ot_reg: float | None = None
    ot_p: float | None = None
    marginals: str | None = None
    cost_kernel: str | None = None  # plans.COST_KERNELS; default auto
    # Allocation.  round_to None = the multiple of ``target`` (resolved in :meth:`resolve`).
    # The library keeps exact counts (target "none"); the command line defaults to --target auto.
    round_to: int | None = None
    target: str = "none"
    allocation: str = "uniform"
    global_target: str | None = None
    max_group_sparsity: float | None = None
    # Sensitivity analysis (allocation="sensitivity" or analyse_only; needs calibration data)
    sensitivity: str | None = None  # a saved analysis: read when the file exists, else written there
    sensitivity_levels: tuple[float, ...] | None = None  # default (0.25, 0.5, 0.75)
    workers: int | None = None  # local processes (default: cores bounded by memory)
    ray_address: str | None = None  # run the analysis as Ray tasks on this cluster
    analyse_only: bool = False  # stop after the analysis (no model)
    # Calibration data and recovery (the data itself is passed separately)
    calibration_samples: int | None = None
    recover: str | None = None
    recover_alpha: float | None = None
    ewr_eps: float | None = None
    # Deployment: int8 quantization after pruning (needs calibration data)
    quantize: str = "none"
    # Distillation (only with recover="distill")
    finetune_epochs: int | None = None
    finetune_time: float | None = None
    # Validation
    validate: bool = True
    provider: str = "auto"
    # A run that prunes nothing is an error (exit 4) unless this is set.
    allow_unchanged: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "Options":
        """``Options(**kwargs)`` with a one-line UsageError for an unknown name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**kwargs)

    def resolve(self, has_calibration: bool) -> "Options":
        """A checked copy with dependent defaults filled in; UsageError for anything off."""
        _number(self.sparsity, "sparsity", 0.0, 1.0, high_open=True)
        _choice(self.method, "method", METHODS)
        _choice(self.importance, "importance", WEIGHT_IMPORTANCES + DATA_IMPORTANCES)
        _integer(self.seed, "seed", 0)
        if self.groups is not None:
            groups = tuple(self.groups) if not isinstance(self.groups, (str, bytes)) else None
            if groups is None or not all(_is_int(g) and g >= 0 for g in groups):
                raise UsageError(f"groups must be a list of group ids (non-negative integers), got {self.groups!r}")
        if self.round_to is not None:
            _integer(self.round_to, "round-to", 1)
        _choice(self.target, "target", DEPLOY_TARGETS)
        _choice(self.quantize, "quantization", QUANTIZATIONS)
        _choice(self.allocation, "allocation", ALLOCATIONS)
        for name, value in (("head-sparsity", self.head_sparsity), ("ffn-sparsity", self.ffn_sparsity),
                            ("hidden-sparsity", self.hidden_sparsity)):
            if value is not None:
                _number(value, name, 0.0, 1.0, high_open=True)
        if self.hidden_sparsity is not None and self.hidden_sparsity != 0 and not has_calibration:
            raise UsageError("--hidden-sparsity needs calibration data (--calibration FILE.npz): a LayerNorm over "
                             "the hidden size changes its statistics, which only the least-squares re-fit repairs")
        if self.head_method is not None:
            _choice(self.head_method, "head method", METHODS)
        if self.hidden_method is not None:
            _choice(self.hidden_method, "hidden method", METHODS)
        if self.provider not in PROVIDERS:  # the provider's own error class (exit 7), as validate raises it
            raise ProviderError(f"unknown provider '{self.provider}' (choose from {', '.join(PROVIDERS)})")

        # Transport options apply whenever some group is merged (a kind's method may differ from --method).
        fusion = "intrafusion" in (self.method, self.head_method, self.hidden_method)
        for name, value in (("ot-reg", self.ot_reg), ("ot-p", self.ot_p), ("marginals", self.marginals),
                            ("cost-kernel", self.cost_kernel)):
            if value is not None and not fusion:
                raise UsageError(f"--{name} only applies to --method intrafusion (the transport plan; or a kind merged "
                                 f"with --head-method/--hidden-method intrafusion), "
                                 f"not to --method {self.method}")
        if self.ot_reg is not None:
            _number(self.ot_reg, "ot-reg", 0.0, math.inf)
        if self.ot_p is not None:
            _number(self.ot_p, "ot-p", 1.0, math.inf)
        if self.marginals is not None:
            _choice(self.marginals, "marginals", MARGINALS)
        if self.cost_kernel is not None:
            _choice(self.cost_kernel, "cost kernel", COST_KERNELS)

        is_global = self.allocation == "global"
        budgeted = self.allocation in ("global", "sensitivity")
        if self.global_target is not None and not is_global:
            raise UsageError("--global-target only applies to global allocation (--global)")
        if self.max_group_sparsity is not None and not budgeted:
            raise UsageError("--max-group-sparsity only applies to global or sensitivity allocation "
                             "(--global, --allocation sensitivity)")
        analysed = self.allocation == "sensitivity" or bool(self.analyse_only)
        for name, value in (("sensitivity", self.sensitivity), ("sensitivity-levels", self.sensitivity_levels),
                            ("workers", self.workers), ("ray", self.ray_address)):
            if value is not None and not analysed:
                raise UsageError(f"--{name} only applies to --allocation sensitivity or --analyse-only")
        if analysed and not has_calibration:
            what = "--analyse-only" if self.analyse_only else "--allocation sensitivity"
            raise UsageError(f"{what} needs calibration data (--calibration FILE.npz)")
        levels = None
        if analysed:
            from .sensitivity import DEFAULT_LEVELS, check_levels

            levels = tuple(check_levels(DEFAULT_LEVELS if self.sensitivity_levels is None else self.sensitivity_levels))
        if self.workers is not None:
            _integer(self.workers, "workers", 1)
            if self.ray_address is not None:
                raise UsageError("--workers and --ray exclude each other (Ray decides where tasks run)")
        if self.global_target is not None:
            _choice(self.global_target, "global target", GLOBAL_TARGETS)
        if self.max_group_sparsity is not None:
            _number(self.max_group_sparsity, "max-group-sparsity", 0.0, 1.0, low_open=True, high_open=True)

        if self.recover is not None:
            _choice(self.recover, "recovery", RECOVERIES)
        if not has_calibration:
            needs = [name for name, given in (
                (f"--recover {self.recover}", self.recover not in (None, "none")),
                (f"--importance {self.importance}", self.importance in DATA_IMPORTANCES),
                ("--calibration-samples", self.calibration_samples is not None),
                ("--recover-alpha", self.recover_alpha is not None),
                ("--ewr-eps", self.ewr_eps is not None),
                (f"--quantize {self.quantize}", self.quantize != "none"),
            ) if given]
            if needs:
                raise UsageError(f"{needs[0]} needs calibration data (--calibration FILE.npz)")
        if self.calibration_samples is not None:
            _integer(self.calibration_samples, "calibration-samples", 1)
        recover = self.recover or ("lstsq" if has_calibration else "none")
        if self.recover_alpha is not None:
            if recover not in ("lstsq", "ewr", "distill"):
                raise UsageError(f"--recover-alpha only applies to --recover lstsq, ewr or distill, not {recover}")
            _number(self.recover_alpha, "recover-alpha", 0.0, math.inf, low_open=True)
        if self.ewr_eps is not None:
            if recover != "ewr":
                raise UsageError(f"--ewr-eps only applies to --recover ewr, not {recover}")
            _number(self.ewr_eps, "ewr-eps", 0.0, math.inf, low_open=True)
        distill = recover == "distill"
        for name, value in (("finetune-epochs", self.finetune_epochs), ("finetune-time", self.finetune_time)):
            if value is not None and not distill:
                raise UsageError(f"--{name} only applies to --recover distill, not {recover}")
        if self.finetune_epochs is not None:
            _integer(self.finetune_epochs, "finetune-epochs", 0)
        if self.finetune_time is not None:
            _number(self.finetune_time, "finetune-time", 0.0, math.inf, low_open=True)

        round_to = self.round_to
        if round_to is None:
            from .deploy import channel_multiple  # imports onnxruntime: only when it is needed

            round_to = channel_multiple(self.target, self.provider, self.quantize)
        return replace(
            self,
            round_to=int(round_to),
            sparsity=float(self.sparsity),
            head_sparsity=None if self.head_sparsity is None else float(self.head_sparsity),
            ffn_sparsity=None if self.ffn_sparsity is None else float(self.ffn_sparsity),
            hidden_sparsity=0.0 if self.hidden_sparsity is None else float(self.hidden_sparsity),
            head_method=self.head_method or "prune",
            hidden_method=self.hidden_method or "prune",
            groups=None if self.groups is None else tuple(sorted({int(g) for g in self.groups})),
            ot_reg=(0.0 if self.ot_reg is None else float(self.ot_reg)) if fusion else None,
            ot_p=(1.0 if self.ot_p is None else float(self.ot_p)) if fusion else None,
            marginals=(self.marginals or "uniform") if fusion else None,
            cost_kernel=(self.cost_kernel or "auto") if fusion else None,
            global_target=(self.global_target or "macs") if is_global else None,
            max_group_sparsity=(0.9 if self.max_group_sparsity is None else float(self.max_group_sparsity))
            if budgeted else None,
            sensitivity=None if self.sensitivity is None else str(self.sensitivity),
            sensitivity_levels=levels,
            recover=recover,
            recover_alpha=(1e-3 if self.recover_alpha is None else float(self.recover_alpha))
            if recover in ("lstsq", "ewr", "distill") else None,
            ewr_eps=(0.05 if self.ewr_eps is None else float(self.ewr_eps)) if recover == "ewr" else None,
            finetune_epochs=(DEFAULT_FINETUNE_EPOCHS if self.finetune_epochs is None else int(self.finetune_epochs))
            if distill else None,
            finetune_time=None if self.finetune_time is None else float(self.finetune_time),
        )

    def kind_sparsity(self) -> dict[str, float]:
        """Sparsity per group kind that differs from ``sparsity`` (resolved options)."""
        given = {"head": self.head_sparsity, "ffn": self.ffn_sparsity, "hidden": self.hidden_sparsity}
        return {kind: s for kind, s in given.items() if s is not None}

    def kind_method(self) -> dict[str, str]:
        """Method per group kind that differs from ``method`` (resolved options)."""
        given = {"head": self.head_method, "hidden": self.hidden_method}
        return {kind: m for kind, m in given.items() if m}

    def to_dict(self) -> dict:
        """JSON-ready, every field (``None`` = does not apply to this run)."""
        out = asdict(self)
        for key in ("groups", "sensitivity_levels"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _integer(value, name: str, low: int) -> None:
    if not _is_int(value) or value < low:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        raise UsageError(f"{name} must be {what}, got {value!r}")


def _number(value, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise UsageError(f"{name} must be in {lo}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{hi}, "
                         f"got {value!r}")


def _choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")
