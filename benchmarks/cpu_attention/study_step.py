"""The whole training step at an issue-19 study's shape (5 layers, head size 4, T 128, batch 4, BPE 1024), 16 steps
per call, median of 7 calls, from a given checkout (the product's, or a copy whose decoder calls attn.py):

    ATTN_KERNEL=native taskset -c 0 python benchmarks/cpu_attention/study_step.py REPO D_MODEL
"""
import os
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])
import jax  # noqa: E402

from scaling.bench import runner  # noqa: E402

d_model = int(sys.argv[2])
shape = runner.Shape("study", d_model, 5, d_model // 4, 128, 1024, 4)
_, step, state, lower_args, run_call = runner.step_setup(shape, {}, 16)
compiled = step.lower(*lower_args).compile()
state, metrics = run_call(compiled, state, 0)
jax.block_until_ready(state)
times = []
for i in range(1, 8):
    t0 = time.perf_counter()
    state, metrics = run_call(compiled, state, i)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
print(f"{sys.argv[1]} d{d_model}: {16 * shape.batch * shape.seq_len / statistics.median(times):,.0f} tokens/s, "
      f"loss {float(metrics['train_loss'][-1]):.6f}, load {os.getloadavg()[0]:.2f}")
