"""Winograd F(2x2, 3x3) in the engine's executor file (ddpm_fast.engine.winograd): the rewritten
convolutions are the convolutions (fp32's per-op tolerance, against float64), only those the
rule chooses are rewritten, sessions of a batch large enough open the rewritten file, and an
engine chain on it is the reference chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ddpm_fast.engine import Engine, winograd
from ddpm_fast.engine import onnx_executor as ox
from ddpm_fast.engine.table_chain import SEAL_SUFFIX, executor_session, write_seal

from .families import random_pipeline

ALWAYS = lambda *shape: True  # noqa: E731


def conv_model(c_in, c_out, size, *, bias=True, **attrs):
    """One Conv on [batch, c_in, size, size], random weights; the batch axis free."""
    generator = np.random.default_rng(c_in * 100 + c_out + size)
    weight = generator.standard_normal((c_out, c_in, 3, 3)).astype(np.float32) / 3
    inputs = ["x", "w"]
    constants = [numpy_helper.from_array(weight, "w")]
    if bias:
        inputs.append("b")
        constants.append(numpy_helper.from_array(generator.standard_normal(c_out, np.float32), "b"))
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], **attrs}
    out_size = size if attrs.get("strides", [1, 1]) == [1, 1] else None
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c_in, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c_out, out_size, None])],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def float64_conv(model, x):
    constants = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    bias = constants.get("b")
    return torch.nn.functional.conv2d(
        torch.from_numpy(x).double(),
        torch.from_numpy(constants["w"]).double(),
        None if bias is None else torch.from_numpy(bias).double(),
        padding=1,
    ).numpy()


@pytest.mark.parametrize(
    ("c_in", "c_out", "size", "bias"),
    [(8, 8, 4, True), (16, 8, 8, False), (8, 24, 6, True), (4, 4, 2, True)],
)
def test_the_rewritten_convolution_is_the_convolution(c_in, c_out, size, bias):
    model = conv_model(c_in, c_out, size, bias=bias)
    want = float64_conv(
        model, x := np.random.default_rng(1).standard_normal((3, c_in, size, size), np.float32)
    )
    assert winograd.rewrite(model, ALWAYS) == 1
    assert "Conv" in {n.op_type for n in model.graph.node}  # the input transform
    assert "w" not in {t.name for t in model.graph.initializer}  # the direct weights are gone
    got = run(model, x)
    assert got.shape == want.shape and np.abs(want).max() > 1
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the batch axis stays free
    one = run(model, x[1:2])
    assert np.abs(one - want[1:2]).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(
    "attrs",
    [
        dict(strides=[2, 2]),
        dict(pads=[0, 0, 0, 0]),
        dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
        dict(group=2),
    ],
)
def test_other_convolutions_are_left_alone(attrs):
    model = conv_model(8, 8, 8, **attrs)
    before = model.SerializeToString()
    assert winograd.rewrite(model, ALWAYS) == 0
    assert model.SerializeToString() == before


def test_odd_sizes_and_weights_computed_in_the_graph_are_left_alone():
    assert not winograd.worth_it(1024, 1024, 5, 5)
    model = conv_model(8, 8, 4)
    model.graph.initializer.pop()  # the bias, then the weights, become graph inputs
    weights = model.graph.initializer.pop()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, weights.dims))
    model.graph.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [8]))
    assert winograd.rewrite(model, ALWAYS) == 0


def test_the_rule_follows_the_measurements():
    """Faster as measured (one thread, batch 8): many channels on small images; slower with
    fewer channels or larger images."""
    assert winograd.worth_it(768, 512, 4, 4) and winograd.worth_it(512, 512, 4, 4)
    assert winograd.worth_it(384, 256, 8, 8) and winograd.worth_it(512, 512, 8, 8)
    assert winograd.worth_it(256, 256, 8, 8)
    assert not winograd.worth_it(256, 256, 4, 4) and not winograd.worth_it(512, 256, 4, 4)
    assert not winograd.worth_it(128, 128, 8, 8)
    assert not winograd.worth_it(128, 128, 16, 16) and not winograd.worth_it(512, 512, 16, 16)
    assert not winograd.worth_it(64, 64, 32, 32)


def test_a_form_is_written_only_where_the_chosen_convolutions_hold_enough_of_the_work():
    """Rewriting a small part of a model's convolutions saves nothing measurable (diffusers'
    ddpm-cifar10: 10% of its work, 0.97 to 1.01x) and costs a file: MIN_SHARE of the work or
    nothing."""
    generator = np.random.default_rng(0)
    weights = {
        "w1": generator.standard_normal((8, 8, 3, 3), np.float32),
        "w2": generator.standard_normal((32, 8, 3, 3), np.float32),  # 4x the first's work
    }

    def model():
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["h", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32, 4, 4])],
            [numpy_helper.from_array(w, name) for name, w in weights.items()],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert winograd.MIN_SHARE > 0.2
    small = model()
    before = small.SerializeToString()
    assert winograd.rewrite(small, lambda c_in, c_out, h, w: c_out == 8) == 0  # a fifth
    assert small.SerializeToString() == before
    large = model()
    assert winograd.rewrite(large, lambda c_in, c_out, h, w: c_out == 32) == 1  # four fifths
    x = generator.standard_normal((2, 8, 4, 4), np.float32)
    want = run(model(), x)
    assert np.abs(run(large, x) - want).max() <= 1e-5 * np.abs(want).max()


def test_the_rule_chooses_without_a_given_one(tmp_path, monkeypatch):
    source = tmp_path / "executor-k.onnx"
    onnx.save(conv_model(8, 8, 4), str(source))
    target = winograd.variant_path(source)
    assert target.name == "executor-k.winograd"
    assert winograd.write_variant(source, target) == 0 and not target.exists()
    monkeypatch.setattr(winograd, "worth_it", ALWAYS)
    assert winograd.write_variant(source, target) == 1 and target.is_file()
    monkeypatch.undo()
    assert winograd.write_variant(source, target) == 0 and not target.exists()  # stale: removed


def test_sessions_open_the_winograd_form_from_the_batch_it_pays_at(tmp_path, monkeypatch):
    source = tmp_path / "executor-k.onnx"
    form = winograd.variant_path(source)
    onnx.save(conv_model(8, 8, 4), str(source))
    write_seal(source, "k", (4, 4), ["x"])
    opened = []
    monkeypatch.setattr(ort, "InferenceSession", lambda path, *a, **k: opened.append(path))
    executor_session(source, "k", 1, 8)  # no form: the file itself
    monkeypatch.setattr(winograd, "worth_it", ALWAYS)
    winograd.write_variant(source, form)
    executor_session(source, "k", 1, 8)  # a form the seal does not name: not opened
    write_seal(source, "k", (4, 4), ["x"])
    executor_session(source, "k", 1, winograd.MIN_BATCH - 1)
    executor_session(source, "k", 1, winograd.MIN_BATCH)
    direct, winograd_form = str(source), str(form)
    assert opened == [direct, direct, direct, winograd_form]


def eligible_convolutions(path) -> int:
    """The 3x3 convolutions of stride 1, padding 1 and one group in the ONNX file ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    count = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        count += (
            node.op_type == "Conv"
            and list(attrs["kernel_shape"]) == [3, 3]
            and list(attrs.get("strides", [1, 1])) == [1, 1]
            and list(attrs.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
            and attrs.get("group", 1) == 1
        )
    return count


@pytest.mark.parametrize(
    "case", ["v1-selfcond-learned-var", "v2-selfcond-learned-var-full-attn", "unet2d-cifar-like"]
)
def test_an_engine_chain_on_the_winograd_form_is_the_reference(case, tmp_path, monkeypatch):
    """Every eligible 3x3 convolution of a small network of each family rewritten (the rule
    forced; diffusers' downsampler pads with F.pad, whose pads the shape inference must see
    through to know the sizes after it): the chain at a batch that opens the Winograd form gives
    the reference's images."""
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(winograd, "worth_it", ALWAYS)
    monkeypatch.setattr(winograd, "MIN_BATCH", 1)  # every part of the batch split
    pipeline = random_pipeline(case, steps=50)
    kwargs = dict(sampler="ddim", steps=5, seed=3)
    engine = Engine(pipeline, cpu_executor="onnxruntime")
    got = engine.sample(3, batch_size=3, **kwargs)
    (variant,) = (tmp_path / "cache" / "executor-files").glob(f"*{winograd.SUFFIX}")
    direct = variant.with_suffix(".onnx")
    assert winograd.rewritten(variant) == eligible_convolutions(direct) >= 4
    want = pipeline.sample(3, **kwargs)
    assert torch.isfinite(want).all() and (want - want.mean()).abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_a_pruned_executor_file_takes_its_winograd_form_along(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ox, "MAX_EXECUTOR_FILES", 1)
    monkeypatch.setattr(winograd, "worth_it", ALWAYS)  # every file has a form
    pipeline = random_pipeline("v1-selfcond-learned-var", steps=50)
    Engine(pipeline, cpu_executor="onnxruntime").sample(2, sampler="ddim", steps=2)
    cache = tmp_path / "cache" / "executor-files"
    (first,) = cache.glob("*.onnx")
    assert winograd.variant_path(first).is_file()
    # DPM-Solver++ carries x0_prev: another file, and the older one goes with its form.
    Engine(pipeline, cpu_executor="onnxruntime").sample(2, sampler="dpm++2m", steps=2)
    (kept,) = cache.glob("*.onnx")
    assert kept != first
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [kept.name, winograd.variant_path(kept).name, kept.with_suffix(SEAL_SUFFIX).name]
    )


def test_an_image_on_either_file_is_the_same_within_the_batch_tolerance(tmp_path, monkeypatch):
    """Batch 1 runs the direct file, larger parts the Winograd form: the same images within
    test_engine's 5e-5 for a sample drawn in batches of other shapes."""
    import ddpm_fast

    monkeypatch.setenv("DDPM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(winograd, "worth_it", ALWAYS)
    pipeline = ddpm_fast.load()
    kwargs = dict(sampler="ddim", steps=10, seed=3)
    images = {}
    for min_batch in (1, 10**6):  # every session on the form, then none
        monkeypatch.setattr(winograd, "MIN_BATCH", min_batch)
        images[min_batch] = Engine(pipeline, cpu_executor="onnxruntime").sample(2, **kwargs)
    form, direct = images.values()
    assert (direct - direct.mean()).abs().max() > 0.1
    torch.testing.assert_close(form, direct, rtol=0, atol=5e-5)
    assert not torch.equal(form, direct)  # each file did run
