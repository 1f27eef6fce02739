"""What it takes to train K models of one shape in one compiled step (`jax.vmap` over a stacked state): the stacked
init, the per-model learning rate, which configs may share a step, and where a group checkpoints. The loop that
trains them is scaling.train.loop's one loop (K = 1 is a plain run); each model keeps its own run directory,
metrics.jsonl, wandb run and record.json.

Why it can be faster: a small model leaves a GPU mostly idle between tiny matmuls and per-op overheads; stacking K
models turns K small matmuls into one batched matmul and pays dispatch, the Python loop and the batch sampling once
per step instead of K times. Measured on the 2-core CPU it is SLOWER (0.52x at K=4, BENCHMARKS.md): XLA:CPU runs
batched dot_general far below its plain matmul speed. So a planner should group runs with `group_by_shape` on
GPU/TPU and train them one by one on CPU.

How learning rates differ without K optimizers: every schedule here is lr times a shape (warmup from 0, floor =
min_lr_ratio * lr; scaling/train/optim.py), and AdamW's update is linear in the step size (Loshchilov & Hutter 2019,
Algorithm 2, line 12: theta <- theta - eta_t (alpha m_hat / (sqrt(v_hat) + eps) + lambda theta)). So the optimizer is
built once with lr = 1 and model k's update is multiplied by lr_k, a scalar held in its own (vmapped) optimizer state.
Gradient clipping acts before Adam and does not involve lr. Equal to K separate runs up to float rounding (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from scaling.config import Config, to_dict
from scaling.model.decoder import ModelConfig, init_params
from scaling.train.optim import OptimConfig
from scaling.sweep.schedule import parse_vmap

# Fields that may differ between the K models of one vmapped group; everything else must be equal.
FREE_FIELDS = ("name", "optim.lr", "train.seed", "sweep", "logging")


class LrScaleState(NamedTuple):
    lr: jax.Array  # this model's learning rate (a scalar; stacked to [K] under vmap)


def scale_by_model_lr() -> optax.GradientTransformation:
    """Multiplies the updates by the lr held in the state (see the module docstring for why that is exact)."""

    def init(params):
        del params
        return LrScaleState(jnp.ones([], jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: u * state.lr.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def unit_lr_optimizer(optim: OptimConfig, num_steps: int, model: ModelConfig | None = None,
                      schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """`optim` at lr = 1 (with µP's per-layer multipliers for a µP `model`), then times each model's own lr: the
    multipliers and the decay sit inside the update that lr_k scales, so model k's update is its K = 1 update.
    `schedule`: as OptimConfig.build's (the lr = 1 shape's value, an input of the step)."""
    return optax.chain(dataclasses.replace(optim, lr=1.0).build(num_steps, model, schedule), scale_by_model_lr())


def unit_lr_input(optim: OptimConfig, num_steps: int, model: ModelConfig | None = None
                  ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], optax.GradientTransformation]]:
    """The K > 1 trainer's form of `unit_lr_optimizer`, as OptimConfig.with_lr_input is the K = 1 one: (the jitted
    lr = 1 schedule, giving each step's unit lr; unit lr -> the optimizer at it)."""
    unit = jax.jit(dataclasses.replace(optim, lr=1.0).schedule_fn(num_steps))
    return unit, lambda lr: unit_lr_optimizer(optim, num_steps, model, schedule=lambda count: lr)


def init_stacked(model: ModelConfig, optimizer: optax.GradientTransformation, seeds: Sequence[int],
                 lrs: Sequence[float]) -> dict:
    """The stacked state {"params", "opt_state"}, every leaf [K, ...]; model k starts from jax.random.key(seeds[k])
    exactly as a single run with that seed does. Traceable: the trainer jits it straight into its shardings."""

    def one(seed, lr):
        params = init_params(model, jax.random.key(seed))
        inner, _ = optimizer.init(params)
        return {"params": params, "opt_state": (inner, LrScaleState(lr))}

    return jax.vmap(one)(jnp.asarray(seeds, jnp.int32), jnp.asarray(lrs, jnp.float32))


def init_many(model: ModelConfig, optimizer: optax.GradientTransformation, seeds: Sequence[int], lrs: Sequence[float]):
    return jax.jit(lambda: init_stacked(model, optimizer, seeds, lrs))()


