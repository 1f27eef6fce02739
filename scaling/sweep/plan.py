"""Budget -> runs: IsoFLOP grids (Chinchilla Approach 2), size x tokens grids and learning-rate sweeps, from a family
and a hyperparameter rule.

A pure function of its inputs (no JAX, no files): `plan_sweep(spec, base_model, convention)` returns the runs, each with
its Hydra overrides, its exact N, D and C (from `scaling.accounting` / `scaling.config.resolve_budget`, the one home of
those facts) and how far it lands from its nominal budget. `scaling.sweep.schedule` and the Hydra sweeper launch what it returns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from scaling.accounting import FLOP_CONVENTIONS, count_params, flops_per_token
from scaling.config import TrainConfig, resolve_budget
from scaling.model.decoder import ModelConfig
from scaling.train.optim import DECAY_SHAPES, OptimConfig

PLAN_KINDS = ("isoflop", "grid", "lr", "ladder")
N_CONVENTIONS = ("non_embedding", "total")  # the N that plan.sizes, prior_fit and tokens_per_param are read in


@dataclass
class FamilyRule:
    """Target N -> a valid shape: width in steps of `d_model_multiple`, a fixed head size, depth from an aspect ratio.

    Kaplan et al. 2020 (Sec. 3.1, Fig. 5) find loss depends weakly on shape at fixed N for d_model/n_layers in roughly
    [20, 200], so one ratio per family keeps the sweep one-dimensional in N without costing loss.
    """

    head_dim: int = 16  # n_heads = d_model / head_dim
    aspect_ratio: float = 32.0  # d_model / n_layers
    d_model_multiple: int = 16  # widths are multiples of this (and of head_dim)
    min_d_model: int = 32
    max_d_model: int = 4096
    min_layers: int = 1
    max_layers: int = 64
    ff_ratio: int = 4  # d_ff = ff_ratio * d_model (Radford et al. 2018)

    def __post_init__(self) -> None:
        for name in ("head_dim", "d_model_multiple", "min_d_model", "max_d_model", "min_layers", "max_layers", "ff_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"family.{name}={value!r} is invalid: it must be a positive integer.")
        if self.d_model_multiple % self.head_dim:
            raise ValueError(
                f"family.d_model_multiple={self.d_model_multiple} is not a multiple of family.head_dim={self.head_dim}: "
                "every width must split into whole heads, e.g. d_model_multiple=head_dim."
            )
        if not self.aspect_ratio > 0:
            raise ValueError(f"family.aspect_ratio={self.aspect_ratio!r} is invalid: use a positive d_model/n_layers, e.g. 32.")
        if self.max_d_model < max(self.min_d_model, self.d_model_multiple) or self.max_layers < self.min_layers:
            raise ValueError(
                f"family: the ranges d_model [{self.min_d_model}, {self.max_d_model}] / layers "
                f"[{self.min_layers}, {self.max_layers}] are empty: make each max >= its min."
            )

    def shapes(self, base: ModelConfig) -> list[ModelConfig]:
        """Every shape of the family, in increasing N (depth never decreases with width)."""
        start = max(self.min_d_model, self.d_model_multiple)
        start += -start % self.d_model_multiple
        out = []
        for d in range(start, self.max_d_model + 1, self.d_model_multiple):
            layers = min(self.max_layers, max(self.min_layers, math.floor(d / self.aspect_ratio + 0.5)))
            out.append(base.replace(d_model=d, n_layers=layers, n_heads=d // self.head_dim, d_ff=self.ff_ratio * d))
        return out


@dataclass
class HyperRule:
    """Batch size, learning rate and schedule as functions of the run's width and budget.

    lr = base_lr * (base_d_model / d_model)^lr_width_exponent * (B / base_batch)^lr_batch_exponent:
      width: Adam's hidden-layer lr scales as 1/width under muP (Yang et al. 2022, "Tensor Programs V", Table 3);
        with model.parametrization=mup that scaling is already in the optimizer, per layer (scaling/model/mup.py), so
        set lr_width_exponent=0 there (and model.mup_base_d_model = base_d_model), or the width is counted twice;
      batch: the square-root rule for Adam (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
      Algorithms", Sec. 3: lr ~ sqrt(B)).
    B = base_batch * (C / base_flops)^batch_flops_exponent, rounded to a power of two: the optimal batch grows with
      compute, B_opt ~ C^0.3271 (Bi et al. 2024, DeepSeek LLM, Eq. 1); 0 keeps it fixed.
    Warmup is a fraction of the run and the cosine decays to the run's last step: the cycle length should match the
      run (Hoffmann et al. 2022, Appendix B, Fig. A1), so runs of every length are fairly trained. `warmup_steps`
      instead fixes the warmup in steps for every run: a ladder's branches share their parent's warmup, which as a
      fraction of its shortest branch can be a handful of steps, and runs that test a ladder should warm up alike.
    """

    base_lr: float = 3e-3
    base_d_model: int = 128
    lr_width_exponent: float = 1.0
    base_batch: int = 32  # sequences
    lr_batch_exponent: float = 0.5
    base_flops: float = 1e12
    batch_flops_exponent: float = 0.0
    min_batch: int = 4
    max_batch: int = 512
    min_steps: int = 50  # the batch is halved (down to min_batch) until a run has this many steps
    warmup_fraction: float = 0.05
    warmup_steps: Optional[int] = None  # a fixed warmup for every run instead of warmup_fraction of each
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        for name in ("base_lr", "base_flops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"hyper.{name}={getattr(self, name)!r} is invalid: it must be positive.")
        for name in ("base_d_model", "base_batch", "min_batch", "max_batch", "min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"hyper.{name}={value!r} is invalid: it must be a positive integer.")
        if self.min_batch > self.max_batch:
            raise ValueError(f"hyper.min_batch={self.min_batch} exceeds hyper.max_batch={self.max_batch}: swap or widen them.")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"hyper.warmup_fraction={self.warmup_fraction!r} is invalid: use a fraction in [0, 1), e.g. 0.05.")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int)
                                              or self.warmup_steps < 0):
            raise ValueError(f"hyper.warmup_steps={self.warmup_steps!r} is invalid: use a non-negative integer number of "
                             "steps, or null for hyper.warmup_fraction of each run.")

    def batch_size(self, C: float) -> int:
        raw = self.base_batch * (C / self.base_flops) ** self.batch_flops_exponent
        return int(min(self.max_batch, max(self.min_batch, 2 ** round(math.log2(raw)))))

    def lr(self, d_model: int, batch_size: int) -> float:
        return (
            self.base_lr
            * (self.base_d_model / d_model) ** self.lr_width_exponent
            * (batch_size / self.base_batch) ** self.lr_batch_exponent
        )


@dataclass
class SweepSpec:
    """What to plan. isoflop: `budgets` (C in the sweep's FLOP convention); grid: `sizes` (target N) x `tokens` (D) or
    x `tokens_per_param` (D = r N); lr: every shape (`sizes`, or the base model's own shape when empty) x budget
    (`budgets` C or `tokens` D) trained at each of `lrs` (absolute) or `lr_multipliers` (x the hyper rule's lr)."""

    kind: str = "isoflop"
    budgets: list[float] = field(default_factory=list)
    n_sizes: int = 7  # IsoFLOP sizes per budget (Chinchilla Approach 2 used ~9)
    size_step: float = 1.6  # ratio of neighbouring target N, i.e. even spacing in log N
    tokens_per_param: float = 20.0  # the prior optimum D/N (Hoffmann et al. 2022, Table 3: ~20 tokens per parameter)
    prior_fit: Optional[list[float]] = None  # [G, a]: N_opt = G * C^a from an earlier fit, instead of the ratio
    sizes: list[float] = field(default_factory=list)  # grid: target N (non-embedding)
    tokens: list[float] = field(default_factory=list)  # grid: D per size
    grid_tokens_per_param: list[float] = field(default_factory=list)  # grid: D = r * N for each r
    lrs: list[float] = field(default_factory=list)  # lr: absolute learning rates
    lr_multipliers: list[float] = field(default_factory=list)  # lr: factors on hyper.lr(d_model, batch)
    tolerance: float = 0.02  # max |achieved / nominal - 1| of C (isoflop, lr) or D (grid)
    # Every planned run once per seed (train.seed=s, name suffix -s<s>): replicates from which analysis estimates each
    # point's seed noise (analysis.checks.seeds). Empty: one run per point, with the config's own train.seed.
    seeds: list[int] = field(default_factory=list)
    # ladder: the cooldown of each branch, as a fraction of its own steps (Hägele et al. 2024 find 20% matches a cosine
    # run to the same length), and its shape (optim.decay_shape: linear or 1-sqrt)
    cooldown_fraction: float = 0.2
    cooldown_shape: str = "linear"
    # ladder with budgets: draw every budget's sizes from one grid (size_step apart, anchored at the largest budget's
    # prior optimum) instead of centring each budget's grid on its own optimum. A shape then lies on every budget line
    # whose window holds it and one parent serves all its branches, so budgets closer than size_step cost little more
    # than their cooldowns; per-budget grids shift with C^a and mostly land on new widths.
    shared_sizes: bool = False
    prefix: Optional[str] = None  # run-name prefix; default: the kind
    # The N in which sizes, prior_fit, tokens_per_param, grid_tokens_per_param and size_step are read: non_embedding
    # (Kaplan et al. 2020) or total parameters, e.g. to centre a grid with a fit made in total N (analysis predict
    # --n-convention total); every record carries both counts either way.
    n_convention: str = "non_embedding"
    family: FamilyRule = field(default_factory=FamilyRule)
    hyper: HyperRule = field(default_factory=HyperRule)

    def __post_init__(self) -> None:
        if isinstance(self.family, dict):
            self.family = FamilyRule(**_known("plan.family", FamilyRule, self.family))
        if isinstance(self.hyper, dict):
            self.hyper = HyperRule(**_known("plan.hyper", HyperRule, self.hyper))
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"plan.kind={self.kind!r} is unknown: use one of {PLAN_KINDS}.")
        if self.n_convention not in N_CONVENTIONS:
            raise ValueError(f"plan.n_convention={self.n_convention!r} is unknown: use one of {N_CONVENTIONS} (the N "
                             "that plan.sizes, prior_fit and tokens_per_param are in).")
        if self.kind == "isoflop":
            if not self.budgets or any(not float(c) > 0 for c in self.budgets):
                raise ValueError(f"plan.budgets={self.budgets!r} is invalid: give positive FLOP budgets, e.g. [1e11,3e11,1e12].")
            if not 1 <= self.n_sizes <= 15:
                raise ValueError(f"plan.n_sizes={self.n_sizes!r} is invalid: use 5-9 sizes per budget (1-15 allowed).")
            if not self.size_step > 1:
                raise ValueError(f"plan.size_step={self.size_step!r} is invalid: the ratio of neighbouring N must exceed 1, e.g. 1.6.")
            if self.prior_fit is not None and (len(self.prior_fit) != 2 or not self.prior_fit[0] > 0):
                raise ValueError(f"plan.prior_fit={self.prior_fit!r} is invalid: give [G, a] with N_opt = G * C^a, G > 0.")
            if not self.tokens_per_param > 0:
                raise ValueError(f"plan.tokens_per_param={self.tokens_per_param!r} is invalid: it must be positive, e.g. 20.")
        elif self.kind == "ladder":
            if bool(self.budgets) == bool(self.sizes):
                raise ValueError(
                    "plan: a ladder needs exactly one of plan.budgets (IsoFLOP budgets: each size's branches are its "
                    "points on the budget lines) and plan.sizes with plan.tokens or plan.grid_tokens_per_param, got "
                    f"budgets={self.budgets!r}, sizes={self.sizes!r}.")
            if self.sizes and bool(self.tokens) == bool(self.grid_tokens_per_param):
                raise ValueError("plan: a ladder over sizes needs exactly one of plan.tokens (D values) and "
                                 "plan.grid_tokens_per_param (D/N ratios).")
            if any(not float(x) > 0 for x in [*self.budgets, *self.sizes, *self.tokens, *self.grid_tokens_per_param]):
                raise ValueError("plan.budgets / sizes / tokens / grid_tokens_per_param must all be positive.")
            if not 0.0 < self.cooldown_fraction < 1.0:
                raise ValueError(f"plan.cooldown_fraction={self.cooldown_fraction!r} is invalid: use a fraction of each "
                                 "branch in (0, 1), e.g. 0.2 (Hägele et al. 2024).")
            if self.cooldown_shape not in DECAY_SHAPES:
                raise ValueError(f"plan.cooldown_shape={self.cooldown_shape!r} is unknown: use one of {DECAY_SHAPES}.")
            if self.shared_sizes and not self.budgets:
                raise ValueError("plan.shared_sizes=true draws each budget's sizes from one grid: it needs plan.budgets "
                                 "(a ladder over plan.sizes already shares its sizes).")
        elif self.kind == "lr":
            if bool(self.budgets) == bool(self.tokens):
                raise ValueError(
                    "plan: an lr sweep needs exactly one of plan.budgets (C values) and plan.tokens (D values), "
                    f"got budgets={self.budgets!r}, tokens={self.tokens!r}."
                )
            if bool(self.lrs) == bool(self.lr_multipliers):
                raise ValueError(
                    "plan: an lr sweep needs exactly one of plan.lrs (e.g. [1e-3,3e-3,1e-2]) and plan.lr_multipliers "
                    f"(e.g. [0.5,1,2], times the hyper rule's lr), got lrs={self.lrs!r}, lr_multipliers={self.lr_multipliers!r}."
                )
            if any(not float(x) > 0 for x in [*self.budgets, *self.tokens, *self.sizes, *self.lrs, *self.lr_multipliers]):
                raise ValueError("plan.budgets / tokens / sizes / lrs / lr_multipliers must all be positive.")
        else:
            if not self.sizes or any(not float(n) > 0 for n in self.sizes):
                raise ValueError(f"plan.sizes={self.sizes!r} is invalid: give positive target N, e.g. [1e5,4e5].")
            if bool(self.tokens) == bool(self.grid_tokens_per_param):
                raise ValueError(
                    "plan: a grid needs exactly one of plan.tokens (D values) and plan.grid_tokens_per_param (D/N ratios), "
                    f"got tokens={self.tokens!r}, grid_tokens_per_param={self.grid_tokens_per_param!r}."
                )
            if any(not float(x) > 0 for x in [*self.tokens, *self.grid_tokens_per_param]):
                raise ValueError("plan.tokens / plan.grid_tokens_per_param must all be positive.")
        if self.shared_sizes and self.kind != "ladder":
            raise ValueError(f"plan.shared_sizes=true applies to plan.kind=ladder only (got {self.kind!r}): separate "
                             "runs share no training, so a shared grid would save nothing: set plan.shared_sizes=false.")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"plan.tolerance={self.tolerance!r} is invalid: use a fraction in (0, 1), e.g. 0.02.")
        self.seeds = list(self.seeds or [])
        if (any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds)
                or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"plan.seeds={self.seeds!r} is invalid: give distinct non-negative integers, e.g. "
                             "plan.seeds=[0,1,2] (each run is trained once per seed), or [] for one run per point.")


    @classmethod
    def from_dict(cls, values: dict) -> "SweepSpec":
        """From `hydra.sweeper.plan`: an unknown key (a typo) is one clear error naming it, not a TypeError."""
        return cls(**_known("plan", cls, dict(values)))


def _known(where: str, cls: type, values: dict) -> dict:
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(fields)} "
                         f"(e.g. hydra.sweeper.{where}.{fields[1]}=...).")
    return values


