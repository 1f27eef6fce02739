"""Scaling laws as data: a Law names its parameters (bounds and a grid of initial values), the inputs it reads and its
formula (an expression or a Python function), and one fitter serves every law, as apple/ml-scalefit does.

The fit is Hoffmann et al. 2022's Approach 3 procedure (appendix D.2) made generic: the summed Huber (delta 1e-3) of
log-loss residuals, minimised by L-BFGS-B from the best `n_starts` points of the initial grid, the best optimum kept;
positive scale parameters (`log=True`) are optimised in log space as the paper's log-sum-exp form does. Intervals are
a bootstrap over runs (analysis.uncertainty.bootstrap), the backtest fits the smaller models and predicts the larger.

Inputs a law may read, one per run: N (parameters), D (tokens seen), C (FLOPs), epochs (D / unique tokens) and
U_D = D / epochs, the unique training tokens (Muennighoff et al. 2023, sec. 3).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from scipy import optimize
from threadpoolctl import threadpool_limits

from analysis.laws import expr
from analysis.laws.fits import relative_weights
from analysis.validate import check_min_points, check_positive_finite

INPUTS = ("N", "D", "C", "epochs", "U_D")
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022 appendix D.2 (as analysis.laws.approach3)


@dataclasses.dataclass(frozen=True)
class Param:
    """A fitted parameter: bounds [lo, hi] and the initial values tried (the grid). `log`: optimised as log(value)
    (a positive scale such as A, B, E: the optimiser then moves in orders of magnitude)."""

    name: str
    lo: float
    hi: float
    init: tuple[float, ...]
    log: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", tuple(float(v) for v in np.atleast_1d(self.init)))
        if not self.name.isidentifier():
            raise ValueError(f"parameter name {self.name!r} is not a valid name; use letters, digits and _")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"parameter {self.name}: bounds [{self.lo}, {self.hi}] are not finite with lo < hi; "
                             f"give e.g. {self.name}=0:10:1,2")
        if self.log and self.lo <= 0:
            raise ValueError(f"parameter {self.name}: a log-scale parameter needs lo > 0 (got {self.lo})")
        if not self.init or any(not (self.lo <= v <= self.hi) for v in self.init):
            raise ValueError(f"parameter {self.name}: initial values {list(self.init)} must lie in [{self.lo}, "
                             f"{self.hi}]")

    def to_u(self, v):
        return np.log(v) if self.log else np.asarray(v, float)

    def from_u(self, u):
        return np.exp(u) if self.log else np.asarray(u, float)


@dataclasses.dataclass(frozen=True)
class Law:
    """loss = formula(inputs; params). Exactly one of `expression` (see analysis.laws.expr) or `function`
    (function(X: dict of input arrays, p: dict of parameter values) -> loss array, vectorised)."""

    name: str
    params: tuple[Param, ...]
    inputs: tuple[str, ...]
    expression: str | None = None
    function: Callable | None = None
    reference: str = ""  # the paper and equation

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        names = [p.name for p in self.params]
        if not names:
            raise ValueError(f"law {self.name}: no parameters to fit; declare at least one")
        dup = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(self.inputs)))
        if dup:
            raise ValueError(f"law {self.name}: names {dup} are declared twice (parameters and inputs must differ)")
        bad = [i for i in self.inputs if i not in INPUTS]
        if bad:
            raise ValueError(f"law {self.name}: inputs {bad} are unknown; a law reads some of {list(INPUTS)}")
        if (self.expression is None) == (self.function is None):
            raise ValueError(f"law {self.name}: give exactly one of an expression and a function")
        if self.expression is not None:
            formula = expr.parse(self.expression, set(names) | set(self.inputs))
            unused = sorted(set(names) - formula.names)
            if unused:
                raise ValueError(f"law {self.name}: parameters {unused} do not appear in {self.expression!r}; "
                                 "remove them or use them")
            object.__setattr__(self, "_formula", formula)
        elif not callable(self.function):
            raise ValueError(f"law {self.name}: function {self.function!r} is not callable")

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __call__(self, X: Mapping, p: Mapping) -> np.ndarray:
        """The law's loss at inputs X (name -> array) and parameters p (name -> value, or arrays that broadcast)."""
        if self.expression is not None:
            return np.asarray(expr.evaluate(self._formula, {**{k: X[k] for k in self.inputs}, **p}), float)
        return np.asarray(self.function({k: np.asarray(X[k], float) for k in self.inputs}, dict(p)), float)

    def value_and_grad(self, X: Mapping, p: Mapping, free: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Loss and d loss / d p for p in `free` (shape (len(free), n)): exact for expressions (forward-mode, see
        analysis.laws.expr), central differences of relative step 1e-6 for functions."""
        if self.expression is not None:
            return expr.evaluate(self._formula, {**{k: X[k] for k in self.inputs}, **p}, free, grad=True)
        v = self(X, p)
        g = np.empty((len(free),) + v.shape)
        for i, k in enumerate(free):
            h = 1e-6 * max(abs(p[k]), 1e-3)
            g[i] = (self(X, {**p, k: p[k] + h}) - self(X, {**p, k: p[k] - h})) / (2 * h)
        return v, g


def law_inputs(law: Law, df: pd.DataFrame | Mapping) -> dict[str, np.ndarray]:
    """The inputs `law` reads, from a run table (analysis.load) or a dict of arrays: U_D = D / epochs when the table
    has epochs; every value checked positive and finite."""
    cols = dict(df) if isinstance(df, Mapping) else {c: df[c] for c in df.columns}
    out = {}
    for k in law.inputs:
        if k == "U_D" and "U_D" not in cols and "epochs" in cols and "D" in cols:
            v = np.asarray(cols["D"], float) / np.asarray(cols["epochs"], float)
        elif k in cols:
            v = cols[k]
        else:
            how = (" (U_D = D / epochs: the table has no epochs column; a sweep directory or a runs.csv collected "
                   "from records written since epochs were recorded carries it)" if k in ("U_D", "epochs") else "")
            raise ValueError(f"law {law.name} reads {k}, which the run table lacks{how}; columns: {sorted(cols)}")
        out[k] = check_positive_finite(v, f"law {law.name} input {k}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LawFit:
    law: Law
    params: dict
    n_points: int
    objective: float
    fixed: tuple[str, ...] = ()
    at_bound: tuple[str, ...] = ()  # fitted parameters that ended on a bound: the data do not pin them inside it

    def __call__(self, X) -> np.ndarray:
        return self.law(law_inputs(self.law, X), self.params)

    def as_dict(self) -> dict:
        return {**self.params, "n_points": self.n_points, "objective": self.objective, "law": self.law.name,
                "fixed": list(self.fixed), "at_bound": list(self.at_bound)}


class _Objective:
    """Summed Huber_delta of c_P (log f(X; p) - log L) over points, in the optimiser's variables u (log p for log-scale
    parameters), with its gradient. c_P as analysis.laws.approach3: per-point scales sqrt(w / mean w)."""

    def __init__(self, law: Law, X: dict, logL: np.ndarray, free: tuple[Param, ...], fixed: dict, delta: float,
                 c_P: np.ndarray | None):
        self.law, self.X, self.logL, self.free, self.fixed, self.delta, self.c_P = law, X, logL, free, fixed, delta, c_P
        self.names = tuple(p.name for p in free)

    def params(self, u) -> dict:
        return {**self.fixed, **{p.name: float(p.from_u(x)) for p, x in zip(self.free, u)}}

    def __call__(self, u) -> tuple[float, np.ndarray]:
        p = self.params(u)
        with np.errstate(all="ignore"):
            f, g = self.law.value_and_grad(self.X, p, self.names)
            r = np.log(f) - self.logL
        if not np.all(np.isfinite(r)) or not np.all(np.isfinite(g)):
            return 1e30, np.zeros(len(u))  # outside the law's domain (f <= 0, overflow): L-BFGS backtracks
        if self.c_P is not None:
            r = self.c_P * r
        absr = np.abs(r)
        loss = np.where(absr <= self.delta, 0.5 * r * r, self.delta * (absr - 0.5 * self.delta)).sum()
        w = np.clip(r, -self.delta, self.delta) / f  # Huber derivative times d log f / d f
        if self.c_P is not None:
            w = self.c_P * w
        dudp = np.array([p[q.name] if q.log else 1.0 for q in self.free])  # d p / d u
        return float(loss), (g @ w) * dudp

    def batch(self, U_SxP: np.ndarray) -> np.ndarray:
        """The objective at S points at once (grid screening), shape (S,)."""
        p = {**self.fixed, **{q.name: q.from_u(U_SxP[:, i:i + 1]) for i, q in enumerate(self.free)}}
        with np.errstate(all="ignore"):
            r = np.abs(np.log(self.law(self.X, p)) - self.logL)
        if self.c_P is not None:
            r = self.c_P * r
        out = np.where(r <= self.delta, 0.5 * r ** 2, self.delta * (r - 0.5 * self.delta)).sum(axis=1)
        return np.where(np.isfinite(out), out, np.inf)


def fit_law(law: Law, df: pd.DataFrame | Mapping, *, delta: float = HUBER_DELTA, n_starts: int | None = 32,
            init: Mapping | None = None, fixed: Mapping | None = None, weights=None) -> LawFit:
    """Fit `law` to the runs in `df` (its inputs and `loss`): Huber on log loss, L-BFGS-B within the bounds from the
    `n_starts` grid points with the lowest objective (None: all), plus `init` (a dict of starting values, e.g. the
    full-data fit when bootstrapping; n_starts=0 then starts from it alone). `fixed` holds parameters at given values
    (a two-stage fit). `weights`: 1/sigma^2 of each point's log loss, as analysis.approach3.fit_approach3."""
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    unknown = sorted(set(fixed) - set(law.param_names))
    if unknown:
        raise ValueError(f"law {law.name}: fixed parameters {unknown} are not its parameters {list(law.param_names)}")
    free = tuple(p for p in law.params if p.name not in fixed)
    if not free:
        raise ValueError(f"law {law.name}: every parameter is fixed; leave at least one to fit")
    X = law_inputs(law, df)
    loss = check_positive_finite(df["loss"], f"law {law.name} loss")
    check_min_points(len(loss), len(free) + 1, f"law {law.name} ({len(free)} free parameters)")
    w = relative_weights(weights, len(loss), f"law {law.name}")
    obj = _Objective(law, X, np.log(loss), free, fixed, delta, None if w is None else np.sqrt(w))
    starts = _starts(obj, free, n_starts)
    if init is not None:
        missing = [p.name for p in free if p.name not in init]
        if missing:
            raise ValueError(f"law {law.name}: init lacks {missing}; give a value for every free parameter")
        u0 = np.array([float(p.to_u(np.clip(init[p.name], p.lo, p.hi))) for p in free])
        starts = np.vstack([u0, starts])
    if not len(starts):
        raise ValueError(f"law {law.name}: n_starts={n_starts} and no init leave nothing to start from")
    bounds = [(float(p.to_u(p.lo)), float(p.to_u(p.hi))) for p in free]
    best = None
    # One BLAS thread: L-BFGS-B's core calls BLAS on P x P matrices, where a multithreaded BLAS only spins; on a busy
    # 2-core machine that made each fit ~10x slower (measured: 3.3 s vs 11 s for the 7-parameter law, 4 starts).
    with threadpool_limits(limits=1, user_api="blas"):
        for u0 in starts:
            r = optimize.minimize(obj, u0, jac=True, method="L-BFGS-B", bounds=bounds,
                                  options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
            if np.all(np.isfinite(r.x)) and r.fun < 1e30 and (best is None or r.fun < best.fun):
                best = r
    if best is None:
        raise ValueError(f"law {law.name}: no start reached a finite objective; the formula is undefined (<= 0, "
                         "NaN) at every start: check its bounds and initial grid")
    span = [(hi - lo) for lo, hi in bounds]
    at_bound = tuple(p.name for p, x, (lo, hi), s in zip(free, best.x, bounds, span)
                     if min(x - lo, hi - x) <= 1e-6 * s)
    return LawFit(law=law, params=obj.params(best.x), n_points=len(loss), objective=float(best.fun),
                  fixed=tuple(fixed), at_bound=at_bound)


def _starts(obj: _Objective, free: tuple[Param, ...], n_starts: int | None) -> np.ndarray:
    """The grid of initial values (optimiser variables), screened by objective when larger than n_starts."""
    if n_starts == 0:
        return np.empty((0, len(free)))
    grid_SxP = np.array(list(itertools.product(*[[float(p.to_u(v)) for v in p.init] for p in free])))
    if n_starts is None or n_starts >= len(grid_SxP):
        return grid_SxP
    # Screen in chunks of ~2M residuals: a 7-parameter grid over hundreds of points would not fit in memory at once.
    step = max(1, 2_000_000 // max(len(obj.logL), 1))
    vals = np.concatenate([obj.batch(grid_SxP[i:i + step]) for i in range(0, len(grid_SxP), step)])
    return grid_SxP[np.argsort(vals, kind="stable")[:n_starts]]


# --------------------------------------------------------------------------------------------------------------------
# Intervals (bootstrap over runs) and the backtest
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LawStat:
    """A law's fitted parameters as a statistic for analysis.uncertainty.bootstrap (picklable)."""

    law: Law
    init: dict | None = None  # warm start: the full-data fit
    n_starts: int = 0
    fixed: dict | None = None
    weights: str | None = None  # column of 1/sigma^2 of the log loss

    def fit(self, df: pd.DataFrame) -> LawFit:
        n = self.n_starts if self.init is not None else max(self.n_starts, 32)
        return fit_law(self.law, df, init=self.init, n_starts=n, fixed=self.fixed,
                       weights=None if self.weights is None else df[self.weights])

    def __call__(self, df: pd.DataFrame) -> dict:
        return {k: float(v) for k, v in self.fit(df).params.items() if k not in (self.fixed or {})}


def fit_with_intervals(law: Law, df: pd.DataFrame, *, n_bootstrap: int = 200, seed: int = 0, n_jobs: int = 2,
                       fixed: Mapping | None = None, stat_type: type = LawStat, **stat_kw) -> dict:
    """The full-data fit and, with n_bootstrap > 0, 95% percentile intervals over runs. Returns {"fit": LawFit,
    "estimate", "ci95", "n_resamples", "n_failed"}: intervals of parameters that reach a bound are not identified."""
    from analysis.checks.uncertainty import bootstrap

    full = fit_law(law, df, fixed=fixed)
    out = {"fit": full, "estimate": {k: v for k, v in full.params.items() if k not in (fixed or {})}, "ci95": {},
           "n_resamples": 0, "n_failed": 0}
    if n_bootstrap > 0:
        stat = stat_type(law=law, init=dict(full.params), fixed=dict(fixed) if fixed else None, **stat_kw)
        group = "name" if "name" in df.columns else None
        if group is None:
            df = df.assign(name=[f"run{i}" for i in range(len(df))])
        b = bootstrap(df, stat, n_resamples=n_bootstrap, seed=seed, n_jobs=n_jobs)
        out.update(estimate=b.estimate, ci95=b.ci, n_resamples=len(b.samples), n_failed=b.n_failed)
    return out


@dataclasses.dataclass(frozen=True)
class LawBacktest:
    N_below: float
    errors: pd.DataFrame  # held-out runs: name, N, D, loss, predicted, rel_error

    def summary(self) -> dict:
        e = self.errors["rel_error"].abs()
        return {"N_below": self.N_below, "n_test_runs": len(self.errors), "mean_abs_rel_error": float(e.mean()),
                "max_abs_rel_error": float(e.max()),
                "N_ratio": float(self.errors["N"].max() / self.N_below)}


def backtest_law(law: Law, df: pd.DataFrame, N_below: float, **fit_kw) -> LawBacktest:
    """Fit on runs with N < N_below, predict the loss of the larger ones: relative error (predicted - observed) /
    observed per held-out run."""
    train, test = df[df["N"] < N_below], df[df["N"] >= N_below]
    if train.empty or test.empty:
        raise ValueError(f"law backtest: N_below={N_below:g} leaves {len(train)} runs to fit and {len(test)} to "
                         f"predict; choose a value between the smallest and largest N ({df['N'].min():.3g}.."
                         f"{df['N'].max():.3g})")
    fit = fit_law(law, train, **fit_kw)
    pred = fit(test)
    cols = [c for c in ("name", "N", "D", "epochs") if c in test.columns]
    errors = test[cols + ["loss"]].assign(predicted=pred, rel_error=(pred - test["loss"].to_numpy()) /
                                          test["loss"].to_numpy())
    return LawBacktest(N_below=float(N_below), errors=errors.reset_index(drop=True))


def plot_law_fit(fit: LawFit, df: pd.DataFrame, out_dir: Path, name: str | None = None) -> list[Path]:
    """Fitted against observed loss, and the log residuals against N (colour: D, or epochs when the law reads it)."""
    from analysis.report.plots import STYLE, _log_x_ticks, _save, plt

    pred = fit(df)
    r = np.log(df["loss"].to_numpy()) - np.log(pred)
    color_by = "epochs" if "epochs" in df.columns and ("U_D" in fit.law.inputs or "epochs" in fit.law.inputs) else "D"
    c = np.log10(df[color_by].to_numpy(float))
    with plt.rc_context(STYLE):
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.8))
        sc = a0.scatter(df["loss"], pred, c=c, s=16, cmap="viridis")
        lim = [min(df["loss"].min(), pred.min()), max(df["loss"].max(), pred.max())]
        a0.plot(lim, lim, "k-", lw=0.8)
        a0.set(xlabel="observed loss", ylabel="fitted loss", title=f"{fit.law.name}: fit")
        a1.scatter(df["N"], r, c=c, s=16, cmap="viridis")
        a1.axhline(0, color="k", lw=0.8)
        a1.set(xscale="log", xlabel="N", ylabel="log L observed - log L fitted", title="residuals")
        _log_x_ticks(a1, df["N"])
        fig.colorbar(sc, ax=a1, label=f"log10 {color_by}")
        fig.tight_layout()
        return _save(fig, out_dir, name or f"law_{fit.law.name}")


