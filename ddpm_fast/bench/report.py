"""The bench's report: where it ran (``machine``), the markdown table with one row a cell, the
JSON beside it, the results files' names (never overwriting an earlier run's), and the plot.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import torch

from ..machine import cpu_model
from ..version import __version__


def machine(device: str) -> dict:
    """Where and with what the run ran: date, versions, CPU and cores, GPU, the command."""
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ddpm_fast": __version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    for package in ("triton", "onnxruntime"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    try:  # read from its metadata: importing diffusers takes seconds
        info["diffusers"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        info["diffusers"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


# The markdown table's columns, one ``row`` a cell.
HEADER = (
    "| backend | dtype | batch | ms/step (median) | min-max | chain s | images/s | warm-up s "
    "| peak MiB | vs reference | GFLOP/s (of ceiling) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


def row(r: dict) -> str:
    """One result's row of the markdown table (``HEADER``'s columns)."""
    ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
    memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
    return (
        f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['ms_per_step']:.2f} "
        f"| {r['ms_min']:.2f}-{r['ms_max']:.2f} | {r['chain_s']:.2f} | {r['images_per_s']:.2f} "
        f"| {r['warmup_s']:.2f} | {memory} | {ratio} "
        f"| {r['achieved_gflops']:.0f} ({100 * r['of_ceiling']:.0f}%) |"
    )


def markdown(report: dict) -> str:
    """The report as markdown: the machine, the model, the table, the threads and the load."""
    m = report["machine"]
    ceilings = ", ".join(f"{d} {f / 1e9:.0f} GFLOP/s" for d, f in report["ceiling_flops"].items())
    results = report["results"]
    flops = sorted({(r["batch"], r["forward_gflop"]) for r in results})
    lines = [
        f"# Sampler benchmark, {m['date']}",
        "",
        f"- machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads), device {m['device']}",
        f"- versions: torch {m['torch']}, triton {m['triton']}, onnxruntime {m['onnxruntime']}, "
        f"ddpm-fast {m['ddpm_fast']}, python {m['python']}"
        + (f", diffusers {m['diffusers']}" if m.get("diffusers") else ""),
        f"- model: {report['model']}, images {report['image_shape']}, "
        f"{report['parameters'] / 1e6:.1f}M parameters "
        f"({results[0]['weight_mb']:.0f} MiB of fp32 weights)"
        if results
        else f"- model: {report['model']}",
        "- one forward: " + ", ".join(f"batch {b}: {g:.2f} GFLOP" for b, g in flops),
        f"- ceiling (large matmul, same run): {ceilings}; GFLOP/s counts a direct "
        "convolution's FLOPs, so a library that needs fewer (Winograd, FFT) can pass 100%",
        "- fp32 rows: cuDNN TF32 off for every backend (the engine's fp32); sampler "
        f"{report.get('sampler', 'ddpm')}, steps per chain: "
        + ", ".join(sorted({str(r["steps"]) for r in results})),
        *([f"- classifier: {report['classifier']}"] if report.get("classifier") else []),
        f"- command: `{m['command']}`",
        "",
        *HEADER,
        *(row(r) for r in results),
    ]
    threads = sorted(
        {(r["backend"], r["batch"], r["threads"]) for r in results if r.get("threads")}
    )
    if threads:
        lines += ["", "CPU threads:", ""]
        lines += [f"- {backend}, batch {batch}: {plan}" for backend, batch, plan in threads]
    loaded = [r for r in results if r.get("loaded_ms_per_step")]
    if loaded:
        busy = loaded[0]["busy_processes"]
        lines += [
            "",
            f"Under load: the same cells with {busy} busy process{'es' if busy > 1 else ''} "
            "(a Python loop spinning a core each) started beside them:",
            "",
            f"| backend | dtype | batch | quiet ms/step | with {busy} busy, ms/step "
            "| loaded/quiet |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['ms_per_step']:.2f} "
            f"| {r['loaded_ms_per_step']:.2f} | {r['loaded_ms_per_step'] / r['ms_per_step']:.2f}x |"
            for r in loaded
        ]
    return "\n".join(lines) + "\n"


def plot(report_paths: list[Path], out: Path) -> None:
    """ms per step against batch size, one line per (backend, dtype), from JSON reports."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'ddpm-fast[plot]'") from None
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    titles = []
    for path in report_paths:
        report = json.loads(Path(path).read_text())
        m = report["machine"]
        titles.append(f"{m.get('gpu') or m['cpu']} ({m['date'][:10]})")
        for r in report["results"]:
            lines.setdefault((r["backend"], r["dtype"]), []).append((r["batch"], r["ms_per_step"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (backend, dtype), points in sorted(lines.items()):
        points.sort()
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{backend} {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # 16, not 2^4
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("; ".join(titles), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def unused_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ...: the first with no .md or .json in ``folder``,
    so that a second run of the day keeps the first's results."""
    candidate, n = name, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in (".md", ".json")):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def results_name(folder: Path, name: str | None, device: str) -> str:
    """The results files' stem in ``folder``: ``name``, by default sampler-<device>-<date>, made
    unused (``unused_name``)."""
    return unused_name(folder, name or f"sampler-{device.split(':')[0]}-{datetime.date.today()}")


def write_report(folder: Path, name: str, report: dict) -> None:
    """``name``.json and ``name``.md in ``folder``, each written aside and then renamed, so that
    a Ctrl-C leaves no half file."""
    for suffix, text in (
        (".json", json.dumps(report, indent=1) + "\n"),
        (".md", markdown(report)),
    ):
        part = folder / f"{name}{suffix}.part"
        part.write_text(text)
        part.replace(folder / f"{name}{suffix}")
