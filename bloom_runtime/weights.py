"""`bloom-runtime weights quant|cut`: write prepared checkpoints, safely.

Every writer builds the whole output in a staging directory beside the destination
and renames it into place at the end (`files.staged_output`), so an interrupted run
leaves no half-written checkpoint; it never writes into its input, and it refuses to
replace an existing output unless `force` is given.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, parallel
from .config import read_json
from .engine import Engine
from .errors import InputError
from .files import staged_output, write_json
from .layout import Layout
from .loader import Source, load, skeleton
from .quant import QuantSpec, extra_tensors, to_quantization_config
from .tokenizer import CONFIG_FILES as TOKENIZER_CONFIG_FILES
from .tokenizer import FILENAME as TOKENIZER_FILE


def write_checkpoint(engine: Engine, directory: Path, layout: Layout | None = None) -> None:
    """The engine's weights as a Hugging Face layout (`transformer.` names, tied head omitted)."""
    checkpoint.write_state(engine.model.state_dict(), directory / checkpoint.SAFETENSORS,
                           extra_tensors(engine.model))
    config = {**engine.config.to_dict(), **(layout or Layout()).to_dict(),
              "torch_dtype": str(engine.dtype).removeprefix("torch.")}
    write_json(directory / "config.json", config)


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
    source = Source.resolve(input_dir)
    if source.quant_spec is not None:
        raise InputError(f"--input {input_dir} is already quantized")
    with staged_output(output_dir, [source.directory], force) as staging:
        engine = load(source.name, dtype=dtype, quant=spec, seed=seed,
                      calib_samples=calib_samples, calib_data=calib_data, pack=False)  # to write
        text = str(calib_data) if calib_data else "embedded calibration text"
        provenance = dict(calib_samples=calib_samples, seed=seed,
                          calib_data=text if engine.tokenizer else "random token ids")
        config = to_quantization_config(spec, skeleton(source.config), **provenance)
        write_checkpoint(engine, staging, Layout(quantization_config=config))
        _copy_tokenizer(source.directory, staging)
    return Path(output_dir)


def cut_checkpoint(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, tp: int, force: bool = False
) -> Path:
    """Split a float or quantized checkpoint into `tp` rank files plus a sha256 manifest.

    Tensors keep their stored dtypes; the guide's cut_float and cut_quant are both this.
    """
    source = Source.resolve(input_dir)
    if source.directory is None:
        raise InputError(f"--input {input_dir}: expected a checkpoint directory")
    if source.layout.cut:
        raise InputError(f"--input {input_dir} is already cut for tp={source.layout.tp_size}")
    if not isinstance(tp, int) or tp < 2:
        raise InputError(f"--tp must be 2 or more, got {tp}")
    parallel.check_divisible(source.config, tp)
    model = skeleton(source.config, source.quant_spec)
    state = source.read(model, None, torch.device("cpu"), rank=0, seed=0)
    needs = sum(t.nbytes for t in state.values())  # the ranks hold it about once
    with staged_output(output_dir, [source.directory], force, needs) as staging:
        for rank in tqdm(range(tp), desc="cutting", unit="rank"):
            part = parallel.shard_state(model, state, parallel.Shard(rank, tp))
            checkpoint.write_state(part, checkpoint.rank_file(staging, rank))
        raw = read_json(source.directory / "config.json")
        layout = Layout(tp, source.layout.quantization_config)
        write_json(staging / "config.json", {**raw, **layout.to_dict()})
        _copy_tokenizer(source.directory, staging)
        checkpoint.write_manifest(staging, tp)
    return Path(output_dir)


def _copy_tokenizer(source: Path | None, destination: Path) -> None:
    for name in (TOKENIZER_FILE, *TOKENIZER_CONFIG_FILES):
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """On-disk size of a checkpoint's weight files."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))
