"""Random BLOOM checkpoints written by `transformers`, in every published layout.

Every parameter is drawn at random (biases and layer-norm gains too, which
Hugging Face initialises to 0 and 1 and so would hide bugs in their handling),
with a scale that makes attention far from uniform.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BloomConfig as HFBloomConfig
from transformers import BloomForCausalLM

LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")


def hf_model(seed: int = 0, **overrides) -> BloomForCausalLM:
    """A float32 `BloomForCausalLM` with random weights; `overrides` set config fields."""
    fields = dict(
        vocab_size=250, hidden_size=48, n_layer=2, n_head=3, bos_token_id=1, eos_token_id=2,
        pad_token_id=3, layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
    )  # fmt: skip
    fields.update(overrides)
    torch.manual_seed(seed)
    model = BloomForCausalLM(HFBloomConfig(**fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif "word_embeddings" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 1.5 / param.shape[-1] ** 0.5 if param.dim() == 2 else 0.1)
    return model


def save(model: BloomForCausalLM, directory: Path, layout: str = "safetensors",
         prefix: bool = True) -> Path:
    """Write `model` to `directory` in `layout`; `prefix=False` drops `transformer.` from names."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not prefix:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    shards = _split(state, 2 if layout.endswith("sharded") else 1)
    kind = layout.removesuffix("-sharded")
    names = _shard_names(kind, len(shards))
    for shard, name in zip(shards, names):
        if kind == "safetensors":
            from safetensors.torch import save_file

            save_file(shard, directory / name, metadata={"format": "pt"})
        else:
            torch.save(shard, directory / name)
    if len(shards) > 1:
        index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
        (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _split(state: dict, n: int) -> list[dict]:
    keys = list(state)
    cut = (len(keys) + n - 1) // n
    return [{k: state[k] for k in keys[i * cut:(i + 1) * cut]} for i in range(n)]


def _shard_names(kind: str, n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors" if kind == "safetensors" else "pytorch_model.bin"]
    stem, ext = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]


OUTLIER_CHANNELS = [7, 50, 99]


def outlier_model(seed: int = 5, gain: float = 20.0, sharp: float = 1.0, **overrides) -> BloomForCausalLM:
    """`hf_model` with real BLOOM's hard parts (needs hidden_size > 99).

    - A few hidden channels `gain` times the rest at the inputs of `query_key_value` and
      `dense_h_to_4h` (as LLM.int8 found from 6.7B up): the LayerNorm gains and biases of
      those channels scaled up and the linear's columns scaled down, so the float function
      is unchanged while int8 activations must cope with the outliers.
    - Head 0 of block 0 with queries and keys `sharp` times larger: scores far outside
      float16's range (q.k > 65504), as long inputs give real BLOOM.
    """
    model = hf_model(seed, **overrides)
    head_dim = model.config.hidden_size // model.config.n_head
    with torch.no_grad():
        for block in model.transformer.h:
            for norm, linear in ((block.input_layernorm, block.self_attention.query_key_value),
                                 (block.post_attention_layernorm, block.mlp.dense_h_to_4h)):
                norm.weight[OUTLIER_CHANNELS] *= gain
                norm.bias[OUTLIER_CHANNELS] *= gain
                linear.weight[:, OUTLIER_CHANNELS] /= gain
        qkv = model.transformer.h[0].self_attention.query_key_value  # rows per head: q, k, v
        qkv.weight[: 2 * head_dim] *= sharp
        qkv.bias[: 2 * head_dim] *= sharp
    return model
