"""Parameter counts and FLOPs per token: the single home of these facts (trainer, planner, MFU and tests import them).

All counts are computed from the ModelConfig alone and must equal the initialised parameter tree exactly (tested).

Conventions for training FLOPs per token (`FLOP_CONVENTIONS`):
  "6N"         C = 6 N D with N the non-embedding parameters (Kaplan et al. 2020, Section 2.1, Eq. 2.1 approx.).
  "kaplan"     C_forward = 2N + 2 n_layer n_ctx d_attn per token, training = 3x forward (Kaplan et al. 2020, Table 1).
  "chinchilla" every matmul incl. embeddings and head, attention logits, softmax; backward = 2x forward
               (Hoffmann et al. 2022, Appendix F).
A run record carries C under each of them (C_6N, C_kaplan, C_chinchilla); analysis may also ask "6ND", 6 N D with the N
it chose (total or non-embedding). Conversions between conventions go through `C_under` and `convert_C` only.

JAX-free (the analysis package imports this module): ModelConfig is only a type here, jax is imported by the CPU probe.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:  # only read for its fields: importing scaling.model.decoder would load flax and jax
    from scaling.model.decoder import ModelConfig

FLOP_CONVENTIONS = ("6N", "kaplan", "chinchilla")
C_CONVENTIONS = ("6ND",) + FLOP_CONVENTIONS  # what analysis may ask for; "6ND" = 6 N D with the chosen N
# Training FLOPs per parameter per token: 2 forward + 4 backward multiply-adds (Kaplan et al. 2020 eq. 2.1, C ~ 6 N D).
FLOPS_PER_PARAM_TOKEN = 6.0


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # token embedding + learned positions
    head: int  # untied output projection (0 when tied)
    non_embedding: int  # Kaplan's N: excludes all vocabulary and positional embeddings (Kaplan et al. 2020, Sec. 2.1)
    tied: bool


def _dense(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def count_params(cfg: ModelConfig) -> ParamCounts:
    D, F, V = cfg.d_model, cfg.ff_dim, cfg.vocab_size
    layer_norm = D * (2 if cfg.use_bias else 1)
    block = (
        2 * layer_norm
        + _dense(D, 3 * D, cfg.use_bias)  # qkv
        + _dense(D, D, cfg.use_bias)  # attention output
        + _dense(D, F, cfg.use_bias)  # fc
        + _dense(F, D, cfg.use_bias)  # mlp output
    )
    non_embedding = cfg.n_layers * block + layer_norm  # + final LayerNorm
    embedding = V * D + (cfg.seq_len * D if cfg.pos_encoding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else D * V
    return ParamCounts(
        total=non_embedding + embedding + head,
        embedding=embedding,
        head=head,
        non_embedding=non_embedding,
        tied=cfg.tie_embeddings,
    )


def forward_matmul_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of the dense matmuls per token (2 per multiply-add), as XLA executes them.

    Weight matmuls (qkv, attention output, fc, mlp output, head) plus the two attention matmuls Q K^T and A V over the
    full L x L square: the dense kernel computes the masked half too, so no causal discount is taken here.
    """
    D, F, V, L = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.seq_len
    per_layer = 2 * (3 * D * D + D * D + 2 * D * F) + 2 * 2 * L * D
    return float(cfg.n_layers * per_layer + 2 * D * V)


def flops_per_token(cfg: ModelConfig, convention: str = "chinchilla") -> float:
    """Training FLOPs per token (forward + backward) under a named convention (module docstring)."""
    if convention == "6N":
        return FLOPS_PER_PARAM_TOKEN * count_params(cfg).non_embedding
    if convention == "kaplan":
        # Kaplan et al. 2020, Table 1: C_forward = 2N + 2 n_layer n_ctx d_attn, and C ~ 3 C_forward (Sec. 2.1).
        return FLOPS_PER_PARAM_TOKEN * count_params(cfg).non_embedding + 6.0 * cfg.n_layers * cfg.seq_len * cfg.d_model
    if convention == "chinchilla":
        return 3.0 * _chinchilla_forward_flops_per_sequence(cfg) / cfg.seq_len
    raise ValueError(f"FLOP convention {convention!r} is unknown: use one of {FLOP_CONVENTIONS}.")


