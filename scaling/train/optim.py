"""AdamW with learning-rate schedules, global-norm clipping and a weight-decay mask.

Schedule convention (all schedules): ``lr(0) = 0`` and the warmup ramps linearly to
``lr(warmup_steps) = lr`` (optax's own ``warmup_*`` convention). optax evaluates the schedule
at the number of updates already applied, so the very first update has lr 0: it only
initialises Adam's moment estimates from the first gradient, which is harmless and keeps
every endpoint exact. With ``warmup_steps == 0`` the schedule starts at ``lr``.
After ``num_steps`` every schedule stays at its end value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import optax

from scaling.model.mup import lr_multipliers

if TYPE_CHECKING:
    from scaling.model.decoder import ModelConfig

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
# Leaf names of the Flax linen param tree and the decay rule they follow.
_KERNEL_NAMES = frozenset({"kernel"})
_EMBEDDING_NAMES = frozenset({"embedding"})
_NORM_BIAS_NAMES = frozenset({"scale", "bias"})


@dataclass
class OptimConfig:
    lr: float = 3e-3
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" | "wsd" (warmup-stable-decay)
    warmup_steps: int | None = None  # None -> round(warmup_fraction * num_steps)
    warmup_fraction: float = 0.02
    min_lr_ratio: float = 0.1  # floor = min_lr_ratio * lr for cosine / linear / wsd end
    decay_fraction: float = 0.2  # wsd: final fraction of steps that decays (the cooldown)
    decay_shape: str = "linear"  # wsd cooldown: "linear" | "1-sqrt" (Hägele et al. 2024, Sec. 3)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (Loshchilov & Hutter 2019), multiplied by lr as in AdamW
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    grad_clip: float | None = 1.0  # global-norm clipping (Pascanu et al. 2013); None or 0 disables

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, fix: str) -> ValueError:
            return ValueError(f"optim.{name}={getattr(self, name)!r} is invalid: {fix}")

        if not self.lr > 0:
            raise bad("lr", "use a positive learning rate, e.g. optim.lr=3e-3")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool) or int(self.warmup_steps) != self.warmup_steps
            or self.warmup_steps < 0
        ):
            raise bad("warmup_steps", "use a non-negative integer, or null to use warmup_fraction")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise bad("warmup_fraction", "use a fraction in [0, 1), e.g. 0.02")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "use a ratio in [0, 1] (floor = min_lr_ratio * lr)")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise bad("decay_fraction", "use a fraction in (0, 1], e.g. 0.2 (wsd decays over the last 20%)")
        if self.decay_shape not in DECAY_SHAPES:
            raise bad("decay_shape", f"choose one of {', '.join(DECAY_SHAPES)}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "use a value in [0, 1), e.g. b1=0.9, b2=0.95")
        if not self.eps > 0:
            raise bad("eps", "use a small positive value, e.g. 1e-8")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "use a non-negative value (0 disables weight decay)")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise bad("grad_clip", "use a positive max global norm, or null/0 to disable clipping")

    def resolved_warmup(self, num_steps: int) -> int:
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(round(self.warmup_fraction * num_steps))

    def stable_end(self, num_steps: int) -> int:
        """wsd: the last step of the stable phase, where the cooldown starts (a ladder's branch point)."""
        return int(round((1.0 - self.decay_fraction) * num_steps))

    def schedule_fn(self, num_steps: int) -> optax.Schedule:
        self.validate()
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps <= 0:
            raise ValueError(f"num_steps={num_steps!r} is invalid: use a positive integer number of training steps")
        num_steps = int(num_steps)
        warmup = self.resolved_warmup(num_steps)
        if warmup > num_steps:
            raise ValueError(
                f"optim.warmup_steps={warmup} is invalid: it exceeds num_steps={num_steps}; "
                "lower optim.warmup_steps or optim.warmup_fraction"
            )
        floor = self.min_lr_ratio * self.lr
        decay_len = num_steps - warmup
        # Each phase is an optax schedule that receives the step count since its own start.
        if self.schedule == "constant":
            phases, boundaries = [optax.constant_schedule(self.lr)], []
        elif self.schedule == "cosine":
            # Cosine annealing (Loshchilov & Hutter 2017, eq. 5) from lr to the floor:
            # lr_t = floor + (lr - floor) * (1 + cos(pi * t / T)) / 2.
            phases = [optax.cosine_decay_schedule(self.lr, max(decay_len, 1), alpha=self.min_lr_ratio)]
            boundaries = []
        elif self.schedule == "linear":
            phases = [optax.linear_schedule(self.lr, floor, max(decay_len, 1))]
            boundaries = []
        else:  # wsd: warmup-stable-decay (Hu et al. 2024 "MiniCPM"; Hägele et al. 2024), linear cooldown.
            stable_end = self.stable_end(num_steps)
            if warmup > stable_end:
                raise ValueError(
                    f"optim.decay_fraction={self.decay_fraction!r} is invalid with warmup={warmup} and "
                    f"num_steps={num_steps}: the decay would start at step {stable_end}, before warmup ends; "
                    "lower optim.decay_fraction or the warmup"
                )
            phases = [optax.constant_schedule(self.lr), self._cooldown(floor, max(num_steps - stable_end, 1))]
            boundaries = [stable_end]
        if warmup > 0:
            phases = [optax.linear_schedule(0.0, self.lr, warmup)] + phases
            boundaries = [warmup] + boundaries
        if self.schedule in ("cosine", "linear") and decay_len == 0:
            # Whole run is warmup: nothing left to decay, so pin the end value to the floor.
            phases, boundaries = phases + [optax.constant_schedule(floor)], boundaries + [num_steps]
        if not boundaries:
            return phases[0]
        return optax.join_schedules(phases, boundaries)

    def _cooldown(self, floor: float, length: int) -> optax.Schedule:
        if self.decay_shape == "linear":
            return optax.linear_schedule(self.lr, floor, length)
        # "1-sqrt" (Hägele et al. 2024, Sec. 3): lr_t = floor + (lr - floor) * (1 - sqrt(t / T_cooldown)); it keeps the
        # lr high for longer and closes most of the gap to a cosine run that a linear cooldown leaves.
        lr = self.lr
        return lambda count: floor + (lr - floor) * (1.0 - jnp.sqrt(jnp.clip(count / length, 0.0, 1.0)))

    def with_lr_input(self, num_steps: int, model: "ModelConfig | None" = None
                      ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], optax.GradientTransformation]]:
        """The trainer's form of `build`: (the jitted schedule, giving each step's lr; lr -> the optimizer at that lr).
        The step takes the lr as an input, so its compiled code does not depend on the schedule
        (scaling.train.loop.train_step_fn); the optimizer state is `build(num_steps, model)`'s."""
        return jax.jit(self.schedule_fn(num_steps)), lambda lr: self.build(num_steps, model, schedule=lambda count: lr)

    def build(self, num_steps: int, model: "ModelConfig | None" = None,
              schedule: "optax.Schedule | None" = None) -> optax.GradientTransformation:
        """AdamW for `num_steps`; for a µP `model` (scaling/model/mup.py), with its per-layer Adam lr multipliers.
        `schedule` replaces `schedule_fn(num_steps)` (`with_lr_input` passes the step's lr as a constant one)."""
        schedule = self.schedule_fn(num_steps) if schedule is None else schedule
        mask = lambda params: decay_mask(params, self)  # noqa: E731
        if model is None or model.parametrization == "sp":
            adamw = optax.adamw(
                learning_rate=schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay, mask=mask
            )
        else:
            # optax.adamw's own chain (Adam, decoupled decay, -lr_t) with µP's per-layer multiplier on Adam's step:
            # a hidden kernel's Adam lr is lr_t * b/d_model (Yang et al. 2022, Table 3). The decay is added after the
            # multiplier, so every decayed leaf loses lr_t * weight_decay of itself per step at every width, as in
            # mup's MuAdamW (its hidden groups get lr / m and weight_decay * m: mup/optim.py). Decaying by the
            # layer's lr instead would stretch a hidden layer's decay timescale 1 / (lr_layer * wd) by m, so the best
            # weight_decay would drift with width; AdamW's weights are an EMA of recent updates over that timescale,
            # and keeping it fixed is what lets lr and decay transfer (Wang & Aitchison 2024, "How to set AdamW's
            # weight decay as you scale model and dataset size"; Kosson et al. 2025, "Weight Decay may matter more
            # than muP for Learning Rate Transfer in Practice", find µP's lr transfer needs a decay that does not
            # shrink with the layer's lr). Under SP (above) this chain is optax.adamw itself.
            adamw = optax.chain(
                optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps),
                scale_by_layer_lr(functools.partial(lr_multipliers, model)),
                optax.add_decayed_weights(self.weight_decay, mask),
                optax.scale_by_learning_rate(schedule),
            )
        if not self.grad_clip:
            return adamw
        # Clip before Adam so the moments see the clipped gradient (as in GPT-2/3 training code).
        return optax.chain(optax.clip_by_global_norm(self.grad_clip), adamw)


