// One ISA variant of the decode kernels: the sums of weight rows [n0, n1) with M activation rows.
//
// decode.cpp includes this file once per variant, inside `namespace <variant>` and under that
// variant's target pragma, with VBYTES (its vector width in bytes) and the I8_KIND, BF16DOT and F16C
// switches set (and undefined again at the end). Everything here is inline or static, so each copy
// is compiled for its own ISA and no instruction of one variant reaches another. The epilogues
// (scales, bias, output dtype) are decode.cpp's, shared by all variants; only the inner products
// live here.
//
// Each weight vector is loaded and converted once for up to MR activation rows: for up to MR rows (one
// decode, a small batch) the weights are read one row at a time, a single stream at the memory's pace;
// for more (a batch of 8 decodes, a prefill), in blocks of NR weight rows, each activation vector
// loaded once for NR of them (see `tile`).

constexpr int F = VBYTES / 4;  // float or int32 lanes of a vector
constexpr int MR = 4;  // activation rows a weight vector serves once loaded

typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
typedef uint32_t vu __attribute__((vector_size(VBYTES)));
typedef int8_t vb __attribute__((vector_size(F)));        // F int8
typedef uint8_t vub __attribute__((vector_size(F)));      // F uint8
typedef uint16_t vh __attribute__((vector_size(2 * F)));  // F 16-bit floats

template <class V>
static inline V load(const void* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}

// The sum of a vector's lanes: once per output, so at K = 1024 a lane-by-lane loop would cost a
// third of the int8 dot products themselves; the x86 variants halve the vector log2(F) times.
#if VBYTES == 64
static inline int32_t total(vi v) { return _mm512_reduce_add_epi32((__m512i)v); }
static inline float total(vf v) { return _mm512_reduce_add_ps((__m512)v); }
#elif VBYTES == 32
static inline int32_t total(vi v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128((__m256i)v), _mm256_extracti128_si256((__m256i)v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
static inline float total(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
template <class V>
static inline auto total(V v) {
  auto s = v[0];
  for (size_t i = 1; i < sizeof v / sizeof v[0]; i++) s += v[i];
  return s;
}
#endif

// Widening loads: F narrow integers to F int32 lanes (GCC scalarizes __builtin_convertvector between
// these widths, so the x86 variants name the instruction).
#if VBYTES == 64
static inline vi widen_i8(const int8_t* p) { return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline vi widen_u8(const uint8_t* p) { return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline vi widen_u16(const uint16_t* p) {
  return (vi)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
}
#elif VBYTES == 32
static inline vi widen_i8(const int8_t* p) { return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline vi widen_u8(const uint8_t* p) { return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline vi widen_u16(const uint16_t* p) { return (vi)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)); }
#else
static inline vi widen_i8(const int8_t* p) { return __builtin_convertvector(load<vb>(p), vi); }
static inline vi widen_u8(const uint8_t* p) { return __builtin_convertvector(load<vub>(p), vi); }
static inline vi widen_u16(const uint16_t* p) { return __builtin_convertvector(load<vh>(p), vi); }
#endif

static inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// The tile: MR_ activation rows against NR_ weight rows, K inputs. `Op` says what a step of STEP inputs
// does: `weights(row, k)` loads and converts a row's weights once for all MR_ activation rows, `acts(x)`
// loads an activation row's once for all NR_ weight rows, `madd` multiplies the two into an
// accumulator; `one` is the scalar form for the inputs past the last step.
//
// For up to MR activation rows (one pass of a tile over each weight row) a tile takes one weight row
// (NR_ = 1): the weights stay a single sequential stream, which the hardware prefetchers follow at the
// memory's pace (four rows interleaved ran at two thirds of it on the EPYC this was written on), and
// two accumulators, taking alternate steps, halve the chain of dependent multiply-adds. With more
// activation rows the products, not the memory, set the pace (one weight row against 8 activation
// rows ran at 2.5x the one-row time there): a tile of NR weight rows then loads each activation
// vector once for NR_ products (at 4 rows the single stream was still the faster there). Float sums
// keep the two alternating accumulators in every tile, so that a row's sums, to the bit, do not
// depend on the rows batched with it; exact (int32) sums may take their steps in any order, and their
// MR_ x NR_ accumulators are chains enough.
template <int MR_, int NR_, class Op>
static inline void tile(const Op& op, int64_t n, const typename Op::X* x, int64_t K, typename Op::S* out,
                        int64_t ldo) {
  constexpr int C = NR_ > 1 && Op::EXACT ? 1 : 2;  // chains of accumulators, taking steps in turn
  typename Op::Acc acc[C][MR_][NR_];
  for (int c = 0; c < C; c++)
    for (int m = 0; m < MR_; m++)
      for (int j = 0; j < NR_; j++) acc[c][m][j] = typename Op::Acc{};
  auto step = [&](int c, int64_t k) {
    typename Op::WV w[NR_];
    for (int j = 0; j < NR_; j++) w[j] = op.weights(n + j, k);
    // NR_ interleaved streams lose the hardware prefetchers: ask for the next block's lines at this
    // step's offsets, into L2 (locality 2: prefetcht1). The non-temporal hint (locality 0) left blocks
    // at about three quarters of the one-row pace on the EPYC this was written on, where the L2 hint
    // took W8A8's 8-row head from ~16 to ~12 ms and bfloat16's from ~30 to ~18. Past the last block
    // these are addresses no load reads; a prefetch never faults.
    if constexpr (NR_ > 1)
      for (int j = 0; j < NR_; j++) __builtin_prefetch(op.at(n + NR_ + j, k), 0, 2);
    for (int m = 0; m < MR_; m++) {
      typename Op::XV a = op.acts(x + m * K + k);
      for (int j = 0; j < NR_; j++) acc[c][m][j] = Op::madd(acc[c][m][j], w[j], a);
    }
  };
  int64_t k = 0;
  for (; k + C * Op::STEP <= K; k += C * Op::STEP)
    for (int c = 0; c < C; c++) step(c, k + c * Op::STEP);
  for (; k + Op::STEP <= K; k += Op::STEP) step(0, k);
  for (int m = 0; m < MR_; m++)
    for (int j = 0; j < NR_; j++) {
      typename Op::Acc sum = acc[0][m][j];
      for (int c = 1; c < C; c++) sum = sum + acc[c][m][j];
      typename Op::S s = total(sum);
      for (int64_t t = k; t < K; t++) s += op.one(n + j, t, x[m * K + t]);
      out[m * ldo + n + j] = s;
    }
}

// The activation rows against weight rows n..n+NR_-1: tiles of MR rows, then one tile of the rest.
template <int NR_, class Op>
static inline void over_rows(const Op& op, int64_t n, const typename Op::X* x, int64_t M, int64_t K,
                             typename Op::S* out, int64_t ldo) {
  static_assert(MR == 4, "the rest below is 1, 2 or 3 rows");
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, NR_>(op, n, x + m * K, K, out + m * ldo, ldo);
  const typename Op::X* rest = x + m * K;
  if (M - m == 3) tile<3, NR_>(op, n, rest, K, out + m * ldo, ldo);
  if (M - m == 2) tile<2, NR_>(op, n, rest, K, out + m * ldo, ldo);
  if (M - m == 1) tile<1, NR_>(op, n, rest, K, out + m * ldo, ldo);
}

// Weight rows a tile takes when there are several activation rows, so that its accumulators (MR x NR,
// twice for float sums), NR weight vectors and an activation vector fit the registers: 32 in AVX-512,
// 16 in AVX2 and the portable variant.
constexpr int NR_EXACT = VBYTES == 64 ? 4 : 2;
constexpr int NR_FLOAT = VBYTES == 64 ? 2 : 1;

// Columns [n0, n1) of out [M, ldo]: one weight row at a time for up to MR activation rows, blocks of
// NR weight rows for more (see `tile`), the rows past the last block one at a time.
template <class Op>
static void rows(const Op& op, const typename Op::X* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                 typename Op::S* out, int64_t ldo) {
  constexpr int NR = Op::EXACT ? NR_EXACT : NR_FLOAT;
  int64_t n = n0;
  if (M > MR)
    for (; n + NR <= n1; n += NR) over_rows<NR>(op, n, x, M, K, out, ldo);
  for (; n < n1; n++) over_rows<1>(op, n, x, M, K, out, ldo);
}

// ---- int8 x int8, exact int32 sums ------------------------------------------------------------
// Activations come prepared (decode.cpp's prepare_i8) as I8_ACT says: int32 (portable), int16
// (pairs multiplied and added in 32 bits by madd: exact for every int8), or uint8 q + 128 (VNNI's
// u8 x s8 dot; decode.cpp subtracts 128 x the row's weight sum).
struct I8 {
  const int8_t* w;
  int64_t K;
  static constexpr bool EXACT = true;
  typedef int32_t S;
  typedef vi Acc;
#if I8_KIND == I8_VNNI
  typedef uint8_t X;
  typedef __m512i WV;
  static constexpr int STEP = 64;
  WV weights(int64_t n, int64_t k) const { return _mm512_loadu_si512(w + n * K + k); }
  typedef __m512i XV;
  static XV acts(const X* x) { return _mm512_loadu_si512(x); }
  static Acc madd(Acc acc, WV wv, XV xv) { return (Acc)_mm512_dpbusd_epi32((__m512i)acc, xv, wv); }
#elif I8_KIND == I8_MADD512
  typedef int16_t X;
  typedef __m512i WV;
  static constexpr int STEP = 32;
  WV weights(int64_t n, int64_t k) const {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + n * K + k)));
  }
  typedef __m512i XV;
  static XV acts(const X* x) { return _mm512_loadu_si512(x); }
  static Acc madd(Acc acc, WV wv, XV xv) { return acc + (Acc)_mm512_madd_epi16(wv, xv); }
#elif I8_KIND == I8_MADD256
  typedef int16_t X;
  typedef __m256i WV;
  static constexpr int STEP = 16;
  WV weights(int64_t n, int64_t k) const {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + n * K + k)));
  }
  typedef __m256i XV;
  static XV acts(const X* x) { return _mm256_loadu_si256((const __m256i*)x); }
  static Acc madd(Acc acc, WV wv, XV xv) { return acc + (Acc)_mm256_madd_epi16(wv, xv); }
