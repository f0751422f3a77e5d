// Native CPU kernels, float32, as XLA FFI custom calls: the stride-1 2-D
// convolution (NHWC x HWIO) forward pass (EchoOdeConvFwd) and weight gradient
// (EchoOdeConvWgrad), and SPADE's instance norm + modulation + leaky ReLU
// forward (EchoOdeNormModFwd) and backward (EchoOdeNormModBwd).
// echo_ode_jax.kernels.cpu.native builds this file with the host's C++
// compiler (-O3 -march=native) and registers the handlers.
//
// Weight gradient:
//   dW[i, j, ci, co] = sum_{n, y, x} Xpad[n, y + i, x + j, ci] * G[n, y, x, co]
//
// Xpad is x zero-padded by (pt, pb) rows and (pl, pr) columns; G is the
// output cotangent (N, Ho, Wo, Co). The work is split into blocks of output
// rows of one image. For each block the needed input rows are copied, padded,
// into a scratch buffer of width Wp = Wo + kw - 1, and the cotangent rows into
// one of the same width (zeros in the kw - 1 extra columns). Tap (i, j) is
// then the contiguous window starting at row i * Wp + j of the scratch, and
// its gradient one (L x A)^T (L x B) product, L = rows * Wp, computed by a
// register-blocked kernel (16-float vectors along B with AVX-512, else 8;
// broadcasts along A)
// while the block is in cache. B is Co (or Ci when that wastes fewer vector
// lanes or, on a tie, is wider; the result is then transposed), padded to a multiple of the width.
// Fixed ranges of blocks are shared between the calling thread and XLA's
// intra-op thread pool; each range sums into its own accumulator, and the
// accumulators are added in a fixed order (deterministic).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace wgrad {

// Vector width and register tiles (A rows x vectors): 32 vector registers
// with AVX-512, else 16 (AVX2: 8-float vectors).
#ifdef __AVX512F__
constexpr int kLanes = 16, kT4 = 6, kT2 = 12, kT1 = 24;
#else
constexpr int kLanes = 8, kT4 = 3, kT2 = 6, kT1 = 12;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4), aligned(4)));

static inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
static inline vf bcast(float a) { return vf{} + a; }

// out[a][b] += sum_l P[l * lda + a] * Q[l * ldq + b], a < AB, b < VB * kLanes.
template <int AB, int VB>
static inline void micro(const float* P, int64_t lda, const float* Q, int64_t ldq,
                         int64_t L, float* out, int64_t ldo) {
  vf acc[AB][VB];
  for (int a = 0; a < AB; ++a)
    for (int v = 0; v < VB; ++v) acc[a][v] = load(out + a * ldo + v * kLanes);
  for (int64_t l = 0; l < L; ++l) {
    vf q[VB];
    for (int v = 0; v < VB; ++v) q[v] = load(Q + l * ldq + v * kLanes);
    const float* p = P + l * lda;
    for (int a = 0; a < AB; ++a) {
      vf pa = bcast(p[a]);
      for (int v = 0; v < VB; ++v) acc[a][v] += pa * q[v];
    }
  }
  for (int a = 0; a < AB; ++a)
    for (int v = 0; v < VB; ++v) store(out + a * ldo + v * kLanes, acc[a][v]);
}

template <int VB, int AB>
static inline void micro_rem(int rem, const float* P, int64_t lda, const float* Q, int64_t ldq,
                             int64_t L, float* out, int64_t ldo) {
  if constexpr (AB > 0) {
    if (rem == AB) return micro<AB, VB>(P, lda, Q, ldq, L, out, ldo);
    micro_rem<VB, AB - 1>(rem, P, lda, Q, ldq, L, out, ldo);
  }
}

// out (A x B, ldo) += P(L x A, lda)^T Q(L x B, ldq); B a multiple of kLanes.
static void gemm_tn(const float* P, int64_t lda, int64_t A, const float* Q, int64_t ldq,
                    int64_t B, int64_t L, float* out, int64_t ldo) {
  int64_t b = 0;
  for (; b + 4 * kLanes <= B; b += 4 * kLanes) {
    int64_t a = 0;
    for (; a + kT4 <= A; a += kT4) micro<kT4, 4>(P + a, lda, Q + b, ldq, L, out + a * ldo + b, ldo);
    if (a < A) micro_rem<4, kT4 - 1>(A - a, P + a, lda, Q + b, ldq, L, out + a * ldo + b, ldo);
  }
  for (; b + 2 * kLanes <= B; b += 2 * kLanes) {
    int64_t a = 0;
    for (; a + kT2 <= A; a += kT2) micro<kT2, 2>(P + a, lda, Q + b, ldq, L, out + a * ldo + b, ldo);
    if (a < A) micro_rem<2, kT2 - 1>(A - a, P + a, lda, Q + b, ldq, L, out + a * ldo + b, ldo);
  }
  for (; b < B; b += kLanes) {
    int64_t a = 0;
    for (; a + kT1 <= A; a += kT1) micro<kT1, 1>(P + a, lda, Q + b, ldq, L, out + a * ldo + b, ldo);
    if (a < A) micro_rem<1, kT1 - 1>(A - a, P + a, lda, Q + b, ldq, L, out + a * ldo + b, ldo);
  }
}

