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
import jax.numpy as jnp

from scaling.bench.runner import PRESETS, model_config
from scaling.config import TrainConfig
from scaling.model.decoder import init_params
from scaling.train.loop import chunk_lrs, make_train_step
from scaling.train.optim import OptimConfig

args = sys.argv[1:]
P = TrainConfig().steps_per_call
if "--steps-per-call" in args:
    i = args.index("--steps-per-call")
    P, args = int(args[i + 1]), args[:i] + args[i + 2:]
out = {}
for shape in PRESETS["nanogpt"]:
    if args and shape.name not in args:
        continue
    model = model_config(shape, {})
    optim = OptimConfig(warmup_steps=0)
    lr_at, with_lr = optim.with_lr_input(10_000)  # the trainer's step
    batch = jax.random.randint(jax.random.key(1), (1, shape.batch, shape.seq_len + 1), 0, shape.vocab_size)
    params = init_params(model, jax.random.key(0))
    state = {"params": params, "opt_state": optim.build(10_000).init(params)}
    step0 = jnp.asarray(0)
    if P > 1:  # the trainer's chained step: P batches and lrs per call, and the number of steps to run
        batch = jnp.stack([batch] * P)
        lrs = chunk_lrs(lr_at, 0, P, P)
        call = lambda step, state, i: step(state, batch, jnp.asarray(i * P), lrs, jnp.asarray(P))  # noqa: E731
        args_ = (state, batch, step0, lrs, step0)
    else:
        call = lambda step, state, i: step(state, batch, jnp.asarray(i), lr_at(jnp.asarray(i)))  # noqa: E731
        args_ = (state, batch, step0, lr_at(step0))
    t0 = time.perf_counter()
    lowered = make_train_step(model, with_lr, 1, 0, None, P).lower(*args_)
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
