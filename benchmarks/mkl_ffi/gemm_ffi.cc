// Prototype (session 18): XLA FFI custom call running a float32 GEMM in MKL's cblas_sgemm.
#include <cstdint>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
extern "C" void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

// CBLAS's enum values (cblas.h): row-major layout, no transpose, transpose.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

static ffi::Error GemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                           int64_t ta, int64_t tb) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("mkl_gemm: 2-D operands only");
  int m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1];
  int n = tb ? bd[0] : bd[1];
  cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.0f, a.typed_data(), ad[1],
              b.typed_data(), bd[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MklGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("tb"));