@dataclass(frozen=True)
class PlannedRun:
    name: str
    kind: str  # "flops" or "tokens": how the trainer is told the budget
    budget: Optional[float]  # the nominal C of the IsoFLOP slice (None for a grid run)
    target_N: float
    N: int  # non-embedding (Kaplan), as in the record
    N_total: int
    D: int
    steps: int
    batch_size: int
    C: dict  # convention -> achieved training FLOPs
    budget_error: float  # achieved / nominal - 1 (C for isoflop, D for grid)
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    lr: float
    warmup_fraction: float
    schedule: str
    nominal: float  # what the trainer is asked for: C (kind flops) or D (kind tokens)
    # Runs with equal `group` differ only in lr / seed (an lr sweep's runs of one shape and budget, a run's seed
    # replicates): one vmapped step can train them (scaling.train.stack.FREE_FIELDS). Other runs are groups of their own.
    group: str = ""
    seed: Optional[int] = None  # train.seed of a seed replicate (plan.seeds); None: the config's own seed
    # Ladders (plan kind "ladder"): a parent trains the stable phase and keeps `keep_steps`; a branch forks from
    # `parent` at `branch_step` and cools down over its last `decay_fraction` of steps. Both share `warmup_steps`.
    role: str = ""  # "" | "parent" | "branch"
    parent: Optional[str] = None
    branch_step: Optional[int] = None
    keep_steps: tuple = ()
    warmup_steps: Optional[int] = None
    decay_fraction: Optional[float] = None
    decay_shape: Optional[str] = None

    def overrides(self) -> list[str]:
        """Hydra overrides that make the trainer run exactly this (its own resolve_budget gives the same steps)."""
        budget = (
            [f"train.flops={self.nominal!r}", "train.tokens=null"]
            if self.kind == "flops"
            else [f"train.tokens={self.nominal!r}", "train.flops=null"]
        )
        return [
            f"name={self.name}",
            f"model.d_model={self.d_model}",
            f"model.n_layers={self.n_layers}",
            f"model.n_heads={self.n_heads}",
            f"model.d_ff={self.d_ff}",
            f"train.batch_size={self.batch_size}",
            "train.steps=null",
            *budget,
            f"optim.lr={self.lr:.6g}",
            f"optim.schedule={self.schedule}",
            f"optim.warmup_fraction={self.warmup_fraction}",
            f"optim.warmup_steps={'null' if self.warmup_steps is None else self.warmup_steps}",
            *([f"optim.decay_fraction={self.decay_fraction!r}", f"optim.decay_shape={self.decay_shape}"]
              if self.decay_fraction is not None else []),
            *([f"train.parent={self.parent}", f"train.branch_step={self.branch_step}"] if self.parent else []),
            *([f"train.checkpoint.keep_steps=[{','.join(map(str, self.keep_steps))}]"] if self.keep_steps else []),
            *([f"train.seed={self.seed}"] if self.seed is not None else []),
        ]

    def tags(self) -> list[str]:
        size = f"N{fmt_sci(self.N)}"
        unreplicated = self.name if self.seed is None else self.name.removesuffix(f"-s{self.seed}")
        lr = [f"lr{fmt_sci(self.lr, 2)}"] if self.group and self.group != unreplicated else []  # an lr sweep's run
        budget = [f"C{fmt_sci(self.budget)}"] if self.budget else [f"D{fmt_sci(self.D)}"]
        seed = [f"s{self.seed}"] if self.seed is not None else []
        return budget + [size, f"d{self.d_model}-L{self.n_layers}"] + lr + seed

    def manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    runs: list[PlannedRun]
    skipped: list[dict]  # {"target": ..., "reason": ...}: what the rule could not place within tolerance
    spec: SweepSpec
    convention: str
    optimum: dict  # budget -> the prior N_opt the grid is centred on (isoflop)

    def table(self) -> str:
        head = f"{'name':<34} {'N':>9} {'D':>9} {'steps':>6} {'B':>4} {'lr':>8} {'C':>9} {'err':>7}"
        rows = [
            f"{r.name:<34} {r.N:>9.3g} {r.D:>9.3g} {r.steps:>6} {r.batch_size:>4} {r.lr:>8.3g} "
            f"{r.C[self.convention]:>9.3g} {r.budget_error:>+7.2%}"
            for r in self.runs
        ]
        rows += [f"  skipped {s['target']}: {s['reason']}" for s in self.skipped]
        return "\n".join([head, *rows])


