"""`bloom-runtime weights quant|cut`: write prepared checkpoints, safely.

Every writer builds the whole output in a temporary directory beside the
destination and renames it into place at the end, so an interrupted run leaves
no half-written checkpoint; it never writes into its input, and it refuses to
replace an existing output unless `force` is given.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import checkpoint, parallel
from .engine import Engine, ModelSource, load
from .errors import InputError
from .quant import QuantSpec, to_quantization_config
from .tokenizer import CONFIG_FILES as TOKENIZER_CONFIG_FILES
from .tokenizer import FILENAME as TOKENIZER_FILE

PREFIX = "transformer."


@contextmanager
def staged_output(output: str | os.PathLike, inputs: list[Path | None], force: bool) -> Iterator[Path]:
    """A fresh temporary directory that becomes `output` when the block succeeds."""
    output = Path(output).resolve()
    for source in filter(None, inputs):
        source = source.resolve()
        if output == source or source in output.parents or output in source.parents:
            raise InputError(f"output {output} overlaps the input {source}; inputs are never written")
    if output.exists() and not force:
        raise InputError(f"output {output} exists; pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_checkpoint(engine: Engine, directory: Path, quantization_config: dict | None) -> None:
    """The engine's weights as a Hugging Face layout (`transformer.` names, tied head omitted)."""
    state = {PREFIX + name: t.contiguous() for name, t in engine.model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = engine.config.to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config["torch_dtype"] = str(engine.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def quantize_checkpoint(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    spec: QuantSpec,
    calib_samples: int = 16,
    calib_data: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Quantize a float checkpoint into a compressed-tensors one that loads without `quant=`."""
    source = ModelSource.resolve(input_dir)
    if source.quant_spec is not None:
        raise InputError(f"--input {input_dir} is already quantized")
    with staged_output(output_dir, [source.directory], force) as staging:
        engine = load(source.name, dtype=dtype, quant=spec, seed=seed,
                      calib_samples=calib_samples, calib_data=calib_data)
        text = str(calib_data) if calib_data else "embedded calibration text"
        provenance = dict(calib_samples=calib_samples, seed=seed,
                          calib_data=text if engine.tokenizer else "random token ids")
        write_checkpoint(engine, staging, to_quantization_config(spec, engine.config.n_layer, **provenance))
        _copy_tokenizer(source.directory, staging)
    return Path(output_dir)


def cut_checkpoint(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, tp: int, force: bool = False
) -> Path:
    """Split a float or quantized checkpoint into `tp` rank files plus a sha256 manifest.

    Tensors keep their stored dtypes; the guide's cut_float and cut_quant are both this.
    """
    source = ModelSource.resolve(input_dir)
    config = source.config
    if source.directory is None:
        raise InputError(f"--input {input_dir}: expected a checkpoint directory")
    if config.tp_size != 1:
        raise InputError(f"--input {input_dir} is already cut for tp={config.tp_size}")
    if not isinstance(tp, int) or tp < 2:
        raise InputError(f"--tp must be 2 or more, got {tp}")
    parallel.check_divisible(config, tp)
    spec = source.quant_spec
    state = checkpoint.load_state(source.directory, config, None, torch.device("cpu"), spec)
    with staged_output(output_dir, [source.directory], force) as staging:
        for rank in tqdm(range(tp), desc="cutting", unit="rank"):
            part = parallel.shard_state(state, parallel.Shard(rank, tp))
            path = checkpoint.rank_file(staging, rank)
            path.parent.mkdir()
            save_file({PREFIX + n: t.contiguous() for n, t in part.items()}, path, metadata={"format": "pt"})
        raw = json.loads((source.directory / "config.json").read_text(encoding="utf-8"))
        raw["tp_size"] = tp
        (staging / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False))
        _copy_tokenizer(source.directory, staging)
        _write_manifest(staging, tp)
    return Path(output_dir)


def _write_manifest(directory: Path, tp: int) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    entries = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": checkpoint.sha256_of(p)}
        for p in files
    }
    manifest = {"format": "bloom-runtime-cut", "tp_size": tp, "files": entries}
    (directory / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=2))


def _copy_tokenizer(source: Path | None, destination: Path) -> None:
    for name in (TOKENIZER_FILE, *TOKENIZER_CONFIG_FILES):
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """On-disk size of a checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))
