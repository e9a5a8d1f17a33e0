"""The trained sample models in samples/fashion (MobileNetV3 with unfolded BN) and
samples/transformers: structure, size, dynamic batch, and agreement between the
two exporters (independent exports of the same weights must give the same logits)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import SAMPLES, run

MAX_BYTES = 3_000_000
# (directory, model stem, minimum test accuracy stated for it)
TRAINED = [("fashion", "mobilenetv3", 0.90), ("transformers", "vit", 0.88), ("transformers", "textenc", 0.85)]


def _feeds(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
        if inp.name == "input_ids":
            ids = rng.integers(4, 6000, size=(batch, *dims))
            ids[:, 0] = 2  # [CLS]
            feeds[inp.name] = ids.astype(np.int64)
        elif inp.name == "attention_mask":
            lengths = rng.integers(2, dims[0] + 1, size=batch)
            feeds[inp.name] = (np.arange(dims[0])[None, :] < lengths[:, None]).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal((batch, *dims)).astype(np.float32)
    return feeds


@pytest.mark.parametrize(("folder", "stem", "min_acc"), TRAINED)
def test_trained_sample_exports_agree_and_fit_the_budget(folder, stem, min_acc):
    paths = {kind: SAMPLES / folder / f"{stem}_{kind}.onnx" for kind in ("legacy", "dynamo")}
    models = {}
    for kind, path in paths.items():
        assert path.stat().st_size <= MAX_BYTES, path
        assert not path.with_name(path.name + ".data").exists(), "weights must be inside the .onnx"
        onnx.checker.check_model(str(path), full_check=True)
        models[kind] = onnx.load(str(path))
        batch_dims = [i.type.tensor_type.shape.dim[0].dim_param for i in models[kind].graph.input]
        assert all(batch_dims), f"{path.name}: batch axis must be symbolic, got {batch_dims}"
    names = [[i.name for i in m.graph.input] for m in models.values()]
    assert names[0] == names[1]
    feeds = _feeds(models["legacy"], batch=3)
    legacy, dynamo = run(paths["legacy"], feeds), run(paths["dynamo"], feeds)
    assert list(legacy) == list(dynamo) == ["logits"]
    assert legacy["logits"].shape[0] == 3
    np.testing.assert_allclose(dynamo["logits"], legacy["logits"], atol=1e-4, rtol=1e-4)
    meta = json.loads((SAMPLES / folder / "metadata.json").read_text())["files"]
    for path in paths.values():
        entry = meta[path.name]
        assert entry["test_acc"] >= min_acc and entry["max_abs_diff_vs_torch"] < 1e-3
        assert entry["size_bytes"] == path.stat().st_size


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_mobilenetv3_keeps_inference_batchnorm(kind):
    model = onnx.load(str(SAMPLES / "fashion" / f"mobilenetv3_{kind}.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 28
    for bn in bns:
        assert len([o for o in bn.output if o]) == 1
        assert all(a.i == 0 for a in bn.attribute if a.name == "training_mode")
        assert producers[bn.input[0]].op_type == "Conv"  # every BN follows its (bias-free) Conv
    ops = {n.op_type for n in model.graph.node}
    assert {"HardSigmoid", "HardSwish", "Mul"} <= ops  # squeeze-excite gating and activations


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
@pytest.mark.parametrize("stem", ["vit", "textenc"])
def test_transformer_samples_show_four_attention_blocks(stem, kind):
    model = onnx.load(str(SAMPLES / "transformers" / f"{stem}_{kind}.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Softmax") == 4
    assert ops.count("LayerNormalization") == 9  # 2 per layer + final (ViT) / embedding (textenc) norm
    # per layer: Q, K, V, O projections, 2 MLP Linears and the two attention MatMuls
    assert ops.count("MatMul") == 4 * 8


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_textenc_ignores_tokens_under_the_padding_mask(kind):
    path = SAMPLES / "transformers" / f"textenc_{kind}.onnx"
    feeds = _feeds(onnx.load(str(path)), batch=4, seed=1)
    other = dict(feeds, input_ids=feeds["input_ids"].copy())
    padded = feeds["attention_mask"] == 0
    assert padded.any()
    other["input_ids"][padded] = 7  # change only the masked-out tokens
    np.testing.assert_allclose(run(path, other)["logits"], run(path, feeds)["logits"], atol=1e-5)
    changed = dict(feeds, input_ids=feeds["input_ids"].copy())
    changed["input_ids"][:, 1] = 5  # a visible token: the output must move
    assert np.abs(run(path, changed)["logits"] - run(path, feeds)["logits"]).max() > 1e-4
