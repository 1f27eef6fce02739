"""One training run: `python -m scaling.train [overrides]` (Hydra), or `train(cfg, run_dir)` from a notebook.

The loop in `train` reads top to bottom: resolve the budget, load tokens, init or resume, then for each step take the
batch that is a pure function of (seed, step), update, log, evaluate, checkpoint; finally write record.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling.accounting import FLOP_CONVENTIONS, count_params, flops_per_token, peak_flops_per_device
from scaling.checkpoint import Checkpointer
from scaling.config import Budget, Config, resolve_budget, to_dict
from scaling.data import TokenData, load_tokens
from scaling.model import ModelConfig, init_params, loss_fn
from scaling.sharding import check_batch, constrain, initialize_distributed, init_sharded, make_mesh, put_batch, state_shardings
from scaling.tracking import Progress, build_tracker, read_metrics, write_json_atomic

log = logging.getLogger("scaling.train")

RECORD = "record.json"
CONFIG = "config.json"
# Fields that may change between a run and its relaunch without making it another run.
_RELAUNCH_FREE = ("logging", "sweep", "sharding")  # orbax restores a checkpoint onto any mesh


# {"params": ..., "opt_state": ...}: a plain dict, so a pytree for jit, orbax and the tests.
TrainState = dict

def make_train_step(
    model: ModelConfig, optimizer: optax.GradientTransformation, grad_accum: int, seed: int, shardings: Any = None
):
    """A jit-compiled step that donates the old state's buffers (see `train_step_fn`)."""
    return jax.jit(train_step_fn(model, optimizer, grad_accum, seed, shardings), donate_argnums=(0,))