def fmt_sci(x: float, digits: int = 1) -> str:
    """1e13 -> '1e13', 3.2e11 -> '3.2e11', 250000 -> '2.5e5': compact, readable, stable run names."""
    mantissa, exponent = f"{float(x):.{digits}e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def plan_sweep(spec: SweepSpec, base: ModelConfig, convention: str = "chinchilla") -> Plan:
    if convention not in FLOP_CONVENTIONS:
        raise ValueError(f"convention={convention!r} is unknown: use one of {FLOP_CONVENTIONS}.")
    if spec.kind == "isoflop":
        plan = plan_isoflop(spec, base, convention)
    elif spec.kind == "lr":
        plan = plan_lr(spec, base, convention)
    elif spec.kind == "ladder":
        plan = plan_ladder(spec, base, convention)
    else:
        plan = plan_grid(spec, base, convention)
    return _replicate(plan, spec.seeds)


def _replicate(plan: Plan, seeds: list[int]) -> Plan:
    """Each run once per seed, replicates adjacent: name `<run>-s<seed>`, override train.seed=<seed>, and the run's
    `group` kept, since replicates differ only in seed and may share one vmapped step (scaling.train.stack).
    No seeds: the plan as it is (one run per point, the config's seed)."""
    if not seeds:
        return plan
    runs = [dataclasses.replace(r, name=f"{r.name}-s{s}", seed=int(s), parent=r.parent and f"{r.parent}-s{s}")
            for r in plan.runs for s in seeds]
    _check_unique(runs)
    return dataclasses.replace(plan, runs=runs)


