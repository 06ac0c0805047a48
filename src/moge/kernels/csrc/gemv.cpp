// Few-row matrix products for decoding on CPU: y[r, n] = sum_k x[r, k] * w[e(r), n, k].
//
// Decoding a few sequences reads every activated weight once per token, so its speed is the speed
// of streaming weights. These kernels stream them on all of torch's intra-op threads (work is split
// over (expert, block of output channels) with at::parallel_for), read each weight row once for all
// of its expert's rows, and take every row's expert id (`row_expert` [R]; runs of equal ids form
// one segment; empty: every row on expert 0, a plain linear), so one token's K routed experts, or
// a batch's sorted token slots, are one call.
//
// Weights (x is float32 [R, K], y float32 [R, N]):
//   dense: w float32 or bfloat16 [E, N, K]                  w as stored
//          w int8 [E, N, K] with scale fp32 [E, N]          w = q * scale[n]   (int8 weight-only)
//   int4:  w uint8 [E, N, K/2], scale fp32 [E, N, K/G]:     w = (u - 8) * scale[n, g]   (symmetric)
//          or with zero fp32 [E, N, K/G]:                   w = u * scale[n, g] + zero[n, g]
//          u is 0..15. Packing in blocks of 32 along K: byte j of a block holds element j in its
//          low nibble and element j + 16 in its high nibble (G is a multiple of 32).
//   i8:    x int8 [R, K] and w int8 [E, N, K]: y int32 [R, N], the exact integer sums (W8A8)
// int8 and int4 weights stay packed in memory and are widened in registers: 1 or half a byte
// streamed per weight instead of 4.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// The vector code needs AVX-512 F, BW (byte/word loads) and VL; elsewhere the scalar loops run.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MOGE_GEMV_AVX512 1
#else
#define MOGE_GEMV_AVX512 0
#endif
#if MOGE_GEMV_AVX512
#include <immintrin.h>
#endif

namespace {

// Output channels per inner block: 8 weight rows in flight keep more loads outstanding (measured
// with fp32 weights streaming from memory on 2 threads: 24-31 GB/s against 21-25 with 4, 8
// also beat 16); int4 keeps 4, its dequantization already needs the registers.
constexpr int64_t kDenseRows = 8;
constexpr int64_t kInt4Rows = 4;

struct Segment {
  int64_t expert, row0, rows;
};

// Consecutive rows with the same expert id form a segment; an empty `row_expert` means one
// segment of all rows on expert 0 (a plain linear).
std::vector<Segment> segments(const at::Tensor& row_expert, int64_t E, int64_t R) {
  std::vector<Segment> out;
  if (row_expert.numel() == 0) {
    if (R > 0) out.push_back({0, 0, R});
    return out;
  }
  TORCH_CHECK(row_expert.dtype() == at::kLong && row_expert.dim() == 1 && row_expert.numel() == R,
              "row_expert must be int64 [R] with R = ", R, ", got ", row_expert.sizes());
  auto ids = row_expert.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < R;) {
    const int64_t e = p[r];
    TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range [0, ", E, ")");
    int64_t end = r + 1;
    while (end < R && p[end] == e) ++end;
    out.push_back({e, r, end - r});
    r = end;
  }
  return out;
}

// Work items: (segment, block of output channels); parallel over them.
template <int64_t kRowBlock, typename F>
void for_each_block(const std::vector<Segment>& segs, int64_t N, int64_t K, F&& fn) {
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t items = static_cast<int64_t>(segs.size()) * blocks;
  // about 64 KiB of weights per task at least, so small matrices do not pay for threading
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, kRowBlock * K));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Segment& s = segs[i / blocks];
      const int64_t n0 = (i % blocks) * kRowBlock;
      fn(s, n0, std::min(kRowBlock, N - n0));
    }
  });
}

