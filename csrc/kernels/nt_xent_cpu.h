// NT-Xent on the CPU: torch-free core, templates on raw pointers (float and double).
//
// Inputs are the L2-normalised views za, zb: [n, d] row-major, contiguous. Row i of the virtual
// matrix u = [za; zb] (2n rows) is za[i] for i < n and zb[i - n] otherwise; no concatenation copy.
// The partner of row i is p(i) = i + n (i < n) or i - n. The math, numbered as in the code:
//
//   (1) s_ij = inv_temp * <u_i, u_j>                                  (score tile, recomputed)
//   (2) lse_i = log sum_{j != i} exp(s_ij)                             (online log-sum-exp, fwd)
//   (3) loss  = (1 / 2n) * sum_i (lse_i - s_{i,p(i)})                  (the caller sums `term`)
//   (4) with G = dL/ds = (1/2n)(P - onehot(p)), P_ij = exp(s_ij - lse_i), P_ii = 0, and s symmetric:
//       dL/du_k = grad * inv_temp / (2n) * ( sum_{j != k} W_kj u_j - 2 u_{p(k)} ),
//       W_kj = exp(s_kj - lse_k) + exp(s_kj - lse_j)                    (bwd, per needed row k)
//
// Work is split into row blocks of at most kBlockRows rows that never straddle the za/zb boundary;
// each call handles a row range [r0, r1) of u (the torch glue runs calls in parallel). Nothing of
// size O(n^2) is ever stored: per call the scratch is O(kBlockRows * d + kBlockRows * kBlockCols).
//
// Vectorisation: the two micro-kernels below have fixed-size accumulators that GCC/Clang
// vectorise; on x86-64 the float entry points are compiled three times (AVX-512, AVX2+FMA,
// baseline), each with a micro-tile sized for its registers (Tile), and picked at run time with
// __builtin_cpu_supports: no -march flag is needed.
//
// NaN/Inf: a NaN anywhere in a row's scores makes that row's lse NaN (so the loss is NaN); no
// input crashes. Do not compile this file with -ffast-math (the exp below relies on exact rounding).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CBD_NTX_X86 1
// The target() strings of the AVX-512 and AVX2 variants (shared with benchmarks/bench_nt_xent_tiles.cpp).
#define CBD_NTX_TARGET_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"
#define CBD_NTX_TARGET_AVX2 "avx2,fma"
#define CBD_NTX_FLATTEN __attribute__((flatten))
#define CBD_NTX_INLINE inline __attribute__((always_inline))
#else
#define CBD_NTX_X86 0
#define CBD_NTX_FLATTEN
#define CBD_NTX_INLINE inline
#endif

