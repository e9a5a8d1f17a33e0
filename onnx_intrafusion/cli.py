"""Command line: arguments, progress, printing and exit codes; no pruning logic."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import OutputError, UsageError, UserError

EPILOG = """examples:
  onnx-intrafusion model.onnx model_pruned.onnx --sparsity 0.5
  onnx-intrafusion model.onnx small.onnx --sparsity 0.3 --method prune --importance l2 --report report.json
  python -m onnx_intrafusion in.onnx out.onnx --sparsity 0.5 --ot-reg 0.05 --provider cpu

exit codes: 0 ok, 2 bad option, 3 unreadable or unsupported model, 4 nothing prunable,
            5 pruned model failed validation (nothing written), 6 output not writable,
            7 execution provider not usable
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
    p.add_argument("--importance", choices=IMPORTANCES, default="l1",
                   help="channel importance that picks the kept channels (default l1)")
    p.add_argument("--ot-reg", type=float, default=0.0,
                   help="entropic regularisation for Sinkhorn, relative to the largest cost; 0 = exact OT (default)")
    p.add_argument("--ot-p", type=float, default=1.0, help="Minkowski p of the transport ground cost (default 1)")
    p.add_argument("--marginals", choices=MARGINALS, default="uniform",
                   help="transport marginals: uniform (default) or importance-weighted")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="every pruned group keeps a multiple of N channels (default 1); 8 or 16 suit GPU "
                   "tensor cores and int8 kernels, whose fast paths want channel counts in such multiples")
    p.add_argument("--global", dest="global_allocation", action="store_true",
                   help="global allocation: rank channels across all groups (importance normalised by its "
                   "group mean) and remove the least important until --sparsity of the MACs (or channels, "
                   "see --global-target) is gone; default: every group loses --sparsity of its channels")
    p.add_argument("--global-target", choices=("macs", "channels"), default="macs",
                   help="with --global: what --sparsity is a fraction of (default macs)")
    p.add_argument("--max-group-sparsity", type=float, default=0.9, metavar="S",
                   help="with --global: no group loses more than this fraction of its channels (default 0.9)")
    p.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime check of the result")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider for validation: auto = CUDA when usable, else CPU")
    p.add_argument("--seed", type=int, default=0, help="seed for random importance and validation inputs")
    p.add_argument("--quiet", action="store_true", help="print only errors (no progress, no report table)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _check_paths(args: argparse.Namespace) -> None:
    src, dst = Path(args.input), Path(args.output)
    if src.exists() and dst.exists() and os.path.samefile(src, dst) or src.resolve() == dst.resolve():
        raise UsageError("OUT must differ from IN (the input is never overwritten)")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    if dst.is_dir():
        raise OutputError(f"output path is a directory: {dst}")
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise OutputError(f"report folder does not exist: {Path(args.report).parent}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .plans import preload_pot

    preload_pot()  # POT without torch/jax/sklearn: seconds faster to start
    # Progress goes to a terminal only: pipes and logs get the report alone.
    show_progress = not args.quiet and sys.stderr.isatty()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if show_progress else None
    try:
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
            allocation="global" if args.global_allocation else "uniform",
            global_target=args.global_target,
            max_group_sparsity=args.max_group_sparsity,
            validate=not args.no_validate,
            provider=args.provider,
            progress=say,
        )
        written = save_model(result.model, args.output)
        if args.report:
            _write_text(Path(args.report), result.report.to_json() + "\n")
    except UserError as exc:
        print(f"onnx-intrafusion: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnx-intrafusion: interrupted; nothing written", file=sys.stderr)
        return 130
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
        raise OutputError(f"cannot write report {path}: {exc.strerror}") from None
