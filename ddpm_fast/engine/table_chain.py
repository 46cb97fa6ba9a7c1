"""A chain of the engine's ONNX Runtime executor file, run with NumPy: no torch.

The executor file (``engine.onnx_executor``) takes each step's time row and coefficient row as
inputs, so a chain is the file plus its tables (``ChainTables``). ``TableChain`` runs it: the
engine's CPU chains (``OrtChain`` builds the tables with torch, then runs here) and the CLI's
warm start (``ddpm_fast.warm_start``, which loads the tables from its cache and never imports
torch) share this loop, its noise (``export.philox.step_noise``) and its sessions' options, so
both give the same bits.

Both also share the check that makes a cached executor file trusted: beside ``executor-KEY.onnx``
its export writes a seal, ``executor-KEY.json``, naming the key the file was made for, its image
size and inputs, and the SHA-256 of the bytes of the file and of its Winograd form
(``write_seal``). Before a session opens a file, its bytes are hashed and checked against the
seal (once per process and version of the file: ``machine.check_file``), and the file's identity
(inode, size, modification and inode change times) is compared again once the session has
opened it by path (``executor_session``): what was checked is what runs. A file that is
not verifiably the one its key names is ``StaleEntry``, which the engine answers by exporting it
again and the warm start by running the full path.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export.onnx_sampler import CPU, open_session
from ..export.philox import step_noise
from ..files import read_regular_file, write_atomically
from ..machine import StaleEntry, check_file, read_checked, same_file, sha256_of
from . import winograd

INPUTS = ("x_t", "time_row", "coef_row", "adds_noise", "noise")  # then x0_prev, x_self_cond
SEAL_FORMAT = "executor-seal-1"
SEAL_SUFFIX = ".json"  # beside executor-KEY.onnx: executor-KEY.json (pruned with it)


def input_names(carries_x0_prev: bool, self_condition: bool) -> list[str]:
    """The executor file's inputs, in order."""
    names = list(INPUTS)
    if carries_x0_prev:
        names.append("x0_prev")
    if self_condition:
        names.append("x_self_cond")
    return names


@dataclass
class ChainTables:
    """One chain's rows, as the executor file reads them: ``time_rows`` [steps, D] float32 (every
    block's time projection), ``coeffs`` [steps, len(samplers.ROW)] float32, ``noise_on``
    [steps] bool (which steps add noise), and which of the optional inputs it feeds."""

    time_rows: np.ndarray
    coeffs: np.ndarray
    noise_on: np.ndarray
    carries_x0_prev: bool
    self_condition: bool

    @property
    def steps(self) -> int:
        return len(self.coeffs)

    def save(self, path: Path) -> str:
        """Write the tables to ``path`` (.npz), atomically; the SHA-256 of the bytes written."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            time_rows=self.time_rows,
            coeffs=self.coeffs,
            noise_on=self.noise_on,
            flags=np.array([self.carries_x0_prev, self.self_condition]),
        )
        content = buffer.getvalue()
        write_atomically(path, content)
        return sha256_of(content)

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> ChainTables:
        """The tables ``save`` wrote (an error of NumPy or the OS for a file that is not); where
        ``sha256`` is given, StaleEntry unless the file's bytes are those ``save`` wrote."""
        content = read_regular_file(path) if sha256 is None else read_checked(path, sha256)
        with np.load(io.BytesIO(content), allow_pickle=False) as data:
            tables = cls(
                np.ascontiguousarray(data["time_rows"], dtype=np.float32),
                np.ascontiguousarray(data["coeffs"], dtype=np.float32),
                np.asarray(data["noise_on"], dtype=bool),
                *(bool(flag) for flag in data["flags"]),
            )
        if not len(tables.time_rows) == len(tables.noise_on) == tables.steps > 0:
            raise ValueError(f"{path}: tables of different lengths")
        return tables


def seal_path(path: Path) -> Path:
    """Where the seal of the executor file ``path`` is kept."""
    return path.with_suffix(SEAL_SUFFIX)


def write_seal(path: Path, key: str, image_hw: tuple[int, int], inputs: list[str]) -> None:
    """Seal the executor file ``path`` (and its Winograd form, where there is one) as the file of
    ``key``: the SHA-256 of each file's bytes, with the image size and inputs it was made for.
    Written last, atomically: a file whose seal is in place is complete."""
    files = [path, winograd.variant_path(path)]
    seal = {
        "format": SEAL_FORMAT,
        "key": key,
        "image_hw": list(image_hw),
        "inputs": list(inputs),
        "files": {f.name: sha256_of(f.read_bytes()) for f in files if f.is_file()},
    }
    write_atomically(seal_path(path), json.dumps(seal, indent=1).encode())


