"""Checkpoint files, read safely: what kind a file is (safetensors or torch, by structure),
reading either without unpickling arbitrary objects, and a family's network laid out against a
file's weights and checked before it holds them. ``checkpoints`` (single files) and
``diffusers_folder`` (diffusers folders) both read through here; it knows neither.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError

MAX_LISTED = 5
REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
TORCH_ZIP = b"PK\x03\x04"
PICKLE_PROTOCOLS = range(2, 6)  # torch's legacy (non-zip) format starts with PROTO n


def file_kind(path: Path) -> str:
    """ "safetensors" or "torch", decided by structure, not by a single byte: a safetensors file
    is an 8-byte little-endian header length n, then n bytes of JSON (an object, padded with
    spaces) within the file; torch files are zip archives or, in the legacy format, a pickle."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(n) if 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER) else b""
    if size < 9:
        raise CheckpointError(f"{path}: only {size} bytes; not a checkpoint (truncated?)")
    if header[:1] == b"{" and header.rstrip(b" ").endswith(b"}"):
        try:
            if isinstance(json.loads(header), dict):
                return "safetensors"
        except ValueError:
            pass
    if head[:4] == TORCH_ZIP or (head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS):
        return "torch"
    with open(path, "rb") as f:
        f.seek(8)
        looks_safetensors = f.read(1) == b"{"
    if looks_safetensors:
        raise CheckpointError(
            f"{path}: a safetensors header that does not fit the file ({size} bytes for a "
            f"header of {n}); truncated or corrupt"
        )
    raise CheckpointError(f"{path}: neither a PyTorch checkpoint nor a safetensors file")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors (on the CPU) and metadata; CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return tensors, metadata


def read_torch(path: Path) -> object:
    """A PyTorch file's contents, unpickling tensors and plain containers only
    (``weights_only=True``); CheckpointError naming the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and plain containers; "
                "ddpm-fast does not unpickle arbitrary objects (load it in its own library and "
                "save its state_dict)"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({message})"
        ) from None


def listing(items: list[str]) -> str:
    """``items`` comma-separated, the first MAX_LISTED of them and a count of the rest."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def check_weights(path: Path, network: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Raise one CheckpointError listing missing, unexpected, mis-shaped and non-finite weights."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [
        f"{k} {list(weights[k].shape)} (network: {list(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped: {listing(misshaped)}")
    if problems:
        config = getattr(network, "config", None)
        raise CheckpointError(f"{path}: does not fit the network {config}: " + "; ".join(problems))
    not_real = [f"{k} ({v.dtype})" for k, v in weights.items() if v.dtype not in REAL_DTYPES]
    if not_real:
        raise CheckpointError(f"{path}: weights that are not real floats: {listing(not_real)}")
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: NaN or infinite values in {listing(bad)}")


def weights_sha256(network: torch.nn.Module) -> str:
    """The SHA-256 of a network's state_dict: keys, dtypes, shapes and bytes (what a run
    manifest records of the weights that fixed its images)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(network.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_network(path: Path, family, config, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``family.Unet(config)`` holding ``weights``, checked against the weights first: the
    network is laid out on the meta device (no memory), its keys, shapes and dtypes compared
    with the file's, and only then given the weights, so a config that does not fit them (a
    crafted ``dim`` of 100000, say) is an error, not an allocation."""
    with torch.device("meta"):
        skeleton = family.Unet(config)
    check_weights(path, skeleton, weights)
    expected = skeleton.state_dict()
    # The network's dtypes (fp32), as load_state_dict's copy would give them.
    state = {k: v.to(expected[k].dtype).contiguous() for k, v in weights.items()}
    skeleton.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()]):
        network = family.Unet(config)  # a buffer outside the state_dict: build it for real
        network.load_state_dict(state, strict=True)
        return network
    return skeleton
