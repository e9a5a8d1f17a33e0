"""The differentiable executor, distillation and the gradient importances (torch extra)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SAMPLES, run

torch = pytest.importorskip("torch")

from onnx_intrafusion import calibration, coupling, distortion, model_io  # noqa: E402
from onnx_intrafusion.errors import UsageError  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
ALL_SAMPLES = sorted(str(p.relative_to(SAMPLES)) for p in [*SAMPLES.glob("*.onnx"), *SAMPLES.glob("*/*.onnx")])


def _module(model: onnx.ModelProto, **kwargs):
    from onnx_intrafusion.differentiable import GraphModule

    graph = model_io.to_graph(model)
    return graph, GraphModule(graph, **kwargs)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _parity(model: onnx.ModelProto, feeds: dict[str, np.ndarray], graph=None) -> float:
    from onnx_intrafusion.differentiable import GraphModule

    module = GraphModule(graph if graph is not None else model_io.to_graph(model))
    ref = run(model, feeds)
    with torch.no_grad():
        out = module(feeds)
    assert list(out) == list(ref)
    return max(_max_rel(out[k].numpy(), ref[k]) for k in ref)


# ------------------------------------------------------------------------------------ tiny models
def tiny_cnn(seed: int = 0, dead: int | None = None, head: bool = True) -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv(2->4) -> Relu -> Conv(4->3) -> Relu -> GAP -> Flatten -> Gemm(3->5).

    ``dead``: the second conv's weights reading that channel of the first are all zero.
    ``head=False``: the output is the second Relu's feature map (not class scores).
    """
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    w2 = rng.normal(0, 0.5, (3, 4, 3, 3)).astype(np.float32)
    if dead is not None:
        w2[:, dead] = 0.0
    b2 = rng.normal(0, 0.1, 3).astype(np.float32)
    w3 = rng.normal(0, 0.5, (5, 3)).astype(np.float32)
    b3 = rng.normal(0, 0.1, 5).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "conv1.weight"), (b1, "conv1.bias"), (w2, "conv2.weight"), (b2, "conv2.bias"),
              (w3, "fc.weight"), (b3, "fc.bias")]]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    if not head:
        nodes = nodes[:3] + [helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
        inits = inits[:4]
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 6, 6])
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _inputs(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 2, 6, 6)).astype(np.float32)}


# ------------------------------------------------------------------------------------ executor
@pytest.mark.parametrize("name", ALL_SAMPLES)
def test_executor_matches_onnxruntime_on_every_sample(name):
    from onnx_intrafusion.validate import random_feeds

    model = model_io.load_model(SAMPLES / name).model
    assert _parity(model, random_feeds(model, seed=3, batch=2)) <= 1e-4


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_executor_matches_onnxruntime_on_transformer_exports(exporter):
    """Tiny BERT-style encoders exported by torch (tests/data/make_encoders.py; the dynamo export takes ~30 s)."""
    import onnx_graphsurgeon as gs

    model = onnx.load(str(DATA / f"tiny_encoder_{exporter}.onnx"))
    feeds = {"ids": np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]], dtype=np.int64)}
    # As the pipeline loads it (folded) and as exported (Constant nodes, shape arithmetic at run time).
    assert _parity(model, feeds) <= 1e-4
    assert _parity(model, feeds, gs.import_onnx(model)) <= 1e-4


def test_gradients_match_finite_differences():
    """float64 end to end: autograd through every op of the tiny model against central differences."""
    graph, module = _module(tiny_cnn(), dtype=torch.float64)
    feeds = {"x": torch.from_numpy(_inputs(3)["x"].astype(np.float64))}
    direction = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 5)))
    names = list(module.named_weights())
    assert sorted(names) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight", "fc.bias", "fc.weight"]

    def loss(*values):
        out = module(feeds, params=dict(zip(names, values)))["y"]
        return (out * direction).sum() + (out ** 2).sum() * 0.1

    values = [p.detach().clone().requires_grad_(True) for p in module.named_weights().values()]
    analytic = torch.autograd.grad(loss(*values), values)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for i, (value, grad) in enumerate(zip(values, analytic)):
        for flat in rng.choice(value.numel(), size=min(6, value.numel()), replace=False):
            plus = [v.detach().clone() for v in values]
            minus = [v.detach().clone() for v in values]
            plus[i].view(-1)[flat] += eps
            minus[i].view(-1)[flat] -= eps
            numeric = (loss(*plus) - loss(*minus)).item() / (2 * eps)
            assert grad.view(-1)[flat].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7), (names[i], flat)


