// Fused softmax attention for XLA:CPU, forward and backward, as XLA FFI handlers (tpp_jax/models/cpu_attention.py
// builds this file for the host with -march=native and registers the two handlers).
//
// q, k, v, out, dq, dk, dv: float32 (..., T, H, D), row-major, the layout of the ViT's projections (no transposes);
// lse: float32 (..., T, H), the log-sum-exp of each query's scaled logits, saved by the forward for the backward.
// One task per (batch, head): the T x T logits stay in cache, the products run on a 6 x 16 AVX2 / FMA register-
// blocked micro-kernel over packed copies of the operands, and the tasks are spread over XLA's intra-op thread pool.
//
//   forward   S = (Q K^T) / sqrt(D),  P = softmax(S),  O = P V,  lse = max(S) + log(sum(exp(S - max(S))))
//   backward  P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) / sqrt(D),
//             dQ = dS K,  dK = dS^T Q
#if !defined(__AVX2__) || !defined(__FMA__)
#error "tpp_jax's CPU attention kernel needs AVX2 and FMA (x86-64); XLA's attention runs instead"
#endif

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMr = 6;   // micro-kernel rows
constexpr int kVec = 8;  // floats per AVX register

int RoundUp(int x, int m) { return (x + m - 1) / m * m; }

// C[kMr x 8*NV] = A[kMr x K] (row stride lda) . B[K x 8*NV] (row stride ldb); C row stride ldc.
template <int NV, bool kTransA>
__attribute__((always_inline)) inline void MicroKernel(const float* __restrict a, int lda, const float* __restrict b,
                                                       int ldb, float* __restrict c, int ldc, int k_size) {
  __m256 acc[kMr][NV];
#pragma GCC unroll 8
  for (int i = 0; i < kMr; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int k = 0; k < k_size; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + static_cast<size_t>(k) * ldb + kVec * v);
#pragma GCC unroll 8
    for (int i = 0; i < kMr; ++i) {
      const __m256 av = _mm256_broadcast_ss(kTransA ? a + static_cast<size_t>(k) * lda + i
                                                    : a + static_cast<size_t>(i) * lda + k);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMr; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + static_cast<size_t>(i) * ldc + kVec * v, acc[i][v]);
}

// C[m_pad x n_pad] = A[m_pad x k] . B[k x n_pad]; m_pad % kMr == 0, n_pad % kVec == 0; strides lda, ldb, ldc.
// kTransA: A is given as its transpose, a [k x m_pad] array of row stride lda.
template <bool kTransA = false>
void Gemm(const float* a, int lda, const float* b, int ldb, float* c, int ldc, int m_pad, int k, int n_pad) {
  for (int i = 0; i < m_pad; i += kMr) {
    const float* a_rows = kTransA ? a + i : a + static_cast<size_t>(i) * lda;
    int j = 0;
    for (; j + 2 * kVec <= n_pad; j += 2 * kVec)
      MicroKernel<2, kTransA>(a_rows, lda, b + j, ldb, c + static_cast<size_t>(i) * ldc + j, ldc, k);
    if (j < n_pad) MicroKernel<1, kTransA>(a_rows, lda, b + j, ldb, c + static_cast<size_t>(i) * ldc + j, ldc, k);
  }
}

// exp of 8 floats (Cephes' polynomial, ~1 ulp; below -88.38 it returns 0, as expf underflows there; NaN stays NaN:
// min / max return their second operand when one is NaN).
inline __m256 Exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

float HorizontalMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The shapes of one call: `batch` leading elements (all dims before T, H, D), T tokens, H heads, D per head.
struct Shape {
  int64_t batch;
  int t, h, d;
  int t_rows, t_cols, d_cols;  // T padded to kMr rows / kVec columns, D padded to kVec columns
  float scale;
};

Shape ShapeOf(ffi::Span<const int64_t> dims) {
  Shape s;
  const size_t r = dims.size();
  s.batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) s.batch *= dims[i];
  s.t = static_cast<int>(dims[r - 3]);
  s.h = static_cast<int>(dims[r - 2]);
  s.d = static_cast<int>(dims[r - 1]);
  s.t_rows = RoundUp(s.t, kMr);
  s.t_cols = RoundUp(s.t, kVec);
  s.d_cols = RoundUp(s.d, kVec);
  s.scale = 1.0f / std::sqrt(static_cast<float>(s.d));
  return s;
}

// Row t of head h of batch element b in a (..., T, H, D) array / its (..., T, H) log-sum-exp.
inline size_t RowOffset(const Shape& s, int64_t b, int t, int h) {
  return ((static_cast<size_t>(b) * s.t + t) * s.h + h) * s.d;
}
inline size_t LseOffset(const Shape& s, int64_t b, int t, int h) {
  return (static_cast<size_t>(b) * s.t + t) * s.h + h;
}

