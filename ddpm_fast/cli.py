"""The ``ddpm-fast`` command: sample, info, convert, export, verify, quality, bench.

torch is imported by the commands that need it, not at the top: ``ddpm-fast sample --onnx``
runs where only NumPy and ONNX Runtime are installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from . import load
from .errors import ConfigError, DdpmFastError
from .machine import StaleEntry
from .options import (
    BETA_SCHEDULES,
    CPU_EXECUTORS,
    DEFAULT_BATCH_SIZE,
    ENGINE_DTYPES,
    OBJECTIVES,
    VARIANCES,
    resolve_batch_size,
)
from .output import Output, check_writable_file, file_sha256, write_samples
from .samplers import SAMPLERS, SPACINGS, check_chain, sampler_module
from .version import __version__

GRID_IMAGES = 64  # images in the grid `quality --grid` writes

if TYPE_CHECKING:
    from .pipeline import Pipeline


def _say(message: str) -> None:
    """A note for the person at the terminal (stderr, so stdout stays clean)."""
    print(f"ddpm-fast: {message}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_arguments(parser: argparse.ArgumentParser, *, checkpoint_required: bool) -> None:
    if checkpoint_required:
        parser.add_argument("checkpoint", help="checkpoint file")
    else:
        parser.add_argument(
            "checkpoint", nargs="?", help="checkpoint file (default: the embedded default model)"
        )
    group = parser.add_argument_group("what the checkpoint may not say")
    group.add_argument("--image-size", type=_positive_int)
    group.add_argument("--objective", choices=OBJECTIVES)
    group.add_argument("--beta-schedule", choices=list(BETA_SCHEDULES))
    group.add_argument("--timesteps", type=_positive_int)
    group.add_argument("--variance", choices=[v for v in VARIANCES if v != "learned_range"])
    group.add_argument(
        "--auto-normalize",
        action=argparse.BooleanOptionalAction,
        help="images are (x + 1) / 2 of the chain's x, clamped to [0, 1] (the default); "
        "--no-auto-normalize: x itself clamped, for a model trained on data in [0, 1]",
    )
    group.add_argument("--channels", type=_positive_int)
    group.add_argument("--resnet-block-groups", type=_positive_int)
    group.add_argument("--attn-heads", type=_positive_int)
    adm = parser.add_argument_group(
        "OpenAI's ADM models (guided-diffusion, improved-diffusion): their flags"
    )
    adm.add_argument(
        "--model-flags",
        metavar="FLAGS",
        help="the libraries' MODEL_FLAGS (and DIFFUSION_FLAGS, SAMPLE_FLAGS) string as their "
        "READMEs give it: '--attention_resolutions 32,16,8 --class_cond True ...'",
    )
    adm.add_argument("--noise-schedule", choices=["linear", "cosine"])
    adm.add_argument("--diffusion-steps", type=_positive_int)
    adm.add_argument("--num-heads", type=_positive_int)
    adm.add_argument("--num-head-channels", type=int)
    adm.add_argument("--num-heads-upsample", type=int)
    for flag in ("use-new-attention-order", "rescale-timesteps", "sigma-small", "predict-xstart"):
        adm.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction)
    adm.add_argument("--library", choices=["guided-diffusion", "improved-diffusion"])
    group.add_argument(
        "--online",
        action="store_true",
        default=None,  # None, not False: --onnx tells a flag given from its absence
        help="Trainer checkpoints: online weights, not the EMA",
    )


def _chain_arguments(parser: argparse.ArgumentParser) -> None:
    # No defaults here (None: "not given"), so that --onnx can tell a request from a default.
    parser.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="default: the model's (a diffusers DPMSolverMultistepScheduler folder: its "
        "dpm++2m variant), else ddpm",
    )
    parser.add_argument("--eta", type=float, help="DDIM's eta (default 0: deterministic)")
    parser.add_argument(
        "--timestep-respacing",
        metavar="STR",
        help="OpenAI's libraries' respacing: 250 (even sections), 10,15,20 (sections), ddim25 "
        "(the DDIM stride); sets --steps and --timestep-spacing",
    )
    parser.add_argument(
        "--timestep-spacing",
        choices=SPACINGS,
        help="which timesteps a chain of --steps visits (diffusers' names; library: "
        "denoising-diffusion-pytorch's); default: the model's (a diffusers folder's scheduler), "
        "else the sampler's (ddpm, ddim: library; dpm++2m: linspace)",
    )


def _chain(args: argparse.Namespace, pipeline: Pipeline | None = None) -> tuple[str, float]:
    """(sampler, eta) asked for, with their defaults (the sampler: the model's, else ddpm); eta
    applies to DDIM only."""
    default = pipeline.diffusion.sampler if pipeline is not None else None
    sampler = args.sampler or default or "ddpm"
    eta = 0.0 if args.eta is None else args.eta
    if eta and sampler in SAMPLERS and not sampler_module(sampler).USES_ETA:
        raise ConfigError("--eta applies to --sampler ddim only")
    return check_chain(sampler, eta)


def _sampling_arguments(parser: argparse.ArgumentParser, *, default_num: int) -> None:
    parser.add_argument(
        "-n", "--num", type=_positive_int, default=default_num, help="number of images"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        help=f"default: up to {DEFAULT_BATCH_SIZE}; auto: as many as the GPU's memory takes",
    )
    parser.add_argument("--steps", type=_positive_int, help="default: the schedule's timesteps")
    _chain_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument(
        "--class-labels",
        metavar="LABELS",
        help="a class-conditional model's labels: 207 (every image) or 1,2,3 (one per image; "
        "their count must be --num); default: drawn per image from --seed",
    )


SAMPLE_NUM = 16  # images `ddpm-fast sample` draws by default


def _classifier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classifier",
        metavar="FILE",
        help="classifier guidance with a guided-diffusion classifier (EncoderUNetModel "
        "state_dict), as its classifier_sample.py: ddpm and ddim chains, towards --class-labels",
    )
    parser.add_argument(
        "--classifier-scale", type=float, default=1.0, help="the guidance scale (default 1.0)"
    )
    parser.add_argument(
        "--classifier-flags",
        metavar="FLAGS",
        help="the classifier's CLASSIFIER_FLAGS as guided-diffusion's README gives them "
        '("--image_size 64 --classifier_depth 4 ..."; the weights fix the rest)',
    )
    parser.add_argument(
        "--classifier-num-head-channels",
        type=_positive_int,
        help="the classifier's attention head width (default 64, as guided-diffusion's)",
    )


def _classifier(args: argparse.Namespace):
    """The ``--classifier`` of a sample command (None without one), loaded."""
    if args.classifier is None:
        for name in ("classifier_flags", "classifier_num_head_channels"):
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} needs --classifier FILE")
        return None
    from .guidance import load_classifier

    options = {}
    if args.classifier_num_head_channels is not None:
        options["num_head_channels"] = args.classifier_num_head_channels
    flags = args.classifier_flags
    return load_classifier(args.classifier, flags, **options)


def _threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads (default: the cores available to this process, split or reduced "
        "under load as `ddpm-fast info` shows)",
    )
    parser.add_argument(
        "--cpu-executor",
        choices=CPU_EXECUTORS,
        help="what runs the engine's fp32 step on the CPU: onnxruntime (the engine's executor "
        "file, exported once into the cache folder) or torch; auto: onnxruntime where installed "
        "(default: $DDPM_FAST_CPU_EXECUTOR, else auto)",
    )


# The ADM flags given one by one (dest = the libraries' flag name).
_ADM_OPTIONS = ("noise_schedule", "diffusion_steps", "num_heads", "num_head_channels",
                "num_heads_upsample", "use_new_attention_order", "rescale_timesteps",
                "sigma_small", "predict_xstart", "library")  # fmt: skip


def _model_flags(args: argparse.Namespace) -> dict:
    """``--model-flags`` parsed, with the options given one by one: a flag given twice with two
    values is a ConfigError. Its sampling flags (timestep_respacing, use_ddim) become the
    sampling options where those are not given."""
    from .models.adm import parse_model_flags

    flags = parse_model_flags(args.model_flags) if getattr(args, "model_flags", None) else {}
    for name in (*_ADM_OPTIONS, "image_size"):
        given = getattr(args, name, None)
        if given is None:
            continue
        if name in flags and flags[name] != given:
            cli = "--" + name.replace("_", "-")
            raise ConfigError(f"{cli} {given} and --model-flags' --{name} {flags[name]} differ")
        flags[name] = given
    if "timestep_respacing" in flags and hasattr(args, "timestep_respacing"):
        if args.timestep_respacing not in (None, flags["timestep_respacing"]):
            raise ConfigError("--timestep-respacing and --model-flags' --timestep_respacing differ")
        args.timestep_respacing = flags["timestep_respacing"]
    if flags.get("use_ddim") and hasattr(args, "sampler"):
        if args.sampler not in (None, "ddim"):
            raise ConfigError(f"--sampler {args.sampler} and --model-flags' --use_ddim True differ")
        args.sampler = "ddim"
    return flags


def _load(args: argparse.Namespace) -> Pipeline:
    options = {
        "image_size": args.image_size,
        "objective": args.objective,
        "beta_schedule": args.beta_schedule,
        "timesteps": args.timesteps,
        "variance": args.variance,
        "auto_normalize": args.auto_normalize,
        "channels": args.channels,
        "resnet_block_groups": args.resnet_block_groups,
        "attn_heads": args.attn_heads,
    }
    options = {k: v for k, v in options.items() if v is not None}
    flags = _model_flags(args)
    # Sampling flags of a pasted string are not the model's (taken by _model_flags).
    options.update({k: v for k, v in flags.items() if k != "timestep_respacing"})
    return load(args.checkpoint, use_ema=not args.online, **options)


def _batch_size(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _sampling_options(args: argparse.Namespace, pipeline: Pipeline) -> dict:
    """Keyword arguments of Pipeline.sample_batches, checked before any work is done."""
    from .class_labels import check_labels, parse_labels
    from .guidance import check_guided_chain
    from .options import check_seed
    from .pipeline import resolve_device
    from .samplers import step_tables

    sampler, eta = _chain(args, pipeline)
    respacing = getattr(args, "timestep_respacing", None)
    spec = pipeline.sampler_spec(sampler, args.steps, eta, args.timestep_spacing, respacing)
    pipeline.image_shape()
    device = resolve_device(args.device, pipeline.device)
    batch_size = args.batch_size
    if batch_size != "auto":  # "auto" is measured on each rank's own device, later
        batch_size = resolve_batch_size(args.num, batch_size)
    classifier = _classifier(args) if hasattr(args, "classifier") else None
    classes, scale = pipeline.guided_classes(
        classifier, getattr(args, "classifier_scale", 1.0), pipeline.image_shape()
    )
    if classifier is not None:
        check_guided_chain(step_tables(pipeline.schedule, spec), spec)
    labels = getattr(args, "class_labels", None)
    if labels is not None:
        labels = parse_labels(labels)
        check_labels(labels, args.num, classes, pipeline.source or "the model")
    options = dict(
        steps=spec.steps,
        sampler=sampler,
        eta=eta,
        timestep_spacing=spec.timestep_spacing,
        seed=check_seed(args.seed),
        batch_size=batch_size,
        device=device,
        progress=True,
    )
    if spec.section_counts:  # OpenAI's multi-section respacing: steps and spacing follow
        options["timestep_respacing"] = respacing
        del options["steps"], options["timestep_spacing"]
    if labels is not None:
        options["class_labels"] = labels
    if classifier is not None:
        options.update(classifier=classifier, classifier_scale=scale)
    return options


def cmd_sample(args: argparse.Namespace) -> int:
    output = Output(args.out)  # an unwritable target fails here, before any sampling
    if args.onnx is not None:
        return _sample_onnx(args, output)
    from .warm_start import WarmStart, record, warm_key

    key = warm_key(args)
    warm = WarmStart.find(key)
    if warm is not None:  # the same model and chain ran before: no torch needed
        try:
            warm.sample_to(output, args, say=_say)
            print(f"wrote {args.num} images to {output.path}")
            return 0
        except StaleEntry as why:  # its executor file changed since find(): the full path
            _say(f"{why}; running the full path")  # resumes what the warm start wrote
    from . import distributed
    from .engine import Engine

    pipeline = _load(args)
    options = _sampling_options(args, pipeline)
    if args.reference:
        if args.dtype != "fp32":
            raise ConfigError("--dtype applies to the engine, not to --reference (fp32)")
        if args.cpu_executor is not None:
            raise ConfigError("--cpu-executor applies to the engine, not to --reference")
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
    else:
        pipeline = Engine(
            pipeline, dtype=args.dtype, threads=args.threads, cpu_executor=args.cpu_executor
        )
    group, options["device"] = distributed.join(options["device"])
    try:
        pipeline.sample_to(
            output.path, args.num, keep_shards=args.keep_shards, group=group,
            say=_say if group.rank == 0 else lambda message: None, **options,
        )  # fmt: skip
    finally:
        distributed.leave()
    if key is not None and group.world == 1 and not args.reference:
        spec = pipeline.sampler_spec(
            options["sampler"], options.get("steps"), options["eta"],
            options.get("timestep_spacing"), options.get("timestep_respacing"),
        )  # fmt: skip
        record(key, pipeline, spec, pipeline.run_identity(spec, options["device"]))
    if group.rank == 0:
        print(f"wrote {args.num} images to {output.path}")
    return 0


# The model options of _model_arguments, which an ONNX file fixes.
_MODEL_FLAGS = {
    "image_size": "--image-size",
    "objective": "--objective",
    "beta_schedule": "--beta-schedule",
    "timesteps": "--timesteps",
    "variance": "--variance",
    "auto_normalize": "--auto-normalize",
    "channels": "--channels",
    "resnet_block_groups": "--resnet-block-groups",
    "attn_heads": "--attn-heads",
    "online": "--online",
    "model_flags": "--model-flags",
    **{name: "--" + name.replace("_", "-") for name in _ADM_OPTIONS},
}


def _sample_onnx(args: argparse.Namespace, output: Output) -> int:
    """``sample --onnx FILE``: the same outputs from an ONNX file, by ONNX Runtime (no torch)."""
    from .export.onnx_sampler import OnnxSampler, providers_for_device
    from .options import check_seed

    if args.checkpoint is not None:
        raise ConfigError("give a checkpoint or --onnx FILE, not both")
    given = [flag for dest, flag in _MODEL_FLAGS.items() if getattr(args, dest, None) is not None]
    if given:
        raise ConfigError(f"{given[0]} does not apply to --onnx (the file fixes the model)")
    engine_flags = (
        ("--reference", args.reference),
        ("--dtype", args.dtype != "fp32"),
        ("--threads", args.threads is not None),
        ("--cpu-executor", args.cpu_executor is not None),
    )
    flag = next((flag for flag, given in engine_flags if given), None)
    if flag is not None:
        raise ConfigError(f"{flag} does not apply to --onnx (ONNX Runtime runs the file)")
    if getattr(args, "timestep_respacing", None) is not None:
        raise ConfigError("--timestep-respacing does not apply to --onnx (the file fixes it)")
    if args.classifier is not None:
        raise ConfigError("--classifier does not apply to --onnx (ONNX Runtime cannot "
                          "differentiate the classifier)")  # fmt: skip
    if args.eta is not None:
        _chain(args)  # a bad --eta is the same error as without --onnx
    check_seed(args.seed)
    sampler = OnnxSampler(args.onnx, providers=providers_for_device(args.device))
    sampler.check_chain(args.sampler, args.steps, args.eta, args.timestep_spacing)
    batch = resolve_batch_size(args.num, None if args.batch_size == "auto" else args.batch_size)
    info = sampler.info
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sample --onnx runs in one process; torchrun is for checkpoints")
    run = {
        "model": {"onnx_sha256": file_sha256(args.onnx), "family": info.family,
                  "network": info.config, "diffusion": info.diffusion},
        "backend": "onnx",
        "dtype": info.dtype,
        "device": "cuda" if sampler.providers[0] == "CUDAExecutionProvider" else "cpu",
        "sampler": info.sampler,
        "steps": info.steps,
        "eta": info.eta,
        "timestep_spacing": info.timestep_spacing,
        "seed": args.seed,
        "image_shape": list(info.image_shape),
    }  # fmt: skip

    from .class_labels import check_labels, parse_labels, run_labels

    given = None if args.class_labels is None else parse_labels(args.class_labels)
    given = check_labels(given, args.num, info.num_classes, str(args.onnx))
    recorded, labels = run_labels(given, args.seed, args.num, info.num_classes)
    if recorded is not None:  # as Pipeline.sample_to records them
        run["class_labels"] = recorded

    def draw(num: int, start: int):
        return sampler.sample_batches(
            num, seed=args.seed, batch_size=batch, start_index=start, progress=True,
            class_labels=None if given is None else given[start : start + num],
        )  # fmt: skip

    write_samples(
        output, run, args.num, batch, draw, keep_shards=args.keep_shards, say=_say, labels=labels
    )
    print(f"wrote {args.num} images to {output.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.exporter import export_onnx
    from .export.format import VerificationError

    out = Path(args.out)
    check_writable_file(out, (".onnx",))
    if args.sampler is not None:
        _chain(args)  # a bad chain fails before the model is read
    pipeline = _load(args)
    sampler, eta = _chain(args, pipeline)
    options = dict(what=args.what, dtype=args.dtype, opset=args.opset)
    try:
        result = export_onnx(
            pipeline, out, sampler=sampler, steps=args.steps, eta=eta,
            timestep_spacing=args.timestep_spacing, **options,
        )  # fmt: skip
    except VerificationError as err:
        print(err.report)
        _say(f"{out} not written: the export does not match the reference")
        return 1
    print(result.report)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({args.what}, {args.dtype}, opset {args.opset}, {size:.1f} MB)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .export.onnx_sampler import providers_for_device
    from .export.verify import load_onnx_info, verify_onnx

    info = load_onnx_info(args.onnx_file)  # a bad file fails here, before any model is loaded
    if args.image_size is None:
        args.image_size = info.image_size
    report = verify_onnx(args.onnx_file, _load(args), providers=providers_for_device(args.device))
    print(report)
    return 0 if report.ok else 1


def cmd_quality(args: argparse.Namespace) -> int:
    import torch

    from .quality import real_digits_report, score_digits

    if args.grid is not None:
        check_writable_file(Path(args.grid), (".png",))
    pipeline = _load(args)
    options = _sampling_options(args, pipeline)
    if options["batch_size"] == "auto":
        options["batch_size"] = pipeline.auto_batch_size(args.num, options["device"])
    images = torch.cat([images.cpu() for _, images in pipeline.sample_batches(args.num, **options)])
    print(f"samples:     {score_digits(images)}")
    print(f"real digits: {real_digits_report()}")
    if args.grid is not None:
        from .images import save_grid, to_uint8

        save_grid(to_uint8(images[:GRID_IMAGES].numpy()), Path(args.grid))
        print(f"wrote the first {min(args.num, GRID_IMAGES)} images to {args.grid}")
    return 0


def _shown_kwargs(kwargs: dict) -> str:
    """A schedule's arguments for ``info``: a list (trained betas) by its length."""
    shown = {
        k: f"<{len(v)} values>" if isinstance(v, list | tuple) else v for k, v in kwargs.items()
    }
    return str(shown)


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import describe

    pipeline = _load(args)
    info = describe(pipeline)
    info["cpu_threads"] = _cpu_threads(pipeline, args.threads, args.cpu_executor)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    network = ", ".join(f"{k}={v}" for k, v in info["network"].items())
    diffusion = info["diffusion"]
    auto_normalize = pipeline.diffusion.auto_normalize  # to_dict leaves out the default
    schedule = diffusion["schedule"]
    lines = [
        f"source:      {info['source']}",
        f"family:      {info['family']}",
        f"parameters:  {info['parameters']:,} ({info['parameters'] / 1e6:.2f}M)",
        f"network:     {network}",
        f"schedule:    {schedule['name']}, {schedule['timesteps']} timesteps"
        + (f", {_shown_kwargs(schedule['kwargs'])}" if schedule["kwargs"] else ""),
        f"objective:   {diffusion['objective']}",
        f"variance:    {diffusion['variance']}",
        f"images:      {'(x + 1) / 2' if auto_normalize else 'x'} of the chain's x, clamped to"
        f" [0, 1] (auto_normalize {str(auto_normalize).lower()})",
        f"chains:      {_chain_defaults(pipeline)}",
        f"image size:  {diffusion['image_size'] or 'not stored (pass --image-size)'}",
    ]
    if pipeline.num_classes is not None:
        lines.append(
            f"classes:     {pipeline.num_classes} (class-conditional: --class-labels, else "
            "labels drawn per image from the seed)"
        )
    lines += [f"note:        {note}" for note in info["notes"]]
    lines.append(f"cpu threads: {info['cpu_threads']}")
    print("\n".join(lines))
    return 0


def _chain_defaults(pipeline: Pipeline) -> str:
    """How the model's chains run when nothing else is asked for."""
    d = pipeline.diffusion
    spacing = d.timestep_spacing or "the sampler's spacing"
    if spacing == "sections":
        spacing = "OpenAI's respacing (even sections; DDIM: ddim-stride)"
    if d.steps_offset:
        spacing += f" (steps_offset {d.steps_offset})"
    clip = f"x0 clipped to [-{d.clip_range:g}, {d.clip_range:g}]" if d.clip_x0 else "x0 not clipped"
    eps = "clipped" if d.eps_from_clipped_x0 else "unclipped"
    return f"sampler {d.sampler or 'ddpm'}, {spacing}, {clip}, DDIM's eps from the {eps} x0"


def _cpu_threads(pipeline: Pipeline, threads: int | None, cpu_executor: str | None) -> str:
    """What runs the engine's fp32 step on the CPU, and how it would use this machine's cores
    for the default sample's batch."""
    from .engine import Engine

    engine = Engine(pipeline, threads=threads, cpu_executor=cpu_executor)
    executor, why = engine.executor()
    if pipeline.diffusion.image_size is None:
        return f"{executor} ({why}); threads depend on the image size (pass --image-size)"
    batch = min(SAMPLE_NUM, DEFAULT_BATCH_SIZE)
    plan = engine.thread_plan((batch, *pipeline.image_shape()))
    return f"{executor} ({why}); at batch {batch}: {plan.describe()}"


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import save_pipeline

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: the output must be a .safetensors file")
    check_writable_file(out, (".safetensors",))
    pipeline = _load(args)
    save_pipeline(pipeline, out)
    print(f"wrote {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (not the whole usage) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"ddpm-fast: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ddpm-fast", description="Sample from DDPM U-Nets, fast and checked.")
    parser.add_argument("--version", action="version", version=f"ddpm-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="draw images from a checkpoint")
    _model_arguments(sample, checkpoint_required=False)
    _sampling_arguments(sample, default_num=SAMPLE_NUM)
    sample.add_argument(
        "--out",
        default="samples.png",
        help="a .png grid, an .npz (arr_0: uint8 NHWC) or a folder of PNGs (resumable)",
    )
    sample.add_argument(
        "--keep-shards",
        action="store_true",
        help=".npz and .png outputs: keep the per-batch shards (OUT.shards/) after writing OUT",
    )
    sample.add_argument(
        "--onnx",
        metavar="FILE",
        help="sample from a ddpm-fast ONNX file with ONNX Runtime instead of a checkpoint",
    )
    sample.add_argument(
        "--reference",
        action="store_true",
        help="run the plain PyTorch reference path instead of the fast engine",
    )
    sample.add_argument(
        "--dtype",
        choices=ENGINE_DTYPES,
        default="fp32",
        help="the engine's precision (default fp32: the reference's images within 1e-4)",
    )
    _threads_argument(sample)
    _classifier_arguments(sample)
    sample.set_defaults(run=cmd_sample)

    quality = commands.add_parser(
        "quality", help="score samples of an 8x8 digits model (the default) with a classifier"
    )
    _model_arguments(quality, checkpoint_required=False)
    _sampling_arguments(quality, default_num=256)
    quality.add_argument(
        "--grid", metavar="FILE", help=f"also write the first {GRID_IMAGES} images as a PNG grid"
    )
    quality.set_defaults(run=cmd_quality)

    info = commands.add_parser("info", help="what a checkpoint holds")
    _model_arguments(info, checkpoint_required=False)
    info.add_argument("--json", action="store_true")
    _threads_argument(info)
    info.set_defaults(run=cmd_info)

    convert = commands.add_parser("convert", help="write ddpm-fast's self-describing safetensors")
    _model_arguments(convert, checkpoint_required=True)
    convert.add_argument("out", help="OUT.safetensors")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser(
        "export", help="write an ONNX file (the network or one whole step), verified"
    )
    _model_arguments(export, checkpoint_required=False)
    export.add_argument("--out", default="model.onnx", help="the .onnx file to write")
    export.add_argument(
        "--what", choices=["unet", "step"], default="unet", help="the network or one whole step"
    )
    export.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    export.add_argument("--opset", type=_positive_int, default=17)
    export.add_argument("--steps", type=_positive_int, help="default: the schedule's timesteps")
    _chain_arguments(export)
    export.set_defaults(run=cmd_export)

    verify = commands.add_parser(
        "verify", help="check an ONNX file against a checkpoint's reference path"
    )
    verify.add_argument("onnx_file", help="the .onnx file")
    _model_arguments(verify, checkpoint_required=False)
    verify.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA where usable)")
    verify.set_defaults(run=cmd_verify)

    # bench's own options are parsed by cmd_bench (bench_parser): its module imports torch,
    # which the other commands, `sample --onnx` first, must not pay for at start-up.
    bench = commands.add_parser("bench", help=BENCH_HELP, add_help=False)
    bench.set_defaults(run=cmd_bench)
    return parser


BENCH_HELP = "time sampling chains: reference, torch.compile, the engine, ONNX Runtime"


def bench_parser() -> argparse.ArgumentParser:
    from . import bench as benchmark

    parser = _Parser(prog="ddpm-fast bench", description=BENCH_HELP)
    benchmark.add_arguments(parser)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's namespace; bench's options stay unparsed in ``bench_arguments``."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench as benchmark

    benchmark.main(bench_parser().parse_args(args.bench_arguments))
    return 0


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every ``finally`` runs (temporary files
    removed) before it exits 143; a BaseException, as KeyboardInterrupt, so nothing catches it."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (main thread only); the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="ddpm-fast: %(message)s")
    # The engine says so when it exports its CPU executor file (seconds, once per model).
    logging.getLogger("ddpm_fast.engine").setLevel(logging.INFO)
    args = parse_arguments(argv)
    # SIGTERM's default action ends Python at once, leaving temporary files behind.
    previous = _on_sigterm(_raise_terminated)
    try:
        return _run(args)
    except Terminated:
        print("ddpm-fast: terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            _on_sigterm(previous)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except DdpmFastError as err:
        print(f"ddpm-fast: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name != "torch":
            raise
        print(
            f"ddpm-fast: error: `ddpm-fast {args.command}` needs PyTorch, which is not installed "
            "(only `sample --onnx` runs without it): scripts/install.sh or pip install torch",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("ddpm-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
