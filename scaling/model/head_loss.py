"""The output head and the mean cross-entropy as one op, chunked over tokens, for CPU training.

Why by hand: autodiff of `logits = x W^T; mean(logsumexp(logits) - logits[target])` writes the [N, V] float32
logits, reads them back for the log-softmax, writes their gradient and (XLA:CPU) a transposed copy of it for the
dW matmul: at d64 with V = 4096 those passes over 32 MB were the largest part of the step (BENCHMARKS.md). Here the
tokens go through in chunks of `chunk` rows (lax.scan): each chunk's logits, softmax and gradient
(softmax - onehot) stay in cache and are consumed at once by dx = dlogits W and dW += x^T dlogits. The loss is the last
op of the step, so the gradients are computed in the forward pass and the backward only scales them by the incoming
cotangent (the chunked-loss trick of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024).

Same math as `scaling.model.decoder.cross_entropy(x @ W^T, targets)` in float32 (tests/test_model.py: values and gradients).
Shapes: N tokens, C chunk, D d_model, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 256  # tokens per chunk: 256 x 4096 float32 logits = 4 MB (measured against 128 on 2 cores: equal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def head_cross_entropy(
    x_NxD: jnp.ndarray, w_VxD: jnp.ndarray, targets_N: jnp.ndarray, chunk: int = DEFAULT_CHUNK
) -> jnp.ndarray:
    """mean_n [logsumexp(x_n W^T) - x_n . W_{t_n}] in float32 (without gradients: the plain formula)."""
    logits_NxV = jnp.einsum("nd,vd->nv", x_NxD, w_VxD, preferred_element_type=jnp.float32)
    target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits_NxV, axis=-1) - target_logit_N)


def _loss_and_grads(x_NxD, w_VxD, targets_N, chunk):
    N, D = x_NxD.shape
    V = w_VxD.shape[0]
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N  # padded rows carry zero weight
    x_nxCxD = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(n_chunks, chunk, D)
    t_nxC = jnp.pad(targets_N, (0, pad)).reshape(n_chunks, chunk)
    valid_nxC = (jnp.arange(n_chunks * chunk) < N).reshape(n_chunks, chunk)

    def one_chunk(dw_DxV, inputs):
        x_CxD, t_C, valid_C = inputs
        logits_CxV = jnp.einsum("cd,vd->cv", x_CxD, w_VxD, preferred_element_type=jnp.float32)
        lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
        onehot_CxV = jnp.arange(V)[None, :] == t_C[:, None]
        nll = jnp.sum(jnp.where(valid_C, lse_C - jnp.sum(jnp.where(onehot_CxV, logits_CxV, 0.0), axis=-1), 0.0))
        dlogits_CxV = jnp.where(valid_C[:, None], jnp.exp(logits_CxV - lse_C[:, None]) - onehot_CxV, 0.0)
        dlogits_CxV = dlogits_CxV.astype(x_CxD.dtype)
        dx_CxD = jnp.einsum("cv,vd->cd", dlogits_CxV, w_VxD, preferred_element_type=jnp.float32)
        # dW^T = x^T dlogits: the transposes fall on the small [C, D] and [D, V] operands, not on [C, V].
        dw_DxV = dw_DxV + jnp.einsum("cd,cv->dv", x_CxD, dlogits_CxV, preferred_element_type=jnp.float32)
        return dw_DxV, (nll, dx_CxD)

    dw_DxV, (nll_n, dx_nxCxD) = jax.lax.scan(one_chunk, jnp.zeros((D, V), jnp.float32), (x_nxCxD, t_nxC, valid_nxC))
    dx_NxD = dx_nxCxD.reshape(n_chunks * chunk, D)[:N] / N
    return jnp.sum(nll_n) / N, (dx_NxD.astype(x_NxD.dtype), (dw_DxV.T / N).astype(w_VxD.dtype))


def _backward(chunk, residuals, g):
    dx_NxD, dw_VxD = residuals
    return g * dx_NxD, g * dw_VxD, None


head_cross_entropy.defvjp(_loss_and_grads, _backward)
