"""Read BLOOM checkpoints in every layout Hugging Face publishes, and make random ones.

Layouts: `model.safetensors`; `model-*.safetensors` + `model.safetensors.index.json`;
`pytorch_model.bin`; `pytorch_model-*.bin` + `pytorch_model.bin.index.json`.
Tensor names may carry the `transformer.` prefix; `lm_head.weight` is the tied
embedding and is skipped. Also ours: a quantized checkpoint (compressed-tensors,
int8 weights + scales) and a cut one (`rank_<r>/model.safetensors` per
tensor-parallel rank, verified against `manifest.json`).

Tensors are read one at a time from memory-mapped files and cast straight to
the target dtype and device, so peak memory is the model plus one tensor.
Pickled `.bin` files are opened with `weights_only=True` only.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import BloomConfig
from .errors import CheckpointError
from .parallel import SINGLE, Shard, shard_shape
from .quant import QuantSpec, quantized_linear_names

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MANIFEST = "manifest.json"
_PREFIX = "transformer."
_TIED = "lm_head.weight"


def parameter_shapes(config: BloomConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a BLOOM checkpoint must hold, by canonical name, with its shape."""
    h, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "word_embeddings.weight": (v, h),
        "word_embeddings_layernorm.weight": (h,),
        "word_embeddings_layernorm.bias": (h,),
    }
    linears = {
        "self_attention.query_key_value": (3 * h, h),
        "self_attention.dense": (h, h),
        "mlp.dense_h_to_4h": (4 * h, h),
        "mlp.dense_4h_to_h": (h, 4 * h),
    }
    for i in range(config.n_layer):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"h.{i}.{norm}.weight"] = (h,)
            shapes[f"h.{i}.{norm}.bias"] = (h,)
        for name, (out_f, in_f) in linears.items():
            shapes[f"h.{i}.{name}.weight"] = (out_f, in_f)
            shapes[f"h.{i}.{name}.bias"] = (out_f,)
    shapes["ln_f.weight"] = (h,)
    shapes["ln_f.bias"] = (h,)
    return shapes


def canonical_name(name: str) -> str:
    return name.removeprefix(_PREFIX)


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


# What a tensor in a checkpoint is: a float parameter (cast to the model's dtype),
# an int8 weight or zero point (kept as is), or a quantization scale (float32, > 0).
FLOAT, INT8, SCALE = "float", "int8", "scale"


def expected_tensors(config: BloomConfig, spec: QuantSpec | None = None) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, kind) of every tensor a (possibly quantized) checkpoint must hold."""
    expected = {name: (shape, FLOAT) for name, shape in parameter_shapes(config).items()}
    if spec is None:
        return expected
    int8_modules = quantized_linear_names(config.n_layer, spec)
    if spec.int8_head:
        expected["word_embeddings.weight_scale"] = ((config.vocab_size, 1), SCALE)
        expected["word_embeddings.weight"] = (expected["word_embeddings.weight"][0], INT8)
    for module in int8_modules:
        out_features = expected[f"{module}.weight"][0][0]
        expected[f"{module}.weight"] = (expected[f"{module}.weight"][0], INT8)
        expected[f"{module}.weight_scale"] = ((out_features, 1), SCALE)
        if spec.activation in ("static", "static-asym"):
            expected[f"{module}.input_scale"] = ((1,), SCALE)
        if spec.activation == "static-asym":
            expected[f"{module}.input_zero_point"] = ((1,), INT8)
    return expected


def validate_tensor(name: str, tensor: torch.Tensor, shape: tuple, kind: str, path: Path) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if kind == INT8:
        if tensor.dtype != torch.int8:
            raise CheckpointError(f"{path}: {name} has dtype {tensor.dtype}, expected torch.int8")
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


def verify_manifest(directory: Path, shard: Shard) -> None:
    """Check a cut checkpoint before use: world size, every file present at its size, our sha256."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files, tp_size = manifest["files"], manifest["tp_size"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: missing or invalid manifest ({err!r})") from None
    if tp_size != shard.world:
        raise CheckpointError(f"{directory}: cut for tp={tp_size}, but running with tp={shard.world}; "
                              f"launch torchrun --nproc_per_node {tp_size}")
    for name, entry in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{path}: lists {name}, which is missing")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, manifest says {entry['size']}")
    own = rank_file(directory, shard.rank).relative_to(directory).as_posix()
    if own not in files:
        raise CheckpointError(f"{path}: has no entry for {own}")
    if sha256_of(directory / own) != files[own]["sha256"]:
        raise CheckpointError(f"{directory / own}: sha256 does not match {path}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def load_state(
    directory: Path,
    config: BloomConfig,
    dtype: torch.dtype | None,
    device: torch.device,
    spec: QuantSpec | None = None,
    shard: Shard = SINGLE,
) -> dict[str, torch.Tensor]:
    """All tensors of a float, quantized or cut checkpoint, validated, on `device`.

    Float parameters are cast to `dtype` (None keeps theirs); int8 tensors and
    scales keep theirs. A cut checkpoint (config tp_size > 1) yields the part
    of rank `shard.rank`, after its manifest is verified.
    """
    expected = expected_tensors(config, spec)
    files = weight_files(directory)
    if config.tp_size > 1:
        verify_manifest(directory, shard)
        expected = {n: (shard_shape(n, shape, shard.world), kind) for n, (shape, kind) in expected.items()}
        files = [rank_file(directory, shard.rank)]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        for raw_name, tensor in iter_tensors(path):
            name = canonical_name(raw_name)
            if raw_name == _TIED or name not in expected:
                continue  # the tied head, or buffers older exports carry
            shape, kind = expected[name]
            validate_tensor(name, tensor, shape, kind, path)
            target = {FLOAT: dtype or tensor.dtype, SCALE: torch.float32, INT8: torch.int8}[kind]
            state[name] = tensor.to(device=device, dtype=target)
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{directory}: tensor {missing[0]!r}{more} missing from the checkpoint")
    return state


def random_state(
    config: BloomConfig, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Seeded random weights in BLOOM's initialisation (N(0, 0.02) matrices, unit norms).

    Filled in place in the target dtype, so random:bloom-7b1 in bfloat16 needs
    its 14 GB and no float32 copy.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in parameter_shapes(config).items():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if len(shape) == 2:
            tensor.normal_(0.0, 0.02, generator=generator)
        elif name.endswith(".weight"):  # the 1-D weights are layer-norm gains
            tensor.fill_(1.0)
        else:
            tensor.zero_()
        state[name] = tensor
    return state