def make_multi_step(model: ModelConfig, optimizer: "scaling.train.loop.Optimizer", grad_accum: int, seed: int,
                    shared_batch: bool, shardings=None, steps_per_call: int = 1):
    """One jitted step for K stacked models: the single-run step of scaling.train.loop, vmapped over the model axis.

    shared_batch: every model sees the same [A, B, L+1] batch (an lr sweep with one data seed); else [K, A, B, L+1].
    shardings: the stacked state's (leading K axis unsharded); constraints inside the vmap would see one model's
    shapes, so the new state is pinned outside it. steps_per_call > 1: up to that many steps per call
    (scaling.train.loop.chain_steps).
    """
    from scaling.train.sharding import constrain
    from scaling.train.loop import chain_steps, train_step_fn

    vmapped = jax.vmap(train_step_fn(model, optimizer, grad_accum, seed),
                       in_axes=(0, None if shared_batch else 0, None, None))

    def step(state, batch, step_index, lr=None):  # lr: the unit schedule's value, when `optimizer` is lr -> optimizer
        new_state, metrics = vmapped(state, batch, step_index, lr)
        return constrain(new_state, shardings), metrics

    return jax.jit(step if steps_per_call == 1 else chain_steps(step, steps_per_call, shardings, stacked=True), donate_argnums=(0,))


def group_key(cfg: Config) -> str:
    """Configs with equal keys can share one vmapped step."""
    d = to_dict(cfg)
    for path in FREE_FIELDS:
        node = d
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return repr(sorted(_flatten(d).items()))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_group(cfgs: Sequence[Config]) -> None:
    if not cfgs:
        raise ValueError("train: give at least one config.")
    first = group_key(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        if group_key(cfg) != first:
            a, b = _flatten(to_dict(cfgs[0])), _flatten(to_dict(cfg))
            diff = sorted(k for k in a if a[k] != b.get(k) and not any(k.startswith(f) for f in FREE_FIELDS))
            raise ValueError(
                f"configs[{i}] ({cfg.name}) differs from configs[0] in {diff}: the models of one vmapped group may "
                f"differ only in {FREE_FIELDS}; train the others in another group (group_by_shape does this)."
            )
    seeds = {c.train.seed for c in cfgs}
    if cfgs[0].model.dropout > 0 and len(seeds) > 1:
        raise ValueError(
            f"model.dropout={cfgs[0].model.dropout} with seeds {sorted(seeds)}: one vmapped step shares one dropout "
            "stream; use one seed per group or dropout=0."
        )


def group_by_shape(cfgs: Sequence[Config], max_k: int = 16) -> list[list[int]]:
    """Indices of `cfgs` in vmappable groups of at most max_k: what a sweep planner calls for an lr sweep."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(group_key(cfg), []).append(i)
    return [idx[j : j + max_k] for idx in groups.values() for j in range(0, len(idx), max_k)]


def members(run_dirs: Sequence[Path]) -> list[str]:
    """A group's identity: its run directories in order (the K axis), relative to the first one's parent."""
    parent = Path(run_dirs[0]).absolute().parent
    return [os.path.relpath(Path(d).absolute(), parent) for d in run_dirs]


def group_checkpoint_dir(run_dirs: Sequence[Path]) -> Path:
    """`<first run dir>/../.group-<hash of the ordered member dirs>`: one directory per member set and order.

    One directory, not a slice per run dir: a group checkpoint is then one orbax save (atomic by rename), so a kill
    can never leave members at different steps. A relaunch with another member set (some finished meanwhile) hashes
    to another directory and never sees this group's checkpoints; its members' configs are pinned by their run dirs.
    """
    digest = hashlib.sha256(json.dumps(members(run_dirs)).encode()).hexdigest()[:16]
    return Path(run_dirs[0]).absolute().parent / f".group-{digest}"


def use_vmap(vmap: str | bool = "auto") -> bool:
    """`auto`: vmap on an accelerator, not on CPU (where it is slower, see the module docstring)."""
    mode = parse_vmap(vmap)
    return jax.default_backend() != "cpu" if mode == "auto" else mode == "true"
