"""Command line: arguments, progress, printing and exit codes; no pruning logic."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
import stat
from dataclasses import fields
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


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.25,0.5,0.75, got '{text}'") from None


def build_parser() -> argparse.ArgumentParser:
    """Flags whose ``dest`` is the name of an :class:`~onnx_intrafusion.options.Options` field."""
    from .options import ALLOCATIONS, COST_KERNELS, DATA_IMPORTANCES, DEPLOY_TARGETS, GLOBAL_TARGETS, MARGINALS, \
        METHODS, PROVIDERS, QUANTIZATIONS, RECOVERIES, WEIGHT_IMPORTANCES

    p = _Parser(
        prog="onnx-intrafusion",
        description="Structurally prune an ONNX model (whole channels removed) and merge the removed "
        "channels into the kept ones with optimal transport (Intra-Fusion).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN.onnx", help="model to prune (never modified)")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the pruned model (a regular file path; "
                   "a symlink is followed and its target replaced)")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of channels removed in every prunable group, 0 <= S < 1 (default 0.5); with "
                   "--allocation global: fraction of the MACs removed")
    p.add_argument("--method", choices=METHODS, default="intrafusion",
                   help="intrafusion: merge removed channels into kept ones (default); prune: drop them")
    p.add_argument("--importance", choices=(*WEIGHT_IMPORTANCES, *DATA_IMPORTANCES), default="l1",
                   help="channel importance that picks the kept channels (default l1); these need "
                   "--calibration: activation = mean |activation|, taylor = |activation x gradient| of a "
                   "label-free loss, prospr = meta-gradient of channel masks through a few SGD steps "
                   "(ProsPr); taylor and prospr need the torch extra")
    kinds = p.add_argument_group("transformers: per group kind (with --global or --allocation sensitivity "
                                 "the kind is fixed at this sparsity and the other kinds reach the MAC target)")
    kinds.add_argument("--head-sparsity", type=float, default=None, metavar="S",
                       help="fraction of the attention heads removed in every attention (default --sparsity)")
    kinds.add_argument("--ffn-sparsity", type=float, default=None, metavar="S",
                       help="fraction of the neurons removed in every per-token MLP/FFN (default --sparsity)")
    kinds.add_argument("--hidden-sparsity", type=float, default=None, metavar="S",
                       help="fraction of the residual width (hidden size: embedding, every residual Add and "
                       "LayerNorm) removed; needs --calibration (default 0: measured no better at equal MACs)")
    kinds.add_argument("--head-method", choices=METHODS, default=None,
                       help="how removed heads are handled: prune = dropped (default, measured better), "
                       "intrafusion = merged into kept heads")
    kinds.add_argument("--hidden-method", choices=METHODS, default=None,
                       help="how removed hidden channels are handled: prune = dropped (default, measured better "
                       "with lstsq), intrafusion = merged into kept ones")
    ot = p.add_argument_group("Intra-Fusion transport (only with --method intrafusion)")
    ot.add_argument("--ot-reg", type=float, default=None,
                    help="entropic regularisation for Sinkhorn, relative to the largest cost; 0 = exact OT (default)")
    ot.add_argument("--ot-p", type=float, default=None, help="Minkowski p of the transport ground cost (default 1)")
    ot.add_argument("--marginals", choices=MARGINALS, default=None,
                    help="transport marginals: uniform (default) or importance-weighted")
    ot.add_argument("--cost-kernel", choices=COST_KERNELS, default=None,
                    help="L1 cost matrices: auto (default) = the package's compiled C kernel when it was built at "
                    "install, else numba's (the fast extra) only for runs large enough to repay its ~115 MB; "
                    "compiled = either kernel whenever available; scipy = SciPy's cdist (~4x slower)")
    alloc = p.add_argument_group("allocation")
    alloc.add_argument("--target", choices=DEPLOY_TARGETS, default="auto",
                       help="runtime the model is for; every pruned group keeps a multiple of the channels its "
                       "fast kernels need (auto, the default: the validation provider on this CPU, 16 with "
                       "AVX-512, 8 with AVX2 or CUDA; none: exact counts; table in docs/deploy.md)")
    alloc.add_argument("--round-to", type=_positive_int, default=None, metavar="N",
                       help="every pruned group keeps a multiple of N channels (overrides --target's multiple)")
    alloc.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                       help="uniform: every group loses --sparsity of its channels (default); global: rank "
                       "channels across all groups (importance normalised by its group mean) and remove the "
                       "least important until --sparsity of the MACs (or channels, see --global-target) is gone; "
                       "sensitivity: measure each group pruned alone on held-back calibration samples, then "
                       "remove --sparsity of the MACs with the least summed output distortion (needs --calibration)")
    alloc.add_argument("--global", dest="allocation", action="store_const", const="global",
                       help="same as --allocation global")
    alloc.add_argument("--global-target", choices=GLOBAL_TARGETS, default=None,
                       help="with --allocation global: what --sparsity is a fraction of (default macs)")
    alloc.add_argument("--max-group-sparsity", type=float, default=None, metavar="S",
                       help="with --allocation global or sensitivity: no group loses more than this fraction of "
                       "its channels (default 0.9)")
    sens = p.add_argument_group("sensitivity analysis (needs --calibration)")
    sens.add_argument("--analyse-only", action="store_true",
                      help="measure the sensitivity of every group and write it as JSON to OUT (a .json path; no "
                      "model is written); reuse it with --allocation sensitivity --sensitivity OUT")
    sens.add_argument("--sensitivity", metavar="FILE.json", default=None,
                      help="with --allocation sensitivity: read the analysis from FILE when it exists (it must "
                      "come from the same model), else measure it and write it there")
    sens.add_argument("--sensitivity-levels", type=_levels, metavar="L1,L2,...", default=None,
                      help="fractions of a group's channels removed in the analysis (default 0.25,0.5,0.75)")
    sens.add_argument("--sensitivity-plot", metavar="FILE.png", default=None,
                      help="also draw the analysis as a heat map, group x level (needs matplotlib)")
    sens.add_argument("--workers", type=_positive_int, metavar="N", default=None,
                      help="local processes for the analysis (default: the cores, bounded by memory)")
    sens.add_argument("--ray", dest="ray_address", metavar="ADDRESS", default=None,
                      help="run the analysis as Ray tasks on the cluster at ADDRESS (e.g. auto or "
                      "ray://head:10001; pip install 'onnx-intrafusion[ray]')")
    data = p.add_argument_group("calibration data (recommended when available; no labels needed)")
    data.add_argument("--calibration", metavar="FILE.npz",
                      help="unlabelled inputs: keys = model input names (any one key for a single-input "
                      "model), first axis = samples; a few hundred are enough. 10%% are held back to check "
                      "every fitted step and to validate")
    data.add_argument("--calibration-samples", type=_positive_int, default=None, metavar="N",
                      help="use at most N calibration samples")
    data.add_argument("--recover", choices=RECOVERIES, default=None,
                      help="re-fit each pruned layer on the calibration data, input to output: bias = mean "
                      "shift, lstsq = ridge least squares (default with --calibration), ewr = entropic "
                      "Wasserstein regression (SWAP); distill = lstsq, then fine-tune all weights to match "
                      "the original model's outputs (torch extra); none without --calibration")
    data.add_argument("--recover-alpha", type=float, default=None,
                      help="lstsq/ewr: ridge strength towards the fused weights, relative to the input energy "
                      "(default 1e-3)")
    data.add_argument("--ewr-eps", type=float, default=None,
                      help="ewr: entropic regulariser, relative to the mean transport cost (default 0.05)")
    data.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                      help="int8: after pruning and recovery, static int8 quantization (QDQ, per-channel "
                      "weights) on the calibration data, checked against the original on held-back samples")
    data.add_argument("--finetune-epochs", type=int, default=None, metavar="N",
                      help="distill: epochs over the calibration data (default 10)")
    data.add_argument("--finetune-time", type=float, default=None, metavar="SECONDS",
                      help="distill: stop after this many seconds (the best epoch so far is kept)")
    out = p.add_argument_group("output and validation")
    out.add_argument("--ort-format", action="store_true",
                     help="also write OUT.ort (onnxruntime's mobile format; OUT with .onnx replaced), "
                     "checked by loading it")
    out.add_argument("--report", metavar="REPORT.json",
                     help="also write the report as JSON ('-': to stdout; the table then goes to stderr)")
    out.add_argument("--no-validate", dest="validate", action="store_false",
                     help="skip the onnxruntime check of the result")
    out.add_argument("--provider", choices=PROVIDERS, default="auto",
                     help="onnxruntime provider for validation: auto = CUDA when usable, else CPU")
    out.add_argument("--allow-unchanged", action="store_true",
                     help="write an unchanged copy when nothing can be pruned at these settings (default: exit 4)")
    p.add_argument("--seed", type=_non_negative_int, default=0,
                   help="seed for random importance, the held-back split and validation inputs (default 0)")
    p.add_argument("--quiet", action="store_true", help="print only errors (no progress, no report table)")
    p.add_argument("--debug", action="store_true",
                   help=f"print the traceback of an internal error and library warnings (or set {DEBUG_ENV}=1)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def options_from_args(args: argparse.Namespace):
    """The run's :class:`Options` from parsed arguments (dest = field name)."""
    from .options import Options

    return Options(**{f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)})


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _regular_or_absent(path: Path, what: str) -> Path:
    """Where ``path`` will really be written: itself, or a symlink's target.

    Devices, FIFOs, sockets and directories are refused (exit 6) before any
    work: an atomic rename would replace them with a regular file (as root,
    ``/dev/null`` would be gone).  A symlink is followed: the file it points
    to is replaced atomically in its own folder and the link keeps pointing
    at it.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise OutputError(f"cannot use {what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{what} is a directory: {path}")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise OutputError(f"{what} {path} is {kind}; give the path of a regular file")
    return target


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(where OUT goes, where the report goes or None for stdout/none); errors before any work."""
    from .model_io import input_files

    src = Path(args.input)
    dst = _regular_or_absent(Path(args.output), "OUT")
    protected = input_files(src)  # IN and its external data files: never written
    data = _regular_or_absent(dst.with_name(dst.name + ".data"), "OUT.data")
    if any(_same(p, dst) or _same(p, data) for p in protected):
        raise UsageError("OUT must differ from IN and from its external data file (the input is never overwritten)")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    if args.ort_format:
        from .deploy import ort_path

        ort_file = _regular_or_absent(ort_path(dst), "OUT.ort")
        if any(_same(p, ort_file) for p in protected):
            raise UsageError("OUT.ort would overwrite the input: choose another OUT")
    report = None
    if args.analyse_only and dst.suffix.lower() == ".onnx":
        raise UsageError("with --analyse-only, OUT is the analysis (JSON), not a model: give a .json path")
    if args.analyse_only and args.sensitivity is not None:
        raise UsageError("--analyse-only writes the analysis to OUT; --sensitivity is for reusing it")
    if args.sensitivity_plot is not None:
        if not (args.analyse_only or args.allocation == "sensitivity"):
            raise UsageError("--sensitivity-plot only applies to --allocation sensitivity or --analyse-only")
        plot = _regular_or_absent(Path(args.sensitivity_plot), "the plot path")
        if any(_same(p, plot) for p in [*protected, dst, data]) or not plot.resolve().parent.is_dir():
            raise OutputError(f"cannot write the plot to {args.sensitivity_plot} (folder missing or IN/OUT)")
    if args.report and args.report != "-":
        report = _regular_or_absent(Path(args.report), "REPORT")
        if any(_same(p, report) for p in [*protected, dst, data]):
            raise UsageError("REPORT.json must differ from IN, OUT and their data files")
        if not report.resolve().parent.is_dir():
            raise OutputError(f"report folder does not exist: {report.parent}")
    return dst, report


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


