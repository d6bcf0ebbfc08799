"""The BLOOM network in plain PyTorch.

Module and parameter names follow the Hugging Face checkpoints without the
`transformer.` prefix (`h.0.self_attention.query_key_value.weight`, …), so a
checkpoint's state dict loads with `load_state_dict` and nothing is renamed.

Numerics follow `transformers`' `modeling_bloom.py`: ALiBi with the interleaved
extra slopes for head counts that are not a power of two, positions taken from
the attention mask so left padding changes nothing, softmax in float32. One
attention bias (ALiBi + causal + padding) is built per forward and shared by
all layers; attention itself is `scaled_dot_product_attention`. A forward may carry several
`Segment`s (a decode step and a prefill) whose tokens share every weight read.

This module is the one place that names BLOOM's modules. Each linear says how
tensor parallelism splits it (`split`: "column" or "row"), and each module with
parameters declares how a checkpoint stores them (`STORED`, see tensors.py), so
loading, quantization and sharding find everything by walking the model.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .config import BloomConfig
from .kernels import Decision, KernelOwner, Problem, native
from .kv_cache import KVCache
from .tensors import FLOAT, IN, OUT, VOCAB, Stored


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi slopes for `n_head` heads (Press et al.; BLOOM's variant for any head count).

    The first 2^k heads (2^k the largest power of two <= n_head) get the geometric
    series 2^(-8i/2^k); the remaining heads take every other slope of the series
    for 2^(k+1) heads.
    """
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    extra = n_head - closest
    slopes += [2.0 ** (-8.0 * i / (2 * closest)) for i in range(1, 2 * extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def attention_bias(
    slopes: torch.Tensor, mask: torch.Tensor, start: int, q_len: int, dtype: torch.dtype
) -> torch.Tensor:
    """The additive attention bias [B, H, q_len, T] for queries at `start:start+q_len`.

    `mask` is [B, T] (1 = token, 0 = left padding), T = start + q_len.
    BLOOM adds slope * key_position, with positions counted over real tokens,
    `(cumsum(mask) - 1) * mask`. Softmax is shift invariant, so subtracting the
    query's position changes nothing; and with padding only on the left, the
    distance between two real tokens is the distance between their indices.
    So the bias is slope * (key_index - query_index): the same for every row,
    exact under left padding, and small near the diagonal, where it matters and
    where bfloat16 keeps it precise. Disallowed entries get the most negative
    finite value, so a padding query with nothing to attend to stays finite.
    """
    total = mask.shape[1]
    keys = torch.arange(total, device=mask.device, dtype=torch.float32)
    queries = keys[start : start + q_len, None]
    bias = slopes.to(mask.device)[:, None, None] * (keys - queries)  # [H, q, T]
    allowed = (keys <= queries)[None, None] & mask[:, None, None, :].bool()  # [B, 1, q, T]
    return bias[None].masked_fill(~allowed, torch.finfo(dtype).min).to(dtype)


def _hooked(modules: tuple[nn.Module, ...]) -> bool:
    """Whether a forward hook or pre-hook would run on any of `modules` (their own, or global ones)."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` calling the op itself: its `F.layer_norm` path checks for torch functions and
    reads `torch.backends.cudnn.enabled`, 3 us of a 5.7 us call on one bfloat16 row, 49 times a step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Linear(KernelOwner, nn.Linear):
    """A float linear that knows how tensor parallelism splits it: "column" (each rank
    computes some outputs) or "row" (each rank takes some inputs; partial sums are
    all-reduced). Quantized replacements keep `split`.

    In bfloat16 or float16 it is a "dense16" problem: once prepared (at load), the
    kernel chosen on this machine serves it; a packed kernel takes the weight over
    (reading `weight` then fails loudly, `state_dict` still gives it back plain,
    `release_kernels` restores it). Unprepared, and in float32, it is `F.linear`.
    """

    STORED = {"weight": Stored(FLOAT, (OUT, IN)), "bias": Stored(FLOAT, (OUT,), summed=True)}

    def __init__(self, in_features: int, out_features: int, split: str) -> None:
        super().__init__(in_features, out_features)
        self.split = split

    def kernel_problem(self, dtype: torch.dtype) -> Problem | None:
        return dense_problem(self.weight, copies=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.decision is None else self.run_rows(x)

    def forwards_rows_as_is(self) -> bool:
        return True


def dense_problem(weight: torch.Tensor, copies: bool) -> Problem | None:
    """A 16-bit float weight [N, K] as a "dense16" problem; float32 needs no kernel choice."""
    if weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    return Problem.of("dense16", *weight.shape, weight.device, weight.dtype, copies=copies)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows that run through one forward together with the same query length and start: the
    decoding rows of a batch, or a group being prefilled. One forward can take several, so a
    decode step and an admission's prefill share every weight read (see `Bloom.forward_segments`).

    `input_ids` [B, S] sit at positions `start:start+S` of `mask` [B, start+S]; `cache`, when
    given, holds the earlier positions' keys/values and receives the new ones.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    cache: KVCache | None = None
    start: int = 0

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
                        ) -> torch.Tensor:
    """Attention of one query per sequence [B, H, 1, D] over keys and values [B, H, T, D] in torch: two
    matmuls with scores in q's dtype, as Hugging Face's BLOOM computes them (torch's flash kernel
    handles a single query poorly on CPU: 872 us a layer at 1024 cached tokens, bfloat16, batch 1,
    16 heads of 64, AMD EPYC Zen 4). Where the native library runs, `KVCache.attend` serves instead."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class Attention(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.head_dim = config.head_dim
        self.query_key_value = Linear(h, 3 * h, "column")
        self.dense = Linear(h, h, "row")

    def forward(self, x: torch.Tensor, segments: list[Segment], biases: list[torch.Tensor], layer: int
                ) -> torch.Tensor:
        """`x` [tokens, hidden]: every segment's tokens, row by row; attention within each segment."""
        qkv = self.query_key_value(x)
        if len(segments) == 1:
            return self.dense(self.attend(qkv, segments[0], biases[0], layer))
        outs, first = [], 0
        for segment, bias in zip(segments, biases):
            outs.append(self.attend(qkv[first:first + segment.tokens], segment, bias, layer))
            first += segment.tokens
        return self.dense(torch.cat(outs))

    def attend(self, qkv: torch.Tensor, segment: Segment, bias: torch.Tensor, layer: int) -> torch.Tensor:
        """One segment's attention, from its rows of the fused projection [tokens, heads * 3 * head_dim]
        to [tokens, heads * head_dim]; its keys and values join its cache, if it has one."""
        batch, q_len = segment.input_ids.shape
        cache = segment.cache
        if q_len == 1 and cache is not None and cache.attends:
            return cache.attend(layer, segment.start, qkv, bias)
        # Hugging Face lays the fused projection out per head as [n_head, 3, head_dim]; the head count is
        # this rank's (all heads on one device).
        part = qkv.view(batch, q_len, -1, 3, self.head_dim)
        q, k, v = (part[..., i, :].transpose(1, 2) for i in range(3))  # [B, H, S, D]
        if cache is not None:
            k, v = cache.update(layer, segment.start, k, v)
        if q.dtype == torch.float16:
            # float16 q.k overflows on long inputs: score and softmax in float32.
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias).to(q.dtype)
        elif q_len == 1 and q.device.type == "cpu":
            out = one_query_attention(q, k, v, bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(segment.tokens, -1)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """BLOOM's tanh GELU. For contiguous bfloat16 on CPU, the native library's vectorized pass over torch's
    threads serves: [8, 4096] 15 us against aten's 35, [128, 4096] 0.2 ms against 0.5 (2 threads, EPYC
    Zen 4). It evaluates the same function as x sigmoid(2u), within a bfloat16 ulp, where aten's
    x/2 (1 + tanh(u)) cancels for x < 0 (one ulp off in ~7% of those). float32 keeps aten's, which is
    transformers' float32 evaluation (a static W8A8 model's conformance moved with the other)."""
    usable = x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous()
    variant = native.widest_variant() if usable else None
    if variant is None:
        return F.gelu(x, approximate="tanh")
    return torch.ops.bloom_native.gelu.default(x, variant)


class MLP(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.dense_h_to_4h = Linear(h, 4 * h, "column")
        self.dense_4h_to_h = Linear(4 * h, h, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = Attention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config)
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, x: torch.Tensor, segments: list[Segment], biases: list[torch.Tensor], layer: int
                ) -> torch.Tensor:
        if len(segments) == 1:
            fused = self.decode_in_one_call(x, segments[0], biases[0], layer)
            if fused is not None:
                return fused
        normed = self.input_layernorm(x)
        residual = normed if self.residual_after_norm else x
        x = residual + self.self_attention(normed, segments, biases, layer)
        normed = self.post_attention_layernorm(x)
        residual = normed if self.residual_after_norm else x
        return residual + self.mlp(normed)

    def decode_in_one_call(self, x: torch.Tensor, segment: Segment, bias: torch.Tensor, layer: int
                           ) -> torch.Tensor | None:
        """This block on decode rows as the native library's `decode_layer` runs it: the ops `forward`
        calls, in its order, from one C++ call instead of ten module calls, so the result is the same bit
        for bit. None where that would not be `forward`'s computation: more than one query a row, no
        native cache, a linear that does more than its native kernel's call (`layer_operands`), or a hook
        on any module inside (calibration, tensor parallelism's all-reduce)."""
        cache = segment.cache
        if segment.input_ids.shape[1] != 1 or cache is None or not cache.attends:
            return None
        modules = self._modules
        attention, mlp = modules["self_attention"]._modules, modules["mlp"]._modules
        norms = (modules["input_layernorm"], modules["post_attention_layernorm"])
        linears = (attention["query_key_value"], attention["dense"], mlp["dense_h_to_4h"],
                   mlp["dense_4h_to_h"])
        if _hooked((*norms, *linears, modules["self_attention"], modules["mlp"])):
            return None
        products = [linear.layer_operands(x.shape[0]) if isinstance(linear, KernelOwner) else None
                    for linear in linears]
        if None in products:
            return None
        return torch.ops.bloom_native.decode_layer.default(
            x.contiguous(), [t for norm in norms for t in (norm.weight, norm.bias)], norms[0].eps,
            self.residual_after_norm, [p[0] for p in products], [t for p in products for t in p[1]],
            [n for p in products for n in p[2]], cache.keys, cache.values, layer, cache.rows.start,
            cache.offset, cache.offset + segment.start, bias, native.widest_variant())

    def smoothable(self) -> list[tuple[nn.LayerNorm, nn.Module]]:
        """Each LayerNorm with the one projection its output feeds, where SmoothQuant can fold
        scales into the norm (the other two linears are fed by attention and GELU)."""
        return [(self.input_layernorm, self.self_attention.query_key_value),
                (self.post_attention_layernorm, self.mlp.dense_h_to_4h)]


class TiedEmbedding(KernelOwner):
    """The token embedding, which BLOOM also uses as its output projection (`logits`).

    Tensor parallelism splits it by vocabulary rows; quantized heads subclass it. Its
    rows serve lookups, so a float head holds no second layout of them (on bloom-7b1 that
    would be 2 GB in bfloat16): a kernel may take them over only if it looks rows up
    (`lookups`), and lookups then read its layout.
    """

    STORED = {"weight": Stored(FLOAT, (VOCAB, None))}
    split = "vocab"

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if "weight" not in self._parameters:
            return self.taken_by("weight").rows(input_ids)
        return F.embedding(input_ids, self.weight)

    def kernel_problem(self, dtype: torch.dtype) -> Problem | None:
        return dense_problem(self.weight, copies=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.decision is None else self.run_rows(x)

    @property
    def bias(self) -> None:
        """The head has no bias (what the dense16 kernels read beside `weight`)."""
        return None


class Bloom(nn.Module):
    """BLOOM with its tied head. `forward` returns logits in the model's dtype."""

    def __init__(self, config: BloomConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.heads = range(config.n_head)  # the heads this model computes (parallel.py narrows it)
        self.slopes: torch.Tensor | None = None  # their ALiBi slopes, made by `init_buffers`

    def init_buffers(self, device: torch.device) -> None:
        """Make the non-parameter state on `device`, once the parameters are in place."""
        self.slopes = alibi_slopes(self.config.n_head)[self.heads.start : self.heads.stop].to(device)

    def prepare_kernels(self, dtype: torch.dtype) -> list[Decision]:
        """Build, once, the kernel this machine's probe chose for every module a kernel role serves
        (for inference: after quantization and sharding). Returns the decisions."""
        owners = [m for m in self.modules() if isinstance(m, KernelOwner)]
        for owner in owners:
            owner.prepare_kernels(dtype)
        return [owner.decision for owner in owners if owner.decision is not None]

    def block_linears(self) -> list[dict[str, nn.Module]]:
        """Per block, its linears by qualified name (`h.0.self_attention.dense`, ...)."""
        return [{f"h.{i}.{name}": m for name, m in block.named_modules() if hasattr(m, "split")}
                for i, block in enumerate(self.h)]

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, S] placed at positions `start:start+S` of `mask` [B, T].

        With a cache, keys/values of earlier positions come from it and the new
        ones are written to it. `last_only` computes the head for the last
        position alone, which is all that generation needs.
        """
        return self.forward_segments([Segment(input_ids, mask, cache, start)], last_only)[0]

    def forward_segments(self, segments: list[Segment], last_only: bool = False) -> list[torch.Tensor]:
        """Logits [B, S or 1, V] for each segment, all segments' tokens through one pass of the weights.

        Layer norms, linears and the MLP see every token at once ([tokens, hidden] rows); attention
        runs per segment with its own bias and cache. A decode step joined with a prefill reads
        the weights once for both, where two forwards read them twice.
        """
        ids = torch.cat([s.input_ids.reshape(-1) for s in segments]) if len(segments) > 1 \
            else segments[0].input_ids.reshape(-1)
        x = self.word_embeddings_layernorm(self.word_embeddings(ids))
        # float16 attention runs in float32 (see Attention), so its bias does too.
        bias_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        biases = [attention_bias(self.slopes, s.mask, s.start, s.input_ids.shape[1], bias_dtype)
                  for s in segments]
        for layer, block in enumerate(self.h):
            x = block(x, segments, biases, layer)
        outs, first = [], 0
        for segment in segments:
            batch, q_len = segment.input_ids.shape
            rows = x[first:first + segment.tokens].view(batch, q_len, -1)
            first += segment.tokens
            outs.append(rows[:, -1:] if last_only else rows)
        if len(outs) == 1:
            return [self.word_embeddings.logits(self.ln_f(outs[0]))]
        sizes = [o.shape[0] * o.shape[1] for o in outs]
        logits = self.word_embeddings.logits(self.ln_f(torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])))
        return [part.view(o.shape[0], o.shape[1], -1) for part, o in zip(logits.split(sizes), outs)]
