// gptfast._cpu: the CPU linear of a decode step on a panel-packed weight.
//
// A CPU decode step multiplies 1-8 rows of activations by each weight once, so it is bound by how
// fast the weight streams from memory. This kernel reads it once, in order:
//
//   packed[p, k, c] = W[32 p + c, k]          (P = ceil(N / 32) panels of K x 32; pad columns 0)
//   y[m, n] = scale[n] * sum_k x[m, k] * packed[n / 32, k, n % 32] + bias[n]
//
// One panel is one sequential stream of 32 K-long columns. For each k the kernel loads the 32
// weights of row k of the panel (32 bytes in int8), widens them to fp32 in registers and adds
// x[m, k] * w into 32 accumulators per row of x: no horizontal sums, the activations are read
// from L1, and the weight is touched once per block of up to `kRowsPerTile` rows. The weight is
// int8 with per-output-channel scales (the code is generic over the weight type, but only int8 is
// bound: on fp32 weights it measured no faster than MKL at 1 row or oneDNN's packed linear at 4-8).
// Activations and sums are fp32: weight-only quantisation, the activations are never rounded.
//
// Panels are split between OpenMP threads (the caller passes torch's thread count: the process's
// OpenMP runtime is torch's own, `libgomp.so.1` is loaded by torch before this module). The GIL is
// released while the kernel runs, so several Python threads may call it at once.
//
// The instruction set is chosen at run time: AVX-512F, AVX2 + FMA, or portable C++. Each keeps the
// same summation order over k (one fused or unfused multiply-add per k), so the three differ only
// in rounding. Pointers come from Python as integers (`Tensor.data_ptr()`); gptfast/ops/cpu_linear.py
// checks shapes, dtypes, contiguity and devices before calling.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GPTFAST_X86 1
#else
#define GPTFAST_X86 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kPanel = 32;       // output columns per panel
constexpr int kRowsPerTile = 8;      // rows of x per pass over a panel (AVX-512: 16 accumulators)
constexpr int64_t kPrefetchK = 64;  // panel rows ahead of the load (2 KB in int8, 8 KB in fp32)

enum Isa : int { kAuto = 0, kPortable = 1, kAvx2 = 2, kAvx512 = 3 };

bool cpu_has(Isa isa) {
#if GPTFAST_X86 && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
    case kPortable: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512: return __builtin_cpu_supports("avx512f");
    default: return false;
  }
#else
  return isa == kPortable;
#endif
}

Isa best_isa() {
  if (cpu_has(kAvx512)) return kAvx512;
  if (cpu_has(kAvx2)) return kAvx2;
  return kPortable;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case kPortable: return "portable";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    default: return "auto";
  }
}

// Arguments of one call, shared by every tile.
template <typename W>
struct Problem {
  const float* x;      // (M, K), row stride ldx
  int64_t ldx;
  const W* w;          // (P, K, 32)
  const float* scale;  // (N,) or nullptr (fp32 weights)
  const float* bias;   // (N,) or nullptr
  float* y;            // (M, N), row stride ldy
  int64_t ldy;
  int64_t M, N, K;
};

// The epilogue of one tile: acc[r][c] holds sum_k for row m0 + r, column n0 + c (c < 32).
template <typename W>
inline void store_tile(const Problem<W>& pb, int64_t m0, int rows, int64_t n0, const float* acc) {
  const int64_t cols = std::min<int64_t>(kPanel, pb.N - n0);
  for (int r = 0; r < rows; ++r) {
    float* out = pb.y + (m0 + r) * pb.ldy + n0;
    const float* a = acc + r * kPanel;
    for (int64_t c = 0; c < cols; ++c) {
      float v = a[c];
      if (pb.scale) v *= pb.scale[n0 + c];
      if (pb.bias) v += pb.bias[n0 + c];
      out[c] = v;
    }
  }
}

// ---- portable C++ -------------------------------------------------------------------------------

template <typename W>
void tile_portable(const Problem<W>& pb, int64_t p, int64_t m0, int rows) {
  float acc[kRowsPerTile * kPanel] = {};
  const W* panel = pb.w + p * pb.K * kPanel;
  for (int64_t k = 0; k < pb.K; ++k) {
    const W* wk = panel + k * kPanel;
    for (int r = 0; r < rows; ++r) {
      const float xv = pb.x[(m0 + r) * pb.ldx + k];
      float* a = acc + r * kPanel;
      for (int64_t c = 0; c < kPanel; ++c) a[c] += xv * static_cast<float>(wk[c]);
    }
  }
  store_tile(pb, m0, rows, p * kPanel, acc);
}

