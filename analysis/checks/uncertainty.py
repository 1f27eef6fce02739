"""Bootstrap intervals (resampling whole runs) and the backtest (fit small budgets, predict large ones).

Resampling runs, not points: a run's many logged points are not independent evidence, and the population the
interval speaks about is "runs we could have trained" (Hoffmann et al. 2022 and Besiroglu et al. 2024 bootstrap
over runs; Porian et al. 2024 over per-budget noise).

With seed replicates (analysis.checks.seeds) the unit is the point with all its seeds (`group="point"`), drawn within
budgets: a cluster bootstrap, resampling the top level of two-level data and keeping each cluster whole, which
Davison & Hinkley 1997 (Bootstrap Methods and their Application, sec. 3.8) recommend since it keeps the
between-point variation and lets the seeds bring their own noise. Drawing seeds within points instead would hold the
design fixed, shrink each point mean's variance by (n - 1) / n (half with 2 seeds) and give points of one run none.
A table with one run per point draws exactly the runs it drew before.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np
import pandas as pd

from analysis.laws.approach3 import Approach3Fit, TokenCost, constrained_optimum, fit_approach3, fit_approach3_vpnls
from analysis.laws.fits import FLOPS_PER_TOKEN, fit_approach1, fit_approach2, fit_kaplan, isoflop_key, isoflop_minimum

Stat = Callable[[pd.DataFrame], dict]


# --------------------------------------------------------------------------------------------------------------------
# Statistics: picklable callables (they cross process boundaries) mapping a run table to named numbers
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Approach3Stat:
    """Approach 3 parameters, a, b and N_opt, D_opt, L_opt at C (Hoffmann et al. 2022 eqs. 2, 4)."""

    C: float | None = None
    method: str = "huber"  # "huber" (the paper's fitter) or "vpnls"
    init: tuple | None = None  # warm start (E, A, B, alpha, beta), e.g. the full-data fit
    n_starts: int = 0  # extra grid starts besides `init` (the full grid is searched when there is no init)
    flops_per_token: float = FLOPS_PER_TOKEN
    cost: TokenCost | None = None  # when given, N_opt, D_opt, L_opt lie on the family's budget line D = C / f(N)
    N_range: tuple[float, float] | None = None  # where that optimum is searched
    weights: str | None = None  # column of 1/sigma^2 per run, in the method's units (huber: of log loss, vpnls: loss)

    def fit(self, df: pd.DataFrame) -> Approach3Fit:
        w = None if self.weights is None else df[self.weights]
        if self.method == "huber":
            n_starts = self.n_starts if self.init is not None else max(self.n_starts, 32)
            return fit_approach3(df["N"], df["D"], df["loss"], n_starts=n_starts, init=self.init,
                                 flops_per_token=self.flops_per_token, weights=w)
        if self.method == "vpnls":
            return fit_approach3_vpnls(df["N"], df["D"], df["loss"], init=self.init,
                                       flops_per_token=self.flops_per_token, weights=w)
        raise ValueError(f"approach 3 method={self.method!r} is unknown; use 'huber' or 'vpnls'")

    def __call__(self, df: pd.DataFrame) -> dict:
        fit = self.fit(df)
        out = fit.as_dict(self.C)
        if self.cost is not None and self.C is not None:
            N_range = self.N_range or (float(df["N"].min()) / 30, float(df["N"].max()) * 30)
            N, D, L = constrained_optimum(fit, self.C, self.cost, N_range)
            out.update(N_opt=N, D_opt=D, L_opt=L)
        return {k: v for k, v in out.items() if isinstance(v, float)}


@dataclasses.dataclass(frozen=True)
class Approach2Stat:
    C: float | None = None
    method: str = "parabola"
    window: int | None = None
    weights: str | None = None
    run_weights: str | None = None  # column of per-run parabola weights, 1/sigma^2 of the loss (analysis.checks.seeds)

    def __call__(self, df: pd.DataFrame) -> dict:
        f = fit_approach2(df, method=self.method, window=self.window, weights=self.weights,
                          run_weights=self.run_weights)
        out = {k: float(v) for k, v in f.as_dict().items() if k != "n_budgets"}
        if self.C is not None:
            out.update(N_opt=float(f.N_opt(self.C)), D_opt=float(f.D_opt(self.C)))
        return out


@dataclasses.dataclass(frozen=True)
class Approach1Stat:
    C: float | None = None

    def __call__(self, curves: pd.DataFrame) -> dict:
        f = fit_approach1(curves)
        out = {k: float(v) for k, v in f.as_dict().items() if k != "n_points"}
        if self.C is not None:
            out.update(N_opt=float(f.N_opt(self.C)), D_opt=float(f.D_opt(self.C)))
        return out


@dataclasses.dataclass(frozen=True)
class KaplanStat:
    variable: str = "N"
    irreducible: bool = False

    def __call__(self, df: pd.DataFrame) -> dict:
        # Kaplan et al. 2020 fit L(N) on the best loss per size (L(D) likewise): the least data-limited runs.
        best = df.groupby(self.variable)["loss"].min()
        f = fit_kaplan(best.index.to_numpy(), best.to_numpy(), variable=self.variable, irreducible=self.irreducible)
        return {k: float(v) for k, v in f.as_dict().items() if k != "n_points"}


# --------------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    estimate: dict  # the statistic on the full data
    samples: pd.DataFrame  # one row per successful resample
    n_failed: int  # resamples whose fit raised (e.g. an unbracketed budget) or gave a non-finite value; reported
    level: float = 0.95

    @property
    def ci(self) -> dict:
        """Percentile interval per key: {key: [lo, hi]}."""
        q = (1 - self.level) / 2
        return {k: [float(self.samples[k].quantile(q)), float(self.samples[k].quantile(1 - q))]
                for k in self.samples.columns}

    def as_dict(self) -> dict:
        return {**self.estimate, "ci95": self.ci, "n_resamples": len(self.samples), "n_failed": self.n_failed}


def _resample(df: pd.DataFrame, group: str, strata: str | None, rng: np.random.Generator) -> pd.DataFrame:
    """Draw runs with replacement (within each stratum, e.g. budget, so every IsoFLOP curve keeps its size);
    duplicates get distinct run ids so curve-based fits treat them as separate runs."""
    blocks = [df.index] if strata is None else list(df.groupby(strata, sort=False).groups.values())
    rows_of_run = df.groupby(group, sort=False).indices  # run id -> positions of its rows
    picked: list[np.ndarray] = []
    for block in blocks:
        ids = df.loc[block, group].unique()
        picked += [rows_of_run[r] for r in rng.choice(ids, size=len(ids), replace=True)]
    out = df.iloc[np.concatenate(picked)].reset_index(drop=True)
    draw = np.repeat(np.arange(len(picked)), [len(p) for p in picked])
    out[group] = out[group].astype(str) + "#" + draw.astype(str)
    return out


def _run_chunk(args) -> tuple[list[dict], int]:
    df, stat, seeds, group, strata = args
    out, failed = [], 0
    for seed in seeds:
        try:
            values = stat(_resample(df, group, strata, np.random.default_rng(seed)))
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            failed += 1
            continue
        if all(np.isfinite(v) for v in values.values()):
            out.append(values)
        else:  # a refit that ran off (A overflowed to inf, N_opt nan): a failed fit, not a sample the quantiles skip
            failed += 1
    return out, failed


def bootstrap(df: pd.DataFrame, stat: Stat, *, n_resamples: int = 200, seed: int = 0, n_jobs: int | None = 2,
              group: str = "name", strata: str | None = None, level: float = 0.95) -> BootstrapResult:
    """Percentile bootstrap of `stat` over runs (`group` column), in `n_jobs` processes (None = all cores)."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}; give at least 1 (200 is a good default)")
    if group not in df.columns:
        raise ValueError(f"bootstrap group column {group!r} not in the table; columns are {list(df.columns)}")
    estimate = stat(df)
    seeds = np.random.SeedSequence(seed).generate_state(n_resamples).tolist()
    n_jobs = max(1, min(n_jobs or os.cpu_count() or 1, n_resamples))
    chunks = [(df, stat, seeds[i::n_jobs], group, strata) for i in range(n_jobs)]
    if n_jobs == 1 or "jax" in sys.modules:
        # Forking a process that has loaded JAX (a notebook or test session that also trains) can deadlock on JAX's
        # threads, and spawn cannot pickle closures as `stat`: run in this process instead.
        results = [_run_chunk(c) for c in chunks]
    else:
        # fork: workers inherit the imported modules instantly (analysis imports no threaded runtime such as JAX).
        with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_run_chunk, chunks))
    samples = pd.DataFrame([s for chunk, _ in results for s in chunk])
    n_failed = sum(f for _, f in results)
    if samples.empty:
        raise ValueError(f"bootstrap: all {n_resamples} resampled fits failed; the fit itself is too fragile "
                         "on this data (check the point estimate's warnings)")
    return BootstrapResult(estimate=estimate, samples=samples, n_failed=n_failed, level=level)