// dst[T rows x ld] <- the (T x D) head (b, h) of x, rows in place (an A operand with K = D, or B with K = T).
void PackRows(const Shape& s, const float* x, int64_t b, int h, float* dst, int ld) {
  for (int t = 0; t < s.t; ++t) std::memcpy(dst + static_cast<size_t>(t) * ld, x + RowOffset(s, b, t, h), s.d * 4);
}

// dst[D rows x ld] <- the transpose of the (T x D) head (b, h) of x (a B operand with K = D).
void PackTransposed(const Shape& s, const float* x, int64_t b, int h, float* dst, int ld) {
  for (int t = 0; t < s.t; ++t) {
    const float* row = x + RowOffset(s, b, t, h);
    for (int j = 0; j < s.d; ++j) dst[static_cast<size_t>(j) * ld + t] = row[j];
  }
}

void UnpackRows(const Shape& s, const float* src, int ld, float* x, int64_t b, int h) {
  for (int t = 0; t < s.t; ++t) std::memcpy(x + RowOffset(s, b, t, h), src + static_cast<size_t>(t) * ld, s.d * 4);
}

// The columns >= T of each of the T rows of a logits buffer: -inf, so that exp gives 0 there.
void MaskPadColumns(const Shape& s, float* logits) {
  for (int t = 0; t < s.t; ++t)
    for (int j = s.t; j < s.t_cols; ++j) logits[static_cast<size_t>(t) * s.t_cols + j] = -INFINITY;
}

// Zero-initialised scratch: the pads of every operand stay 0 (finite) for the products that read them.
struct Scratch {
  explicit Scratch(size_t n) : data(n, 0.0f) {}
  std::vector<float> data;
  size_t used = 0;
  float* Take(size_t n) {
    float* p = data.data() + used;
    used += n;
    return p;
  }
};