#if MOGE_GEMV_AVX512
// 16 consecutive weights as floats, for each stored type (masked: the first bits of m only)
inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 bf16_to_ps(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load_w(const at::BFloat16* p) { return bf16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load_w(const at::BFloat16* p, __mmask16 m) { return bf16_to_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load_w(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load_w(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// MB rows of x times NB rows of w (float, bfloat16 or int8), K contiguous.
template <typename W, int NB, int MB>
inline void dense_tile(const float* x, int64_t ldx, const W* w, int64_t K, float* acc_out /*[MB][NB]*/) {
  // prefetch the next block's rows a cache line at a time (prefetches never fault past the end)
  constexpr int64_t kLine = 64 / sizeof(W);
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if ((k % kLine) == 0)
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NB) * K + k), _MM_HINT_T0);
    __m512 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = load_w(w + n * K + k);
    for (int m = 0; m < MB; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(wv[n], xv, acc[m][n]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = load_w(w + n * K + k, mask);
    for (int m = 0; m < MB; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(wv[n], xv, acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc_out[m * NB + n] = _mm512_reduce_add_ps(acc[m][n]);
}

// 16 bytes of a 32-block -> elements 0..15 (low nibbles) and 16..31 (high nibbles) as floats
inline void load_i4(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xF)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}

template <int NB, int MB>
inline void int4_tile(const float* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zero,
                      int64_t K, int64_t G, float* acc_out) {
  const int64_t groups = K / G, kb = K / 2;
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[NB], z[NB];
    for (int n = 0; n < NB; ++n) {
      s[n] = _mm512_set1_ps(scale[n * groups + g]);
      z[n] = zero ? _mm512_set1_ps(zero[n * groups + g]) : _mm512_set1_ps(-8.0f * scale[n * groups + g]);
    }
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      if ((k & 127) == 0)  // the next block's rows, as in dense_tile
        for (int n = 0; n < NB; ++n)
          _mm_prefetch(reinterpret_cast<const char*>(w + (n + NB) * kb + k / 2), _MM_HINT_T0);
      __m512 lo[NB], hi[NB];
      for (int n = 0; n < NB; ++n) {
        load_i4(w + n * kb + k / 2, lo[n], hi[n]);
        lo[n] = _mm512_fmadd_ps(lo[n], s[n], z[n]);
        hi[n] = _mm512_fmadd_ps(hi[n], s[n], z[n]);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 x0 = _mm512_loadu_ps(x + m * ldx + k), x1 = _mm512_loadu_ps(x + m * ldx + k + 16);
        for (int n = 0; n < NB; ++n) {
          acc[m][n] = _mm512_fmadd_ps(lo[n], x0, acc[m][n]);
          acc[m][n] = _mm512_fmadd_ps(hi[n], x1, acc[m][n]);
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc_out[m * NB + n] = _mm512_reduce_add_ps(acc[m][n]);
}
#endif

// Portable fallbacks (also the reference for the vector code's layout).
inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

template <typename W, int NB, int MB>
inline void dense_tile_scalar(const float* x, int64_t ldx, const W* w, int64_t K, float* acc_out) {
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) a += x[m * ldx + k] * to_float(w[n * K + k]);
      acc_out[m * NB + n] = a;
    }
}

template <int NB, int MB>
inline void int4_tile_scalar(const float* x, int64_t ldx, const uint8_t* w, const float* scale, const float* zero,
                             int64_t K, int64_t G, float* acc_out) {
  const int64_t groups = K / G, kb = K / 2;
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t blk = k / 32, j = k % 32;
        const uint8_t b = w[n * kb + blk * 16 + (j & 15)];
        const float u = static_cast<float>(j < 16 ? (b & 0xF) : (b >> 4));
        const float s = scale[n * groups + k / G];
        const float z = zero ? zero[n * groups + k / G] : -8.0f * s;
        a += x[m * ldx + k] * (u * s + z);
      }
      acc_out[m * NB + n] = a;
    }
}

template <typename W, int NB, int MB>
inline void dense_tile_any(const float* x, int64_t ldx, const W* w, int64_t K, float* out) {
#if MOGE_GEMV_AVX512
  dense_tile<W, NB, MB>(x, ldx, w, K, out);
#else
  dense_tile_scalar<W, NB, MB>(x, ldx, w, K, out);
#endif
}

template <int NB, int MB>
inline void int4_tile_any(const float* x, int64_t ldx, const uint8_t* w, const float* s, const float* z, int64_t K,
                          int64_t G, float* out) {
#if MOGE_GEMV_AVX512
  int4_tile<NB, MB>(x, ldx, w, s, z, K, G, out);
#else
  int4_tile_scalar<NB, MB>(x, ldx, w, s, z, K, G, out);
#endif
}

// Runs tile<NB, MB> over rows m0.. of a segment, 4 rows at a time, for nb output channels.
#define DISPATCH_ROWS(TILE, NB, ...)                                   \
  switch (mb) {                                                        \
    case 1: TILE<NB, 1>(__VA_ARGS__); break;                           \
    case 2: TILE<NB, 2>(__VA_ARGS__); break;                           \
    case 3: TILE<NB, 3>(__VA_ARGS__); break;                           \
    default: TILE<NB, 4>(__VA_ARGS__); break;                          \
  }
#define DISPATCH_ROWS_T(TILE, W, NB, ...)                              \
  switch (mb) {                                                        \
    case 1: TILE<W, NB, 1>(__VA_ARGS__); break;                        \
    case 2: TILE<W, NB, 2>(__VA_ARGS__); break;                        \
    case 3: TILE<W, NB, 3>(__VA_ARGS__); break;                        \
    default: TILE<W, NB, 4>(__VA_ARGS__); break;                       \
  }

// A plain linear's weight [N, K] (and its scales) is one expert: [1, N, K].
at::Tensor stacked(const at::Tensor& t, int64_t dims) { return t.dim() == dims - 1 ? t.unsqueeze(0) : t; }

template <typename W>
void dense_run(const float* xp, const W* wp, const float* sp, float* yp, const std::vector<Segment>& segs, int64_t N,
               int64_t K) {
  constexpr int64_t kRowBlock = kDenseRows;
  for_each_block<kRowBlock>(segs, N, K, [&](const Segment& s, int64_t n0, int64_t nb) {
    const W* wrow = wp + (s.expert * N + n0) * K;
    const float* srow = sp ? sp + s.expert * N + n0 : nullptr;
    float out[4 * kRowBlock];
    for (int64_t m0 = 0; m0 < s.rows; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, s.rows - m0);
      const float* xr = xp + (s.row0 + m0) * K;
      if (nb == kRowBlock) {
        DISPATCH_ROWS_T(dense_tile_any, W, kRowBlock, xr, K, wrow, K, out)
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          float o1[4];
          DISPATCH_ROWS_T(dense_tile_any, W, 1, xr, K, wrow + j * K, K, o1)
          for (int64_t m = 0; m < mb; ++m) out[m * kRowBlock + j] = o1[m];
        }
      }
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t j = 0; j < nb; ++j)
          yp[(s.row0 + m0 + m) * N + n0 + j] = srow ? out[m * kRowBlock + j] * srow[j] : out[m * kRowBlock + j];
    }
  });
}