# --------------------------------------------------------------------------------------------------------------------
# Backtest
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BacktestResult:
    threshold: float
    loss_errors: pd.DataFrame  # held-out runs: name, N, D, C, loss, predicted, rel_error
    n_opt_errors: pd.DataFrame  # held-out budgets: C, N_opt observed (parabola), predicted (A2 and A3), rel errors

    def summary(self) -> dict:
        le, ne = self.loss_errors, self.n_opt_errors
        out = {"threshold": self.threshold, "n_test_runs": len(le),
               "loss_mean_abs_rel_error": float(le["rel_error"].abs().mean()) if len(le) else None,
               "loss_max_abs_rel_error": float(le["rel_error"].abs().max()) if len(le) else None}
        for col in ("rel_error_a2", "rel_error_a3"):
            if col in ne:
                out[f"N_opt_mean_abs_{col}"] = float(ne[col].abs().mean()) if len(ne) else None
        return out


def backtest(df: pd.DataFrame, threshold: float, *, approach3_method: str = "huber") -> BacktestResult:
    """Fit on runs whose budget (else C) is below `threshold`; predict the loss of every held-out run with
    Approach 3, and each held-out budget's IsoFLOP minimum N_opt with Approaches 2 and 3. Relative error =
    (predicted - observed) / observed."""
    key = isoflop_key(df)
    train, test = df[df[key] < threshold], df[df[key] >= threshold]
    if test.empty or train.empty:
        raise ValueError(f"backtest threshold {threshold:g} leaves {len(train)} training and {len(test)} held-out "
                         f"runs; choose a value between the smallest and largest {key}")
    fpt = float(np.median(df["C"] / (df["N"] * df["D"])))
    f3 = Approach3Stat(method=approach3_method, n_starts=32, flops_per_token=fpt).fit(train)
    pred = f3(test["N"], test["D"])
    loss_errors = test[["name", "N", "D", "C", "loss"]].assign(predicted=pred, rel_error=(pred - test["loss"]) / test["loss"])
    rows = []
    try:
        a2 = fit_approach2(train)
    except ValueError:
        a2 = None
    for budget, g in test.groupby(key):
        try:
            observed = isoflop_minimum(g, float(budget))
        except ValueError:
            continue  # this held-out budget does not bracket its minimum: nothing to compare against
        C, n_obs = observed["C"], observed["N_opt"]  # C: the slice's, in the table's convention
        row = {"C": float(C), "N_opt_observed": n_obs, "N_opt_a3": float(f3.N_opt(C)),
               "rel_error_a3": float(f3.N_opt(C) / n_obs - 1)}
        if a2 is not None:
            row.update(N_opt_a2=float(a2.N_opt(C)), rel_error_a2=float(a2.N_opt(C) / n_obs - 1))
        rows.append(row)
    return BacktestResult(threshold=threshold, loss_errors=loss_errors.reset_index(drop=True),
                          n_opt_errors=pd.DataFrame(rows))
