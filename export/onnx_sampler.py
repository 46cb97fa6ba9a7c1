"""The whole reverse chain from a ddpm-fast ONNX file, with ONNX Runtime and NumPy only.

Importing and running this module never imports torch: a deployment needs ``numpy`` and
``onnxruntime`` (or ``onnxruntime-gpu``), nothing else of ddpm-fast's dependencies. Noise is
the same Philox stream as ``ddpm_fast.noise`` (see :mod:`ddpm_fast.export.philox`), so for the
same seed it draws the same images as ``Pipeline.sample``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from ..class_labels import check_labels, labels_for
from ..errors import ConfigError
from ..images import chain_to_images
from ..options import check_int, check_seed, resolve_batch_size
from ..samplers import rule
from .format import (
    HISTORY_INPUT,
    LABELS_INPUT,
    SELF_COND_INPUT,
    OnnxFileError,
    OnnxModelInfo,
    first_line,
    parse_metadata,
)
from .philox import keyed_noise, step_noise

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# ONNX Runtime's session log levels: 0 verbose .. 3 error, 4 fatal. Warnings such as "some nodes
# were not assigned to the preferred execution providers" (shape ops kept on the CPU, as
# intended) are noise to a user.
SESSION_LOG_SEVERITY = 3


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "onnxruntime is not installed: pip install 'ddpm-fast[onnx]' (or onnxruntime)"
        ) from None
    return onnxruntime


@cache
def cuda_device_visible() -> bool:
    """Whether the CUDA driver reports a device to this process (asked of libcuda directly, so
    that neither torch nor ONNX Runtime's loud provider errors are involved)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        driver = ctypes.CDLL(name)
        count = ctypes.c_int(0)
        return (
            driver.cuInit(0) == 0
            and driver.cuDeviceGetCount(ctypes.byref(count)) == 0
            and (count.value > 0)
        )
    except (OSError, AttributeError):
        return False


def cuda_provider(device_id: int = 0) -> tuple[str, dict]:
    """The CUDA provider with TF32 off: ONNX Runtime's default (on) rounds float32 convolutions
    to 10-bit mantissas on Ampere and later, which is not the reference's function in fp32."""
    return (CUDA, {"device_id": device_id, "use_tf32": 0})


def default_providers() -> list:
    """CUDA (then CPU) where onnxruntime-gpu has its CUDA provider and a GPU is visible, else the
    CPU alone: CUDA is never requested on a machine without a GPU, where ONNX Runtime would log
    errors before falling back."""
    available = _onnxruntime().get_available_providers()
    if CUDA in available and cuda_device_visible():
        return [cuda_provider(), CPU]
    return [CPU]


def providers_for_device(device: str | None) -> list | None:
    """The providers for a ``--device`` string: None (default), 'cpu', 'cuda' or 'cuda:N'."""
    if device is None:
        return None
    if device == "cpu":
        return [CPU]
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"unknown device {device!r} (try cpu, cuda or cuda:1)")
    if CUDA not in _onnxruntime().get_available_providers():
        raise ConfigError(
            f"device {device!r} asked for, but this onnxruntime has no CUDA provider (install "
            "onnxruntime-gpu)"
        )
    if not cuda_device_visible():
        raise ConfigError(f"device {device!r} asked for, but no CUDA device is visible here")
    return [cuda_provider(int(index or 0)), CPU]


def open_session(
    path: str | os.PathLike,
    providers: Sequence | None = None,
    *,
    threads: int | None = None,
    batch: int | None = None,
):
    """An onnxruntime InferenceSession for ``path`` (quiet logs; providers as given, else
    :func:`default_providers`); OnnxFileError for a file it cannot load. ``threads``: that many
    intra-op threads and one inter-op (the engine's thread plans); ``batch``: the graph's
    "batch" axis fixed to it, so ONNX Runtime folds the shape arithmetic away."""
    ort = _onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    options = ort.SessionOptions()
    options.log_severity_level = SESSION_LOG_SEVERITY
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if batch is not None:
        options.add_free_dimension_override_by_name("batch", batch)
    requested = list(providers) if providers is not None else default_providers()
    wanted = [p if isinstance(p, str) else p[0] for p in requested]
    if CUDA in wanted:
        _preload_cuda_libraries(ort)
    try:
        session = ort.InferenceSession(str(path), options, providers=requested)
    except Exception as err:  # onnxruntime raises its own exception types
        if type(err).__name__ == "NotImplemented":
            raise  # an op without a kernel on these providers: the caller decides
        raise OnnxFileError(f"{path}: onnxruntime cannot load it ({first_line(err)})") from None
    if CUDA in wanted and CUDA not in session.get_providers():
        logger.warning(
            "%s: the CUDA provider could not start (this onnxruntime is built for CUDA %s, with "
            "cuDNN 9); running on %s",
            path,
            _built_for_cuda(),
            session.get_providers()[0],
        )
    return session


