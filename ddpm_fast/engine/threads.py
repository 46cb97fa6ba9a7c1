"""How the engine uses the CPU's cores, so that a chain degrades gracefully when other processes
share them.

PyTorch runs each op's parallel region on every OpenMP thread and waits for the last one. When
another process holds a core, every region waits for a thread the scheduler has parked, so one
busy process beside a chain can make it several times slower (figures: docs/benchmarks.md,
"Under load"). Two plans avoid that wait:

- **split** (large networks: at least ``SPLIT_MIN_FLOPS`` per sample and step): the batch is cut
  into one part per core, and each part runs its whole chain single-threaded in its own Python
  thread. The parts never wait for each other, so a parked thread delays only its part, and the
  ops are large enough that the interpreter lock is rarely the bottleneck. Each part's images are
  the same whatever the load (the cut depends on the batch and the cores only).
- **whole** (small networks, where a Python thread per part would queue on the interpreter lock):
  one chain on ``cores`` threads, with a governor that times every step and drops to one thread
  while that is faster (the machine is loaded), probing the other count now and then. It only
  adapts where the network gives the same bits on one thread as on all of them (checked once per
  shape): a seed must give the same images whatever the load. Elsewhere the count stays fixed.

``threads=N`` (the API's and the CLI's) pins N intra-op threads for the whole batch and nothing
adapts; so does OMP_NUM_THREADS in the environment (torchrun sets it to 1 per process).

The module imports no torch (the CLI's warm start plans its ONNX Runtime chains without it):
what sets PyTorch's thread count imports it where it runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Per-sample FLOPs of one forward from which the batch is split across cores. The embedded digits
# model (43 MFLOP) is overhead-bound: its Python threads would queue on the interpreter lock. The
# seed CIFAR-10 U-Net (3.7 GFLOP) runs its parts side by side at full speed.
SPLIT_MIN_FLOPS = 500e6
MAX_THREADS = 4096  # a bound for threads=, far above any machine's cores
PROBE_EVERY = 25  # steps between probes of the other thread count, after a switch
MAX_PROBE_EVERY = 200  # doubled after each probe that changes nothing, up to this
PROBE_STEPS = 3  # steps timed per probe
HISTORY = 5  # recent step times kept per thread count; their median decides
JUMP = 2.0  # a step this many times the current count's median starts a probe at once
LOSING = 1.2  # a probe step this many times the current count's median ends the probe


def _cgroup_cores(
    proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max or v1 cfs_quota), or None."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        candidates = []
        if controllers == "":  # cgroup v2
            candidates.append((root / path / "cpu.max", None))
        elif "cpu" in controllers.split(","):
            base = root / controllers / path
            candidates.append((base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
        for quota_file, period_file in candidates:
            try:
                if period_file is None:
                    quota, period = quota_file.read_text().split()
                else:
                    quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            except (OSError, ValueError):
                continue
            if quota not in ("max", "-1") and int(period) > 0:
                return int(quota) / int(period)
    return None


def available_cores() -> tuple[int, str]:
    """The cores this process may use (its CPU affinity, capped by a cgroup quota), and how
    that was found."""
    try:
        affinity = len(os.sched_getaffinity(0))
        why = f"{affinity} in this process's CPU affinity"
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
        why = f"{affinity} CPUs"
    quota = _cgroup_cores()
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"{why}, capped by a cgroup quota of {quota:g} cores"
    return affinity, why


@dataclass(frozen=True)
class ThreadPlan:
    """How one chain of one batch uses the cores: ``workers`` parts of the batch side by side,
    each on one thread, or (``workers`` 1) the whole batch on ``threads`` intra-op threads,
    dropped to one while that is faster where ``adaptive``."""

    threads: int
    workers: int
    adaptive: bool
    reason: str

    def describe(self) -> str:
        if self.workers > 1:
            how = f"batch split in {self.workers} parts, one thread each"
        else:
            how = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
            if self.adaptive:
                how += ", 1 while the machine is loaded (timed per step)"
        return f"{how} ({self.reason})"


def pinned_threads(threads: int | None) -> tuple[int, str] | None:
    """A thread count the user fixed (``threads=`` or OMP_NUM_THREADS), or None."""
    if threads is not None:
        return threads, f"threads={threads}"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    return None


def plan_threads(
    *,
    batch: int,
    flops_per_sample: float | None,
    threads: int | None,
    thread_invariant: Callable[[int], bool] | None,
    split_min_flops: float | None = None,
) -> ThreadPlan:
    """The plan for a chain of ``batch`` samples of a network of ``flops_per_sample`` per
    forward. ``thread_invariant(n)``: whether the network gives the same bits on n threads as on
    one (called only when the answer matters; None: not known yet, as for ``info``).
    ``split_min_flops``: the size from which a batch is split (default ``SPLIT_MIN_FLOPS``; 0
    where each step is one call that releases the interpreter lock, as ONNX Runtime's: then
    ``flops_per_sample`` may be None, not measured)."""
    pinned = pinned_threads(threads)
    if pinned is not None:
        return ThreadPlan(pinned[0], 1, False, f"pinned by {pinned[1]}")
    cores, why = available_cores()
    if cores == 1:
        return ThreadPlan(1, 1, False, f"1 core: {why}")
    if split_min_flops is None:
        split_min_flops = SPLIT_MIN_FLOPS
    where = f"{cores} cores: {why}"
    if flops_per_sample is not None:
        where += f"; {flops_per_sample / 1e6:.0f} MFLOP per sample"
    if batch > 1 and (split_min_flops == 0 or flops_per_sample >= split_min_flops):
        return ThreadPlan(1, min(cores, batch), False, where)
    if thread_invariant is None:
        return ThreadPlan(cores, 1, True, f"{where}; adapts if 1 thread keeps the bits (per chain)")
    if not thread_invariant(cores):
        reason = f"{cores} cores: {why}; fixed: 1 thread would change the last bits"
        return ThreadPlan(cores, 1, False, reason)
    return ThreadPlan(cores, 1, True, where)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``count`` inside, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


class ThreadGovernor:
    """Times each step and sets the thread count for the next one: ``high`` or 1,
    whichever has the lower median of its recent steps. The other count is probed for
    ``PROBE_STEPS`` steps every ``interval`` steps (``PROBE_EVERY`` after a switch, doubled after
    each probe that changes nothing: a losing probe costs slow steps), and at once when a step
    takes ``JUMP`` times the usual (load just arrived). A probe step ``LOSING`` times slower than
    the count it would replace ends the probe at once: on a quiet machine each probe then costs
    one slow step. ``set_threads`` applies a count (default: PyTorch's, which the engine's chains
    read); ``clock`` is injectable for tests."""

    def __init__(
        self,
        high: int,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = _set_torch_threads,
    ):
        self.high = high
        self.clock = clock
        self.set_threads = set_threads
        self.current = high
        self.times = {high: deque(maxlen=HISTORY), 1: deque(maxlen=HISTORY)}
        self.probe_left = 0
        self.since_probe = 0
        self.interval = PROBE_EVERY
        self.before_probe = high
        self.switches = 0
        self.last: float | None = None

    def _set(self, count: int) -> None:
        if count != self.current:
            self.current = count
            self.set_threads(count)

    def _median(self, count: int) -> float | None:
        times = self.times[count]
        return statistics.median(times) if times else None

    def start(self) -> None:
        """A new chain begins: its first step is not timed (it includes one-off work), and a
        probe the last chain left unfinished is dropped."""
        self.last = None
        if self.probe_left:
            self.probe_left = 0
            self.current = self.before_probe
        self.set_threads(self.current)

    def step_done(self) -> None:
        now = self.clock()
        if self.last is None:
            self.last = now
            return
        elapsed, self.last = now - self.last, now
        usual = self._median(self.current)
        self.times[self.current].append(elapsed)
        if self.probe_left:
            self.probe_left -= 1
            before = self._median(self.before_probe)
            if self.probe_left == 0 or (before is not None and elapsed > LOSING * before):
                self.probe_left = 0  # done, or clearly losing: one slow step is enough
                self._decide()
            return
        self.since_probe += 1
        jumped = usual is not None and elapsed > JUMP * usual
        if self.since_probe >= self.interval or jumped or self._median(self._other()) is None:
            self.since_probe = 0
            self.probe_left = PROBE_STEPS
            self.times[self._other()].clear()  # the probe measures the machine as it is now
            self.before_probe = self.current
            self._set(self._other())

    def _other(self) -> int:
        return 1 if self.current == self.high else self.high

    def _decide(self) -> None:
        medians = {n: self._median(n) for n in self.times}
        known = {n: m for n, m in medians.items() if m is not None}
        self._set(min(known, key=known.get))
        if self.current == self.before_probe:
            self.interval = min(2 * self.interval, MAX_PROBE_EVERY)
        else:
            self.interval = PROBE_EVERY
            self.switches += 1


def run_planned(
    plan: ThreadPlan,
    run: Callable[[slice, Callable[[], int], Callable[[int], None]], Any],
    shape: tuple[int, ...],
    on_step: Callable[[int], None],
    governors: dict,
    concat: Callable[[list], Any] | None = None,
    set_threads: Callable[[int], None] = _set_torch_threads,
) -> Any:
    """One batch's chain (inputs of ``shape``) under ``plan``. ``run(rows, threads, on_step)``
    runs those rows of the batch, each step on ``threads()`` intra-op threads (asked at every
    step: a governor may change it). A split plan runs its parts side by side (``run_split``,
    joined by ``concat``); an adaptive one runs under the governor of this shape, kept in
    ``governors`` (what it learnt lasts), which applies its counts through ``set_threads``."""
    if plan.workers > 1:
        part = lambda rows, part_on_step: run(rows, lambda: 1, part_on_step)  # noqa: E731
        return run_split(part, shape[0], plan.workers, on_step, concat)
    whole = slice(0, shape[0])
    if not plan.adaptive:
        return run(whole, lambda: plan.threads, on_step)
    governor = governors.setdefault(shape, ThreadGovernor(plan.threads, set_threads=set_threads))
    governor.start()

    def timed_on_step(k: int) -> None:
        governor.step_done()
        on_step(k)

    return run(whole, lambda: governor.current, timed_on_step)


def run_split(
    run_part: Callable[[slice, Callable[[int], None]], Any],
    batch: int,
    workers: int,
    on_step: Callable[[int], None],
    concat: Callable[[list], Any] | None = None,
) -> Any:
    """``run_part(rows, on_step)`` for ``workers`` consecutive row ranges of the batch, each in
    its own thread; the parts joined by ``concat``. ``on_step(k)`` is called once step k is done
    by every part. An error in one part stops the others and is raised here. Default: PyTorch
    parts, each worker on one PyTorch thread without autograd, joined by ``torch.cat``; with a
    ``concat`` given (NumPy parts) nothing of torch is touched."""
    if concat is not None:
        return concat(_run_parts(run_part, batch, workers, on_step))
    import torch

    def torch_part(rows: slice, part_on_step: Callable[[int], None]) -> torch.Tensor:
        torch.set_num_threads(1)  # OpenMP's thread count is per thread: this one's too
        with torch.no_grad():  # grad mode is per thread
            return run_part(rows, part_on_step)

    with torch_threads(1):
        return torch.cat(_run_parts(torch_part, batch, workers, on_step))


def _run_parts(run_part, batch: int, workers: int, on_step: Callable[[int], None]) -> list:
    bounds = [batch * i // workers for i in range(workers + 1)]
    parts = [slice(bounds[i], bounds[i + 1]) for i in range(workers)]
    outputs: list = [None] * workers
    errors: list[BaseException] = []
    done = [0] * workers
    reported = [0]
    lock = threading.Lock()
    stop = threading.Event()

    class Stopped(Exception):
        pass

    def progress(i: int, k: int) -> None:
        if stop.is_set():
            raise Stopped
        with lock:
            done[i] = k
            ready = min(done)
            new = range(reported[0] + 1, ready + 1)
            reported[0] = max(reported[0], ready)
        for step in new:
            on_step(step)

    def work(i: int) -> None:
        try:
            outputs[i] = run_part(parts[i], lambda k: progress(i, k))
        except Stopped:
            pass
        except BaseException as error:  # re-raised in the calling thread
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C: the parts stop at their next step
        stop.set()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]
    return outputs
