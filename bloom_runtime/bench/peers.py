"""The engines ours is compared with, and the checkpoint they all load.

Every engine must run the same weights: a checkpoint directory is used as it is,
and a `random:<preset>` is written once into the cache as a float32 Hugging Face
checkpoint. Peers' own conversions (CTranslate2, llama.cpp's GGUF) are cached beside it, keyed by
the checkpoint's files. Heavy imports happen only when a peer is made, so the CLI
can list the peers cheaply.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import InputError

DEFAULT_CACHE = Path.home() / ".cache" / "bloom-runtime" / "peers"
PEERS = ("hf", "ctranslate2", "llamacpp")


def shared_checkpoint(model: str, seed: int, cache: Path) -> str:
    """A directory every engine can load: the model itself, or a random preset written once to `cache`."""
    from ..loader import Source

    source = Source.resolve(model)
    if source.directory is not None:
        if source.layout.quantization_config is not None or source.layout.cut:
            raise InputError("--compare needs a float, uncut checkpoint (peers load it as given)")
        return str(source.directory)
    target = cache / f"{model.replace(':', '-')}-seed{seed}"
    if not (target / "config.json").is_file():
        _materialize(model, seed, target)
    return str(target)


def _materialize(model: str, seed: int, target: Path) -> None:
    """Write a random preset as a float32 HF checkpoint (like the preset, with no tokenizer)."""
    from ..files import staged_output
    from ..loader import load
    from ..weights import write_checkpoint

    engine = load(model, dtype="float32", seed=seed)
    with staged_output(target, [], force=True) as staging:
        write_checkpoint(engine, staging)


def make_peer(name: str, directory: Path, dtype: str, quant: str | None, device: str, cache: Path,
              threads: int, max_tokens: int):
    """A runner for peer `name` on `directory`, in the closest setting to ours (dtype, int8, int4)."""
    from .. import device as devices
    from ..loader import parse_dtype
    from .runners import CTranslate2Runner, HFRunner

    torch_device = devices.resolve(device)
    if name == "hf":
        return HFRunner(directory, parse_dtype(dtype), torch_device)
    if name == "llamacpp":
        from .llamacpp import LlamaCppRunner

        return LlamaCppRunner(directory, cache / fingerprint(directory), dtype, quant, threads, max_tokens)
    compute = "int8" if quant else str(parse_dtype(dtype)).removeprefix("torch.")  # its only low-bit type
    return CTranslate2Runner(directory, cache / fingerprint(directory), compute, threads, torch_device)


def fingerprint(directory: Path) -> str:
    """A cache key that changes when the checkpoint's files do (names, sizes, times)."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{directory.name}-{hashlib.sha256(repr(stats).encode()).hexdigest()[:12]}"


