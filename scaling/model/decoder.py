"""The GPT decoder (Radford et al. 2019) in Flax linen.

Why linen rather than NNX: a linen model is a pure function `apply(params, tokens)` over a plain pytree of arrays, which
is exactly what `jax.jit`, `jax.vmap` over K models, `jax.sharding` and orbax checkpoints want, with no module state to
split and merge. nanodo makes the same choice.

Shape legend (nanodo style):
  B batch, L sequence length (queries), S key length (= L, or the KV-cache length when decoding),
  D d_model, H heads, K head dim (D / H), F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from scaling.model import mup
from scaling.model.attention import blocked_causal_attention
from scaling.model.head_loss import head_cross_entropy

POS_ENCODINGS = ("learned", "sinusoidal", "rotary", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots_saveable")
# "auto": blocked on CPU (training), jax.nn.dot_product_attention's default elsewhere; "blocked": scaling.model.attention's
# causal query blocks (CPU-fast, training only: decoding uses the "xla" path); "einsum": the reference path.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum", "blocked")
# "auto": "chunked" for float32 on CPU, else "reference"; "chunked": scaling.model.head_loss (the head's matmul and the
# cross-entropy as one op over token chunks); "reference": the logits, then `cross_entropy`.
HEAD_LOSS_IMPLS = ("auto", "chunked", "reference")


# unsafe_hash: hashable (a static jit argument) yet not frozen, which OmegaConf would make read-only.
@dataclass(unsafe_hash=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: Optional[int] = None  # None -> 4 * d_model (Radford et al. 2018)
    vocab_size: int = 4096
    seq_len: int = 256
    pos_encoding: str = "learned"
    tie_embeddings: bool = True
    use_bias: bool = True  # biases of every Dense and LayerNorm, as in GPT-2
    dropout: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False  # nn.scan over one stacked block: compile time independent of depth
    attention: str = "auto"  # see ATTENTION_IMPLS
    attention_block: int = 64  # query block length of the "blocked" attention (scaling/model/attention.py)
    head_loss: str = "auto"  # see HEAD_LOSS_IMPLS (the training loss only: the model's logits are the same)
    rope_base: float = 10000.0
    parametrization: str = "sp"  # "sp" (GPT-2's) | "mup" (scaling/model/mup.py)
    mup_base_d_model: Optional[int] = None  # µP's base width: where µP equals SP (bar attention); ignored under sp

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "attention_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r} is invalid: it must be a positive integer.")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff <= 0):
            raise ValueError(f"model.d_ff={self.d_ff!r} is invalid: give a positive integer, or null for 4*d_model.")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                f"pick n_heads among the divisors of d_model (e.g. {_nearest_divisor(self.d_model, self.n_heads)})."
            )
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"model.pos_encoding={self.pos_encoding!r} is unknown: use one of {POS_ENCODINGS}.")
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise ValueError(
                f"model.pos_encoding=rotary needs an even head dim, but d_model/n_heads = {self.head_dim}: "
                "change d_model or n_heads so that d_model/n_heads is even."
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is unknown: use one of {tuple(DTYPES)}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is unknown: use one of {REMAT_POLICIES}.")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is unknown: use one of {ATTENTION_IMPLS}.")
        if self.head_loss not in HEAD_LOSS_IMPLS:
            raise ValueError(f"model.head_loss={self.head_loss!r} is unknown: use one of {HEAD_LOSS_IMPLS}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout!r} is invalid: it must be in [0, 1).")
        if self.parametrization not in mup.PARAMETRIZATIONS:
            raise ValueError(
                f"model.parametrization={self.parametrization!r} is unknown: use one of {mup.PARAMETRIZATIONS}."
            )
        base = self.mup_base_d_model
        if base is not None and (not isinstance(base, int) or isinstance(base, bool) or base <= 0):
            raise ValueError(
                f"model.mup_base_d_model={base!r} is invalid: give a positive integer, the d_model of the base model "
                "the hyperparameters were tuned on (e.g. 64), or null under model.parametrization=sp."
            )
        if self.parametrization == "mup" and base is None:
            raise ValueError(
                "model.mup_base_d_model=None with model.parametrization=mup: set it to the d_model of the base model "
                f"the hyperparameters were tuned on, e.g. model.mup_base_d_model={self.d_model} (µP equals SP there)."
            )
        if self.parametrization == "mup" and base > self.d_model:
            raise ValueError(
                f"model.mup_base_d_model={base} exceeds model.d_model={self.d_model}: the base is the narrow model the "
                "hyperparameters were tuned on; use a base width <= d_model "
                f"(e.g. model.mup_base_d_model={self.d_model})."
            )
        if self.parametrization == "mup" and self.tie_embeddings:
            raise ValueError(
                "model.parametrization=mup with model.tie_embeddings=true: µP needs an untied head here. Tied, the best "
                "lr moved 8x between widths 32 and 128; untied, it did not move (experiments/mup/README.md). Set "
                "model.tie_embeddings=false."
            )

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def build(self) -> "Transformer":
        return Transformer(self)


def _nearest_divisor(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - target))


# GPT-2 initialisation: N(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2 n_layers) so the
# residual stream's variance does not grow with depth (Radford et al. 2019, Section 2.3).
_INIT_STD = 0.02


def sinusoidal_table(seq_len: int, d_model: int) -> jnp.ndarray:
    """PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(p / 10000^(2i/D)) (Vaswani et al. 2017, Section 3.5)."""
    pos_Lx1 = jnp.arange(seq_len, dtype=jnp.float32)[:, None]
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)
    angle_LxD2 = pos_Lx1 / jnp.power(10000.0, two_i / d_model)
    pe_LxD = jnp.zeros((seq_len, d_model), jnp.float32)
    pe_LxD = pe_LxD.at[:, 0::2].set(jnp.sin(angle_LxD2))
    return pe_LxD.at[:, 1::2].set(jnp.cos(angle_LxD2[:, : d_model // 2]))


def apply_rotary(x_BxLxHxK: jnp.ndarray, positions_L: jnp.ndarray, base: float) -> jnp.ndarray:
    """Rotary position embedding (Su et al. 2021, RoFormer, Eq. 34), rotate-half layout as in GPT-NeoX.

    Pairs (x_j, x_{j+K/2}) are rotated by angle p * base^(-2j/K), so q.k depends on positions only through their
    difference.
    """
    K = x_BxLxHxK.shape[-1]
    inv_freq_K2 = 1.0 / (base ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
    angle_LxK2 = positions_L.astype(jnp.float32)[:, None] * inv_freq_K2[None, :]
    cos_1xLx1xK2 = jnp.cos(angle_LxK2)[None, :, None, :]
    sin_1xLx1xK2 = jnp.sin(angle_LxK2)[None, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    out = jnp.concatenate([x1 * cos_1xLx1xK2 - x2 * sin_1xLx1xK2, x2 * cos_1xLx1xK2 + x1 * sin_1xLx1xK2], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def einsum_attention(
    q_BxLxHxK: jnp.ndarray,
    k_BxSxHxK: jnp.ndarray,
    v_BxSxHxK: jnp.ndarray,
    mask_LxS: jnp.ndarray,
    scale: Optional[float] = None,
) -> jnp.ndarray:
    """Scaled dot-product attention (Vaswani et al. 2017, Eq. 1), softmax in float32: the reference path.
    `scale` None is 1/sqrt(K); µP passes 1/K (scaling/model/mup.py)."""
    scale = 1.0 / math.sqrt(q_BxLxHxK.shape[-1]) if scale is None else scale
    att_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32) * scale
    att_BxHxLxS = jnp.where(mask_LxS[None, None], att_BxHxLxS, jnp.finfo(jnp.float32).min)
    att_BxHxLxS = jax.nn.softmax(att_BxHxLxS, axis=-1).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhls,bshk->blhk", att_BxHxLxS, v_BxSxHxK)


def resolve_attention(attention: str, decode: bool = False) -> str:
    """The implementation that `attention` runs: "auto" is "blocked" for CPU training (XLA:CPU has no fused
    attention, see scaling/model/attention.py) and jax.nn.dot_product_attention's own choice (cuDNN / XLA) on GPU and TPU."""
    if attention == "blocked" or (attention == "auto" and jax.default_backend() == "cpu"):
        return "auto" if decode else "blocked"  # against a KV cache the keys are not causal blocks of the queries
    return attention


class CausalSelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray, positions_L: jnp.ndarray, decode: bool) -> jnp.ndarray:
        cfg = self.cfg
        B, L, D = x_BxLxD.shape
        H, K = cfg.n_heads, cfg.head_dim
        dense = _dense_factory(cfg)
        qkv_BxLx3D = dense(3 * D, name="qkv")(x_BxLxD)
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (t.reshape(B, L, H, K) for t in jnp.split(qkv_BxLx3D, 3, axis=-1))
        if cfg.pos_encoding == "rotary":
            q_BxLxHxK = apply_rotary(q_BxLxHxK, positions_L, cfg.rope_base)
            k_BxLxHxK = apply_rotary(k_BxLxHxK, positions_L, cfg.rope_base)

        if decode:
            k_BxSxHxK, v_BxSxHxK = self._update_cache(k_BxLxHxK, v_BxLxHxK)
            # Key j is visible to the query at absolute position p iff j <= p; empty cache slots lie beyond p.
            mask_LxS = jnp.arange(k_BxSxHxK.shape[1])[None, :] <= positions_L[:, None]
        else:
            k_BxSxHxK, v_BxSxHxK = k_BxLxHxK, v_BxLxHxK
            mask_LxS = jnp.tril(jnp.ones((L, L), bool))

        impl = resolve_attention(cfg.attention, decode)
        scale = mup.attention_scale(cfg)  # None: every implementation's own 1/sqrt(K)
        if impl == "einsum":
            y_BxLxHxK = einsum_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_LxS, scale)
        elif impl == "blocked":
            y_BxLxHxK = blocked_causal_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, cfg.attention_block, scale)
        else:
            # is_causal lets cuDNN use its causal kernel; the explicit mask is only needed against a KV cache.
            y_BxLxHxK = jax.nn.dot_product_attention(
                q_BxLxHxK,
                k_BxSxHxK,
                v_BxSxHxK,
                mask=mask_LxS[None, None] if decode else None,
                is_causal=not decode,
                scale=scale,
                implementation=impl if impl in ("xla", "cudnn") else None,
            )
        y_BxLxD = y_BxLxHxK.reshape(B, L, D)
        return dense(D, name="proj", residual=True)(y_BxLxD)

    def _update_cache(self, k_BxLxHxK, v_BxLxHxK):
        """Writes this call's keys/values at cache_index (prefill writes L at once, decoding writes 1)."""
        initialized = self.has_variable("cache", "k")
        k_cache = self.variable("cache", "k", jnp.zeros, k_BxLxHxK.shape, k_BxLxHxK.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, v_BxLxHxK.shape, v_BxLxHxK.dtype)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if not initialized:  # model.init(decode=True) only allocates: the cache length is the init input's length
            return k_BxLxHxK, v_BxLxHxK
        start = (0, index.value, 0, 0)
        k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BxLxHxK, start)
        v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BxLxHxK, start)
        index.value = index.value + k_BxLxHxK.shape[1]
        return k_cache.value, v_cache.value


