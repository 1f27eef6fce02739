"""Prototype (session 18, BENCHMARKS.md): x @ w through MKL via an XLA FFI custom call (gemm_ffi.cc, built by
build.sh), its VJP two more MKL GEMMs. Not part of the product: benchmarks only."""
import ctypes
import os

import jax
import jax.numpy as jnp
import numpy as np

_lib = ctypes.cdll.LoadLibrary(os.path.join(os.path.dirname(__file__), "libgemm_ffi.so"))
jax.ffi.register_ffi_target("mkl_gemm", jax.ffi.pycapsule(_lib.MklGemm), platform="cpu")


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

if __name__ == "__main__":
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