struct Shape {
  int64_t n, h, w, ci, ho, wo, co, kh, kw, pt, pl;
};

// The forward pass's limit on kh * kw (its tap offset table; native.MAX_TAPS).
constexpr int64_t kMaxTaps = 64;

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Copies input rows [y0 - pt, y0 - pt + rx) of image `img` into xs, zero-padded
// to width wp (pl columns on the left) and to cx >= Ci channels, plus a
// slack of kw rows read by the last tap; rows outside the image are zero.
static void pad_rows(const Shape& s, const float* x, int64_t img, int64_t y0, int64_t rx,
                     int64_t wp, int64_t cx, std::vector<float>& xs) {
  xs.assign((rx * wp + s.kw) * cx, 0.f);
  for (int64_t k = 0; k < rx; ++k) {
    const int64_t src = y0 + k - s.pt;
    if (src < 0 || src >= s.h) continue;
    const float* xr = x + ((img * s.h + src) * s.w) * s.ci;
    float* dst = xs.data() + (k * wp + s.pl) * cx;
    // wp - pl >= w: the handlers reject negative padding.
    if (cx == s.ci) std::memcpy(dst, xr, sizeof(float) * s.w * s.ci);
    else for (int64_t c = 0; c < s.w; ++c) std::memcpy(dst + c * cx, xr + c * s.ci, sizeof(float) * s.ci);
  }
}

// Accumulates rows [y0, y1) of image `img` into acc ((kh*kw) x A x Bp), where the
// vectorised side is Co (swap=false: A = Ci) or Ci (swap=true: A = Co).
// Scratch is resized as needed.
static void rows(const Shape& s, const float* x, const float* g, int64_t img, int64_t y0,
                 int64_t y1, bool swap, float* acc, std::vector<float>& xs,
                 std::vector<float>& gs) {
  const int64_t wp = s.wo + s.kw - 1;                 // padded width (stride 1)
  const int64_t r = y1 - y0, rx = r + s.kh - 1;       // output rows, input rows
  const int64_t cx = swap ? round_up(s.ci, kLanes) : s.ci;   // x scratch channels
  const int64_t cg = swap ? s.co : round_up(s.co, kLanes);   // g scratch channels
  pad_rows(s, x, img, y0, rx, wp, cx, xs);
  gs.assign(r * wp * cg, 0.f);
  for (int64_t k = 0; k < r; ++k) {
    const float* gr = g + ((img * s.ho + y0 + k) * s.wo) * s.co;
    float* dst = gs.data() + k * wp * cg;
    if (cg == s.co) std::memcpy(dst, gr, sizeof(float) * s.wo * s.co);
    else for (int64_t c = 0; c < s.wo; ++c) std::memcpy(dst + c * cg, gr + c * s.co, sizeof(float) * s.co);
  }
  const int64_t L = r * wp;
  const int64_t A = swap ? s.co : s.ci;
  const int64_t Bp = swap ? cx : cg;
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) {
      const float* xp = xs.data() + (i * wp + j) * cx;
      float* out = acc + (i * s.kw + j) * A * Bp;
      if (swap) gemm_tn(gs.data(), cg, A, xp, cx, Bp, L, out, Bp);
      else gemm_tn(xp, cx, A, gs.data(), cg, Bp, L, out, Bp);
    }
}

// Forward pass. out rows a < AB (stride ldo), vectors v < VB:
//   out[a][v] = sum_t sum_c X[(a + off[t]) * ldx + c] * W[(t * C + c) * ldw + v * kLanes]
template <int AB, int VB>
static inline void fwd_micro(const float* X, int64_t ldx, const int64_t* off, int64_t taps,
                             int64_t C, const float* W, int64_t ldw, float* out, int64_t ldo) {
  vf acc[AB][VB];
  for (int a = 0; a < AB; ++a)
    for (int v = 0; v < VB; ++v) acc[a][v] = vf{};
  for (int64_t t = 0; t < taps; ++t) {
    const float* x = X + off[t] * ldx;
    const float* w = W + t * C * ldw;
    for (int64_t c = 0; c < C; ++c) {
      vf wv[VB];
      for (int v = 0; v < VB; ++v) wv[v] = load(w + c * ldw + v * kLanes);
      for (int a = 0; a < AB; ++a) {
        vf xa = bcast(x[a * ldx + c]);
        for (int v = 0; v < VB; ++v) acc[a][v] += xa * wv[v];
      }
    }
  }
  for (int a = 0; a < AB; ++a)
    for (int v = 0; v < VB; ++v) store(out + a * ldo + v * kLanes, acc[a][v]);
}

