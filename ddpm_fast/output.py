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
- Nothing on disk counts unchecked. A shard is the .npy of its batch followed by the SHA-256 of
  (the run's key: the manifest's contents; its index range; its bytes); on resume, and again as
  the file is assembled, a shard of another shape, dtype, run or index, cut short or altered
  does not count: it is drawn again (its batch is deterministic) with one warning line. A PNG
  of a folder counts when it decodes whole at the run's size and mode. The .npz header is the
  run's shape, never a shard's.
- Several processes (``torchrun``) share one output: batch j of the run's batch grid belongs to
  rank j mod N, each rank writes its own PNGs or shards, rank 0 checks every shard and assembles
  the file after a barrier; the bytes are those of a single-process run. A rank that stops is
  named (RankLostError) instead of being waited for forever.
- Temporary files carry the writer's pid and a random tag, and the manifest is created with a
  hard link (never replaced), so two ranks or two runs of one command do not collide.
- Write failures (a full disk, a read-only target) are one OutputError that says what was kept.

NumPy and Pillow only: ``sample --onnx`` uses it where torch is not installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DdpmFastError, NonFiniteError, OutputError
from .files import read_regular_file, temporary_name, write_atomically
from .images import grid, image_path, to_uint8

log = logging.getLogger(__name__)

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
    # Seconds a finished rank waits while no other rank finishes a batch (at least: see
    # write_samples); None: it does not wait for their files (the caller runs the ranks).
    timeout: float | None = None


class RankLostError(DdpmFastError):
    """A rank of a torchrun group stopped (killed, stuck, its machine gone) before its part of
    the output was written; what the others wrote is kept, and a rerun resumes from it."""


SINGLE = Group()

# A shard: the .npy of its uint8 NHWC batch (np.load reads it as it is), then SHARD_MAGIC and the
# SHA-256 of (the run's key, its index range, the .npy's bytes): the shard is this run's images
# of exactly that range, whole, or it is drawn again.
SHARD_MAGIC = b"ddpmfast"
SHARD_TRAILER = len(SHARD_MAGIC) + 32


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


class BadPart(Exception):
    """A shard or PNG on disk that does not count (the reason is the message)."""


