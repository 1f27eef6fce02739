"""Training: `python -m scaling.train [overrides]` (Hydra), or `train(cfg, run_dir)` / `train_runs(cfgs, run_dirs)`
from a notebook.

There is one training loop, `_train_loop`, and it trains K runs of one shape at once: a plain run is K = 1; K > 1
(runs that differ only in lr / seed, scaling.train.stack) steps one vmapped, stacked state. It reads top to bottom: resolve
the budget, load tokens, init or resume, then for each step take the batch that is a pure function of (seed, step),
update, log, check each run for divergence, evaluate, checkpoint; finally write each run's record.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling.train import stack
from scaling.accounting import FLOP_CONVENTIONS, count_params, flops_per_token, peak_flops_per_device
from scaling.train.checkpoint import Checkpointer, CorruptCheckpointError
from scaling.config import Budget, Config, from_omegaconf, resolve_budget, to_dict
from scaling.data.tokens import TokenData, load_tokens
from scaling.eval.suite import EvalSuite
from scaling.train.lock import DirLock
from scaling.model.decoder import ModelConfig, init_params, loss_fn, resolve_attention, resolve_head_loss
from scaling.record import (CONFIG_FILE, FINAL, RecordError, eval_columns, failed_start_record, git_commit,
                            package_versions, read_record, record_status, summary_fields, text_metrics,
                            write_json_atomic, write_record)
from scaling.train.compile_cache import configure_compile_cache
from scaling.train.sharding import (check_batch, configure_cpu_devices, constrain, exit_with_parent,
                                    initialize_distributed, init_sharded, make_mesh, pin_cores, put_batch,
                                    state_shardings)
from scaling.train.tracking import Progress, build_tracker, read_metrics

log = logging.getLogger("scaling.train.loop")

# Fields that may change between a run and its relaunch without making it another run.
_RELAUNCH_FREE = ("logging", "sweep", "sharding", "eval", "compile_cache")  # orbax restores a checkpoint onto any mesh


# {"params": ..., "opt_state": ...}: a plain dict, so a pytree for jit, orbax and the tests.
TrainState = dict

Optimizer = Union[optax.GradientTransformation, Callable[[jax.Array], optax.GradientTransformation]]


def make_train_step(model: ModelConfig, optimizer: Optimizer, grad_accum: int, seed: int, shardings: Any = None,
                    steps_per_call: int = 1):
    """A jit-compiled step that donates the old state's buffers (see `train_step_fn`); with `steps_per_call` > 1, up
    to that many steps per call (`chain_steps`)."""
    step_fn = train_step_fn(model, optimizer, grad_accum, seed, shardings)
    chained = step_fn if steps_per_call == 1 else chain_steps(step_fn, steps_per_call, shardings)
    return jax.jit(chained, donate_argnums=(0,))


def chain_steps(step_fn: Callable, n_max: int, shardings: Any = None, stacked: bool = False) -> Callable:
    """`step_fn` run n <= `n_max` times in one executable: (state, batches [n_max, ...], first step, lrs [n_max], n) ->
    (state, {"train_loss": [n_max, ...] (rows past n are zeros), "grad_norm": the n-th step's}).

    Why: an XLA:CPU executable allocates its temporaries (the step's activations, 1.3 GB at d384 x 16 x 256) as one
    block per call, and glibc maps blocks that large fresh from the kernel and unmaps them on free, so every call
    faults every page in again: 350k page faults, ~0.5 CPU-s of a 1.9 s step (BENCHMARKS.md, session 14). A loop
    inside the executable reuses the block for all n steps; n is an argument (a while loop), so one compilation serves
    chunks of every length. Each step is `step_fn` on its own batch, step number and lr: the same math as n calls.
    `shardings` (the state's) pin the loop's state to the layout the step keeps, so the executable takes and returns
    the state as the trainer placed it; `stacked`: the state holds K models (scaling.train.stack), one loss each.
    """

    def chained(state: TrainState, batches: jax.Array, step0: jax.Array, lrs: jax.Array, n: jax.Array):
        state = constrain(state, shardings)
        # one loss and grad norm per model: a scalar, or [K] for K stacked models (scaling.train.stack), whose state
        # leaves lead with K (taken from the state rather than by tracing the step a second time: compile time)
        shape = jax.tree_util.tree_leaves(state["params"])[0].shape[:1] if stacked else ()

        def body(i, carry):
            state, losses, _ = carry
            state, m = step_fn(state, batches[i], step0 + i, lrs[i])
            return state, losses.at[i].set(m["train_loss"]), m["grad_norm"].astype(jnp.float32)

        carry = (state, jnp.zeros((n_max, *shape), jnp.float32), jnp.zeros(shape, jnp.float32))
        state, losses, grad_norm = jax.lax.fori_loop(0, n, body, carry)
        return constrain(state, shardings), {"train_loss": losses, "grad_norm": grad_norm}

    return chained


def chunk_steps(step: int, n: int, steps_per_call: int) -> list[int]:
    """The step numbers of the `steps_per_call` rows of a chunk of n steps from `step` (`chain_steps`'s batches and
    lrs): step .. step + n - 1, then the last one repeated; rows past n are padding the loop never runs."""
    return [min(s, step + n - 1) for s in range(step, step + steps_per_call)]


def chunk_lrs(lr_input: Callable, step: int, n: int, steps_per_call: int) -> jax.Array:
    """The lrs argument of a chained step (`chain_steps`): `lr_input` (the schedule, OptimConfig.with_lr_input) at
    each row's step, stacked."""
    return jnp.stack([lr_input(jnp.asarray(s)) for s in chunk_steps(step, n, steps_per_call)])


def train_step_fn(model: ModelConfig, optimizer: Optimizer, grad_accum: int, seed: int, shardings: Any = None):
    """The pure step: `grad_accum` microbatches are scanned and their mean gradient applied once.

    `optimizer` is a GradientTransformation, or a function from the step's learning rate to one: then the step takes
    that lr as a fourth argument (the trainer evaluates the schedule outside, `lr_input`) and its compiled code does
    not depend on the schedule, so every run of one shape (a ladder's parent and branches, any budget) compiles the
    same step and the persistent compilation cache serves it (scaling.train.compile_cache). The optimizer state is
    the same either way (optax keeps the step count whatever the schedule), and so is every update, bit for bit on
    CPU (tests/test_train.py).

    The mean of microbatch means equals the big batch's mean loss (equal-size microbatches), so the update is the
    big batch's up to float summation order (tested). `shardings` (the state's, from scaling.train.sharding) pins the
    gradients and the new state to the params' layout: under FSDP the gradient all-reduce becomes a reduce-scatter.
    scaling.train.stack vmaps this same function over K models.
    """
    param_shardings = None if shardings is None else shardings["params"]

    def step_fn(state: TrainState, batch_AxBxLp1: jnp.ndarray, step: jnp.ndarray, lr: Optional[jax.Array] = None):
        tx = optimizer(lr) if callable(optimizer) else optimizer  # a GradientTransformation is a (non-callable) tuple
        params = state["params"]
        dropout_rng = jax.random.fold_in(jax.random.key(seed), step) if model.dropout > 0 else None

        def micro(grads_sum, batch_BxLp1):
            loss, grads = jax.value_and_grad(loss_fn)(params, model, batch_BxLp1, dropout_rng)
            return jax.tree_util.tree_map(jnp.add, grads_sum, grads), loss

        if grad_accum == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, model, batch_AxBxLp1[0], dropout_rng)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, batch_AxBxLp1)
            grads = jax.tree_util.tree_map(lambda g: g / grad_accum, grads)
            loss = jnp.mean(losses)
        grads = constrain(grads, param_shardings)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = TrainState(params=optax.apply_updates(params, updates), opt_state=opt_state)
        new_state = constrain(new_state, shardings)
        return new_state, {"train_loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}

    return step_fn


# --------------------------------------------------------------------------------------------------------------------
# Entry points: one run, K runs of one shape, a sweep job's group
# --------------------------------------------------------------------------------------------------------------------
def train(cfg: Config, run_dir: Path) -> dict:
    """Trains (or resumes, or skips a finished) run in `run_dir`; returns its record. The K = 1 case of `train_runs`."""
    return train_runs([cfg], [run_dir])[0]


def train_runs(cfgs: Sequence[Config], run_dirs: Sequence[Path]) -> list[dict]:
    """Trains K configs that differ only in lr / seed / name (scaling.train.stack.FREE_FIELDS) in one loop; returns their
    records. K = 1 is a plain run; K > 1 steps one vmapped state (one record, metrics.jsonl and wandb run each).

    Finished runs (completed or diverged: retraining would repeat them bit for bit) are left alone and their record is
    returned. K > 1 checkpoints the stacked state in `stack.group_checkpoint_dir`, so relaunching the same members
    resumes it; another member set (some finished meanwhile) is another group and starts from step 0.
    """
    stack.check_group(cfgs)
    if len(cfgs) > 1 and any(c.train.parent is not None for c in cfgs):
        raise ValueError("train_runs: ladder branches (train.parent) train one at a time, not as a vmapped group.")
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) != len(cfgs) or len({d.absolute() for d in run_dirs}) != len(run_dirs):
        raise ValueError(f"train: give one distinct run directory per config (got {len(run_dirs)} for {len(cfgs)}).")
    for cfg in cfgs:  # a bad budget fails here, before anything is written (a corrected command then starts clean)
        resolve_budget(cfg.model, cfg.train)
    exit_with_parent()  # a joblib worker does not outlive a sweep killed with SIGKILL
    pin_cores()  # before anything below starts the backend (and its threads)
    configure_compile_cache(cfgs[0].compile_cache)  # before anything compiles
    configure_cpu_devices(cfgs[0].sharding)
    initialize_distributed(cfgs[0].sharding)  # a no-op on one host
    records: list[Any] = [None] * len(cfgs)
    todo, locks = [], []
    try:
        for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            run_dir.mkdir(parents=True, exist_ok=True)
            if record_status(run_dir) not in FINAL and jax.process_count() == 1:
                # One trainer per run directory, across processes and hosts (two sweeps launched into one sweep dir,
                # a SLURM requeue): a run another live process holds is left to it. Multi-host runs train one run
                # dir from every process, so they rely on their launcher instead.
                lock = DirLock(run_dir)
                if not lock.acquire():
                    log.warning("run %s is being trained by %s: left to it", run_dir, lock.describe())
                    records[i] = {"name": cfg.name, "status": "locked", "error": f"being trained by {lock.describe()}"}
                    continue
                locks.append(lock)
            if record_status(run_dir) in FINAL:  # (re-read under the lock: another process may just have finished it)
                records[i] = read_record(run_dir)
                log.info("run %s already %s: nothing to train (delete its run directory to retrain)", run_dir,
                         records[i]["status"])
                continue
            _check_same_run(cfg, run_dir)
            todo.append(i)
        if todo:
            for i, record in zip(todo, _train_loop([cfgs[i] for i in todo], [run_dirs[i] for i in todo])):
                records[i] = record
    finally:
        for lock in locks:
            lock.release()
    return records


def train_group(cfgs: Sequence[Config], run_dirs: Sequence[Path], vmap: str | bool = "auto") -> list[dict]:
    """One sweep job for runs that differ only in lr / seed (a planner's same-shape group); returns their records.

    With vmap (`stack.use_vmap`: on GPU/TPU under `auto`) the unfinished members train as one K-run loop; without,
    one after another, each the K = 1 case of the same loop. A failing member (sequential) is recorded and the others
    still train; the job then raises.
    """
    stack.check_group(cfgs)
    if stack.use_vmap(vmap):
        log.info("training %d runs as one vmapped step: %s", len(cfgs), ", ".join(c.name for c in cfgs))
        return train_runs(cfgs, run_dirs)
    records, errors = [], []
    for cfg, run_dir in zip(cfgs, run_dirs):
        try:
            records.append(train(cfg, run_dir))
        except Exception as e:  # noqa: BLE001 - train wrote a failed record; the others still get their go
            try:
                records.append(read_record(run_dir))
            except RecordError:
                records.append(None)
            errors.append(f"{cfg.name}: {type(e).__name__}: {e}")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(cfgs)} runs of the group failed (their records say why):\n"
                           + "\n".join(errors))
    return records


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Stack:
    """How K runs of one shape are held: K = 1 a plain state and step, K > 1 a state stacked on a leading K axis
    and the same step vmapped over it (learning rates live in the state, scaling.train.stack.unit_lr_optimizer)."""

    init: Callable[[], TrainState]
    step: Callable  # (shardings) -> jitted step(state, batch, step, lr) -> (state, {"train_loss": [K]?, "grad_norm"})
    lr_input: Callable  # jitted step -> the step's lr argument (the schedule, or K > 1 its lr = 1 shape)
    eval: Callable  # jitted (params, batch_BxLp1) -> loss ([] or [K])
    leading_axes: int  # 0 or 1: the K axis is never sharded
    batch_axis: int  # the microbatch-row axis of what batch_at returns


