// bloom_runtime's native decode kernels, as torch ops in the `bloom_native` namespace.
//
// Matrix products for few activation rows, written to stream the weights at the memory's pace:
// int8 x int8 with exact int32 sums (W8A8), int8, int4 and 16-bit weights x float activations
// (W8A16, W4A16, dense bfloat16/float16), and the one-pass per-token int8 quantization W8A8 feeds
// them. Each exists in ISA variants (variant.h, compiled here once per variant under its own target
// pragma; the library itself is built for the baseline ISA); a call names its variant, and
// `supported` says which this CPU can run. Which variant serves, if any, is the probe's decision
// (bloom_runtime/kernels/selection.py), never this file's.
//
// Threads are torch's own pool (at::parallel_for over tiles of output rows); activations are
// prepared once per call into a buffer kept by the calling thread, so a decode step allocates
// only its outputs (and, for a 16-bit output, the float32 sums each thread rounds into it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define I8_PORTABLE 0
#define I8_MADD256 1
#define I8_MADD512 2
#define I8_VNNI 3

namespace portable {
#define VBYTES 16
#define I8_KIND I8_PORTABLE
#define F16C 0
#define BF16DOT 0
#include "variant.h"
}  // namespace portable

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define VBYTES 32
#define I8_KIND I8_MADD256
#define F16C 1
#define BF16DOT 0
#include "variant.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define VBYTES 64
#define I8_KIND I8_MADD512
#define F16C 1
#define BF16DOT 0
#include "variant.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace avx512_vnni {
#define VBYTES 64
#define I8_KIND I8_VNNI
#define F16C 1
#define BF16DOT 0
#include "variant.h"
}  // namespace avx512_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
namespace avx512_bf16 {
#define VBYTES 64
#define I8_KIND I8_VNNI
#define F16C 1
#define BF16DOT 1
#include "variant.h"
}  // namespace avx512_bf16
#pragma GCC pop_options
#endif

namespace {

using I8Rows = void (*)(const int8_t*, const void*, int64_t, int64_t, int64_t, int64_t, int32_t*, int64_t);
using FloatRows = void (*)(const uint16_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
using I8wRows = void (*)(const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t);
using I4Rows = void (*)(const uint8_t*, const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                        float*, int64_t);
using Bf16DotRows = void (*)(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t, float*,
                             int64_t);
using I4Bf16Rows = void (*)(const uint8_t*, const float*, int64_t, const uint16_t*, int64_t, int64_t, int64_t,
                            int64_t, float*, int64_t);
using I4x8Rows = void (*)(const uint8_t*, const float*, int64_t, const int8_t*, const int32_t*, int64_t, int64_t,
                          int64_t, int64_t, float*, int64_t);
using I4x8Blocks = void (*)(const uint8_t*, int64_t, const int8_t*, const int32_t*, int64_t, int64_t, int64_t,
                            int64_t, float*, int64_t);  // the blocks (scales among them), q itself, its group sums
template <class T>
using Attend = void (*)(const T*, const T*, const T*, const float*, int64_t, int64_t, float, float*, float*);
template <class T>
using Greatest = void (*)(const T*, int64_t, float*, bool*);

enum class I8Act { Int32, Int16, Uint8Plus128 };

struct Variant {
  const char* name;
  bool (*supported)();
  I8Act i8_act;
  int i4_lanes;  // F: an int4 step takes 2F inputs, F even ones then F odd ones
  I8Rows i8;
  I8Rows i8_tiled;  // nullptr: no VNNI; W8A8's outer products on weights laid out in blocks at load
  FloatRows bf16;
  FloatRows f16;  // nullptr: no float16 conversion in this variant
  I8wRows i8w;
  I4Rows i4;
  Bf16DotRows bf16dot;  // nullptr: no bfloat16 dot instruction
  Bf16DotRows bf16_tiled;  // likewise; bfloat16 outer products on weights laid out in blocks at load
  I4Bf16Rows i4bf16;  // nullptr: likewise (int4 x bfloat16 activations then take the float path)
  I4x8Rows i4x8;
  int i4x8_half, i4x8_lane_bytes;  // a W4A8 step's packed bytes, and the bytes of a half one lane sums
  I4x8Blocks i4x8_tiled;  // W4A8's outer products, on weights laid out in blocks at load
  Attend<uint16_t> attend_bf16;
  Attend<float> attend_f32;
  Greatest<uint16_t> greatest_bf16;
  Greatest<float> greatest_f32;
  void (*gelu)(const uint16_t*, int64_t, uint16_t*);
  float (*quantize_f32)(const float*, int64_t, int8_t*);  // a row as int8, its scale returned
  float (*quantize_bf16)(const uint16_t*, int64_t, int8_t*);
  void (*round_bf16)(const float*, int64_t, uint16_t*);  // float32 values to bfloat16, nearest even
};

// A row of the table: a variant's name, its CPU check, how its int8 activations come prepared, and its
// namespace's kernels (i8_tiled, f16, bf16dot, bf16_tiled and i4bf16 where it has them, else nullptr).
#define VARIANT(ns, name, check, i8_act, i8_tiled, f16, bf16dot, bf16_tiled, i4bf16)                        \
  {name, check, i8_act, ns::F, ns::i8_rows, i8_tiled, ns::bf16_rows, f16, ns::i8w_rows, ns::i4_rows,        \
   bf16dot, bf16_tiled, i4bf16,                                                                              \
   ns::i4x8_rows, ns::I4X8_HALF, ns::I4X8_LANE_BYTES, ns::i4x8_tiled, ns::attend_bf16, ns::attend_f32,   \
   ns::greatest_bf16, ns::greatest_f32, ns::gelu, ns::quantize_f32, ns::quantize_bf16, ns::round_bf16}

const Variant VARIANTS[] = {
    VARIANT(portable, "portable", [] { return true; }, I8Act::Int32, nullptr, nullptr, nullptr, nullptr, nullptr),
#if defined(__x86_64__)
    VARIANT(avx2, "avx2", [] { return bool(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")); },
            I8Act::Int16, nullptr, avx2::f16_rows, nullptr, nullptr, nullptr),
    VARIANT(avx512, "avx512",
            [] { return bool(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")); },
            I8Act::Int16, nullptr, avx512::f16_rows, nullptr, nullptr, nullptr),
    VARIANT(avx512_vnni, "avx512-vnni",
            [] { return VARIANTS[2].supported() && bool(__builtin_cpu_supports("avx512vnni")); },
            I8Act::Uint8Plus128, avx512_vnni::i8_tiled, avx512_vnni::f16_rows, nullptr, nullptr, nullptr),
    VARIANT(avx512_bf16, "avx512-bf16",
            [] { return VARIANTS[3].supported() && bool(__builtin_cpu_supports("avx512bf16")); },
            I8Act::Uint8Plus128, avx512_bf16::i8_tiled, avx512_bf16::f16_rows, avx512_bf16::bf16dot_rows,
            avx512_bf16::bf16_tiled, avx512_bf16::i4bf16_rows),
#endif
};
#undef VARIANT
constexpr int64_t N_VARIANTS = sizeof VARIANTS / sizeof VARIANTS[0];

const Variant& variant(int64_t index) {
  TORCH_CHECK(index >= 0 && index < N_VARIANTS, "bloom_native: no variant ", index);
  const Variant& v = VARIANTS[index];
  TORCH_CHECK(v.supported(), "bloom_native: this CPU cannot run the ", v.name, " variant");
  return v;
}

// Per-thread buffers that grow and are kept: a decode step allocates no scratch. Each starts on a cache
// line, as a tensor's data does, so that no vector load of activation rows with widths of whole lines
// straddles two lines.
template <class T>
T* scratch(std::vector<T>& buffer, int64_t n) {
  constexpr int64_t LINE = 64;
  int64_t padded = n + LINE / int64_t(sizeof(T));
  if (int64_t(buffer.size()) < padded) buffer.resize(padded);
  uintptr_t at = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((at + LINE - 1) & ~uintptr_t(LINE - 1));
}

void check_rows(const at::Tensor& t, const char* what, int64_t width) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), "bloom_native: ", what,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.size(1) == width, "bloom_native: ", what, " has ", t.size(1), " columns, not ", width);
}

void check_vector(const at::Tensor& t, const char* what, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == n && t.scalar_type() == dtype,
              "bloom_native: ", what, " must be ", n, " contiguous ", c10::toString(dtype), " values");
}

// Splits output columns [0, N) into blocks of `tile` rows of the weight (four: a row tile's; W4A8's
// outer products take 16) for torch's threads, at least MIN_BYTES of weights a task, and runs
// `body(n0, n1)` on each part.
template <class Body>
void over_outputs(int64_t N, int64_t row_bytes, const Body& body, int64_t tile = 4) {
  constexpr int64_t MIN_BYTES = 64 * 1024;
  const int64_t TILE = tile;
  int64_t tiles = (N + TILE - 1) / TILE;
  int64_t grain = std::max<int64_t>(1, MIN_BYTES / std::max<int64_t>(1, TILE * row_bytes));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) { body(t0 * TILE, std::min(N, t1 * TILE)); });
}