# --------------------------------------------------------------------------------------------------------------------
# Built-in laws and user laws (FILE.py:NAME, or an expression with --param specs)
# --------------------------------------------------------------------------------------------------------------------
def _grid(lo: float, hi: float, step: float) -> tuple[float, ...]:
    return tuple(np.round(np.arange(lo, hi + step / 2, step), 12))


# Hoffmann et al. 2022 eq. 2, with the appendix D.2 grid: a = log A, b = log B in {0, 5, ..., 25}, e = log E in
# {-1, -0.5, ..., 1}, alpha, beta in {0, 0.5, ..., 2}; A, B, E fitted in log space as the paper's LSE form.
CHINCHILLA = Law(
    name="chinchilla", inputs=("N", "D"), expression="E + A/N**alpha + B/D**beta",
    params=(Param("E", 1e-6, 1e3, tuple(np.exp(_grid(-1, 1, 0.5))), log=True),
            Param("A", 1e-6, 1e30, tuple(np.exp(_grid(0, 25, 5))), log=True),
            Param("B", 1e-6, 1e30, tuple(np.exp(_grid(0, 25, 5))), log=True),
            Param("alpha", 0.0, 5.0, _grid(0, 2, 0.5)), Param("beta", 0.0, 5.0, _grid(0, 2, 0.5))),
    reference="Hoffmann et al. 2022 eq. 2 (Approach 3)")

