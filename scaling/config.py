"""The typed run config: one dataclass per concern, composed here and registered in Hydra's ConfigStore.

Each concern's dataclass lives beside the code it configures (ModelConfig in model/decoder.py, DataConfig in
data/tokens.py, OptimConfig in train/optim.py, CheckpointConfig in train/checkpoint.py, LoggingConfig in train/tracking.py) and validates itself in
`__post_init__`, so `OmegaConf.to_object` fails at start-up with one error naming the key. This module adds the budget
(`TrainConfig`) and the top-level `Config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from scaling.accounting import FLOP_CONVENTIONS, flops_per_token
from scaling.train.checkpoint import CheckpointConfig
from scaling.data.tokens import DataConfig
from scaling.eval.tasks import EvalConfig
from scaling.model.decoder import ModelConfig
from scaling.train.optim import OptimConfig
from scaling.train.sharding import ShardingConfig
from scaling.train.tracking import LoggingConfig


@dataclass
class TrainConfig:
    # The budget: exactly one of steps, tokens (D) or flops (C under flops_convention).
    steps: Optional[int] = None
    tokens: Optional[float] = None
    flops: Optional[float] = None
    flops_convention: str = "chinchilla"  # the convention C is stated in; the record holds every convention
    batch_size: int = 32  # sequences per optimizer step
    grad_accum: int = 1  # microbatches per step (batch_size must divide evenly)
    seed: int = 0
    eval_every: int = 100  # steps; the final step is always evaluated
    eval_tokens: int = 65536  # fixed held-out tokens per evaluation
    divergence_factor: float = 3.0  # stop as diverged when the train loss exceeds this x its first value
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None: table, or a measured CPU probe
    # Optimizer steps per call of the compiled step (scaling.train.loop.chain_steps): up to this many run in one
    # executable, which allocates its temporaries once for all of them; the loop still stops at every logging,
    # evaluation and checkpoint step. 1: one call per step.
    steps_per_call: int = 16
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A branch (a ladder's cooldown, scaling.sweep.plan kind "ladder"): the run starts from the checkpoint of step
    # `branch_step` of the run in `parent` (a run directory; relative paths are siblings of this run's directory) and
    # trains on with its own schedule. Same model, data, batch and seed as the parent, so the branch is the run it
    # would have been from step 0, minus the steps it shares (tested bit for bit).
    parent: Optional[str] = None
    branch_step: Optional[int] = None

    def __post_init__(self) -> None:
        # "exactly one budget" is checked by check_budget (from resolve_budget), since Hydra merges a preset's
        # budget over the schema default before the user's override.
        for name in ("steps", "tokens", "flops"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"train.{name}={value!r} is invalid: the budget must be positive.")
        if self.flops_convention not in FLOP_CONVENTIONS:
            raise ValueError(f"train.flops_convention={self.flops_convention!r} is unknown: use one of {FLOP_CONVENTIONS}.")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_tokens", "steps_per_call"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:  # as ModelConfig: True is no size
                raise ValueError(f"train.{name}={value!r} is invalid: it must be a positive integer.")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}: "
                "make the batch a multiple of the number of microbatches."
            )
        if not self.divergence_factor > 1.0:
            raise ValueError(f"train.divergence_factor={self.divergence_factor!r} is invalid: it must exceed 1.")
        if (self.parent is None) != (self.branch_step is None):
            raise ValueError(f"train.parent={self.parent!r} and train.branch_step={self.branch_step!r}: a branch needs "
                             "both (the parent's run directory and the step it forks at), an ordinary run neither.")
        if self.branch_step is not None and (isinstance(self.branch_step, bool) or not isinstance(self.branch_step, int)
                                             or self.branch_step < 1):
            raise ValueError(f"train.branch_step={self.branch_step!r} is invalid: give the parent's step to fork at, "
                             "a positive integer.")
        if isinstance(self.checkpoint, dict):  # built by hand rather than by OmegaConf
            self.checkpoint = CheckpointConfig(**self.checkpoint)


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # mesh + multi-host; not part of a run's identity
    eval: EvalConfig = field(default_factory=EvalConfig)  # downstream tasks at the run's end; not part of its identity
    sweep: Optional[str] = None  # the sweep (wandb group) this run belongs to
    # JAX's persistent compilation cache (scaling.train.compile_cache): "auto" (per host CPU type under SCALING_CACHE,
    # default ~/.cache/scaling/xla), a directory, or null for none. Not part of a run's identity.
    compile_cache: Optional[str] = "auto"

    def __post_init__(self) -> None:
        if self.compile_cache is not None and not str(self.compile_cache).strip():
            raise ValueError("compile_cache='' is invalid: give a directory, auto (the default), or null to compile "
                             "without the persistent cache.")


@dataclass(frozen=True)
class Budget:
    """What a run will do, derived from its config: the facts the record and the planner share."""

    steps: int
    tokens_per_step: int
    D: int
    C: dict  # convention -> training FLOPs

    def as_record(self) -> dict:
        return {"steps": self.steps, "tokens_per_step": self.tokens_per_step, "D": self.D, **{f"C_{k}": v for k, v in self.C.items()}}


def resolve_budget(model: ModelConfig, train: TrainConfig) -> Budget:
    """steps from whichever of steps / tokens / flops was given; D and C follow from whole steps.

    Steps round up, so a run never trains on fewer tokens than asked (the record holds the exact D and C).
    """
    given = [k for k in ("steps", "tokens", "flops") if getattr(train, k) is not None]
    if len(given) != 1:
        hint = f"set the others to null, e.g. train.{given[0]}=null" if given else "e.g. train.flops=2e12"
        raise ValueError(
            f"train: give exactly one budget among train.steps, train.tokens and train.flops "
            f"(got {given or 'none'}): {hint}."
        )
    tokens_per_step = train.batch_size * model.seq_len
    if train.steps is not None:
        steps = int(train.steps)
    elif train.tokens is not None:
        steps = math.ceil(float(train.tokens) / tokens_per_step)
    else:
        tokens = float(train.flops) / flops_per_token(model, train.flops_convention)
        steps = max(1, round(tokens / tokens_per_step))
    if train.branch_step is not None and train.branch_step >= steps:
        raise ValueError(f"train.branch_step={train.branch_step} is not before the run's last step {steps} (D = "
                         f"{steps * tokens_per_step:.4g} tokens): a branch forks before its own end; raise its budget "
                         "or fork earlier.")
    D = steps * tokens_per_step
    return Budget(steps, tokens_per_step, D, {c: flops_per_token(model, c) * D for c in FLOP_CONVENTIONS})


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_omegaconf(cfg_node) -> Config:
    """Validated Config from Hydra's node: every dataclass's __post_init__ runs here, before any compilation."""
    try:
        return OmegaConf.to_object(cfg_node)
    except ValueError:
        raise
    except Exception as e:  # OmegaConf's own type errors already name the key
        raise ValueError(f"invalid config: {e}") from None


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