// n float32, bfloat16 or float16 values at p as float32 at out (the dtype's branch taken once, so the
// conversion vectorizes).
void floats(at::ScalarType dtype, const void* p, int64_t n, float* out) {
  if (dtype == at::kBFloat16) {
    auto in = static_cast<const uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = portable::bf16_to_float(in[i]);
  } else if (dtype == at::kHalf) {
    auto in = static_cast<const at::Half*>(p);
    for (int64_t i = 0; i < n; i++) out[i] = float(in[i]);
  } else {
    memcpy(out, p, n * sizeof(float));
  }
}

// Activations [M, K] of any float dtype as float32 rows (the buffer of the calling thread, or x's own).
const float* as_float(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "bloom_native: activations must be float32, bfloat16 or float16");
  thread_local std::vector<float> buffer;
  float* out = scratch(buffer, x.numel());
  floats(x.scalar_type(), x.data_ptr(), x.numel(), out);
  return out;
}

// An op's output [M, N] in `dtype` and its float32 sums: the output itself when it is float32, else a
// tensor of their own whose parts each thread rounds into the output (`round`) right after summing them,
// in the variant's vectors. A cast after the op (sums.to(dtype)) cost an op, an allocation and a pass:
// 1.5-2 us a call at one row on 2 threads of an EPYC Zen 4, and more on a 250880-wide head.
struct Output {
  at::Tensor tensor, sums;

  float* sums_ptr() const { return sums.data_ptr<float>(); }

  // Columns [n0, n1) of every row, rounded from the sums to the output's dtype (nothing to do in float32).
  void round(const Variant& v, int64_t n0, int64_t n1) const {
    at::ScalarType dtype = tensor.scalar_type();
    if (dtype == at::kFloat) return;
    int64_t M = tensor.size(0), N = tensor.size(1);
    const float* s = sums.data_ptr<float>();
    for (int64_t m = 0; m < M; m++) {
      if (dtype == at::kBFloat16) {
        v.round_bf16(s + m * N + n0, n1 - n0, reinterpret_cast<uint16_t*>(tensor.data_ptr()) + m * N + n0);
      } else {
        at::Half* out = tensor.data_ptr<at::Half>() + m * N;
        for (int64_t n = n0; n < n1; n++) out[n] = at::Half(s[m * N + n]);
      }
    }
  }
};

Output output(int64_t M, int64_t N, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "bloom_native: outputs are float32, bfloat16 or float16, not ", c10::toString(dtype));
  at::Tensor out = at::empty({M, N}, at::TensorOptions().dtype(dtype));
  return {out, dtype == at::kFloat ? out : at::empty({M, N}, at::TensorOptions().dtype(at::kFloat))};
}

// A bias of n float32, bfloat16 or float16 values as float32 (null for None): its own data, or
// converted once a call into the calling thread's buffer, so that the epilogues read plain floats.
const float* float_bias(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return nullptr;
  at::ScalarType dtype = bias->scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "bloom_native: a bias must be float32, bfloat16 or float16");
  check_vector(*bias, "bias", n, dtype);
  if (dtype == at::kFloat) return bias->data_ptr<float>();
  thread_local std::vector<float> buffer;
  float* out = scratch(buffer, n);
  floats(dtype, bias->data_ptr(), n, out);
  return out;
}