// float32 / bfloat16 weights (scale None) or int8 weights with a per-output-channel scale.
at::Tensor dense_gemm(const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& scale_in,
                      const at::Tensor& row_expert) {
  const at::Tensor w = stacked(w_in, 3);
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be float32 [R, K]");
  TORCH_CHECK(w.dim() == 3 && (w.dtype() == at::kFloat || w.dtype() == at::kBFloat16 || w.dtype() == at::kChar),
              "w must be float32, bfloat16 or int8 [E, N, K], got ", w.dtype(), " ", w.sizes());
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  TORCH_CHECK(w.size(2) == K, "w has K=", w.size(2), " but x has K=", K);
  at::Tensor sc;
  if (w.dtype() == at::kChar) {
    TORCH_CHECK(scale_in.has_value(), "int8 weights need a scale [E, N]");
    sc = stacked(*scale_in, 2).contiguous();
    TORCH_CHECK(sc.dtype() == at::kFloat && sc.dim() == 2 && sc.size(0) == E && sc.size(1) == N,
                "scale must be float32 [E, N]");
  } else {
    TORCH_CHECK(!scale_in.has_value(), "float weights take no scale");
  }
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty({R, N}, x.options());
  const auto segs = segments(row_expert, E, R);
  const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  if (w.dtype() == at::kFloat)
    dense_run<float>(xc.data_ptr<float>(), wc.data_ptr<float>(), sp, y.data_ptr<float>(), segs, N, K);
  else if (w.dtype() == at::kBFloat16)
    dense_run<at::BFloat16>(xc.data_ptr<float>(), wc.data_ptr<at::BFloat16>(), sp, y.data_ptr<float>(), segs, N, K);
  else
    dense_run<int8_t>(xc.data_ptr<float>(), wc.data_ptr<int8_t>(), sp, y.data_ptr<float>(), segs, N, K);
  return y;
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& scale_in,
                     const c10::optional<at::Tensor>& zero_in, const at::Tensor& row_expert, int64_t group_size) {
  const at::Tensor w = stacked(w_in, 3), scale = stacked(scale_in, 3);
  c10::optional<at::Tensor> zero;
  if (zero_in.has_value()) zero = stacked(*zero_in, 3);
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be float32 [R, K]");
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 3, "w must be uint8 [E, N, K/2]");
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1), G = group_size;
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "group_size must be a multiple of 32 dividing K=", K,
              ", got ", G);
  TORCH_CHECK(w.size(2) * 2 == K, "w has ", w.size(2), " bytes per row but x has K=", K);
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.dim() == 3 && scale.size(0) == E && scale.size(1) == N &&
                  scale.size(2) == K / G,
              "scale must be float32 [E, N, K/G]");
  at::Tensor zc;
  if (zero.has_value()) {
    TORCH_CHECK(zero->dtype() == at::kFloat && zero->sizes() == scale.sizes(), "zero must be float32 like scale");
    zc = zero->contiguous();
  }
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  auto y = at::empty({R, N}, x.options());
  const auto segs = segments(row_expert, E, R);
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.defined() ? zc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t groups = K / G, kb = K / 2;
  constexpr int64_t kRowBlock = kInt4Rows;
  for_each_block<kRowBlock>(segs, N, K, [&](const Segment& s, int64_t n0, int64_t nb) {
    const uint8_t* wrow = wp + (s.expert * N + n0) * kb;
    const float* srow = sp + (s.expert * N + n0) * groups;
    const float* zrow = zp ? zp + (s.expert * N + n0) * groups : nullptr;
    float out[4 * kRowBlock];
    for (int64_t m0 = 0; m0 < s.rows; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, s.rows - m0);
      const float* xr = xp + (s.row0 + m0) * K;
      if (nb == kRowBlock) {
        DISPATCH_ROWS(int4_tile_any, kRowBlock, xr, K, wrow, srow, zrow, K, G, out)
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          float o1[4];
          DISPATCH_ROWS(int4_tile_any, 1, xr, K, wrow + j * kb, srow + j * groups, zrow ? zrow + j * groups : nullptr,
                        K, G, o1)
          for (int64_t m = 0; m < mb; ++m) out[m * kRowBlock + j] = o1[m];
        }
      }
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t j = 0; j < nb; ++j) yp[(s.row0 + m0 + m) * N + n0 + j] = out[m * kRowBlock + j];
    }
  });
  return y;
}

