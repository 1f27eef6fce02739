// Prototype (session 19, BENCHMARKS.md): causal attention forward and backward as two XLA FFI custom calls whose
// work, one (batch, head) pair at a time, runs on XLA's own intra-op thread pool; each pair's GEMMs in MKL's
// sequential sgemm (built with -DATTN_MKL) or in small_gemm.h's loops. The math is scaling/model/attention.py's
// (FlashAttention's backward, Dao et al. 2022 Alg. 2, with P recomputed from the saved log-sum-exp): query blocks of
// kBlock rows see keys [0, end of block) only.
// Layout: q, k, v, o and their gradients [B, L, H, K] (the model's), lse [B, H, L].
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

constexpr int kBlock = 64;
#ifdef ATTN_MKL
extern "C" void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
extern "C" int MKL_Set_Threading_Layer(int layer);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // cblas.h
constexpr int kMklSequential = 1;                               // mkl_service.h: MKL_THREADING_SEQUENTIAL
static const int kLayerSet = MKL_Set_Threading_Layer(kMklSequential);  // before any MKL call: our threads are XLA's
// C = alpha A B + beta C and C = alpha A^T B + beta C, row-major with row strides
static void gemm_nn(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                    float* c, int ldc) {
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
static void gemm_tn(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                    float* c, int ldc) {
  cblas_sgemm(kRowMajor, kTrans, kNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#else
#include "small_gemm.h"
#endif

// xt[K, L] = one head's x[L, K] slice (row stride ld) transposed, so that Q K^T is a plain A B product
static void transpose(const float* x, int64_t L, int64_t K, int ld, float* xt) {
  for (int64_t t = 0; t < L; ++t)
    for (int64_t c = 0; c < K; ++c) xt[c * L + t] = x[t * ld + c];
}

// Runs fn(i) for i in [0, n) on the calling thread and XLA's pool; returns when all are done.
template <typename F>
static void ParallelFor(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, fn] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      fn(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));  // a copy: Schedule takes ownership
  work();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Dims {
  int64_t B, L, H, K;
  int ld() const { return int(H * K); }  // row stride of one head's [L, K] slice in [B, L, H, K]
  int64_t at(int64_t b, int64_t h) const { return b * L * H * K + h * K; }
};

static ffi::Error Fwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                      ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  auto d = q.dimensions();
  Dims s{d[0], d[1], d[2], d[3]};
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data();
  float *O = o->typed_data(), *LSE = lse->typed_data();
  ParallelFor(pool, s.B * s.H, [=](int64_t bh) {
    int64_t b = bh / s.H, h = bh % s.H, off = s.at(b, h);
    std::vector<float> p(kBlock * s.L), kt(s.K * s.L);
    transpose(Kp + off, s.L, s.K, s.ld(), kt.data());
    for (int64_t r0 = 0; r0 < s.L; r0 += kBlock) {
      int rows = int(std::min<int64_t>(kBlock, s.L - r0)), cols = int(r0 + rows);
      gemm_nn(rows, cols, int(s.K), scale, Q + off + r0 * s.ld(), s.ld(), kt.data(), int(s.L), 0.0f, p.data(), cols);
      for (int i = 0; i < rows; ++i) {
        float* row = p.data() + i * cols;
        int seen = int(r0) + i + 1;  // keys 0..r0+i
        float m = *std::max_element(row, row + seen), sum = 0.0f;
        for (int j = 0; j < seen; ++j) sum += (row[j] = std::exp(row[j] - m));
        float inv = 1.0f / sum;
        for (int j = 0; j < seen; ++j) row[j] *= inv;
        std::fill(row + seen, row + cols, 0.0f);
        LSE[bh * s.L + r0 + i] = m + std::log(sum);
      }
      gemm_nn(rows, int(s.K), cols, 1.0f, p.data(), cols, V + off, s.ld(), 0.0f, O + off + r0 * s.ld(), s.ld());
    }
  });
  return ffi::Error::Success();
}

static ffi::Error Bwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                      ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                      ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                      float scale) {
  auto d = q.dimensions();
  Dims s{d[0], d[1], d[2], d[3]};
  const float *Q = q.typed_data(), *Kp = k.typed_data(), *V = v.typed_data(), *O = o.typed_data();
  const float *LSE = lse.typed_data(), *dO = dout.typed_data();
  float *dQ = dq->typed_data(), *dK = dk->typed_data(), *dV = dv->typed_data();
  ParallelFor(pool, s.B * s.H, [=](int64_t bh) {
    int64_t b = bh / s.H, h = bh % s.H, off = s.at(b, h);
    std::vector<float> p(kBlock * s.L), dp(kBlock * s.L), delta(s.L), kt(s.K * s.L), vt(s.K * s.L);
    transpose(Kp + off, s.L, s.K, s.ld(), kt.data());
    transpose(V + off, s.L, s.K, s.ld(), vt.data());
    for (int64_t t = 0; t < s.L; ++t) {  // rowsum(dO * O)
      const float *x = dO + off + t * s.ld(), *y = O + off + t * s.ld();
      float acc = 0.0f;
      for (int64_t c = 0; c < s.K; ++c) acc += x[c] * y[c];
      delta[t] = acc;
      std::fill(dK + off + t * s.ld(), dK + off + t * s.ld() + s.K, 0.0f);
      std::fill(dV + off + t * s.ld(), dV + off + t * s.ld() + s.K, 0.0f);
    }
    for (int64_t r0 = 0; r0 < s.L; r0 += kBlock) {
      int rows = int(std::min<int64_t>(kBlock, s.L - r0)), cols = int(r0 + rows);
      // P from the saved log-sum-exp, dP = dO V^T
      gemm_nn(rows, cols, int(s.K), scale, Q + off + r0 * s.ld(), s.ld(), kt.data(), int(s.L), 0.0f, p.data(), cols);
      gemm_nn(rows, cols, int(s.K), 1.0f, dO + off + r0 * s.ld(), s.ld(), vt.data(), int(s.L), 0.0f, dp.data(), cols);
      for (int i = 0; i < rows; ++i) {
        float *prow = p.data() + i * cols, *dsrow = dp.data() + i * cols;
        int seen = int(r0) + i + 1;
        float l = LSE[bh * s.L + r0 + i], dl = delta[r0 + i];
        for (int j = 0; j < seen; ++j) {
          prow[j] = std::exp(prow[j] - l);
          dsrow[j] = prow[j] * (dsrow[j] - dl);  // dS
        }
        std::fill(prow + seen, prow + cols, 0.0f);
        std::fill(dsrow + seen, dsrow + cols, 0.0f);
      }
      // dV += P^T dO, dQ = scale dS K, dK += scale dS^T Q
      gemm_tn(cols, int(s.K), rows, 1.0f, p.data(), cols, dO + off + r0 * s.ld(), s.ld(), 1.0f, dV + off, s.ld());
      gemm_nn(rows, int(s.K), cols, scale, dp.data(), cols, Kp + off, s.ld(), 0.0f, dQ + off + r0 * s.ld(), s.ld());
      gemm_tn(cols, int(s.K), rows, scale, dp.data(), cols, Q + off + r0 * s.ld(), s.ld(), 1.0f, dK + off, s.ld());
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttnFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttnBwd, Bwd,
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