def _emit(text: str, stream) -> bool:
    """Print to a stream that may be closed (``| head``): False, and the stream muted, if it is."""
    try:
        print(text, file=stream, flush=True)
        return True
    except (BrokenPipeError, ValueError, OSError):
        _mute(stream)
        return False


def _mute(stream) -> None:
    """Point a broken stream at /dev/null so that Python's exit-time flush cannot fail the run."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # POT is imported when the first transport plan is solved (plans.import_pot, without its
    # torch/jax/sklearn/networkx probes): its 39 MB are not held while onnxruntime runs the original.
    from .model_io import map_large_allocations

    if args.calibration is None:  # data-free runs: freed weight-sized arrays leave the process (peak memory)
        map_large_allocations()
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not debug:
        from .model_io import quiet_graphsurgeon

        quiet_graphsurgeon().__enter__()  # for the whole process: library chatter only with --debug
        from .validate import quiet_runtime_logs

        quiet_runtime_logs()
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
        _emit(f"onnx-intrafusion: error: {' '.join(str(exc).split())}", sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _emit("onnx-intrafusion: interrupted; nothing written", sys.stderr)
        return INTERRUPTED_EXIT
    except _Terminated:
        _emit("onnx-intrafusion: terminated; nothing written", sys.stderr)
        return TERMINATED_EXIT
    except Exception as exc:  # noqa: BLE001 - a bug: one line, no partial output, traceback on request
        if debug:
            traceback.print_exc()
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        hint = "" if debug else f" (rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
        _emit(f"onnx-intrafusion: internal error, please report: {detail}; nothing written{hint}", sys.stderr)
        return INTERNAL_ERROR_EXIT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                _mute(stream)


def _progress(args: argparse.Namespace):
    """A bar on a terminal, plain stage lines in a log or pipe, nothing with --quiet."""
    from .progress import LogProgress, Progress, TerminalProgress

    if args.quiet:
        return Progress()
    return TerminalProgress() if sys.stderr.isatty() else LogProgress()


def _run(args: argparse.Namespace) -> int:
    from .model_io import save_model
    from .pipeline import prune

    options = options_from_args(args)
    dst, report_path = _check_paths(args)
    result = prune(args.input, options=options, calibration=args.calibration, progress=_progress(args))
    written = [result.sensitivity.save(dst)] if args.analyse_only else save_model(result.model, dst)
    result.report.output = str(Path(args.output))
    # From here OUT is complete: only a report or .ort that was asked for and could not
    # be written undoes it (all or nothing); a closed stdout/stderr never does.
    try:
        if args.ort_format:
            from .deploy import write_ort

            written.append(write_ort(written[0]))
        if args.report:
            if report_path is None:  # "-": the JSON is the only thing on stdout
                if not _emit(result.report.to_json(), sys.stdout):
                    raise OutputError("cannot write the report to stdout (closed)")
            else:
                _write_text(report_path, result.report.to_json() + "\n")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if args.sensitivity_plot and result.sensitivity is not None:
        if result.sensitivity.plot(args.sensitivity_plot) is None:
            warnings.warn(PruneWarning("matplotlib is not installed: no sensitivity plot written "
                                       "(pip install matplotlib)"))
        else:
            written.append(Path(args.sensitivity_plot))
    if not args.quiet:
        table = sys.stderr if args.report == "-" else sys.stdout
        text = result.sensitivity.to_text() if args.analyse_only else result.report.to_text()
        _emit(text, table) and _emit(f"\nwrote {', '.join(str(p) for p in written)}", table)
    return 0


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write report {path}: {exc.strerror}") from None