template <int VB, int AB>
static inline void fwd_rem(int rem, const float* X, int64_t ldx, const int64_t* off,
                           int64_t taps, int64_t C, const float* W, int64_t ldw, float* out,
                           int64_t ldo) {
  if constexpr (AB > 0) {
    if (rem == AB) return fwd_micro<AB, VB>(X, ldx, off, taps, C, W, ldw, out, ldo);
    fwd_rem<VB, AB - 1>(rem, X, ldx, off, taps, C, W, ldw, out, ldo);
  }
}

// out (L x Bp) = sum_t X[off[t] + l, :C] W[t] (C x Bp), rows l < L, in tiles.
template <int AB, int VB>
static void fwd_cols(const float* X, int64_t ldx, const int64_t* off, int64_t taps, int64_t C,
                     const float* W, int64_t ldw, int64_t L, float* out, int64_t ldo) {
  int64_t l = 0;
  for (; l + AB <= L; l += AB)
    fwd_micro<AB, VB>(X + l * ldx, ldx, off, taps, C, W, ldw, out + l * ldo, ldo);
  if (l < L) fwd_rem<VB, AB - 1>(L - l, X + l * ldx, ldx, off, taps, C, W, ldw, out + l * ldo, ldo);
}

// The forward pass for kw = 3, reusing each broadcast input value for the
// three taps of a kernel row: output rows a < AB (stride ldo), vectors v < VB,
//   out[a][v] = sum_i sum_c sum_j X[(a + j + i * wp) * ldx + c] * W[((i * 3 + j) * C + c) * ldw + v * kLanes]
// AB + 2 broadcasts per 3 * AB * VB multiply-adds (fwd_micro: AB per AB * VB).
template <int AB, int VB>
static inline void fwd_micro3(const float* X, int64_t ldx, int64_t wp, int64_t kh, int64_t C,
                              const float* W, int64_t ldw, float* out, int64_t ldo) {
  vf acc[AB][VB];
  for (int a = 0; a < AB; ++a)
    for (int v = 0; v < VB; ++v) acc[a][v] = vf{};
  for (int64_t i = 0; i < kh; ++i) {
    const float* x = X + i * wp * ldx;
    const float* w = W + i * 3 * C * ldw;
    for (int64_t c = 0; c < C; ++c) {
      vf wv[3][VB];
#pragma GCC unroll 16
      for (int j = 0; j < 3; ++j)
#pragma GCC unroll 16
        for (int v = 0; v < VB; ++v) wv[j][v] = load(w + (j * C + c) * ldw + v * kLanes);
#pragma GCC unroll 32
      for (int p = 0; p < AB + 2; ++p) {
        vf xp = bcast(x[p * ldx + c]);
#pragma GCC unroll 4
        for (int j = 0; j < 3; ++j) {
          const int a = p - j;
          if (a >= 0 && a < AB)
#pragma GCC unroll 4
            for (int v = 0; v < VB; ++v) acc[a][v] += xp * wv[j][v];
        }
      }
    }
  }
  for (int a = 0; a < AB; ++a)
    for (int v = 0; v < VB; ++v) store(out + a * ldo + v * kLanes, acc[a][v]);
}

template <int VB, int AB>
static inline void fwd_rem3(int rem, const float* X, int64_t ldx, int64_t wp, int64_t kh,
                            int64_t C, const float* W, int64_t ldw, float* out, int64_t ldo) {
  if constexpr (AB > 0) {
    if (rem == AB) return fwd_micro3<AB, VB>(X, ldx, wp, kh, C, W, ldw, out, ldo);
    fwd_rem3<VB, AB - 1>(rem, X, ldx, wp, kh, C, W, ldw, out, ldo);
  }
}

template <int AB, int VB>
static void fwd_cols3(const float* X, int64_t ldx, int64_t wp, int64_t kh, int64_t C,
                      const float* W, int64_t ldw, int64_t L, float* out, int64_t ldo) {
  int64_t l = 0;
  for (; l + AB <= L; l += AB)
    fwd_micro3<AB, VB>(X + l * ldx, ldx, wp, kh, C, W, ldw, out + l * ldo, ldo);
  if (l < L) fwd_rem3<VB, AB - 1>(L - l, X + l * ldx, ldx, wp, kh, C, W, ldw, out + l * ldo, ldo);
}