class Output:
    """The target of ``--out``: ``kind`` is "grid" (.png), "npz" (.npz) or "folder"."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._key = b""  # the run's key, set by start()
        self._hwc: tuple[int, ...] | None = None  # one image's shape as stored (H, W, C)
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
            wanted["shard_digest"] = "sha256"  # older shards carry none: another run
        wanted = json.loads(json.dumps(wanted))  # as stored: tuples become lists
        canonical = json.dumps(wanted, sort_keys=True, separators=(",", ":"))
        self._key = hashlib.sha256(canonical.encode()).digest()
        shape = wanted.get("image_shape")  # (C, H, W); images are stored HWC
        self._hwc = (*shape[1:], shape[0]) if isinstance(shape, list) and len(shape) == 3 else None
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
        if self.store.is_dir() and any(_done_names(self.store)) and not manifest.exists():
            raise OutputError(
                f"{self.store}: holds images but no {MANIFEST}, so which run drew them is "
                "unknown; write to a new place"
            )
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            text = json.dumps(wanted, indent=2, sort_keys=True) + "\n"
            made = _create_exclusively(manifest, text)
        except OSError as err:
            raise OutputError(f"{manifest}: cannot write ({_reason(err)})") from None
        if not made:  # another process (the same command, run twice) recorded its run first
            _check_same_run(manifest, wanted)

    # what is done, what is left

    def _shard(self, batch: range) -> Path:
        return self.store / f"{batch.start:09d}-{batch.stop:09d}.npy"

    def _digest(self, batch: range, npy: bytes) -> bytes:
        return hashlib.sha256(self._key + f"{batch.start}-{batch.stop}".encode() + npy).digest()

    def _parts(self, batch: range) -> list[Path]:
        """The files that hold ``batch``: its shard, or its PNGs."""
        if self.sharded:
            return [self._shard(batch)]
        return [image_path(self.path, i) for i in batch]

    def _present(self, batch: range) -> bool:
        return all(p.exists() for p in self._parts(batch))

    def read_shard(self, batch: range) -> np.ndarray:
        """The shard of ``batch``, checked (raises BadPart): a .npy of uint8 (len(batch), H, W,
        C) whose digest says it is this run's images of exactly that range, whole."""
        path = self._shard(batch)
        _no_folder(path)
        try:
            data = read_regular_file(path)
        except FileNotFoundError:
            raise BadPart("missing") from None
        except OSError as err:
            raise BadPart(f"unreadable ({_reason(err)})") from None
        signed = data[-SHARD_TRAILER:-32] == SHARD_MAGIC
        npy = data[:-SHARD_TRAILER] if signed else data
        f = io.BytesIO(npy)
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]  # fmt: skip
            shape, fortran, dtype = read_header(f)
        except (ValueError, KeyError, EOFError, SyntaxError):
            raise BadPart(f"not a whole .npy file ({len(data)} bytes)") from None
        want = (len(batch), *self._hwc) if self._hwc else None
        if dtype != np.uint8 or fortran:
            raise BadPart(f"holds {dtype}{' (Fortran order)' if fortran else ''}, not uint8")
        if (want and tuple(shape) != want) or len(shape) != 4 or shape[0] != len(batch):
            raise BadPart(f"holds shape {tuple(shape)}, not {want or (len(batch), '...')}")
        if len(npy) - f.tell() != math.prod(shape):
            raise BadPart(f"cut short ({len(data)} bytes)")
        if not signed:
            raise BadPart("carries no digest of its run (not written by ddpm-fast)")
        if data[-32:] != self._digest(batch, npy):
            raise BadPart(f"is not this run's images {batch.start}..{batch.stop - 1}")
        return np.frombuffer(npy, np.uint8, offset=f.tell()).reshape(shape)

    def _check_pngs(self, batch: range) -> None:
        """Raises BadPart unless every PNG of ``batch`` decodes whole, at the run's size and
        mode (a PNG carries no digest: whose it is, the manifest says)."""
        from PIL import Image

        mode = None if self._hwc is None else {1: "L", 3: "RGB"}.get(self._hwc[2])
        for path in self._parts(batch):
            _no_folder(path)
            if not path.exists():
                raise BadPart("missing")
            try:
                with Image.open(io.BytesIO(read_regular_file(path))) as image:
                    image.load()  # decodes it all: a cut file fails here
                    size, held = image.size, image.mode
            except (OSError, ValueError, SyntaxError) as err:
                raise BadPart(f"{path.name} is not a whole PNG ({err})") from None
            if self._hwc is not None and (size != (self._hwc[1], self._hwc[0]) or held != mode):
                w, h = self._hwc[1], self._hwc[0]
                raise BadPart(f"{path.name} is {size[0]}x{size[1]} {held}, not {w}x{h} {mode}")

    def problem(self, batch: range) -> str | None:
        """Why ``batch`` must be drawn (again), or None when what is on disk counts."""
        try:
            if self.sharded:
                self.read_shard(batch)
            else:
                self._check_pngs(batch)
        except BadPart as bad:
            return str(bad)
        return None

    def pending(self, num: int, batch: int, group: Group = SINGLE) -> list[range]:
        """This rank's batches still to draw (batch j is rank j mod N's), each one on disk
        checked first; one warning line for each that is there but does not count."""
        todo = []
        for j, b in enumerate(batch_grid(num, batch)):
            if j % group.world != group.rank:
                continue
            why = self.problem(b)
            if why is None:
                continue
            if why != "missing":
                where = self._shard(b) if self.sharded else self.path
                log.warning(f"{where}: {why}; drawing images {b.start}..{b.stop - 1} again")
            todo.append(b)
        return todo

    def images_done(self, num: int, batch: int) -> int:
        """Images on disk from every rank so far (what a progress bar over all ranks shows)."""
        return sum(len(b) for b in batch_grid(num, batch) if self._present(b))

    # writing

    def write_batch(self, indices: range, images: np.ndarray) -> None:
        """One finished batch (NCHW floats in [0, 1]): its PNGs, or its shard."""
        array = to_uint8(images)
        try:
            if self.sharded:
                npy = io.BytesIO()
                np.save(npy, array)
                data = npy.getvalue()
                data += SHARD_MAGIC + self._digest(indices, data)
                write_atomically(self._shard(indices), lambda tmp: tmp.write_bytes(data))
            else:
                for index, image in zip(indices, array, strict=True):
                    _save_png(image_path(self.path, index), image)
        except OSError as err:
            if self.sharded and not self.store.is_dir() and self.path.exists():
                raise OutputError(
                    f"{self.store}: removed while this run wrote to it, and {self.path.name} is "
                    "there: another process finished the same output (the same command twice?)"
                ) from None
            kept = sum(1 for _ in _done_names(self.store)) if self.store.is_dir() else 0
            things = "shards" if self.sharded else "images"
            raise OutputError(
                f"{self.store}: cannot write images {indices.start}..{indices.stop - 1} "
                f"({_reason(err)}); the {kept} {things} already there are kept, and a rerun "
                "resumes from them"
            ) from None

    def finish(
        self, num: int, batch: int, *, keep_shards: bool = False, labels: list[int] | None = None
    ) -> None:
        """Assemble the file from its shards (rank 0, after every rank is done), atomically,
        each shard checked again as it is read; then remove the shards unless ``keep_shards``.
        An .npz also gets ``labels`` as ``label_ids`` (int64 [num])."""
        if not self.sharded:
            return
        batches = batch_grid(num, batch)

        def shard(b: range) -> np.ndarray:
            try:
                return self.read_shard(b)
            except BadPart as bad:
                raise OutputError(
                    f"{self._shard(b)}: {bad} (changed while {self.path.name} was written); "
                    "a rerun draws it again"
                ) from None

        try:
            if self.kind == "npz":
                shape = (num, *self._hwc) if self._hwc else None
                write_atomically(
                    self.path, lambda tmp: _save_npz(tmp, batches, shard, shape, labels)
                )
            else:
                _save_png(self.path, grid(np.concatenate([shard(b) for b in batches])))
        except OSError as err:
            raise OutputError(
                f"{self.path}: cannot write ({_reason(err)}); the {len(batches)} shards are kept "
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
    labels: list[int] | None = None,
) -> None:
    """Draw what ``output`` lacks of ``num`` images (``draw``, in batches of ``batch``) and write
    it, as one rank of ``group``: the whole of ``ddpm-fast sample`` after the model is loaded.
    ``labels``: the class labels of the ``num`` images, written beside them (``label_ids``).
    ``progress(n)`` is told the images finished by all ranks after each batch of this one.

    Under torchrun, a rank done with its batches waits for the others' batches to appear,
    for as long as some rank finishes one at least every ``group.timeout`` seconds (or 3 times
    this rank's slowest batch, if longer); past that it names the ranks that stopped."""
    output.start(run, batch, group)
    todo = output.pending(num, batch, group)
    if group.world == 1:
        left = sum(len(b) for b in todo)
        if not left:
            say(f"all {num} images are already drawn in {output.store}; nothing to draw")
        elif left < num:
            say(f"resuming: {left} of {num} images still to draw")
    slowest = _draw_batches(output, todo, num, batch, draw, progress)
    if group.world > 1 and group.timeout is not None:
        _await_ranks(output, num, batch, group, slowest)
    group.barrier()
    if group.rank == 0 and output.sharded:
        # Every shard is checked again before it is merged: another rank's, or one changed
        # since; any that does not count is drawn again here (its batch is deterministic).
        redo = output.pending(num, batch)
        _draw_batches(output, redo, num, batch, draw, None)
        output.finish(num, batch, keep_shards=keep_shards, labels=labels)


