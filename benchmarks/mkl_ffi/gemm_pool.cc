// Prototype (session 19, BENCHMARKS.md): MKL sequential sgemm, the output rows split over XLA's own intra-op thread
// pool (work claimed one chunk at a time by the calling thread and the pool's, so a busy pool never blocks it).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
extern "C" void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Job {
  const float *a, *b;
  float* c;
  int ta, tb, m, n, k, lda, ldb, chunks;
  std::atomic<int> next{0}, done{0};
  void Run() {
    for (int i; (i = next.fetch_add(1)) < chunks;) {
      int m0 = (int64_t)m * i / chunks, m1 = (int64_t)m * (i + 1) / chunks;
      const float* ai = ta ? a + m0 : a + (int64_t)m0 * lda;
      cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m1 - m0, n, k, 1.0f, ai, lda, b, ldb,
                  0.0f, c + (int64_t)m0 * n, n);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

static ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                           ffi::ResultBuffer<ffi::F32> c, int64_t ta, int64_t tb) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("mkl_gemm: 2-D operands only");
  auto job = std::make_shared<Job>();
  job->a = a.typed_data();
  job->b = b.typed_data();
  job->c = c->typed_data();
  job->ta = ta;
  job->tb = tb;
  job->m = ta ? ad[1] : ad[0];
  job->k = ta ? ad[0] : ad[1];
  job->n = tb ? bd[0] : bd[1];
  job->lda = ad[1];
  job->ldb = bd[1];
  int threads = std::max<int64_t>(1, pool.num_threads());
  job->chunks = std::min(threads, std::max(1, job->m / 16));
  for (int t = 1; t < job->chunks; ++t) pool.Schedule([job] { job->Run(); });  // the job outlives a late helper
  job->Run();
  while (job->done.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MklGemmPool, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));