// fwd_micro3's tiles (output rows for 1, 2, 4 vectors): accumulators plus the
// 3 * VB kernel vectors fit the 32 (AVX-512) or 16 vector registers.
#ifdef __AVX512F__
constexpr int kR1 = 24, kR2 = 12, kR4 = 0;
#else
constexpr int kR1 = 10, kR2 = 4, kR4 = 0;
#endif

// Output rows [y0, y1) of image `img`: wk is the kernel packed to
// (kh*kw, Ci, cop) with cop = Co rounded up to the vector width.
static void fwd_rows(const Shape& s, const float* x, const float* wk, int64_t cop,
                     int64_t img, int64_t y0, int64_t y1, float* y, std::vector<float>& xs,
                     std::vector<float>& os) {
  const int64_t wp = s.wo + s.kw - 1;
  const int64_t r = y1 - y0, L = r * wp;
  pad_rows(s, x, img, y0, r + s.kh - 1, wp, s.ci, xs);
  os.resize(L * cop);
  int64_t off[kMaxTaps];
  const int64_t taps = s.kh * s.kw;
  for (int64_t i = 0; i < s.kh; ++i)
    for (int64_t j = 0; j < s.kw; ++j) off[i * s.kw + j] = i * wp + j;
  int64_t b = 0;
  if (s.kw == 3) {
    if constexpr (kR4 > 0)
      for (; b + 4 * kLanes <= cop; b += 4 * kLanes)
        fwd_cols3<kR4, 4>(xs.data(), s.ci, wp, s.kh, s.ci, wk + b, cop, L, os.data() + b, cop);
    for (; b + 2 * kLanes <= cop; b += 2 * kLanes)
      fwd_cols3<kR2, 2>(xs.data(), s.ci, wp, s.kh, s.ci, wk + b, cop, L, os.data() + b, cop);
    for (; b < cop; b += kLanes)
      fwd_cols3<kR1, 1>(xs.data(), s.ci, wp, s.kh, s.ci, wk + b, cop, L, os.data() + b, cop);
  }
  for (; b + 4 * kLanes <= cop; b += 4 * kLanes)
    fwd_cols<kT4, 4>(xs.data(), s.ci, off, taps, s.ci, wk + b, cop, L, os.data() + b, cop);
  for (; b + 2 * kLanes <= cop; b += 2 * kLanes)
    fwd_cols<kT2, 2>(xs.data(), s.ci, off, taps, s.ci, wk + b, cop, L, os.data() + b, cop);
  for (; b < cop; b += kLanes)
    fwd_cols<kT1, 1>(xs.data(), s.ci, off, taps, s.ci, wk + b, cop, L, os.data() + b, cop);
  for (int64_t k = 0; k < r; ++k) {
    float* dst = y + ((img * s.ho + y0 + k) * s.wo) * s.co;
    const float* src = os.data() + k * wp * cop;
    if (cop == s.co) std::memcpy(dst, src, sizeof(float) * s.wo * s.co);
    else for (int64_t c = 0; c < s.wo; ++c) std::memcpy(dst + c * s.co, src + c * cop, sizeof(float) * s.co);
  }
}

}  // namespace wgrad

namespace {

// Runs body(i, scratch) for i < n on the calling thread and up to
// pool.num_threads() - 1 of XLA's intra-op threads, each index once, taken in
// order by whichever thread is free; `scratch` is one Scratch per thread.
// Returns when every index is done (a helper that starts later finds none).
template <typename Scratch, typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t active = 0;
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, body] {
    {
      std::lock_guard<std::mutex> lock(st->mu);
      ++st->active;
    }
    Scratch scratch;
    for (int64_t i = st->next.fetch_add(1); i < n; i = st->next.fetch_add(1)) body(i, scratch);
    std::lock_guard<std::mutex> lock(st->mu);
    if (--st->active == 0) st->cv.notify_all();
  };
  const int64_t helpers = std::min<int64_t>(n, pool.num_threads()) - 1;
  for (int64_t p = 0; p < helpers; ++p) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->active == 0 && st->next.load() >= n; });
}

struct TwoBuffers {   // per-thread scratch of the conv kernels
  std::vector<float> a, b;
};

// The row blocks are split into kRanges fixed, contiguous ranges, each summed
// into its own accumulator, and the accumulators are added in range order:
// the result does not depend on which thread ran which range, or on how many
// threads there are (bit-for-bit reproducible).
constexpr int64_t kRanges = 16;

double lane_use(int64_t c) { return double(c) / double(wgrad::round_up(c, wgrad::kLanes)); }

