"""The fused decode layer: a block's decode rows through one native call (`decode_layer`) give what the
block's modules give, bit for bit, for every native product it can hold; where a module would do
more than its kernel's call (a static scale, a hook), the block runs its modules.

Each case decodes one step of three left-padded rows after a prefill, twice from the same cache: once
as the model runs it, once with the fused call refused, and compares logits and caches exactly.
"""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import hf_model, save

import bloom_runtime as br
from bloom_runtime.kernels import native
from bloom_runtime.kv_cache import KVCache
from bloom_runtime.model import Block

VARIANTS = ("portable", "avx2", "avx512")
CASES = [  # (quant, role, forced kernel): every native product decode_layer takes
    *((None, "dense16", f"native-{v}") for v in (*VARIANTS, "avx512-bf16")),
    (None, "dense16", "native-tiled-avx512-bf16"),
    *(("w8a8", "w8a8", f"native-{v}") for v in (*VARIANTS, "avx512-vnni")),
    ("w8a8", "w8a8", "native-tiled-avx512-vnni"),
    *(("w4a8", "w4a8", f"native-{v}") for v in (*VARIANTS, "avx512-vnni")),
    *(("w4a8", "w4a8", f"native-tiled-{v}") for v in ("avx2", "avx512", "avx512-vnni")),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Heads of 64 (the native cache attends whole vectors) and widths of whole int4 groups of 128."""
    return save(hf_model(seed=7, vocab_size=300, hidden_size=256, n_head=4, n_layer=2),
                tmp_path_factory.mktemp("fused-layer"))


def load(checkpoint, monkeypatch, quant: str | None, role: str, kernel: str) -> br.Engine:
    why = native.unavailable(kernel.removeprefix("native-").removeprefix("tiled-"))
    if why is not None:
        pytest.skip(f"{kernel}: {why}")
    monkeypatch.setenv("BLOOM_RUNTIME_KERNELS", f"{role}={kernel}")
    return br.load(checkpoint, dtype="bfloat16", quant=quant, max_seq_len=32)


def decode_step(model, fused: bool, monkeypatch) -> tuple[torch.Tensor, KVCache, int]:
    """Prefill three rows of 7 tokens (the second left-padded by 2), then one decode step at column 7:
    its logits, the cache and how many blocks ran fused."""
    config, generator = model.config, torch.Generator().manual_seed(3)
    ids = torch.randint(4, config.vocab_size, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache = KVCache(config.n_layer, 3, config.n_head, 16, config.head_dim, torch.bfloat16,
                    torch.device("cpu"))
    model(ids, mask, cache, 0, last_only=True)
    fused_calls = []
    real = Block.decode_in_one_call

    def counted(block, *args):
        out = real(block, *args) if fused else None
        fused_calls.append(out is not None)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(Block, "decode_in_one_call", counted)
        step = torch.randint(4, config.vocab_size, (3, 1), generator=generator)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        logits = model(step, mask, cache, 7, last_only=True)
    return logits, cache, sum(fused_calls)


@pytest.mark.parametrize("quant,role,kernel", CASES)
def test_a_fused_decode_layer_is_the_blocks_modules_bit_for_bit(checkpoint, monkeypatch, quant, role, kernel):
    """Guards a product given its operands in the wrong slots, a product quantized otherwise than its
    module does, the residual taken from the wrong side of the norm (both BLOOM variants:
    apply_residual_connection_post_layernorm), the cache written at the wrong column or row, and a GELU
    other than the model's."""
    model = load(checkpoint, monkeypatch, quant, role, kernel).model
    with torch.inference_mode():
        for after_norm in (False, True):
            for block in model.h:
                block.residual_after_norm = after_norm
            fused_logits, fused_cache, fused = decode_step(model, True, monkeypatch)
            logits, cache, none = decode_step(model, False, monkeypatch)
            assert (fused, none) == (model.config.n_layer, 0)
            assert torch.equal(fused_logits, logits)
            written = (slice(None), slice(None), slice(None), slice(0, 8))  # columns past 8: never written
            for kept, want in ((fused_cache.keys, cache.keys), (fused_cache.values, cache.values)):
                assert torch.equal(kept[written], want[written])


def test_static_activation_scales_keep_the_modules(checkpoint, monkeypatch):
    """W8A8 with a calibrated per-tensor scale quantizes in the module, not in the kernel: fusing it would
    quantize per token instead. Guards `forwards_rows_as_is` inherited from the dynamic scheme."""
    model = load(checkpoint, monkeypatch, "w8a8-static", "w8a8", "native-portable").model
    with torch.inference_mode():
        _, _, fused = decode_step(model, True, monkeypatch)
    assert fused == 0


def test_a_hook_inside_a_block_keeps_its_modules(checkpoint, monkeypatch):
    """Calibration and tensor parallelism's all-reduce are hooks on linears: a block holding one runs its
    modules, so the hook sees the decode rows; the other blocks still fuse. Guards the hook check."""
    model = load(checkpoint, monkeypatch, None, "dense16", "native-portable").model
    seen = []
    model.h[0].self_attention.dense.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    with torch.inference_mode():
        _, _, fused = decode_step(model, True, monkeypatch)
    assert fused == model.config.n_layer - 1
    assert seen[-1] == (3, model.config.hidden_size)
