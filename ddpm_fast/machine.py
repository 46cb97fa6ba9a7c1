"""What machine this is, for results files and for keys of what was measured on it."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger("ddpm_fast.cache")


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


CACHE_ENV = "DDPM_FAST_CACHE_DIR"


def cache_dir() -> Path:
    """Where ddpm-fast keeps what it measured and exported: $DDPM_FAST_CACHE_DIR, else
    $XDG_CACHE_HOME/ddpm-fast, else ~/.cache/ddpm-fast."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm-fast"


def mark_used(path: Path) -> None:
    """Touch a cache entry on use, so that ``prune_cache`` keeps it longest."""
    with contextlib.suppress(OSError):
        os.utime(path)


def prune_cache(folder: Path, pattern: str, keep: int, suffixes: tuple[str, ...] = ()) -> None:
    """Remove all but the ``keep`` most recently used files of ``folder`` that match ``pattern``
    (with their companions of the same stem and ``suffixes``). Best effort: another process
    pruning at once, or a read-only cache, only logs. A session already open keeps its file's
    content (ONNX Runtime reads it whole); a process about to open a removed file exports it
    again."""
    try:
        entries = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for entry in entries[keep:]:
            entry.unlink(missing_ok=True)
            for suffix in suffixes:
                entry.with_suffix(suffix).unlink(missing_ok=True)
    except OSError as error:
        log.info("cannot prune %s: %s", folder, error)
