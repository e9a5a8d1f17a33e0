"""Deployment: the channel multiple a runtime needs, int8 quantization, ORT format.

*Channel multiple.*  Pruning makes a model faster only if the runtime's fast
kernels still apply to the new channel counts.  onnxruntime's CPU provider
rewrites Convs into blocked NCHWc kernels only when the output channels (and
the input channels, except for a thin stem) are multiples of its SIMD block:
16 floats on AVX-512, 8 on AVX/AVX2.  Without rounding, a MobileNetV2 pruned by
0.3 ran *slower* than the original (0.7x) because its convs fell back to the
plain kernel.  :func:`channel_multiple` maps a deployment ``target`` (and, for
``auto``, the validation provider and this machine's instruction set) to the
multiple every pruned group keeps; docs/deploy.md has the table and how it was
measured.

*int8.*  :func:`quantize_int8` runs onnxruntime's static quantization (QDQ,
per-channel symmetric int8 weights, uint8 activations) on the pruned model with
the user's calibration data and checks the result against the fp32 original
on held-back samples.

*ORT format.*  :func:`write_ort` saves onnxruntime's mobile ``.ort`` format
(flatbuffer, basic graph optimisations applied) and loads it back.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OutputError, UsageError, ValidationError
from .options import DEPLOY_TARGETS as TARGETS


#: Channel multiple per fixed target.  ``ort-cpu`` and ``openvino`` depend on the CPU
#: (see :func:`cpu_block`); the others are the widths their kernels pack channels by.
FIXED_MULTIPLES = {
    "ort-cuda": 8,  # fp16/int8 tensor-core GEMMs want K and N in multiples of 8
    "tflite": 8,  # XNNPACK packs output channels in tiles of 8 (x86 and Arm)
    "ncnn": 8,  # ncnn's elempack: 4 on Arm NEON, 8 on x86 AVX; 8 suits both
    "mnn": 4,  # MNN stores activations as NC4HW4 on every backend
    "none": 1,
}
#: int8 kernels (VNNI / dot-product instructions) reduce over 4 channels at a time
#: and pack output channels by 8 or more; quantized models get at least this multiple.
INT8_MIN_MULTIPLE = 8


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Instruction-set flags of this CPU (``/proc/cpuinfo``; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            return set(value.split())
    return set()


def cpu_block(flags: set[str]) -> int:
    """SIMD width in float32 lanes: the block of onnxruntime's NCHWc convs (and oneDNN's nChwXc)."""
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    return 4  # SSE / Arm NEON: 128-bit vectors


def resolve_target(target: str, provider: str = "auto", available: Iterable[str] | None = None) -> str:
    """``auto`` becomes the runtime validation uses: ``ort-cuda`` when CUDA is used, else ``ort-cpu``."""
    if target not in TARGETS:
        raise UsageError(f"unknown target '{target}' (choose from {', '.join(TARGETS)})")
    if target != "auto":
        return target
    available = ort.get_available_providers() if available is None else list(available)
    if provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available):
        return "ort-cuda"
    return "ort-cpu"


def channel_multiple(target: str = "auto", provider: str = "auto", quantize: str = "none",
                     cpuinfo: str | None = None, available: Iterable[str] | None = None) -> int:
    """Multiple of channels every pruned group keeps for ``target`` (see the module docstring)."""
    resolved = resolve_target(target, provider, available)
    if resolved in ("ort-cpu", "openvino"):
        multiple = cpu_block(cpu_flags(cpuinfo))
    else:
        multiple = FIXED_MULTIPLES[resolved]
    if quantize == "int8" and resolved != "none":
        multiple = max(multiple, INT8_MIN_MULTIPLE)
    return multiple


# -- int8 ----------------------------------------------------------------------------------------


@dataclass
class Quantization:
    """What ``--quantize int8`` did: sizes, drift against the fp32 original, timings."""

    format: str
    reduce_range: bool
    bytes_fp32: int
    bytes_int8: int
    calibration_samples: int
    held_back_samples: int
    drift_fp32: float  # output_distortion(original, pruned fp32) on the held-back samples
    drift_int8: float  # output_distortion(original, pruned int8)
    drift_int8_vs_fp32: float  # output_distortion(pruned fp32, pruned int8): the quantization alone
    top1_agreement_int8: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _model_bytes(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def needs_reduce_range(flags: set[str]) -> bool:
    """x86 without VNNI: u8 x s8 products saturate at 16 bits, so weights get 7 bits (onnxruntime's advice)."""
    return "sse2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def quantize_int8(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """Static int8 quantization, QDQ format, per-channel weights, calibrated on ``calibration`` feeds."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise UsageError("--quantize int8 needs calibration data (--calibration FILE.npz)")
    with tempfile.TemporaryDirectory(prefix="onnx_intrafusion-int8-") as tmp:
        src, pre, out = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        large = model.ByteSize() > 1_500_000_000
        onnx.save_model(model, str(src), save_as_external_data=large)
        try:  # symbolic shape inference + ORT's basic fusions, as onnxruntime recommends
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=large)
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the plain model
            pre = src
        # uint8 activations x int8 weights (U8S8): onnxruntime's fast x86 int8 kernels; S8S8 ran
        # 3.4x slower on a VNNI CPU (ResNet-18, batch 64).  Without VNNI, x86 multiplies u8 x s8
        # with 16-bit saturation: 7-bit weights (reduce_range) avoid it, as onnxruntime advises.
        reduce_range = needs_reduce_range(cpu_flags())
        quantize_static(str(pre), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=large,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        return onnx.load(str(out))


def quantize_checked(original: onnx.ModelProto, pruned: onnx.ModelProto, split,
                     provider: str = "auto") -> tuple[onnx.ModelProto, Quantization]:
    """Quantize ``pruned`` on ``split.fit``; measure drift on ``split.held`` against ``original``.

    ``split`` is the run's :class:`~onnx_intrafusion.calibration.Holdback`
    (without held-back samples the drift is measured on the fitted ones, and
    the record says 0 held back).  Raises :class:`ValidationError` when the
    int8 model does not run or gives non-finite outputs.
    """
    from .calibration import batches
    from .distortion import output_distortion
    from .validate import run

    start = time.perf_counter()
    fit, held = split.fit, split.held
    quantized = quantize_int8(pruned, batches(fit, pruned))
    try:
        onnx.checker.check_model(quantized)
        feeds = batches(fit if held is None else held, original)
        ref, _ = run(original, feeds, provider)
        fp32, _ = run(pruned, feeds, provider)
        int8, _ = run(quantized, feeds, provider)
    except Exception as exc:  # noqa: BLE001 - an int8 model that does not run is not written
        raise ValidationError(f"int8 model fails to run: {' '.join(str(exc).split())[:200]}") from None
    if any(not np.all(np.isfinite(v)) for v in int8.values()):
        raise ValidationError("int8 model gives NaN or Inf outputs")
    top1 = None
    first = next(iter(ref.values()))
    if first.ndim == 2 and first.shape[1] > 1:
        top1 = float(np.mean(first.argmax(1) == next(iter(int8.values())).argmax(1)))
    info = Quantization(format="QDQ: uint8 activations, int8 per-channel weights",
                        reduce_range=needs_reduce_range(cpu_flags()), bytes_fp32=_model_bytes(pruned),
                        bytes_int8=_model_bytes(quantized), calibration_samples=len(next(iter(fit.values()))),
                        held_back_samples=0 if held is None else len(next(iter(held.values()))),
                        drift_fp32=output_distortion(ref, fp32), drift_int8=output_distortion(ref, int8),
                        drift_int8_vs_fp32=output_distortion(fp32, int8),
                        top1_agreement_int8=top1, seconds=round(time.perf_counter() - start, 4))
    return quantized, info


def is_qdq(model: onnx.ModelProto) -> bool:
    """True when the model carries QuantizeLinear/DequantizeLinear pairs (QDQ format)."""
    ops = {n.op_type for n in model.graph.node}
    return {"QuantizeLinear", "DequantizeLinear"} <= ops


# -- ORT format ----------------------------------------------------------------------------------


def ort_path(onnx_path: str | os.PathLike) -> Path:
    """OUT.onnx -> OUT.ort (same folder)."""
    p = Path(onnx_path)
    return p.with_suffix(".ort") if p.suffix == ".onnx" else p.with_name(p.name + ".ort")


def write_ort(onnx_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert the saved model to onnxruntime's ``.ort`` format atomically and check that it loads.

    Basic (runtime-independent) optimisations only, as onnxruntime's own
    converter does for mobile builds, so the file runs on any provider.
    """
    out = Path(out) if out is not None else ort_path(onnx_path)
    tmp = out.with_name(f".{out.name}.tmp.ort")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(tmp)
        opts.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        check = ort.SessionOptions()
        check.log_severity_level = 4
        check.add_session_config_entry("session.load_model_format", "ORT")
        ort.InferenceSession(str(tmp), check, providers=["CPUExecutionProvider"])
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot convert: nothing written
        raise ValidationError(f"cannot write the ORT format: {' '.join(str(exc).split())[:200]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out
