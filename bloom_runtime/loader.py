"""`load()`: from a model name to an `Engine`, in one pipeline.

    source   resolve "tiny" / "random:<preset>" / a directory: its BloomConfig, its
             Layout (cut? quantized?) and its tokenizer
    skeleton build the model on the meta device, as the source stores it: the
             scheme's modules swapped in, cut for this rank if the files are cut
    expect   derive every tensor the source must hold (name, shape, kind) from it
    read     read and validate those tensors (or draw seeded random ones)
    quantize quantize-on-load runs the whole float model (calibration needs it)
    shard    cut full tensors for this rank, by the same rules as `weights cut`
    assign   put the tensors into the target skeleton, uncopied; make the buffers

BLOOM's shapes and names exist once, in model.py; what each tensor is, once, in
the modules' `STORED` tables. Nothing here spells a tensor name.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from . import checkpoint, hugepages, parallel
from .calibration import calibration_ids
from .config import INFO_ONLY_PRESETS, BloomConfig, preset, read_json
from .device import resolve
from .embedded import TINY_DIR
from .engine import Engine
from .errors import CheckpointError, InputError
from .kernels import Decision, KernelOwner, selector
from .layout import Layout
from .model import Bloom
from .quant import QuantSpec, from_quantization_config, quantize_model, quantized_skeleton
from .tensors import INT, declarations
from .tokenizer import FILENAME as TOKENIZER_FILE
from .tokenizer import Tokenizer

RANDOM_PREFIX = "random:"
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def canonical_dtype(name: str) -> str:
    """torch's name for a dtype given by any of its names ("bf16" -> "bfloat16"): what peers and
    reports are told. An unknown name passes through (argparse's choices refuse it)."""
    return str(DTYPES[name]).removeprefix("torch.") if name in DTYPES else name


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise InputError(f"dtype {name!r}: expected float32, bfloat16 or float16") from None


@dataclasses.dataclass(frozen=True)
class Source:
    """Where weights come from: a checkpoint directory, or a seeded random preset."""

    name: str
    config: BloomConfig
    layout: Layout
    directory: Path | None  # None for random presets

    @classmethod
    def resolve(cls, model: str | os.PathLike) -> Source:
        text = os.fspath(model)
        if text == "tiny":
            return cls.resolve(TINY_DIR)
        if text.startswith(RANDOM_PREFIX):
            return cls(text, preset(text.removeprefix(RANDOM_PREFIX)), Layout(), None)
        directory = Path(text)
        if not directory.is_dir():
            raise CheckpointError(f"model {text!r}: not a directory, 'tiny', or 'random:<preset>'")
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: no config.json")
        raw = read_json(config_path)
        where = str(config_path)
        return cls(text, BloomConfig.from_dict(raw, where), Layout.from_dict(raw, where), directory)

    @property
    def quant_spec(self) -> QuantSpec | None:
        """How the checkpoint is quantized; None for a float checkpoint."""
        raw = self.layout.quantization_config
        if raw is None:
            return None
        return from_quantization_config(raw, skeleton(self.config), f"{self.directory}/config.json")

    def tokenizer(self) -> Tokenizer | None:
        if self.directory is None or not (self.directory / TOKENIZER_FILE).is_file():
            return None
        return Tokenizer(self.directory / TOKENIZER_FILE, self.config.pad_token_id, self.config.eos_token_id)

    def read(self, held: Bloom, dtype: torch.dtype | None, device: torch.device, rank: int, seed: int
             ) -> dict[str, torch.Tensor]:
        """The tensors of `held` (the skeleton of what this source stores), validated, on `device`."""
        expected = expected_tensors(held)
        if self.directory is None:
            if self.name.removeprefix(RANDOM_PREFIX) in INFO_ONLY_PRESETS:
                raise InputError(f"model {self.name!r} is too large to run here; use it with `info`")
            return random_state(expected, dtype, device, seed)
        files = [checkpoint.rank_file(self.directory, rank)] if self.layout.cut else \
            checkpoint.weight_files(self.directory)
        return checkpoint.read_state(files, expected, dtype, device, self.directory)


def skeleton(config: BloomConfig, spec: QuantSpec | None = None, shard: parallel.Shard = parallel.SINGLE,
             dtype: torch.dtype = torch.float32) -> Bloom:
    """The model on the meta device: `spec`'s modules swapped in, cut for `shard`'s rank."""
    with torch.device("meta"):
        model = Bloom(config)
        if spec is not None:
            quantized_skeleton(model, spec, dtype)
        parallel.shard_skeleton(model, shard)
    return model


def expected_tensors(model: Bloom) -> dict[str, checkpoint.Expected]:
    """name -> (shape, kind, dtype) of every tensor a checkpoint of `model` must hold."""
    rules = declarations(model)
    return {name: checkpoint.Expected(tuple(p.shape), rules[name][0].kind, p.dtype)
            for name, p in model.named_parameters()}


def kernel_decisions(model: str | os.PathLike, dtype: str | torch.dtype = "float32",
                     quant: str | None = None, device: str | torch.device = "cpu") -> list[Decision]:
    """Which kernel serves each matmul problem of `model` (its shapes only: no weights are read)
    with these settings on this machine, and why: what `load` would build."""
    source = Source.resolve(model)
    torch_dtype, where = parse_dtype(dtype), resolve(device)
    spec = QuantSpec.from_name(quant) if quant else source.quant_spec
    held = skeleton(source.config, spec, dtype=torch_dtype).to(torch_dtype)
    decisions = {}
    for owner in held.modules():
        problem = owner.kernel_problem(torch_dtype) if isinstance(owner, KernelOwner) else None
        if problem is not None:
            problem = dataclasses.replace(problem, device=where.type)
            decisions.setdefault(problem.key(), selector().decide(problem))
    return list(decisions.values())


def parameter_count(config: BloomConfig) -> int:
    """Parameters of the float network (the tied head counted once)."""
    return sum(p.numel() for p in skeleton(config).parameters())


def random_state(expected: dict[str, checkpoint.Expected], dtype: torch.dtype | None, device: torch.device,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in BLOOM's initialisation (N(0, 0.02) matrices, unit norms).

    Filled in place in the target dtype, so random:bloom-7b1 in bfloat16 needs
    its 14 GB and no float32 copy.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, (shape, kind, _) in expected.items():
        if kind == INT:
            raise InputError(f"random weights are float; {name} is quantized")
        tensor = torch.empty(shape, dtype=dtype or torch.float32, device=device)
        if len(shape) == 2:
            tensor.normal_(0.0, 0.02, generator=generator)
        elif name.endswith(".weight"):  # the 1-D weights are layer-norm gains
            tensor.fill_(1.0)
        else:
            tensor.zero_()
        state[name] = tensor
    return state


def assemble(model: Bloom, state: dict[str, torch.Tensor], device: torch.device, shard: parallel.Shard
             ) -> Bloom:
    """Put `state` into the skeleton `model` (tensors assigned, not copied), ready to run."""
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    if shard.world > 1:
        parallel.attach_collectives(model)
    return model.eval().requires_grad_(False)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Which text calibrates quantize-on-load: `samples` windows from `text_path` (default:
    the embedded text), drawn with `seed`."""

    samples: int = 16
    text_path: str | os.PathLike | None = None
    seed: int = 0


def build_model(source: Source, dtype: torch.dtype, device: torch.device, quant: QuantSpec | None,
                shard: parallel.Shard, seed: int = 0, calibration: Calibration = Calibration()) -> Bloom:
    """Rank `shard.rank`'s model: the pipeline in this module's docstring."""
    config, layout, stored = source.config, source.layout, source.quant_spec
    parallel.check_divisible(config, shard.world)
    if quant is not None and stored is not None:
        raise InputError(f"{source.name} is already quantized ({stored.linear}); load it without quant=")
    if layout.cut:
        checkpoint.verify_manifest(source.directory, shard.world, shard.rank)
    held = skeleton(config, stored, shard if layout.cut else parallel.SINGLE, dtype)
    state = source.read(held, dtype, device, shard.rank, seed)
    if quant is not None:
        ids = None
        if quant.needs_calibration:
            ids = calibration_ids(source.tokenizer(), config.vocab_size, calibration.samples,
                                  seed=calibration.seed, text_path=calibration.text_path)
        full = assemble(held, state, device, parallel.SINGLE)
        quantize_model(full, quant, ids)
        state = full.state_dict()
    target = skeleton(config, quant or stored, shard, dtype)
    if not layout.cut:
        state = parallel.shard_state(target, state, shard)
    return assemble(target, state, device, shard)


def load(
    model: str | os.PathLike = "tiny",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    quant: str | QuantSpec | None = None,
    tp: int | None = None,
    max_seq_len: int | None = None,
    seed: int = 0,
    calib_samples: int = 16,
    calib_data: str | os.PathLike | None = None,
    pack: bool = True,
) -> Engine:
    """Load a model ready to generate.

    `model`: "tiny" (the embedded model), a checkpoint directory (Hugging Face,
    quantized or cut), or "random:<preset>" (seeded random weights). `dtype`:
    float32 / bfloat16 / float16. `device`: cpu, cuda[:i], npu[:i]. `quant`: a
    scheme name (w8a8, w8a8-static, w8a16, ...) or a `QuantSpec`, to quantize on
    load; a quantized checkpoint needs none. `tp`: tensor-parallel size (None:
    torchrun's world size, else 1). `max_seq_len` bounds prompt + new tokens
    (default: the config's seq_length); `seed` seeds random weights and
    calibration; `calib_samples` / `calib_data` choose the calibration text.
    `pack`: build every matmul's kernel now, as this machine's probe chose it
    (`Bloom.prepare_kernels`; a packed layout takes its weight over); False keeps
    plain `weight` parameters to read or change (quantized modules still choose
    their kernel on first use).

    With tp > 1 (or under torchrun) every rank calls this; a rank that fails
    makes all of them raise, before any computes.
    """
    torch_dtype = parse_dtype(dtype)
    world = parallel.world_from_env() if tp is None else tp
    if not isinstance(world, int) or world < 1:
        raise InputError(f"tp must be a positive integer, got {tp!r}")
    torch_device = parallel.local_device(resolve(device)) if world > 1 else resolve(device)
    shard = parallel.init(world, torch_device)
    error, engine = None, None
    try:
        source = Source.resolve(model)
        spec = QuantSpec.from_name(quant) if isinstance(quant, str) else quant
        calibration = Calibration(calib_samples, calib_data, seed)
        built = build_model(source, torch_dtype, torch_device, spec, shard, seed, calibration)
        if pack:
            built.prepare_kernels(torch_dtype)
        hugepages.collapse([*built.parameters(), *built.buffers()])
        engine = Engine(built, source.tokenizer(), max_seq_len, shard)
    except Exception as err:  # reported to every rank, then re-raised
        error = err
    parallel.agree(shard, error)
    return engine