#else
  typedef int32_t X;
  typedef vi WV;
  static constexpr int STEP = F;
  WV weights(int64_t n, int64_t k) const { return widen_i8(w + n * K + k); }
  typedef vi XV;
  static XV acts(const X* x) { return load<vi>(x); }
  static Acc madd(Acc acc, WV wv, XV xv) { return acc + wv * xv; }
#endif
  S one(int64_t n, int64_t k, X x) const { return S(w[n * K + k]) * S(x); }
  const void* at(int64_t n, int64_t k) const { return w + n * K + k; }
};

static void i8_rows(const int8_t* w, const void* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                    int32_t* out, int64_t ldo) {
  rows(I8{w, K}, static_cast<const I8::X*>(x), M, K, n0, n1, out, ldo);
}

// ---- 16-bit or int8 weights x float32 activations, float32 sums --------------------------------
struct Bf16Weights {
  static vf convert(const uint16_t* p) {
    return (vf)(widen_u16(p) << 16);
  }
  static float scalar(uint16_t h) { return bf16_to_float(h); }
};

#if F16C
struct F16Weights {
#if VBYTES == 64
  static vf convert(const uint16_t* p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#else
  static vf convert(const uint16_t* p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
#endif
  static float scalar(uint16_t h) { return _cvtsh_ss(h); }
};
#endif

struct I8Weights {
  static vf convert(const int8_t* p) { return __builtin_convertvector(widen_i8(p), vf); }
  static float scalar(int8_t v) { return float(v); }
};

template <class T, class Conv>
struct FloatDot {
  const T* w;
  int64_t K;
  static constexpr bool EXACT = false;
  typedef float S;
  typedef float X;
  typedef vf Acc;
  typedef vf WV;
  static constexpr int STEP = F;
  WV weights(int64_t n, int64_t k) const { return Conv::convert(w + n * K + k); }
  typedef vf XV;
  static XV acts(const X* x) { return load<vf>(x); }
  static Acc madd(Acc acc, WV wv, XV xv) { return acc + wv * xv; }
  S one(int64_t n, int64_t k, X x) const { return Conv::scalar(w[n * K + k]) * x; }
  const void* at(int64_t n, int64_t k) const { return w + n * K + k; }
};

static void bf16_rows(const uint16_t* w, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                      float* out, int64_t ldo) {
  rows(FloatDot<uint16_t, Bf16Weights>{w, K}, x, M, K, n0, n1, out, ldo);
}

#if F16C
static void f16_rows(const uint16_t* w, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                     float* out, int64_t ldo) {
  rows(FloatDot<uint16_t, F16Weights>{w, K}, x, M, K, n0, n1, out, ldo);
}
#endif

static void i8w_rows(const int8_t* w, const float* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                     float* out, int64_t ldo) {
  rows(FloatDot<int8_t, I8Weights>{w, K}, x, M, K, n0, n1, out, ldo);
}

#if BF16DOT
// bfloat16 x bfloat16 pairs summed in float32 by vdpbf16ps: the activations stay bfloat16.
struct Bf16Dot {
  const uint16_t* w;
  int64_t K;
  static constexpr bool EXACT = false;
  typedef float S;
  typedef uint16_t X;
  typedef vf Acc;
  typedef __m512i WV;
  static constexpr int STEP = 32;
  WV weights(int64_t n, int64_t k) const { return _mm512_loadu_si512(w + n * K + k); }
  typedef __m512i XV;
  static XV acts(const X* x) { return _mm512_loadu_si512(x); }
  static Acc madd(Acc acc, WV wv, XV xv) { return (Acc)_mm512_dpbf16_ps((__m512)acc, (__m512bh)xv, (__m512bh)wv); }
  S one(int64_t n, int64_t k, X x) const { return bf16_to_float(w[n * K + k]) * bf16_to_float(x); }
  const void* at(int64_t n, int64_t k) const { return w + n * K + k; }
};

static void bf16dot_rows(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                         float* out, int64_t ldo) {
  rows(Bf16Dot{w, K}, x, M, K, n0, n1, out, ldo);
}

#endif

// ---- int4 weights (compressed-tensors' words: byte t of a row holds inputs 2t and 2t + 1 as
// nibbles q + 8, low first) x float32 activations. A step takes F bytes (2F inputs); decode.cpp
// permutes each activation row so the step's even inputs come first, then its odd ones
// (permute_i4). The group's scale multiplies the converted weights: the dequantized math.
struct I4 {
  const uint8_t* w;  // [N, K / 2]
  const float* scale;  // [N, K / group]
  int64_t K, log2_group;  // groups are powers of two: the scale's index is a shift, not a division
  static constexpr bool EXACT = false;
  typedef float S;
  typedef float X;
  typedef vf Acc;
  struct WV {
    vf lo, hi;
  };
  typedef WV XV;  // the step's even inputs, then its odd ones
  static constexpr int STEP = 2 * F;
  WV weights(int64_t n, int64_t k) const {
    vi b = widen_u8(w + (n * K + k) / 2);
    float s = scale[(n * K + k) >> log2_group];
    return {__builtin_convertvector((b & 15) - 8, vf) * s, __builtin_convertvector((b >> 4) - 8, vf) * s};
  }
  static XV acts(const X* x) { return {load<vf>(x), load<vf>(x + F)}; }
  static Acc madd(Acc acc, const WV& wv, const XV& xv) { return acc + (wv.lo * xv.lo + wv.hi * xv.hi); }
  S one(int64_t, int64_t, X) const { return 0; }  // K is whole steps (a group is whole steps)
  const void* at(int64_t n, int64_t k) const { return w + (n * K + k) / 2; }
};

static void i4_rows(const uint8_t* w, const float* scale, int64_t log2_group, const float* x, int64_t M,
                    int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  rows(I4{w, scale, K, log2_group}, x, M, K, n0, n1, out, ldo);
}

#if BF16DOT
// int4 weights x bfloat16 activations, paired in vdpbf16ps. A byte's two nibbles become a 32-bit
// lane of two bfloat16 (low nibble first: the inputs' own order, so the activations need no
// permutation), looked up from a table of n - 8 by vpermw; integers below 8 are exact in bfloat16, so
// each product is exact, summed in float32. Each step's 32 products are summed from zero, then take
// their group's scale into one of four accumulators, so that no long chain of dependent adds forms.
static inline __m512i i4_as_bf16(const uint8_t* p, __m512i table) {
  __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));        // byte t in lane t
  __m512i idx = _mm512_ternarylogic_epi32(x, _mm512_slli_epi32(x, 12), _mm512_set1_epi32(0x000F000F),
                                          0xA8);  // (x | x << 12) & 0x000F000F: low nibble, high << 16
  return _mm512_permutexvar_epi16(idx, table);
}

