"""Orbax checkpointing of the training state, with integrity checks and fallback on corruption.

Layout (orbax ``CheckpointManager``): ``<dir>/<step>/{state,meta,integrity}``. ``state`` is any
pytree of arrays (params, opt_state), ``meta`` a small JSON dict (tokens seen, seed, wandb id),
``integrity`` a per-leaf fingerprint of ``state`` computed on device at save time, so a checkpoint
whose bytes changed on disk is rejected even when tensorstore happens to decode it.

Orbax writes each step to ``<step>.orbax-checkpoint-tmp-*`` and renames it when finalized, so an
interrupted save never looks like a step; leftovers are deleted when the manager opens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
PyTree = Any


@dataclass
class CheckpointConfig:
    every: int = 200  # save when step % every == 0 (plus forced saves, e.g. the final step)
    keep: int = 3  # newest complete checkpoints kept on disk
    enabled: bool = True  # False: save() and restore_latest() are no-ops, nothing is written
    # Steps always saved and never deleted: a ladder parent's branch points (scaling.sweep.plan, kind ladder).
    keep_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("every", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(
                    f"checkpoint.{name}={v!r} is invalid: use a positive integer "
                    f"(e.g. checkpoint.{name}={CheckpointConfig.__dataclass_fields__[name].default}), "
                    "or checkpoint.enabled=false to turn checkpointing off"
                )
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in self.keep_steps):
            raise ValueError(f"checkpoint.keep_steps={list(self.keep_steps)!r} is invalid: give positive step numbers "
                             "(the steps whose checkpoints are kept for good, e.g. a ladder's branch points)")


class CorruptCheckpointError(ValueError):
    """A checkpoint step exists but cannot be restored faithfully."""


# ---------------------------------------------------------------------------------------------
# Integrity fingerprint: two wrapping uint32 sums over each leaf's raw bits (plain and
# position-weighted, so both changed and permuted values are caught). Not cryptographic; it
# guards against truncated/garbled files, not against an adversary.
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:  # 64-bit (x64 mode, complex64): split into two uint32 words
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    flat = u.reshape(-1)
    pos = jnp.arange(1, flat.shape[0] + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(flat, dtype=jnp.uint32), jnp.sum(flat * pos, dtype=jnp.uint32)])


_fingerprint_jit = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(state: PyTree) -> dict[str, list[int]]:
    """``{key path: [sum, weighted sum]}`` of every array leaf's bits (computed on device)."""
    fps = jax.device_get(_fingerprint_jit(jax.tree.map(jnp.asarray, state)))
    return {jax.tree_util.keystr(p): [int(v) for v in fp] for p, fp in jax.tree_util.tree_leaves_with_path(fps)}


