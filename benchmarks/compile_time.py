"""Cold compile time of the training step, split into tracing + lowering (Python) and XLA's compile, with the median
step time beside it (BENCHMARKS.md, session 12; issue 15 item 4). One process per XLA_FLAGS setting:

    python benchmarks/compile_time.py                       # the nanogpt preset's four shapes
    python benchmarks/compile_time.py d384-L6-T256          # some of them
    python benchmarks/compile_time.py --steps-per-call 1    # the single step (default: what the trainer compiles)
    XLA_FLAGS=--xla_llvm_disable_expensive_passes=true python benchmarks/compile_time.py

Prints one JSON line: shape -> [lower s, compile s, median step ms over 5 calls (P > 1: one call after a warm-up call, per step)]. Run with no compilation cache
(JAX_COMPILATION_CACHE_DIR unset): the trainer's own cache is configured by scaling.train.loop, not here.
"""

import json
import sys
import time

import jax

from scaling.bench.runner import PRESETS, step_setup
from scaling.config import TrainConfig

args = sys.argv[1:]
P = TrainConfig().steps_per_call
if "--steps-per-call" in args:
    i = args.index("--steps-per-call")
    P, args = int(args[i + 1]), args[:i] + args[i + 2:]
out = {}
for shape in PRESETS["nanogpt"]:
    if args and shape.name not in args:
        continue
    model, train_step, state, lower_args, call = step_setup(shape, {}, P)
    t0 = time.perf_counter()
    lowered = train_step.lower(*lower_args)
    t1 = time.perf_counter()
    step = lowered.compile()
    t2 = time.perf_counter()
    state, _ = call(step, state, 0)
    jax.block_until_ready(state)
    times = []
    for i in range(1, 6 if P == 1 else 2):
        a = time.perf_counter()
        state, _ = call(step, state, i)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - a) / P)
    out[shape.name] = [round(t1 - t0, 2), round(t2 - t1, 2), round(1000 * sorted(times)[(len(times) - 1) // 2], 1)]
print(json.dumps(out))