static void i4bf16_rows(const uint8_t* w, const float* scale, int64_t log2_group, const uint16_t* x, int64_t M,
                        int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  alignas(64) uint16_t values[32];
  for (int i = 0; i < 32; i++) {
    float f = float(i % 16 - 8);
    uint32_t bits;
    memcpy(&bits, &f, 4);
    values[i] = uint16_t(bits >> 16);  // exact: a small integer's low half is zero
  }
  const __m512i table = _mm512_load_si512(values);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w + n * K / 2;
    const float* scales = scale + (n * K >> log2_group);
    auto step = [&](const uint16_t* xr, int64_t k, __m512 acc) {  // 32 inputs, scaled by their group's
      __m512bh weights = (__m512bh)i4_as_bf16(row + k / 2, table);
      __m512 dot = _mm512_dpbf16_ps(zero, (__m512bh)_mm512_loadu_si512(xr + k), weights);
      return _mm512_fmadd_ps(dot, _mm512_set1_ps(scales[k >> log2_group]), acc);
    };
    for (int64_t m = 0; m < M; m++) {
      const uint16_t* xr = x + m * K;
      __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;  // four chains of dependent adds
      int64_t k = 0;
      for (; k + 128 <= K; k += 128) {
        a0 = step(xr, k, a0);
        a1 = step(xr, k + 32, a1);
        a2 = step(xr, k + 64, a2);
        a3 = step(xr, k + 96, a3);
      }
      for (; k < K; k += 32) a0 = step(xr, k, a0);
      out[m * ldo + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
  }
}
#endif

// ---- int4 weights x int8 activations (W4A8): exact int32 sums a step, float32 across steps ----------
// A step takes H packed bytes (2H inputs, within one group: a group is whole steps) of a weight row,
// its nibbles kept unsigned (q + 8: 0..15) so that they can be the unsigned side of the x86 byte
// products. Activations come prepared by decode.cpp (prepare_i4x8): each step's H even inputs, then
// its H odd ones (a byte's low and high nibbles), int8, and per step F int32 lanes holding
// -8 x the sum of the activations that lane multiplies, which take the nibbles' 8 back out. So a
// lane's int32 sum is exact (at most 2 x 4 x 15 x 128 per lane a step; pairs in 16 bits at most
// 2 x 15 x 128 + 2 x 15 x 128 = 7680: no saturation), then converted and scaled by the group's scale.
struct I4x8 {
  const uint8_t* w;  // [N, K / 2]
  const float* scale;  // [N, K / group]
  int64_t K, log2_group;
  const int8_t* x0;  // the prepared activations [M, K] ...
  const int32_t* corr0;  // ... and their corrections [M, K / STEP, F]
  static constexpr bool EXACT = false;
  typedef float S;
  typedef int8_t X;
  typedef vf Acc;
#if I8_KIND == I8_PORTABLE
  static constexpr int H = F;  // bytes a step: one per int32 lane
  typedef vi V;
  static V nibbles(const uint8_t* p) { return widen_u8(p); }
  static V low(V b) { return b & 15; }
  static V high(V b) { return b >> 4; }
  static V act(const int8_t* p) { return widen_i8(p); }
  static vi dot(vi acc, V w, V x) { return acc + w * x; }
#elif VBYTES == 64
  static constexpr int H = 64;
  typedef __m512i V;
  static V nibbles(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static V low(V b) { return _mm512_and_si512(b, _mm512_set1_epi8(15)); }
  static V high(V b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(15)); }
  static V act(const int8_t* p) { return _mm512_loadu_si512(p); }
#if I8_KIND == I8_VNNI
  static vi dot(vi acc, V w, V x) { return (vi)_mm512_dpbusd_epi32((__m512i)acc, w, x); }
#else
  static vi dot(vi acc, V w, V x) {
    return acc + (vi)_mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
  }
#endif
#else
  static constexpr int H = 32;
  typedef __m256i V;
  static V nibbles(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static V low(V b) { return _mm256_and_si256(b, _mm256_set1_epi8(15)); }
  static V high(V b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15)); }
  static V act(const int8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static vi dot(vi acc, V w, V x) {
    return acc + (vi)_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
  }
#endif
  static constexpr int STEP = 2 * H;
  struct WV {
    V lo, hi;
    vf scale;
  };
  struct XV {
    V lo, hi;
    vi corr;
  };
  WV weights(int64_t n, int64_t k) const {
    V b = nibbles(w + (n * K + k) / 2);
    return {low(b), high(b), vf{} + scale[(n * K + k) >> log2_group]};
  }
  XV acts(const X* x) const {
    return {act(x), act(x + H), load<vi>(corr0 + (x - x0) / STEP * F)};
  }
  static Acc madd(Acc acc, const WV& wv, const XV& xv) {
    return acc + __builtin_convertvector(dot(dot(xv.corr, wv.lo, xv.lo), wv.hi, xv.hi), vf) * wv.scale;
  }
  S one(int64_t, int64_t, X) const { return 0; }  // K is whole steps
  const void* at(int64_t n, int64_t k) const { return w + (n * K + k) / 2; }
};

static void i4x8_rows(const uint8_t* w, const float* scale, int64_t log2_group, const int8_t* x,
                      const int32_t* corr, int64_t M, int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  rows(I4x8{w, scale, K, log2_group, x, corr}, x, M, K, n0, n1, out, ldo);
}

// ---- W4A8 as outer products, on blocks of 16 columns ---------------------------------------------------
// The row tiles above sum along K inside a vector, so that every (row, column, step) ends in a conversion
// and a multiply-add of its own, and the int4 x int8 products ran at a quarter of the int8 peak with
// 128 rows. Here a vector's int32 lanes are NB output columns instead, on weights in blocks: block b
// holds columns [NB b, NB b + NB), group after group, each as its group / 8 lines of 64 bytes and then
// one line of the NB columns' float32 scales. A weight line p of a group has byte 4c + i holding column
// c's inputs 8p + i (low nibble) and 8p + 4 + i (high nibble) of the group, each q + 8: two quads of
// inputs for every column. Each activation quad is broadcast to every lane, and a group's sums for OR
// rows x NB columns stay in int32 registers, converted and scaled once a group by the line after it.
// The blocks are laid out at load (in place of the packed rows and the scales: held once); laying them
// out per call by gathers cost more than the products below about 32 rows, and gathering each block's
// scales per call cost a fifth of a one-row call. At one row the blocks are a single sequential stream,
// scales included. A row's sums do not depend on the rows batched with it: each output takes its groups
// in order, whatever the tile.
constexpr int NB = 16;  // columns of a block: the int32 lanes of a 64-byte vector
constexpr int OV = NB / F;  // vectors a line of a block takes
constexpr int OR = VBYTES == 64 ? 8 : 2;  // rows a weight vector serves: OR x OV int32 and float accumulators

// acc + each lane's four unsigned weight bytes times the four signed activation bytes of x (in every lane).
static inline vi dot4(vi acc, vi w, vi x) {
#if I8_KIND == I8_VNNI
  return (vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, (__m512i)x);
#elif I8_KIND == I8_MADD512
  return acc + (vi)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)w, (__m512i)x), _mm512_set1_epi16(1));