def _built_for_cuda() -> str:
    try:
        from onnxruntime.capi import build_and_package_info

        return str(getattr(build_and_package_info, "cuda_version", "?"))
    except ImportError:
        return "?"


@cache
def _preload_cuda_libraries(ort) -> None:
    """onnxruntime >= 1.21 can load CUDA and cuDNN from the nvidia-* wheels (those torch brings)
    when the system has none on its library path; it prints where it fails, so quietly."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        try:
            preload()
        except Exception as err:  # best effort: the session reports what is really missing
            logger.debug("onnxruntime.preload_dlls failed: %s", err)
    if printed.getvalue().strip():
        logger.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())


def read_info(session, path: str | os.PathLike) -> OnnxModelInfo:
    """The ddpm-fast metadata of a loaded file, checked against its inputs and outputs."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    info = parse_metadata(meta, str(path))
    inputs = tuple(i.name for i in session.get_inputs())
    outputs = tuple(o.name for o in session.get_outputs())
    if inputs != info.input_names or outputs != info.output_names:
        raise OnnxFileError(
            f"{path}: its inputs {list(inputs)} and outputs {list(outputs)} are not those of a "
            f"ddpm-fast {info.what} file ({list(info.input_names)} -> {list(info.output_names)})"
        )
    _check_graph_shapes(session, info, path)
    return info


def _check_graph_shapes(session, info: OnnxModelInfo, path) -> None:
    """The graph's image inputs and outputs must be [B, C, H, W] with the metadata's channels
    and image size (a unet's output may have 2C channels: learned variance). Inputs are fixed
    sizes; the exporter may leave an output's sizes symbolic, which then match anything."""
    c, h, w = info.image_shape
    problems = []
    for kind, args in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for arg in args:
            if arg.name in ("t", "step", LABELS_INPUT):
                continue
            allowed = ((c, 2 * c) if arg.name == "model_output" else (c,), (h,), (w,))
            dims = list(arg.shape)
            fits = len(dims) == 4 and all(
                dim in sizes if isinstance(dim, int) else kind == "output"
                for dim, sizes in zip(dims[1:], allowed, strict=True)
            )
            if not fits:
                problems.append(f"{kind} {arg.name} {dims}")
    if problems:
        raise OnnxFileError(
            f"{path}: the graph does not take the images its metadata states ([B, {c}, {h}, {w}]):"
            f" {'; '.join(problems)}"
        )


def _check_array(name: str, value, shape: tuple, dtype=np.float32) -> np.ndarray:
    """``value`` as given if it is an ndarray of ``dtype`` whose shape matches ``shape`` (None:
    any size), else a ConfigError that says what was expected."""
    expected = "[" + ", ".join("B" if s is None else str(s) for s in shape) + "]"
    if not isinstance(value, np.ndarray):
        raise ConfigError(f"{name} must be a NumPy array {expected}, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ConfigError(f"{name} must be {np.dtype(dtype).name}, got {value.dtype}")
    if value.ndim != len(shape) or any(
        s is not None and s != v for s, v in zip(shape, value.shape, strict=True)
    ):
        raise ConfigError(f"{name} must have shape {expected}, got {list(value.shape)}")
    return value


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress_bar(total: int, show: bool):
    """A tqdm bar where one is asked for and tqdm is there (a deployment may lack it)."""
    if show:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, desc="sampling", unit="step")
    return _NoBar()