namespace cbd_fast {
namespace nt_xent_cpu {

constexpr int64_t kBlockRows = 64;  // rows of u per block (register-blocked by MR)
constexpr int64_t kBlockCols = 64;  // columns of the score tile (register-blocked by NR)

// The micro-tile: MR rows x NR columns of accumulators, the NR columns held as one GCC/Clang
// vector. NR is one native vector register of the ISA the variant is compiled for: a wider vector
// is lowered to several registers and runs slower (fwd + bwd at 2N = 256-4096, D = 128 and 512:
// on AVX2 the 8 x 16 float tile took 2.8-4.1x the time of 8 x 8, on SSE2 1.5-2.7x that of 8 x 4;
// benchmarks/NOTES.md 3.1). MR and NR divide kBlockRows and kBlockCols (the block loops step by
// them without tails).
template <int MR_, int NR_>
struct Tile {
  static constexpr int MR = MR_;
  static constexpr int NR = NR_;
  static_assert(kBlockRows % MR == 0 && kBlockCols % MR == 0, "MR must divide the blocks");
  static_assert(kBlockRows % NR == 0 && kBlockCols % NR == 0, "NR must divide the blocks");
};
using TileAvx512 = Tile<8, 16>;  // 16 floats = 1 zmm; 8 accumulators of the 32 zmm
using TileAvx2 = Tile<8, 8>;     // 8 floats = 1 ymm; 8 accumulators of the 16 ymm
using TileBase = Tile<8, 4>;     // 4 floats = 1 xmm (SSE2); 8 of the 16 xmm
using TileF64 = Tile<8, 2>;      // double, compiled for the baseline: 2 doubles = 1 xmm

// exp(x) for float without libm, vectorisable: exp(x) = 2^k * exp(r), k = round(x / ln 2),
// r = x - k ln 2 in [-ln2/2, ln2/2] (ln 2 split in two for an exact product), exp(r) by its
// degree-7 Taylor polynomial (relative error < 2e-7). x < -87.3 gives exactly 0, NaN gives NaN.
CBD_NTX_INLINE float fast_exp(float x) {
  const float hi = 88.3f;
  x = x > hi ? hi : x;  // keeps NaN
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds to an integer
  const float kf = t - 12582912.0f;
  float r = x - kf * 0.693145751953125f;
  r = r - kf * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const uint32_t scale_bits = ((tb - 0x4B400000u) + 127u) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  const float y = p * scale;
  return x < -87.3f ? 0.0f : y;
}

CBD_NTX_INLINE double fast_exp(double x) { return std::exp(x); }

template <typename T>
struct Rows {
  const T* za;
  const T* zb;
  int64_t n;
  int64_t d;
  const T* row(int64_t i) const { return i < n ? za + i * d : zb + (i - n) * d; }
  int64_t partner(int64_t i) const { return i < n ? i + n : i - n; }
};

// dst[k * ld + r] = scale * u[i0 + r][k] for r < rows, 0 for rows <= r < ld (transposed pack).
template <typename T>
CBD_NTX_INLINE void pack_transposed(const Rows<T>& u, int64_t i0, int64_t rows, int64_t ld, T scale,
                                    T* dst) {
  const int64_t d = u.d;
  const T* src = u.row(i0);  // a block never straddles the za/zb boundary: rows are contiguous
  for (int64_t k = 0; k < d; ++k) {
    T* out = dst + k * ld;
    for (int64_t r = 0; r < rows; ++r) out[r] = scale * src[r * d + k];
    for (int64_t r = rows; r < ld; ++r) out[r] = T(0);
  }
}

// C[r][j] (+)= sum_k Ap[k][r] * Bp[k][j] for one Tl::MR x Tl::NR micro-tile, Ap and Bp "packed
// transposed" (k-major). Used for (1) the score tile (k = feature) and for (4) W @ U (k = column).
template <typename T, typename Tl, bool kAccumulate>
CBD_NTX_INLINE void micro_kernel(const T* __restrict__ ap, int64_t lda, const T* __restrict__ bp,
                                 int64_t ldb, int64_t kdim, T* __restrict__ c, int64_t ldc) {
  // NR columns as one GCC/Clang vector (split into the target's registers, see Tile):
  // acc[r] += broadcast(a[r]) * b, the register-blocked outer product of a GEMM micro-kernel.
  constexpr int kMR = Tl::MR;
  typedef T Vec __attribute__((vector_size(sizeof(T) * Tl::NR)));
  Vec acc[kMR];
  for (int r = 0; r < kMR; ++r) {
    if (kAccumulate) {
      std::memcpy(&acc[r], c + r * ldc, sizeof(Vec));
    } else {
      acc[r] = Vec{};
    }
  }
  for (int64_t k = 0; k < kdim; ++k) {
    const T* a = ap + k * lda;
    Vec b;
    std::memcpy(&b, bp + k * ldb, sizeof(Vec));
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) acc[r] += a[r] * b;
  }
  for (int r = 0; r < kMR; ++r) std::memcpy(c + r * ldc, &acc[r], sizeof(Vec));
}

// (1) St[c][r] = sum_k Bp[k][c] * Ap[k][r]: the score tile, transposed ([nbp][mbp]) so that the
// weights of (4) come out k-major for the W @ U product. mbp % NR == 0 and nbp % MR == 0.
template <typename T, typename Tl>
CBD_NTX_INLINE void score_block_t(const T* ap, int64_t mbp, const T* bp, int64_t nbp, int64_t d, T* st) {
  for (int64_t c0 = 0; c0 < nbp; c0 += Tl::MR)
    for (int64_t r0 = 0; r0 < mbp; r0 += Tl::NR)
      micro_kernel<T, Tl, false>(bp + c0, nbp, ap + r0, mbp, d, st + c0 * mbp + r0, mbp);
}

// (4) acc[r][:] += sum_{c < nb} Wt[c][r] * ub[c][:] for r < mbp; Wt is [nb][mbp], ub row-major [nb, d].
template <typename T, typename Tl>
CBD_NTX_INLINE void wu_block(const T* wt, int64_t mbp, const T* ub, int64_t nb, int64_t d, T* acc) {
  const int64_t d_main = d - d % Tl::NR;
  for (int64_t r0 = 0; r0 < mbp; r0 += Tl::MR) {
    for (int64_t x0 = 0; x0 < d_main; x0 += Tl::NR)
      micro_kernel<T, Tl, true>(wt + r0, mbp, ub + x0, d, nb, acc + r0 * d + x0, d);
    for (int64_t c = 0; c < nb && d_main < d; ++c) {  // feature tail (d % NR columns)
      const T* urow = ub + c * d;
      for (int r = 0; r < Tl::MR; ++r) {
        const T w = wt[c * mbp + r0 + r];
        T* out = acc + (r0 + r) * d;
        for (int64_t x = d_main; x < d; ++x) out[x] += w * urow[x];
      }
    }
  }
}

// Calls fn(i0, rows) for the blocks of [r0, r1): at most kBlockRows rows, never straddling n.
template <typename Fn>
CBD_NTX_INLINE void for_each_block(int64_t n, int64_t r0, int64_t r1, Fn&& fn) {
  int64_t i0 = r0;
  while (i0 < r1) {
    const int64_t side_end = i0 < n ? std::min<int64_t>(n, r1) : r1;
    const int64_t rows = std::min<int64_t>(kBlockRows, side_end - i0);
    fn(i0, rows);
    i0 += rows;
  }
}

template <typename T>
CBD_NTX_INLINE T dot(const T* x, const T* y, int64_t d) {
  T acc = T(0);
  for (int64_t k = 0; k < d; ++k) acc += x[k] * y[k];
  return acc;
}

// Forward over the rows [r0, r1) of u: lse[i] (2) and term[i] = lse_i - s_{i,p(i)} (3).
template <typename T, typename Tl>
CBD_NTX_INLINE void fwd_rows_impl(const T* za, const T* zb, int64_t n, int64_t d, T inv_temp, int64_t r0,
                                  int64_t r1, T* lse, T* term) {
  const Rows<T> u{za, zb, n, d};
  constexpr int64_t mbp = kBlockRows, nbp = kBlockCols;  // Tile: MR and NR divide both
  std::vector<T> ap(static_cast<size_t>(d * mbp)), bp(static_cast<size_t>(d * nbp)),
      s(static_cast<size_t>(mbp * nbp));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  // per-row state, vectorised across the rows of the block (the score tile is stored transposed)
  T m[mbp], l[mbp], tmax[mbp], shift[mbp], rescale[mbp], sum[mbp];

  for_each_block(n, r0, r1, [&](int64_t i0, int64_t rows) {
    pack_transposed(u, i0, rows, mbp, inv_temp, ap.data());  // inv_temp folded into the A pack
    for (int64_t r = 0; r < mbp; ++r) {
      m[r] = neg_inf;
      l[r] = T(0);
    }
    for (int64_t j0 = 0; j0 < 2 * n;) {
      const int64_t nb = std::min<int64_t>(kBlockCols, (j0 < n ? n : 2 * n) - j0);
      pack_transposed(u, j0, nb, nbp, T(1), bp.data());
      score_block_t<T, Tl>(ap.data(), mbp, bp.data(), nbp, d, s.data());  // (1) St[c][r], c < nb
      for (int64_t c = 0; c < nb; ++c) {  // j != i
        const int64_t r = j0 + c - i0;
        if (r >= 0 && r < rows) s[c * mbp + r] = neg_inf;
      }
      // (2) online log-sum-exp per row r: m = running max, l = sum exp(s - m). A NaN score is
      // skipped by the max but poisons the sum, so the row's lse is NaN. shift = m, or 0 while
      // m is -inf (nothing but the excluded diagonal so far), so that exp(-inf - shift) = 0.
      for (int64_t r = 0; r < mbp; ++r) {
        tmax[r] = neg_inf;
        sum[r] = T(0);
      }
      for (int64_t c = 0; c < nb; ++c) {
        const T* col = s.data() + c * mbp;
        for (int64_t r = 0; r < mbp; ++r) tmax[r] = col[r] > tmax[r] ? col[r] : tmax[r];
      }
      for (int64_t r = 0; r < mbp; ++r) {
        const T m_new = tmax[r] > m[r] ? tmax[r] : m[r];
        shift[r] = m_new == neg_inf ? T(0) : m_new;
        rescale[r] = fast_exp(m[r] - shift[r]);  // 0 while m was -inf
        m[r] = m_new;
      }
      for (int64_t c = 0; c < nb; ++c) {
        const T* col = s.data() + c * mbp;
        for (int64_t r = 0; r < mbp; ++r) sum[r] += fast_exp(col[r] - shift[r]);
      }
      for (int64_t r = 0; r < mbp; ++r) l[r] = l[r] * rescale[r] + sum[r];
      j0 += nb;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const T v = m[r] + std::log(l[r]);
      lse[i] = v;
      term[i] = v - inv_temp * dot(u.row(i), u.row(u.partner(i)), d);  // (3)
    }
  });
}

// Backward over the rows [r0, r1) of u (4): writes coef * (sum_j W_kj u_j - 2 u_p(k)) to ga[k]
// (k < n) or gb[k - n]; coef = grad * inv_temp / (2n). ga/gb may be null for a side not in range.
template <typename T, typename Tl>
CBD_NTX_INLINE void bwd_rows_impl(const T* za, const T* zb, int64_t n, int64_t d, T inv_temp, const T* lse,
                                  T coef, int64_t r0, int64_t r1, T* ga, T* gb) {
  const Rows<T> u{za, zb, n, d};
  constexpr int64_t mbp = kBlockRows, nbp = kBlockCols;  // Tile: MR and NR divide both
  std::vector<T> ap(static_cast<size_t>(d * mbp)), bp(static_cast<size_t>(d * nbp)),
      s(static_cast<size_t>(mbp * nbp)), acc(static_cast<size_t>(mbp * d));
  T lk[mbp];

  for_each_block(n, r0, r1, [&](int64_t i0, int64_t rows) {
    pack_transposed(u, i0, rows, mbp, inv_temp, ap.data());
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t r = 0; r < mbp; ++r) lk[r] = r < rows ? lse[i0 + r] : T(0);
    for (int64_t j0 = 0; j0 < 2 * n;) {
      const int64_t nb = std::min<int64_t>(kBlockCols, (j0 < n ? n : 2 * n) - j0);
      pack_transposed(u, j0, nb, nbp, T(1), bp.data());
      score_block_t<T, Tl>(ap.data(), mbp, bp.data(), nbp, d, s.data());  // (1) recomputed, transposed
      // (4) Wt[c][r] = exp(s_kj - lse_k) + exp(s_kj - lse_j) with k = i0 + r, j = j0 + c; 0 on the
      // diagonal and in the column padding (padding rows r >= rows are computed but never stored)
      for (int64_t c = 0; c < nbp; ++c) {
        T* wrow = s.data() + c * mbp;
        if (c >= nb) {
          for (int64_t r = 0; r < mbp; ++r) wrow[r] = T(0);
          continue;
        }
        const T lj = lse[j0 + c];
        for (int64_t r = 0; r < mbp; ++r) wrow[r] = fast_exp(wrow[r] - lk[r]) + fast_exp(wrow[r] - lj);
        const int64_t diag = j0 + c - i0;
        if (diag >= 0 && diag < rows) wrow[diag] = T(0);
      }
      wu_block<T, Tl>(s.data(), mbp, u.row(j0), nb, d, acc.data());  // acc += W @ u_J
      j0 += nb;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t k = i0 + r;
      T* out = k < n ? ga + k * d : gb + (k - n) * d;
      const T* a = acc.data() + r * d;
      const T* up = u.row(u.partner(k));
      for (int64_t x = 0; x < d; ++x) out[x] = coef * (a[x] - T(2) * up[x]);
    }
  });
}