#elif I8_KIND == I8_MADD256
  return acc + (vi)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x), _mm256_set1_epi16(1));
#else
  auto byte = [](vi v, int b) { return (((v >> (8 * b)) & 255) ^ 128) - 128; };  // sign-extended
  return acc + (w & 255) * byte(x, 0) + ((w >> 8) & 255) * byte(x, 1) + ((w >> 16) & 255) * byte(x, 2) +
         ((w >> 24) & 255) * byte(x, 3);
#endif
}

// R rows of x (K apart) against a block: out's rows (ldo apart) get columns [0, nc) of the sum over
// groups of the group's scale x (its exact int32 sum - 8 x the activations' sum over the group).
template <int R>
static void block_tile(const uint8_t* block, const int8_t* x, const int32_t* xsum, int64_t K,
                       int64_t log2_group, float* out, int64_t ldo, int64_t nc) {
  // Sums c of a (row, vector): even c take low nibbles, odd c high ones. With few rows a line's products
  // would wait on one another (vpdpbusd adds into its accumulator), so C = 4 independent sums over
  // LINES = 2 lines a pass. VNNI multiplies unsigned weight bytes, so a high nibble is taken in place
  // (16 h, one op fewer a line) into sums of its own, divided by 16 once a group (exact: multiples of
  // 16); maddubs' int16 pairs would saturate on 16 h, so there C may be 1.
  constexpr int C = R * OV < 4 ? 4 : 1, LINES = C > 2 ? 2 : 1;
  constexpr bool HIGH_IN_PLACE = I8_KIND == I8_VNNI && C > 1;
  int64_t groups = K >> log2_group, lines_a_group = (int64_t(1) << log2_group) / 8;
  vf acc[R][OV];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < OV; v++) acc[r][v] = vf{};
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* group = block + g * (lines_a_group + 1) * 64;  // its weight lines, then its scales
    vi sum[R][OV][C];
    for (int r = 0; r < R; r++)
      for (int v = 0; v < OV; v++)
        for (int c = 0; c < C; c++) sum[r][v][c] = vi{};
    for (int64_t p = 0; p < lines_a_group; p += LINES) {
      for (int u = 0; u < LINES; u++) {
        const uint8_t* line = group + (p + u) * 64;
        // With several rows a line takes longer than the prefetchers' pace: ask for the line 4 KB ahead
        // (the blocks are one stream; past their end no load reads it, and a prefetch never faults).
        // On the EPYC this was written on, non-temporally: 8 rows of the head 7.7 -> 6.4 ms, of
        // 1024x4096 0.18 -> 0.11; into L2 (locality 2) less; one row gained nothing either way.
        if constexpr (R > 1) __builtin_prefetch(line + 4096, 0, 0);
        vi low[OV], high[OV];
        for (int v = 0; v < OV; v++) {
          vi bytes = load<vi>(line + v * VBYTES);
          // Held in a register: gcc otherwise folds the load into both ands below, reading each line
          // twice; on the EPYC this was written on that cost a tenth of a one-row call in cache and an
          // eighth at 8 rows (4096x1024: 39.5 -> 35.4 us on one thread; 8 rows 107 -> 93 us).
          __asm__("" : "+v"(bytes));
          low[v] = bytes & 0x0F0F0F0F;
          high[v] = HIGH_IN_PLACE ? bytes & int32_t(0xF0F0F0F0) : (bytes >> 4) & 0x0F0F0F0F;
        }
        for (int r = 0; r < R; r++) {
          const int8_t* xr = x + r * K + (g << log2_group) + 8 * (p + u);
          vi first = vi{} + load<int32_t>(xr), second = vi{} + load<int32_t>(xr + 4);
          for (int v = 0; v < OV; v++) {
            vi& a = sum[r][v][(2 * u) % C];
            vi& b = sum[r][v][(2 * u + 1) % C];
            a = dot4(a, low[v], first);
            b = dot4(b, high[v], second);
          }
        }
      }
    }
    const float* scales = reinterpret_cast<const float*>(group + lines_a_group * 64);
    for (int r = 0; r < R; r++) {
      vi offset = vi{} + 8 * xsum[r * groups + g];
      for (int v = 0; v < OV; v++) {
        vi low = sum[r][v][0], high = C > 1 ? sum[r][v][1] : vi{};
        for (int c = 2; c < C; c++) (c % 2 ? high : low) += sum[r][v][c];
        vi total = (HIGH_IN_PLACE ? low + (high >> 4) : low + high) - offset;
        acc[r][v] += __builtin_convertvector(total, vf) * load<vf>(scales + v * F);
      }
    }
  }
  for (int r = 0; r < R; r++) memcpy(out + r * ldo, acc[r], nc * sizeof(float));
}

