"""Files written whole or not at all, and read only where they are files.

Every file ddpm-fast writes (images, shards, .npz, manifests, checkpoints, ONNX and cache
files) goes to a temporary name beside its target, is flushed to disk and renamed into place,
so a crash or a full disk never leaves half a file. The temporary name is this process's own
(pid and a random part), so two runs or two ranks writing the same target never write into
each other's temporary. What ddpm-fast reads back of its own (cache entries, seals, records,
shards, manifests) is read only where it is a regular file: a FIFO or a device in its place
would block or never end. Standard library only: the torch-free paths (``sample --onnx``, the
warm start) use it too."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A hidden temporary name beside ``path`` that no other process picks."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomically(path: Path, content: bytes | Callable[[Path], None]) -> None:
    """Write ``content`` (bytes, or a function that writes the file it is given) to ``path``
    through a temporary name, flushed to disk before the rename makes it the file."""
    tmp = temporary_name(path)
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``; an OSError ("not a regular file") where it is a FIFO, a device or a
    folder. Opened without blocking, so a FIFO's open returns at once to be refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1  # closed with f
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)