// y[n0, n1) = y x scale + bias (bias may be null), for one output row: a product, then an add, in
// loops the compiler vectorizes on the baseline ISA. (std::fma is a library call per element
// there, which cost the W8A8 and W4A8 epilogues more than a tenth of their time at 8 rows.)
void scale_and_bias(float* y, int64_t n0, int64_t n1, float scale, const float* bias) {
  if (bias)
    for (int64_t n = n0; n < n1; n++) y[n] = y[n] * scale + bias[n];
  else
    for (int64_t n = n0; n < n1; n++) y[n] *= scale;
}

// ---- ops ---------------------------------------------------------------------------------------

std::vector<std::string> variants() {
  std::vector<std::string> names;
  for (const Variant& v : VARIANTS) names.emplace_back(v.name);
  return names;
}

bool supported(int64_t index) { return index >= 0 && index < N_VARIANTS && VARIANTS[index].supported(); }

// Rows x [M, K] (any float dtype) to int8 q [M, K] with scales [M]: scale = max(|row|, 1e-8) / 127 and
// q = round-half-even(x / scale) clamped to [-128, 127], in one pass over each row (two reads), in the
// variant's vectors (variant.h's quantize_row); float16 rows are converted to float32 first.
void quantize_into(const at::Tensor& x, int8_t* qp, float* sp, const Variant& v) {
  int64_t M = x.size(0), K = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto* half = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr()) : nullptr;
  const float* in = bf16 ? nullptr : as_float(x);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++)
      sp[m] = bf16 ? v.quantize_bf16(half + m * K, K, qp + m * K) : v.quantize_f32(in + m * K, K, qp + m * K);
  });
}

// x [M, K] -> (q int8 [M, K], scale float32 [M, 1]), as quantize_into in `index`'s variant.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t index) {
  TORCH_CHECK(x.dim() == 2, "bloom_native: quantize_rows takes [M, K]");
  at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({xc.size(0), 1}, xc.options().dtype(at::kFloat));
  quantize_into(xc, q.data_ptr<int8_t>(), scale.data_ptr<float>(), variant(index));
  return {q, scale};
}

// The int8 rows a W8A8 or W4A8 op takes and their scales: `q` itself with `x_scale`, or, where
// x_scale is None, float rows q quantized per token here (quantize_into): one op where two were.
struct Int8Rows {
  const int8_t* q;
  const float* scale;
  bool per_row;  // one scale a row (else one for all)
  at::Tensor scale_kept;  // owns the given scales, converted
};

Int8Rows int8_rows(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const Variant& v) {
  int64_t M = q.size(0);
  if (!x_scale.has_value()) {
    TORCH_CHECK(at::isFloatingType(q.scalar_type()), "bloom_native: without x_scale, q must be float rows");
    thread_local std::vector<int8_t> quantized;
    thread_local std::vector<float> scales;
    int8_t* qp = scratch(quantized, q.numel());
    float* sp = scratch(scales, M);
    quantize_into(q, qp, sp, v);
    return {qp, sp, M > 1, at::Tensor()};
  }
  TORCH_CHECK(q.scalar_type() == at::kChar, "bloom_native: q must be int8 where x_scale is given");
  TORCH_CHECK(x_scale->numel() == M || x_scale->numel() == 1, "bloom_native: x_scale is per row or one number");
  at::Tensor xs = x_scale->to(at::kFloat).contiguous();
  return {q.data_ptr<int8_t>(), xs.data_ptr<float>(), xs.numel() == M && M > 1, xs};
}

// ((q - zero_point) @ w^T) * weight_scale * x_scale + bias in out_dtype, the sums exact in int32.
// x_scale: [M, 1] (per row), one number, or None (q: float rows, quantized here; see int8_rows);
// weight_sums [N] int32: each weight row's sum.
// W8A8 on int8 weights w (`kernel`'s layout: the rows, or blocks laid out at load) holding N columns of
// K inputs: q's rows (prepared for the variant) times w, exact in int32, then scaled.
at::Tensor w8a8_form(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const int8_t* w, int64_t N,
                     int64_t K, const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias,
                     const at::Tensor& weight_sums, int64_t zero_point, at::ScalarType out_dtype, const Variant& v,
                     I8Rows kernel, int64_t tile) {
  int64_t M = q.size(0);
  check_rows(q, "q", K);
  check_vector(weight_scale, "weight_scale", N, at::kFloat);
  check_vector(weight_sums, "weight_sums", N, at::kInt);
  Int8Rows rows = int8_rows(q, x_scale, v);
  const float* bp = float_bias(bias, N);

  thread_local std::vector<int32_t> act32;
  thread_local std::vector<int16_t> act16;
  thread_local std::vector<uint8_t> act8;
  thread_local std::vector<int32_t> sums;
  const int8_t* qp = rows.q;
  const void* act;
  int32_t shift = 0;  // what the prepared activations add to q
  if (v.i8_act == I8Act::Int32) {
    int32_t* a = scratch(act32, M * K);
    for (int64_t i = 0; i < M * K; i++) a[i] = qp[i];
    act = a;
  } else if (v.i8_act == I8Act::Int16) {
    int16_t* a = scratch(act16, M * K);
    for (int64_t i = 0; i < M * K; i++) a[i] = qp[i];
    act = a;
  } else {
    uint8_t* a = scratch(act8, M * K);
    for (int64_t i = 0; i < M * K; i++) a[i] = uint8_t(qp[i]) ^ 0x80;
    act = a;
    shift = 128;
  }
  int32_t* acc = scratch(sums, M * N);
  Output out = output(M, N, out_dtype);
  float* op = out.sums_ptr();
  const float* ws = weight_scale.data_ptr<float>();
  const int32_t* wsum = weight_sums.data_ptr<int32_t>();
  // acc - offset x wsum is the exact sum of (q - zero_point) x w, which fits int32 (|q - zero_point| <= 255,
  // |w| <= 128: K up to 65536), as do acc and offset x wsum; so unsigned 32-bit arithmetic, which wraps
  // where signed would be undefined, gives it exactly, in lanes the baseline ISA has.
  uint32_t offset = uint32_t(shift + zero_point);
  over_outputs(
      N, K,
      [&](int64_t n0, int64_t n1) {
        kernel(w, act, M, K, n0, n1, acc, N);
        for (int64_t m = 0; m < M; m++) {
          const int32_t* a = acc + m * N;
          float* y = op + m * N;
          for (int64_t n = n0; n < n1; n++)
            y[n] = float(int32_t(uint32_t(a[n]) - offset * uint32_t(wsum[n]))) * ws[n];
          scale_and_bias(y, n0, n1, rows.scale[rows.per_row ? m : 0], bp);
        }
        out.round(v, n0, n1);
      },
      tile);
  return out.tensor;
}

