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
    from .deploy import QUANTIZE, TARGETS
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
    p.add_argument("--target", choices=TARGETS, default="auto",
                   help="runtime the model is for; sets the channel multiple its fast kernels need (auto = "
                   "the validation provider on this CPU: 16 with AVX-512, 8 with AVX2, 8 on CUDA; none = 1)")
    p.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="every pruned group keeps a multiple of N channels (overrides --target's multiple)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="int8: after pruning, static int8 quantization (QDQ, per-channel weights) on the "
                   "calibration data (needs --calibration), checked against the original")
    p.add_argument("--ort-format", action="store_true",
                   help="also write OUT.ort (onnxruntime's mobile format), checked by loading it")
    p.add_argument("--global", dest="global_allocation", action="store_true",
                   help="global allocation: rank channels across all groups (importance normalised by its "
                   "group mean) and remove the least important until --sparsity of the MACs (or channels, "
                   "see --global-target) is gone; default: every group loses --sparsity of its channels")
    p.add_argument("--global-target", choices=("macs", "channels"), default="macs",
                   help="with --global: what --sparsity is a fraction of (default macs)")
    p.add_argument("--max-group-sparsity", type=float, default=0.9, metavar="S",
                   help="with --global: no group loses more than this fraction of its channels (default 0.9)")
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
    if getattr(args, "ort_format", False):
        from .deploy import ort_path

        if any(_same(p, ort_path(dst)) for p in protected):
            raise UsageError("OUT.ort would overwrite the input: choose another OUT")
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
        target=args.target,
        quantize=args.quantize,
        allocation="global" if args.global_allocation else "uniform",
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
    )
    written = save_model(result.model, args.output)
    try:
        if args.ort_format:
            from .deploy import write_ort

            written.append(write_ort(written[0]))
        if args.report:
            _write_text(Path(args.report), result.report.to_json() + "\n")
    except BaseException:
        for path in written:  # all or nothing: no OUT without the report or .ort that was asked for
            path.unlink(missing_ok=True)
        raise
    if not args.quiet:
        print(result.report.to_text())
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