def _build_stack(cfgs: Sequence[Config], num_steps: int) -> _Stack:
    cfg0, K = cfgs[0], len(cfgs)
    model, A, seed, P = cfg0.model, cfg0.train.grad_accum, cfg0.train.seed, cfg0.train.steps_per_call
    eval_one = lambda params, batch_BxLp1: loss_fn(params, model, batch_BxLp1)  # noqa: E731
    # The lr is an input of the step (train_step_fn): one compiled step per shape, whatever the schedule.
    if K == 1:
        optimizer = cfg0.optim.build(num_steps, model)
        lr_input, with_lr = cfg0.optim.with_lr_input(num_steps, model)

        def init() -> TrainState:
            params = init_params(model, jax.random.key(seed))
            return TrainState(params=params, opt_state=optimizer.init(params))

        return _Stack(init, lambda shardings: make_train_step(model, with_lr, A, seed, shardings, P),
                      lr_input, jax.jit(eval_one), leading_axes=0, batch_axis=1)
    optimizer = stack.unit_lr_optimizer(cfg0.optim, num_steps, model)
    unit_lr, with_lr = stack.unit_lr_input(cfg0.optim, num_steps, model)
    seeds, lrs = [c.train.seed for c in cfgs], [c.optim.lr for c in cfgs]
    shared = len(set(seeds)) == 1  # one data stream for all: the batch is broadcast, not stacked
    return _Stack(lambda: stack.init_stacked(model, optimizer, seeds, lrs),
                  lambda shardings: stack.make_multi_step(model, with_lr, A, seed, shared, shardings, P), unit_lr,
                  jax.jit(jax.vmap(eval_one, in_axes=(0, None))), leading_axes=1, batch_axis=1 if shared else 2)