// The last rows < OR against a block: the tile of their count.
template <int R>
static void block_rest(int64_t rows, const uint8_t* block, const int8_t* x, const int32_t* xsum, int64_t K,
                       int64_t log2_group, float* out, int64_t ldo, int64_t nc) {
  if constexpr (R > 0) {
    if (rows == R) return block_tile<R>(block, x, xsum, K, log2_group, out, ldo, nc);
    block_rest<R - 1>(rows, block, x, xsum, K, log2_group, out, ldo, nc);
  }
}

// Columns [n0, n1) of out [M, ldo] (n0 a multiple of NB) from weights laid out in blocks at load
// ([ceil(N / NB), K / 8 + K / group, 64] bytes; bloom_runtime/kernels/int4.py's int4_blocks): x [M, K]
// int8, xsum [M, K / group] each group's sum of a row.
static void i4x8_tiled(const uint8_t* blocks, int64_t log2_group, const int8_t* x, const int32_t* xsum, int64_t M,
                       int64_t K, int64_t n0, int64_t n1, float* out, int64_t ldo) {
  int64_t groups = K >> log2_group, block_bytes = (K / 8 + groups) * 64;
  for (int64_t nb = n0; nb < n1; nb += NB) {
    const uint8_t* block = blocks + nb / NB * block_bytes;
    int64_t nc = std::min<int64_t>(NB, n1 - nb), m = 0;
    for (; m + OR <= M; m += OR)
      block_tile<OR>(block, x + m * K, xsum + m * groups, K, log2_group, out + m * ldo + nb, ldo, nc);
    block_rest<OR - 1>(M - m, block, x + m * K, xsum + m * groups, K, log2_group, out + m * ldo + nb, ldo, nc);
  }
}