class OnnxSampler:
    """Sample from a ddpm-fast ``step`` or ``unet`` ONNX file with ONNX Runtime and NumPy.

    ``providers``: ONNX Runtime execution providers; default CUDA where onnxruntime-gpu can use a
    GPU here, else the CPU. ``sample`` and ``sample_batches`` take Pipeline.sample's arguments; the
    chain (sampler, steps, eta) is the one fixed at export: others are errors.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence | None = None):
        self.path = Path(path)
        self.session = open_session(self.path, providers)
        self.info = read_info(self.session, self.path)
        self.providers = self.session.get_providers()
        self._tables = self._rows = None
        if self.info.what == "unet":
            self._tables = {k: np.asarray(v, dtype=np.float64) for k, v in self.info.tables.items()}
            self._rows = rule.row_columns(self._tables, self.info.objective)

    def __repr__(self) -> str:
        return (
            f"OnnxSampler({str(self.path)!r}: {self.info.what} {self.info.dtype}, "
            f"{self.info.chain()}, on {self.providers[0]})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.info.image_shape

    @property
    def steps(self) -> int:
        return self.info.steps

    def check_chain(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        timestep_spacing: str | None = None,
    ) -> None:
        """ConfigError unless the chain asked for (None: any) is the file's."""
        info = self.info
        again = "export it again with the chain you want"
        if timestep_spacing is not None and timestep_spacing != info.timestep_spacing:
            raise ConfigError(
                f"{self.path} holds the chain '{info.chain()}' ({info.timestep_spacing} spacing), "
                f"not timestep_spacing {timestep_spacing!r}; {again}"
            )
        if sampler is not None and sampler != info.sampler:
            raise ConfigError(
                f"{self.path} holds the chain '{info.chain()}', not sampler {sampler!r}; {again}"
            )
        if steps is not None and steps != info.steps:
            raise ConfigError(
                f"{self.path} was exported for {info.steps} steps, not {steps} "
                f"('{info.chain()}'); {again}"
            )
        if eta is not None and float(eta) != info.eta and (info.uses_eta or eta):
            raise ConfigError(
                f"{self.path} was exported with eta {info.eta:g}, not {eta:g}; {again}"
            )

    # one step

    def network(
        self,
        x: np.ndarray,
        t: np.ndarray,
        x_self_cond: np.ndarray | None = None,
        class_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """unet files: the network's output for x [B, C, H, W] float32 and timesteps t [B]
        (and a class-conditional network's labels [B])."""
        if self.info.what != "unet":
            raise ConfigError(f"{self.path} is a step file; network() needs a unet file")
        x = _check_array("x", x, (None, *self.image_shape))
        if not isinstance(t, np.ndarray) or t.dtype.kind not in "iu":
            raise ConfigError(f"t must be an integer NumPy array [B], got {getattr(t, 'dtype', t)}")
        _check_array("t", t, (x.shape[0],), t.dtype)
        timesteps = self.info.diffusion["schedule"]["timesteps"]
        if t.size and (t.min() < 0 or t.max() >= timesteps):
            raise ConfigError(f"timesteps must lie in [0, {timesteps}), got {t.min()}..{t.max()}")
        feed = {"x": x, "t": t.astype(np.int64)}
        if self.info.self_condition:
            feed[SELF_COND_INPUT] = self._self_cond(x_self_cond, x.shape[0])
        elif x_self_cond is not None:
            raise ConfigError("x_self_cond given, but the network is not self-conditioning")
        feed |= self._labels_feed(class_labels, x.shape[0])
        return self.session.run(None, feed)[0]

    def _labels_feed(self, class_labels, batch: int) -> dict:
        """The ``class_labels`` input of a class-conditional file, checked; {} otherwise."""
        labels = check_labels(class_labels, batch, self.info.num_classes, str(self.path))
        if self.info.num_classes is None:
            return {}
        if labels is None:
            raise ConfigError(f"{self.path} is class-conditional: pass class_labels [B]")
        return {LABELS_INPUT: np.asarray(labels, dtype=np.int64)}

    def step(
        self,
        x_t: np.ndarray,
        k: int,
        noise: np.ndarray | None = None,
        x_self_cond: np.ndarray | None = None,
        x0_prev: np.ndarray | None = None,
        class_labels=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One reverse step k (0 .. steps - 1) from x_t [B, C, H, W] float32: (x_prev, x0);
        ``class_labels`` [B] for a class-conditional file.

        ``noise`` [B, C, H, W] float32 is needed where the step adds noise
        (``info.adds_noise(k)``); ``x_self_cond`` (self-conditioning networks) and ``x0_prev``
        (the multistep solvers' history) are the previous step's x0, None for zeros.
        """
        x_t = _check_array("x_t", x_t, (None, *self.image_shape))
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 <= k < self.steps:
            raise ConfigError(f"the step index must be an integer in [0, {self.steps}), got {k!r}")
        batch = x_t.shape[0]
        if noise is None:
            if self.info.adds_noise(int(k)):
                raise ConfigError(f"step {k} adds noise: pass noise [B, C, H, W]")
            noise = np.zeros_like(x_t)
        noise = _check_array("noise", noise, x_t.shape)
        if self.info.self_condition:
            x_self_cond = self._self_cond(x_self_cond, batch)
        elif x_self_cond is not None:
            raise ConfigError("x_self_cond given, but the network is not self-conditioning")
        x0_prev = self._self_cond(x0_prev, batch) if x0_prev is not None else np.zeros_like(x_t)
        labels = self._labels_feed(class_labels, batch)
        return self._step(x_t, int(k), noise, x_self_cond, x0_prev, labels)

    def _self_cond(self, x_self_cond: np.ndarray | None, batch: int) -> np.ndarray:
        if x_self_cond is None:
            return np.zeros((batch, *self.image_shape), np.float32)
        return _check_array(SELF_COND_INPUT, x_self_cond, (batch, *self.image_shape))

    def _step(
        self,
        x_t: np.ndarray,
        k: int,
        noise: np.ndarray,
        x_self_cond: np.ndarray | None,
        x0_prev: np.ndarray,
        labels: dict,
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.info.what == "step":
            feed = {"x_t": x_t, "step": np.array([k], np.int64), "noise": noise}
            if self.info.carries_x0_prev:
                feed[HISTORY_INPUT] = x0_prev
            if x_self_cond is not None:
                feed[SELF_COND_INPUT] = x_self_cond
            x_prev, x0 = self.session.run(None, feed | labels)
            return x_prev, x0
        t = np.full((x_t.shape[0],), int(self._tables["timesteps"][k]), np.int64)
        feed = {"x": x_t, "t": t} | labels
        if x_self_cond is not None:
            feed[SELF_COND_INPUT] = x_self_cond
        model_output = self.session.run(None, feed)[0]
        return self._update(model_output, x_t, k, noise, x0_prev)

    def _update(
        self, model_output: np.ndarray, x: np.ndarray, k: int, noise: np.ndarray, x0_prev
    ) -> tuple[np.ndarray, np.ndarray]:
        """``ddpm_fast.samplers.rule``'s update in NumPy (float32 arithmetic, float32
        coefficients), for unet files."""
        info = self.info
        c = {name: np.float32(v[k]) for name, v in self._rows.items()}
        channels = x.shape[1]
        variance_output = None
        if model_output.shape[1] == 2 * channels:  # learned variance: [prediction, frac]
            model_output, variance_output = model_output[:, :channels], model_output[:, channels:]
        raw = rule.estimate_x0(c["a"], c["b"], x, model_output)
        x0 = np.clip(raw, -c["x0_max"], c["x0_max"])
        eps = rule.estimate_eps(
            c["x0_from_xt"], c["x0_from_eps"], x, np.clip(raw, -c["eps_x0_max"], c["eps_x0_max"])
        )
        x_next = rule.combine(c["c_x0"], c["c_xt"], c["c_x0_prev"], c["c_eps"], x0, x, x0_prev, eps)
        if not info.adds_noise(k):
            return x_next, x0
        if info.learned:
            log_var = rule.learned_log_var(variance_output, c["log_var_min"], c["log_var_max"])
            sigma = np.exp(np.float32(0.5) * log_var)
        else:
            sigma = c["sigma"]
        return rule.add_noise(x_next, c["noise_on"], sigma, noise), x0

    # the chain

    def sample_batches(
        self,
        num: int,
        *,
        seed: int = 0,
        batch_size: int | None = None,
        start_index: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        initial_noise: np.ndarray | None = None,
        class_labels=None,
        progress: bool = False,
    ) -> Iterator[tuple[range, np.ndarray]]:
        """Yield (sample indices, images NCHW float32 in [0, 1]) one batch at a time.
        ``class_labels`` as ``Pipeline.sample``'s (None: drawn per sample index from the seed,
        the same labels as every other path)."""
        num = check_int("the number of images", num, minimum=1)
        batch_size = resolve_batch_size(num, batch_size)
        start_index = check_int("start_index", start_index, minimum=0, maximum=2**32 - num)
        seed = check_seed(check_int("seed", seed))
        self.check_chain(sampler, steps, eta)
        given = check_labels(class_labels, num, self.info.num_classes, str(self.path))
        shape = self.image_shape
        if initial_noise is not None:
            initial_noise = _check_array("initial_noise", initial_noise, (num, *shape))

        total = -(-num // batch_size) * self.steps
        with _progress_bar(total, progress) as bar:
            for first in range(0, num, batch_size):
                rows = range(first, min(first + batch_size, num))
                indices = range(start_index + rows.start, start_index + rows.stop)
                if initial_noise is not None:
                    x = initial_noise[rows.start : rows.stop]
                else:
                    x = keyed_noise(seed, indices, 0, shape)
                silent = np.zeros_like(x)  # fed where a step adds no noise (and reads none)
                x0 = silent  # the previous step's x0: zeros at the first
                noise_blocks = step_noise(seed, indices, shape, self.steps)
                batch_labels = labels_for(given, seed, indices, rows.start, self.info.num_classes)
                labels = {} if batch_labels is None else {
                    LABELS_INPUT: np.asarray(batch_labels, dtype=np.int64)
                }  # fmt: skip
                for k in range(self.steps):
                    noise = noise_blocks.of_step(k) if self.info.adds_noise(k) else silent
                    self_cond = x0 if self.info.self_condition else None
                    x, x0 = self._step(x, k, noise, self_cond, x0, labels)
                    bar.update()
                yield indices, chain_to_images(x, self.info.diffusion.get("auto_normalize", True))

    def sample(self, num: int, **options) -> np.ndarray:
        """Draw ``num`` images as an NCHW float32 array in [0, 1]; options as
        :meth:`sample_batches` (seed, batch_size, start_index, sampler, steps, eta,
        initial_noise, class_labels, progress)."""
        return np.concatenate([images for _, images in self.sample_batches(num, **options)])
