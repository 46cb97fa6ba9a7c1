"""What machine this is, for results files and for keys of what was measured on it; where its
cache folder is, and the checks that make a cache entry trusted only for the bytes it was made
with."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import stat
import tempfile
from pathlib import Path

from .files import read_regular_file

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


class StaleEntry(Exception):
    """A cache entry that is not verifiably the one its key names (missing, damaged, replaced or
    made for another key): the message says which file and why, in one line."""


def sha256_of(content: bytes) -> str:
    """The SHA-256 of ``content``, as hex."""
    return hashlib.sha256(content).hexdigest()


def read_checked(path: Path, sha256: str) -> bytes:
    """The bytes of ``path``, read once; StaleEntry unless their SHA-256 is ``sha256`` (so that
    what was checked is what the caller uses)."""
    try:
        content = read_regular_file(path)
    except OSError as error:
        raise StaleEntry(f"{path} does not read ({error.strerror or error})") from None
    if sha256_of(content) != sha256:
        raise StaleEntry(f"{path} is not the file its cache entry recorded ({len(content)} bytes)")
    return content


# Files whose bytes this process has hashed, by identity: a file is hashed once per process
# (an engine opens a session per thread count and batch size, and the warm start checks its file
# before its sessions open it). The identity holds the inode change time, which every write and
# every metadata change sets and which no call can set back.
_VERIFIED: dict[tuple, str] = {}


def file_identity(path: Path) -> tuple:
    """(path, device, inode, size, mtime, ctime) of the regular file ``path``; StaleEntry where
    it is none."""
    try:
        st = os.stat(path)
    except OSError as error:
        raise StaleEntry(f"{path} does not read ({error.strerror or error})") from None
    if not stat.S_ISREG(st.st_mode):
        raise StaleEntry(f"{path} is not a regular file")
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def check_file(path: Path, sha256: str) -> tuple:
    """StaleEntry unless the bytes of ``path`` hash to ``sha256`` (hashed once per process and
    version of the file); its identity, which a caller that then opens the file by path compares
    again afterwards (``same_file``), so that what was checked is what was opened."""
    identity = file_identity(path)
    if _VERIFIED.get(identity) != sha256:
        read_checked(path, sha256)
        same_file(path, identity, "while it was read")
        _VERIFIED[identity] = sha256
    return identity


def same_file(path: Path, identity: tuple, when: str) -> None:
    """StaleEntry where ``path`` is no longer the file of ``identity`` (replaced or written)."""
    if file_identity(path) != identity:
        raise StaleEntry(f"{path} changed {when}")


def writable_folder(folder: Path) -> OSError | None:
    """None where a file can be created in ``folder`` (made if missing), else the error: tried,
    not guessed from permission bits, which do not stop root."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
    except OSError as error:
        return error
    os.close(fd)
    os.unlink(probe)
    return None


def mark_used(path: Path) -> None:
    """Touch a cache entry on use, so that ``prune_cache`` keeps it longest."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # no companion, or another process pruned it first
        return 0


def prune_cache(
    folder: Path,
    pattern: str,
    keep: int,
    suffixes: tuple[str, ...] = (),
    max_bytes: int | None = None,
) -> None:
    """Remove all but the ``keep`` most recently used files of ``folder`` that match ``pattern``
    (with their companions of the same stem and ``suffixes``), and, where ``max_bytes`` is given,
    the older ones beyond that many bytes, companions counted; the most recent is always kept.
    Best effort: another process pruning at once, or a read-only cache, only logs. A session
    already open keeps its file's content (ONNX Runtime reads it whole); a process about to open
    a removed file exports it again."""
    try:
        entries = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for rank, entry in enumerate(entries):
            group = [entry, *(entry.with_suffix(suffix) for suffix in suffixes)]
            total += sum(_size(path) for path in group)
            over_budget = max_bytes is not None and total > max_bytes and rank > 0
            if rank >= keep or over_budget:
                for path in group:
                    path.unlink(missing_ok=True)
    except OSError as error:
        log.info("cannot prune %s: %s", folder, error)
