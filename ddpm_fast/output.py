"""Where samples go, checked before any work is done, written so that nothing is lost or mixed:
a PNG grid (``.png``), an ``.npz`` (``arr_0``, uint8 NHWC, as FID tools read it) or a folder of
PNGs.

- A folder gets one PNG per image as each batch finishes; ``.npz`` and ``.png`` outputs get one
  shard per finished batch in a sidecar folder (``samples.npz.shards/``), and the file itself is
  assembled from the shards at the end. Every file is written atomically (temporary name, fsync,
  rename), so a killed run redoes at most the batches in flight, and the final path never holds
  a partial file. The ``.npz`` is byte-identical to one from an uninterrupted run (fixed zip
  timestamps; per-sample noise).
- The folder, or the sidecar, holds ``run.json``: what the run is (the model's weights hash and
  config, sampler, steps, eta, seed, image shape, backend, dtype, device type; for shards also
  the batch size). A rerun with anything different is refused, so outputs never mix two runs.
- Several processes (``torchrun``) share one output: batch j of the run's batch grid belongs to
  rank j mod N, each rank writes its own PNGs or shards, rank 0 assembles the file after a
  barrier; the bytes are those of a single-process run.
- Write failures (a full disk, a read-only target) are one OutputError that says what was kept.

NumPy and Pillow only: ``sample --onnx`` uses it where torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import NonFiniteError, OutputError
from .images import image_path, save_folder, save_grid, to_uint8, write_atomically

MANIFEST = "run.json"
MANIFEST_VERSION = 1
IMAGE_NAME = re.compile(r"\d{6,}\.png")
SHARD_NAME = re.compile(r"(\d{9})-(\d{9})\.npy")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp: the same images give the same bytes

# (number of images, first sample index) -> batches of (sample indices, NCHW floats in [0, 1]).
Draw = Callable[[int, int], Iterable[tuple[range, np.ndarray]]]


@dataclass(frozen=True)
class Group:
    """The processes that share one output: this one's rank, how many, and a barrier."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)
    # The smallest of the ranks' values (a batch size every rank's device takes).
    smallest: Callable[[int], int] = field(default=lambda value: value, compare=False)


SINGLE = Group()


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


def batch_grid(num: int, batch: int) -> list[range]:
    """The run's batches of sample indices: [0, b), [b, 2b), ..., the last one shorter."""
    return [range(start, min(start + batch, num)) for start in range(0, num, batch)]


