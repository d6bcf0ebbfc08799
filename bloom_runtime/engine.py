"""`load()` and `Engine`: a model on a device, with prefill/decode generation.

Generation is two phases. Prefill runs the whole left-padded prompt once,
writes every layer's keys/values into a preallocated `KVCache`, and computes
the head for the last position only. Each decode step then feeds one token per
row. Left padding keeps all rows aligned, so one `start` offset serves the batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, parallel
from .calibration import calibration_ids
from .config import INFO_ONLY_PRESETS, BloomConfig, preset
from .device import resolve
from .errors import CheckpointError, InputError
from .kv_cache import KVCache
from .model import Bloom, alibi_slopes
from .quant import (
    QuantSpec,
    int8_skeleton,
    quantize_model,
    replace_linears,
    spec_from_quantization_config,
)
from .sampling import Sampling, next_token
from .tokenizer import FILENAME as TOKENIZER_FILE
from .tokenizer import Tokenizer

TINY_DIR = Path(__file__).parent / "assets" / "tiny"
RANDOM_PREFIX = "random:"
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise InputError(f"dtype {name!r}: expected float32, bfloat16 or float16") from None


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a checkpoint directory, or a seeded random preset."""

    name: str
    config: BloomConfig
    directory: Path | None  # None for random presets

    @classmethod
    def resolve(cls, model: str | os.PathLike) -> ModelSource:
        text = os.fspath(model)
        if text == "tiny":
            return cls.resolve(TINY_DIR)
        if text.startswith(RANDOM_PREFIX):
            name = text.removeprefix(RANDOM_PREFIX)
            return cls(text, preset(name), None)
        directory = Path(text)
        if not directory.is_dir():
            raise CheckpointError(
                f"model {text!r}: not a directory, 'tiny', or 'random:<preset>'"
            )
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{directory}: no config.json")
        return cls(text, BloomConfig.from_json(config_path), directory)

    @property
    def quant_spec(self) -> QuantSpec | None:
        """How the checkpoint is quantized, from config.json; None for a float checkpoint."""
        raw = self.config.quantization_config
        if raw is None:
            return None
        return spec_from_quantization_config(raw, self.config.n_layer, f"{self.directory}/config.json")


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
) -> Engine:
    """Load a model ready to generate. See DESIGN.md for the meaning of each argument.

    `max_seq_len` bounds prompt + new tokens (default: the config's seq_length);
    `seed` seeds `random:<preset>` weights and the calibration windows;
    `calib_samples`/`calib_data` choose the calibration text for `quant`, which
    may also be a `QuantSpec` for recipes beyond the three names.

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
        engine = _load(model, torch_dtype, torch_device, quant, shard, max_seq_len, seed,
                       dict(samples=calib_samples, text_path=calib_data))
    except Exception as err:  # reported to every rank, then re-raised
        error = err
    parallel.agree(shard, error)
    return engine


def _load(model, dtype, device, quant, shard, max_seq_len, seed, calib) -> Engine:
    source = ModelSource.resolve(model)
    config, stored = source.config, source.quant_spec
    parallel.check_divisible(config, shard.world)
    if quant is not None and stored is not None:
        raise InputError(f"{source.name} is already quantized ({stored.scheme}); load it without quant=")
    if config.tp_size > 1:
        if config.tp_size != shard.world:
            raise CheckpointError(f"{source.name}: cut for tp={config.tp_size}, but running with "
                                  f"tp={shard.world}; launch torchrun --nproc_per_node {config.tp_size}")
        state = checkpoint.load_state(source.directory, config, dtype, device, stored, shard)
        return Engine(build_model(config, state, stored, shard), _tokenizer(source), max_seq_len, shard)
    if source.directory is None:
        if source.name.removeprefix(RANDOM_PREFIX) in INFO_ONLY_PRESETS:
            raise InputError(f"model {source.name!r} is too large to run here; use it with `info`")
        state = checkpoint.random_state(config, dtype, device, seed)
    else:
        state = checkpoint.load_state(source.directory, config, dtype, device, stored)
    tokenizer = _tokenizer(source)
    if quant is not None:
        full = build_model(config, state)
        spec = quant if isinstance(quant, QuantSpec) else QuantSpec.from_name(quant)
        ids = None
        if spec.needs_calibration:
            ids = calibration_ids(tokenizer, config.vocab_size, calib["samples"], seed=seed,
                                  text_path=calib["text_path"])
        quantize_model(full, spec, ids)
        state, stored = full.state_dict(), spec
        if shard.world == 1:
            return Engine(full, tokenizer, max_seq_len)
    if shard.world > 1:
        state = parallel.shard_state(state, shard)
    return Engine(build_model(config, state, stored, shard), tokenizer, max_seq_len, shard)


def build_model(
    config: BloomConfig,
    state: dict[str, torch.Tensor],
    spec: QuantSpec | None = None,
    shard: parallel.Shard = parallel.SINGLE,
) -> Bloom:
    """A `Bloom` (rank `shard.rank`'s part of it) whose parameters are `state`'s tensors, uncopied."""
    with torch.device("meta"):
        model = Bloom(config)
        if shard.world > 1:
            parallel.shard_skeleton(model, shard)
        if spec is not None:
            replace_linears(model, spec, lambda _name, linear: int8_skeleton(linear, spec))
        if spec is not None and spec.int8_head:
            rows = model.word_embeddings.weight.shape[0]
            model.word_embeddings.to_int8(torch.empty(rows, config.hidden_size, dtype=torch.int8),
                                          torch.empty(rows, 1), compute_dtype=state["ln_f.weight"].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    model.slopes = alibi_slopes(config.n_head).chunk(shard.world)[shard.rank].to(device)
    if shard.world > 1:
        parallel.attach_collectives(model)
    return model.eval().requires_grad_(False)


def _tokenizer(source: ModelSource) -> Tokenizer | None:
    if source.directory is None or not (source.directory / TOKENIZER_FILE).is_file():
        return None
    config = source.config
    return Tokenizer(source.directory / TOKENIZER_FILE, config.pad_token_id, config.eos_token_id)


class Engine:
    """A loaded model: full-sequence logits, and generation with a KV cache."""

    def __init__(
        self,
        model: Bloom,
        tokenizer: Tokenizer | None,
        max_seq_len: int | None = None,
        shard: parallel.Shard = parallel.SINGLE,
    ) -> None:
        self.model = model
        self.config: BloomConfig = model.config
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len or model.config.seq_length
        self.shard = shard
        self._cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.ln_f.weight.dtype  # the embedding may be int8

    @torch.inference_mode()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, S, V] in float32 on the CPU for every position, without a cache."""
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=0)
        return self.model(ids, mask).float().cpu()

    @torch.inference_mode()
    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, V] in float32 on the CPU at the last position only: what scoring a
        prompt's next token needs, without a [B, S, V] tensor (1 GB at 250k vocab, 1k tokens)."""
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=0)
        return self.model(ids, mask, last_only=True)[:, -1].float().cpu()

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """New tokens [B, max_new_tokens] (CPU int64); after a row's EOS the row holds pad ids."""
        steps = self.stream(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                            top_p, eos_token_id, seed)
        out = torch.full((torch.as_tensor(input_ids).shape[0], max_new_tokens), self.config.pad_token_id)
        for step, token in enumerate(steps):
            out[:, step] = token.cpu()
        return out

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [B] (on the device) as soon as they are chosen.

        Arguments as `generate`; the inputs are checked before the first step.
        Stops early once every row has produced `eos_token_id`.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        ids, mask = self._check_inputs(input_ids, attention_mask, extra=max_new_tokens)
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            seed = parallel.shared_seed(seed, self.shard)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        return self._steps(ids, mask, max_new_tokens, sampling, generator, eos_token_id)

    @torch.inference_mode()
    def _steps(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        generator: torch.Generator | None,
        eos_token_id: int | None,
    ) -> Iterator[torch.Tensor]:
        batch, prompt_len = ids.shape
        total = prompt_len + max_new_tokens
        cache = self._kv_cache(batch, total)
        full_mask = torch.ones(batch, total, dtype=mask.dtype, device=self.device)
        full_mask[:, :prompt_len] = mask
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        logits = self.model(ids, full_mask[:, :prompt_len], cache, 0, last_only=True)
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1].float(), sampling, generator)
            token = token.masked_fill(done, self.config.pad_token_id)
            yield token
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    return
            if step + 1 < max_new_tokens:
                pos = prompt_len + step
                logits = self.model(token[:, None], full_mask[:, : pos + 1], cache, pos, last_only=True)

    def _kv_cache(self, batch: int, length: int) -> KVCache:
        """The cache for this generation, reusing the last one when it is big enough."""
        if self._cache is None or not self._cache.fits(batch, length, self.dtype, self.device):
            self._cache = None  # free the old buffers before allocating new ones
            cfg = self.config
            self._cache = KVCache(
                cfg.n_layer, batch, self.model.h[0].self_attention.n_head, length,
                cfg.head_dim, self.dtype, self.device,
            )  # fmt: skip
        return self._cache

    def generate_text(self, prompts: list[str], max_new_tokens: int = 16, **sampling) -> list[str]:
        """Continuations of each prompt, decoded and cut at EOS."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer.json: pass token ids to generate() "
                             "(on the CLI: generate --token-ids '5 17 42')")
        ids, mask = self.tokenizer.encode_batch(prompts)
        sampling.setdefault("eos_token_id", self.config.eos_token_id)
        new = self.generate(ids, mask, max_new_tokens=max_new_tokens, **sampling)
        return [self.tokenizer.decode(row.tolist()) for row in new]

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, extra: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ids and mask and move them to the device; `extra` = tokens to come."""
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
            raise InputError(
                f"input_ids: expected a non-empty [batch, seq] integer tensor, got shape "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = torch.as_tensor(attention_mask)
            if mask.shape != ids.shape:
                raise InputError(
                    f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
                )
            if not ((mask == 0) | (mask == 1)).all():
                raise InputError("attention_mask: values must be 0 or 1")
        mask = mask.long()
        self._check_ids(ids, mask)
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise InputError("attention_mask: padding must be on the left (a 0 follows a 1)")
        if (mask.sum(dim=1) == 0).any():
            raise InputError("attention_mask: a row has no tokens (empty prompt)")
        if ids.shape[1] + extra > self.max_seq_len:
            raise InputError(
                f"prompt of {ids.shape[1]} tokens + {extra} new tokens exceeds the "
                f"maximum sequence length {self.max_seq_len}"
            )
        ids = ids.long().masked_fill(mask == 0, 0)  # any id under padding: it is never attended
        return ids.to(self.device), mask.to(self.device)

    def _check_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        real = ids[mask.bool()]
        bad = real[(real < 0) | (real >= self.config.vocab_size)]
        if bad.numel():
            raise InputError(
                f"input_ids: token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})"
            )
