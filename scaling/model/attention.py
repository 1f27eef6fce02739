"""Causal self-attention for CPU training: query blocks that skip the fully masked key blocks.

Why by hand: XLA:CPU has no fused attention. `jax.nn.dot_product_attention` (implementation="xla") materialises the
full [B, H, L, L] scores, masks half of them, and its autodiff backward makes several more full-size passes; that was
~40% of a d384 step on 2 cores (BENCHMARKS.md). Here the queries are split into blocks of `block` rows and block i
attends only to keys [0, end_i), so the masked upper triangle of all but the diagonal blocks is never computed
((n+1)/2n of the work for n blocks), and the backward is written out (Dao et al. 2022, FlashAttention, Alg. 2, with
the probabilities saved instead of recomputed, which is cheaper on CPU at these lengths):

  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = dS K / sqrt(K),  dK = dS^T Q / sqrt(K)

(with µP's 1/K in place of 1/sqrt(K) when `scale` says so: scaling/model/mup.py).

The math is the reference attention's (float32 softmax of masked scores); tests/test_model.py checks values, gradients
and causality against `scaling.model.decoder.einsum_attention`. Used for training on CPU only; decoding against a KV cache,
GPUs and TPUs keep jax.nn.dot_product_attention (cuDNN / XLA).

Shapes as in scaling/model/decoder.py: B batch, L length, H heads, K head dim, S key length (end of a query block's keys).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 64  # = ModelConfig.attention_block; measured on 2 cores at T = 256: 32, 64 and 128 within noise


def query_blocks(L: int, block: int) -> list[tuple[int, int]]:
    """[start, end) of each query block; the last one is shorter when L is not a multiple of `block`."""
    return [(s, min(s + block, L)) for s in range(0, L, block)]


def _to_bhlk(x_BxLxHxK: jnp.ndarray) -> jnp.ndarray:
    return jnp.transpose(x_BxLxHxK, (0, 2, 1, 3))


def _scale(K: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(K) if scale is None else scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blocked_causal_attention(
    q_BxLxHxK: jnp.ndarray,
    k_BxLxHxK: jnp.ndarray,
    v_BxLxHxK: jnp.ndarray,
    block: int = DEFAULT_BLOCK,
    scale: float | None = None,
) -> jnp.ndarray:
    """softmax(scale Q K^T + causal mask) V over [B, L, H, K] inputs, returning [B, L, H, K]; scale None = 1/sqrt(K)."""
    return _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block, scale)[0]


def _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block, scale):
    B, L, H, K = q_BxLxHxK.shape
    # The scale folded into Q ([B, L, H, K]) rather than into the [B, H, L, S] scores.
    q_BxHxLxK = _to_bhlk(q_BxLxHxK * jnp.asarray(_scale(K, scale), q_BxLxHxK.dtype))
    k_BxHxLxK, v_BxHxLxK = _to_bhlk(k_BxLxHxK), _to_bhlk(v_BxLxHxK)
    outs, probs = [], []
    for s, e in query_blocks(L, block):
        att_BxHxCxS = jnp.einsum("bhqk,bhsk->bhqs", q_BxHxLxK[:, :, s:e], k_BxHxLxK[:, :, :e],
                                 preferred_element_type=jnp.float32)
        # Only the diagonal block holds masked entries: key j is visible to query i iff j <= i.
        visible_CxS = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]
        att_BxHxCxS = jnp.where(visible_CxS, att_BxHxCxS, jnp.finfo(jnp.float32).min)
        p_BxHxCxS = jax.nn.softmax(att_BxHxCxS, axis=-1)
        outs.append(jnp.einsum("bhqs,bhsk->bhqk", p_BxHxCxS.astype(v_BxHxLxK.dtype), v_BxHxLxK[:, :, :e]))
        probs.append(p_BxHxCxS)
    o_BxHxLxK = jnp.concatenate(outs, axis=2)
    return jnp.transpose(o_BxHxLxK, (0, 2, 1, 3)), (q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, o_BxHxLxK, probs)


def _backward(block, scale, residuals, do_BxLxHxK):
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, o_BxHxLxK, probs = residuals
    B, H, L, K = q_BxHxLxK.shape
    f32 = jnp.float32
    do_BxHxLxK = _to_bhlk(do_BxLxHxK)
    # rowsum(dP * P) = rowsum(dO * O): a [B, H, L] reduction over K instead of over the [.., C, S] scores.
    delta_BxHxL = jnp.sum(do_BxHxLxK.astype(f32) * o_BxHxLxK.astype(f32), axis=-1)
    dq_blocks = []
    dk_BxHxLxK = jnp.zeros((B, H, L, K), f32)
    dv_BxHxLxK = jnp.zeros((B, H, L, K), f32)
    for (s, e), p_BxHxCxS in zip(query_blocks(L, block), probs):
        do_BxHxCxK = do_BxHxLxK[:, :, s:e]
        pad = ((0, 0), (0, 0), (0, L - e), (0, 0))
        dv_BxHxLxK += jnp.pad(jnp.einsum("bhqs,bhqk->bhsk", p_BxHxCxS.astype(do_BxHxCxK.dtype), do_BxHxCxK,
                                         preferred_element_type=f32), pad)
        dp_BxHxCxS = jnp.einsum("bhqk,bhsk->bhqs", do_BxHxCxK, v_BxHxLxK[:, :, :e], preferred_element_type=f32)
        ds_BxHxCxS = p_BxHxCxS * (dp_BxHxCxS - delta_BxHxL[:, :, s:e, None])
        ds_BxHxCxS = ds_BxHxCxS.astype(q_BxHxLxK.dtype)
        dq_blocks.append(jnp.einsum("bhqs,bhsk->bhqk", ds_BxHxCxS, k_BxHxLxK[:, :, :e], preferred_element_type=f32))
        dk_BxHxLxK += jnp.pad(jnp.einsum("bhqs,bhqk->bhsk", ds_BxHxCxS, q_BxHxLxK[:, :, s:e],
                                         preferred_element_type=f32), pad)
    # Q was scaled before the scores, so dK already carries the scale; dQ takes it here.
    dq_BxHxLxK = jnp.concatenate(dq_blocks, axis=2) * _scale(K, scale)
    dtype = q_BxHxLxK.dtype
    return tuple(jnp.transpose(g, (0, 2, 1, 3)).astype(dtype) for g in (dq_BxHxLxK, dk_BxHxLxK, dv_BxHxLxK))


def _fwd_rule(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block, scale):
    return _forward(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block, scale)


blocked_causal_attention.defvjp(_fwd_rule, _backward)