def _abstract(template: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the template's shapes, dtypes and shardings."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def one(x: Any) -> jax.ShapeDtypeStruct:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
        sharding = x.sharding if isinstance(x, jax.Array) else default
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, template)


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig, read_only: bool = False) -> None:
        """`read_only`: restore only, touching nothing (a branch reads its parent's checkpoints while the parent may
        still be saving: no tmp-directory cleanup, no retention)."""
        cfg.validate()
        self.cfg = cfg
        self.directory = Path(directory).absolute()
        self._mgr: ocp.CheckpointManager | None = None
        if not cfg.enabled:
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(
                f"checkpoint directory {self.directory} exists and is not a directory: "
                "remove it or choose another run directory"
            )
        retention: dict[str, Any] = {"max_to_keep": cfg.keep}
        if cfg.keep_steps:
            policies = ocp.checkpoint_managers
            retention = {"preservation_policy": policies.AnyPreservationPolicy(
                [policies.LatestN(cfg.keep), policies.CustomSteps(sorted(int(s) for s in cfg.keep_steps))])}
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=cfg.every,
            **retention,
            create=not read_only,
            # Delete `<step>.orbax-checkpoint-tmp-*` leftovers of a save interrupted by a crash.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta", "integrity")
        )

    # -- saving ---------------------------------------------------------------------------------
    def save(self, step: int, state: PyTree, meta: dict, force: bool = False) -> bool:
        """Start an (async) save of ``state`` + ``meta`` at ``step``; True if a save was started.

        Saves when ``step % every == 0`` or ``force``; a step already on disk is never overwritten.
        """
        if self._mgr is None:
            return False
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step={step!r} is invalid: use a non-negative integer")
        step = int(step)
        # Cheap checks first: the trainer calls save() every step.
        # Our own interval test: orbax's should_save() also saves the first step a manager sees (step 1 of every run).
        if not (force or step % self.cfg.every == 0 or step in self.cfg.keep_steps) or step in self._mgr.all_steps():
            return False
        try:
            meta_json = json.loads(json.dumps(meta))  # NaN/inf allowed (a diverged loss is worth keeping)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint meta={meta!r} is not JSON-serializable ({e}): pass plain str/int/float/list/dict "
                "values (convert numpy/jax scalars with int()/float())"
            ) from None
        if not isinstance(meta_json, dict):
            raise ValueError(f"checkpoint meta={meta!r} is invalid: pass a dict")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta_json),
            integrity=ocp.args.JsonSave(fingerprint(state)),
        )
        return bool(self._mgr.save(step, args=args, force=True))

    def wait(self) -> None:
        """Block until async saves are finalized on disk."""
        if self._mgr is not None:
            self._mgr.wait_until_finished()

    def close(self) -> None:
        if self._mgr is not None:
            self._mgr.wait_until_finished()
            self._mgr.close()
            self._mgr = None

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps()) if self._mgr is not None else []

    # -- restoring ------------------------------------------------------------------------------
    def _restore_step(self, step: int, abstract: PyTree) -> tuple[PyTree, dict]:
        assert self._mgr is not None
        try:
            out = self._mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    meta=ocp.args.JsonRestore(),
                    integrity=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax/tensorstore raise many types (ValueError, FileNotFoundError, ...)
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise CorruptCheckpointError(reason[:400]) from e
        state, meta, expected = out.state, out.meta, out.integrity
        if jax.tree.structure(state) != jax.tree.structure(abstract):
            raise CorruptCheckpointError("restored tree structure differs from the template")
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CorruptCheckpointError(
                    f"leaf restored as {got.dtype}{list(got.shape)}, template wants {want.dtype}{list(want.shape)}"
                )
        if not isinstance(meta, dict):
            raise CorruptCheckpointError("meta is not a JSON object")
        actual = fingerprint(state)
        if expected != actual:
            bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
            raise CorruptCheckpointError(f"array data fails its integrity check at {', '.join(bad[:5])}")
        return state, meta

    def restore_step(self, step: int, template_state: PyTree) -> tuple[PyTree, dict]:
        """The checkpoint of exactly `step` (a ladder branch's fork point), verified; CorruptCheckpointError if it is
        missing or unreadable: a branch never starts from another step than the one it was planned at."""
        if self._mgr is None:
            raise CorruptCheckpointError(f"checkpointing is disabled for {self.directory}")
        self._mgr.reload()
        if step not in self._mgr.all_steps():
            raise CorruptCheckpointError(f"{self.directory} has no checkpoint of step {step} "
                                         f"(it has steps {sorted(self._mgr.all_steps())})")
        return self._restore_step(step, _abstract(template_state))

    def restore_latest(self, template_state: PyTree) -> tuple[int, PyTree, dict] | None:
        """Restore the newest checkpoint that reads back intact; None when there is none.

        A corrupt newer step is reported with a warning and skipped; once an older step restores,
        the skipped ones are renamed ``<step>.corrupt`` (kept for inspection, invisible to orbax)
        so the resumed run can save those step numbers again. If every step fails (which may
        also mean the template does not match the saved state), nothing is renamed and a
        ``CorruptCheckpointError`` lists each step's reason.
        """
        if self._mgr is None:
            return None
        self._mgr.reload()
        steps = sorted(self._mgr.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = _abstract(template_state)
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, meta = self._restore_step(step, abstract)
            except CorruptCheckpointError as e:
                msg = f"checkpoint step {step} in {self.directory} is unreadable ({e})"
                warnings.warn(msg + "; falling back to the previous checkpoint", RuntimeWarning, stacklevel=2)
                log.warning(msg)
                failures.append((step, str(e)))
                continue
            for bad_step, _ in failures:
                self._quarantine(bad_step)
            return step, state, meta
        detail = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise CorruptCheckpointError(
            f"no checkpoint in {self.directory} could be restored ({detail}). If the model/optimizer "
            "config changed, restore with the original config; otherwise move the directory away to start fresh"
        )

    def _quarantine(self, step: int) -> None:
        src = self.directory / str(step)
        if not src.exists():
            return
        dst = self.directory / f"{step}.corrupt"
        n = 1
        while dst.exists():
            dst, n = self.directory / f"{step}.corrupt{n}", n + 1
        os.replace(src, dst)
        log.warning("moved corrupt checkpoint %s to %s", src, dst)
        assert self._mgr is not None
        self._mgr.reload()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def num_bytes(state: PyTree) -> int:
    """Total bytes of the arrays in ``state`` (for logging checkpoint size)."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