// fn(begin, end) over [0, n), split into chunks run on XLA's intra-op pool and on the calling thread.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(n, threads == 1 ? 1 : 4 * threads);
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, chunks, &fn]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      fn(c * n / chunks, (c + 1) * n / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  // A task that starts after every chunk is taken returns at once without touching fn (which may be gone by then).
  for (int64_t i = 1; i < std::min<int64_t>(threads, chunks); ++i) pool.Schedule([state, n, chunks, work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// Logits of head (b, h): s_buf[T_rows x T_cols] = (Q K^T) * scale, pad columns -inf. q_a: [T_rows x D], kt: [D x T_cols].
void Logits(const Shape& s, const float* q, const float* k, int64_t b, int h, float* q_a, float* kt, float* s_buf) {
  PackRows(s, q, b, h, q_a, s.d);
  PackTransposed(s, k, b, h, kt, s.t_cols);
  Gemm(q_a, s.d, kt, s.t_cols, s_buf, s.t_cols, s.t_rows, s.d, s.t_cols);
  const __m256 scale = _mm256_set1_ps(s.scale);
  for (int t = 0; t < s.t; ++t) {
    float* row = s_buf + static_cast<size_t>(t) * s.t_cols;
    for (int j = 0; j < s.t_cols; j += kVec) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), scale));
  }
  MaskPadColumns(s, s_buf);
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("tpp attention: q must be (..., T, H, D)");
  const Shape s = ShapeOf(q.dimensions());
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, s.batch * s.h, [&](int64_t begin, int64_t end) {
    Scratch scratch(static_cast<size_t>(s.t_rows) * s.d + static_cast<size_t>(s.d) * s.t_cols +
                    static_cast<size_t>(s.t_rows) * s.t_cols + static_cast<size_t>(s.t_cols) * s.d_cols +
                    static_cast<size_t>(s.t_rows) * s.d_cols);
    float* q_a = scratch.Take(static_cast<size_t>(s.t_rows) * s.d);
    float* kt = scratch.Take(static_cast<size_t>(s.d) * s.t_cols);
    float* p = scratch.Take(static_cast<size_t>(s.t_rows) * s.t_cols);
    float* v_b = scratch.Take(static_cast<size_t>(s.t_cols) * s.d_cols);
    float* o = scratch.Take(static_cast<size_t>(s.t_rows) * s.d_cols);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.h;
      const int h = static_cast<int>(i % s.h);
      Logits(s, qp, kp, b, h, q_a, kt, p);
      for (int t = 0; t < s.t; ++t) {  // softmax of each row, in place
        float* row = p + static_cast<size_t>(t) * s.t_cols;
        __m256 m = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j < s.t_cols; j += kVec) m = _mm256_max_ps(m, _mm256_loadu_ps(row + j));
        const float row_max = HorizontalMax(m);
        const __m256 mv = _mm256_set1_ps(row_max);
        __m256 sum = _mm256_setzero_ps();
        for (int j = 0; j < s.t_cols; j += kVec) {
          const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
          _mm256_storeu_ps(row + j, e);
          sum = _mm256_add_ps(sum, e);
        }
        const float total = HorizontalSum(sum);
        const __m256 inv = _mm256_set1_ps(1.0f / total);
        for (int j = 0; j < s.t_cols; j += kVec) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inv));
        lp[LseOffset(s, b, t, h)] = row_max + std::log(total);
      }
      PackRows(s, vp, b, h, v_b, s.d_cols);
      Gemm(p, s.t_cols, v_b, s.d_cols, o, s.d_cols, s.t_rows, s.t, s.d_cols);
      UnpackRows(s, o, s.d_cols, op, b, h);
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Shape s = ShapeOf(q.dimensions());
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data();
  const float *lp = lse.typed_data(), *dop = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, s.batch * s.h, [&](int64_t begin, int64_t end) {
    const size_t td = static_cast<size_t>(s.t_rows) * s.d, dt = static_cast<size_t>(s.d) * s.t_cols;
    const size_t tt = static_cast<size_t>(s.t_rows) * s.t_cols, tdc = static_cast<size_t>(s.t_rows) * s.d_cols;
    Scratch scratch(2 * td + 2 * dt + 2 * tt + 5 * tdc);
    float* q_a = scratch.Take(td);    // Q rows (A of Q K^T)
    float* kt = scratch.Take(dt);     // K^T (B of Q K^T)
    float* p = scratch.Take(tt);      // logits, then P (also A^T of P^T dO)
    float* do_a = scratch.Take(td);   // dO rows (A of dO V^T)
    float* vt = scratch.Take(dt);     // V^T (B of dO V^T)
    float* dp = scratch.Take(tt);     // dP, then dS (also A^T of dS^T Q)
    float* do_b = scratch.Take(tdc);  // dO rows (B of P^T dO)
    float* k_b = scratch.Take(tdc);   // K rows (B of dS K)
    float* q_b = scratch.Take(tdc);   // Q rows (B of dS^T Q)
    float* res = scratch.Take(tdc);   // one product's result
    float* delta = scratch.Take(tdc);  // rowsum(dO * O), first T entries
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.h;
      const int h = static_cast<int>(i % s.h);
      Logits(s, qp, kp, b, h, q_a, kt, p);
      for (int t = 0; t < s.t; ++t) {  // P = exp(S - lse)
        float* row = p + static_cast<size_t>(t) * s.t_cols;
        const __m256 l = _mm256_set1_ps(lp[LseOffset(s, b, t, h)]);
        for (int j = 0; j < s.t_cols; j += kVec) _mm256_storeu_ps(row + j, Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), l)));
        const float* o_row = op + RowOffset(s, b, t, h);
        const float* do_row = dop + RowOffset(s, b, t, h);
        float acc = 0.0f;
        for (int j = 0; j < s.d; ++j) acc += do_row[j] * o_row[j];
        delta[t] = acc;
      }
      // dV = P^T dO
      PackRows(s, dop, b, h, do_b, s.d_cols);
      Gemm<true>(p, s.t_cols, do_b, s.d_cols, res, s.d_cols, s.t_rows, s.t, s.d_cols);
      UnpackRows(s, res, s.d_cols, dvp, b, h);
      // dP = dO V^T; dS = P * (dP - delta) * scale
      PackRows(s, dop, b, h, do_a, s.d);
      PackTransposed(s, vp, b, h, vt, s.t_cols);
      Gemm(do_a, s.d, vt, s.t_cols, dp, s.t_cols, s.t_rows, s.d, s.t_cols);
      const __m256 scale = _mm256_set1_ps(s.scale);
      for (int t = 0; t < s.t; ++t) {
        float* dp_row = dp + static_cast<size_t>(t) * s.t_cols;
        const float* p_row = p + static_cast<size_t>(t) * s.t_cols;
        const __m256 dl = _mm256_set1_ps(delta[t]);
        for (int j = 0; j < s.t_cols; j += kVec) {
          const __m256 ds = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p_row + j),
                                                        _mm256_sub_ps(_mm256_loadu_ps(dp_row + j), dl)), scale);
          _mm256_storeu_ps(dp_row + j, ds);
        }
      }
      // dQ = dS K
      PackRows(s, kp, b, h, k_b, s.d_cols);
      Gemm(dp, s.t_cols, k_b, s.d_cols, res, s.d_cols, s.t_rows, s.t, s.d_cols);
      UnpackRows(s, res, s.d_cols, dqp, b, h);
      // dK = dS^T Q
      PackRows(s, qp, b, h, q_b, s.d_cols);
      Gemm<true>(dp, s.t_cols, q_b, s.d_cols, res, s.d_cols, s.t_rows, s.t, s.d_cols);
      UnpackRows(s, res, s.d_cols, dkp, b, h);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TppAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TppAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