def test_unsupported_op_is_one_line_naming_op_and_node():
    from onnx_intrafusion.differentiable import GraphModule

    node = helper.make_node("NonMaxSuppression", ["b", "s"], ["i"], name="nms_here")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 4]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1, 4])],
                              [helper.make_tensor_value_info("i", TensorProto.INT64, [None, 3])])
    import onnx_graphsurgeon as gs

    with pytest.raises(UsageError) as err:
        GraphModule(gs.import_onnx(helper.make_model(graph)))
    message = str(err.value)
    assert "NonMaxSuppression" in message and "nms_here" in message and "\n" not in message


# ------------------------------------------------------------------------------------ distillation
def _student_and_data(n: int = 120, noise: float = 0.3, head: bool = True):
    """Teacher = tiny CNN; student = the same graph with noisy weights (so there is something to recover)."""
    teacher = tiny_cnn(seed=0, head=head)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    rng = np.random.default_rng(7)
    for init in student.graph.initializer:
        arr = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((arr + rng.normal(0, noise, arr.shape)).astype(np.float32), init.name))
    arrays = _inputs(n)
    fit, held = calibration.split_holdback(arrays)
    return teacher, student, fit, held


def test_zero_steps_give_byte_identical_initializers():
    from onnx_intrafusion.differentiable import assign
    from onnx_intrafusion.finetune import distill

    teacher, student, fit, held = _student_and_data()
    graph = model_io.to_graph(student)
    weights, record = distill(graph, teacher, fit, held, epochs=0)
    assert weights == {} and record["held_back_after"] == record["held_back_before"]
    assign(graph, weights)
    written = model_io.to_model(graph, student)
    before = {i.name: i.SerializeToString() for i in student.graph.initializer}
    after = {i.name: i.SerializeToString() for i in written.graph.initializer}
    assert after == before


@pytest.mark.parametrize("head", [True, False], ids=["class-scores", "feature-map"])
def test_distillation_lowers_held_back_distortion_and_written_model_matches_torch(head):
    from onnx_intrafusion.differentiable import GraphModule, assign
    from onnx_intrafusion.finetune import distill

    teacher, student, fit, held = _student_and_data(head=head)
    graph = model_io.to_graph(student)
    epochs = []
    weights, record = distill(graph, teacher, fit, held, epochs=30, lr=1e-2, batch_size=16,
                              progress=lambda e, n, loss, value: epochs.append((e, loss, value)))
    assert len(epochs) == 30 and record["epochs"] == 30 and record["device"] in ("cpu", "cuda")
    assert set(weights) <= {i.name for i in student.graph.initializer} and weights
    assign(graph, weights)
    written = model_io.to_model(graph, student)
    onnx.checker.check_model(written, full_check=True)
    # Oracle: onnxruntime and the distortion measure on held-back inputs, independent of torch.
    before = distortion.output_distortion(run(teacher, held), run(student, held))
    after = distortion.output_distortion(run(teacher, held), run(written, held))
    assert after < 0.5 * before
    assert record["held_back_before"] == pytest.approx(before, rel=1e-3)
    assert record["held_back_after"] == pytest.approx(after, rel=1e-3)
    # The written model, run by onnxruntime, is what the torch module computes with the trained weights.
    with torch.no_grad():
        torch_out = GraphModule(model_io.to_graph(written))(held)["y"].numpy()
    assert _max_rel(torch_out, run(written, held)["y"]) <= 1e-5