at::Tensor w8a8(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const at::Tensor& weight,
                const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias, const at::Tensor& weight_sums,
                int64_t zero_point, at::ScalarType out_dtype, int64_t index) {
  const Variant& v = variant(index);
  int64_t N = weight.size(0), K = weight.size(1);
  check_rows(weight, "weight", K);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "bloom_native: w8a8 weights are int8");
  return w8a8_form(q, x_scale, weight.data_ptr<int8_t>(), N, K, weight_scale, bias, weight_sums, zero_point,
                   out_dtype, v, v.i8, 4);
}

// W8A8 on blocks laid out at load, [ceil(N / 32), ceil(K / 4), 128] int8 holding `outputs` = N columns
// (bloom_runtime/kernels/outer.py's outer_blocks); K is q's width.
at::Tensor w8a8_tiled(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const at::Tensor& blocks,
                      int64_t outputs, const at::Tensor& weight_scale, const c10::optional<at::Tensor>& bias,
                      const at::Tensor& weight_sums, int64_t zero_point, at::ScalarType out_dtype, int64_t index) {
  const Variant& v = variant(index);
  TORCH_CHECK(v.i8_tiled, "bloom_native: the ", v.name, " variant has no int8 outer products");
  int64_t N = outputs, K = q.dim() == 2 ? q.size(1) : 0;
  TORCH_CHECK(N > 0 && blocks.device().is_cpu() && blocks.scalar_type() == at::kChar && blocks.is_contiguous() &&
                  blocks.dim() == 3 && blocks.size(0) == (N + 31) / 32 && blocks.size(1) == (K + 3) / 4 &&
                  blocks.size(2) == 128,
              "bloom_native: w8a8_tiled takes contiguous int8 blocks [ceil(N / 32), ceil(K / 4), 128] for ", N,
              " outputs of ", K, " inputs");
  return w8a8_form(q, x_scale, blocks.data_ptr<int8_t>(), N, K, weight_scale, bias, weight_sums, zero_point,
                   out_dtype, v, v.i8_tiled, 32);
}

// x [M, K] @ (weight * weight_scale)^T for int8 weights, in x's dtype.
at::Tensor w8a16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale, int64_t index) {
  const Variant& v = variant(index);
  int64_t N = weight.size(0), K = weight.size(1), M = x.size(0);
  check_rows(weight, "weight", K);
  check_rows(x, "x", K);
  TORCH_CHECK(weight.scalar_type() == at::kChar, "bloom_native: w8a16 weights are int8");
  check_vector(weight_scale, "weight_scale", N, at::kFloat);
  const float* xf = as_float(x);
  Output out = output(M, N, x.scalar_type());
  float* sp = out.sums_ptr();
  const float* ws = weight_scale.data_ptr<float>();
  over_outputs(N, K, [&](int64_t n0, int64_t n1) {
    v.i8w(weight.data_ptr<int8_t>(), xf, M, K, n0, n1, sp, N);
    for (int64_t m = 0; m < M; m++)
      for (int64_t n = n0; n < n1; n++) sp[m * N + n] *= ws[n];
    out.round(v, n0, n1);
  });
  return out.tensor;
}

// x [M, K] @ w^T for int4 weights in compressed-tensors' packed words [N, K / 8] with float32
// scales [N, K / group], in x's dtype. K must be whole groups, a group a power of two from 32 (whole
// steps of every variant).
at::Tensor w4a16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t group,
                 int64_t index) {
  const Variant& v = variant(index);
  int64_t N = packed.size(0), K = packed.size(1) * 8, M = x.size(0);
  check_rows(packed, "packed", K / 8);
  check_rows(x, "x", K);
  TORCH_CHECK(packed.scalar_type() == at::kInt, "bloom_native: packed int4 weights are int32 words");
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0 && K % group == 0, "bloom_native: group ", group,
              " must be a power of two from 32, dividing ", K);
  check_vector(scale, "scale", N * (K / group), at::kFloat);
  Output out = output(M, N, x.scalar_type());
  float* sp = out.sums_ptr();
  auto w = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  if (v.i4bf16 && x.scalar_type() == at::kBFloat16) {
    auto xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
    over_outputs(N, K / 2, [&](int64_t n0, int64_t n1) {
      v.i4bf16(w, scale.data_ptr<float>(), __builtin_ctzll(group), xh, M, K, n0, n1, sp, N);
      out.round(v, n0, n1);
    });
    return out.tensor;
  }
  // Each step of 2F inputs: its F even inputs, then its F odd ones (a byte's low and high nibbles).
  thread_local std::vector<float> permuted;
  const float* xf = as_float(x);
  float* xp = scratch(permuted, M * K);
  int64_t lanes = v.i4_lanes;
  for (int64_t m = 0; m < M; m++)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * lanes)
      for (int64_t t = 0; t < lanes; t++) {
        xp[m * K + k0 + t] = xf[m * K + k0 + 2 * t];
        xp[m * K + k0 + lanes + t] = xf[m * K + k0 + 2 * t + 1];
      }
  over_outputs(N, K / 2, [&](int64_t n0, int64_t n1) {
    v.i4(w, scale.data_ptr<float>(), __builtin_ctzll(group), xp, M, K, n0, n1, sp, N);
    out.round(v, n0, n1);
  });
  return out.tensor;
}