def scale_by_layer_lr(multipliers: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Multiplies each update leaf by its entry of `multipliers(updates)` (a tree of floats shaped like the updates,
    so it needs no params and no state)."""
    return optax.stateless(
        lambda updates, params=None: jax.tree_util.tree_map(lambda u, m: u * m, updates, multipliers(updates))
    )


def _leaf_name(path: tuple[Any, ...]) -> str:
    if not path:
        return ""
    key = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """Pytree of bools shaped like ``params``: True where weight decay applies.

    "kernel" leaves always decay; "embedding" iff ``cfg.decay_embeddings``; "scale"/"bias" iff
    ``cfg.decay_norms_and_biases``. Leaves with any other name follow the usual shape rule:
    matrices (ndim >= 2) decay like kernels, vectors/scalars follow the norm/bias flag.
    """

    def rule(path: tuple[Any, ...], leaf: Any) -> bool:
        name = _leaf_name(path)
        if name in _KERNEL_NAMES:
            return True
        if name in _EMBEDDING_NAMES:
            return bool(cfg.decay_embeddings)
        if name in _NORM_BIAS_NAMES:
            return bool(cfg.decay_norms_and_biases)
        return getattr(leaf, "ndim", 0) >= 2 or bool(cfg.decay_norms_and_biases)

    return jax.tree_util.tree_map_with_path(rule, params)


def learning_rate_at(cfg: OptimConfig, num_steps: int, step: int) -> float:
    """The learning rate the ``step``-th update (0-based) uses, for logging."""
    return float(cfg.schedule_fn(num_steps)(step))