class Output:
    """The target of ``--out``: ``kind`` is "grid" (.png), "npz" (.npz) or "folder"."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix in (".png", ".npz"):
            check_writable_file(self.path, (suffix,))
            self.kind = "grid" if suffix == ".png" else "npz"
            self.store = self.path.with_name(self.path.name + ".shards")
            if self.store.exists() and not self.store.is_dir():
                raise OutputError(f"{self.store}: exists and is not a folder (the shards' place)")
            return
        self.kind = "folder"
        self.store = self.path
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(
                f"{self.path}: exists and is not a folder (use .png, .npz or a folder)"
            )
        # The folder itself, or the nearest existing folder above it, must take new files.
        existing = next(p for p in (self.path, *self.path.parents) if p.exists())
        if existing != self.path and not existing.is_dir():
            raise OutputError(f"{self.path}: cannot create it ({existing} is not a folder)")
        check_writable_folder(existing, self.path)

    @property
    def sharded(self) -> bool:
        return self.kind != "folder"

    # the run

    def start(self, run: dict, batch: int, group: Group = SINGLE) -> None:
        """Before sampling: rank 0 records ``run`` in the manifest, or checks that the run
        already there is this one; then every other rank checks it."""
        wanted = {"ddpm_fast_run": MANIFEST_VERSION, **run}
        if self.sharded:
            wanted["batch_size"] = batch  # shards are whole batches of this size
        wanted = json.loads(json.dumps(wanted))  # as stored: tuples become lists
        if group.rank == 0:
            self._record(wanted)
        group.barrier()
        if group.rank != 0:
            _check_same_run(self.store / MANIFEST, wanted)

    def _record(self, wanted: dict) -> None:
        manifest = self.store / MANIFEST
        if manifest.exists():
            _check_same_run(manifest, wanted)
            return
        if self.store.is_dir() and any(_done_names(self.store)):
            raise OutputError(
                f"{self.store}: holds images but no {MANIFEST}, so which run drew them is "
                "unknown; write to a new place"
            )
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            text = json.dumps(wanted, indent=2, sort_keys=True) + "\n"
            write_atomically(manifest, lambda tmp: tmp.write_text(text))
        except OSError as err:
            raise OutputError(f"{manifest}: cannot write ({_reason(err)})") from None

    # what is done, what is left

    def _done(self, batch: range) -> bool:
        if self.sharded:
            return self._shard(batch).exists()
        return all(image_path(self.path, i).exists() for i in batch)

    def _shard(self, batch: range) -> Path:
        return self.store / f"{batch.start:09d}-{batch.stop:09d}.npy"

    def pending(self, num: int, batch: int, group: Group = SINGLE) -> list[range]:
        """This rank's batches still to draw (batch j is rank j mod N's)."""
        batches = batch_grid(num, batch)
        return [
            b for j, b in enumerate(batches) if j % group.world == group.rank and not self._done(b)
        ]

    def images_done(self, num: int, batch: int) -> int:
        """Images finished by every rank so far (what a progress bar over all ranks shows)."""
        return sum(len(b) for b in batch_grid(num, batch) if self._done(b))

    # writing

    def write_batch(self, indices: range, images: np.ndarray) -> None:
        """One finished batch (NCHW floats in [0, 1]): its PNGs, or its shard."""
        array = to_uint8(images)
        try:
            if self.sharded:
                write_atomically(self._shard(indices), lambda tmp: _save_npy(tmp, array))
            else:
                save_folder(array, indices, self.path)
        except OSError as err:
            kept = sum(1 for _ in _done_names(self.store))
            things = "shards" if self.sharded else "images"
            raise OutputError(
                f"{self.store}: cannot write images {indices.start}..{indices.stop - 1} "
                f"({_reason(err)}); the {kept} {things} already there are kept, and a rerun "
                "resumes from them"
            ) from None

    def finish(self, num: int, batch: int, *, keep_shards: bool = False) -> None:
        """Assemble the file from its shards (rank 0, after every rank is done), atomically;
        then remove the shards unless ``keep_shards``."""
        if not self.sharded:
            return
        shards = [self._shard(b) for b in batch_grid(num, batch)]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise OutputError(
                f"{self.store}: shards missing after every rank finished: {missing[:3]}"
            )
        try:
            if self.kind == "npz":
                write_atomically(self.path, lambda tmp: _save_npz(tmp, shards))
            else:
                save_grid(np.concatenate([np.load(s) for s in shards]), self.path)
        except OSError as err:
            raise OutputError(
                f"{self.path}: cannot write ({_reason(err)}); the {len(shards)} shards are kept "
                f"in {self.store}, and a rerun writes the file from them"
            ) from None
        if not keep_shards:
            shutil.rmtree(self.store, ignore_errors=True)


def write_samples(
    output: Output,
    run: dict,
    num: int,
    batch: int,
    draw: Draw,
    *,
    group: Group = SINGLE,
    keep_shards: bool = False,
    say: Callable[[str], None] = lambda message: None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Draw what ``output`` lacks of ``num`` images (``draw``, in batches of ``batch``) and write
    it, as one rank of ``group``: the whole of ``ddpm-fast sample`` after the model is loaded.
    ``progress(n)`` is told the images finished by all ranks after each batch of this one."""
    output.start(run, batch, group)
    todo = output.pending(num, batch, group)
    if group.world == 1:
        left = sum(len(b) for b in todo)
        if not left:
            say(f"all {num} images are already drawn in {output.store}; nothing to draw")
        elif left < num:
            say(f"resuming: {left} of {num} images still to draw")
    for run in _consecutive(todo):  # one call per run of batches: one progress bar
        start = run.start
        try:
            for drawn, images in draw(len(run), run.start):
                output.write_batch(drawn, images)
                start = drawn.stop
                if progress is not None:
                    progress(output.images_done(num, batch))
        except NonFiniteError as err:
            failed = range(start, min(start + batch, num))
            where = output._shard(failed).name if output.sharded else "its PNGs"
            raise NonFiniteError(f"{err}: {where} not written", indices=err.indices) from None
    group.barrier()
    if group.rank == 0:
        output.finish(num, batch, keep_shards=keep_shards)


def _consecutive(batches: list[range]) -> list[range]:
    """Adjacent batches joined: [0, 2), [2, 4), [6, 8) -> [0, 4), [6, 8)."""
    runs: list[range] = []
    for b in batches:
        if runs and runs[-1].stop == b.start:
            runs[-1] = range(runs[-1].start, b.stop)
        else:
            runs.append(b)
    return runs


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _save_npz(path: Path, shards: list[Path]) -> None:
    """``arr_0`` = the shards in order, streamed (50k images need not fit in memory twice),
    stored uncompressed as np.savez does, with fixed zip timestamps."""
    first = np.load(shards[0], mmap_mode="r")
    total = sum(np.load(s, mmap_mode="r").shape[0] for s in shards)
    header = {"descr": first.dtype.str, "fortran_order": False, "shape": (total, *first.shape[1:])}
    entry = zipfile.ZipInfo("arr_0.npy", date_time=ZIP_DATE)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive,
        archive.open(entry, "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array_header_1_0(f, header)
        for shard in shards:
            f.write(np.ascontiguousarray(np.load(shard)).tobytes())


def _done_names(folder: Path) -> Iterator[Path]:
    return (
        p for p in folder.iterdir() if IMAGE_NAME.fullmatch(p.name) or SHARD_NAME.fullmatch(p.name)
    )


def _check_same_run(manifest: Path, wanted: dict) -> None:
    try:
        held = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(f"{manifest}: unreadable ({err}); write to a new place") from None
    if not isinstance(held, dict):
        raise OutputError(f"{manifest}: not a ddpm-fast run manifest; write to a new place")
    held, wanted = _flat(held), _flat(wanted)
    differ = [k for k in sorted(set(held) | set(wanted)) if held.get(k) != wanted.get(k)]
    if differ:
        shown = "; ".join(
            f"{k}: before {_short(held.get(k))}, now {_short(wanted.get(k))}" for k in differ[:3]
        )
        raise OutputError(
            f"{manifest.parent}: holds another run ({shown}); resume it with the same settings "
            "or write to a new place"
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
