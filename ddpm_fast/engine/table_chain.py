"""A chain of the engine's ONNX Runtime executor file, run with NumPy: no torch.

The executor file (``engine.onnx_executor``) takes each step's time row and coefficient row as
inputs, so a chain is the file plus its tables (``ChainTables``). ``TableChain`` runs it: the
engine's CPU chains (``OrtChain`` builds the tables with torch, then runs here) and the CLI's
warm start (``ddpm_fast.warm_start``, which loads the tables from its cache and never imports
torch) share this loop, its noise (``export.philox.step_noise``) and its sessions' options, so
both give the same bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..export.onnx_sampler import CPU, open_session
from ..export.philox import step_noise
from . import winograd

INPUTS = ("x_t", "time_row", "coef_row", "adds_noise", "noise")  # then x0_prev, x_self_cond


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

    def save(self, path: Path) -> None:
        """Write the tables to ``path`` (.npz), atomically."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    time_rows=self.time_rows,
                    coeffs=self.coeffs,
                    noise_on=self.noise_on,
                    flags=np.array([self.carries_x0_prev, self.self_condition]),
                )
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> ChainTables:
        """The tables ``save`` wrote (an error of NumPy or the OS for a file that is not)."""
        with np.load(path, allow_pickle=False) as data:
            tables = cls(
                np.ascontiguousarray(data["time_rows"], dtype=np.float32),
                np.ascontiguousarray(data["coeffs"], dtype=np.float32),
                np.asarray(data["noise_on"], dtype=bool),
                *(bool(flag) for flag in data["flags"]),
            )
        if not len(tables.time_rows) == len(tables.noise_on) == tables.steps > 0:
            raise ValueError(f"{path}: tables of different lengths")
        return tables


def executor_session(path: Path, threads: int, batch: int):
    """A CPU session of the executor file ``path`` on ``threads`` intra-op threads, its batch
    axis fixed to ``batch``; from the file's Winograd form where the batch is large enough for it
    (``winograd.session_file``)."""
    return open_session(winograd.session_file(path, batch), [CPU], threads=threads, batch=batch)


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
    ) -> np.ndarray:
        """The chain from x_T = ``x`` [B, C, H, W] float32 for the samples ``indices`` of
        ``seed`` (their noise: ``step_noise``); each step on the session with ``threads()``
        intra-op threads (a thread plan's governor may change it between steps)."""
        shape = tuple(x.shape)
        state = np.ascontiguousarray(x, dtype=np.float32)
        zeros = np.zeros_like(state)
        x0 = zeros
        noise = step_noise(seed, indices, shape[1:], self.tables.steps)
        for k in range(self.tables.steps):
            z = noise.of_step(k) if self.tables.noise_on[k] else zeros
            state, x0 = self.session(shape, threads()).run(None, self.feeds(state, x0, z, k))
            on_step(k + 1)
        return state