#if I8_KIND == I8_VNNI
// ---- outer products on blocks of 32 columns: bfloat16 (vdpbf16ps) and W8A8 (vpdpbusd) ------------------
// The row tiles sum along K inside a vector and end every (row, column) in a horizontal sum; at 8 rows
// they stayed near two thirds of the dot instruction's peak even in cache (bfloat16: 260-310 GFLOP/s of
// ~467 on 2 cores of the EPYC Zen 4 this was written on). Here a vector's 32-bit lanes are output
// columns instead, on weights laid out at load (bloom_runtime/kernels/outer.py's outer_blocks): block b
// holds columns [32 b, 32 b + 32) as lines of a 32-bit unit of inputs (U = 2 bfloat16, or 4 int8) for
// each of its columns, line p's unit c holding column c's inputs U p .. U p + U - 1 (zeros past N and K).
// An activation row's unit p is broadcast to every lane, so one instruction adds 16 columns' products of
// the unit, with no horizontal sums. Every column sums its units in order in one accumulator, whatever the
// tile, so a row's sums do not depend on the rows batched with it. One row reads one stream a block.
constexpr int OUT_NB = 32;  // columns of a block: two vectors of 32-bit lanes
constexpr int OUT_OR = 8;  // rows a block's lines serve at once: 8 x 2 accumulators

// bfloat16 pairs, summed in float32.
struct OuterBf16 {
  typedef uint16_t T;  // weights and activations alike
  typedef float S;
  typedef __m512 Acc;
  static Acc zero() { return _mm512_setzero_ps(); }
  static void store(S* out, Acc acc) { _mm512_store_ps(out, acc); }
#if BF16DOT
  static Acc madd(Acc acc, __m512i x, __m512i w) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
#endif
};

// int8 quads: activations as uint8 q + 128, weights int8, summed exactly in int32 (the caller takes
// 128 x each column's weight sum back out, as for the VNNI row tiles).
struct OuterI8 {
  typedef uint8_t T;
  typedef int32_t S;
  typedef __m512i Acc;
  static Acc zero() { return _mm512_setzero_si512(); }
  static void store(S* out, Acc acc) { _mm512_store_si512(out, acc); }
  static Acc madd(Acc acc, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(acc, x, w); }
};

// Blocks a tile of R rows takes at once: each instruction waits on the last into its accumulator, so
// fewer than about six chains (2 R a block) leave the unit idle; the blocks' streams run side by side.
template <int R>
constexpr int outer_blocks_at() { return R == 1 ? 4 : R == 2 ? 2 : 1; }

// x's unit p (4 bytes: U inputs) in every lane; `whole`: all U of them lie before K, else the inputs
// past K are zeros (never read past x).
template <bool whole, class T>
static inline __m512i unit(const T* x, int64_t p, int64_t K) {
  constexpr int64_t U = 4 / sizeof(T);
  T part[U] = {};
  for (int64_t i = 0; i < U && (whole || U * p + i < K); i++) part[i] = x[U * p + i];
  uint32_t bits;
  memcpy(&bits, part, 4);
  return _mm512_set1_epi32(int32_t(bits));
}

// R rows of x (K apart) against B blocks (`stride` elements apart): out's rows (ldo apart) get columns
// [0, nc) of the B x 32.
template <class Dot, int R, int B>
static void outer_tile(const typename Dot::T* block, int64_t stride, const typename Dot::T* x, int64_t K,
                       typename Dot::S* out, int64_t ldo, int64_t nc) {
  constexpr int V = 2 * B;  // vectors of a line across the blocks
  constexpr int64_t U = 4 / sizeof(typename Dot::T), LINE = OUT_NB * U;  // elements of a unit, a line
  typename Dot::Acc acc[R][V];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < V; v++) acc[r][v] = Dot::zero();
  auto line = [&](int64_t p, auto whole) {
    __m512i w[V];
    for (int v = 0; v < V; v++) w[v] = _mm512_loadu_si512(block + v / 2 * stride + p * LINE + v % 2 * LINE / 2);
    for (int r = 0; r < R; r++) {
      __m512i a = unit<decltype(whole)::value>(x + r * K, p, K);
      for (int v = 0; v < V; v++) acc[r][v] = Dot::madd(acc[r][v], a, w[v]);
    }
  };
  int64_t p = 0;
  for (; p < K / U; p++) line(p, std::true_type{});
  if (K % U) line(p, std::false_type{});  // the last inputs, with zeros after them
  for (int r = 0; r < R; r++) {
    alignas(64) typename Dot::S sums[V * 16];
    for (int v = 0; v < V; v++) Dot::store(sums + 16 * v, acc[r][v]);  // no address taken: acc stays in registers
    memcpy(out + r * ldo, sums, nc * sizeof(typename Dot::S));
  }
}

// R rows against `count` <= outer_blocks_at<R>() blocks holding nc columns: all at once, or one by one.
template <class Dot, int R>
static void outer_blocks(const typename Dot::T* block, int64_t stride, int64_t count, const typename Dot::T* x,
                         int64_t K, typename Dot::S* out, int64_t ldo, int64_t nc) {
  constexpr int B = outer_blocks_at<R>();
  if (count == B) return outer_tile<Dot, R, B>(block, stride, x, K, out, ldo, nc);
  for (int64_t b = 0; b < count; b++)
    outer_tile<Dot, R, 1>(block + b * stride, stride, x, K, out + b * OUT_NB, ldo,
                          std::min<int64_t>(OUT_NB, nc - b * OUT_NB));
}

// The last rows < OUT_OR: the tile of their count.
template <class Dot, int R>
static void outer_rest(int64_t rows, const typename Dot::T* block, int64_t stride, int64_t count,
                       const typename Dot::T* x, int64_t K, typename Dot::S* out, int64_t ldo, int64_t nc) {
  if constexpr (R > 0) {
    if (rows == R) return outer_blocks<Dot, R>(block, stride, count, x, K, out, ldo, nc);
    outer_rest<Dot, R - 1>(rows, block, stride, count, x, K, out, ldo, nc);
  }
}

// Columns [n0, n1) of out [M, ldo] (n0 a multiple of OUT_NB) from outer_blocks' blocks; x [M, K]. The
// blocks go by as many at a time as the last rows' tile takes, each read by every tile of rows while it
// is in cache.
template <class Dot>
static void outer(const typename Dot::T* blocks, const typename Dot::T* x, int64_t M, int64_t K, int64_t n0,
                  int64_t n1, typename Dot::S* out, int64_t ldo) {
  constexpr int64_t U = 4 / sizeof(typename Dot::T);
  const int64_t stride = (K + U - 1) / U * OUT_NB * U, rest = M % OUT_OR, full = M - rest;
  const int64_t step = (rest == 1 ? outer_blocks_at<1>() : rest == 2 ? outer_blocks_at<2>() : 1) * OUT_NB;
  for (int64_t nb = n0; nb < n1; nb += step) {
    const typename Dot::T* block = blocks + nb / OUT_NB * stride;
    int64_t nc = std::min(step, n1 - nb), count = (nc + OUT_NB - 1) / OUT_NB;
    for (int64_t m = 0; m < full; m += OUT_OR)
      outer_blocks<Dot, OUT_OR>(block, stride, count, x + m * K, K, out + m * ldo + nb, ldo, nc);
    outer_rest<Dot, OUT_OR - 1>(rest, block, stride, count, x + full * K, K, out + full * ldo + nb, ldo, nc);
  }
}

