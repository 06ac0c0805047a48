// Weight-only quantized GEMV/GEMM for few rows (decode): y[r, n] = sum_k x[r, k] * w[e(r), n, k].
//
// The weights stay packed in memory and are dequantized in registers, so a decode step streams
// 1 byte (int8) or half a byte (int4) per weight instead of 4. `row_expert` [R] names each row's
// expert (runs of equal ids form one segment; empty: every row on expert 0, a plain linear), so
// the routed experts of a batch, or one token's K experts, run in one call. Work is split over (expert, block of output channels)
// with at::parallel_for, each weight row is read once for all of its expert's rows.
//
// int8: w int8 [E, N, K], scale fp32 [E, N]:            w = q * scale[n]
// int4: w uint8 [E, N, K/2], scale fp32 [E, N, K/G]:    w = (u - 8) * scale[n, g]   (symmetric)
//       or with zero fp32 [E, N, K/G]:                  w = u * scale[n, g] + zero[n, g]
//       u is 0..15. Packing in blocks of 32 along K: byte j of a block holds element j in its low
//       nibble and element j + 16 in its high nibble (G is a multiple of 32).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#ifndef MOGE_WO_ROWS
#define MOGE_WO_ROWS 4
#endif
constexpr int64_t kRowBlock = MOGE_WO_ROWS;  // output channels per inner block

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
template <typename F>
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

#if defined(__AVX512F__)
inline __m512 load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load_i8_mask(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// MB rows of x times NB rows of int8 w, K contiguous.
template <int NB, int MB>
inline void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, float* acc_out /*[MB][NB]*/) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    // the next block's rows, a cache line per row every 64 bytes (prefetches never fault past the end)
    if ((k & 63) == 0)
      for (int n = 0; n < NB; ++n) _mm_prefetch(reinterpret_cast<const char*>(w + (n + NB) * K + k), _MM_HINT_T0);
    __m512 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = load_i8(w + n * K + k);
    for (int m = 0; m < MB; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_fmadd_ps(wv[n], xv, acc[m][n]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = load_i8_mask(w + n * K + k, mask);
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
      if ((k & 127) == 0)  // the next block's rows, as in int8_tile
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
template <int NB, int MB>
inline void int8_tile_scalar(const float* x, int64_t ldx, const int8_t* w, int64_t K, float* acc_out) {
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) a += x[m * ldx + k] * static_cast<float>(w[n * K + k]);
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

template <int NB, int MB>
inline void int8_tile_any(const float* x, int64_t ldx, const int8_t* w, int64_t K, float* out) {
#if defined(__AVX512F__)
  int8_tile<NB, MB>(x, ldx, w, K, out);
#else
  int8_tile_scalar<NB, MB>(x, ldx, w, K, out);
#endif
}

template <int NB, int MB>
inline void int4_tile_any(const float* x, int64_t ldx, const uint8_t* w, const float* s, const float* z, int64_t K,
                          int64_t G, float* out) {
#if defined(__AVX512F__)
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

// A plain linear's weight [N, K] (and its scales) is one expert: [1, N, K].
at::Tensor stacked(const at::Tensor& t, int64_t dims) { return t.dim() == dims - 1 ? t.unsqueeze(0) : t; }

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& scale_in,
                     const at::Tensor& row_expert) {
  const at::Tensor w = stacked(w_in, 3), scale = stacked(scale_in, 2);
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2, "x must be float32 [R, K]");
  TORCH_CHECK(w.dtype() == at::kChar && w.dim() == 3, "w must be int8 [E, N, K]");
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.dim() == 2, "scale must be float32 [E, N]");
  const int64_t R = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  TORCH_CHECK(w.size(2) == K, "w has K=", w.size(2), " but x has K=", K);
  TORCH_CHECK(scale.size(0) == E && scale.size(1) == N, "scale must be [E, N]");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto sc = scale.contiguous();
  auto y = at::empty({R, N}, x.options());
  const auto segs = segments(row_expert, E, R);
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_each_block(segs, N, K, [&](const Segment& s, int64_t n0, int64_t nb) {
    const int8_t* wrow = wp + (s.expert * N + n0) * K;
    const float* srow = sp + s.expert * N + n0;
    float out[4 * kRowBlock];
    for (int64_t m0 = 0; m0 < s.rows; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, s.rows - m0);
      const float* xr = xp + (s.row0 + m0) * K;
      if (nb == kRowBlock) {
        DISPATCH_ROWS(int8_tile_any, MOGE_WO_ROWS, xr, K, wrow, K, out)
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          float o1[4];
          DISPATCH_ROWS(int8_tile_any, 1, xr, K, wrow + j * K, K, o1)
          for (int64_t m = 0; m < mb; ++m) out[m * kRowBlock + j] = o1[m];
        }
      }
      for (int64_t m = 0; m < mb; ++m)
        for (int64_t j = 0; j < nb; ++j) yp[(s.row0 + m0 + m) * N + n0 + j] = out[m * kRowBlock + j] * srow[j];
    }
  });
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
  for_each_block(segs, N, K, [&](const Segment& s, int64_t n0, int64_t nb) {
    const uint8_t* wrow = wp + (s.expert * N + n0) * kb;
    const float* srow = sp + (s.expert * N + n0) * groups;
    const float* zrow = zp ? zp + (s.expert * N + n0) * groups : nullptr;
    float out[4 * kRowBlock];
    for (int64_t m0 = 0; m0 < s.rows; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, s.rows - m0);
      const float* xr = xp + (s.row0 + m0) * K;
      if (nb == kRowBlock) {
        DISPATCH_ROWS(int4_tile_any, MOGE_WO_ROWS, xr, K, wrow, srow, zrow, K, G, out)
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

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(moge_wo, m) {
  m.def("int8_gemm(Tensor x, Tensor w, Tensor scale, Tensor row_expert) -> Tensor");
  m.def("int4_gemm(Tensor x, Tensor w, Tensor scale, Tensor? zero, Tensor row_expert, int group_size) -> Tensor");
  m.def("vectorized() -> bool");
}

TORCH_LIBRARY_IMPL(moge_wo, CPU, m) {
  m.impl("int8_gemm", int8_gemm);
  m.impl("int4_gemm", int4_gemm);
}

TORCH_LIBRARY_IMPL(moge_wo, CatchAll, m) { m.impl("vectorized", has_avx512); }