def tokens_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's matmul of a [..., D] input as one [tokens, D] x [D, F] GEMM (a reshape: the math is the same).

    Why: the weight gradient of a [B, L, D] x [D, F] dot_general contracts two dimensions (B and L), which XLA:CPU
    canonicalizes by physically transposing both activations and runs as a slow non-library dot; over flattened tokens
    it contracts one and stays a plain GEMM. The MLP's forward + backward at d384, 16 x 256 tokens: 261 -> 148 ms on
    2 cores (BENCHMARKS.md, session 14). On GPU/TPU the reshape is a bitcast.
    """
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    if lhs.ndim <= 2 or tuple(lhs_contract) != (lhs.ndim - 1,) or any(batch_dims):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    y_NxF = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), tuple(rhs_contract)), ((), ())),
                                precision, preferred_element_type)
    return y_NxF.reshape(*lhs.shape[:-1], *y_NxF.shape[1:])


def _dense_factory(cfg: ModelConfig):
    def make(features: int, name: str, residual: bool = False) -> nn.Dense:
        std = _INIT_STD / math.sqrt(2 * cfg.n_layers) if residual else _INIT_STD
        std = std * mup.hidden_init_multiplier(cfg)  # every Dense made here is a hidden layer; x 1.0 under SP
        return nn.Dense(
            features,
            use_bias=cfg.use_bias,
            dtype=DTYPES[cfg.compute_dtype],
            param_dtype=DTYPES[cfg.param_dtype],
            kernel_init=nn.initializers.normal(std),
            dot_general=tokens_dot_general,
            name=name,
        )

    return make


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in float32 even for bf16 inputs.
    return nn.LayerNorm(
        epsilon=1e-5,
        use_bias=cfg.use_bias,
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        name=name,
    )


def _embed(cfg: ModelConfig, num: int, name: str) -> nn.Embed:
    return nn.Embed(
        num,
        cfg.d_model,
        embedding_init=nn.initializers.normal(_INIT_STD),
        dtype=DTYPES[cfg.compute_dtype],
        param_dtype=DTYPES[cfg.param_dtype],
        name=name,
    )


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        dense = _dense_factory(self.cfg)
        h_BxLxF = nn.gelu(dense(self.cfg.ff_dim, name="fc")(x_BxLxD), approximate=True)  # GPT-2's tanh GELU
        return dense(self.cfg.d_model, name="proj", residual=True)(h_BxLxF)


class Block(nn.Module):
    """Pre-LayerNorm residual block (Radford et al. 2019, Section 2.3): x + attn(ln(x)), then x + mlp(ln(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_L, decode: bool, deterministic: bool):
        drop = nn.Dropout(self.cfg.dropout)
        y = CausalSelfAttention(self.cfg, name="attn")(_layer_norm(self.cfg, "ln_1")(x_BxLxD), positions_L, decode)
        x_BxLxD = x_BxLxD + drop(y, deterministic=deterministic)
        y = MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x_BxLxD))
        return x_BxLxD + drop(y, deterministic=deterministic)


