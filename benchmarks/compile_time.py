"""Cold compile time of the training step, split into tracing + lowering (Python) and XLA's compile, with the median
step time beside it (BENCHMARKS.md, session 12; issue 15 item 4). One process per XLA_FLAGS setting:

    python benchmarks/compile_time.py                       # the nanogpt preset's four shapes
    python benchmarks/compile_time.py d384-L6-T256          # some of them
    XLA_FLAGS=--xla_llvm_disable_expensive_passes=true python benchmarks/compile_time.py

Prints one JSON line: shape -> [lower s, compile s, median step ms over 5 steps]. Run with no compilation cache
(JAX_COMPILATION_CACHE_DIR unset): the trainer's own cache is configured by scaling.train.loop, not here.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp

from scaling.bench.runner import PRESETS, model_config
from scaling.model.decoder import init_params
from scaling.train.loop import make_train_step
from scaling.train.optim import OptimConfig

out = {}
for shape in PRESETS["nanogpt"]:
    if len(sys.argv) > 1 and shape.name not in sys.argv[1:]:
        continue
    model = model_config(shape, {})
    optim = OptimConfig(warmup_steps=0)
    lr_at, with_lr = optim.with_lr_input(10_000)  # the trainer's step
    batch = jax.random.randint(jax.random.key(1), (1, shape.batch, shape.seq_len + 1), 0, shape.vocab_size)
    params = init_params(model, jax.random.key(0))
    state = {"params": params, "opt_state": optim.build(10_000).init(params)}
    step0 = jnp.asarray(0)
    t0 = time.perf_counter()
    lowered = make_train_step(model, with_lr, 1, 0).lower(state, batch, step0, lr_at(step0))
    t1 = time.perf_counter()
    step = lowered.compile()
    t2 = time.perf_counter()
    state, _ = step(state, batch, step0, lr_at(step0))
    jax.block_until_ready(state)
    times = []
    for i in range(1, 6):
        a = time.perf_counter()
        state, _ = step(state, batch, jnp.asarray(i), lr_at(jnp.asarray(i)))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - a)
    out[shape.name] = [round(t1 - t0, 2), round(t2 - t1, 2), round(1000 * sorted(times)[2], 1)]
print(json.dumps(out))
