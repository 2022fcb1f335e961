// Micro-tile choice of the NT-Xent CPU core (csrc/kernels/nt_xent_cpu.h), side by side in one
// process: forward + backward over all 2N rows on one thread, for the shipped tile of each ISA this
// machine supports against other tiles compiled for the same ISA. Prints ms (best of 5 rounds) and
// each tile's time over the shipped one's.
//
//   g++ -O3 -std=c++17 -Icsrc benchmarks/bench_nt_xent_tiles.cpp -o /tmp/bench_nt_xent_tiles
//   /tmp/bench_nt_xent_tiles
// (the CMake build of the C++ tests also builds it: build/cmake/bench_nt_xent_tiles)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "kernels/nt_xent_cpu.h"

namespace ntx = cbd_fast::nt_xent_cpu;

namespace {

struct Data {
  int64_t n, d;
  std::vector<float> a, b, lse, term, ga, gb;
  Data(int64_t n_, int64_t d_) : n(n_), d(d_), a(n_ * d_), b(n_ * d_), lse(2 * n_), term(2 * n_), ga(n_ * d_),
                                 gb(n_ * d_) {
    std::mt19937 gen(1);
    std::normal_distribution<float> dist(0.0f, 0.1f);
    for (auto& v : a) v = dist(gen);
    for (auto& v : b) v = dist(gen);
  }
};

using RunFn = void (*)(Data&);

template <typename Tl>
void fwd_bwd(Data& x) {
  ntx::fwd_rows_impl<float, Tl>(x.a.data(), x.b.data(), x.n, x.d, 2.0f, 0, 2 * x.n, x.lse.data(), x.term.data());
  ntx::bwd_rows_impl<float, Tl>(x.a.data(), x.b.data(), x.n, x.d, 2.0f, x.lse.data(), 0.01f, 0, 2 * x.n,
                                x.ga.data(), x.gb.data());
}

#if CBD_NTX_X86
template <typename Tl>
__attribute__((target(CBD_NTX_TARGET_AVX512))) CBD_NTX_FLATTEN void run_avx512(Data& x) {
  fwd_bwd<Tl>(x);
}
template <typename Tl>
__attribute__((target(CBD_NTX_TARGET_AVX2))) CBD_NTX_FLATTEN void run_avx2(Data& x) {
  fwd_bwd<Tl>(x);
}
#endif
template <typename Tl>
CBD_NTX_FLATTEN void run_base(Data& x) {
  fwd_bwd<Tl>(x);
}

double best_ms(RunFn fn, Data& x, int reps) {
  fn(x);  // warm-up
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) fn(x);
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::milli>(t1 - t0).count() / reps);
  }
  return best;
}

// rows: (name, fn); the first is the shipped tile.
void compare(const char* isa, const std::vector<std::pair<const char*, RunFn>>& tiles) {
  std::printf("%s (first: the shipped tile)\n", isa);
  const std::pair<int64_t, int64_t> cases[] = {{128, 128}, {512, 128}, {2048, 128}, {128, 512}};
  for (const auto& c : cases) {
    Data x(c.first, c.second);
    const int reps = c.first >= 2048 ? 2 : 10;
    std::printf("  2N=%-5lld D=%-4lld", static_cast<long long>(2 * c.first), static_cast<long long>(c.second));
    double shipped = 0;
    for (size_t i = 0; i < tiles.size(); ++i) {
      const double ms = best_ms(tiles[i].second, x, reps);
      if (i == 0) shipped = ms;
      std::printf("  %s %.2f ms (%.2fx)", tiles[i].first, ms, ms / shipped);
    }
    std::printf("\n");
  }
}

}  // namespace

int main() {
#if CBD_NTX_X86
  if (ntx::supported(ntx::Isa::kAvx512))
    compare("avx512", {{"8x16", run_avx512<ntx::TileAvx512>},
                       {"8x8", run_avx512<ntx::Tile<8, 8>>},
                       {"4x16", run_avx512<ntx::Tile<4, 16>>}});
  if (ntx::supported(ntx::Isa::kAvx2))
    compare("avx2", {{"8x8", run_avx2<ntx::TileAvx2>},
                     {"8x16", run_avx2<ntx::Tile<8, 16>>},
                     {"4x16", run_avx2<ntx::Tile<4, 16>>},
                     {"4x8", run_avx2<ntx::Tile<4, 8>>}});
#endif
  compare("baseline", {{"8x4", run_base<ntx::TileBase>},
                       {"8x16", run_base<ntx::Tile<8, 16>>},
                       {"8x8", run_base<ntx::Tile<8, 8>>},
                       {"4x4", run_base<ntx::Tile<4, 4>>}});
  return 0;
}