def _chinchilla_forward_flops_per_sequence(cfg: ModelConfig) -> float:
    """Hoffmann et al. 2022, Appendix F (Table 4 terms), per sequence of seq_len tokens; key_size*heads = d_model."""
    L, D, F, V, H = cfg.seq_len, cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_heads
    embeddings = 2 * L * V * D
    qkv = 2 * 3 * L * D * D
    logits = 2 * L * L * D
    softmax = 3 * H * L * L
    reduction = 2 * L * L * D
    attn_out = 2 * L * D * D
    dense = 2 * L * (D * F + D * F)
    head = 2 * L * D * V
    return float(embeddings + cfg.n_layers * (qkv + logits + softmax + reduction + attn_out + dense) + head)


def training_flops(cfg: ModelConfig, tokens: float, convention: str = "chinchilla") -> float:
    """C for training on `tokens` tokens."""
    return flops_per_token(cfg, convention) * float(tokens)


def tokens_for_flops(cfg: ModelConfig, flops: float, convention: str = "chinchilla") -> float:
    """D such that training on D tokens costs `flops` under the convention."""
    return float(flops) / flops_per_token(cfg, convention)


# --------------------------------------------------------------------------------------------------------------------
# Conversions for analysis: from what a run record (or a collected row, or a wandb summary) carries, no model config.
# Scalars or array-likes (pandas columns) alike.
# --------------------------------------------------------------------------------------------------------------------
def C_under(convention: str, C_by_convention: Mapping, N=None, D=None):
    """A run's training FLOPs under `convention`: the record's own count (`C_by_convention[conv]`, i.e. its C_6N,
    C_kaplan or C_chinchilla) for a FLOP convention; for "6ND", 6 N D with the N the caller chose (Kaplan et al. 2020
    eq. 2.1 takes N non-embedding; with total N it is the common "6ND" of later papers)."""
    if convention == "6ND":
        if N is None or D is None:
            raise ValueError('C under "6ND" needs N and D (6 N D with the chosen N)')
        return FLOPS_PER_PARAM_TOKEN * N * D
    if convention in FLOP_CONVENTIONS:
        if convention not in C_by_convention:
            raise ValueError(f"C under {convention!r} needs the run's C_{convention}; it is not in "
                             f"{sorted(C_by_convention)}")
        return C_by_convention[convention]
    raise ValueError(f"C convention {convention!r} is unknown: use one of {C_CONVENTIONS}.")


def convert_C(C, C_by_convention: Mapping, frm: str, to: str, N=None, D=None):
    """C counted under `frm` for a run of this shape (e.g. the budget it was planned at), re-expressed under `to`:
    C * C_to / C_frm of that run. Exact (C itself) when the conventions are the same."""
    if frm == to:
        return C
    return C * C_under(to, C_by_convention, N, D) / C_under(frm, C_by_convention, N, D)


# Peak dense bf16 FLOP/s per device (no structured sparsity), from the vendors' data sheets:
# NVIDIA H100 / H200 datasheets (SXM 989.4 TF, PCIe 756 TF, H200 = H100 SXM compute), A100 datasheet (312 TF),
# L4 datasheet (121 TF); Google Cloud TPU system architecture pages (v4 275 TF, v5e 197 TF, v5p 459 TF).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4e12,
    "NVIDIA H100 SXM": 989.4e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989.4e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
}


def peak_flops_per_device(device_kind: str, override: Optional[float] = None, cache_dir: Optional[Path] = None) -> float:
    """Peak FLOP/s of one device: an explicit override, the table above, else (CPU) a measured matmul probe."""
    if override:
        return float(override)
    for name, peak in PEAK_FLOPS.items():
        if device_kind.lower().startswith(name.lower()) or name.lower() in device_kind.lower():
            return peak
    return measured_cpu_peak(cache_dir)


def measured_cpu_peak(cache_dir: Optional[Path] = None) -> float:
    """FLOP/s of a large float32 matmul on this host's devices, measured once and cached per host and CPU count.

    The CPU has no datasheet number we can trust across machines, so MFU on CPU is relative to what XLA's own matmul
    reaches here: the fairest ceiling for the same code path.
    """
    import jax
    import jax.numpy as jnp

    from scaling.paths import cache_root  # not at the top: analysis imports this module and nothing else of scaling

    cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_root()
    key = f"{os.uname().nodename}-{os.cpu_count()}-{jax.devices()[0].device_kind}-{jax.__version__}"
    path = cache_dir / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return float(cached[key])
    except (OSError, ValueError):
        cached = {}
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    peak = 2.0 * n**3 / best
    cached[key] = peak
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs re-measuring next time
    return peak
