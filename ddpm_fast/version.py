import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def source_digest() -> str:
    """The sha256 of the Python files of ddpm_fast and its export package. Caches of what the
    code computes (the engine's executor files, the CLI's warm starts) are keyed by it: the version
    alone would not change in a checkout being worked on, or in a patched install."""
    from . import export

    digest = hashlib.sha256()
    for folder in (Path(__file__).resolve().parent, *export.__path__):
        for path in sorted(Path(folder).rglob("*.py")):
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