def _draw_batches(
    output: Output,
    todo: list[range],
    num: int,
    batch: int,
    draw: Draw,
    progress: Callable[[int], None] | None,
) -> float:
    """Draw and write ``todo``; the seconds the slowest batch took."""
    slowest = 0.0
    for run in _consecutive(todo):  # one call per run of batches: one progress bar
        start = run.start
        began = time.monotonic()
        try:
            for drawn, images in draw(len(run), run.start):
                output.write_batch(drawn, images)
                start = drawn.stop
                now = time.monotonic()
                slowest, began = max(slowest, now - began), now
                if progress is not None:
                    progress(output.images_done(num, batch))
        except NonFiniteError as err:
            failed = range(start, min(start + batch, num))
            where = output._shard(failed).name if output.sharded else "its PNGs"
            raise NonFiniteError(f"{err}: {where} not written", indices=err.indices) from None
    return slowest


def _await_ranks(output: Output, num: int, batch: int, group: Group, slowest: float) -> None:
    """Wait until every batch of the grid is on disk, while some rank keeps finishing batches:
    a barrier alone would wait for a dead rank as long as for a slow one."""
    limit = max(group.timeout, 3 * slowest)
    missing = list(enumerate(batch_grid(num, batch)))
    done, changed = -1, time.monotonic()
    while True:
        # Only what was missing is looked at again (a folder of 50k PNGs on a network disk).
        missing = [(j, b) for j, b in missing if not output._present(b)]
        if not missing:
            return
        if len(missing) != done:
            done, changed = len(missing), time.monotonic()
        elif time.monotonic() - changed > limit:
            ranks = sorted({j % group.world for j, _ in missing})
            first = missing[0][1]
            raise RankLostError(
                f"{output.store}: rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} "
                f"finished no batch in {limit:.0f} s ({len(missing)} batches missing, the first "
                f"images {first.start}..{first.stop - 1}): stopped or stuck; what is written is "
                "kept and a rerun resumes (DDPM_FAST_BARRIER_TIMEOUT=SECONDS waits longer)"
            )
        time.sleep(min(2.0, limit / 20))