def _count(shape: ModelConfig, spec: SweepSpec) -> int:
    """The shape's N in the plan's convention (plan.n_convention)."""
    counts = count_params(shape)
    return counts.total if spec.n_convention == "total" else counts.non_embedding


def _nearest_shapes(shapes: list[ModelConfig], targets: list[float], spec: SweepSpec) -> list[ModelConfig]:
    """Distinct family shapes nearest in log N (plan.n_convention) to the targets, in increasing N.

    Small families are coarse (neighbouring widths can differ 2x in N), so targets are served from the middle out and
    each takes the nearest shape not yet taken: the grid keeps its size count and stays centred.
    """
    log_n = [math.log(_count(s, spec)) for s in shapes]
    mid = math.log(targets[len(targets) // 2])
    taken: set[int] = set()
    for target in sorted(targets, key=lambda t: abs(math.log(t) - mid)):
        free = [i for i in range(len(shapes)) if i not in taken]
        if not free:
            break
        taken.add(min(free, key=lambda i: abs(log_n[i] - math.log(target))))
    return [shapes[i] for i in sorted(taken)]


def _isoflop_optimum(C: float, shapes: list[ModelConfig], spec: SweepSpec, convention: str) -> float:
    """N_opt from a prior fit, else the N where D/N = tokens_per_param with D = C / flops_per_token (interpolated in
    log space over the family, since flops_per_token is not 6N for small models)."""
    if spec.prior_fit is not None:
        G, a = spec.prior_fit
        return float(G) * C ** float(a)
    log_n = [math.log(_count(s, spec)) for s in shapes]
    # log(D/N) decreases along the family; find where it crosses log(tokens_per_param).
    log_ratio = [math.log(C / flops_per_token(s, convention)) - ln for s, ln in zip(shapes, log_n)]
    want = math.log(spec.tokens_per_param)
    if not log_ratio[-1] <= want <= log_ratio[0]:
        raise ValueError(
            f"budget C={C:.3g} puts the D/N={spec.tokens_per_param} optimum outside the family "
            f"(N from {math.exp(log_n[0]):.3g} to {math.exp(log_n[-1]):.3g}): widen family.min_d_model/max_d_model "
            "or choose budgets nearer the family."
        )
    for i in range(len(shapes) - 1):
        if log_ratio[i] >= want >= log_ratio[i + 1]:
            t = (log_ratio[i] - want) / max(log_ratio[i] - log_ratio[i + 1], 1e-12)
            return math.exp(log_n[i] + t * (log_n[i + 1] - log_n[i]))
    return math.exp(log_n[0])


def _place(shape: ModelConfig, kind: str, nominal: float, budget: Optional[float], target_N: float, name: str,
           spec: SweepSpec, convention: str, C_for_batch: float) -> tuple[Optional[PlannedRun], str]:
    hyper = spec.hyper
    B = hyper.batch_size(C_for_batch)
    while True:  # halve the batch until the run has min_steps steps (shorter runs round C too coarsely)
        train = TrainConfig(batch_size=B, flops_convention=convention, **{"flops" if kind == "flops" else "tokens": nominal})
        b = resolve_budget(shape, train)
        if b.steps >= hyper.min_steps or B // 2 < hyper.min_batch:
            break
        B //= 2
    achieved = b.C[convention] if kind == "flops" else b.D
    error = achieved / nominal - 1.0
    if b.steps < hyper.min_steps:
        return None, f"only {b.steps} steps at the minimum batch {B} (< hyper.min_steps={hyper.min_steps})"
    if abs(error) > spec.tolerance:
        return None, f"achieved/nominal - 1 = {error:+.2%} exceeds plan.tolerance={spec.tolerance}"
    counts = count_params(shape)
    run = PlannedRun(
        name=f"{name}-B{B}", kind=kind, budget=budget, target_N=float(target_N), N=counts.non_embedding,
        N_total=counts.total, D=b.D, steps=b.steps, batch_size=B, C=dict(b.C), budget_error=error,
        d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads, d_ff=shape.ff_dim,
        lr=hyper.lr(shape.d_model, B), warmup_fraction=hyper.warmup_fraction, schedule=hyper.schedule,
        nominal=float(nominal), group=f"{name}-B{B}", warmup_steps=hyper.warmup_steps,
    )
    return run, ""


def plan_isoflop(spec: SweepSpec, base: ModelConfig, convention: str = "chinchilla") -> Plan:
    """Chinchilla Approach 2 (Hoffmann et al. 2022, Sec. 3.2): per budget C, n_sizes shapes evenly spaced in log N
    around the prior optimum, each trained for D = C / flops_per_token tokens."""
    shapes = spec.family.shapes(base)
    prefix = spec.prefix or "isoflop"
    runs, skipped, optimum = [], [], {}
    for C in sorted(float(c) for c in spec.budgets):
        optimum[fmt_sci(C)], placed = _isoflop_shapes(C, shapes, spec, convention)
        for shape, target in placed:
            name = f"{prefix}-C{fmt_sci(C)}-d{shape.d_model}-L{shape.n_layers}"
            run, why = _place(shape, "flops", C, C, target, name, spec, convention, C)
            if run:
                runs.append(run)
            else:
                skipped.append({"target": name, "reason": why})
    _check_unique(runs)
    return Plan(runs, skipped, spec, convention, optimum)


def _isoflop_shapes(C: float, shapes: list[ModelConfig], spec: SweepSpec, convention: str,
                    anchor: Optional[float] = None):
    """The prior N_opt of budget C and its n_sizes shapes, evenly spaced in log N around it (with each one's target N).
    With `anchor`, the targets are the n_sizes points of the grid anchor * size_step^k nearest N_opt (shared sizes)."""
    n_opt = _isoflop_optimum(C, shapes, spec, convention)
    half = (spec.n_sizes - 1) / 2
    if anchor is None:
        targets = [n_opt * spec.size_step ** (i - half) for i in range(spec.n_sizes)]
    else:  # the n_sizes grid points nearest N_opt, as integer powers of size_step from the anchor
        first = round(math.log(n_opt / anchor) / math.log(spec.size_step) - half)
        targets = [anchor * spec.size_step ** (first + i) for i in range(spec.n_sizes)]
    placed = []
    for shape in _nearest_shapes(shapes, targets, spec):
        N = _count(shape, spec)
        placed.append((shape, min(targets, key=lambda t: abs(math.log(t / N)))))
    return n_opt, placed


def plan_ladder(spec: SweepSpec, base: ModelConfig, convention: str = "chinchilla") -> Plan:
    """Scaling ladders (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations", Sec. 3-4): per shape, one parent trains the warmup and the stable (constant-lr) phase of a
    warmup-stable-decay schedule up to its last branch point; each point (D) of that shape is a branch forked from the
    parent's checkpoint at round((1 - cooldown_fraction) * steps) that cools down to its own end. A branch is the wsd
    run to its D bit for bit (tests/test_ladder.py), for the cost of its cooldown.

    Points: plan.budgets gives each budget's IsoFLOP shapes (as kind isoflop), so a shape on several budget lines has
    one branch per budget; plan.sizes x plan.tokens (or grid_tokens_per_param) gives a grid. One batch per shape
    (the hyper rule's at the shape's largest C, halved until its shortest branch has hyper.min_steps) and one warmup
    (hyper.warmup_steps, else hyper.warmup_fraction of the shortest branch), since the branches share the parent's steps.
    """
    shapes = spec.family.shapes(base)
    prefix = spec.prefix or "ladder"
    points: dict[tuple[int, int], list] = {}  # shape -> [(kind, nominal, budget, target N, point name)]
    optimum: dict = {}
    if spec.budgets:
        top = max(float(c) for c in spec.budgets)
        anchor = _isoflop_optimum(top, shapes, spec, convention) if spec.shared_sizes else None
        for C in sorted(float(c) for c in spec.budgets):
            optimum[fmt_sci(C)], placed = _isoflop_shapes(C, shapes, spec, convention, anchor)
            for shape, target in placed:
                name = f"{prefix}-C{fmt_sci(C)}-d{shape.d_model}-L{shape.n_layers}"
                points.setdefault((shape.d_model, shape.n_layers), []).append((shape, "flops", C, C, target, name))
    else:
        for shape in _nearest_shapes(shapes, [float(n) for n in spec.sizes], spec):
            N = _count(shape, spec)
            for D in sorted([float(d) for d in spec.tokens] or [r * N for r in spec.grid_tokens_per_param]):
                name = f"{prefix}-d{shape.d_model}-L{shape.n_layers}-D{fmt_sci(D)}"
                points.setdefault((shape.d_model, shape.n_layers), []).append((shape, "tokens", round(D), None, N, name))
    runs, skipped = [], []
    for (d_model, n_layers), pts in points.items():
        ladder, why = _ladder(pts, f"{prefix}-d{d_model}-L{n_layers}", spec, convention)
        runs += ladder
        skipped += why
    _check_unique(runs)
    return Plan(runs, skipped, spec, convention, optimum)


def _ladder(points: list, parent_name: str, spec: SweepSpec, convention: str):
    """One shape's parent and branches, and the points it skipped ({"target", "reason"}): a branch shorter than
    hyper.min_steps at the smallest batch is dropped alone (a wide shape's lowest budget), the rest of its ladder
    kept; no runs when every branch is dropped."""
    hyper, shape = spec.hyper, points[0][0]
    fpt = flops_per_token(shape, convention)
    C_max = max(fpt * nominal if kind == "tokens" else nominal for _, kind, nominal, *_ in points)
    B = hyper.batch_size(C_max)

    def budgets(B: int):
        return [resolve_budget(shape, TrainConfig(batch_size=B, flops_convention=convention,
                                                  **{"flops" if kind == "flops" else "tokens": nominal}))
                for _, kind, nominal, *_ in points]

    while min(b.steps for b in budgets(B)) < hyper.min_steps and B // 2 >= hyper.min_batch:
        B //= 2
    resolved = budgets(B)
    skipped = [{"target": p[-1], "reason": f"only {b.steps} steps at the minimum batch {B} (< hyper.min_steps="
                f"{hyper.min_steps})"} for p, b in zip(points, resolved) if b.steps < hyper.min_steps]
    kept = [(p, b) for p, b in zip(points, resolved) if b.steps >= hyper.min_steps]
    if not kept:
        return [], skipped
    points, resolved = zip(*kept)
    shortest = min(b.steps for b in resolved)
    cooldown = OptimConfig(decay_fraction=spec.cooldown_fraction)
    warmup = hyper.warmup_steps if hyper.warmup_steps is not None else int(round(hyper.warmup_fraction * shortest))
    counts, lr = count_params(shape), hyper.lr(shape.d_model, B)
    common = dict(N=counts.non_embedding, N_total=counts.total, batch_size=B, d_model=shape.d_model,
                  n_layers=shape.n_layers, n_heads=shape.n_heads, d_ff=shape.ff_dim, lr=lr,
                  warmup_fraction=hyper.warmup_fraction, warmup_steps=warmup)
    branches = []
    for (_, kind, nominal, budget, target, name), b in zip(points, resolved):
        error = (b.C[convention] if kind == "flops" else b.D) / nominal - 1.0
        fork = cooldown.stable_end(b.steps)
        if abs(error) > spec.tolerance or fork < warmup:
            why = (f"achieved/nominal - 1 = {error:+.2%} exceeds plan.tolerance={spec.tolerance}" if abs(error) > spec.tolerance
                   else f"the cooldown would start at step {fork}, inside the warmup ({warmup} steps)")
            skipped.append({"target": name, "reason": why})
            continue
        branches.append(PlannedRun(
            name=f"{name}-B{B}", kind=kind, budget=budget, target_N=float(target), D=b.D, steps=b.steps, C=dict(b.C),
            budget_error=error, schedule="wsd", nominal=float(nominal), group=f"{name}-B{B}", role="branch",
            parent=f"{parent_name}-B{B}", branch_step=fork, decay_fraction=spec.cooldown_fraction,
            decay_shape=spec.cooldown_shape, **common))
    if not branches:
        return [], skipped
    forks = sorted({r.branch_step for r in branches})
    p = resolve_budget(shape, TrainConfig(batch_size=B, steps=forks[-1], flops_convention=convention))
    parent = PlannedRun(
        name=f"{parent_name}-B{B}", kind="tokens", budget=None, target_N=float(counts.non_embedding), D=p.D,
        steps=p.steps, C=dict(p.C), budget_error=0.0, schedule="constant", nominal=float(p.D),
        group=f"{parent_name}-B{B}", role="parent", keep_steps=tuple(forks), **common)
    return [parent, *branches], skipped


def plan_grid(spec: SweepSpec, base: ModelConfig, convention: str = "chinchilla") -> Plan:
    """Sizes x token budgets (for Chinchilla Approaches 1 and 3 and Kaplan's L(N, D) fit, Kaplan et al. 2020 Eq. 1.5)."""
    shapes = _nearest_shapes(spec.family.shapes(base), [float(n) for n in spec.sizes], spec)
    prefix = spec.prefix or "grid"
    runs, skipped = [], []
    for shape in shapes:
        N = _count(shape, spec)
        token_list = [float(d) for d in spec.tokens] or [r * N for r in spec.grid_tokens_per_param]
        for D in sorted(token_list):
            name = f"{prefix}-d{shape.d_model}-L{shape.n_layers}-D{fmt_sci(D)}"
            C = flops_per_token(shape, convention) * D
            run, why = _place(shape, "tokens", round(D), None, N, name, spec, convention, C)
            if run:
                runs.append(run)
            else:
                skipped.append({"target": name, "reason": why})
    _check_unique(runs)
    return Plan(runs, skipped, spec, convention, {})


def plan_lr(spec: SweepSpec, base: ModelConfig, convention: str = "chinchilla") -> Plan:
    """A learning-rate sweep: each shape x budget trained at every lr, all else equal.

    Shapes: the family shapes nearest `sizes`, or the base model as configured when `sizes` is empty. Budget, batch,
    schedule and warmup come from the hyper rule exactly as for an IsoFLOP run; only `optim.lr` varies, so the runs
    of one shape and budget share `group` (name without the lr) and can train as one vmapped step (scaling.train.stack).
    Names: `lr-C2e9-d32-L2-B8-lr3e-3` (prefix, budget, shape, batch, lr to 3 significant digits).
    """
    shapes = _nearest_shapes(spec.family.shapes(base), [float(n) for n in spec.sizes], spec) if spec.sizes else [base]
    prefix = spec.prefix or "lr"
    runs, skipped = [], []
    for shape in shapes:
        N = _count(shape, spec)
        for nominal in sorted(float(x) for x in (spec.budgets or spec.tokens)):
            if spec.budgets:
                kind, C, tag = "flops", nominal, f"C{fmt_sci(nominal)}"
            else:
                kind, nominal, tag = "tokens", round(nominal), f"D{fmt_sci(nominal)}"
                C = flops_per_token(shape, convention) * nominal
            name = f"{prefix}-{tag}-d{shape.d_model}-L{shape.n_layers}"
            run, why = _place(shape, kind, nominal, C if kind == "flops" else None, N, name, spec, convention, C)
            if not run:
                skipped.append({"target": name, "reason": why})
                continue
            # 6 significant digits: what PlannedRun.overrides() hands the trainer, so the record holds this lr exactly
            lrs = [float(f"{x:.6g}") for x in ([float(x) for x in spec.lrs] or [float(m) * run.lr for m in spec.lr_multipliers])]
            for lr in sorted(lrs):
                runs.append(dataclasses.replace(run, name=f"{run.group}-lr{fmt_sci(lr, 2)}", lr=lr))
    _check_unique(runs)
    return Plan(runs, skipped, spec, convention, {})


def _check_unique(runs: list[PlannedRun]) -> None:
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # e.g. two token budgets that print alike: the run directories would collide
        raise ValueError(f"plan: run names collide ({', '.join(dupes)}): space the budgets (or lrs) further apart.")