// ---- entry points: run-time ISA dispatch for float, plain for double ------------------------------

#if CBD_NTX_X86
__attribute__((target(CBD_NTX_TARGET_AVX512))) CBD_NTX_FLATTEN inline void fwd_rows_f32_avx512(
    const float* za, const float* zb, int64_t n, int64_t d, float it, int64_t r0, int64_t r1, float* lse,
    float* term) {
  fwd_rows_impl<float, TileAvx512>(za, zb, n, d, it, r0, r1, lse, term);
}
__attribute__((target(CBD_NTX_TARGET_AVX2))) CBD_NTX_FLATTEN inline void fwd_rows_f32_avx2(
    const float* za, const float* zb, int64_t n, int64_t d, float it, int64_t r0, int64_t r1, float* lse,
    float* term) {
  fwd_rows_impl<float, TileAvx2>(za, zb, n, d, it, r0, r1, lse, term);
}
__attribute__((target(CBD_NTX_TARGET_AVX512))) CBD_NTX_FLATTEN inline void bwd_rows_f32_avx512(
    const float* za, const float* zb, int64_t n, int64_t d, float it, const float* lse, float coef,
    int64_t r0, int64_t r1, float* ga, float* gb) {
  bwd_rows_impl<float, TileAvx512>(za, zb, n, d, it, lse, coef, r0, r1, ga, gb);
}
__attribute__((target(CBD_NTX_TARGET_AVX2))) CBD_NTX_FLATTEN inline void bwd_rows_f32_avx2(
    const float* za, const float* zb, int64_t n, int64_t d, float it, const float* lse, float coef,
    int64_t r0, int64_t r1, float* ga, float* gb) {
  bwd_rows_impl<float, TileAvx2>(za, zb, n, d, it, lse, coef, r0, r1, ga, gb);
}
#endif