def _consecutive(batches: list[range]) -> list[range]:
    """Adjacent batches joined: [0, 2), [2, 4), [6, 8) -> [0, 4), [6, 8)."""
    runs: list[range] = []
    for b in batches:
        if runs and runs[-1].stop == b.start:
            runs[-1] = range(runs[-1].start, b.stop)
        else:
            runs.append(b)
    return runs


def _no_folder(path: Path) -> None:
    """A folder where a shard or PNG belongs: removed if empty (then drawn again), else an
    OutputError (it may hold someone's files)."""
    if not path.is_dir():
        return
    try:
        path.rmdir()
    except OSError:
        raise OutputError(
            f"{path}: a folder where ddpm-fast's file belongs; move it away and rerun"
        ) from None
    raise BadPart("was an empty folder (removed)")


def _create_exclusively(path: Path, text: str) -> bool:
    """Write ``path`` whole unless it exists (a hard link never replaces a file); False if
    another process made it first."""
    tmp = temporary_name(path)
    try:
        tmp.write_text(text)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename, still atomic
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _save_png(path: Path, array: np.ndarray) -> None:
    """One HWC uint8 image as a PNG, atomically (Pillow's defaults, as images.save_grid)."""
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def _save_npz(
    path: Path,
    batches: list[range],
    shard: Callable[[range], np.ndarray],
    shape: tuple[int, ...] | None,
    labels: list[int] | None = None,
) -> None:
    """``arr_0`` = the shards in order, streamed (50k images need not fit in memory twice),
    stored uncompressed as np.savez does, with fixed zip timestamps. The header is the run's
    shape, never a shard's: each shard was checked to hold its batch of that shape. ``labels``
    become ``label_ids`` (int64), as guided-diffusion's samples carry them (its ``arr_1``)."""
    if shape is None:  # a run without image_shape: the first (checked) shard's
        shape = (batches[-1].stop, *shard(batches[0]).shape[1:])
    header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape}
    entry = zipfile.ZipInfo("arr_0.npy", date_time=ZIP_DATE)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive,
        archive.open(entry, "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array_header_1_0(f, header)
        for b in batches:
            f.write(shard(b).tobytes())
    if labels is not None:
        entry = zipfile.ZipInfo("label_ids.npy", date_time=ZIP_DATE)
        with (
            zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as archive,
            archive.open(entry, "w") as f,
        ):
            np.save(f, np.asarray(labels, dtype=np.int64))


def _done_names(folder: Path) -> Iterator[Path]:
    return (
        p for p in folder.iterdir() if IMAGE_NAME.fullmatch(p.name) or SHARD_NAME.fullmatch(p.name)
    )


def _check_same_run(manifest: Path, wanted: dict) -> None:
    try:
        held = json.loads(read_regular_file(manifest))
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
