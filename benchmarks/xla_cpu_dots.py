"""How fast XLA:CPU runs the attention's batched matmuls against one large GEMM (BENCHMARKS.md, session 6 findings).

    python benchmarks/xla_cpu_dots.py                                   # XLA's default lowering (YNNPACK fusions)
    XLA_FLAGS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot" python benchmarks/xla_cpu_dots.py

Shapes of one query block (64 queries, keys up to 256) of the d384-L6-T256 bench shape: batch 16 x 12 heads, head dim
32. Each line: the mean over 20 calls of wall and process CPU time; CPU time equal to wall time means one core
did the work. Run each XLA_FLAGS setting in its own process on a quiet machine.
"""

import os
import re
import time

import jax
import jax.numpy as jnp

B, H, C, S, K = 16, 12, 64, 256, 32


def main() -> None:
    key = jax.random.key(0)
    q, k = jax.random.normal(key, (B, H, C, K)), jax.random.normal(key, (B, H, S, K))
    p, v = jax.random.normal(key, (B, H, C, S)), jax.random.normal(key, (B, H, S, K))
    x, w = jax.random.normal(key, (4096, 384)), jax.random.normal(key, (384, 1536))
    attn = 2 * B * H * C * S * K
    cases = {
        "scores  bhqk,bhsk->bhqs": (lambda a, b: jnp.einsum("bhqk,bhsk->bhqs", a, b), (q, k), attn),
        "scores  bhqk,bhks->bhqs": (lambda a, b: jnp.einsum("bhqk,bhks->bhqs", a, b), (q, jnp.swapaxes(k, -1, -2)),
                                    attn),
        "PV      bhqs,bhsk->bhqk": (lambda a, b: jnp.einsum("bhqs,bhsk->bhqk", a, b), (p, v), attn),
        "dV      bhqs,bhqk->bhsk": (lambda a, b: jnp.einsum("bhqs,bhqk->bhsk", a, b), (p, q), attn),
        "GEMM    4096x384x1536  ": (jnp.matmul, (x, w), 2 * 4096 * 384 * 1536),
    }
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for name, (fn, args, flops) in cases.items():
        f = jax.jit(fn)
        kinds = sorted(set(re.findall(r'"kind":"(__\w+)"', f.lower(*args).compile().as_text())))
        jax.block_until_ready(f(*args))
        n = 20
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            jax.block_until_ready(f(*args))
        wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
        print(f"{name}  wall {wall * 1e3:6.2f} ms  cpu {cpu * 1e3:6.2f} ms  {flops / wall / 1e9:6.1f} GFLOP/s  "
              f"cores used {cpu / wall:.2f}  {','.join(kinds) or 'no library fusion'}", flush=True)


if __name__ == "__main__":
    main()