ffi::Error ConvWgradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw,
                         int64_t pt, int64_t pl) {
  const auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4)
    return ffi::Error::InvalidArgument("conv_wgrad: x, g and dw must be 4-D (NHWC, NHWC, HWIO)");
  wgrad::Shape s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3], wd[0], wd[1], pt, pl};
  if (gd[0] != s.n || wd[2] != s.ci || wd[3] != s.co || pt < 0 || pl < 0 ||
      s.ho + s.kh - 1 < s.h + pt || s.wo + s.kw - 1 < s.w + pl)
    return ffi::Error::InvalidArgument("conv_wgrad: inconsistent shapes or padding");
  if (s.n * s.ho * s.wo * s.ci * s.co * s.kh * s.kw == 0) {   // an empty sum (or result)
    std::fill(dw->typed_data(), dw->typed_data() + s.kh * s.kw * s.ci * s.co, 0.f);
    return ffi::Error::Success();
  }
  // The vector side: the one that wastes fewer lanes; on a tie the wider one
  // (two or more vectors per row need fewer broadcasts per multiply-add).
  const bool swap =
      lane_use(s.ci) > lane_use(s.co) || (lane_use(s.ci) == lane_use(s.co) && s.ci > s.co);
  const int64_t wp = s.wo + s.kw - 1;
  const int64_t rb = std::max<int64_t>(1, 2048 / wp);
  const int64_t blocks_per_image = (s.ho + rb - 1) / rb;
  const int64_t units = s.n * blocks_per_image;
  const int64_t a = swap ? s.co : s.ci;
  const int64_t bp = wgrad::round_up(swap ? s.ci : s.co, wgrad::kLanes);
  const int64_t ranges = std::min(units, kRanges);
  std::vector<std::vector<float>> accs(ranges, std::vector<float>(s.kh * s.kw * a * bp, 0.f));
  const float *xp = x.typed_data(), *gp = g.typed_data();
  std::vector<float>* acc0 = accs.data();
  parallel_for<TwoBuffers>(pool, ranges, [=](int64_t r, TwoBuffers& sc) {
    float* acc = acc0[r].data();
    for (int64_t u = r * units / ranges; u < (r + 1) * units / ranges; ++u) {
      const int64_t img = u / blocks_per_image;
      const int64_t y0 = (u % blocks_per_image) * rb;
      wgrad::rows(s, xp, gp, img, y0, std::min(s.ho, y0 + rb), swap, acc, sc.a, sc.b);
    }
  });
  float* out = dw->typed_data();
  std::fill(out, out + s.kh * s.kw * s.ci * s.co, 0.f);
  for (int64_t r = 0; r < ranges; ++r) {
    const float* acc = accs[r].data();
    for (int64_t t = 0; t < s.kh * s.kw; ++t)
      for (int64_t i = 0; i < s.ci; ++i)
        for (int64_t o = 0; o < s.co; ++o)
          out[(t * s.ci + i) * s.co + o] +=
              swap ? acc[(t * a + o) * bp + i] : acc[(t * a + i) * bp + o];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoOdeConvWgrad, ConvWgradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

namespace {

// y = conv(x, w): stride 1, x zero-padded by pt rows on top and pl columns on
// the left (bottom and right padding follow from y's shape). Each block of
// output rows is written by one thread; the result does not depend on the split.
ffi::Error ConvFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t pt, int64_t pl) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument("conv_fwd: x, w and y must be 4-D (NHWC, HWIO, NHWC)");
  wgrad::Shape s{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], pt, pl};
  if (yd[0] != s.n || wd[2] != s.ci || wd[3] != s.co || pt < 0 || pl < 0 ||
      s.ho + s.kh - 1 < s.h + pt || s.wo + s.kw - 1 < s.w + pl || s.kh * s.kw > wgrad::kMaxTaps)
    return ffi::Error::InvalidArgument("conv_fwd: inconsistent shapes or padding");
  if (s.n * s.ho * s.wo * s.co == 0) return ffi::Error::Success();   // an empty result
  if (s.ci * s.kh * s.kw == 0) {                                      // an empty sum
    std::fill(y->typed_data(), y->typed_data() + s.n * s.ho * s.wo * s.co, 0.f);
    return ffi::Error::Success();
  }
  const int64_t cop = wgrad::round_up(s.co, wgrad::kLanes);
  std::vector<float> wk(s.kh * s.kw * s.ci * cop, 0.f);
  const float* wsrc = w.typed_data();
  for (int64_t t = 0; t < s.kh * s.kw * s.ci; ++t)
    std::memcpy(wk.data() + t * cop, wsrc + t * s.co, sizeof(float) * s.co);
  const int64_t wp = s.wo + s.kw - 1;
  const int64_t rb = std::max<int64_t>(1, 1024 / wp);
  const int64_t blocks_per_image = (s.ho + rb - 1) / rb;
  const float *xp = x.typed_data(), *wkp = wk.data();
  float* yp = y->typed_data();
  parallel_for<TwoBuffers>(pool, s.n * blocks_per_image, [=](int64_t u, TwoBuffers& sc) {
    const int64_t img = u / blocks_per_image;
    const int64_t y0 = (u % blocks_per_image) * rb;
    wgrad::fwd_rows(s, xp, wkp, cop, img, y0, std::min(s.ho, y0 + rb), yp, sc.a, sc.b);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoOdeConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

// ---------------------------------------------------------------------------
// SPADE's normalisation and modulation with the decoder's activation, fused:
//
//   y = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)   (per image and channel,
//                                                          over the H x W pixels)
//   gamma = gb[..., :C] + bias[:C],  beta = gb[..., C:] + bias[C:]
//   out = leaky_relu(y * (1 + gamma) + beta, slope)
//
// x, out: (N, H, W, C); gb: (N, H, W, 2C), the gamma_beta conv's output before
// its bias (2C); mean, rstd: (N, C); float32. The backward pass takes the
// output cotangent d and returns dx, dgb (the cotangent of gb: dgamma, dbeta)
// and each image's sums of dgamma and dbeta (N, 2C: the bias gradient's terms):
//
//   dz = d where out >= 0, else slope * d;  dgamma = dz * y;  dbeta = dz;
//   dy = dz * (1 + gamma);  dx = rstd * (dy - mean_hw(dy) - y * mean_hw(dy * y)).
//
// Each image is one unit of work; per-channel sums are taken in float over
// blocks of kSumBlock pixels and added in double, in a fixed order
// (deterministic). The channel loops are written with kLanes-wide vectors and
// a scalar tail.
namespace normmod {

using wgrad::kLanes;
using wgrad::load;
using wgrad::store;
using wgrad::vf;

constexpr int64_t kSumBlock = 64;

struct Shape {
  int64_t n, m, c;   // images, pixels per image, channels of x
};

static inline vf leaky(vf z, float slope) { return z >= 0.f ? z : slope * z; }
static inline float leaky(float z, float slope) { return z >= 0.f ? z : slope * z; }

// Forward pass of one image. The statistics come from blocks of kSumBlock
// pixels, each read twice while it is in cache: its mean (float sums of x - the
// block's first pixel) and its sum of squared deviations from that mean; the
// blocks are merged in double with Chan et al.'s pairwise update. So no pixel's
// value sets the cancellation (a one-pass sum of squares shifted by one pixel
// loses the variance when that pixel is an outlier).
static void fwd_image(const Shape& s, int64_t img, const float* x, const float* gb,
                      const float* bias, float eps, float slope, float* out, float* mean,
                      float* rstd, std::vector<float>& part) {
  const int64_t c = s.c, c2 = 2 * s.c;
  const float* __restrict xi = x + img * s.m * c;
  const float* __restrict gi = gb + img * s.m * c2;
  float* __restrict oi = out + img * s.m * c;
  part.assign(3 * c, 0.f);
  float* __restrict bm = part.data();   // the block's mean
  float* __restrict p1 = bm + c;
  float* __restrict p2 = p1 + c;
  std::vector<double> mean_acc(c, 0.0), m2(c, 0.0);
  for (int64_t b0 = 0; b0 < s.m; b0 += kSumBlock) {
    std::fill(p1, p1 + 2 * c, 0.f);
    const int64_t b1 = std::min(s.m, b0 + kSumBlock), nb = b1 - b0;
    const float* __restrict x0 = xi + b0 * c;
    for (int64_t p = b0; p < b1; ++p) {
      int64_t k = 0;
      for (; k + kLanes <= c; k += kLanes)
        store(p1 + k, load(p1 + k) + (load(xi + p * c + k) - load(x0 + k)));
      for (; k < c; ++k) p1[k] += xi[p * c + k] - x0[k];
    }
    for (int64_t k = 0; k < c; ++k) bm[k] = x0[k] + p1[k] / float(nb);
    for (int64_t p = b0; p < b1; ++p) {
      int64_t k = 0;
      for (; k + kLanes <= c; k += kLanes) {
        const vf v = load(xi + p * c + k) - load(bm + k);
        store(p2 + k, load(p2 + k) + v * v);
      }
      for (; k < c; ++k) {
        const float v = xi[p * c + k] - bm[k];
        p2[k] += v * v;
      }
    }
    const double na = double(b0), n = double(b1);
    for (int64_t k = 0; k < c; ++k) {
      const double delta = double(bm[k]) - mean_acc[k];
      mean_acc[k] += delta * double(nb) / n;
      m2[k] += double(p2[k]) + delta * delta * na * double(nb) / n;
    }
  }
  float* __restrict mu = mean + img * c;
  float* __restrict rs = rstd + img * c;
  for (int64_t k = 0; k < c; ++k) {
    mu[k] = float(mean_acc[k]);
    rs[k] = float(1.0 / std::sqrt(m2[k] / double(s.m) + double(eps)));
  }
  const float* __restrict bg = bias;
  const float* __restrict bb = bias + c;
  for (int64_t p = 0; p < s.m; ++p) {
    const float* __restrict xp = xi + p * c;
    const float* __restrict gp = gi + p * c2;
    float* __restrict op = oi + p * c;
    int64_t k = 0;
    for (; k + kLanes <= c; k += kLanes) {
      const vf y = (load(xp + k) - load(mu + k)) * load(rs + k);
      const vf z = y * (load(gp + k) + load(bg + k) + 1.f) + load(gp + c + k) + load(bb + k);
      store(op + k, leaky(z, slope));
    }
    for (; k < c; ++k) {
      const float y = (xp[k] - mu[k]) * rs[k];
      op[k] = leaky(y * (gp[k] + bg[k] + 1.f) + gp[c + k] + bb[k], slope);
    }
  }
}

// Backward pass of one image: one sweep computes dgamma, dbeta (into dgb) and
// dy (kept in dx) and sums dy, dy * y, dgamma and dbeta per channel; a second
// turns dy into dx.
static void bwd_image(const Shape& s, int64_t img, const float* d, const float* x,
                      const float* gb, const float* bias, const float* out, const float* mean,
                      const float* rstd, float slope, float* dx, float* dgb, float* dbias,
                      std::vector<float>& part) {
  const int64_t c = s.c, c2 = 2 * s.c;
  const float* __restrict di = d + img * s.m * c;
  const float* __restrict xi = x + img * s.m * c;
  const float* __restrict gi = gb + img * s.m * c2;
  const float* __restrict oi = out + img * s.m * c;
  const float* __restrict mu = mean + img * c;
  const float* __restrict rs = rstd + img * c;
  const float* __restrict bg = bias;
  float* __restrict dxi = dx + img * s.m * c;
  float* __restrict dgi = dgb + img * s.m * c2;
  part.assign(4 * c, 0.f);
  float* __restrict p1 = part.data();      // dy
  float* __restrict p2 = p1 + c;           // dy * y
  float* __restrict p3 = p2 + c;           // dgamma
  float* __restrict p4 = p3 + c;           // dbeta
  std::vector<double> s1(c, 0.0), s2(c, 0.0), s3(c, 0.0), s4(c, 0.0);
  for (int64_t b0 = 0; b0 < s.m; b0 += kSumBlock) {
    std::fill(p1, p1 + 4 * c, 0.f);
    const int64_t b1 = std::min(s.m, b0 + kSumBlock);
    for (int64_t p = b0; p < b1; ++p) {
      const float* __restrict xp = xi + p * c;
      const float* __restrict dp = di + p * c;
      const float* __restrict op = oi + p * c;
      const float* __restrict gp = gi + p * c2;
      float* __restrict dxp = dxi + p * c;
      float* __restrict dgp = dgi + p * c2;
      int64_t k = 0;
      for (; k + kLanes <= c; k += kLanes) {
        const vf y = (load(xp + k) - load(mu + k)) * load(rs + k);
        const vf dd = load(dp + k);
        const vf dz = load(op + k) >= 0.f ? dd : slope * dd;
        const vf dy = dz * (load(gp + k) + load(bg + k) + 1.f);
        const vf dg = dz * y;
        store(dgp + k, dg);
        store(dgp + c + k, dz);
        store(dxp + k, dy);
        store(p1 + k, load(p1 + k) + dy);
        store(p2 + k, load(p2 + k) + dy * y);
        store(p3 + k, load(p3 + k) + dg);
        store(p4 + k, load(p4 + k) + dz);
      }
      for (; k < c; ++k) {
        const float y = (xp[k] - mu[k]) * rs[k];
        const float dd = dp[k];
        const float dz = op[k] >= 0.f ? dd : slope * dd;
        const float dy = dz * (gp[k] + bg[k] + 1.f);
        const float dg = dz * y;
        dgp[k] = dg;
        dgp[c + k] = dz;
        dxp[k] = dy;
        p1[k] += dy;
        p2[k] += dy * y;
        p3[k] += dg;
        p4[k] += dz;
      }
    }
    for (int64_t k = 0; k < c; ++k) {
      s1[k] += p1[k];
      s2[k] += p2[k];
      s3[k] += p3[k];
      s4[k] += p4[k];
    }
  }
  std::vector<float> m1(c), m2(c);
  for (int64_t k = 0; k < c; ++k) {
    m1[k] = float(s1[k] / double(s.m));
    m2[k] = float(s2[k] / double(s.m));
    dbias[img * c2 + k] = float(s3[k]);
    dbias[img * c2 + c + k] = float(s4[k]);
  }
  // dx = rstd * (dy - mean(dy) - y * mean(dy * y)).
  const float* __restrict q1 = m1.data();
  const float* __restrict q2 = m2.data();
  for (int64_t p = 0; p < s.m; ++p) {
    const float* __restrict xp = xi + p * c;
    float* __restrict dxp = dxi + p * c;
    int64_t k = 0;
    for (; k + kLanes <= c; k += kLanes) {
      const vf r = load(rs + k);
      const vf y = (load(xp + k) - load(mu + k)) * r;
      store(dxp + k, r * (load(dxp + k) - load(q1 + k) - y * load(q2 + k)));
    }
    for (; k < c; ++k) {
      const float y = (xp[k] - mu[k]) * rs[k];
      dxp[k] = rs[k] * (dxp[k] - q1[k] - y * q2[k]);
    }
  }
}

}  // namespace normmod

namespace {

template <typename A, typename B>
bool same_dims(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// x (N, H, W, C), gb (N, H, W, 2C), bias (2C), per-image (N, C or 2C) shapes.
template <typename X, typename G, typename B, typename S>
bool normmod_shapes(const X& xd, const G& gd, const B& bd, const S& sd, int64_t scols) {
  return xd.size() == 4 && gd.size() == 4 && gd[0] == xd[0] && gd[1] == xd[1] &&
         gd[2] == xd[2] && gd[3] == 2 * xd[3] && bd.size() == 1 && bd[0] == 2 * xd[3] &&
         sd.size() == 2 && sd[0] == xd[0] && sd[1] == scols;
}

ffi::Error NormModFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gb,
                          ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                          float eps, float slope) {
  const auto xd = x.dimensions();
  if (!normmod_shapes(xd, gb.dimensions(), bias.dimensions(), mean->dimensions(),
                      xd.size() == 4 ? xd[3] : 0) ||
      !same_dims(xd, out->dimensions()) || !same_dims(mean->dimensions(), rstd->dimensions()))
    return ffi::Error::InvalidArgument(
        "norm_modulate: x, out must be (N, H, W, C), gb (N, H, W, 2C), bias (2C), mean and "
        "rstd (N, C)");
  const normmod::Shape s{xd[0], xd[1] * xd[2], xd[3]};
  if (s.n * s.m * s.c == 0) return ffi::Error::InvalidArgument("norm_modulate: empty map");
  const float *xp = x.typed_data(), *gp = gb.typed_data(), *bp = bias.typed_data();
  float *op = out->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  parallel_for<std::vector<float>>(pool, s.n, [=](int64_t img, std::vector<float>& part) {
    normmod::fwd_image(s, img, xp, gp, bp, eps, slope, op, mp, rp, part);
  });
  return ffi::Error::Success();
}

ffi::Error NormModBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> gb, ffi::Buffer<ffi::F32> bias,
                          ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> mean,
                          ffi::Buffer<ffi::F32> rstd, ffi::ResultBuffer<ffi::F32> dx,
                          ffi::ResultBuffer<ffi::F32> dgb, ffi::ResultBuffer<ffi::F32> dbias,
                          float slope) {
  const auto xd = x.dimensions();
  const int64_t c = xd.size() == 4 ? xd[3] : 0;
  if (!normmod_shapes(xd, gb.dimensions(), bias.dimensions(), mean.dimensions(), c) ||
      !normmod_shapes(xd, dgb->dimensions(), bias.dimensions(), dbias->dimensions(), 2 * c) ||
      !same_dims(xd, d.dimensions()) || !same_dims(xd, out.dimensions()) ||
      !same_dims(xd, dx->dimensions()) || !same_dims(mean.dimensions(), rstd.dimensions()))
    return ffi::Error::InvalidArgument(
        "norm_modulate_bwd: d, x, out, dx must be (N, H, W, C), gb, dgb (N, H, W, 2C), "
        "bias (2C), mean, rstd (N, C) and dbias (N, 2C)");
  const normmod::Shape s{xd[0], xd[1] * xd[2], xd[3]};
  if (s.n * s.m * s.c == 0) return ffi::Error::InvalidArgument("norm_modulate_bwd: empty map");
  const float *dp = d.typed_data(), *xp = x.typed_data(), *gp = gb.typed_data(),
              *bp = bias.typed_data(), *op = out.typed_data(), *mp = mean.typed_data(),
              *rp = rstd.typed_data();
  float *dxp = dx->typed_data(), *dgp = dgb->typed_data(), *dbp = dbias->typed_data();
  parallel_for<std::vector<float>>(pool, s.n, [=](int64_t img, std::vector<float>& part) {
    normmod::bwd_image(s, img, dp, xp, gp, bp, op, mp, rp, slope, dxp, dgp, dbp, part);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoOdeNormModFwd, NormModFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<float>("slope"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EchoOdeNormModBwd, NormModBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("slope"));