// q [M, K] in W4A8's step order: each step of 2H inputs as its H even inputs, then its H odd ones;
// and per step, for each of its H / lane_bytes int32 lanes, -8 x the sum of the activations that lane
// multiplies (lane l: bytes [l x lane_bytes, (l + 1) x lane_bytes) of both halves).
void prepare_i4x8(const int8_t* q, int64_t M, int64_t K, int64_t H, int64_t lane_bytes, int8_t* x, int32_t* corr) {
  int64_t lanes = H / lane_bytes;
  for (int64_t m = 0; m < M; m++)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * H) {
      const int8_t* src = q + m * K + k0;
      int8_t* dst = x + m * K + k0;
      for (int64_t t = 0; t < H; t++) {
        dst[t] = src[2 * t];
        dst[H + t] = src[2 * t + 1];
      }
      int32_t* c = corr + (m * K + k0) / (2 * H) * lanes;
      for (int64_t l = 0; l < lanes; l++) {
        int32_t sum = 0;
        for (int64_t t = l * lane_bytes; t < (l + 1) * lane_bytes; t++) sum += dst[t] + dst[H + t];
        c[l] = -8 * sum;
      }
    }
}

// How a W4A8 op's weights come and which kernel sums them: packed rows by the row tiles (each step
// summed exactly), or blocks of 16 columns laid out at load, their scales among them, by outer products
// (each group summed exactly; variant.h).
enum class I4x8Form { Rows, Tiled };

// Groups of `group` inputs that the variant's steps fill, dividing K.
void check_group(int64_t group, int64_t K, const Variant& v) {
  int64_t step = 2 * v.i4x8_half;
  TORCH_CHECK(group > 0 && group % step == 0 && (group & (group - 1)) == 0 && K % group == 0, "bloom_native: group ",
              group, " must be a power of two, whole steps of ", step, " inputs, dividing ", K);
}

// (q @ w^T) * x_scale + bias in out_dtype for int8 q [M, K] and N outputs of int4 weights (`weights`, in
// `form`; the Rows form's float32 scales [N, K / group] at `scale`). Each group's products summed exactly
// in int32 (or each step's), times its scale, summed in float32. x_scale: [M, 1] (per row), one number,
// or None (q: float rows, quantized here; see int8_rows).
at::Tensor w4a8_form(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const uint8_t* weights,
                     const float* scale, int64_t N, int64_t K, int64_t group, const c10::optional<at::Tensor>& bias,
                     at::ScalarType out_dtype, const Variant& v, I4x8Form form) {
  int64_t M = q.size(0), step = 2 * v.i4x8_half, log2_group = __builtin_ctzll(group);
  check_rows(q, "q", K);
  const float* bp = float_bias(bias, N);
  Int8Rows rows = int8_rows(q, x_scale, v);
  thread_local std::vector<int8_t> prepared;
  thread_local std::vector<int32_t> corrections;
  const int8_t* xp = rows.q;
  int32_t* cp;
  if (form == I4x8Form::Rows) {
    int8_t* permuted = scratch(prepared, M * K);
    cp = scratch(corrections, M * K / step * (v.i4x8_half / v.i4x8_lane_bytes));
    prepare_i4x8(rows.q, M, K, v.i4x8_half, v.i4x8_lane_bytes, permuted, cp);
    xp = permuted;
  } else {  // each group's sum of each row
    cp = scratch(corrections, M * (K / group));
    for (int64_t i = 0; i < M * (K / group); i++) {
      int32_t sum = 0;
      for (int64_t k = i * group; k < (i + 1) * group; k++) sum += xp[k];
      cp[i] = sum;
    }
  }
  Output out = output(M, N, out_dtype);
  float* sp = out.sums_ptr();
  over_outputs(N, K / 2, [&](int64_t n0, int64_t n1) {
    if (form == I4x8Form::Rows)
      v.i4x8(weights, scale, log2_group, xp, cp, M, K, n0, n1, sp, N);
    else
      v.i4x8_tiled(weights, log2_group, xp, cp, M, K, n0, n1, sp, N);
    for (int64_t m = 0; m < M; m++) scale_and_bias(sp + m * N, n0, n1, rows.scale[rows.per_row ? m : 0], bp);
    out.round(v, n0, n1);
  }, form == I4x8Form::Rows ? 4 : 16);
  return out.tensor;
}

// W4A8 on compressed-tensors' packed words [N, K / 8] int32 with float32 scales [N, K / group].
at::Tensor w4a8(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const at::Tensor& packed,
                const at::Tensor& scale, int64_t group, const c10::optional<at::Tensor>& bias,
                at::ScalarType out_dtype, int64_t index) {
  const Variant& v = variant(index);
  int64_t N = packed.size(0), K = packed.size(1) * 8;
  check_rows(packed, "packed", K / 8);
  TORCH_CHECK(packed.scalar_type() == at::kInt, "bloom_native: w4a8 takes int32 packed words");
  check_group(group, K, v);
  check_vector(scale, "scale", N * (K / group), at::kFloat);
  return w4a8_form(q, x_scale, static_cast<const uint8_t*>(packed.data_ptr()), scale.data_ptr<float>(), N, K,
                   group, bias, out_dtype, v, I4x8Form::Rows);
}

// W4A8 on blocks laid out at load, [ceil(N / 16), K / 8 + K / group, 64] uint8 holding `outputs` = N
// columns and their scales (bloom_runtime/kernels/int4.py's int4_blocks); K is q's width.
at::Tensor w4a8_tiled(const at::Tensor& q, const c10::optional<at::Tensor>& x_scale, const at::Tensor& blocks,
                      int64_t outputs, int64_t group, const c10::optional<at::Tensor>& bias,
                      at::ScalarType out_dtype, int64_t index) {
  const Variant& v = variant(index);
  int64_t N = outputs, K = q.dim() == 2 ? q.size(1) : 0;
  check_group(group, K, v);
  TORCH_CHECK(N > 0 && blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.is_contiguous() &&
                  blocks.dim() == 3 &&
                  blocks.size(0) == (N + 15) / 16 && blocks.size(1) == K / 8 + K / group && blocks.size(2) == 64,
              "bloom_native: w4a8_tiled takes contiguous uint8 blocks [ceil(N / 16), K / 8 + K / group, 64] for ",
              N, " outputs of ", K, " inputs");
  return w4a8_form(q, x_scale, static_cast<const uint8_t*>(blocks.data_ptr()), nullptr, N, K, group, bias,
                   out_dtype, v, I4x8Form::Tiled);
}

