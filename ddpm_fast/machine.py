"""What machine this is, for results files and for keys of what was measured on it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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
