"""One layer's causal attention forward + backward at the nanogpt preset's d384 shape (B 16, L 256, H 12, K 32), jitted,
median of 20 calls: `python benchmarks/cpu_attention/bench.py blocked|ffi` (one implementation per process)."""
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn import causal_attention  # noqa: E402

from scaling.model.attention import blocked_causal_attention  # noqa: E402

impl = {"blocked": blocked_causal_attention, "ffi": causal_attention}[sys.argv[1]]
q, k, v, w = (jax.random.normal(jax.random.key(i), (16, 256, 12, 32)) for i in range(4))
step = jax.jit(jax.grad(lambda q, k, v: (impl(q, k, v, 64, None) * w).sum(), (0, 1, 2)))
jax.block_until_ready(step(q, k, v))
times = []
for _ in range(20):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(step(q, k, v))
    times.append((time.perf_counter() - t0, time.process_time() - c0))
wall = statistics.median(t for t, _ in times)
print(f"{sys.argv[1]}: {wall * 1e3:.1f} ms forward + backward, cores {statistics.median(c / t for t, c in times):.2f}, "
      f"load {os.getloadavg()[0]:.2f}")
