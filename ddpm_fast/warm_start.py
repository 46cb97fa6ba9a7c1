"""The CLI's warm start: ``ddpm-fast sample`` run again with the same model and chain, without
importing torch.

On the CPU an fp32 chain runs on ONNX Runtime: the engine's executor file, exported once into the
cache, fed each step's rows of the chain's tables (``engine.table_chain``). Everything the
chain needs beside the file is small: those tables, computed with torch from the network, and
what the output records of the run. So a ``sample`` that ran that way records them
(``record``), and the next ``sample`` with the same key finds the record before importing
torch (``WarmStart.find``: importing torch is most of the default model's start-up) and runs
the same loop (``TableChain``), noise, sessions and thread plans as the engine, with NumPy: the
same bits.

The key is everything a record's content depends on: the checkpoint file's sha256 (the
embedded default's asset), every ``sample`` option but those the warm start applies itself
(number, seed, batch size, threads, output), the executor environment variable, ddpm-fast's
source digest and torch's version (which computed the tables): the checkpoint is hashed whole on
each start, so a file edited in place, whatever its size and time stamp, gets another key. A
record is used only where it is verifiably what its key names (``WarmStart.find``: its fields'
and tables' digests, and the executor file's seal); any other, or one whose executor file has
left the cache, is not used: the full path runs and records again. Records are written
atomically. ``DDPM_FAST_WARM_START=0`` turns warm starts off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import numpy as np

from .engine.table_chain import (
    ChainTables,
    TableChain,
    check_executor_file,
    executor_session,
    input_names,
)
from .engine.threads import MAX_THREADS, plan_threads, run_planned
from .errors import NonFiniteError
from .export.philox import keyed_noise
from .files import read_regular_file, write_atomically
from .images import chain_to_images
from .machine import StaleEntry, cache_dir, mark_used, prune_cache, sha256_of
from .options import EXECUTOR_ENV, check_int
from .output import Output, file_sha256, write_samples
from .version import source_digest

log = logging.getLogger("ddpm_fast.warm_start")

ENV = "DDPM_FAST_WARM_START"
FORMAT = "warm-start-3"  # bump when a record's content or meaning changes
FOLDER = "warm-starts"
MAX_RECORDS = 16  # the most recently used are kept
# sample's options that the warm start applies itself, or that name the output: not in the key.
APPLIED = ("num", "seed", "batch_size", "threads", "out", "keep_shards", "run", "command")


def warm_key(args: argparse.Namespace) -> str | None:
    """The record key of a ``sample`` command, or None where it cannot start warm (a GPU, the
    reference, another dtype or executor, an ONNX file, several processes, a folder checkpoint,
    a batch size measured on the device, a classifier, or warm starts turned off)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    executor = args.cpu_executor or os.environ.get(EXECUTOR_ENV) or "auto"
    if (
        args.onnx is not None
        or args.reference
        or args.dtype != "fp32"
        or executor == "torch"
        or args.device not in (None, "cpu")
        or args.batch_size == "auto"
        or getattr(args, "classifier", None) is not None  # guided: the engine's PyTorch step
        or int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        return None
    from .default_model import ASSET

    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else ASSET
    if not checkpoint.is_file():
        return None
    options = {k: v for k, v in vars(args).items() if k not in APPLIED}
    parts = {
        "format": FORMAT,
        "checkpoint": [str(checkpoint.resolve()), file_sha256(checkpoint)],
        "options": options,
        "executor": executor,
        "source": source_digest(),
        "torch": _version("torch"),
    }
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _paths(key: str) -> tuple[Path, Path]:
    folder = cache_dir() / FOLDER
    return folder / f"{key}.json", folder / f"{key}.npz"


def _digest(entry: dict) -> str:
    """The SHA-256 of a record's fields but its own digest, in a canonical JSON form."""
    fields = {k: v for k, v in entry.items() if k != "sha256"}
    return sha256_of(json.dumps(fields, sort_keys=True, default=list).encode())


def record(key: str, engine, spec, run: dict) -> None:
    """After a ``sample`` on the CPU: keep what a warm start of ``key`` needs, where its chain
    (``spec``) ran on ONNX Runtime from an executor file in the cache. ``run``: what the output
    recorded, but the seed. Best effort: a cache that cannot be written only logs."""
    chain = engine.ort_chain(spec)
    if chain is None:
        return
    shape = list(engine.image_shape())
    executor_file = chain.executor_file(tuple(shape[1:]))
    cache = cache_dir().resolve()
    if cache not in executor_file.resolve().parents:
        return  # exported into a private folder (the cache is not writable): gone at exit
    meta, tables = _paths(key)
    try:
        meta.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "format": FORMAT,
            "key": key,
            # Relative to the cache: a cache folder moved or copied whole keeps its records.
            "executor_file": str(executor_file.resolve().relative_to(cache)),
            "executor_key": chain.sessions.key(executor_file),
            "tables_sha256": chain.tables.save(tables),
            "image_shape": shape,
            "auto_normalize": engine.diffusion.auto_normalize,
            "run": run,
        }
        entry = json.loads(json.dumps(entry, default=list))  # as find() will read it
        entry["sha256"] = _digest(entry)
        write_atomically(meta, json.dumps(entry).encode())
    except OSError as error:
        log.info("cannot record a warm start in %s: %s", meta.parent, error)
        return
    prune_cache(meta.parent, "*.json", MAX_RECORDS, (".npz",))