// W8A8's outer products: `x` the activations prepared as uint8 q + 128.
static void i8_tiled(const int8_t* blocks, const void* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                     int32_t* out, int64_t ldo) {
  outer<OuterI8>(reinterpret_cast<const uint8_t*>(blocks), static_cast<const uint8_t*>(x), M, K, n0, n1, out,
                 ldo);
}

#if BF16DOT
static void bf16_tiled(const uint16_t* blocks, const uint16_t* x, int64_t M, int64_t K, int64_t n0, int64_t n1,
                       float* out, int64_t ldo) {
  outer<OuterBf16>(blocks, x, M, K, n0, n1, out, ldo);
}
#endif
#endif

constexpr int I4X8_HALF = I4x8::H;
constexpr int I4X8_LANE_BYTES = I4x8::H / F;  // bytes of each half that one int32 lane sums

template <class T>
static inline vf load_float(const T* p) {
  if constexpr (sizeof(T) == 2)
    return (vf)(widen_u16(reinterpret_cast<const uint16_t*>(p)) << 16);
  else
    return load<vf>(p);
}

// One float32 or bfloat16 value as float32 (the vector loops' tails).
template <class T>
static inline float scalar_float(const T* p) {
  if constexpr (sizeof(T) == 2)
    return bf16_to_float(*reinterpret_cast<const uint16_t*>(p));
  else
    return *p;
}

// F float32 lanes to p as bfloat16 rounded to nearest even, as torch rounds (a NaN made from bfloat16
// inputs has no low bits to carry, and stays NaN).
static inline void store_bf16(uint16_t* p, vf v) {
  vu bits = (vu)v;
  vi rounded = (vi)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
#if VBYTES == 64
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)rounded));
#elif VBYTES == 32
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128((__m256i)rounded),
                                                 _mm256_extracti128_si256((__m256i)rounded, 1)));
#else
  vh narrow = __builtin_convertvector(rounded, vh);
  memcpy(p, &narrow, sizeof narrow);
#endif
}

// Four vectors' lane sums [sum a, sum b, sum c, sum d]: one pass of pairwise adds over all four, where
// four `total`s would each halve their own vector (at D = 64 a score is 4 multiply-adds: the sums
// cost more than the products).
static inline void totals4(vf a, vf b, vf c, vf d, float* out) {
#if VBYTES == 64
  __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)a), _mm512_extractf32x8_ps((__m512)a, 1));
  __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)b), _mm512_extractf32x8_ps((__m512)b, 1));
  __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)c), _mm512_extractf32x8_ps((__m512)c, 1));
  __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256((__m512)d), _mm512_extractf32x8_ps((__m512)d, 1));
#elif VBYTES == 32
  __m256 a8 = (__m256)a, b8 = (__m256)b, c8 = (__m256)c, d8 = (__m256)d;
#endif
#if VBYTES >= 32
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
#else
  out[0] = total(a), out[1] = total(b), out[2] = total(c), out[3] = total(d);
#endif
}

// e^x for x <= 0, lane by lane: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial
// in r, times 2^n through the exponent bits), within about one float32 ulp; below -87 (a masked
// position) it gives about 1e-38 rather than 0, which no softmax sum can see.
static inline vf vexp(vf x) {
  const vf lowest = vf{} - 87.0f;
  x = x < lowest ? lowest : x;
  constexpr float MAGIC = 12582912.0f;  // 1.5 x 2^23: adding and taking it away rounds to an integer
  vf n = (x * 1.44269504088896341f + MAGIC) - MAGIC;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)bits;
}

// ---- attention of one query over cached keys and values (a decode step), for one (row, head) ----
// Scores and softmax in float32, probabilities times values summed in float32. T is the element type
// of q, k and v (uint16_t: bfloat16; float); D is a whole number of vectors. `scores` holds T rounded
// up to a whole vector.

// out[0, V F) = the sum over positions t of p[t] x v[t][0, V F) (rows D apart): V output vectors held
// in registers while the value rows stream by (in memory, each position's add waited on the last's
// store).
template <int V, class T>
static inline void weigh(const float* p, const T* v, int64_t positions, int64_t D, float* out) {
  vf o[V];
  for (int i = 0; i < V; i++) o[i] = vf{};
  for (int64_t t = 0; t < positions; t++)  // each value row read once, in order
    for (int i = 0; i < V; i++) o[i] += p[t] * load_float(v + t * D + i * F);
  memcpy(out, o, sizeof o);
}

template <class T>
static void attend(const T* q, const T* k, const T* v, const float* bias, int64_t positions, int64_t D,
                   float scale, float* scores, float* out) {
  auto dot = [&](int64_t t) {
    vf acc{};
    for (int64_t d = 0; d < D; d += F) acc += load_float(q + d) * load_float(k + t * D + d);
    return acc;
  };
  int64_t t = 0;
  for (; t + 4 <= positions; t += 4) {
    vf a = dot(t), b = dot(t + 1), c = dot(t + 2), d = dot(t + 3);  // in order: the keys stay one stream
    totals4(a, b, c, d, scores + t);
  }
  for (; t < positions; t++) scores[t] = total(dot(t));
  float top = -INFINITY;
  for (t = 0; t < positions; t++) top = std::max(top, scores[t] = scores[t] * scale + bias[t]);
  int64_t whole = (positions + F - 1) / F * F;
  for (t = positions; t < whole; t++) scores[t] = -INFINITY;  // e^-inf: the pad adds nothing that shows
  vf sums{};
  for (t = 0; t < whole; t += F) {
    vf e = vexp(load<vf>(scores + t) - top);
    memcpy(scores + t, &e, sizeof e);
    sums += e;
  }
  float sum = total(sums);
  for (t = 0; t < whole; t += F) {
    vf e = load<vf>(scores + t) / sum;
    memcpy(scores + t, &e, sizeof e);
  }
  int64_t d = 0;  // the head in chunks of 8 vectors, then 4, then single ones (BLOOM's 64 and 128: one chunk)
  for (; d + 8 * F <= D; d += 8 * F) weigh<8>(scores, v + d, positions, D, out + d);
  for (; d + 4 * F <= D; d += 4 * F) weigh<4>(scores, v + d, positions, D, out + d);
  for (; d < D; d += F) weigh<1>(scores, v + d, positions, D, out + d);
}