# Kaplan et al. 2020 eq. 1.1 (L(N) = (N_c/N)^alpha_N, data unlimited) and eq. 1.5 (L(N, D) = [(N_c/N)^(alpha_N /
# alpha_D) + D_c/D]^alpha_D); their fitted values (table 1): alpha_N 0.076, N_c 8.8e13, alpha_D 0.095, D_c 5.4e13.
KAPLAN_N = Law(
    name="kaplan_N", inputs=("N",), expression="(N_c/N)**alpha_N",
    params=(Param("N_c", 1.0, 1e30, (1e8, 1e11, 1e14, 1e17), log=True), Param("alpha_N", 1e-4, 3.0, (0.05, 0.1, 0.3))),
    reference="Kaplan et al. 2020 eq. 1.1")
KAPLAN_ND = Law(
    name="kaplan_ND", inputs=("N", "D"), expression="((N_c/N)**(alpha_N/alpha_D) + D_c/D)**alpha_D",
    params=(Param("N_c", 1.0, 1e30, (1e8, 1e11, 1e14, 1e17), log=True), Param("alpha_N", 1e-4, 3.0, (0.05, 0.1, 0.3)),
            Param("D_c", 1.0, 1e30, (1e8, 1e11, 1e14, 1e17), log=True), Param("alpha_D", 1e-4, 3.0, (0.05, 0.1, 0.3))),
    reference="Kaplan et al. 2020 eq. 1.5")