// Sums [M, N] from `sums(n0, n1, out)` over torch's threads (in tiles of `tile` columns, `row_bytes` of
// weights each), the bias added, rounded once to `dtype`.
template <class Sums>
at::Tensor float_linear(int64_t M, int64_t N, int64_t row_bytes, int64_t tile, const c10::optional<at::Tensor>& bias,
                        at::ScalarType dtype, const Variant& v, const Sums& sums) {
  const float* bp = float_bias(bias, N);
  Output out = output(M, N, dtype);
  float* sp = out.sums_ptr();
  over_outputs(
      N, row_bytes,
      [&](int64_t n0, int64_t n1) {
        sums(n0, n1, sp);
        if (bp)
          for (int64_t m = 0; m < M; m++) scale_and_bias(sp + m * N, n0, n1, 1.0f, bp);
        out.round(v, n0, n1);
      },
      tile);
  return out.tensor;
}

// x [M, K] @ weight^T + bias for bfloat16 or float16 x and weight, in their dtype.
at::Tensor dense16(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   int64_t index) {
  const Variant& v = variant(index);
  int64_t N = weight.size(0), K = weight.size(1), M = x.size(0);
  check_rows(weight, "weight", K);
  check_rows(x, "x", K);
  bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && (bf16 || weight.scalar_type() == at::kHalf),
              "bloom_native: dense16 takes bfloat16 or float16 x and weight alike");
  TORCH_CHECK(bf16 || v.f16, "bloom_native: the ", v.name, " variant has no float16 conversion");
  auto w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  auto xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const float* xf = bf16 && v.bf16dot ? nullptr : as_float(x);
  return float_linear(M, N, 2 * K, 4, bias, x.scalar_type(), v, [&](int64_t n0, int64_t n1, float* sp) {
    if (!xf)
      v.bf16dot(w, xh, M, K, n0, n1, sp, N);
    else
      (bf16 ? v.bf16 : v.f16)(w, xf, M, K, n0, n1, sp, N);
  });
}

// x [M, K] @ W^T + bias for bfloat16 x, W laid out at load in blocks of 32 columns,
// [ceil(N / 32), ceil(K / 2), 64] bfloat16 holding `outputs` = N columns (bloom_runtime/kernels/outer.py's
// outer_blocks).
at::Tensor dense16_tiled(const at::Tensor& x, const at::Tensor& blocks, int64_t outputs,
                         const c10::optional<at::Tensor>& bias, int64_t index) {
  const Variant& v = variant(index);
  TORCH_CHECK(v.bf16_tiled, "bloom_native: the ", v.name, " variant has no bfloat16 outer products");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bloom_native: dense16_tiled takes bfloat16 x");
  int64_t N = outputs, K = x.size(1), M = x.size(0);
  check_rows(x, "x", K);
  TORCH_CHECK(N > 0 && blocks.device().is_cpu() && blocks.scalar_type() == at::kBFloat16 && blocks.is_contiguous() &&
                  blocks.dim() == 3 && blocks.size(0) == (N + 31) / 32 && blocks.size(1) == (K + 1) / 2 &&
                  blocks.size(2) == 64,
              "bloom_native: dense16_tiled takes contiguous bfloat16 blocks [ceil(N / 32), ceil(K / 2), 64] for ",
              N, " outputs of ", K, " inputs");
  auto w = reinterpret_cast<const uint16_t*>(blocks.data_ptr());
  auto xh = reinterpret_cast<const uint16_t*>(x.data_ptr());
  return float_linear(M, N, 2 * K, 32, bias, at::kBFloat16, v, [&](int64_t n0, int64_t n1, float* sp) {
    v.bf16_tiled(w, xh, M, K, n0, n1, sp, N);
  });
}

// One decode step's attention for B rows, each one query: reads q from the fused projection's rows,
// writes that step's key and value into the cache, and attends over the cache's columns
// [first, column]: softmax(q k^T / sqrt(D) + bias) v in float32, out in qkv's dtype.
//   qkv    [B, H * 3 * D]: per head [q, k, v] of D values (BLOOM's fused layout), contiguous rows
//   keys, values  [L, R, H, C, D]: the cache's buffers; rows row0 .. row0 + B - 1 of layer `layer`
//   bias   [B, H, 1, T], T = column - first + 1 (any float dtype, any row and head strides, positions
//          contiguous)
// -> [B, H * D] (head-major: what the output projection reads). One call replaces the cache write,
// the slicing of q, k and v and the transposes around attention, which cost more than attention
// itself for one query.
at::Tensor cached_attention(const at::Tensor& qkv, const at::Tensor& keys, const at::Tensor& values,
                            int64_t layer, int64_t row0, int64_t first, int64_t column, const at::Tensor& bias,
                            int64_t index) {
  const Variant& var = variant(index);
  TORCH_CHECK(keys.dim() == 5 && keys.sizes() == values.sizes() && keys.is_contiguous() && values.is_contiguous(),
              "bloom_native: cached_attention takes contiguous keys and values [L, R, H, C, D] alike");
  int64_t L = keys.size(0), R = keys.size(1), H = keys.size(2), C = keys.size(3), D = keys.size(4);
  int64_t B = qkv.size(0), T = column - first + 1;
  check_rows(qkv, "qkv", H * 3 * D);
  TORCH_CHECK(layer >= 0 && layer < L && row0 >= 0 && row0 + B <= R && first >= 0 && first <= column &&
                  column < C,
              "bloom_native: cached_attention: layer ", layer, ", rows ", row0, "+", B, ", columns ", first, "..",
              column, " outside the cache [", L, ", ", R, ", ", H, ", ", C, ", ", D, "]");
  TORCH_CHECK(D % var.i4_lanes == 0, "bloom_native: head size ", D, " is not whole vectors");
  TORCH_CHECK(qkv.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type() &&
              (qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kFloat),
              "bloom_native: cached_attention takes bfloat16 or float32 qkv, keys and values alike");
  TORCH_CHECK(bias.dim() == 4 && bias.size(0) == B && bias.size(1) == H && bias.size(3) == T &&
                  bias.stride(3) == 1,
              "bloom_native: cached_attention takes bias [B, H, 1, T] with its positions contiguous");
  at::Tensor out = at::empty({B, H * D}, qkv.options());  // written in qkv's dtype here: no cast op after
  bool bf16 = qkv.scalar_type() == at::kBFloat16;
  int64_t size = qkv.element_size();
  float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores, bias_row, head_out;
    float* s = scratch(scores, T + var.i4_lanes);  // attend pads the scores to whole vectors
    float* bp = scratch(bias_row, T);
    float* ho = scratch(head_out, D);
    for (int64_t i = i0; i < i1; i++) {
      int64_t r = i / H, h = i % H;
      const char* q = static_cast<const char*>(qkv.data_ptr()) + (r * H * 3 + h * 3) * D * size;
      int64_t cell = (((layer * R + row0 + r) * H + h) * C) * D;  // [layer, row, head, column 0]
      char* k = static_cast<char*>(keys.data_ptr()) + cell * size;
      char* v = static_cast<char*>(values.data_ptr()) + cell * size;
      memcpy(k + column * D * size, q + D * size, D * size);  // this step's key and value
      memcpy(v + column * D * size, q + 2 * D * size, D * size);
      const char* row = static_cast<const char*>(bias.data_ptr()) +
                        (r * bias.stride(0) + h * bias.stride(1)) * bias.element_size();
      floats(bias.scalar_type(), row, T, bp);
      if (bf16) {
        var.attend_bf16(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k) + first * D,
                        reinterpret_cast<const uint16_t*>(v) + first * D, bp, T, D, scale, s, ho);
        at::BFloat16* op = out.data_ptr<at::BFloat16>() + i * D;
        for (int64_t d = 0; d < D; d++) op[d] = at::BFloat16(ho[d]);  // to nearest even, as Tensor.to rounds
      } else {
        var.attend_f32(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k) + first * D,
                       reinterpret_cast<const float*>(v) + first * D, bp, T, D, scale, s,
                       out.data_ptr<float>() + i * D);
      }
    }
  });
  return out;
}