def read_seal(path: Path, key: str) -> dict:
    """The seal of the executor file ``path``; StaleEntry unless it is one, made for ``key``."""
    where = seal_path(path)
    try:
        seal = json.loads(read_regular_file(where))
    except OSError as error:
        raise StaleEntry(f"{path} has no seal ({error.strerror or error})") from None
    except ValueError:
        raise StaleEntry(f"{where} is not a seal") from None
    if not isinstance(seal, dict) or seal.get("format") != SEAL_FORMAT:
        raise StaleEntry(f"{where} is not a seal of this version")
    files = seal.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise StaleEntry(f"{where} is not a seal")
    if seal.get("key") != key or path.name not in files:
        raise StaleEntry(f"{where} seals another file than {path.name}")
    missing = [name for name in files if not path.with_name(name).is_file()]
    if missing:
        raise StaleEntry(f"{path.with_name(missing[0])} is missing")
    return seal


def session_file(path: Path, seal: dict, batch: int) -> Path:
    """The file a session of ``batch`` images opens: the Winograd form where the seal names one
    and the batch is large enough for it (``winograd.MIN_BATCH``), else the file itself."""
    form = winograd.variant_path(path)
    if batch >= winograd.MIN_BATCH and form.name in seal["files"]:
        return form
    return path


def check_executor_file(path: Path, key: str) -> dict:
    """The seal of ``path`` after checking every file it names (a warm start's check before it
    commits to the file); StaleEntry for the first that fails."""
    seal = read_seal(path, key)
    for name, sha256 in seal["files"].items():
        check_file(path.with_name(name), sha256)
    return seal


def executor_session(path: Path, key: str, threads: int, batch: int):
    """A CPU session of the executor file ``path`` sealed for ``key`` (StaleEntry where it is not
    verifiably that file) on ``threads`` intra-op threads, its batch axis fixed to ``batch``;
    from the file's Winograd form where the batch is large enough for it."""
    seal = read_seal(path, key)
    source = session_file(path, seal, batch)
    identity = check_file(source, seal["files"][source.name])
    session = open_session(source, [CPU], threads=threads, batch=batch)
    same_file(source, identity, "while its session opened")
    return session


class TableChain:
    """``tables`` run on the sessions that ``session(shape, threads)`` gives (one per input shape
    and thread count). ``invariant``: where the answers of ``thread_invariant`` are kept (the
    owner's, per executor file)."""

    def __init__(
        self,
        tables: ChainTables,
        session: Callable[[tuple[int, ...], int], object],
        invariant: dict | None = None,
    ):
        self.tables = tables
        self.session = session
        self.invariant = {} if invariant is None else invariant

    def feeds(self, x: np.ndarray, x0: np.ndarray, z: np.ndarray, k: int) -> dict:
        t = self.tables
        feeds = {
            "x_t": x,
            "time_row": t.time_rows[k : k + 1],
            "coef_row": t.coeffs[k],
            "adds_noise": t.noise_on[k : k + 1],
            "noise": z,
        }
        if t.carries_x0_prev:
            feeds["x0_prev"] = x0
        if t.self_condition:
            feeds["x_self_cond"] = x0
        return feeds

    def thread_invariant(self, shape: tuple[int, ...], threads: int) -> bool:
        """Whether the session on ``threads`` threads gives the same bits as on one, for this
        input shape (checked once with random inputs)."""
        key = (tuple(shape), threads)
        if key not in self.invariant:
            generator = np.random.default_rng(0)
            x = generator.standard_normal(shape, dtype=np.float32)
            feeds = self.feeds(x, x * 0.5, generator.standard_normal(shape, dtype=np.float32), 0)
            outputs = [self.session(shape, n).run(None, feeds) for n in (threads, 1)]
            same = all(np.array_equal(a, b) for a, b in zip(*outputs, strict=True))
            self.invariant[key] = same
        return self.invariant[key]

    def run(
        self,
        x: np.ndarray,
        seed: int,
        indices: range,
        threads: Callable[[], int],
        on_step: Callable[[int], None],
        noise=None,
    ) -> np.ndarray:
        """The chain from x_T = ``x`` [B, C, H, W] float32 for the samples ``indices`` of
        ``seed`` (their noise: ``step_noise``, unless ``noise.of_step(k)`` gives it); each step
        on the session with ``threads()`` intra-op threads (a thread plan's governor may change
        it between steps)."""
        shape = tuple(x.shape)
        state = np.ascontiguousarray(x, dtype=np.float32)
        zeros = np.zeros_like(state)
        x0 = zeros
        if noise is None:
            noise = step_noise(seed, indices, shape[1:], self.tables.steps)
        for k in range(self.tables.steps):
            z = noise.of_step(k) if self.tables.noise_on[k] else zeros
            state, x0 = self.session(shape, threads()).run(None, self.feeds(state, x0, z, k))
            on_step(k + 1)
        return state
