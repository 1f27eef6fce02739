"""Prototype (session 18, BENCHMARKS.md): x @ w through MKL via an XLA FFI custom call (gemm_ffi.cc, built by
build.sh), its VJP two more MKL GEMMs. Not part of the product: benchmarks only.

MKL_FFI=omp (default): gemm_ffi.cc, MKL's own OpenMP threads (run with MKL_THREADING_LAYER=GNU).
MKL_FFI=pool (session 19): gemm_pool.cc, MKL sequential, the GEMM's rows split over XLA's own intra-op thread pool
(run with MKL_THREADING_LAYER=SEQUENTIAL).

    python benchmarks/mkl_ffi/mklmm.py           # values and gradients against XLA's matmul
    python benchmarks/mkl_ffi/mklmm.py --bench   # GFLOP/s of XLA's and this matmul, d384's forward GEMM shapes
"""
import ctypes
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANT = os.environ.get("MKL_FFI", "omp")
_so, _handler = {"omp": ("libgemm_ffi.so", "MklGemm"), "pool": ("libgemm_pool.so", "MklGemmPool")}[VARIANT]
_lib = ctypes.cdll.LoadLibrary(os.path.join(os.path.dirname(os.path.abspath(__file__)), _so))
jax.ffi.register_ffi_target("mkl_gemm", jax.ffi.pycapsule(getattr(_lib, _handler)), platform="cpu")


def _gemm(a, b, ta, tb):
    m = a.shape[1] if ta else a.shape[0]
    n = b.shape[0] if tb else b.shape[1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call("mkl_gemm", out)(a, b, ta=np.int64(ta), tb=np.int64(tb))


@jax.custom_vjp
def matmul(x_NxD, w_DxF):
    return _gemm(x_NxD, w_DxF, 0, 0)


def _fwd(x, w):
    return _gemm(x, w, 0, 0), (x, w)


def _bwd(res, g_NxF):
    x, w = res
    return _gemm(g_NxF, w, 0, 1), _gemm(x, g_NxF, 1, 0)


matmul.defvjp(_fwd, _bwd)


def bench() -> None:
    """Median of 5 timings of 20 calls per shape, as GFLOP/s; XLA's matmul first, then this one, in this process."""
    for M, K, N in [(4096, 384, 1152), (4096, 384, 1536), (4096, 1536, 384)]:
        a = jax.random.normal(jax.random.key(0), (M, K))
        b = jax.random.normal(jax.random.key(1), (K, N))
        for name, f in [("xla", jax.jit(jnp.matmul)), (VARIANT, jax.jit(matmul))]:
            for _ in range(3):
                f(a, b).block_until_ready()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    c = f(a, b)
                c.block_until_ready()
                times.append(time.perf_counter() - t0)
            print(f"{name:5s} [{M}, {K}] x [{K}, {N}]: {20 * 2 * M * K * N / sorted(times)[2] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__" and "--bench" in sys.argv:
    bench()
elif __name__ == "__main__":
    x = jax.random.normal(jax.random.key(0), (64, 48))
    w = jax.random.normal(jax.random.key(1), (48, 80))
    np.testing.assert_allclose(jax.jit(matmul)(x, w), x @ w, rtol=1e-4, atol=1e-4)

    def loss(mm, x, w):
        return (jnp.sin(mm(x, w)) ** 2).sum()

    ours = jax.jit(jax.grad(lambda x, w: loss(matmul, x, w), (0, 1)))(x, w)
    xlas = jax.grad(lambda x, w: loss(jnp.matmul, x, w), (0, 1))(x, w)
    for a, b in zip(ours, xlas):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    print("ok")
