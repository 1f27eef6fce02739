"""Minimal reproducer (BENCHMARKS.md, session 18): XLA:CPU's experimental oneDNN dot fusion (jax 0.10.2) aborts the
process while compiling two chained matmuls, with nothing else in the program.

    XLA_FLAGS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot" python benchmarks/onednn_chain_repro.py

prints "partition compile failed" and dies with SIGILL (exit 132: a trap instruction after the failed oneDNN graph
partition compile) on the 2-core Intel Xeon VM (AVX-512, AMX); sessions 8 and 16 saw the same abort compiling the
whole step on the AMD EPYC host. Without the flags it prints the sum.
One matmul alone compiles and runs at 407-421 GFLOP/s on 4 of the d384 step's 5 GEMM shapes
(benchmarks/gemm_libraries.py), so this bug is what keeps oneDNN's GEMMs out of the training step.
"""

import jax

x = jax.random.normal(jax.random.key(0), (4096, 384))
w1 = jax.random.normal(jax.random.key(1), (384, 1536))
w2 = jax.random.normal(jax.random.key(2), (1536, 384))
print(float(jax.jit(lambda x: (x @ w1) @ w2)(x).sum()))