def initial_state_fn(cfgs: Sequence[Config]) -> Callable[[], TrainState]:
    """The trainer's initial state of these runs (one run, or a vmapped group's stack) as a function: the template
    their checkpoints restore into (scaling.eval.sample reads a finished run's parameters through it)."""
    return _build_stack(cfgs, resolve_budget(cfgs[0].model, cfgs[0].train).steps).init


def _train_loop(cfgs: list[Config], run_dirs: list[Path]) -> list[dict]:
    cfg0, K = cfgs[0], len(cfgs)
    budget = resolve_budget(cfg0.model, cfg0.train)
    records = [_static_record(c, budget) for c in cfgs]
    if K > 1:
        for k, r in enumerate(records):
            r["vmap_group"] = {"K": K, "index": k}
    trackers: list[Any] = []
    try:
        data = load_tokens(cfg0.data)
        data.check_model_vocab(cfg0.model.vocab_size)
        data.validate_batch_shape(cfg0.train.batch_size, cfg0.model.seq_len)
        for r in records:
            r.update(tokenizer=data.tokenizer_record(), data=data.data_record(), epochs=data.epochs(budget.D))
        identity = _data_identity(data)
        # downstream tasks (cfg.eval), built and encoded now so that a bad task fails before the first step
        suite = EvalSuite(cfg0.eval, cfg0.model, data, cfg0.data.resolved_cache_dir()) if _evaluates(cfg0) else None
        scores_K: dict[int, dict] = {}  # run -> its latest task scores (the last step's, if every_eval)

        mesh = make_mesh(cfg0.sharding)  # one device or many: the same code below
        check_batch(mesh, cfg0.train.batch_size, cfg0.train.grad_accum)
        for r in records:
            r["n_devices"] = mesh.size
        held = _build_stack(cfgs, budget.steps)
        state, shardings = init_sharded(held.init, lambda s: state_shardings(s, mesh, cfg0.sharding, held.leading_axes))

        # K = 1 checkpoints in its run dir; a group in one directory of its own, so a save is one atomic orbax step
        # and a kill never leaves members at different steps (scaling.train.stack.group_checkpoint_dir).
        members = stack.members(run_dirs)
        if K == 1:
            checkpoint_dir = run_dirs[0] / "checkpoints"
        else:
            group_dir = stack.group_checkpoint_dir(run_dirs)
            write_json_atomic(group_dir / "members.json", {"members": members, "names": [c.name for c in cfgs]})
            checkpoint_dir = group_dir / "checkpoints"
        checkpointer = Checkpointer(checkpoint_dir, cfg0.train.checkpoint)
        restored = checkpointer.restore_latest(state)
        forked = restored is None and cfg0.train.parent is not None
        if forked:  # a branch's first start (or a restart before its own first checkpoint): the parent's state
            restored = _fork(cfg0, run_dirs[0], state, budget)
        start_step = 0
        first_K, alive_K = np.full(K, np.nan), np.ones(K, bool)
        if restored is not None:
            start_step, state, meta = restored
            first_K, alive_K = _restore_meta(meta, members, records, checkpoint_dir, identity)
            log.info("%s %s from step %d", "forking" if forked else "resuming",
                     run_dirs[0] if K == 1 else checkpoint_dir.parent, start_step)
        trackers = [
            build_tracker(c.logging, d, to_dict(c), c.name, start_step if restored else None)
            if jax.process_index() == 0
            else _SilentTracker()  # multi-host: one process writes metrics, wandb and the record
            for c, d in zip(cfgs, run_dirs)
        ]
        for tracker, r in zip(trackers, records):
            tracker.summary(summary_fields(r))

        A, L, B = cfg0.train.grad_accum, cfg0.model.seq_len, cfg0.train.batch_size
        # bytes and characters per token of exactly the validation text evaluate_K averages over (None: no text)
        bytes_per_token, chars_per_token = data.val_text_per_token(cfg0.train.eval_tokens, B, L) or (None, None)
        seeds = sorted({c.train.seed for c in cfgs}) if held.batch_axis == 1 else [c.train.seed for c in cfgs]

        def tokens_at(step: int) -> np.ndarray:
            one = lambda seed: data.train_batch(seed, step, B, L).reshape(A, B // A, L + 1)  # noqa: E731
            return one(seeds[0]) if held.batch_axis == 1 else np.stack([one(s) for s in seeds])

        P = cfg0.train.steps_per_call
        saves = cfg0.train.checkpoint

        def chunk_end(step: int) -> int:
            """Where the chunk of steps from `step` must stop: every logging and checkpoint step ends one (eval only
            happens at logging steps), as does the budget's last step."""
            ends = [step + P, budget.steps, (step // log_every + 1) * log_every, (step // saves.every + 1) * saves.every]
            return min(ends + [s for s in saves.keep_steps if s > step])

        def chunk_args(step: int, n: int) -> tuple:
            """The step's arguments after the state for steps step .. step + n - 1 (P = 1: n is 1): the batch, the
            first step and its lr; P > 1 P steps' batches and lrs (`chain_steps`), and n."""
            if P == 1:
                return (put_batch(tokens_at(step), mesh, batch_axis=held.batch_axis), jnp.asarray(step),
                        held.lr_input(jnp.asarray(step)))
            tokens = np.stack([tokens_at(s) for s in chunk_steps(step, n, P)])
            return (put_batch(tokens, mesh, batch_axis=held.batch_axis + 1), jnp.asarray(step),
                    chunk_lrs(held.lr_input, step, n, P), jnp.asarray(n))

        def run_chunk(state: TrainState, step: int, n: int) -> tuple[TrainState, dict]:
            """Steps step .. step + n - 1; the metrics' train_loss has a leading steps axis (n rows) when P > 1."""
            state, metrics = train_step(state, *chunk_args(step, n))
            return state, metrics if P == 1 else {**metrics, "train_loss": metrics["train_loss"][:n]}

        def evaluate_K(params) -> np.ndarray:
            batches = data.val_batches(cfg0.train.eval_tokens, B, L)
            losses = [np.atleast_1d(np.asarray(held.eval(params, put_batch(b, mesh, batch_axis=0)))) for b in batches]
            # per run, a float64 mean of Python floats (as the K = 1 loop always did: bit-identical records)
            return np.array([float(np.mean([float(x[k]) for x in losses])) for k in range(K)])

        log_every = cfg0.logging.log_every
        t0 = time.perf_counter()
        train_step = held.step(shardings).lower(state, *chunk_args(start_step, 1)).compile()
        compile_s = time.perf_counter() - t0
        peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg0.train.peak_flops) * mesh.size
        fpt = flops_per_token(cfg0.model, "chinchilla")  # MFU counts every matmul
        conv_fpt = flops_per_token(cfg0.model, cfg0.train.flops_convention)
        lr_at = [c.optim.schedule_fn(budget.steps) for c in cfgs]  # built once, not at every logged step
        window: list[jax.Array] = []  # the train losses since the last log: one entry per step, or per chunk if P > 1
        window_start = start_step
        window_t0, train_s = time.perf_counter(), 0.0
        tokens_per_s = float("nan")  # per run; the group trains K times this
        train_loss_K, eval_loss_K = np.full(K, np.nan), np.full(K, np.nan)
        progress = Progress(cfg0.logging, budget.steps, start_step)

        step = start_step
        while step < budget.steps:
            done = chunk_end(step)
            state, metrics = run_chunk(state, step, done - step)
            window.append(metrics["train_loss"])
            step, last = done, done == budget.steps
            if done % log_every == 0 or last:
                train_loss_K = np.array([float(np.mean(w)) for w in _per_run(jax.device_get(window), K, P > 1)])
                grad_norm_K = np.atleast_1d(np.asarray(jax.device_get(metrics["grad_norm"]), dtype=float))
                elapsed = time.perf_counter() - window_t0
                train_s += elapsed
                tokens_per_s = (done - window_start) * budget.tokens_per_step / elapsed
                first_K = np.where(np.isnan(first_K), train_loss_K, first_K)
                rows: dict[int, dict] = {}
                for k in np.flatnonzero(alive_K):
                    rows[k] = {
                        "step": done,
                        "tokens": done * budget.tokens_per_step,
                        "flops": done * budget.tokens_per_step * conv_fpt,
                        "lr": float(lr_at[k](done - 1)),
                        "train_loss": float(train_loss_K[k]),
                        "grad_norm": float(grad_norm_K[k]),
                        "tokens_per_s": tokens_per_s,
                        "mfu": tokens_per_s * fpt / peak,
                    }
                    loss_k = train_loss_K[k]
                    if not math.isfinite(loss_k) or loss_k > cfg0.train.divergence_factor * first_K[k]:
                        alive_K[k] = False  # in a group it keeps stepping inside the vmap; its NaNs touch no other run
                        records[k].update(status="diverged", diverged_step=done, train_loss=float(loss_k))
                        log.error("run %s diverged at step %d: train loss %s (first %.4f)", cfgs[k].name, done,
                                  loss_k, first_K[k])
                if alive_K.any() and (done % cfg0.train.eval_every == 0 or last):
                    eval_loss_K = evaluate_K(state["params"])
                    for k in np.flatnonzero(alive_K):
                        rows[k]["eval_loss"] = float(eval_loss_K[k])
                        if bytes_per_token is not None:
                            rows[k]["eval_bpb"] = text_metrics(float(eval_loss_K[k]), bytes_per_token, None)["bpb"]
                if (suite is not None and cfg0.eval.every_eval and alive_K.any()
                        and (done % cfg0.train.eval_every == 0 or last)):
                    for k in np.flatnonzero(alive_K):
                        scores_K[k] = suite(_member(state["params"], k, K))
                        rows[k].update(eval_columns(scores_K[k]))
                for k, row in rows.items():
                    trackers[k].log(row, done)
                if not alive_K.any():
                    break
                progress.update(done, float(np.min(train_loss_K[alive_K])), tokens_per_s)
                window, window_t0, window_start = [], time.perf_counter(), done
            checkpointer.save(done, state, _checkpoint_meta(done, budget, first_K, alive_K, members, records, identity), force=last)
        checkpointer.close()
        progress.close()
        if start_step == budget.steps:  # killed after the final checkpoint, before the records: finish, train nothing
            last_rows = [(read_metrics(d / "metrics.jsonl") or [{}])[-1] for d in run_dirs]
            train_loss_K = np.array([row.get("train_loss", np.nan) for row in last_rows], dtype=float)
            tokens_per_s = float(last_rows[0].get("tokens_per_s", np.nan))
            eval_loss_K = evaluate_K(state["params"])

        for k, r in enumerate(records):
            completed = r["status"] == "running"
            r.update(
                status="completed" if completed else r["status"],
                loss=float(eval_loss_K[k]) if completed else float("nan"),
                # a diverged run keeps the train loss it diverged with, not a later NaN
                train_loss=float(train_loss_K[k]) if completed else r["train_loss"],
                tokens_per_s=tokens_per_s,
                mfu=tokens_per_s * fpt / peak,
                wall_s=train_s + compile_s,
                compile_s=compile_s,
                **text_metrics(float(eval_loss_K[k]) if completed else None, bytes_per_token, chars_per_token),
            )
            if K > 1:
                r["group_tokens_per_s"] = K * tokens_per_s
            if suite is not None and r["status"] == "completed":
                r["eval"] = scores_K.get(k) or suite(_member(state["params"], k, K))  # (every_eval scored the last step)
    except Exception as e:  # noqa: BLE001 - every failure must leave a record saying so
        for r in records:
            r.update(status="failed", error=f"{type(e).__name__}: {e}")
        log.error("run failed: %s\n%s", e, traceback.format_exc())
        for d, r, t in zip(run_dirs, records, trackers + [None] * (K - len(trackers))):
            _finish(d, r, t)
        raise
    return [_finish(d, r, t) for d, r, t in zip(run_dirs, records, trackers)]


# Optimizer fields a branch may change: its schedule. Everything else must equal its parent's.
_SCHEDULE_FIELDS = ("schedule", "warmup_steps", "warmup_fraction", "min_lr_ratio", "decay_fraction", "decay_shape")


def parent_dir(cfg: Config, run_dir: Path) -> Path:
    parent = Path(cfg.train.parent)
    return parent if parent.is_absolute() else Path(run_dir).parent / parent


def _fork(cfg: Config, run_dir: Path, template: TrainState, budget: Budget) -> tuple[int, TrainState, dict]:
    """A branch starts from its parent's checkpoint of step `train.branch_step`, once it is sure to continue the
    parent's trajectory: same model, data, batch, seed and optimizer, and the two learning-rate schedules equal on
    every step before the fork (a cooldown starts at or after its branch point)."""
    from omegaconf import OmegaConf

    pdir, b = parent_dir(cfg, run_dir), int(cfg.train.branch_step)
    saved = _read_json(pdir / CONFIG_FILE)
    if saved is None:
        raise ValueError(f"train.parent={cfg.train.parent!r}: {pdir} holds no run ({CONFIG_FILE} is missing); train the "
                         "parent first (a ladder sweep launches each branch after its parent), or fix the path.")
    parent = from_omegaconf(OmegaConf.merge(OmegaConf.structured(Config), saved))
    mismatch = [name for name, a, c in [
        ("model", parent.model, cfg.model), ("data", parent.data, cfg.data),
        *[(f"train.{k}", getattr(parent.train, k), getattr(cfg.train, k)) for k in ("batch_size", "grad_accum", "seed")],
        *[(f"optim.{f.name}", getattr(parent.optim, f.name), getattr(cfg.optim, f.name))
          for f in dataclasses.fields(cfg.optim) if f.name not in _SCHEDULE_FIELDS]] if a != c]
    if mismatch:
        raise ValueError(f"branch {cfg.name} differs from its parent {pdir.name} in {', '.join(mismatch)}: a branch "
                         "continues its parent's run and may change only the schedule; make these equal.")
    parent_steps = resolve_budget(parent.model, parent.train).steps
    if b > parent_steps:
        raise ValueError(f"train.branch_step={b} is beyond the last step {parent_steps} of the parent {pdir.name} "
                         f"(its D = {parent_steps * budget.tokens_per_step:.4g} tokens): plan the parent to reach "
                         "every branch point, or fork earlier.")
    steps_b = jnp.arange(b)
    lr_parent = np.asarray(jax.vmap(parent.optim.schedule_fn(parent_steps))(steps_b))
    lr_branch = np.asarray(jax.vmap(cfg.optim.schedule_fn(budget.steps))(steps_b))
    if not np.array_equal(lr_parent, lr_branch):
        s = int(np.flatnonzero(lr_parent != lr_branch)[0])
        raise ValueError(f"branch {cfg.name}'s learning rate differs from its parent's at step {s} (< branch_step "
                         f"{b}): {lr_branch[s]:.6g} vs {lr_parent[s]:.6g}. Its cooldown must start at or after the fork "
                         "(wsd: the stable phase ends at round((1 - optim.decay_fraction) * steps)) with the parent's "
                         "warmup (optim.warmup_steps).")
    ckpt_dir = pdir / "checkpoints"
    try:
        if not ckpt_dir.is_dir():
            raise CorruptCheckpointError(f"{ckpt_dir} does not exist")
        absl = logging.getLogger("absl")
        level, _ = absl.level, absl.setLevel(logging.ERROR)  # orbax warns "directory is read only": we asked for that
        try:
            with Checkpointer(ckpt_dir, parent.train.checkpoint, read_only=True) as ckpt:
                state, meta = ckpt.restore_step(b, template)
        finally:
            absl.setLevel(level)
    except CorruptCheckpointError as e:
        status = record_status(pdir)
        if status in ("diverged", "failed"):
            raise ValueError(f"parent {pdir.name} {status} before leaving a checkpoint of step {b} ({e}): branch "
                             f"{cfg.name} has nothing to start from; fix and retrain the parent, then relaunch.") from None
        raise ValueError(f"branch {cfg.name} cannot start: {e}. The parent {pdir.name} (status "
                         f"{status or 'not finished'}) must reach step {b} and keep it (train.checkpoint.keep_steps); "
                         "train the parent first.") from None
    return b, state, meta


def _evaluates(cfg: Config) -> bool:
    if cfg.eval.tasks and jax.process_count() > 1:
        log.warning("eval.tasks is ignored on %d processes (params are not addressable from one): evaluate the run "
                    "afterwards with python -m scaling.evaluate RUN_DIR", jax.process_count())
    return bool(cfg.eval.tasks) and jax.process_count() == 1


def _member(params: Any, k: int, K: int) -> Any:
    """Run k's params: K = 1 holds them plainly, a group stacks them on a leading K axis."""
    return params if K == 1 else jax.tree_util.tree_map(lambda x: x[k], params)


def _per_run(window: list, K: int, chunks: bool = False) -> list[np.ndarray]:
    """The logging window's train losses of each run (K = 1: the losses are scalars). `chunks`: each entry holds the
    losses of several steps (a leading steps axis, `chain_steps`)."""
    if chunks:
        losses = np.concatenate([np.asarray(x).reshape(len(x), -1) for x in window])
    else:
        losses = np.stack([np.atleast_1d(np.asarray(x)) for x in window])
    return [np.ascontiguousarray(losses[:, k]) for k in range(K)]


def _data_identity(data: TokenData) -> dict:
    """What the tokens are: the source's content hash and the tokenizer's identity (the token cache is keyed by them)."""
    return {"source": data.meta.get("source"), "tokenizer": data.tokenizer.identity, "train_tokens": int(len(data.train))}


def _checkpoint_meta(done: int, budget: Budget, first_K, alive_K, members: list[str], records: list[dict],
                     identity: dict) -> dict:
    diverged = [r["status"] == "diverged" for r in records]
    return {
        "tokens": done * budget.tokens_per_step,
        "data": identity,
        "members": members,
        "first_loss": [None if not math.isfinite(x) else float(x) for x in first_K],
        "alive": [bool(a) for a in alive_K],
        "diverged_step": [r["diverged_step"] if d else None for r, d in zip(records, diverged)],
        "diverged_train_loss": [r["train_loss"] if d else None for r, d in zip(records, diverged)],
    }


def _restore_meta(meta: dict, members: list[str], records: list[dict], checkpoint_dir: Path, identity: dict):
    """first losses and alive flags from a checkpoint's meta; diverged members' records restored."""
    K = len(members)
    saved = meta.get("data")  # None in checkpoints written before the data identity was stored
    if saved is not None and saved != identity:
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {identity.get(k)!r}" for k in identity if saved.get(k) != identity[k])
        raise ValueError(f"{checkpoint_dir} was trained on other data than the run's config gives now ({changed}): "
                         "resuming would continue on other tokens. Restore the original corpus / tokenizer, or start "
                         "over in a new run directory (name=...).")
    if K > 1 and meta.get("members") != members:  # a hash collision: never resume another group's models
        raise ValueError(f"checkpoint {checkpoint_dir} belongs to runs {meta['members']}, not {members}: move it away.")
    first = meta.get("first_loss")
    first = first if isinstance(first, list) else [first]  # checkpoints of one run written before groups shared the loop
    first_K = np.array([np.nan if x is None else float(x) for x in first], dtype=float)
    alive_K = np.array(meta.get("alive", [True] * K), bool)
    for k, (step_k, loss_k) in enumerate(zip(meta.get("diverged_step", [None] * K), meta.get("diverged_train_loss", [None] * K))):
        if step_k is not None:
            records[k].update(status="diverged", diverged_step=step_k, train_loss=np.nan if loss_k is None else loss_k)
    return first_K, alive_K


class _SilentTracker:
    def log(self, metrics: dict, step: int) -> None: ...
    def summary(self, values: dict) -> None: ...
    def finish(self, status: str) -> None: ...


def _finish(run_dir: Path, record: dict, tracker) -> dict:
    """Writes the record (process 0) and closes the run's tracker; returns the record as written (NaN -> null)."""
    if jax.process_index() == 0:
        record = write_record(run_dir, record)
    if tracker is not None:
        tracker.summary(summary_fields(record))
        tracker.finish(record["status"])
    return record


def _static_record(cfg: Config, budget: Budget) -> dict:
    counts = count_params(cfg.model)
    return {
        "name": cfg.name,
        "status": "running",
        "error": None,
        "diverged_step": None,
        "N": counts.non_embedding,
        "N_total": counts.total,
        "N_embedding": counts.embedding,
        "N_head": counts.head,
        "tied_embeddings": counts.tied,
        **budget.as_record(),
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.model.seq_len,
        "C": budget.C[cfg.train.flops_convention],
        "C_convention": cfg.train.flops_convention,
        # what this run trains itself: a ladder branch shares its parent's first branch_step steps (scaling.record)
        "C_spent": budget.C[cfg.train.flops_convention] * (budget.steps - (cfg.train.branch_step or 0)) / budget.steps,
        "branch": None if cfg.train.parent is None else {
            "parent": Path(cfg.train.parent).name, "step": cfg.train.branch_step,
            "tokens": cfg.train.branch_step * budget.tokens_per_step},
        "branch_points": list(cfg.train.checkpoint.keep_steps) or None,
        "flops_per_token": {c: flops_per_token(cfg.model, c) for c in FLOP_CONVENTIONS},
        "budget": _budget_spec(cfg),
        "loss": None,
        "train_loss": None,
        "sweep": cfg.sweep,
        "model": dataclasses.asdict(cfg.model),
        # what "auto" ran as on this device: the float summation order, hence the exact trajectory, depends on it
        "kernels": {"attention": resolve_attention(cfg.model.attention), "head_loss": resolve_head_loss(cfg.model)},
        "optim": dataclasses.asdict(cfg.optim),
        "seed": cfg.train.seed,
        "device_kind": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "versions": package_versions(),
        "git_commit": git_commit(),
    }


def _budget_spec(cfg: Config) -> dict:
    for kind in ("steps", "tokens", "flops"):
        value = getattr(cfg.train, kind)
        if value is not None:
            return {"kind": kind, "value": float(value), "convention": cfg.train.flops_convention if kind == "flops" else None}
    raise AssertionError("TrainConfig guarantees one budget")


def _check_same_run(cfg: Config, run_dir: Path) -> None:
    """A run directory belongs to one config: relaunching resumes it, a different config must not reuse it."""
    path = run_dir / CONFIG_FILE
    current = {k: v for k, v in to_dict(cfg).items() if k not in _RELAUNCH_FREE}
    saved = _read_json(path)
    if saved is None:
        if jax.process_index() == 0:
            write_json_atomic(path, to_dict(cfg))
        return
    # A field added since the run started (its config.json lacks it) counts as its default: old runs still resume.
    saved = {k: v for k, v in _with_defaults(saved, to_dict(Config())).items() if k not in _RELAUNCH_FREE}
    if saved != current:
        diff = sorted(_diff_keys(saved, current))
        raise ValueError(
            f"run directory {run_dir} holds a run with another config (differs in: {', '.join(diff[:8])}): "
            "give this run its own name (name=...) or hydra.run.dir=..., or delete that directory to start over."
        )


def _with_defaults(saved: Any, defaults: Any) -> Any:
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    return {**{k: v for k, v in defaults.items() if k not in saved},
            **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): move it away or delete the run directory.") from None


def _quiet_library_loggers() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'" on CPU


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from scaling.config import register_configs

    register_configs()

    # configs/ ships as the package scaling.configs (pyproject.toml): the same lookup from a checkout and from a wheel.
    @hydra.main(version_base="1.3", config_path="pkg://scaling.configs", config_name="config")
    def _app(node) -> Optional[float]:
        # Here, not before hydra.main: Hydra sets up logging per job, and joblib/submitit jobs are fresh processes.
        _quiet_library_loggers()
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            try:
                cfg = from_omegaconf(node)
                resolve_budget(cfg.model, cfg.train)
            except ValueError as e:  # refused before anything of the run is written
                _failed_start(run_dir, str(node.get("name") or run_dir.name), e, hydra_cfg.mode == RunMode.MULTIRUN)
                raise
            record = train(cfg, run_dir)
        except ValueError as e:
            # Our errors name the key / file and the fix: one line and exit 2 for a single run; a sweep's launcher
            # records the job as failed and goes on. HYDRA_FULL_ERROR=1 keeps the traceback for debugging.
            if hydra_cfg.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if record["status"] == "locked":
            print(f"[{cfg.name}] left to the process training it ({record['error']})")
            return None
        print(f"[{cfg.name}] status={record['status']} loss={record.get('loss')} N={record['N']} D={record['D']} C={record['C']:.3g}")
        return record.get("loss")

    _app()


def _failed_start(run_dir: Path, name: str, error: Exception, in_sweep: bool) -> None:
    """A sweep job refused at start-up gets a failed record (collect lists it as failed, not missing); a refused single
    run leaves nothing behind: the folder Hydra just made for it (.hydra, the log) is removed if that is all it holds."""
    if in_sweep:
        if record_status(run_dir) not in FINAL:  # never overwrite a finished run's record
            write_record(run_dir, failed_start_record(name, f"{type(error).__name__}: {error}"))
        return
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
