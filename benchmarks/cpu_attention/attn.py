"""Prototype (session 19, BENCHMARKS.md): causal attention through the FFI custom calls of attn_ffi.cc (built by
build.sh; ATTN_KERNEL=native|mkl picks the build), a drop-in for scaling.model.attention.blocked_causal_attention
on CPU. Not part of the product.

    ATTN_KERNEL=native python benchmarks/cpu_attention/attn.py   # values, gradients, causality against the product's
"""
import ctypes
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

KERNEL = os.environ.get("ATTN_KERNEL", "native")  # native: small_gemm.h; mkl: MKL's sgemm (build.sh builds both)
_lib = ctypes.cdll.LoadLibrary(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"libattn_{KERNEL}.so"))
jax.ffi.register_ffi_target("causal_attn_fwd", jax.ffi.pycapsule(_lib.CausalAttnFwd), platform="cpu")
jax.ffi.register_ffi_target("causal_attn_bwd", jax.ffi.pycapsule(_lib.CausalAttnBwd), platform="cpu")


def _scale(K: int, scale: float | None) -> np.float32:
    return np.float32(1.0 / math.sqrt(K) if scale is None else scale)


def _fwd_call(q, k, v, scale):
    B, L, H, K = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, H, L), jnp.float32))
    return jax.ffi.ffi_call("causal_attn_fwd", out)(q, k, v, scale=_scale(K, scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def causal_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block: int = 64, scale: float | None = None):
    """softmax(scale Q K^T + causal mask) V over [B, L, H, K] float32 inputs; `block` is fixed at 64 in the kernel."""
    return _fwd_call(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale)[0]


def _fwd(q, k, v, block, scale):
    o, lse = _fwd_call(q, k, v, scale)
    return o, (q, k, v, o, lse)


def _bwd(block, scale, res, do):
    q, k, v, o, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(3))
    return jax.ffi.ffi_call("causal_attn_bwd", shapes)(q, k, v, o, lse, do, scale=_scale(q.shape[-1], scale))


causal_attention.defvjp(_fwd, _bwd)

if __name__ == "__main__":
    from scaling.model.attention import blocked_causal_attention

    for B, L, H, K, scale in [(2, 256, 3, 32, None), (3, 100, 2, 16, 1 / 16), (1, 64, 1, 8, None)]:
        q, k, v, w = (jax.random.normal(jax.random.key(i), (B, L, H, K)) for i in range(4))
        ours = jax.jit(causal_attention, static_argnums=(3, 4))(q, k, v, 64, scale)
        ref = blocked_causal_attention(q, k, v, 64, scale)
        np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)

        def loss(f, q, k, v):
            return (jnp.sin(f(q, k, v, 64, scale)) * w).sum()

        g_ours = jax.jit(jax.grad(functools.partial(loss, causal_attention), (0, 1, 2)))(q, k, v)
        g_ref = jax.grad(functools.partial(loss, blocked_causal_attention), (0, 1, 2))(q, k, v)
        for a, b in zip(g_ours, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        # causality: changing the last position's keys and values leaves every earlier output unchanged
        o2 = jax.jit(causal_attention, static_argnums=(3, 4))(q, k.at[:, -1].set(9.0), v.at[:, -1].set(9.0), 64, scale)
        np.testing.assert_array_equal(o2[:, :-1], ours[:, :-1])
        print(f"{KERNEL}: B{B} L{L} H{H} K{K}: values, gradients and causality agree")
