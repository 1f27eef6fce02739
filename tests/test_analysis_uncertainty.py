"""Bootstrap over runs (intervals that cover the truth) and the backtest."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analysis.checks.uncertainty import (Approach2Stat, Approach3Stat, KaplanStat, _resample, backtest, bootstrap)
from analysis.synthetic import CHINCHILLA_TRUTH as T
from analysis.synthetic import isoflop_runs

TRUE_A = T["beta"] / (T["alpha"] + T["beta"])


def test_resample_draws_whole_runs_within_strata():
    df = pd.DataFrame({"name": np.repeat(["r1", "r2", "r3", "r4"], 3), "budget": np.repeat([1, 1, 2, 2], 3),
                       "x": np.arange(12)})
    out = _resample(df, "name", "budget", np.random.default_rng(0))
    assert len(out) == 12
    for _, g in out.groupby("name"):  # every drawn run comes with all its rows, under a fresh id
        assert len(g) == 3 and g["x"].diff().dropna().eq(1).all()
    assert sorted(out.groupby("budget")["name"].nunique()) == [2, 2]  # each budget keeps its run count


def test_bootstrap_intervals_cover_truth_in_repeated_trials():
    """Loose band on coverage: nominal 95%, require >= 9 of 12 independent synthetic sweeps per parameter."""
    hits = {"alpha": 0, "beta": 0, "E": 0, "a": 0}
    for trial in range(12):
        runs = isoflop_runs(budgets=(1e17, 1e18, 1e19, 1e20), n_per_budget=10, noise=0.01, seed=100 + trial)
        full = Approach3Stat(method="vpnls").fit(runs)
        stat = Approach3Stat(method="vpnls", init=(full.E, full.A, full.B, full.alpha, full.beta))
        ci = bootstrap(runs, stat, n_resamples=60, n_jobs=1, seed=trial).ci
        for k in hits:
            truth = TRUE_A if k == "a" else T[k]
            hits[k] += ci[k][0] <= truth <= ci[k][1]
    assert all(h >= 9 for h in hits.values()), hits


def test_parallel_huber_bootstrap_reports_derived_quantities():
    runs = isoflop_runs(noise=0.01, n_per_budget=8)
    full = Approach3Stat().fit(runs)
    b = bootstrap(runs, Approach3Stat(C=1e21, init=(full.E, full.A, full.B, full.alpha, full.beta)),
                  n_resamples=24, n_jobs=2, seed=1)
    d = b.as_dict()
    assert d["n_resamples"] + d["n_failed"] == 24 and d["n_resamples"] >= 20
    for k in ("E", "A", "B", "alpha", "beta", "a", "b", "N_opt", "D_opt", "L_opt"):
        lo, hi = d["ci95"][k]
        assert lo <= hi and lo < d[k] * 1.05 and hi > d[k] * 0.95, k
    assert d["ci95"]["a"][0] <= TRUE_A <= d["ci95"]["a"][1]
    # Same seed, same samples: the pool does not make results depend on scheduling.
    again = bootstrap(runs, Approach3Stat(C=1e21, init=(full.E, full.A, full.B, full.alpha, full.beta)),
                      n_resamples=24, n_jobs=2, seed=1)
    pd.testing.assert_frame_equal(b.samples, again.samples)


def test_approach2_and_kaplan_stats_bootstrap():
    runs = isoflop_runs(noise=0.005, n_per_budget=9)
    b = bootstrap(runs, Approach2Stat(C=1e21), n_resamples=30, n_jobs=1, strata="budget")
    assert b.ci["a"][0] <= TRUE_A + 0.02 and b.ci["a"][1] >= TRUE_A - 0.02
    assert "N_opt" in b.ci
    k = bootstrap(runs, KaplanStat("N"), n_resamples=10, n_jobs=1)
    assert k.estimate["alpha_N"] > 0


@dataclasses.dataclass(frozen=True)
class _DrawsOfR0:  # how often a resample drew run r0; `runaway`: +inf when more than once, nan when never (a refit
    runaway: bool = False  # whose A overflowed, one whose N_opt is inf / inf), else finite

    def __call__(self, df: pd.DataFrame) -> dict:
        n = int((df["name"].str.split("#").str[0] == "r0").sum())
        if not self.runaway:
            return {"draws": float(n)}
        return {"x": float(df["x"].mean()), "y": {0: np.nan, 1: 1.0}.get(n, np.inf)}


def test_bootstrap_counts_a_non_finite_refit_as_failed_not_as_a_sample():
    runs = pd.DataFrame({"name": [f"r{i}" for i in range(10)], "x": np.arange(10.0)})
    draws = bootstrap(runs, _DrawsOfR0(), n_resamples=60, n_jobs=1, seed=3).samples["draws"]
    b = bootstrap(runs, _DrawsOfR0(runaway=True), n_resamples=60, n_jobs=1, seed=3)
    assert 0 < b.n_failed == int((draws != 1).sum()) < 60  # both kinds of runaway, counted
    assert len(b.samples) == 60 - b.n_failed and np.isfinite(b.samples.to_numpy()).all()
    assert b.as_dict()["ci95"]["y"] == [1.0, 1.0]  # the interval of the resamples that fitted, not inf


def test_bootstrap_errors():
    runs = isoflop_runs()
    with pytest.raises(ValueError, match="n_resamples=0"):
        bootstrap(runs, Approach2Stat(), n_resamples=0)
    with pytest.raises(ValueError, match="group column 'run'"):
        bootstrap(runs, Approach2Stat(), group="run")


def test_backtest_predicts_held_out_budgets():
    runs = isoflop_runs(budgets=(1e17, 3e17, 1e18, 3e18, 1e19), noise=0.002, n_per_budget=9)
    res = backtest(runs, 3e18)
    s = res.summary()
    assert s["n_test_runs"] == 18
    assert s["loss_mean_abs_rel_error"] < 0.01  # extrapolating one decade with the right functional form
    assert set(res.n_opt_errors["C"]) == {3e18, 1e19}
    assert s["N_opt_mean_abs_rel_error_a3"] < 0.15
    # Errors are against the held-out data: corrupting the held-out losses makes them large.
    bad = runs.copy()
    bad.loc[bad["budget"] >= 3e18, "loss"] *= 1.2
    assert backtest(bad, 3e18).summary()["loss_mean_abs_rel_error"] > 0.1
    with pytest.raises(ValueError, match="backtest threshold 1e\\+30 leaves 45 training and 0 held-out"):
        backtest(runs, 1e30)
