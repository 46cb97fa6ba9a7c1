"""ONNX files whose metadata was edited after export: OnnxSampler refuses metadata that
contradicts itself or the graph, and ``verify`` refuses anything that differs from the reference
chain (it never says "ok" for an edited file)."""

import json

import numpy as np
import onnx
import pytest

from ddpm_fast.cli import main
from ddpm_fast.export import OnnxFileError, OnnxSampler, export_onnx, verify_onnx

from .common import make_pipeline

FILES = {
    "step-ddpm": ("step", dict(sampler="ddpm", steps=6)),
    "unet-ddpm": ("unet", dict(sampler="ddpm", steps=6)),
    "step-ddim": ("step", dict(sampler="ddim", steps=5, eta=0.5)),
}


@pytest.fixture(scope="module")
def model():
    return make_pipeline(objective="pred_v")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("edited")
    files = {}
    for name, (what, chain) in FILES.items():
        files[name] = export_onnx(model, folder / f"{name}.onnx", what=what, **chain).path
    return files


def edited(source, folder, name: str, edit) -> str:
    """A copy of ``source`` whose metadata dict went through ``edit(meta)``."""
    model = onnx.load(str(source))
    meta = {p.key: p.value for p in model.metadata_props}
    edit(meta)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def set_json(key, change):
    def edit(meta):
        value = json.loads(meta[key])
        change(value)
        meta[key] = json.dumps(value)

    return edit


def put(**items):
    return lambda meta: meta.update({k: str(v) for k, v in items.items()})


def scale_table(name, factor):
    return set_json("tables", lambda t: t.__setitem__(name, [v * factor for v in t[name]]))


LONG = "1" * 100 + "0"  # noise steps of a 101-step chain, over the schedule's 100 timesteps
# (file, edit, what OnnxSampler says; None where only the reference can tell)
EDITS = {
    "noise_steps flipped": ("step-ddpm", put(noise_steps="011110"), "noise_steps"),
    "noise_steps of DDIM": ("step-ddim", put(noise_steps="00000"), "noise_steps"),
    "objective": ("step-ddpm", put(objective="pred_noise"), "objective differs"),
    "unknown objective": ("unet-ddpm", put(objective="eps"), "objective='eps'"),
    "channels": ("unet-ddpm", put(channels=3), "channels differ"),
    "channels in both": (
        "unet-ddpm",
        lambda m: (put(channels=3)(m), set_json("config", lambda c: c.update(channels=3))(m)),
        "the graph does not take the images",
    ),
    "image_size": ("step-ddpm", put(image_size=16), "image_size differs"),
    "variance": ("step-ddpm", put(variance="fixed_large"), "variance differs"),
    "sampler": ("step-ddpm", put(sampler="euler"), "sampler='euler'"),
    "eta on DDPM": ("step-ddpm", put(eta=0.5), "eta 0.5 with sampler ddpm"),
    "eta not finite": ("step-ddim", put(eta="nan"), "eta=nan"),
    "steps": ("step-ddpm", put(steps=5, noise_steps="11110"), None),
    "steps beyond the schedule": ("step-ddpm", put(steps=101, noise_steps=LONG), "steps=101"),
    "eta of DDIM": ("step-ddim", put(eta=0.8), None),
    "timesteps table": ("unet-ddpm", scale_table("timesteps", 2), "not non-increasing within"),
    "c_x0 table": ("unet-ddpm", scale_table("c_x0", 1.01), None),
    "sigma table": ("unet-ddpm", scale_table("sigma", 0.5), None),
    "non-finite table": ("unet-ddpm", scale_table("c_xt", float("inf")), "not finite"),
    "schedule": (
        "step-ddpm",
        set_json("diffusion", lambda d: d["schedule"].update(name="cosine")),
        None,
    ),
    "auto_normalize not a bool": (
        "step-ddpm",
        set_json("diffusion", lambda d: d.update(auto_normalize="yes")),
        "auto_normalize='yes'",
    ),
    "auto_normalize flipped": (
        "step-ddpm", set_json("diffusion", lambda d: d.update(auto_normalize=False)), None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edited_file_is_never_ok(exported, model, tmp_path, capsys, name):
    source, edit, sampler_says = EDITS[name]
    path = edited(exported[source], tmp_path, name.replace(" ", "-"), edit)
    if sampler_says is not None:
        with pytest.raises(OnnxFileError, match=sampler_says) as err:
            OnnxSampler(path)
        assert "\n" not in str(err.value)
    try:
        report = verify_onnx(path, model)
    except OnnxFileError as err:
        assert "\n" not in str(err)
    else:
        assert not report.ok, str(report)


def test_a_file_from_before_auto_normalize_verifies_with_its_default(exported, model, tmp_path):
    old = edited(exported["step-ddpm"], tmp_path, "old",
                 set_json("diffusion", lambda d: d.pop("auto_normalize", None)))  # fmt: skip
    assert verify_onnx(old, model).ok
    images = OnnxSampler(old).sample(2, seed=4)
    np.testing.assert_array_equal(images, OnnxSampler(exported["step-ddpm"]).sample(2, seed=4))


def test_verify_names_edited_tables(exported, model, tmp_path):
    path = edited(exported["unet-ddpm"], tmp_path, "tables", scale_table("c_x0", 1.01))
    with pytest.raises(OnnxFileError, match=r"metadata \(tables.c_x0\) differs from the reference"):
        verify_onnx(path, model)


def test_cli_verify_of_an_edited_file_is_not_ok(exported, model, tmp_path, capsys):
    from ddpm_fast import save_pipeline

    checkpoint = save_pipeline(model, tmp_path / "model.safetensors")
    path = edited(exported["step-ddpm"], tmp_path, "flipped", put(noise_steps="011110"))
    code = main(["verify", str(path), str(checkpoint)])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("ddpm-fast: error: ") and err.count("\n") == 1
    assert "ok" not in out
    code = main(["sample", "--onnx", str(path), "--num", "1", "--out", str(tmp_path / "x.png")])
    assert code == 2 and not (tmp_path / "x.png").exists()
