"""Command line: arguments, progress, printing and exit codes; no pruning logic."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

from . import __version__
from .errors import (INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT, TERMINATED_EXIT, OutputError, PruneWarning,
                     UsageError, UserError)

#: Set to 1 to print the traceback of an internal error (same as --debug).
DEBUG_ENV = "ONNX_INTRAFUSION_DEBUG"

EPILOG = """examples:
  onnx-intrafusion model.onnx model_pruned.onnx --sparsity 0.5
  onnx-intrafusion model.onnx small.onnx --sparsity 0.3 --method prune --importance l2 --report report.json
  python -m onnx_intrafusion in.onnx out.onnx --sparsity 0.5 --ot-reg 0.05 --provider cpu
  onnx-intrafusion model.onnx small.onnx --sparsity 0.5 --calibration calib.npz   (recommended with data)
  onnx-intrafusion model.onnx sens.json --analyse-only --calibration calib.npz --sensitivity-plot sens.png
  onnx-intrafusion model.onnx small.onnx --sparsity 0.5 --allocation sensitivity --sensitivity sens.json \
      --calibration calib.npz   (--sparsity = fraction of MACs; sens.json is reused when it exists)

exit codes: 0 ok, 1 internal error (a bug: please report; --debug shows the traceback),
            2 bad option, 3 unreadable, invalid or unsupported model, 4 nothing prunable,
            5 pruned model failed validation, 6 output not writable, 7 execution provider
            not usable, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
            OUT is never left behind, complete or partial, unless the exit code is 0.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .importance import IMPORTANCES
    from .plans import MARGINALS, METHODS

    p = _Parser(
        prog="onnx-intrafusion",
        description="Structurally prune an ONNX model (whole channels removed) and merge the removed "
        "channels into the kept ones with optimal transport (Intra-Fusion).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN.onnx", help="model to prune (never modified)")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the pruned model")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of channels removed in every prunable group, 0 <= S < 1 (default 0.5)")
    p.add_argument("--method", choices=METHODS, default="intrafusion",
                   help="intrafusion: merge removed channels into kept ones (default); prune: drop them")
    p.add_argument("--importance", choices=(*IMPORTANCES, "activation"), default="l1",
                   help="channel importance that picks the kept channels (default l1); activation = mean "
                   "|activation| on the calibration data (needs --calibration)")
    p.add_argument("--ot-reg", type=float, default=0.0,
                   help="entropic regularisation for Sinkhorn, relative to the largest cost; 0 = exact OT (default)")
    p.add_argument("--ot-p", type=float, default=1.0, help="Minkowski p of the transport ground cost (default 1)")
    p.add_argument("--marginals", choices=MARGINALS, default="uniform",
                   help="transport marginals: uniform (default) or importance-weighted")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="every pruned group keeps a multiple of N channels (default 1); 8 or 16 suit GPU "
                   "tensor cores and int8 kernels, whose fast paths want channel counts in such multiples")
    p.add_argument("--allocation", choices=("uniform", "global", "sensitivity"), default=None,
                   help="how channels are shared out: uniform = every group loses --sparsity of its channels "
                   "(default); global = rank channels across all groups (importance normalised by its group "
                   "mean) and remove the least important until --sparsity of the MACs (or channels, see "
                   "--global-target) is gone; sensitivity = measure each group pruned alone on held-back "
                   "calibration samples, then remove --sparsity of the MACs with the least summed output "
                   "distortion (needs --calibration)")
    p.add_argument("--global", dest="global_allocation", action="store_true",
                   help="same as --allocation global")
    p.add_argument("--global-target", choices=("macs", "channels"), default="macs",
                   help="with --global: what --sparsity is a fraction of (default macs)")
    p.add_argument("--max-group-sparsity", type=float, default=0.9, metavar="S",
                   help="with --allocation global or sensitivity: no group loses more than this fraction of its "
                   "channels (default 0.9)")
    data = p.add_argument_group("calibration data (recommended when available; no labels needed)")
    data.add_argument("--calibration", metavar="FILE.npz",
                      help="unlabelled inputs: keys = model input names (any one key for a single-input "
                      "model), first axis = samples; a few hundred are enough")
    data.add_argument("--calibration-samples", type=int, metavar="N", help="use at most N calibration samples")
    data.add_argument("--recover", choices=("none", "bias", "lstsq", "ewr"), default=None,
                      help="re-fit each pruned layer on the calibration data, input to output: bias = mean "
                      "shift, lstsq = ridge least squares (default with --calibration), ewr = entropic "
                      "Wasserstein regression (SWAP); none without --calibration")
    data.add_argument("--recover-alpha", type=float, default=1e-3,
                      help="ridge strength towards the fused weights, relative to the input energy (default 1e-3)")
    data.add_argument("--ewr-eps", type=float, default=0.05,
                      help="EWR entropic regulariser, relative to the mean transport cost (default 0.05)")
    sens = p.add_argument_group("sensitivity analysis (needs --calibration)")
    sens.add_argument("--analyse-only", action="store_true",
                      help="measure the sensitivity of every group and write it as JSON to OUT (instead of a "
                      "model); reuse it with --allocation sensitivity --sensitivity OUT")
    sens.add_argument("--sensitivity", metavar="FILE.json",
                      help="with --allocation sensitivity: read the analysis from FILE when it exists (it must "
                      "come from the same model), else measure it and write it there")
    sens.add_argument("--sensitivity-levels", metavar="L1,L2,...", default=None,
                      help="fractions of a group's channels removed in the analysis (default 0.25,0.5,0.75)")
    sens.add_argument("--sensitivity-plot", metavar="FILE.png",
                      help="also draw the analysis as a heat map (group x level; needs matplotlib)")
    sens.add_argument("--workers", type=int, metavar="N", default=None,
                      help="local processes for the analysis (default: the cores, bounded by memory)")
    sens.add_argument("--ray", metavar="ADDRESS", default=None,
                      help="run the analysis as Ray tasks on the cluster at ADDRESS (e.g. auto or "
                      "ray://head:10001; pip install 'onnx-intrafusion[ray]')")
    p.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check of the result")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider for validation: auto = CUDA when usable, else CPU")
    p.add_argument("--seed", type=int, default=0, help="seed for random importance and validation inputs")
    p.add_argument("--quiet", action="store_true", help="print only errors (no progress, no report table)")
    p.add_argument("--debug", action="store_true",
                   help=f"print the traceback of an internal error (or set {DEBUG_ENV}=1)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _allocation(args: argparse.Namespace) -> str:
    if args.global_allocation:
        if args.allocation not in (None, "global"):
            raise UsageError(f"--global and --allocation {args.allocation} contradict each other")
        return "global"
    return args.allocation or "uniform"


def _levels(text: str | None):
    from .sensitivity import DEFAULT_LEVELS

    if text is None:
        return DEFAULT_LEVELS
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sensitivity-levels wants comma-separated fractions like 0.25,0.5,0.75, got '{text}'") from None


def _check_sensitivity_options(args: argparse.Namespace, allocation: str) -> None:
    """Options of the analysis: which need which, one line each (before any work)."""
    given = [name for name, value in (("--sensitivity", args.sensitivity), ("--sensitivity-levels", args.sensitivity_levels),
                                      ("--sensitivity-plot", args.sensitivity_plot), ("--workers", args.workers),
                                      ("--ray", args.ray)) if value is not None]
    uses = allocation == "sensitivity" or args.analyse_only
    if (uses or given) and not args.calibration:
        what = "--analyse-only" if args.analyse_only else ("--allocation sensitivity" if uses else given[0])
        raise UsageError(f"{what} needs calibration data (--calibration FILE.npz)")
    if given and not uses:
        raise UsageError(f"{given[0]} is used by --allocation sensitivity or --analyse-only")
    if args.analyse_only:
        if args.sensitivity is not None:
            raise UsageError("--analyse-only writes the analysis to OUT; --sensitivity is for reusing it")
        if Path(args.output).suffix.lower() == ".onnx":
            raise UsageError("with --analyse-only, OUT is the analysis (JSON), not a model: give a .json path")
    if args.workers is not None and args.ray is not None:
        raise UsageError("--workers and --ray exclude each other (Ray decides where tasks run)")
    if args.sensitivity_plot and Path(args.sensitivity_plot).resolve().parent.is_dir() is False:
        raise OutputError(f"plot folder does not exist: {Path(args.sensitivity_plot).parent}")


def _check_paths(args: argparse.Namespace) -> None:
    from .model_io import input_files

    src, dst = Path(args.input), Path(args.output)
    protected = input_files(src)  # IN and its external data files: never written
    data = dst.with_name(dst.name + ".data")
    if any(_same(p, dst) or _same(p, data) for p in protected):
        raise UsageError("OUT must differ from IN and from its external data file (the input is never overwritten)")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    if dst.is_dir():
        raise OutputError(f"output path is a directory: {dst}")
    if args.report:
        report = Path(args.report)
        if any(_same(p, report) for p in [*protected, dst, data]):
            raise UsageError("REPORT.json must differ from IN, OUT and their data files")
        if not report.resolve().parent.is_dir():
            raise OutputError(f"report folder does not exist: {report.parent}")
        if report.is_dir():
            raise OutputError(f"report path is a directory: {report}")


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that temporary files are cleaned up on the way out."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def _warning_printer(debug: bool):
    """PruneWarnings as one line each; library warnings only with --debug."""
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        if issubclass(category, PruneWarning):
            print(f"onnx-intrafusion: warning: {message}", file=sys.stderr, flush=True)
        elif debug:
            print(f"onnx-intrafusion: debug: {category.__name__}: {message} ({filename}:{lineno})",
                  file=sys.stderr, flush=True)
    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .plans import preload_pot

    preload_pot()  # POT without torch/jax/sklearn: seconds faster to start
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
        previous = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PruneWarning)
            if not args.quiet:
                warnings.showwarning = _warning_printer(debug)
            else:
                warnings.simplefilter("ignore", PruneWarning)
            return _run(args)
    except UserError as exc:
        print(f"onnx-intrafusion: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnx-intrafusion: interrupted; nothing written", file=sys.stderr)
        return INTERRUPTED_EXIT
    except _Terminated:
        print("onnx-intrafusion: terminated; nothing written", file=sys.stderr)
        return TERMINATED_EXIT
    except Exception as exc:  # noqa: BLE001 - a bug: one line, no partial output, traceback on request
        if debug:
            traceback.print_exc()
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        hint = "" if debug else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"onnx-intrafusion: internal error, please report: {detail}; nothing written{hint}",
              file=sys.stderr)
        return INTERNAL_ERROR_EXIT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    # Progress goes to a terminal only: pipes and logs get the report alone.
    show_progress = not args.quiet and sys.stderr.isatty()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if show_progress else None
    from .model_io import save_model
    from .pipeline import prune

    allocation = _allocation(args)
    _check_sensitivity_options(args, allocation)
    _check_paths(args)
    result = prune(
        args.input,
        sparsity=args.sparsity,
        method=args.method,
        importance=args.importance,
        seed=args.seed,
        ot_reg=args.ot_reg,
        ot_p=args.ot_p,
        marginals=args.marginals,
        round_to=args.round_to,
        allocation=allocation,
        global_target=args.global_target,
        max_group_sparsity=args.max_group_sparsity,
        validate=not args.no_validate,
        provider=args.provider,
        progress=say,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        recover=args.recover,
        recover_alpha=args.recover_alpha,
        ewr_eps=args.ewr_eps,
        sensitivity=args.sensitivity,
        sensitivity_levels=_levels(args.sensitivity_levels),
        workers=args.workers,
        ray_address=args.ray,
        analyse_only=args.analyse_only,
    )
    if args.analyse_only:
        written = [result.sensitivity.save(args.output)]
    else:
        written = save_model(result.model, args.output)
    if args.report:
        try:
            _write_text(Path(args.report), result.report.to_json() + "\n")
        except BaseException:
            for path in written:  # all or nothing: no OUT without the report that was asked for
                path.unlink(missing_ok=True)
            raise
    if args.sensitivity_plot and result.sensitivity is not None:
        if result.sensitivity.plot(args.sensitivity_plot) is None:
            warnings.warn(PruneWarning("matplotlib is not installed: no sensitivity plot written "
                                       "(pip install matplotlib)"))
        else:
            written.append(Path(args.sensitivity_plot))
    if not args.quiet:
        print(result.sensitivity.to_text() if args.analyse_only else result.report.to_text())
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write report {path}: {exc.strerror}") from None