// ---- int8 x int8 -> int32 (W8A8): exact integer products --------------------------------------
// x int8 [R, K] (per-token quantized activations), w int8 [E, N, K]: y int32 [R, N], the exact sums
// (the caller applies the float scales, as for torch._int_mm). With AVX-512 VNNI each vpdpbusd
// multiplies 64 unsigned by 64 signed bytes: x is offset to unsigned (x ^ 0x80 = x + 128) and
// 128 * sum(w) is subtracted at the end (sum(w) from a second vpdpbusd against ones).
#if MOGE_GEMV_AVX512 && defined(__AVX512VNNI__)
#define MOGE_GEMV_VNNI 1
template <int NB, int MB>
inline void i8_tile(const int8_t* x, int64_t ldx, const int8_t* w, int64_t K, int32_t* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi8(1);
  __m512i acc[MB][NB], wsum[NB];
  for (int n = 0; n < NB; ++n) {
    wsum[n] = _mm512_setzero_si512();
    for (int m = 0; m < MB; ++m) acc[m][n] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : ((__mmask64(1) << (K - k)) - 1);
    if ((k & 63) == 0)
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NB) * K + k), _MM_HINT_T0);
    __m512i wv[NB];
    for (int n = 0; n < NB; ++n) {
      wv[n] = _mm512_maskz_loadu_epi8(mask, w + n * K + k);
      wsum[n] = _mm512_dpbusd_epi32(wsum[n], ones, wv[n]);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + m * ldx + k), flip);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], xv, wv[n]);
    }
  }
  for (int n = 0; n < NB; ++n) {
    const int32_t offset = 128 * _mm512_reduce_add_epi32(wsum[n]);
    for (int m = 0; m < MB; ++m) out[m * NB + n] = _mm512_reduce_add_epi32(acc[m][n]) - offset;
  }
}
#else
#define MOGE_GEMV_VNNI 0
template <int NB, int MB>
inline void i8_tile(const int8_t* x, int64_t ldx, const int8_t* w, int64_t K, int32_t* out) {
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      int32_t a = 0;
      for (int64_t k = 0; k < K; ++k) a += static_cast<int32_t>(x[m * ldx + k]) * static_cast<int32_t>(w[n * K + k]);
      out[m * NB + n] = a;
    }
}
#endif