#if GPTFAST_X86 && (defined(__GNUC__) || defined(__clang__))

// Software prefetch of the panel `kPrefetchK` rows ahead, one request per 64-byte line: the hardware
// prefetchers stop at each 4 KB page, and a decode step's weights come from DRAM (measured on the
// development machine, 49 GPT-2 int8 matmuls after a cache flush: 13.1 -> 16.8 GB/s).
template <typename W>
inline void prefetch_ahead(const W* wk, int64_t k) {
  constexpr int64_t row_bytes = kPanel * sizeof(W);
  // integer arithmetic: the address may lie past the end of the weight (a prefetch never faults)
  const auto ahead = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wk) + kPrefetchK * row_bytes);
  if constexpr (row_bytes < 64) {
    if (k % (64 / row_bytes) == 0) _mm_prefetch(ahead, _MM_HINT_T0);
  } else {
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
  }
}

// ---- AVX2 + FMA: 16 ymm registers hold 4 rows x 16 columns (8 accumulators, 2 weights, 1 input),
// so a panel is done as two halves of 16 columns (the second reads the panel from L1/L2) ----------

__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
__attribute__((target("avx2,fma"))) inline __m256 load8_avx2(const float* w) { return _mm256_loadu_ps(w); }

template <int R, typename W>
__attribute__((target("avx2,fma"))) void half_tile_avx2(const Problem<W>& pb, int64_t p, int64_t m0, int half,
                                                      float* acc_out) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const W* wk = pb.w + p * pb.K * kPanel + half * 16;
  const float* x = pb.x + m0 * pb.ldx;
  for (int64_t k = 0; k < pb.K; ++k, wk += kPanel) {
    if (half == 0) prefetch_ahead(wk, k);
    const __m256 w0 = load8_avx2(wk), w1 = load8_avx2(wk + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * pb.ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(acc_out + r * kPanel + half * 16, acc[r][0]);
    _mm256_storeu_ps(acc_out + r * kPanel + half * 16 + 8, acc[r][1]);
  }
}

template <typename W>
__attribute__((target("avx2,fma"))) void tile_avx2(const Problem<W>& pb, int64_t p, int64_t m0, int rows) {
  alignas(64) float acc[kRowsPerTile * kPanel];
  for (int done = 0; done < rows;) {
    const int r = std::min(4, rows - done);
    for (int half = 0; half < 2; ++half) {
      float* out = acc + done * kPanel;
      switch (r) {
        case 1: half_tile_avx2<1>(pb, p, m0 + done, half, out); break;
        case 2: half_tile_avx2<2>(pb, p, m0 + done, half, out); break;
        case 3: half_tile_avx2<3>(pb, p, m0 + done, half, out); break;
        default: half_tile_avx2<4>(pb, p, m0 + done, half, out); break;
      }
    }
    done += r;
  }
  store_tile(pb, m0, rows, p * kPanel, acc);
}

// ---- AVX-512F: a tile is up to 8 rows x 32 columns (16 accumulators, 2 weight registers) -------

