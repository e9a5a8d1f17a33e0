"""Property test: random CNN graphs from the supported vocabulary are pruned into valid models.

Plain pruning is also checked numerically: its outputs must equal the original model's with the
removed input slices of every layer set to zero (found by comparing weights, see
``conftest.zeroed_original``), and plans keeping every channel must reproduce the outputs.

CI runs a fixed, derandomised set of examples (``FUZZ_EXAMPLES``, default 40).
A longer local run:

    ONNX_INTRAFUSION_FUZZ_EXAMPLES=1000 ONNX_INTRAFUSION_FUZZ_RANDOM=1 python -m pytest -q tests/test_fuzz.py

Every failure the fuzzer found is kept below as an explicit ``@example``.
"""

from __future__ import annotations

import os

import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from onnx_intrafusion import coupling, model_io, prune
from onnx_intrafusion.errors import NothingToPrune
from onnx_intrafusion.model_io import params_count

from conftest import assert_plans_keeping_every_channel_are_exact, assert_pruning_equals_zeroed_original, assert_valid
from fuzz_models import build, specs

# Models with weights listed as inputs make onnxruntime warn once per weight and session.
ort.set_default_logger_severity(3)

FUZZ_EXAMPLES = int(os.environ.get("ONNX_INTRAFUSION_FUZZ_EXAMPLES", "40"))
FUZZ_RANDOM = os.environ.get("ONNX_INTRAFUSION_FUZZ_RANDOM", "") not in ("", "0")

fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not FUZZ_RANDOM,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _note(text: str) -> None:
    """A hypothesis event (shown with --hypothesis-show-statistics); a no-op outside @given."""
    try:
        event(text)
    except InvalidArgument:
        pass


def _check_pruned(spec: dict, sparsity: float, method: str, **options):
    original = build(spec)
    onnx.checker.check_model(original, full_check=True)  # the generator itself must be right
    try:
        result = prune(original, sparsity=sparsity, method=method, seed=spec["seed"] % 7, validate=False,
                       **options)  # assert_valid runs the model
    except NothingToPrune:
        _note(f"{method}: nothing to prune")
        return None
    _note(f"{method}: {'pruned' if result.report.pruned_groups else 'unchanged'}")
    assert_valid(result.model, original)
    assert [i.name for i in result.model.graph.input] == [i.name for i in original.graph.input]
    assert params_count(result.model) <= params_count(original)
    assert result.report.params_after <= result.report.params_before
    if result.report.pruned_groups:
        assert result.report.params_after < result.report.params_before
        if method == "prune":
            assert_pruning_equals_zeroed_original(original, result)
    return result


def _check_identity(spec: dict, method: str) -> None:
    """A plan keeping every channel (in order, then reversed) goes through the rewrite and changes nothing."""
    original = build(spec)
    analysis = coupling.analyse(model_io.to_graph(original))
    if not any(g.prunable for g in analysis.groups):
        return
    assert_plans_keeping_every_channel_are_exact(original, (method,), seed=1)


options = st.fixed_dictionaries({
    "importance": st.sampled_from(["l1", "l1", "l2", "linf", "random"]),
    "marginals": st.sampled_from(["uniform", "uniform", "importance"]),
    "ot_reg": st.sampled_from([0.0, 0.0, 0.01, 0.1]),
    "ot_p": st.sampled_from([1.0, 1.0, 2.0]),
})


#: Found by the fuzzer: weights listed as graph inputs were dropped from the inputs (and with
#: IR < 4 the pruned model failed onnx.checker).  Fixed in model_io.to_model.
WEIGHTS_AS_INPUTS = {"opset": 13, "in_ch": 1, "size": 6, "dyn_batch": False, "head": "gap_gemm", "classes": 2,
                     "seed": 0, "aux_out": False, "trans_b": False, "weights_as_inputs": True,
                     "blocks": [("conv", 1, 1, 1, False, False, "Relu")]}
_L1 = {"importance": "l1", "marginals": "uniform", "ot_reg": 0.0, "ot_p": 1.0}

#: Found by the fuzzer: one weight used by two Convs, the first reading the graph input.  The
#: second Conv's input group edited the shared weight's input axis, which the first Conv reads
#: from the unprunable input (onnxruntime: "Input channels C is not equal to kernel channels").
#: Fixed in coupling._check_constant_users.
SHARED_WEIGHT_ON_INPUT = {"opset": 13, "in_ch": 2, "size": 6, "dyn_batch": False, "head": "gap_gemm",
                          "classes": 2, "seed": 0, "aux_out": False, "trans_b": False,
                          "weights_as_inputs": False, "blocks": [("shared", 1)]}


@fuzz_settings
@example(spec=WEIGHTS_AS_INPUTS, sparsity=0.5, identity_method="intrafusion", options=_L1)
@example(spec={**WEIGHTS_AS_INPUTS, "blocks": [("conv", 8, 3, 1, True, True, "Relu"), ("cat", 4, 4)],
               "head": "reshape_gemm"}, sparsity=0.5, identity_method="prune", options=_L1)
@example(spec=SHARED_WEIGHT_ON_INPUT, sparsity=0.5, identity_method="intrafusion", options=_L1)
@given(spec=specs, sparsity=st.floats(0.05, 0.95), identity_method=st.sampled_from(["intrafusion", "prune"]),
       options=options)
def test_random_cnn_prunes_to_a_valid_model(spec, sparsity, identity_method, options):
    _check_pruned(spec, sparsity, "intrafusion", **options)
    _check_pruned(spec, sparsity, "prune", importance=options["importance"])
    _check_identity(spec, identity_method)


@pytest.mark.parametrize("head", ["gap_gemm", "flatten_gemm", "reshape_gemm", "mean_matmul", "conv_out"])
@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_every_head_and_block_kind(head, opset):
    """One model per head and opset that holds every block kind: the vocabulary itself works."""
    spec = {"opset": opset, "in_ch": 3, "size": 8, "dyn_batch": opset % 2 == 1, "head": head, "classes": 5,
            "seed": opset, "blocks": [("conv", 8, 3, 1, True, True, "Relu"), ("res", 3, False), ("cat", 4, 4),
                                      ("dense", 3), ("dw", 2, 3, 2, ), ("se", 2), ("pool", "MaxPool"), ("swish",),
                                      ("res", 1, True), ("nhwc", 5), ("bn",), ("unary", "Dropout"),
                                      ("conv", 6, 1, 1, False, False, "Clip")],
            "aux_out": opset == 18, "trans_b": opset != 17}
    result = _check_pruned(spec, 0.5, "intrafusion")
    assert result is not None and len(result.report.pruned_groups) >= 8
    _check_identity(spec, "prune")