// Each row's first maximum of logits [B, V] (float32, bfloat16 or float16, rows contiguous): the greedy
// pick, as torch's max(dim=-1).indices gives it (a NaN counts above every number, the first NaN wins).
// Parts of a row are reduced on torch's threads, then the part holding the first maximum is scanned
// for it. torch's max with indices runs one thread a row, scalar: one row of bloom's 250880 bfloat16
// logits took 0.21 ms, 8 rows 0.84-1.6 ms, on 2 threads of an EPYC Zen 4.
at::Tensor greedy(const at::Tensor& logits, int64_t index) {
  const Variant& var = variant(index);
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "bloom_native: greedy takes CPU logits [B, V], V > 0, each row contiguous");
  at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "bloom_native: greedy takes float32, bfloat16 or float16 logits");
  constexpr int64_t PART = 16384;
  int64_t B = logits.size(0), V = logits.size(1), parts = (V + PART - 1) / PART, size = logits.element_size();
  auto base = static_cast<const char*>(logits.data_ptr());
  // The first pass over part i of row r: its largest value and whether it holds a NaN.
  auto reduce = [&](int64_t r, int64_t i, float* top, bool* nan) {
    int64_t n = std::min(PART, V - i * PART);
    const char* p = base + (r * logits.stride(0) + i * PART) * size;
    if (dtype == at::kBFloat16) return var.greatest_bf16(reinterpret_cast<const uint16_t*>(p), n, top, nan);
    if (dtype == at::kFloat) return var.greatest_f32(reinterpret_cast<const float*>(p), n, top, nan);
    thread_local std::vector<float> buffer;
    float* f = scratch(buffer, n);
    floats(dtype, p, n, f);
    var.greatest_f32(f, n, top, nan);
  };
  thread_local std::vector<float> tops;  // the calling thread's: a decode step allocates only its outputs
  thread_local std::vector<uint8_t> nans;
  float* top = scratch(tops, B * parts);
  uint8_t* nan = scratch(nans, B * parts);
  at::parallel_for(0, B * parts, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
      bool any_nan;
      reduce(j / parts, j % parts, &top[j], &any_nan);
      nan[j] = any_nan;
    }
  });
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; r++) {
    const float* t = top + r * parts;
    const uint8_t* bad = nan + r * parts;
    int64_t i = std::find(bad, bad + parts, 1) - bad;
    bool want_nan = i < parts;
    float m = want_nan ? NAN : *std::max_element(t, t + parts);
    if (!want_nan) i = std::find(t, t + parts, m) - t;
    thread_local std::vector<float> buffer;
    float* f = scratch(buffer, PART);
    int64_t n = std::min(PART, V - i * PART), k = 0;
    floats(dtype, base + (r * logits.stride(0) + i * PART) * size, n, f);
    while (k < n && !(want_nan ? f[k] != f[k] : f[k] == m)) k++;
    op[r] = i * PART + k;
  }
  return out;
}

// BLOOM's tanh GELU of contiguous bfloat16 x, over torch's threads (see variant.h's gelu). aten's runs
// one thread below 32768 values, and converts on the way: [8, 4096] took 35 us, [128, 4096] 0.53 ms on
// 2 threads of an EPYC Zen 4.
at::Tensor gelu(const at::Tensor& x, int64_t index) {
  const Variant& var = variant(index);
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "bloom_native: gelu takes contiguous bfloat16 CPU tensors");
  at::Tensor out = at::empty_like(x);
  auto in = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto op = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, x.numel(), 8192, [&](int64_t i0, int64_t i1) { var.gelu(in + i0, i1 - i0, op + i0); });
  return out;
}

