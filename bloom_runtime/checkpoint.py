"""Read BLOOM checkpoints in every layout Hugging Face publishes, and make random ones.

Layouts: `model.safetensors`; `model-*.safetensors` + `model.safetensors.index.json`;
`pytorch_model.bin`; `pytorch_model-*.bin` + `pytorch_model.bin.index.json`.
Tensor names may carry the `transformer.` prefix; `lm_head.weight` is the tied
embedding and is skipped. Also ours: a quantized checkpoint (compressed-tensors)
and a cut one (`rank_<r>/model.safetensors` per tensor-parallel rank, verified
against `manifest.json`).

What tensors a checkpoint must hold is not written here: the loader derives it
from a skeleton model (see loader.py). This module reads, validates and writes
files. Tensors are read one at a time from memory-mapped files and cast straight
to the target dtype and device, so peak memory is the model plus one tensor.
Pickled `.bin` files are opened with `weights_only=True` only.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .files import write_json
from .kernels.int8 import ALIGNMENT
from .tensors import FLOAT, INT, SCALE

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MANIFEST = "manifest.json"
PREFIX = "transformer."  # Hugging Face's names: `transformer.h.0....`; ours drop it
_TIED = "lm_head.weight"


def canonical_name(name: str) -> str:
    return name.removeprefix(PREFIX)


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face checkpoint directory, in load order."""
    if (directory / MANIFEST).is_file():
        return sorted(directory.glob("rank_*/" + SAFETENSORS))
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PICKLE_INDEX, PICKLE)):
        index = directory / index_name
        if index.is_file():
            return _files_from_index(index)
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(
        f"{directory}: no weights found; expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
        f"{PICKLE} or {PICKLE_INDEX}"
    )


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid index with a 'weight_map' ({err!r})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{index}: lists shard {name!r}, which is missing")
    return [index.parent / name for name in files]


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read lazily from a memory map."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors ({err})") from None
        return
    try:
        # Only the zip format can be memory-mapped; legacy pickles are read whole.
        state = torch.load(
            path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
        )
    except Exception as err:  # the unpickler raises many types for a corrupt file
        raise CheckpointError(f"{path}: unreadable or truncated ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    yield from state.items()


class Expected(NamedTuple):
    """What a checkpoint must hold under one name (from the skeleton; see loader.py)."""

    shape: tuple[int, ...]
    kind: str  # tensors.FLOAT, INT or SCALE
    dtype: torch.dtype  # for INT: the exact integer dtype; else the skeleton's


def validate_tensor(name: str, tensor: torch.Tensor, expected: Expected, path: Path) -> None:
    """Raise a `CheckpointError` naming `path` and `name` unless `tensor` is what is expected:
    the shape, an integer payload's exact dtype, and finite floats (scales also > 0)."""
    shape, kind, dtype = expected
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if kind == INT:
        if tensor.dtype != dtype:
            raise CheckpointError(f"{path}: {name} has dtype {tensor.dtype}, expected {dtype}")
        return
    if not tensor.is_floating_point():
        raise CheckpointError(f"{path}: {name} has dtype {tensor.dtype}, expected a float dtype")
    # min/max propagate NaN and show inf, and unlike isfinite() allocate nothing tensor-sized.
    low, high = tensor.aminmax()
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise CheckpointError(f"{path}: {name} contains NaN or inf")
    if kind == SCALE and not low > 0:
        raise CheckpointError(f"{path}: {name} holds a scale <= 0 ({float(low)})")


def rank_file(directory: Path, rank: int) -> Path:
    """Where rank `rank`'s tensors live in a cut (tensor-parallel) checkpoint."""
    return directory / f"rank_{rank}" / SAFETENSORS


def verify_manifest(directory: Path, world: int, rank: int) -> None:
    """Check a cut checkpoint before use: world size, every file present at its size, our sha256."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, tp_size = manifest["files"], manifest["tp_size"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: missing or invalid manifest ({err!r})") from None
    if tp_size != world:
        raise CheckpointError(f"{directory}: cut for tp={tp_size}, but running with tp={world}; "
                              f"launch torchrun --nproc_per_node {tp_size}")
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{path}: lists {name}, which is missing")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, manifest says {entry['size']}")
    own = rank_file(directory, rank).relative_to(directory).as_posix()
    if own not in files:
        raise CheckpointError(f"{path}: has no entry for {own}")
    if sha256_of(directory / own) != files[own]["sha256"]:
        raise CheckpointError(f"{directory / own}: sha256 does not match {path}")


def write_manifest(directory: Path, tp: int) -> None:
    """List every file under `directory` with its size and sha256 (what `verify_manifest` checks)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    entries = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)}
               for p in files}  # fmt: skip
    write_json(directory / MANIFEST, {"format": "bloom-runtime-cut", "tp_size": tp, "files": entries})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def read_state(
    files: list[Path], expected: dict[str, Expected], dtype: torch.dtype | None, device: torch.device,
    where: Path,
) -> dict[str, torch.Tensor]:
    """Every expected tensor from `files`, validated, on `device`: floats cast to `dtype` (None
    keeps theirs), scales to float32, integer payloads as stored. `where` names the checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for raw_name, tensor in iter_tensors(path):
            name = canonical_name(raw_name)
            if raw_name == _TIED or name not in expected:
                continue  # the tied head, or buffers older exports carry
            validate_tensor(name, tensor, expected[name], path)
            kind = expected[name].kind
            target = {FLOAT: dtype or tensor.dtype, SCALE: torch.float32, INT: tensor.dtype}[kind]
            tensor = tensor.to(device=device, dtype=target)
            # a memory-mapped tensor starts where the file put it; vector kernels may need more
            state[name] = tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r}{more} missing from the checkpoint")
    return state


def write_state(state: dict[str, torch.Tensor], path: Path,
                outside: dict[str, torch.Tensor] | None = None) -> None:
    """Tensors as one safetensors file, under Hugging Face's names (`transformer.` prefix), plus
    `outside` under the full names given (what other readers need and the runtime skips)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + n: t.contiguous() for n, t in state.items()} | (outside or {})
    save_file(tensors, path, metadata={"format": "pt"})
