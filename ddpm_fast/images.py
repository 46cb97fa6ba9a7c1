"""Images to files: uint8 conversion, a PNG grid, PNGs in a folder (``ddpm_fast.output`` decides
what goes where, and writes the .npz). Every file is written to a temporary name, flushed and
renamed into place, so a crash never leaves a half-written image. NumPy and Pillow only:
``sample --onnx`` writes with it where torch is not installed. ``chain_to_images`` is the one
mapping of a chain's result to images, for every path (reference, engine, OnnxSampler); it
imports nothing, so OnnxSampler needs no Pillow for it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .files import write_atomically


def chain_to_images(x, auto_normalize: bool = True):
    """A chain's final x as images in [0, 1], for torch tensors and NumPy arrays alike:
    (x + 1) / 2, or with ``auto_normalize`` False (a model trained on data in [0, 1], as
    denoising-diffusion-pytorch's ``GaussianDiffusion(auto_normalize=False)``) x itself; clamped
    to [0, 1] either way, as every diffusers pipeline ends (``(image / 2 + 0.5).clamp(0, 1)``):
    a chain that does not clip x0 (diffusers' DPM-Solver, ``clip_x0=False``) can leave [-1, 1].
    The one place that decides the output range, for every path."""
    if auto_normalize:
        x = (x + 1) * 0.5
    return x.clip(0, 1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """NCHW floats in [0, 1] -> NHWC uint8, rounding as torchvision's save_image does
    (float32 x * 255 + 0.5, clamped, truncated)."""
    array = np.asarray(images, dtype=np.float32) * np.float32(255) + np.float32(0.5)
    return np.clip(array, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


GRID_PAD_VALUE = 128  # grey, so that black backgrounds of neighbouring cells stay apart


def grid(array: np.ndarray, *, padding: int = 2, scale: int | None = None) -> np.ndarray:
    """Tile NHWC images into one near-square HWC image with ``padding`` grey pixels around the
    cells, each cell scaled up by ``scale`` (default: until a cell is at least 64 pixels)."""
    n, h, w, c = array.shape
    scale = scale or max(1, math.ceil(64 / max(h, w)))
    if scale > 1:
        array = array.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    shape = (rows * (h + padding) + padding, cols * (w + padding) + padding, c)
    canvas = np.full(shape, GRID_PAD_VALUE, np.uint8)
    for i, image in enumerate(array):
        y = padding + (i // cols) * (h + padding)
        x = padding + (i % cols) * (w + padding)
        canvas[y : y + h, x : x + w] = image
    return canvas


def save_grid(array: np.ndarray, path: Path) -> None:
    write_atomically(path, lambda tmp: _pil(grid(array)).save(tmp, format="PNG"))


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def save_folder(array: np.ndarray, indices: range, folder: Path) -> None:
    for index, image in zip(indices, array, strict=True):
        write_atomically(image_path(folder, index), lambda tmp, im=image: _pil(im).save(tmp, "PNG"))