class WarmStart:
    """A recorded chain, run as the engine would run it (its thread plans, ``TableChain``)."""

    def __init__(self, entry: dict, tables: ChainTables):
        self.executor_file = cache_dir() / entry["executor_file"]
        self.executor_key = entry["executor_key"]
        self.image_shape = tuple(entry["image_shape"])
        self.auto_normalize = bool(entry["auto_normalize"])
        self.run_identity = entry["run"]
        self._sessions: dict[tuple, object] = {}
        self._lock = threading.Lock()  # the batch split's parts ask at once
        self.chain = TableChain(tables, self._session)
        self._governors: dict = {}  # per batch shape, as the engine's chains keep them

    @classmethod
    def find(cls, key: str | None) -> WarmStart | None:
        """The record of ``key``, if there is one that is verifiably what ``key`` names: its
        fields as written (their digest), its tables as written (theirs), and an executor file
        sealed for the key the record names, of its image size and inputs, whose bytes are the
        sealed ones. Any other is skipped (the full path runs and records again), with one
        warning line where the record itself is damaged; a missing or damaged executor file is
        the engine's to export again, and to say so."""
        if key is None:
            return None
        meta, tables_path = _paths(key)
        try:
            text = read_regular_file(meta)
        except OSError:  # none yet, or a cache that is not a folder
            return None
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                raise ValueError("not a record of this version")
            if entry.get("key") != key or entry.get("sha256") != _digest(entry):
                raise ValueError("its fields are not those it was written with")
            tables = ChainTables.load(tables_path, entry["tables_sha256"])
            found = cls(entry, tables)
        except Exception as error:  # truncated, garbled, edited: skipped and recorded again
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning(
                "ignoring the warm start record %s (%s); running the full path", meta, reason
            )
            return None
        try:
            seal = check_executor_file(found.executor_file, found.executor_key)
        except StaleEntry as why:  # pruned, or damaged: the engine exports it again
            log.info("ignoring the warm start record %s: %s", meta, why)
            return None
        names = input_names(tables.carries_x0_prev, tables.self_condition)
        if seal["image_hw"] != list(found.image_shape[1:]) or seal["inputs"] != names:
            log.warning(
                "ignoring the warm start record %s (its executor file is for other images or "
                "inputs); running the full path",
                meta,
            )
            return None
        mark_used(meta)
        mark_used(found.executor_file)  # the engine's file, which its cache prunes too
        return found

    def _session(self, shape: tuple[int, ...], threads: int):
        key = (shape[0], threads)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = executor_session(
                    self.executor_file, self.executor_key, threads, shape[0]
                )
            return self._sessions[key]

    def _run(self, x: np.ndarray, seed: int, indices: range, threads, on_step) -> np.ndarray:
        """One batch's chain under the engine's thread plan (``Engine._run_on_cpu``)."""
        shape = tuple(x.shape)
        plan = plan_threads(
            batch=shape[0],
            flops_per_sample=None,
            threads=threads,
            thread_invariant=lambda n: self.chain.thread_invariant(shape, n),
            split_min_flops=0,
        )

        def run(rows: slice, threads_now, rows_on_step) -> np.ndarray:
            part = range(indices.start + rows.start, indices.start + rows.stop)
            return self.chain.run(x[rows], seed, part, threads_now, rows_on_step)

        return run_planned(
            plan, run, shape, on_step, self._governors, np.concatenate, lambda count: None
        )

    def batches(
        self, num: int, start: int, seed: int, batch: int, threads: int | None
    ) -> Iterator[tuple[range, np.ndarray]]:
        """Yield (sample indices, images NCHW float32 in [0, 1]) one batch at a time, with a
        progress bar in steps as ``Pipeline.sample_batches``'."""
        from tqdm.auto import tqdm

        steps = self.chain.tables.steps
        with tqdm(total=math.ceil(num / batch) * steps, desc="sampling", unit="step") as bar:
            for first in range(0, num, batch):
                indices = range(start + first, start + min(first + batch, num))
                x = keyed_noise(seed, indices, 0, self.image_shape)
                x = self._run(x, seed, indices, threads, lambda k: bar.update())
                bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
                if bad.any():
                    raise NonFiniteError.in_chain(indices, np.flatnonzero(bad).tolist())
                yield indices, chain_to_images(x, self.auto_normalize)

    def sample_to(
        self, output: Output, args: argparse.Namespace, say: Callable[[str], None]
    ) -> None:
        """``sample``'s outputs, as ``Pipeline.sample_to`` writes them."""
        from .options import check_seed, resolve_batch_size

        seed = check_seed(check_int("seed", args.seed))
        threads = args.threads
        if threads is not None:
            threads = check_int("threads", threads, minimum=1, maximum=MAX_THREADS)
        batch = resolve_batch_size(args.num, args.batch_size)
        run = {**self.run_identity, "seed": seed}

        def draw(count: int, start: int):
            return self.batches(count, start, seed, batch, threads)

        write_samples(output, run, args.num, batch, draw, keep_shards=args.keep_shards, say=say)