static void attend_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias,
                        int64_t positions, int64_t D, float scale, float* scores, float* out) {
  attend(q, k, v, bias, positions, D, scale, scores, out);
}

static void attend_f32(const float* q, const float* k, const float* v, const float* bias, int64_t positions,
                       int64_t D, float scale, float* scores, float* out) {
  attend(q, k, v, bias, positions, D, scale, scores, out);
}

// The greedy pick's first pass: the largest of n values at p (float32 or bfloat16) and whether any is a
// NaN (which no comparison takes).
template <class T>
static void greatest(const T* p, int64_t n, float* top, bool* nan) {
  vf m = vf{} - INFINITY;
  vi bad = vi{};
  int64_t k = 0;
  for (; k + F <= n; k += F) {
    vf v = load_float(p + k);
    m = v > m ? v : m;
    bad |= (vi)(v != v);
  }
  float t = -INFINITY;
  bool b = false;
  for (int i = 0; i < F; i++) t = std::max(t, m[i]), b |= bad[i] != 0;
  for (; k < n; k++) {
    float v = scalar_float(p + k);
    t = v > t ? v : t, b |= v != v;
  }
  *top = t, *nan = b;
}

static void greatest_bf16(const uint16_t* p, int64_t n, float* top, bool* nan) { greatest(p, n, top, nan); }
static void greatest_f32(const float* p, int64_t n, float* top, bool* nan) { greatest(p, n, top, nan); }

// BLOOM's tanh GELU over n bfloat16 values: x/2 (1 + tanh(u)),
// u = sqrt(2/pi) (x + 0.044715 x^3), computed as x sigmoid(2u), the same function, from one vexp of
// -2|u| (1 + tanh(u) cancels where x < 0: torch's own float32 evaluation rounds to another bfloat16
// in ~7% of those outputs, this one within an ulp of the exact function).
static void gelu(const uint16_t* x, int64_t n, uint16_t* out) {
  constexpr float K0 = 0.7978845608028654f, K1 = 0.7978845608028654f * 0.044715f;
  auto one = [&](vf v) {
    vf u = v * (K0 + K1 * v * v);
    vf e = vexp(-2.0f * (u < 0 ? -u : u));
    return v * (u < 0 ? e : vf{} + 1.0f) / (1.0f + e);
  };
  int64_t k = 0;
  for (; k + F <= n; k += F) store_bf16(out + k, one(load_float(x + k)));
  if (k < n) {  // the tail through a vector's worth of buffer
    uint16_t in[F] = {}, rest[F];
    memcpy(in, x + k, (n - k) * sizeof in[0]);
    store_bf16(rest, one(load_float(in)));
    memcpy(out + k, rest, (n - k) * sizeof in[0]);
  }
}

// n float32 values to bfloat16, rounded to nearest even as torch rounds (store_bf16).
static void round_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t k = 0;
  for (; k + F <= n; k += F) store_bf16(out + k, load<vf>(x + k));
  if (k < n) {  // the tail through a vector's worth of buffer
    float in[F] = {};
    uint16_t rest[F];
    memcpy(in, x + k, (n - k) * sizeof in[0]);
    store_bf16(rest, load<vf>(in));
    memcpy(out + k, rest, (n - k) * sizeof rest[0]);
  }
}

// A row of K float32 or bfloat16 values as int8 at out, returning its scale: scale = max(|row|, 1e-8) /
// 127 and q = round-half-even(row / scale) clamped to [-128, 127] (a NaN gives -128), the same float32
// operations as torch's ops (decode.cpp's quantize_into), in this variant's vectors: compiled at the
// baseline ISA this pass took 5 us of a 4096-wide row, a tenth of a W4A8 layer's product at one row.
template <class T>
static float quantize_row(const T* row, int64_t K, int8_t* out) {
  vf top = vf{};
  int64_t k = 0;
  for (; k + F <= K; k += F) {
    vf v = load_float(row + k);
    v = v < 0 ? -v : v;
    top = v > top ? v : top;  // a NaN never replaces a lane's maximum, as in the scalar tail
  }
  float absmax = 0;
  for (int i = 0; i < F; i++) absmax = std::max(absmax, top[i]);
  for (; k < K; k++) absmax = std::max(absmax, std::fabs(scalar_float(row + k)));
  const float s = std::max(absmax, 1e-8f) / 127.0f;
  // Clamped, then rounded half to even by adding and taking away 1.5 x 2^23 (exact below 2^22 in the
  // default rounding mode): what round-then-clamp gives.
  constexpr float MAGIC = 12582912.0f;
  for (k = 0; k + F <= K; k += F) {
    vf c = load_float(row + k) / s;
    c = c > -128.0f ? c : vf{} - 128.0f;
    c = c < 127.0f ? c : vf{} + 127.0f;
    vb q = __builtin_convertvector(__builtin_convertvector((c + MAGIC) - MAGIC, vi), vb);
    memcpy(out + k, &q, sizeof q);
  }
  for (; k < K; k++) {
    float c = std::min(127.0f, std::max(-128.0f, scalar_float(row + k) / s));
    out[k] = int8_t(int32_t((c + MAGIC) - MAGIC));
  }
  return s;
}

static float quantize_f32(const float* row, int64_t K, int8_t* out) { return quantize_row(row, K, out); }
static float quantize_bf16(const uint16_t* row, int64_t K, int8_t* out) { return quantize_row(row, K, out); }

#undef VBYTES  // the next variant sets its own
#undef I8_KIND
#undef F16C
#undef BF16DOT