_REMAT_POLICY = {
    "full": None,  # save nothing, recompute the block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScanBlock(nn.Module):
    """Block in nn.scan's (carry, x) -> (carry, y) form; the flags are attributes so remat needs no static args."""

    cfg: ModelConfig
    decode: bool
    deterministic: bool

    @nn.compact
    def __call__(self, x_BxLxD, positions_L):
        return Block(self.cfg, name="block")(x_BxLxD, positions_L, self.decode, self.deterministic), None


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL: jnp.ndarray,
        positions_L: Optional[jnp.ndarray] = None,
        *,
        decode: bool = False,
        deterministic: bool = True,
        head: bool = True,
    ) -> jnp.ndarray:
        """Returns logits_BxLxV in float32, or with head=False the head's input x_BxLxD (the final LayerNorm's output,
        times µP's output multiplier), which the chunked head + loss of `loss_fn` consumes. `positions_L` (absolute
        positions) is only needed when decoding."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        if positions_L is None:
            positions_L = jnp.arange(L)
        wte = _embed(cfg, cfg.vocab_size, "wte")
        x_BxLxD = wte(tokens_BxL)
        if cfg.pos_encoding == "learned":
            x_BxLxD = x_BxLxD + _embed(cfg, cfg.seq_len, "wpe")(positions_L)[None]
        elif cfg.pos_encoding == "sinusoidal":
            pe_LxD = jnp.take(sinusoidal_table(cfg.seq_len, cfg.d_model), positions_L, axis=0)
            x_BxLxD = x_BxLxD + pe_LxD.astype(x_BxLxD.dtype)[None]
        x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)

        if cfg.scan_layers:
            # One block traced once, its params stacked on a leading n_layers axis (params["blocks"]["block"]).
            scanned = _ScanBlock
            if cfg.remat != "none":
                scanned = nn.remat(_ScanBlock, policy=_REMAT_POLICY[cfg.remat])
            stack = nn.scan(
                scanned,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=cfg.n_layers,
            )
            x_BxLxD, _ = stack(cfg, decode, deterministic, name="blocks")(x_BxLxD, positions_L)
        else:
            block = Block
            if cfg.remat != "none":
                block = nn.remat(Block, policy=_REMAT_POLICY[cfg.remat], static_argnums=(3, 4))
            if not self.is_initializing() and not decode and (deterministic or cfg.dropout == 0):
                # Each block a nested jit of one function: JAX traces, differentiates and lowers it once for all
                # n_layers (the others hit its trace cache) and XLA inlines the calls, so the compiled step is the
                # same (bit-identical losses); d384's tracing + lowering 0.84 -> 0.46 s, its cold compile ~3.3 ->
                # ~2.8 s (BENCHMARKS.md, session 22). Not at init or with dropout (nn.jit draws random bits
                # differently), nor when decoding (the KV cache is a mutable collection).
                block = nn.jit(block, static_argnums=(3, 4))
            for i in range(cfg.n_layers):
                x_BxLxD = block(cfg, name=f"block_{i}")(x_BxLxD, positions_L, decode, deterministic)
        x_BxLxD = _layer_norm(cfg, "ln_f")(x_BxLxD)
        out_mult = mup.output_multiplier(cfg)
        if out_mult is not None:
            # µP's output multiplier b/d_model on the head's input, as mup's MuReadout does (Yang et al. 2022,
            # Table 8): here, before the head, it holds for the logits, the chunked head loss and decoding alike.
            x_BxLxD = x_BxLxD * out_mult
        if not head:
            return x_BxLxD

        if cfg.tie_embeddings:
            # Over flattened tokens, as every Dense (tokens_dot_general): the embedding's gradient is then one GEMM.
            logits_BxLxV = wte.attend(x_BxLxD.reshape(-1, cfg.d_model)).reshape(*x_BxLxD.shape[:-1], -1)
        else:
            logits_BxLxV = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=DTYPES[cfg.compute_dtype],
                param_dtype=DTYPES[cfg.param_dtype],
                kernel_init=nn.initializers.normal(_INIT_STD),
                dot_general=tokens_dot_general,
                name="head",
            )(x_BxLxD)
        return logits_BxLxV.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    # Jitted so a run's init is one program whether called here or inside the trainer's jitted init: run op by op,
    # XLA fuses the normal sampler differently (kernels 1 ulp off what the run started from) and compiles each of
    # the forward's ops on its own (2.5-3.3 s for a tiny model against 1.1 s as one program).
    tokens_1xL = jnp.zeros((1, cfg.seq_len), jnp.int32)
    return cfg.build().init(rng, tokens_1xL)["params"]


def cross_entropy(
    logits_BxLxV: jnp.ndarray, targets_BxL: jnp.ndarray, mask_BxL: Optional[jnp.ndarray] = None
) -> jnp.ndarray:
    """Mean next-token cross-entropy in nats per (unmasked) token, always in float32."""
    nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32), targets_BxL)
    if mask_BxL is None:
        return jnp.mean(nll_BxL)
    mask_BxL = mask_BxL.astype(jnp.float32)
    return jnp.sum(nll_BxL * mask_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def loss_fn(
    params: dict,
    cfg: ModelConfig,
    batch_BxLp1: jnp.ndarray,
    dropout_rng: Optional[jax.Array] = None,
) -> jnp.ndarray:
    """Loss of a [B, L+1] token batch: inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    inputs_BxL, targets_BxL = batch_BxLp1[:, :-1], batch_BxLp1[:, 1:]
    deterministic = dropout_rng is None or cfg.dropout == 0.0
    rngs = None if deterministic else {"dropout": dropout_rng}
    if resolve_head_loss(cfg) == "chunked":
        x_BxLxD = cfg.build().apply({"params": params}, inputs_BxL, deterministic=deterministic, rngs=rngs, head=False)
        w_VxD = params["wte"]["embedding"] if cfg.tie_embeddings else params["head"]["kernel"].T
        B, L, D = x_BxLxD.shape
        return head_cross_entropy(x_BxLxD.reshape(B * L, D), w_VxD, targets_BxL.reshape(B * L))
    logits_BxLxV = cfg.build().apply({"params": params}, inputs_BxL, deterministic=deterministic, rngs=rngs)
    return cross_entropy(logits_BxLxV, targets_BxL)


def resolve_head_loss(cfg: ModelConfig) -> str:
    """"auto" is "chunked" for float32 on CPU (scaling/model/head_loss.py); GPU/TPU and bfloat16 logits keep the reference
    path and its kernels."""
    if cfg.head_loss == "auto":
        f32 = cfg.compute_dtype == "float32" and cfg.param_dtype == "float32"
        return "chunked" if f32 and jax.default_backend() == "cpu" else "reference"
    return cfg.head_loss