at::Tensor i8_gemm(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& row_expert) {
  const at::Tensor w = stacked(w_in, 3);
  TORCH_CHECK(x.dtype() == at::kChar && x.dim() == 2, "x must be int8 [R, K]");
  TORCH_CHECK(w.dtype() == at::kChar && w.dim() == 3, "w must be int8 [E, N, K]");
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  TORCH_CHECK(w.size(2) == K, "w has K=", w.size(2), " but x has K=", K);
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty({R, N}, x.options().dtype(at::kInt));
  const auto segs = segments(row_expert, E, R);
  const int8_t* xp = xc.data_ptr<int8_t>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  constexpr int64_t kRowBlock = 4;
  for_each_block<kRowBlock>(segs, N, K, [&](const Segment& s, int64_t n0, int64_t nb) {
    const int8_t* wrow = wp + (s.expert * N + n0) * K;
    int32_t out[4 * kRowBlock];
    for (int64_t m0 = 0; m0 < s.rows; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, s.rows - m0);
      const int8_t* xr = xp + (s.row0 + m0) * K;
      if (nb == kRowBlock) {
        DISPATCH_ROWS(i8_tile, kRowBlock, xr, K, wrow, K, out)
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          int32_t o1[4];
          DISPATCH_ROWS(i8_tile, 1, xr, K, wrow + j * K, K, o1)
          for (int64_t m = 0; m < mb; ++m) out[m * kRowBlock + j] = o1[m];
        }
      }
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t j = 0; j < nb; ++j) yp[(s.row0 + m0 + m) * N + n0 + j] = out[m * kRowBlock + j];
    }
  });
  return y;
}

bool has_vnni() { return MOGE_GEMV_VNNI; }


bool has_avx512() {
#if MOGE_GEMV_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(moge_gemv, m) {
  m.def("dense(Tensor x, Tensor w, Tensor? scale, Tensor row_expert) -> Tensor");
  m.def("int4(Tensor x, Tensor w, Tensor scale, Tensor? zero, Tensor row_expert, int group_size) -> Tensor");
  m.def("i8(Tensor x, Tensor w, Tensor row_expert) -> Tensor");
  m.def("vectorized() -> bool");
  m.def("vnni() -> bool");
}

TORCH_LIBRARY_IMPL(moge_gemv, CPU, m) {
  m.impl("dense", dense_gemm);
  m.impl("int4", int4_gemm);
  m.impl("i8", i8_gemm);
}

TORCH_LIBRARY_IMPL(moge_gemv, CatchAll, m) {
  m.impl("vectorized", has_avx512);
  m.impl("vnni", has_vnni);
}