__attribute__((target("avx512f"))) inline __m512 load16_avx512(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
__attribute__((target("avx512f"))) inline __m512 load16_avx512(const float* w) { return _mm512_loadu_ps(w); }

template <int R, typename W>
__attribute__((target("avx512f"))) void tile_avx512_rows(const Problem<W>& pb, int64_t p, int64_t m0,
                                                         float* acc_out) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const W* wk = pb.w + p * pb.K * kPanel;
  const float* x = pb.x + m0 * pb.ldx;
  for (int64_t k = 0; k < pb.K; ++k, wk += kPanel) {
    prefetch_ahead(wk, k);
    const __m512 w0 = load16_avx512(wk), w1 = load16_avx512(wk + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * pb.ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(acc_out + r * kPanel, acc[r][0]);
    _mm512_storeu_ps(acc_out + r * kPanel + 16, acc[r][1]);
  }
}

template <typename W>
__attribute__((target("avx512f"))) void tile_avx512(const Problem<W>& pb, int64_t p, int64_t m0, int rows) {
  alignas(64) float acc[kRowsPerTile * kPanel];
  switch (rows) {
    case 1: tile_avx512_rows<1>(pb, p, m0, acc); break;
    case 2: tile_avx512_rows<2>(pb, p, m0, acc); break;
    case 3: tile_avx512_rows<3>(pb, p, m0, acc); break;
    case 4: tile_avx512_rows<4>(pb, p, m0, acc); break;
    case 5: tile_avx512_rows<5>(pb, p, m0, acc); break;
    case 6: tile_avx512_rows<6>(pb, p, m0, acc); break;
    case 7: tile_avx512_rows<7>(pb, p, m0, acc); break;
    default: tile_avx512_rows<8>(pb, p, m0, acc); break;
  }
  store_tile(pb, m0, rows, p * kPanel, acc);
}

#endif  // x86

template <typename W>
void run(const Problem<W>& pb, Isa isa, int threads) {
  const int64_t panels = (pb.N + kPanel - 1) / kPanel;
  auto one_panel = [&](int64_t p) {
    // every row block of x against this panel while it is in L1/L2
    for (int64_t m0 = 0; m0 < pb.M; m0 += kRowsPerTile) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerTile, pb.M - m0));
      switch (isa) {
#if GPTFAST_X86 && (defined(__GNUC__) || defined(__clang__))
        case kAvx512: tile_avx512(pb, p, m0, rows); break;
        case kAvx2: tile_avx2(pb, p, m0, rows); break;
#endif
        default: tile_portable(pb, p, m0, rows); break;
      }
    }
  };
#ifdef _OPENMP
  if (threads > 1 && panels > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; ++p) one_panel(p);
    return;
  }
#else
  (void)threads;
#endif
  for (int64_t p = 0; p < panels; ++p) one_panel(p);
}

Isa resolve(int isa) {
  if (isa == kAuto) return best_isa();
  if (isa < kPortable || isa > kAvx512) throw std::invalid_argument("isa must be 0 (auto) to 3, got " + std::to_string(isa));
  const Isa wanted = static_cast<Isa>(isa);
  if (!cpu_has(wanted)) throw std::invalid_argument(std::string("this CPU does not support ") + isa_name(wanted));
  return wanted;
}

void check_sizes(int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldy) {
  if (M < 0 || N <= 0 || K <= 0 || ldx < K || ldy < N)
    throw std::invalid_argument("bad sizes: M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" +
                                std::to_string(K) + " ldx=" + std::to_string(ldx) + " ldy=" + std::to_string(ldy));
}

template <typename W>
void pack(uintptr_t src, int64_t N, int64_t K, uintptr_t dst) {
  if (N <= 0 || K <= 0) throw std::invalid_argument("pack: N and K must be positive");
  const W* w = reinterpret_cast<const W*>(src);
  W* out = reinterpret_cast<W*>(dst);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    W* panel = out + p * K * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t n = p * kPanel + c;
      for (int64_t k = 0; k < K; ++k) panel[k * kPanel + c] = n < N ? w[n * K + k] : W(0);
    }
  }
}

template <typename W>
void linear(uintptr_t x, int64_t ldx, uintptr_t w, uintptr_t scale, uintptr_t bias, uintptr_t y, int64_t ldy,
            int64_t M, int64_t N, int64_t K, int threads, int isa) {
  check_sizes(M, N, K, ldx, ldy);
  const Problem<W> pb{reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const W*>(w),
                      reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(bias),
                      reinterpret_cast<float*>(y), ldy, M, N, K};
  if (M == 0) return;
  run(pb, resolve(isa), std::max(threads, 1));
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "The CPU decode linear on panel-packed int8 weights (see gptfast/ops/cpu_linear.py).";
  m.attr("PANEL") = kPanel;
  m.attr("ROWS_PER_TILE") = kRowsPerTile;
  m.def("best_isa", [] { return std::string(isa_name(best_isa())); },
        "The fastest instruction set this CPU runs: 'avx512', 'avx2' or 'portable'.");
  m.def("supports", [](int isa) { return isa >= kPortable && isa <= kAvx512 && cpu_has(static_cast<Isa>(isa)); },
        py::arg("isa"));
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("pack_int8", &pack<int8_t>, py::arg("src"), py::arg("N"), py::arg("K"), py::arg("dst"),
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_int8", &linear<int8_t>, py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("scale"),
        py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("threads"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());
}