// One product of a decode layer (below): op `name` on rows x, its operands taken in the op's own order
// after x from four tensor slots and three int slots (bloom_runtime/kernels' `layer_operands` fills
// them; unused slots are None or 0). The int8 ops quantize x per token inside the call and sum into
// x's dtype, as the model's modules call them.
at::Tensor layer_product(const std::string& name, const c10::List<c10::optional<at::Tensor>>& tensors,
                         at::IntArrayRef ints, int64_t slot, const at::Tensor& x) {
  auto t = [&](int64_t i) -> at::Tensor { return tensors.get(4 * slot + i).value(); };
  auto o = [&](int64_t i) -> c10::optional<at::Tensor> { return tensors.get(4 * slot + i); };
  auto n = [&](int64_t i) { return ints[3 * slot + i]; };
  at::ScalarType dtype = x.scalar_type();
  if (name == "dense16") return dense16(x, t(0), o(1), n(0));
  if (name == "dense16_tiled") return dense16_tiled(x, t(0), n(0), o(1), n(1));
  if (name == "w8a8") return w8a8(x, c10::nullopt, t(0), t(1), o(2), t(3), n(0), dtype, n(1));
  if (name == "w8a8_tiled") return w8a8_tiled(x, c10::nullopt, t(0), n(0), t(1), o(2), t(3), n(1), dtype, n(2));
  if (name == "w4a8") return w4a8(x, c10::nullopt, t(0), t(1), n(0), o(2), dtype, n(1));
  if (name == "w4a8_tiled") return w4a8_tiled(x, c10::nullopt, t(0), n(0), n(1), o(1), dtype, n(2));
  TORCH_CHECK(false, "bloom_native: decode_layer has no product ", name);
}

// One BLOOM block for decode rows x [B, hidden], in one call: what model.Block.forward runs for them,
// op for op (layer norms, the four products named in `products`, cached_attention, the residual adds,
// GELU), so the result is the same bit for bit. From Python, each of those ops costs a module call and
// a dispatch; in one call a bloom-560m decode step lost ~0.8 ms of ~10 (W4A8, 2 threads, EPYC Zen 4).
//   norms     [input_layernorm weight, bias, post_attention_layernorm weight, bias]
//   products  query_key_value, dense, dense_h_to_4h, dense_4h_to_h: each an op's name, with four
//             tensor slots of `tensors` and three of `ints` (layer_product)
//   keys .. bias, variant: as cached_attention takes them
at::Tensor decode_layer(const at::Tensor& x, at::TensorList norms, double eps, bool residual_after_norm,
                        const std::vector<std::string>& products,
                        const c10::List<c10::optional<at::Tensor>>& tensors, at::IntArrayRef ints,
                        const at::Tensor& keys, const at::Tensor& values, int64_t layer, int64_t row0,
                        int64_t first, int64_t column, const at::Tensor& bias, int64_t index) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && norms.size() == 4 && products.size() == 4 &&
                  tensors.size() == 16 && ints.size() == 12,
              "bloom_native: decode_layer takes contiguous rows [B, hidden], 4 norms' tensors and 4 products "
              "(16 tensor slots, 12 int slots)");
  int64_t hidden = x.size(1);
  auto norm = [&](const at::Tensor& v, int i) { return at::layer_norm(v, {hidden}, norms[i], norms[i + 1], eps); };
  at::Tensor normed = norm(x, 0);
  at::Tensor qkv = layer_product(products[0], tensors, ints, 0, normed);
  at::Tensor attended = cached_attention(qkv, keys, values, layer, row0, first, column, bias, index);
  at::Tensor mid = (residual_after_norm ? normed : x) + layer_product(products[1], tensors, ints, 1, attended);
  normed = norm(mid, 2);
  at::Tensor h = layer_product(products[2], tensors, ints, 2, normed);
  h = h.scalar_type() == at::kBFloat16 ? gelu(h, index) : at::gelu(h, "tanh");
  return (residual_after_norm ? normed : mid) + layer_product(products[3], tensors, ints, 3, h);
}

}  // namespace

TORCH_LIBRARY(bloom_native, m) {
  m.def("variants() -> str[]", &variants);
  m.def("supported(int variant) -> bool", &supported);
  m.def("quantize_rows(Tensor x, int variant) -> (Tensor, Tensor)");
  m.def("w8a8(Tensor q, Tensor? x_scale, Tensor weight, Tensor weight_scale, Tensor? bias, Tensor weight_sums, "
        "int zero_point, ScalarType out_dtype, int variant) -> Tensor");
  m.def("w8a8_tiled(Tensor q, Tensor? x_scale, Tensor blocks, int outputs, Tensor weight_scale, Tensor? bias, "
        "Tensor weight_sums, int zero_point, ScalarType out_dtype, int variant) -> Tensor");
  m.def("w8a16(Tensor x, Tensor weight, Tensor weight_scale, int variant) -> Tensor");
  m.def("w4a16(Tensor x, Tensor packed, Tensor scale, int group, int variant) -> Tensor");
  m.def("w4a8(Tensor q, Tensor? x_scale, Tensor packed, Tensor scale, int group, Tensor? bias, "
        "ScalarType out_dtype, int variant) -> Tensor");
  m.def("w4a8_tiled(Tensor q, Tensor? x_scale, Tensor blocks, int outputs, int group, Tensor? bias, "
        "ScalarType out_dtype, int variant) -> Tensor");
  m.def("dense16(Tensor x, Tensor weight, Tensor? bias, int variant) -> Tensor");
  m.def("dense16_tiled(Tensor x, Tensor blocks, int outputs, Tensor? bias, int variant) -> Tensor");
  m.def("greedy(Tensor logits, int variant) -> Tensor");
  m.def("gelu(Tensor x, int variant) -> Tensor");
  m.def("cached_attention(Tensor qkv, Tensor(a!) keys, Tensor(b!) values, int layer, int row0, int first, "
        "int column, Tensor bias, int variant) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor[] norms, float eps, bool residual_after_norm, str[] products, "
        "Tensor?[] tensors, int[] ints, Tensor(a!) keys, Tensor(b!) values, int layer, int row0, int first, "
        "int column, Tensor bias, int variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(bloom_native, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
  m.impl("w8a8", &w8a8);
  m.impl("w8a8_tiled", &w8a8_tiled);
  m.impl("w8a16", &w8a16);
  m.impl("w4a16", &w4a16);
  m.impl("w4a8", &w4a8);
  m.impl("w4a8_tiled", &w4a8_tiled);
  m.impl("dense16", &dense16);
  m.impl("dense16_tiled", &dense16_tiled);
  m.impl("cached_attention", &cached_attention);
  m.impl("decode_layer", &decode_layer);
  m.impl("greedy", &greedy);
  m.impl("gelu", &gelu);
}