def test_distillation_keeps_starting_weights_when_training_only_hurts():
    """A learning rate that wrecks the model: the held-back check returns the starting weights unchanged."""
    from onnx_intrafusion.finetune import distill

    teacher, student, fit, held = _student_and_data()
    weights, record = distill(model_io.to_graph(student), teacher, fit, held, epochs=2, lr=50.0, batch_size=16)
    assert weights == {} and record["best_epoch"] == 0
    assert record["held_back_after"] == record["held_back_before"]


def test_distillation_is_deterministic_for_a_seed():
    from onnx_intrafusion.finetune import distill

    teacher, student, fit, held = _student_and_data()
    runs = [distill(model_io.to_graph(student), teacher, fit, held, epochs=3, lr=1e-2, batch_size=16, seed=4)[0]
            for _ in range(2)]
    assert runs[0].keys() == runs[1].keys() and runs[0]
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_time_budget_is_honoured():
    from onnx_intrafusion.finetune import distill

    teacher, student, fit, held = _student_and_data(n=400)
    start = time.perf_counter()
    _, record = distill(model_io.to_graph(student), teacher, fit, held, epochs=100000, time_budget=0.5,
                        batch_size=4)
    elapsed = time.perf_counter() - start
    assert record.get("stopped_by_time") and 1 <= record["epochs"] < 100000
    assert elapsed < 0.5 + 3.0  # one step and one held-back evaluation past the budget at most


# ------------------------------------------------------------------------------------ importances
@pytest.mark.parametrize("head", [True, False], ids=["class-scores", "feature-map"])
@pytest.mark.parametrize("kind", ["taylor", "prospr"])
def test_gradient_importance_ranks_a_channel_with_zero_consumer_weights_last(kind, head):
    from onnx_intrafusion.finetune import IMPORTANCES

    for dead in (0, 2):
        model = tiny_cnn(seed=1, dead=dead, head=head)
        graph = model_io.to_graph(model)
        analysis = coupling.analyse(graph)
        group = next(g for g in analysis.groups if g.origin == "conv1")
        assert group.prunable and group.size == 4
        scores = IMPORTANCES[kind](graph, model, analysis, _inputs(64), [group.id])[group.id]
        assert scores.shape == (4,)
        assert int(np.argmin(scores)) == dead, scores
        others = np.delete(scores, dead)
        assert np.all(others > 0)
        if kind == "taylor":  # nothing downstream reads the channel: no first-order effect at all
            assert scores[dead] < 1e-6 * others.min()
        # ProsPr: the channel still matters through the SGD steps (its consumer weights get
        # gradients and grow), by an amount of the order of the inner learning rate.


# ------------------------------------------------------------------------------------ through prune()
def test_prune_with_distill_records_held_back_distortion_and_never_worsens_it():
    from onnx_intrafusion import prune

    model = tiny_cnn(seed=2)
    result = prune(model, sparsity=0.5, calibration=_inputs(80), recover="distill", finetune_epochs=3)
    d = result.report.to_dict()["distill"]
    assert d["held_back_after"] <= d["held_back_before"] and d["epochs"] == 3
    assert result.report.options["recover"] == "distill" and "distill" in result.report.timings
    assert "held-back" in result.report.to_text()
    onnx.checker.check_model(result.model, full_check=True)


def test_prune_with_taylor_importance_drops_the_channel_nothing_reads():
    from onnx_intrafusion import prune

    result = prune(tiny_cnn(seed=1, dead=3), sparsity=0.25, method="prune", importance="taylor",
                   calibration=_inputs(32), recover="none")
    row = next(g for g in result.report.groups if "conv1" in g.producers)
    assert row.kept == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [dict(finetune_epochs=3), dict(finetune_time=5.0, recover="lstsq"),
                                    dict(recover="distill", finetune_epochs=-1),
                                    dict(recover="distill", finetune_time=0)])
def test_finetune_options_are_checked(kwargs):
    from onnx_intrafusion import prune

    with pytest.raises(UsageError):
        prune(tiny_cnn(), sparsity=0.5, calibration=_inputs(16), **kwargs)
