"""The sampler benchmark's plumbing (not its figures): one tiny run of the default model writes
a markdown table and a JSON report with every field, and the plot reads them back."""

from __future__ import annotations

import argparse
import json

import pytest

from ddpm_fast import bench


def bench_args(tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    options = ["--steps", "2", "--repeats", "2", "--batch", "1", "3", "--device", "cpu"]
    args = parser.parse_args(["default", *options, "--out", str(tmp_path), "--name", "run"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    markdown = bench.main(bench_args(out))
    return out, markdown.read_text(), json.loads((out / "run.json").read_text())


def test_every_backend_and_batch_is_measured(report):
    _, _, data = report
    rows = {(r["backend"], r["batch"]) for r in data["results"]}
    assert rows == {("reference", 1), ("engine", 1), ("reference", 3), ("engine", 3)}
    for r in data["results"]:
        assert len(r["runs_ms"]) == 2 and r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert r["ms_per_step"] > 0 and r["vs_reference"] > 0 and r["forward_gflop"] > 0
        assert r["of_ceiling"] > 0
        if r["backend"] == "reference":
            assert r["vs_reference"] == 1.0
    batch3 = [r["forward_gflop"] for r in data["results"] if r["batch"] == 3]
    batch1 = [r["forward_gflop"] for r in data["results"] if r["batch"] == 1]
    assert batch3[0] == pytest.approx(3 * batch1[0], rel=1e-6)  # FLOPs scale with the batch


def test_the_report_says_where_it_ran(report):
    _, markdown, data = report
    machine = data["machine"]
    for key in ("date", "torch", "triton", "onnxruntime", "cores", "cpu", "command"):
        assert key in machine
    assert data["ceiling_flops"]["fp32"] > 1e8
    assert "| backend | dtype | batch |" in markdown and "| engine | fp32 | 3 |" in markdown
    assert machine["torch"] in markdown


def test_the_plot_reads_the_report(report):
    pytest.importorskip("matplotlib")
    out, _, _ = report
    png = out / "plot.png"
    bench.plot([out / "run.json"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="steps must be at least 1"):
        bench.main(bench_args(tmp_path, steps=0))
