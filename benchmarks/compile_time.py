"""Cold compile time of the training step, split into tracing + lowering (Python) and XLA's compile, with the median
step time beside it (BENCHMARKS.md, session 12; issue 15 item 4). One process per XLA_FLAGS setting:

    python benchmarks/compile_time.py                       # the nanogpt preset's four shapes
    python benchmarks/compile_time.py d384-L6-T256          # some of them
    python benchmarks/compile_time.py --steps-per-call 1    # the single step (default: what the trainer compiles)
    XLA_FLAGS=--xla_llvm_disable_expensive_passes=true python benchmarks/compile_time.py
    python benchmarks/compile_time.py --stacked-params      # each block's params stacked on a layer axis (below)

Prints one JSON line: shape -> [lower s, compile s, median step ms over 5 calls (P > 1: one call after a warm-up call, per step)]. Run with no compilation cache
(JAX_COMPILATION_CACHE_DIR unset): the trainer's own cache is configured by scaling.train.loop, not here.

--stacked-params (BENCHMARKS.md, session 22): the state holds the blocks' parameters stacked on a layer axis, so AdamW
updates 16 leaves instead of 76 (its per-leaf fusions were ~1 s of the d384 compile, session 21), and the loss slices
layer i's out of them; the model and its math are unchanged.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp

import scaling.train.loop as loop
from scaling.bench.runner import PRESETS, step_setup
from scaling.config import TrainConfig
from scaling.train.optim import OptimConfig


def stack_blocks(params: dict) -> dict:
    n = sum(k.startswith("block_") for k in params)
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(n)])
    return out


def unstack_blocks(params: dict) -> dict:
    out = {k: v for k, v in params.items() if k != "blocks"}
    n = jax.tree_util.tree_leaves(params["blocks"])[0].shape[0]
    return out | {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(n)}


args = sys.argv[1:]
STACKED = "--stacked-params" in args
if STACKED:
    args.remove("--stacked-params")
    plain_loss = loop.loss_fn
    loop.loss_fn = lambda params, *a: plain_loss(unstack_blocks(params), *a)
P = TrainConfig().steps_per_call
if "--steps-per-call" in args:
    i = args.index("--steps-per-call")
    P, args = int(args[i + 1]), args[:i] + args[i + 2:]
out = {}
for shape in PRESETS["nanogpt"]:
    if args and shape.name not in args:
        continue
    model, train_step, state, lower_args, call = step_setup(shape, {}, P)
    if STACKED:
        params = stack_blocks(state["params"])
        state = {"params": params, "opt_state": OptimConfig(warmup_steps=0).build(10_000).init(params)}
        lower_args = (state, *lower_args[1:])
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
