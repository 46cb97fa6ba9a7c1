"""Class labels through every path: drawn from the seed where none are given, the engine's
per-sample conditioning against the reference, and the command line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast.class_labels import check_labels, draw_labels, labels_for, parse_labels
from ddpm_fast.cli import main
from ddpm_fast.engine import Engine, FastUnet
from ddpm_fast.errors import ConfigError
from ddpm_fast.pipeline import DiffusionConfig, Pipeline
from ddpm_fast.schedule import ScheduleConfig

from .families import random_network
from .helpers import rel_error

ADM = Path(__file__).parent / "fixtures" / "adm"
NAME = "adm-class-conditional"


def test_drawn_labels_are_a_function_of_seed_and_index():
    labels = draw_labels(7, range(1000), 10)
    assert labels[300:310] == draw_labels(7, range(300, 310), 10)
    assert labels != draw_labels(8, range(1000), 10)
    counts = Counter(labels)
    assert set(counts) == set(range(10)) and all(60 <= c <= 140 for c in counts.values())
    assert labels_for(None, 7, range(5, 8), 0, 10) == labels[5:8]
    assert labels_for([1, 2, 3, 4], 7, range(5, 7), 2, 10) == [3, 4]
    assert labels_for(None, 7, range(3), 0, None) is None


def test_given_labels_are_checked():
    assert check_labels(3, 2, 5, "m") == [3, 3]
    assert check_labels(np.array([1, 2]), 2, 5, "m") == [1, 2]
    assert check_labels(torch.tensor([4, 0]), 2, 5, "m") == [4, 0]
    assert check_labels(None, 2, 5, "m") is None
    assert parse_labels("207") == 207 and parse_labels("1,2,3") == [1, 2, 3]
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_labels("1;2")
    with pytest.raises(ConfigError, match="not class-conditional"):
        check_labels(1, 2, None, "m")


def _labels(batch: int) -> torch.Tensor:
    return torch.tensor([0, 4, 2, 3][:batch])


@pytest.mark.parametrize("fuse", [False, True])
def test_the_engine_network_with_labels_is_the_reference(fuse):
    network = random_network(NAME)
    ts = torch.tensor([99, 50, 1, 0])
    fast = FastUnet(network, ts, fuse=fuse)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = _labels(4)
    with torch.no_grad():
        for k, t in enumerate(ts.tolist()):
            want = network(x, torch.full((4,), t), class_labels=labels)
            got = fast(x, torch.tensor([k]), class_labels=labels)
            assert rel_error(got, want) <= 1e-4, t
        # per sample: another label changes only its own image
        other = fast(x, torch.tensor([1]), class_labels=torch.tensor([1, 4, 2, 3]))
        same = fast(x, torch.tensor([1]), class_labels=labels)
        assert (other[0] - same[0]).abs().max() > 1e-4
        assert torch.equal(other[1:], same[1:])


def test_the_engine_network_with_labels_through_the_kernels(monkeypatch):
    """The fused GroupNorms read per-sample scale and shift rows (interpreted on the CPU)."""
    from ddpm_fast.kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    monkeypatch.setenv("DDPM_FAST_KERNELS_BACKEND", "triton")
    network = random_network(NAME)
    ts = torch.tensor([10, 0])
    fast = FastUnet(network, ts)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = fast(x, torch.tensor([0]), class_labels=_labels(2))
        want = network(x, torch.full((2,), 10), class_labels=_labels(2))
    assert rel_error(got, want) <= 1e-4


def _pipeline() -> Pipeline:
    diffusion = DiffusionConfig(
        image_size=8, schedule=ScheduleConfig("cosine", 100), objective="pred_noise",
        variance="learned_range", timestep_spacing="sections",
    )  # fmt: skip
    return Pipeline(random_network(NAME), diffusion, source="test network")


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_engine_chains_with_labels_are_the_reference_chains(dtype, tolerance):
    pipeline = _pipeline()
    options = dict(steps=5, seed=4, class_labels=[3, 1, 4])
    want = pipeline.sample(3, **options)
    got = Engine(pipeline, dtype=dtype).sample(3, batch_size=2, **options)
    assert (got - want).abs().max() <= tolerance
    drawn = Engine(pipeline).sample(3, steps=5, seed=4)
    assert (drawn - pipeline.sample(3, steps=5, seed=4)).abs().max() <= 1e-4


def test_the_onnx_executor_is_not_asked_for_labels():
    engine = Engine(_pipeline())
    assert engine.executor() == ("torch", "class-conditional models run on PyTorch on the CPU")
    with pytest.raises(ConfigError, match="class-conditional"):
        Engine(_pipeline(), cpu_executor="onnxruntime")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _flags(name: str) -> str:
    flags = json.loads((ADM / f"{name}.json").read_text())
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def test_the_cli_takes_labels_model_flags_and_respacing(tmp_path, capsys):
    out = tmp_path / "x.npz"
    model = ADM / "guided_cond.pt"
    flags = _flags("guided_cond")
    common = ("sample", model, "--model-flags", flags)
    code, _, err = run(capsys, *common, "--num", 2, "--timestep-respacing", "2",
                       "--class-labels", "5,998", "--out", out)  # fmt: skip
    assert code == 0, err
    with np.load(out) as data:
        assert data["label_ids"].tolist() == [5, 998]
    code, _, err = run(capsys, *common, "--num", 3, "--steps", 2, "--class-labels", "5,998",
                       "--out", tmp_path / "y.npz")  # fmt: skip
    assert code != 0 and "2 class labels for 3 images" in err
    code, _, err = run(capsys, "sample", model, "--num-heads", 3, "--model-flags",
                       flags + " --num_heads 2", "--out", tmp_path / "z.png")  # fmt: skip
    assert code != 0 and "differ" in err
    code, stdout, _ = run(capsys, "info", model, "--model-flags", flags)
    assert "classes:     1000" in stdout and "family:      adm" in stdout


def test_the_cli_refuses_labels_for_an_unconditional_model(tmp_path, capsys):
    code, _, err = run(capsys, "sample", "--class-labels", 1, "--steps", 2, "--out",
                       tmp_path / "x.png")  # fmt: skip
    assert code != 0 and "not class-conditional" in err
    code, _, err = run(capsys, "sample", ADM / "guided_cond.pt", "--model-flags",
                       "--image_size 16 --bogus_flag 1", "--out", tmp_path / "y.png")  # fmt: skip
    assert code != 0 and "--bogus_flag is not a flag" in err
