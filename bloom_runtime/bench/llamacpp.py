"""llama.cpp as a peer: the checkpoint written as GGUF, quantized by llama.cpp itself, timed
through llama-cpp-python on token ids.

llama.cpp's own converter needs a tokenizer it recognises, which random presets
lack, so the GGUF is written here from the checkpoint's tensors with the `gguf`
package: float32, BLOOM's names in llama.cpp's, the fused QKV regrouped from
per-head [q, k, v] into [all q; all k; all v] as llama.cpp's bloom graph splits
it, and a placeholder vocabulary of the right size (prompts go in as ids, never
text). That file is then quantized with llama.cpp's `llama_model_quantize` to the
type matching our run: BF16 / F16 / F32 for float runs, Q8_0 for int8 schemes,
Q4_0 for int4 ones. Both files are cached beside the other peers' conversions.

The high-level `Llama` API runs one sequence, so this peer measures batch 1 only
(`max_batch`); the harness leaves it out of larger batches and says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import BloomConfig, read_json
from ..errors import InputError
from ..files import staged_output

GGUF = "model.gguf"
# our scheme or dtype -> llama.cpp's file type (its llama_ftype constant), the closest it has
FILE_TYPES = {"int8": "MOSTLY_Q8_0", "int4": "MOSTLY_Q4_0", "bfloat16": "MOSTLY_BF16",
              "float16": "MOSTLY_F16", "float32": "ALL_F32"}  # fmt: skip


def file_type(dtype: str, quant: str | None) -> str:
    """The llama.cpp type for our run: int4 schemes -> Q4_0, int8 -> Q8_0, else the dtype's."""
    if quant:
        from ..quant import LINEARS

        return FILE_TYPES[f"int{LINEARS[quant].WEIGHTS['num_bits']}"]
    return FILE_TYPES[dtype]


class LlamaCppRunner:
    name = "llamacpp"
    max_batch = 1

    def __init__(self, directory: Path, cache: Path, dtype: str, quant: str | None, threads: int,
                 max_tokens: int) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise InputError("--compare llamacpp needs llama-cpp-python: run tools/install_llamacpp.sh") \
                from None
        path, kind = gguf_file(directory, cache, dtype, quant, threads)
        built_for = llama_cpp.llama_print_system_info().decode().strip()  # the CPU features it uses
        self.describe = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) {kind}, batch 1 only; " \
            f"built for: {built_for}"
        self.llm = llama_cpp.Llama(str(path), n_ctx=max_tokens, n_batch=max_tokens, n_ubatch=max_tokens,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    def arrivals(self, ids: torch.Tensor, seq_out: int) -> list[float]:
        if ids.shape[0] != 1:
            raise InputError(f"the llama.cpp peer runs batch 1, got {ids.shape[0]}")
        times = []
        self.llm.reset()  # else it keeps the KV cache of a repeated prompt and skips the prefill
        start = time.perf_counter()
        for _ in self.llm.generate(ids[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
            times.append(time.perf_counter() - start)
            if len(times) == seq_out:
                break
        return times


def gguf_file(directory: Path, cache: Path, dtype: str, quant: str | None, threads: int) -> tuple[Path, str]:
    """The GGUF of `directory` in the llama.cpp type for our run, written once into `cache`, and
    that type's name (Q8_0, Q4_0, BF16, F16, F32). Quantizing needs llama-cpp-python."""
    import llama_cpp

    ftype = file_type(dtype, quant)
    kind = ftype.split("_", 1)[1]
    base, path = cache / "gguf-F32" / GGUF, cache / f"gguf-{kind}" / GGUF
    if not base.is_file():
        write_gguf(directory, base.parent)
    if not path.is_file():
        _quantize(base, path.parent, getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}"), threads)
    return path, kind


def write_gguf(directory: Path, target: Path) -> None:
    """The float checkpoint in `directory` as `target`/model.gguf: float32, llama.cpp's bloom."""
    import gguf

    from ..loader import load

    config = BloomConfig.from_dict(read_json(directory / "config.json"), str(directory / "config.json"))
    state = load(directory, dtype="float32").model.state_dict()
    needs = sum(t.nbytes for t in state.values())  # float32
    with staged_output(target, [directory], force=True, needs=needs) as staging:
        writer = gguf.GGUFWriter(str(staging / GGUF), "bloom")
        _header(writer, config)
        for name, tensor in _tensors(state, config):
            writer.add_tensor(name, tensor.float().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _header(writer, config: BloomConfig) -> None:
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(4 * config.hidden_size)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")  # placeholder pieces: ids go in, text never does
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_token_types([1] * config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)


_NAMES = {  # our name (after h.<i>.) -> llama.cpp's (after blk.<i>.)
    "input_layernorm": "attn_norm", "self_attention.query_key_value": "attn_qkv",
    "self_attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down",
}  # fmt: skip
_TOP = {"word_embeddings": "token_embd", "word_embeddings_layernorm": "token_embd_norm",
        "ln_f": "output_norm"}  # fmt: skip


def _tensors(state: dict[str, torch.Tensor], config: BloomConfig):
    for name, tensor in state.items():
        module, leaf = name.rsplit(".", 1)
        if module in _TOP:
            yield f"{_TOP[module]}.{leaf}", tensor
            continue
        _, layer, rest = module.split(".", 2)
        if rest == "self_attention.query_key_value":  # [heads, 3, head_dim, ...] -> [3, heads, ...]
            grouped = tensor.view(config.n_head, 3, -1, *tensor.shape[1:]).transpose(0, 1)
            tensor = grouped.reshape(tensor.shape)
        yield f"blk.{layer}.{_NAMES[rest]}.{leaf}", tensor


def _quantize(source: Path, target: Path, ftype: int, threads: int) -> None:
    """`source` (a GGUF file) as `target`/model.gguf in llama.cpp's type `ftype`, by llama.cpp."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    needs = source.stat().st_size // (1 if ftype == llama_cpp.LLAMA_FTYPE_ALL_F32 else 2)  # at most 16 bits
    with staged_output(target, [source.parent], force=True, needs=needs) as staging:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(staging / GGUF).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to type {ftype}")
