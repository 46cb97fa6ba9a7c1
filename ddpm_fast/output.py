"""Where samples go, checked before any work is done: a PNG grid (``.png``), an ``.npz``
(``arr_0``, uint8 NHWC) or a folder of PNGs that a rerun resumes.

A folder carries ``run.json``, what the run is (the model's file hash and config, sampler,
steps, eta, seed, image shape, backend and dtype); a rerun into it with anything different is
refused, so a folder never mixes images of two runs. Write failures (a full disk, a read-only
target) are one OutputError that says what was kept. NumPy only: ``sample --onnx`` uses it
where torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import OutputError
from .images import image_path, save_folder, save_grid, save_npz, to_uint8, write_atomically

MANIFEST = "run.json"
MANIFEST_VERSION = 1
IMAGE_NAME = re.compile(r"\d{6,}\.png")

# (number of images, first sample index) -> batches of (sample indices, NCHW floats in [0, 1]).
Draw = Callable[[int, int], Iterable[tuple[range, np.ndarray]]]


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in chunks (a checkpoint may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_writable_folder(folder: Path, what: Path) -> None:
    """OutputError unless a file can be created in ``folder`` (tried, not guessed: permission
    bits do not stop root, and a read-only file system only shows when written to)."""
    if not folder.is_dir():
        raise OutputError(f"{what}: cannot write there ({folder} is not a folder)")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ddpm-fast-probe-")
    except OSError as err:
        raise OutputError(f"{what}: cannot write in {folder} ({_reason(err)})") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_file(path: Path, suffixes: tuple[str, ...]) -> None:
    """OutputError unless ``path`` has one of ``suffixes`` and its folder takes new files."""
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"{path}: the output must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder")
    check_writable_folder(path.parent, path)


class Output:
    """The target of ``ddpm-fast sample --out``: ``kind`` is "grid", "npz" or "folder"."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix in (".png", ".npz"):
            check_writable_file(self.path, (suffix,))
            self.kind = "grid" if suffix == ".png" else "npz"
            return
        self.kind = "folder"
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(
                f"{self.path}: exists and is not a folder (use .png, .npz or a folder)"
            )
        # The folder itself, or the nearest existing folder above it, must take new files.
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if existing != self.path and not existing.is_dir():
            raise OutputError(f"{self.path}: cannot create it ({existing} is not a folder)")
        check_writable_folder(existing, self.path)

    def start(self, run: dict) -> None:
        """Before sampling: a folder records ``run`` in its manifest, or checks that the run it
        already holds is this one."""
        if self.kind != "folder":
            return
        manifest = self.path / MANIFEST
        # Through JSON, as it is stored (tuples become lists).
        wanted = json.loads(json.dumps({"ddpm_fast_run": MANIFEST_VERSION, **run}))
        if manifest.exists():
            _check_same_run(manifest, wanted)
            return
        if self.path.is_dir() and any(IMAGE_NAME.fullmatch(p.name) for p in self.path.iterdir()):
            raise OutputError(
                f"{self.path}: holds images but no {MANIFEST}, so which run drew them is unknown; "
                "write to a new folder"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            text = json.dumps(wanted, indent=2, sort_keys=True) + "\n"
            write_atomically(manifest, lambda tmp: tmp.write_text(text))
        except OSError as err:
            raise OutputError(f"{manifest}: cannot write ({_reason(err)})") from None

    def pending(self, num: int, batch: int) -> list[range]:
        """Runs of consecutive batches still to draw: everything, except for a folder, where
        batches whose PNGs all exist are skipped."""
        if self.kind != "folder":
            return [range(0, num)]
        runs: list[range] = []
        for start in range(0, num, batch):
            stop = min(start + batch, num)
            if all(image_path(self.path, i).exists() for i in range(start, stop)):
                continue
            if runs and runs[-1].stop == start:
                runs[-1] = range(runs[-1].start, stop)
            else:
                runs.append(range(start, stop))
        return runs

    def write(self, num: int, batch: int, draw: Draw, say: Callable[[str], None]) -> None:
        """Draw the ``num`` images (``draw``, in batches of ``batch``) and write them; a folder
        writes each batch as it comes and draws only what it lacks."""
        if self.kind == "folder":
            runs = self.pending(num, batch)
            if not runs:
                say(f"all {num} images are already in {self.path}; nothing to do")
            for run in runs:
                if run.start or len(runs) > 1:
                    say(f"resuming: drawing images {run.start}..{run.stop - 1}")
                for indices, images in draw(len(run), run.start):
                    self._write_folder_batch(to_uint8(images), indices)
            return
        array = np.concatenate([to_uint8(images) for _, images in draw(num, 0)])
        try:
            (save_grid if self.kind == "grid" else save_npz)(array, self.path)
        except OSError as err:
            raise OutputError(
                f"{self.path}: cannot write ({_reason(err)}); nothing was written (the {num} "
                "images drawn are lost: free space or pick another --out, and rerun)"
            ) from None

    def _write_folder_batch(self, array: np.ndarray, indices: range) -> None:
        try:
            save_folder(array, indices, self.path)
        except OSError as err:
            kept = sum(1 for _ in _images_in(self.path))
            raise OutputError(
                f"{self.path}: cannot write images {indices.start}..{indices.stop - 1} "
                f"({_reason(err)}); the {kept} images already there are kept, and a rerun "
                "resumes from them"
            ) from None


def _images_in(folder: Path) -> Iterator[Path]:
    return (p for p in folder.iterdir() if IMAGE_NAME.fullmatch(p.name))


def _check_same_run(manifest: Path, wanted: dict) -> None:
    try:
        held = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(f"{manifest}: unreadable ({err}); write to a new folder") from None
    if not isinstance(held, dict):
        raise OutputError(f"{manifest}: not a ddpm-fast run manifest; write to a new folder")
    held, wanted = _flat(held), _flat(wanted)
    differ = [k for k in sorted(set(held) | set(wanted)) if held.get(k) != wanted.get(k)]
    if differ:
        shown = "; ".join(
            f"{k}: folder {_short(held.get(k))}, now {_short(wanted.get(k))}" for k in differ[:3]
        )
        raise OutputError(
            f"{manifest.parent}: holds another run ({shown}); resume it with the same settings "
            "or write to a new folder"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so that a difference is named by its leaf."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."