def train_step_fn(
    model: ModelConfig, optimizer: optax.GradientTransformation, grad_accum: int, seed: int, shardings: Any = None
):
    """The pure step: `grad_accum` microbatches are scanned and their mean gradient applied once.

    The mean of microbatch means equals the big batch's mean loss (equal-size microbatches), so the update is the
    big batch's up to float summation order (tested). `shardings` (the state's, from scaling.sharding) pins the
    gradients and the new state to the params' layout: under FSDP the gradient all-reduce becomes a reduce-scatter.
    scaling.multi vmaps this same function over K models.
    """
    param_shardings = None if shardings is None else shardings["params"]

    def step_fn(state: TrainState, batch_AxBxLp1: jnp.ndarray, step: jnp.ndarray):
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
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = TrainState(params=optax.apply_updates(params, updates), opt_state=opt_state)
        new_state = constrain(new_state, shardings)
        return new_state, {"train_loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}

    return step_fn


def evaluate(eval_step, params, data: TokenData, cfg: Config, mesh=None) -> float:
    batches = data.val_batches(cfg.train.eval_tokens, cfg.train.batch_size, cfg.model.seq_len)
    put = jnp.asarray if mesh is None else (lambda b: put_batch(b, mesh, batch_axis=0))
    return float(np.mean([float(eval_step(params, put(b))) for b in batches]))


def train(cfg: Config, run_dir: Path) -> dict:
    """Trains (or resumes, or skips a completed) run in `run_dir`; returns its record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    initialize_distributed(cfg.sharding)  # a no-op on one host
    existing = _read_json(run_dir / RECORD)
    if existing and existing.get("status") in ("completed", "diverged"):  # deterministic: retraining repeats it
        log.info("run %s already %s: nothing to train (delete record.json to retrain)", run_dir, existing["status"])
        return existing
    _check_same_run(cfg, run_dir)

    budget = resolve_budget(cfg.model, cfg.train)
    record = _static_record(cfg, budget)
    tracker = None
    try:
        data = load_tokens(cfg.data)
        data.check_model_vocab(cfg.model.vocab_size)
        data.validate_batch_shape(cfg.train.batch_size, cfg.model.seq_len)
        record.update(tokenizer=_tokenizer_record(data), data=_data_record(data))
        record["epochs"] = data.epochs(budget.D)

        mesh = make_mesh(cfg.sharding)  # one device or many: the same code below
        check_batch(mesh, cfg.train.batch_size, cfg.train.grad_accum)
        record["n_devices"] = mesh.size
        optimizer = cfg.optim.build(budget.steps)

        def init_state() -> TrainState:
            params = init_params(cfg.model, jax.random.key(cfg.train.seed))
            return TrainState(params=params, opt_state=optimizer.init(params))

        state, shardings = init_sharded(init_state, lambda s: state_shardings(s, mesh, cfg.sharding))
        checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.checkpoint)
        restored = checkpointer.restore_latest(state)
        start_step, first_loss = 0, None
        if restored is not None:
            start_step, state, meta = restored
            first_loss = meta.get("first_loss")
            log.info("resuming %s from step %d", run_dir, start_step)
        tracker = (
            build_tracker(cfg.logging, run_dir, to_dict(cfg), cfg.name, start_step if restored else None)
            if jax.process_index() == 0
            else _SilentTracker()  # multi-host: one process writes metrics, wandb and the record
        )
        tracker.summary(_summary_fields(record))

        micro = cfg.train.batch_size // cfg.train.grad_accum
        train_step = make_train_step(cfg.model, optimizer, cfg.train.grad_accum, cfg.train.seed, shardings)
        eval_step = jax.jit(lambda params, batch_BxLp1: loss_fn(params, cfg.model, batch_BxLp1))

        def batch_at(step: int) -> jnp.ndarray:
            tokens_BxLp1 = data.train_batch(cfg.train.seed, step, cfg.train.batch_size, cfg.model.seq_len)
            return put_batch(tokens_BxLp1.reshape(cfg.train.grad_accum, micro, cfg.model.seq_len + 1), mesh, batch_axis=1)

        t0 = time.perf_counter()
        train_step = train_step.lower(state, batch_at(start_step), jnp.asarray(start_step)).compile()
        compile_s = time.perf_counter() - t0
        record["compile_s"] = compile_s

        peak = peak_flops_per_device(jax.devices()[0].device_kind, cfg.train.peak_flops) * mesh.size
        fpt = flops_per_token(cfg.model, "chinchilla")
        conv_fpt = flops_per_token(cfg.model, cfg.train.flops_convention)
        lr_at = cfg.optim.schedule_fn(budget.steps)  # built once, not at every logged step
        log_every = cfg.logging.log_every
        window: list[jnp.ndarray] = []
        window_t0, window_steps = time.perf_counter(), 0
        train_s = 0.0
        tokens_per_s = mfu = float("nan")
        eval_loss = float("nan")
        train_loss = float("nan")
        status = "completed"
        progress = Progress(cfg.logging, budget.steps, start_step)

        for step in range(start_step, budget.steps):
            state, metrics = train_step(state, batch_at(step), jnp.asarray(step))
            window.append(metrics["train_loss"])
            window_steps += 1
            done = step + 1
            last = done == budget.steps
            if done % log_every == 0 or last:
                train_loss = float(np.mean(jax.device_get(window)))
                elapsed = time.perf_counter() - window_t0
                train_s += elapsed
                tokens_per_s = window_steps * budget.tokens_per_step / elapsed
                mfu = tokens_per_s * fpt / peak
                first_loss = first_loss if first_loss is not None else train_loss
                row = {
                    "step": done,
                    "tokens": done * budget.tokens_per_step,
                    "flops": done * budget.tokens_per_step * conv_fpt,
                    "lr": float(lr_at(step)),
                    "train_loss": train_loss,
                    "grad_norm": float(metrics["grad_norm"]),
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                }
                if not math.isfinite(train_loss) or train_loss > cfg.train.divergence_factor * first_loss:
                    status = "diverged"
                    record["diverged_step"] = done
                    tracker.log(row, done)
                    log.error("run diverged at step %d: train loss %s (first %.4f)", done, train_loss, first_loss)
                    break
                if done % cfg.train.eval_every == 0 or last:
                    eval_loss = evaluate(eval_step, state["params"], data, cfg, mesh)
                    row["eval_loss"] = eval_loss
                tracker.log(row, done)
                progress.update(done, train_loss, tokens_per_s)
                window, window_t0, window_steps = [], time.perf_counter(), 0
            meta = {"tokens": done * budget.tokens_per_step, "first_loss": first_loss}
            checkpointer.save(done, state, meta, force=last)
        checkpointer.close()
        progress.close()
        if start_step == budget.steps:  # killed after the final checkpoint, before the record: finish it, train nothing
            last_row = (read_metrics(run_dir / "metrics.jsonl") or [{}])[-1]
            train_loss, tokens_per_s, mfu = (last_row.get(k, float("nan")) for k in ("train_loss", "tokens_per_s", "mfu"))
            eval_loss = evaluate(eval_step, state["params"], data, cfg, mesh)

        record.update(
            status=status,
            loss=eval_loss if status == "completed" else float("nan"),
            train_loss=train_loss,
            tokens_per_s=tokens_per_s,
            mfu=mfu,
            wall_s=train_s + compile_s,
        )
    except Exception as e:  # noqa: BLE001 - every failure must leave a record saying so
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        log.error("run failed: %s\n%s", e, traceback.format_exc())
        _finish(run_dir, record, tracker)
        raise
    _finish(run_dir, record, tracker)
    return record


class _SilentTracker:
    def log(self, metrics: dict, step: int) -> None: ...
    def summary(self, values: dict) -> None: ...
    def finish(self, status: str) -> None: ...


def _finish(run_dir: Path, record: dict, tracker) -> None:
    if jax.process_index() == 0:
        write_json_atomic(run_dir / RECORD, _jsonable(record))
    if tracker is not None:
        tracker.summary(_summary_fields(record))
        tracker.finish(record["status"])


def _summary_fields(record: dict) -> dict:
    keys = ("N", "N_total", "D", "C", "C_convention", "loss", "train_loss", "status", "tokens_per_s", "mfu")
    return {k: record[k] for k in keys if k in record}


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
        "flops_per_token": {c: flops_per_token(cfg.model, c) for c in FLOP_CONVENTIONS},
        "budget": _budget_spec(cfg),
        "sweep": cfg.sweep,
        "model": dataclasses.asdict(cfg.model),
        "optim": dataclasses.asdict(cfg.optim),
        "seed": cfg.train.seed,
        "device_kind": jax.devices()[0].device_kind,
        "n_devices": jax.device_count(),
        "versions": _versions(),
        "git_commit": _git_commit(),
    }


def _tokenizer_record(data: TokenData) -> dict:
    tok = data.tokenizer
    return {"name": tok.name, "identity": tok.identity, "vocab_size": tok.n_vocab}


def _data_record(data: TokenData) -> dict:
    meta = {k: v for k, v in data.meta.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {**meta, "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val))}


def _budget_spec(cfg: Config) -> dict:
    for kind in ("steps", "tokens", "flops"):
        value = getattr(cfg.train, kind)
        if value is not None:
            return {"kind": kind, "value": float(value), "convention": cfg.train.flops_convention if kind == "flops" else None}
    raise AssertionError("TrainConfig guarantees one budget")


def _check_same_run(cfg: Config, run_dir: Path) -> None:
    """A run directory belongs to one config: relaunching resumes it, a different config must not reuse it."""
    path = run_dir / CONFIG
    current = {k: v for k, v in to_dict(cfg).items() if k not in _RELAUNCH_FREE}
    saved = _read_json(path)
    if saved is None:
        if jax.process_index() == 0:
            write_json_atomic(path, to_dict(cfg))
        return
    saved = {k: v for k, v in saved.items() if k not in _RELAUNCH_FREE}
    if saved != current:
        diff = sorted(_diff_keys(saved, current))
        raise ValueError(
            f"run directory {run_dir} holds a run with another config (differs in: {', '.join(diff[:8])}): "
            "give this run its own name (name=...) or hydra.run.dir=..., or delete that directory to start over."
        )


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


def _jsonable(obj: Any) -> Any:
    """Plain JSON: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tiktoken", "wandb", "hydra-core", "numpy")


def _versions() -> dict:
    out = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _quiet_library_loggers() -> None:
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'" on CPU


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from scaling.config import from_omegaconf, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent.parent / "configs"), config_name="config")
    def _app(node) -> Optional[float]:
        # Here, not before hydra.main: Hydra sets up logging per job, and joblib/submitit jobs are fresh processes.
        _quiet_library_loggers()
        cfg = from_omegaconf(node)
        record = train(cfg, Path(HydraConfig.get().runtime.output_dir))
        print(f"[{cfg.name}] status={record['status']} loss={record.get('loss')} N={record['N']} D={record['D']} C={record['C']:.3g}")
        return record.get("loss")

    _app()


if __name__ == "__main__":
    main()