CBD_NTX_FLATTEN inline void fwd_rows_f32_base(const float* za, const float* zb, int64_t n, int64_t d, float it,
                                               int64_t r0, int64_t r1, float* lse, float* term) {
  fwd_rows_impl<float, TileBase>(za, zb, n, d, it, r0, r1, lse, term);
}
CBD_NTX_FLATTEN inline void bwd_rows_f32_base(const float* za, const float* zb, int64_t n, int64_t d, float it,
                                               const float* lse, float coef, int64_t r0, int64_t r1, float* ga,
                                               float* gb) {
  bwd_rows_impl<float, TileBase>(za, zb, n, d, it, lse, coef, r0, r1, ga, gb);
}

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Whether this machine can run the float kernels compiled for `level`.
inline bool supported(Isa level) {
#if CBD_NTX_X86
  switch (level) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return level == Isa::kBaseline;
#endif
}

// Which instruction set the float kernels use on this machine (checked once): the widest supported.
inline Isa isa() {
  static const Isa level = supported(Isa::kAvx512) ? Isa::kAvx512
                           : supported(Isa::kAvx2) ? Isa::kAvx2
                                                   : Isa::kBaseline;
  return level;
}

inline const char* isa_name(Isa level = isa()) {
  switch (level) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// Forward over rows [r0, r1) of u = [za; zb]: lse[i] = log sum_{j != i} exp(s_ij) and
// term[i] = lse[i] - s_{i,p(i)}; the loss is sum(term) / (2n). Arrays: za, zb [n, d]; lse, term [2n].
// `level` (default: this machine's) must be supported(); tests pass each supported level.
inline void fwd_rows(const float* za, const float* zb, int64_t n, int64_t d, float inv_temp, int64_t r0,
                     int64_t r1, float* lse, float* term, Isa level = isa()) {
#if CBD_NTX_X86
  if (level == Isa::kAvx512) return fwd_rows_f32_avx512(za, zb, n, d, inv_temp, r0, r1, lse, term);
  if (level == Isa::kAvx2) return fwd_rows_f32_avx2(za, zb, n, d, inv_temp, r0, r1, lse, term);
#endif
  fwd_rows_f32_base(za, zb, n, d, inv_temp, r0, r1, lse, term);
}

inline void fwd_rows(const double* za, const double* zb, int64_t n, int64_t d, double inv_temp, int64_t r0,
                     int64_t r1, double* lse, double* term) {
  fwd_rows_impl<double, TileF64>(za, zb, n, d, inv_temp, r0, r1, lse, term);
}

// Backward over rows [r0, r1) of u: grad of the loss scaled so that coef = grad * inv_temp / (2n);
// rows k < n go to ga[k] ([n, d]), rows k >= n to gb[k - n]. lse is the forward's [2n] output.
inline void bwd_rows(const float* za, const float* zb, int64_t n, int64_t d, float inv_temp, const float* lse,
                     float coef, int64_t r0, int64_t r1, float* ga, float* gb, Isa level = isa()) {
#if CBD_NTX_X86
  if (level == Isa::kAvx512) return bwd_rows_f32_avx512(za, zb, n, d, inv_temp, lse, coef, r0, r1, ga, gb);
  if (level == Isa::kAvx2) return bwd_rows_f32_avx2(za, zb, n, d, inv_temp, lse, coef, r0, r1, ga, gb);
#endif
  bwd_rows_f32_base(za, zb, n, d, inv_temp, lse, coef, r0, r1, ga, gb);
}

inline void bwd_rows(const double* za, const double* zb, int64_t n, int64_t d, double inv_temp,
                     const double* lse, double coef, int64_t r0, int64_t r1, double* ga, double* gb) {
  bwd_rows_impl<double, TileF64>(za, zb, n, d, inv_temp, lse, coef, r0, r1, ga, gb);
}

}  // namespace nt_xent_cpu
}  // namespace cbd_fast