def builtin_laws() -> dict[str, Law]:
    from analysis.laws.data_constrained import DATA_CONSTRAINED

    return {law.name: law for law in (CHINCHILLA, KAPLAN_N, KAPLAN_ND, DATA_CONSTRAINED)}


def parse_param(spec: str) -> Param:
    """`NAME=LO:HI:INIT[,INIT...]` (append `:log` to optimise log NAME), e.g. `alpha=0:2:0.3,0.6` or
    `A=1e-3:1e12:10,1000,1e5:log`."""
    fix = "write NAME=LO:HI:INIT[,INIT...][:log], e.g. alpha=0:2:0.3,0.6 or A=1e-3:1e12:10,1e4:log"
    name, eq, rest = spec.partition("=")
    parts = rest.split(":")
    log = parts[-1].strip() == "log"
    if log:
        parts = parts[:-1]
    if not eq or len(parts) != 3:
        raise ValueError(f"--param {spec!r}: {fix}")
    try:
        lo, hi = float(parts[0]), float(parts[1])
        init = tuple(float(v) for v in parts[2].split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--param {spec!r}: bounds and initial values must be numbers; {fix}") from None
    return Param(name.strip(), lo, hi, init, log=log)


def expression_law(expression: str, params: list[str], name: str = "custom") -> Law:
    """A law from `--law-expr` and its `--param` specs; its inputs are the names it reads from INPUTS."""
    ps = tuple(parse_param(s) for s in params)
    if not ps:
        raise ValueError(f"--law-expr {expression!r}: declare its parameters with --param NAME=LO:HI:INIT (one each)")
    used = expr.parse(expression, {p.name for p in ps} | set(INPUTS)).names
    return Law(name=name, params=ps, inputs=tuple(i for i in INPUTS if i in used), expression=expression)


def load_law(spec: str) -> Law:
    """A built-in law by name, or `FILE.py:NAME`: the Law object NAME defined in the Python file FILE.py."""
    laws = builtin_laws()
    if spec in laws:
        return laws[spec]
    path, colon, attr = spec.rpartition(":")
    if not colon or not path.endswith(".py"):
        raise ValueError(f"--law {spec!r}: give a built-in law ({', '.join(laws)}) or FILE.py:NAME, a Law object "
                         "named NAME in a Python file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--law {spec!r}: the file {path!r} does not exist")
    module_name = f"_law_file_{abs(hash(str(Path(path).resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered so the law pickles by reference into bootstrap workers (forked: they inherit sys.modules).
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    law = getattr(module, attr, None)
    if not isinstance(law, Law):
        raise ValueError(f"--law {spec!r}: {path} defines no Law named {attr!r} (found {type(law).__name__}); "
                         "define NAME = analysis.laws.law.Law(...)")
    return law
