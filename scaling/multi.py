"""K models of one shape trained in one compiled step (`jax.vmap` over a stacked state): cheap learning-rate and
seed sweeps of small models, each with its own run directory, metrics.jsonl and record.json (the run-record contract).

Why it can be faster: a small model leaves a GPU mostly idle between tiny matmuls and per-op overheads; stacking K
models turns K small matmuls into one batched matmul and pays dispatch, the Python loop and the batch sampling once
per step instead of K times. Measured on the 2-core CPU it is SLOWER (0.52x at K=4, BENCHMARKS.md): XLA:CPU runs
batched dot_general far below its plain matmul speed. So a planner should group runs with `group_by_shape` on
GPU/TPU and train them one by one on CPU.

How learning rates differ without K optimizers: every schedule here is lr times a shape (warmup from 0, floor =
min_lr_ratio * lr; scaling/optim.py), and AdamW's update is linear in the step size (Loshchilov & Hutter 2019,
Algorithm 2, line 12: theta <- theta - eta_t (alpha m_hat / (sqrt(v_hat) + eps) + lambda theta)). So the optimizer is
built once with lr = 1 and model k's update is multiplied by lr_k, a scalar held in its own (vmapped) optimizer state.
Gradient clipping acts before Adam and does not involve lr. Equal to K separate runs up to float rounding (tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling.accounting import flops_per_token, peak_flops_per_device
from scaling.checkpoint import Checkpointer
from scaling.config import Config, resolve_budget, to_dict
from scaling.data import load_tokens
from scaling.model import ModelConfig, init_params, loss_fn
from scaling.optim import OptimConfig
from scaling.tracking import LoggingConfig, build_tracker, read_metrics, write_json_atomic
from scaling.train import (
    RECORD,
    _check_same_run,
    _data_record,
    _finish,
    _read_json,
    _static_record,
    _tokenizer_record,
    train_step_fn,
)

log = logging.getLogger("scaling.multi")

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


def unit_lr_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    return optax.chain(dataclasses.replace(optim, lr=1.0).build(num_steps), scale_by_model_lr())


def init_many(model: ModelConfig, optimizer: optax.GradientTransformation, seeds: Sequence[int], lrs: Sequence[float]):
    """The stacked state {"params", "opt_state"}, every leaf [K, ...]; model k starts from jax.random.key(seeds[k])."""

    def one(seed, lr):
        params = init_params(model, jax.random.key(seed))
        inner, _ = optimizer.init(params)
        return {"params": params, "opt_state": (inner, LrScaleState(lr))}

    return jax.jit(jax.vmap(one))(jnp.asarray(seeds, jnp.int32), jnp.asarray(lrs, jnp.float32))


def make_multi_step(model: ModelConfig, optimizer: optax.GradientTransformation, grad_accum: int, seed: int,
                    shared_batch: bool):
    """One jitted step for K stacked models: the single-run step of scaling.train, vmapped over the model axis.

    shared_batch: every model sees the same [A, B, L+1] batch (an lr sweep with one data seed); else [K, A, B, L+1].
    """
    step = train_step_fn(model, optimizer, grad_accum, seed)
    return jax.jit(jax.vmap(step, in_axes=(0, None if shared_batch else 0, None)), donate_argnums=(0,))


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
        raise ValueError("train_many needs at least one config.")
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


def train_many(cfgs: Sequence[Config], run_dirs: Sequence[Path]) -> list[dict]:
    """Trains K configs that differ only in lr / seed / name as one vmapped step; returns their records.

    Completed runs are skipped (their record is returned). The stacked state is checkpointed every
    `train.checkpoint.every` steps and at the end in one group directory (`group_checkpoint_dir`), so relaunching the
    same members resumes from the newest intact checkpoint; another member set gets another directory and starts
    fresh.
    """
    check_group(cfgs)
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) != len(cfgs) or len(set(run_dirs)) != len(run_dirs):
        raise ValueError(f"train_many: give one distinct run directory per config (got {len(run_dirs)} for {len(cfgs)}).")
    records: list[Any] = [None] * len(cfgs)
    todo = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        run_dir.mkdir(parents=True, exist_ok=True)
        existing = _read_json(run_dir / RECORD)
        if existing and existing.get("status") == "completed":
            records[i] = existing
        else:
            _check_same_run(cfg, run_dir)
            todo.append(i)
    if todo:
        for i, record in zip(todo, _train_group([cfgs[i] for i in todo], [run_dirs[i] for i in todo])):
            records[i] = record
    return records


def _members(run_dirs: Sequence[Path]) -> list[str]:
    """The group's identity: its run directories in order (the K axis), relative to the first one's parent."""
    parent = run_dirs[0].absolute().parent
    return [os.path.relpath(d.absolute(), parent) for d in run_dirs]


def group_checkpoint_dir(run_dirs: Sequence[Path]) -> Path:
    """`<first run dir>/../.group-<hash of the ordered member dirs>`: one directory per member set and order.

    One directory, not a slice per run dir: a group checkpoint is then one orbax save (atomic by rename), so a kill
    can never leave members at different steps. A relaunch with another member set (some finished meanwhile) hashes
    to another directory and never sees this group's checkpoints; its members' configs are pinned by their run dirs.
    """
    members = _members([Path(d) for d in run_dirs])
    digest = hashlib.sha256(json.dumps(members).encode()).hexdigest()[:16]
    return Path(run_dirs[0]).absolute().parent / f".group-{digest}"


def _nan_to_none(xs) -> list:
    return [None if not math.isfinite(x) else float(x) for x in xs]


def _none_to_nan(xs) -> np.ndarray:
    return np.array([float("nan") if x is None else x for x in xs], dtype=float)


def _train_group(cfgs: list[Config], run_dirs: list[Path]) -> list[dict]:
    cfg0, K = cfgs[0], len(cfgs)
    budget = resolve_budget(cfg0.model, cfg0.train)
    records = [_static_record(c, budget) | {"vmap_group": {"K": K, "index": k}} for k, c in enumerate(cfgs)]
    trackers: list[Any] = []
    try:
        data = load_tokens(cfg0.data)
        data.check_model_vocab(cfg0.model.vocab_size)
        data.validate_batch_shape(cfg0.train.batch_size, cfg0.model.seq_len)
        for r in records:
            r.update(tokenizer=_tokenizer_record(data), data=_data_record(data), epochs=data.epochs(budget.D))

        seeds = [c.train.seed for c in cfgs]
        shared = len(set(seeds)) == 1
        optimizer = unit_lr_optimizer(cfg0.optim, budget.steps)
        state = init_many(cfg0.model, optimizer, seeds, [c.optim.lr for c in cfgs])
        group_dir = group_checkpoint_dir(run_dirs)
        members = _members(run_dirs)
        group_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(group_dir / "members.json", {"members": members, "names": [c.name for c in cfgs]})
        checkpointer = Checkpointer(group_dir / "checkpoints", cfg0.train.checkpoint)
        restored = checkpointer.restore_latest(state)
        start_step = 0
        first = np.full(K, np.nan)
        alive = np.ones(K, bool)
        if restored is not None:
            start_step, state, meta = restored
            if meta.get("members") != members:  # a hash collision; never resume another group's models
                raise ValueError(f"group checkpoint {group_dir} belongs to members {meta.get('members')}, not {members}")
            first, alive = _none_to_nan(meta["first_loss"]), np.array(meta["alive"], bool)
            for k, (step_k, loss_k) in enumerate(zip(meta["diverged_step"], meta["diverged_train_loss"])):
                if step_k is not None:
                    records[k].update(status="diverged", diverged_step=step_k, train_loss=_none_to_nan([loss_k])[0])
            log.info("resuming vmapped group %s from step %d", group_dir, start_step)
        # One jsonl tracker per model (several wandb runs in one process are not supported here); on resume each
        # metrics.jsonl is cut back to the restored step.
        trackers = [build_tracker(LoggingConfig(backend="jsonl", progress="none"), d, to_dict(c), c.name,
                                  start_step if restored is not None else None)
                    for c, d in zip(cfgs, run_dirs)]
        step_fn = make_multi_step(cfg0.model, optimizer, cfg0.train.grad_accum, seeds[0], shared)
        eval_fn = jax.jit(jax.vmap(lambda p, b: loss_fn(p, cfg0.model, b), in_axes=(0, None)))
        A, L = cfg0.train.grad_accum, cfg0.model.seq_len
        micro = cfg0.train.batch_size // A

        def batch_at(step: int) -> jnp.ndarray:
            one = lambda s: data.train_batch(s, step, cfg0.train.batch_size, L).reshape(A, micro, L + 1)  # noqa: E731
            return jnp.asarray(one(seeds[0]) if shared else np.stack([one(s) for s in seeds]))

        t0 = time.perf_counter()
        step_fn = step_fn.lower(state, batch_at(start_step), jnp.asarray(start_step)).compile()
        compile_s = time.perf_counter() - t0
        peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg0.train.peak_flops)
        fpt, conv_fpt = flops_per_token(cfg0.model, "chinchilla"), flops_per_token(cfg0.model, cfg0.train.flops_convention)
        log_every = cfg0.logging.log_every
        train_loss_K = eval_loss_K = np.full(K, np.nan)
        window, window_t0, train_s = [], time.perf_counter(), 0.0
        group_tps = float("nan")
        lr_shape = cfg0.optim.schedule_fn(budget.steps)

        def save(done: int, force: bool) -> None:
            diverged = [r["status"] == "diverged" for r in records]
            meta = {"members": members, "tokens": done * budget.tokens_per_step, "first_loss": _nan_to_none(first),
                    "alive": [bool(a) for a in alive],
                    "diverged_step": [r["diverged_step"] if d else None for r, d in zip(records, diverged)],
                    "diverged_train_loss": [_nan_to_none([r["train_loss"]])[0] if d else None
                                            for r, d in zip(records, diverged)]}
            checkpointer.save(done, state, meta, force=force)

        for step in range(start_step, budget.steps):
            state, metrics = step_fn(state, batch_at(step), jnp.asarray(step))
            window.append(metrics["train_loss"])
            done = step + 1
            last = done == budget.steps
            if not (done % log_every == 0 or last):
                save(done, last)
                continue
            train_loss_K = np.mean(np.stack(jax.device_get(window)), axis=0)
            grad_norm_K = np.asarray(jax.device_get(metrics["grad_norm"]))
            elapsed = time.perf_counter() - window_t0
            train_s += elapsed
            tps = len(window) * budget.tokens_per_step / elapsed  # per model; the group does K times this
            group_tps = K * tps
            first = np.where(np.isnan(first), train_loss_K, first)
            evaluate_now = done % cfg0.train.eval_every == 0 or last
            if evaluate_now:
                val = [jnp.asarray(b) for b in data.val_batches(cfg0.train.eval_tokens, cfg0.train.batch_size, L)]
                eval_loss_K = np.mean([np.asarray(eval_fn(state["params"], b)) for b in val], axis=0)
            for k in np.flatnonzero(alive):
                row = {"step": done, "tokens": done * budget.tokens_per_step,
                       "flops": done * budget.tokens_per_step * conv_fpt,
                       "lr": float(cfgs[k].optim.lr * lr_shape(step) / cfg0.optim.lr),
                       "train_loss": float(train_loss_K[k]), "grad_norm": float(grad_norm_K[k]),
                       "tokens_per_s": tps, "mfu": group_tps * fpt / peak / K}
                if not math.isfinite(train_loss_K[k]) or train_loss_K[k] > cfg0.train.divergence_factor * first[k]:
                    alive[k] = False  # it keeps stepping inside the vmap (its NaNs touch no other model)
                    # Its record keeps the loss it diverged with (as scaling.train's does), not a later NaN.
                    records[k].update(status="diverged", diverged_step=done, train_loss=float(train_loss_K[k]))
                    log.error("model %s diverged at step %d", cfgs[k].name, done)
                elif evaluate_now:
                    row["eval_loss"] = float(eval_loss_K[k])
                trackers[k].log(row, done)
            window, window_t0 = [], time.perf_counter()
            if not alive.any():
                break
            save(done, last)
        checkpointer.close()
        if start_step == budget.steps:  # killed after the final checkpoint, before the records: finish, train nothing
            rows = [(read_metrics(d / "metrics.jsonl") or [{}])[-1] for d in run_dirs]
            train_loss_K = np.array([row.get("train_loss", np.nan) for row in rows], dtype=float)
            group_tps = K * float(rows[0].get("tokens_per_s", np.nan))
            val = [jnp.asarray(b) for b in data.val_batches(cfg0.train.eval_tokens, cfg0.train.batch_size, L)]
            eval_loss_K = np.mean([np.asarray(eval_fn(state["params"], b)) for b in val], axis=0)

        for k, r in enumerate(records):
            ok = r["status"] == "running"
            r.update(status="completed" if ok else r["status"], loss=float(eval_loss_K[k]) if ok else float("nan"),
                     train_loss=float(train_loss_K[k]) if ok else r.get("train_loss", float("nan")), tokens_per_s=group_tps / K, group_tokens_per_s=group_tps,
                     mfu=group_tps * fpt / peak / K, wall_s=train_s + compile_s, compile_s=compile_s)
    except Exception as e:  # noqa: BLE001 - every failure must leave records saying so
        for r in records:
            r.update(status="failed", error=f"{type(e).__name__}: {e}")
        for d, r, t in zip(run_dirs, records, trackers + [None] * (K - len(trackers))):
            _finish(d, r, t)
        raise
    for d, r, t in zip(run_dirs, records, trackers):
        _finish(d, r, t)
    return records


# A sweep's relaunch leaves these alone (scaling.sweep.FINAL): a diverged run would diverge again, bit for bit.
_FINAL = ("completed", "diverged")


def use_vmap(vmap: str | bool = "auto") -> bool:
    """`auto`: vmap on an accelerator, not on CPU (where it is slower, see the module docstring)."""
    mode = str(vmap).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"vmap={vmap!r} is invalid: use auto (on for GPU/TPU, off on CPU), true or false.")
    return jax.default_backend() != "cpu" if mode == "auto" else mode == "true"


def train_group(cfgs: Sequence[Config], run_dirs: Sequence[Path], vmap: str | bool = "auto") -> list[dict]:
    """One sweep job for runs that differ only in lr / seed (a planner's same-shape group); returns their records.

    Members that already finished (completed or diverged) are left alone, so a partly finished group trains only its
    unfinished members: as one smaller vmapped group (the models do not interact, so the result is the full group's up
    to float rounding, which a long high-lr run can amplify; a smaller group is another member set, so it restarts
    those members from step 0, while an interrupted group relaunched whole resumes from its group checkpoint), or,
    without vmap, one after another through `scaling.train.train` (checkpoints, resume). A failing member
    (sequential) is recorded and the others still train; the job then raises.
    """
    check_group(cfgs)
    run_dirs = [Path(d) for d in run_dirs]
    records: list[Any] = [(_read_json(d / RECORD) or None) for d in run_dirs]
    todo = [i for i, r in enumerate(records) if not (r and r.get("status") in _FINAL)]
    if not todo:
        return records
    if use_vmap(vmap):
        log.info("training %d runs as one vmapped step: %s", len(todo), ", ".join(cfgs[i].name for i in todo))
        for i, r in zip(todo, train_many([cfgs[i] for i in todo], [run_dirs[i] for i in todo])):
            records[i] = r
        return records
    from scaling.train import train

    errors = []
    for i in todo:
        try:
            records[i] = train(cfgs[i], run_dirs[i])
        except Exception as e:  # noqa: BLE001 - train wrote a failed record; the others still get their go
            records[i] = _read_json(run_dirs[i] / RECORD)
            errors.append(f"{cfgs[i].name}: {type(e).__name__}: {e}")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(todo)} runs of the group failed (their records say why):\n" + "\n".join(errors))
    return records
